"""The import service: `POST /data/services/import` with its handlers DICOM-zip, gradual-DICOM and SI (§3)."""

from __future__ import annotations

from collections.abc import Iterable

from ingestd.testing.xnat.archive import _ArchiveApi
from ingestd.testing.xnat.catalog import _data_url
from ingestd.testing.xnat.common import (
    _AUTO_ARCHIVE_CODES,
    _GRADUAL_TYPES,
    _HANDLERS,
    _UPLOAD_NAMES,
    Key,
    _ArchiveError,
    _EntryError,
    _HttpError,
    _multipart_file_name,
    _Response,
    _uri_list,
)
from ingestd.testing.xnat.dicom import _archive_kind, _Dicom, _iter_entries, _parse_dicom, _require_uids
from ingestd.testing.xnat.model import _ArchiveOptions, _ImportContext, _Row
from ingestd.testing.xnat.routing import _Dest, _multipart, _Params, _parse_dest, _Request


class _ImportApi(_ArchiveApi):
    """`POST /data/services/import`."""

    # -- import (§3) -------------------------------------------------------------------------------------------

    def import_(self, request: _Request) -> _Response:
        params = request.params
        upload = self._upload(request)
        handler = params.get("import-handler")
        if handler is None:
            if request.content_type in _GRADUAL_TYPES:
                handler = "gradual-DICOM"
            else:  # §3.2: SI up to 1.8.9, uiDefaultCompressedUploaderImporter (DICOM-zip) from 1.8.10
                handler = "DICOM-zip" if self.config.modern else "SI"
        if handler not in _HANDLERS:
            raise _HttpError(404, f"Unknown importer implementation specified: {handler}")
        if params.get("src"):
            raise _HttpError(404, "Unknown src file.")
        if params.get("prearchive_code") == "1" and params.get("overwrite") is not None:  # the §3.3 UI-path bug
            raise _HttpError(400, "Overwrite flag was not set to a valid option. ('append' or 'delete')")
        if upload is None:
            # Without import-handler XNAT indexes an empty list (probably 500) [INF §3.1].
            status = 400 if params.get("import-handler") else 500
            raise _HttpError(status, "Unable to identify upload format.")
        ctx, dest = self._import_context(request, handler)
        if request.cut and (handler != "DICOM-zip" or _archive_kind(upload[0]) is None):
            raise _HttpError(400, "The connection was reset before the upload was read.")  # nothing stored [INF]
        if handler == "gradual-DICOM":
            return self._import_gradual(request, ctx, upload)
        if handler == "SI":
            return self._import_si(request, ctx, dest, upload)
        return self._import_zip(request, ctx, dest, upload)

    def _upload(self, request: _Request) -> tuple[str, bytes] | None:
        """§3.1: the single uploaded file as (internal name, bytes); multipart fields become parameters."""
        inbody = request.params.flag("inbody")
        if request.content_type == "multipart/form-data":
            if inbody:  # 406 is attempted, then the code fails [INF]
                raise _HttpError(500, "In-body uploads cannot be multipart/form-data.")
            if request.cut:  # commons-fileupload parseRequest reads the whole body first: it fails, nothing imported
                raise _HttpError(400, "Processing of multipart/form-data request failed. Stream ended unexpectedly")
            files: list[tuple[str, bytes]] = []
            for name, filename, payload in _multipart(request):
                if name == "reference":
                    raise _HttpError(400, "The reference parameter is not supported by the importer.")
                if filename is None:
                    request.params.add(name, payload.decode("utf-8", "replace"))
                else:
                    files.append((_multipart_file_name(filename), payload))
            if len(files) > 1:
                raise _HttpError(400, "Importer is limited to one uploaded resource at a time.")
            return files[0] if files else None
        content_type = request.content_type
        internal = _UPLOAD_NAMES.get(content_type)
        if internal is None and content_type.startswith(("text/", "image/")):
            internal = "upload." + (content_type.split("/", 1)[1] or "bin")
        if internal is None and inbody:
            internal = "upload.unsupported"
        if internal is None or (not request.body and content_type != "application/zip"):
            return None
        return internal, request.body

    def _import_context(self, request: _Request, handler: str) -> tuple[_ImportContext, _Dest | None]:
        """§3.3: which parameters each handler and version honours."""
        params = request.params
        ctx = _ImportContext(
            user=request.agent,
            project=params.get("PROJECT_ID"),
            subject=params.get("SUBJECT_ID"),
            label=params.get("EXPT_LABEL"),
            timestamp=params.get("PREARC_TIMESTAMP"),
            folder=params.get("PREARC_SESSION_FOLDER"),
            rename=params.flag("rename"),
            prevent_anon=params.flag("prevent_anon"),
            prevent_auto_commit=params.flag("prevent_auto_commit"),
            source=params.get("SOURCE") or "",
            visit=params.get("VISIT") or "",
            protocol=params.get("SUBTYPE") or "",
            timezone=params.get("TIMEZONE") or "",
            overwrite_files=params.flag("overwrite_files"),
        )
        raw_dest = params.get("dest")
        full = handler == "SI" or (handler == "DICOM-zip" and self.config.modern)
        if full:
            ctx.project = params.get("project") or ctx.project
            ctx.subject = params.get("subject") or ctx.subject
            ctx.label = params.get("session") or ctx.label
        dest = _parse_dest(raw_dest) if raw_dest else None
        if raw_dest and dest is None and handler == "DICOM-zip" and self.config.modern:
            raise _HttpError(400, "Parameter dest format error")
        if dest is not None and full:  # all parts of dest are merged into the parameters [INF: dest wins]
            ctx.project = dest.project or ctx.project
            ctx.timestamp = dest.timestamp or ctx.timestamp
            ctx.folder = dest.folder or ctx.folder
            ctx.subject = dest.subject or ctx.subject
            ctx.label = dest.label or ctx.label
        elif dest is not None and not ctx.project:  # ≤1.8.9 / gradual-DICOM: only the project of dest
            ctx.project = dest.project
        return ctx, dest

    def _receive_all(
        self, ctx: _ImportContext, entries: Iterable[tuple[str, bytes]], *, ignore: bool, ignore_any: bool
    ) -> list[Key]:
        """Feed entries one by one (§3.4); a failing entry aborts after the earlier ones were stored."""
        try:
            return self._receive_entries(ctx, entries, ignore=ignore, ignore_any=ignore_any)
        finally:
            with self.store.lock:
                for row in ctx.locked:
                    row.receiving -= 1
                ctx.locked.clear()

    def _receive_entries(
        self, ctx: _ImportContext, entries: Iterable[tuple[str, bytes]], *, ignore: bool, ignore_any: bool
    ) -> list[Key]:
        keys: dict[Key, None] = {}
        last_error: _EntryError | None = None
        for name, data in entries:
            if ctx.pace > 0 and self.stopping.wait(ctx.pace):  # the entry streams in; the server is stopping
                break
            try:
                dicom = _parse_dicom(name, data, require_uids=False)
                if self.store.filtered(ctx, dicom):  # a series import filter: 200, nothing stored, no row
                    continue
                _require_uids(name, dicom)
            except _EntryError as error:
                # Ignore-Unparsable: ≤1.8.9 skips only DICOM coding errors, ≥1.8.10 any per-entry client error.
                if ignore and (ignore_any or error.unreadable):
                    last_error = error
                    continue
                raise
            key = self.store.receive(ctx, name, data, dicom)
            if key is not None:
                keys[key] = None
        if not keys and last_error is not None:
            raise last_error
        return list(keys)

    def _import_gradual(self, request: _Request, ctx: _ImportContext, upload: tuple[str, bytes]) -> _Response:
        # An in-body upload's file writer is named from its Content-Type (`upload.dcm`, RequestUtil.deriveFileName), and
        # getSafeFile uses that name like any other: the first object of a scan is stored as upload.dcm.
        name, data = upload
        ctx.pace = request.import_seconds
        keys = self._receive_all(ctx, [(name, data)], ignore=False, ignore_any=False)
        return _uri_list(
            [f"/data/prearchive/projects/{k[0]}/{k[1]}/{k[2]}" for k in keys], request.params.get("format")
        )

    def _import_zip(
        self, request: _Request, ctx: _ImportContext, dest: _Dest | None, upload: tuple[str, bytes]
    ) -> _Response:
        params = request.params
        name, data = upload
        if _archive_kind(name) is None:
            raise _HttpError(400, "Unsupported format UNKNOWN")
        modern = self.config.modern
        action_commit = modern and params.get("action") == "commit"
        commit = modern and (params.get("dest") is not None or action_commit)
        raw_ignore = params.get("Ignore-Unparsable")
        ignore = raw_ignore.strip().lower() == "true" if raw_ignore is not None else action_commit
        entries = _iter_entries(name, data, nested=modern, cut=request.cut)
        if request.import_seconds > 0:
            try:
                count = sum(1 for _ in _iter_entries(name, data, nested=modern, cut=True))
            except _HttpError:
                count = 1
            ctx.pace = request.import_seconds / max(count, 1)
        keys = self._receive_all(ctx, entries, ignore=ignore, ignore_any=modern)
        if not commit:
            return _uri_list([_data_url(k) for k in keys], params.get("format"))
        # ≥1.8.10 dest / action=commit: build synchronously; archive only for an archive dest or commit+auto-archive.
        archive = (dest is not None and dest.kind == "archive") or (
            action_commit and (params.flag("auto-archive") or params.flag("AA"))
        )
        overwrite = params.get("overwrite")
        uris: list[str] = []
        for key in keys:
            row = self.store.build(key)
            if row is None:
                continue
            if not archive:
                uris.append("/data" + row.url)
                continue
            options = _ArchiveOptions(
                override_exceptions=overwrite in ("delete", "override"),
                allow_merge=overwrite is not None or row.autoarchive != "Manual",
                overwrite_files=params.flag("overwrite_files") or self.store.code(row.project) == 5,
            )  # §3.5 DicomZipImporter.archiveSession
            try:
                uris.append(self.store.archive(row.key, options))
            except _ArchiveError as failure:
                raise _HttpError(400, "unable to archive for the Prearchive session") from failure
        return _uri_list(uris, params.get("format"))

    def _import_si(
        self, request: _Request, ctx: _ImportContext, dest: _Dest | None, upload: tuple[str, bytes]
    ) -> _Response:
        """The legacy SessionImporter (§3.5): new folder per upload, synchronous build, archive if auto-archive."""
        params = request.params
        name, data = upload
        entries = _iter_entries(name, data, nested=self.config.modern) if _archive_kind(name) else [(name, data)]
        parsed: list[tuple[str, bytes, _Dicom]] = []
        for entry_name, content in entries:
            try:
                parsed.append((entry_name, content, _parse_dicom(entry_name, content)))
            except _EntryError:
                continue  # the session builder ignores files it cannot read
        if not parsed:
            raise _HttpError(400, "Upload did not include parsable files for session generation.")
        sessions: set[tuple[str | None, str, str]] = set()
        with self.store.lock:
            for _, _, dicom in parsed:
                project, _, label = self.store.route(ctx, dicom)
                sessions.add((project.id if project else None, dicom.study_uid, label))
        if len(sessions) > 1 and not (dest is not None and dest.kind == "prearchive"):
            raise _HttpError(400, "Upload included files for multiple imaging sessions.")
        ctx.new_rows_only = True
        received = (self.store.receive(ctx, n, c, d) for n, c, d in parsed)
        keys = list(dict.fromkeys(key for key in received if key is not None))
        uris: list[str] = []
        for key in keys:
            row = self.store.build(key)
            if row is None:
                continue
            code = self.store.code(row.project)
            wanted = (
                (code is not None and code >= 4)
                or row.autoarchive in _AUTO_ARCHIVE_CODES
                or (dest is not None and dest.kind == "archive")
                or params.flag("auto-archive")
                or params.flag("AA")
            )
            uris.append(self._si_archive(params, row) if wanted else "/data" + row.url)
        return _uri_list(uris, params.get("format"))

    def _si_archive(self, params: _Params, row: _Row) -> str:
        overwrite = params.get("overwrite")
        # Importer.parseOverrideValue (§3.3): absent -> (false, false); delete/override -> (true, true);
        # any other value -> (false, true).
        options = _ArchiveOptions(
            override_exceptions=overwrite in ("delete", "override"),
            allow_merge=overwrite is not None,
            overwrite_files=params.flag("overwrite_files") or self.store.code(row.project) == 5,
        )
        try:
            return self.store.archive(row.key, options)
        except _ArchiveError as failure:  # SI's status for archive failures is [INF]
            raise _HttpError(409 if failure.conflict else 500, failure.message) from failure
