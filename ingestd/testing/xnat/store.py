"""The store: all server state behind one lock, and the prearchive/archive operations (§3.4, §5, §6)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta

from ingestd.testing.xnat.common import (
    _ARCHIVABLE,
    _AUTO_ARCHIVE_CODES,
    _INTERRUPTIBLE,
    _REUSE_AS_IS,
    _SCAN_TYPES,
    _VALID_FILE_NAME,
    ARCHIVING,
    BUILDING,
    CONFLICT,
    ERROR,
    LOCKED_ARCHIVING,
    QUEUED_ARCHIVING,
    QUEUED_BUILDING,
    QUEUED_MOVING,
    READY,
    RECEIVING,
    RECEIVING_INTERRUPT,
    UNASSIGNED,
    Key,
    _ArchiveError,
    _assignment,
    _code_name,
    _dicom_datetime,
    _EntryError,
    _HttpError,
    _label_chars,
    _now,
    _timestamp_datetime,
    _to_file_name_chars,
)
from ingestd.testing.xnat.dicom import _Dicom
from ingestd.testing.xnat.merge import _Merge
from ingestd.testing.xnat.model import (
    _AnonScript,
    _ArchiveOptions,
    _BuiltScan,
    _Config,
    _Drop,
    _Experiment,
    _File,
    _HttpSession,
    _ImportContext,
    _Project,
    _Row,
    _Subject,
    _Token,
    _User,
)

LOG = logging.getLogger("ingestd.testing.xnat")


class _Store(_Merge):
    """All server state behind one re-entrant lock, and the prearchive/archive operations (§3.4, §5, §6)."""

    def __init__(self, config: _Config) -> None:
        self.config = config
        self.lock = threading.RLock()
        self.users: dict[str, _User] = {}
        self.projects: dict[str, _Project] = {}
        self.tokens: dict[str, _Token] = {}
        self.sessions: dict[str, _HttpSession] = {}
        # requireLogin=false: anonymous requests run as XNAT's `guest` user, who has no project rights here (Spring's
        # anonymous principal, SecurityConfig.configure: `.anonymous().principal(DEFAULT_GUEST_USERNAME)`).
        self.guest = _User("guest", "")
        self.rows: dict[Key, _Row] = {}
        self.subjects: dict[tuple[str, str], _Subject] = {}
        self.experiments: dict[tuple[str, str], _Experiment] = {}
        self.drops: list[_Drop] = []
        self.site_anon: _AnonScript | None = None
        self.project_anon: dict[str, _AnonScript] = {}
        self._serial = 0
        self._last_timestamp: datetime | None = None

    # -- users, projects, permissions --------------------------------------------------------------------------

    def project(self, name: str | None) -> _Project | None:
        """A project by ID or alias."""
        if not name:
            return None
        with self.lock:
            found = self.projects.get(name)
            if found is not None:
                return found
            return next((p for p in self.projects.values() if name in p.aliases), None)

    def code(self, project_id: str | None) -> int | None:
        project = self.project(project_id)
        return project.prearchive_code if project else None

    @staticmethod
    def can_read(user: _User, project: _Project) -> bool:
        name = user.username
        return user.admin or name in project.owners or name in project.members or name in project.collaborators

    @staticmethod
    def can_edit(user: _User, project: _Project) -> bool:
        return user.admin or user.username in project.owners or user.username in project.members

    def can_edit_label(self, user: _User, label: str) -> bool:
        """Edit rights on a prearchive project (`Unassigned` needs all-data access = admin, §4)."""
        if label == UNASSIGNED:
            return user.admin
        project = self.project(label)
        return project is not None and self.can_edit(user, project)

    # -- prearchive: receiving -----------------------------------------------------------------------------------

    def _new_timestamp(self) -> str:
        """`yyyyMMdd_HHmmssSSS`, strictly increasing so every new row gets its own folder (§1.5)."""
        now = _now()
        if self._last_timestamp is not None and now <= self._last_timestamp:
            now = self._last_timestamp + timedelta(milliseconds=1)
        self._last_timestamp = now
        return now.strftime("%Y%m%d_%H%M%S") + f"{now.microsecond // 1000:03d}"

    def _readable_project(self, user: _User, name: str) -> _Project | None:
        project = self.project(name.strip())
        return project if project is not None and self.can_read(user, project) else None

    def route(self, ctx: _ImportContext, dicom: _Dicom) -> tuple[_Project | None, str, str]:
        """§4: (project, subject label, session label) for one object; explicit parameters win."""
        project = self._readable_project(ctx.user, ctx.project) if ctx.project else None
        if project is None:  # an unknown/unreadable PROJECT_ID is silently ignored (§3.3)
            candidates = [_assignment(text, "Project") for text in dicom.comments]
            candidates += [dicom.study_description, dicom.accession]
            for candidate in candidates:
                project = self._readable_project(ctx.user, candidate) if candidate.strip() else None
                if project is not None:
                    break
        subject = ctx.subject or next((v for v in (_assignment(t, "Subject") for t in dicom.comments) if v), "")
        subject = subject or _label_chars(dicom.patient_name)
        label = ctx.label or next((v for v in (_assignment(t, "Session") for t in dicom.comments) if v), "")
        label = label or _label_chars(dicom.patient_id) or "dicom_upload"
        return project, subject, label

    def receive(self, ctx: _ImportContext, name: str, data: bytes, dicom: _Dicom) -> Key | None:
        """§3.4 steps 2-8 for one parsed object (`GradualDicomImporter.call`): route, find-or-create the row, name
        and store the file. `name` is the file writer's name (an archive entry's last path component).

        None when a site-wide DicomEdit "reject" drops the object after the file was written, deleting it again
        (archive/GradualDicomImporter.java:388-400; skipped when the row says `prevent_anon`): the import still
        answers 200 (`returnEmptyList`). Series import filters drop objects earlier, before any row exists; the
        caller asks `filtered` first, before the SOP UID checks, as XNAT does (:193-211). The legacy SI importer
        (`new_rows_only`) takes another path and is not filtered [INF].
        """
        with self.lock:
            project, subject, label = self.route(ctx, dicom)
            known = set(self.rows)
            row = self._find_or_create(ctx, project, subject, label, dicom)
            is_new = row.key not in known
            incoming, files = name, row.scans.setdefault(dicom.scan_id, {})
            name = self._file_name(ctx, name, dicom, files)
            files[name] = _File(name, data, dicom)
            # GradualDicomImporter.updateSessionLastMod (archive/GradualDicomImporter.java:472-487 at 4fb6bc14, :384-399
            # at d3a896206), called from eitherGetOrCreateSession for an existing row only: lastmod is refreshed when it
            # is more than 15 s old (`lastmod_refresh_seconds`); a new row's lastmod is its creation time.
            now = _now()
            if not is_new and (now - row.lastmod).total_seconds() >= self.config.lastmod_refresh_seconds:
                row.lastmod = now
            if ctx.pace > 0 and row not in ctx.locked:  # PrearcUtils.lockFile while the entry streams in
                row.receiving += 1
                ctx.locked.append(row)
            anon = self.site_anon
            if not ctx.new_rows_only and row.prevent_anon != "true" and anon and anon.enabled and anon.fails:
                # A failing site-wide script (GradualDicomImporter.java:389-417 at 4fb6bc14, :320-349 at d3a896206):
                # handleAnonymizationError deletes the row if this file created it, else the file, and throws a
                # ServerException(500) -- which call()'s own `catch (Throwable t)` (:431-435; :368-372) turns into
                # ClientException(400, "unable to read DICOM object " + name). So 400, not the 500 of §3.6.
                if is_new:
                    self.rows.pop(row.key, None)
                else:
                    del files[name]
                    if not files:
                        del row.scans[dicom.scan_id]
                raise _EntryError(f"unable to read DICOM object {incoming}", unreadable=False)
            if not ctx.new_rows_only and row.prevent_anon != "true" and self._dropped(dicom, "anonymization"):
                del files[name]  # FileUtils.deleteQuietly(outputFile): an earlier copy it overwrote is gone too
                if not files:
                    del row.scans[dicom.scan_id]
                return None
            return row.key

    def filtered(self, ctx: _ImportContext, dicom: _Dicom) -> bool:
        """Whether a series import filter drops the object (GradualDicomImporter.java:193-200)."""
        with self.lock:
            return not ctx.new_rows_only and self._dropped(dicom, "filter")

    def _dropped(self, dicom: _Dicom, stage: str) -> bool:
        return any(
            drop.stage == stage and drop.predicate(dicom.sop_uid, dicom.series_uid, dicom.series_description)
            for drop in self.drops
        )

    def _find_or_create(
        self, ctx: _ImportContext, project: _Project | None, subject: str, label: str, dicom: _Dicom
    ) -> _Row:
        project_id = project.id if project else None
        identity = (project_id, dicom.study_uid, label)
        if ctx.new_rows_only:
            existing = self.rows.get(ctx.created[identity]) if identity in ctx.created else None
            if existing is not None:
                return existing
        else:
            for row in self.rows.values():  # PrearcDatabase.eitherGetOrCreateSession (§3.4 step 5)
                if (row.project, row.tag, row.name) != identity:
                    continue
                if row.status in _REUSE_AS_IS:
                    return row
                if row.status == BUILDING:
                    row.status = RECEIVING_INTERRUPT
                    return row
                if row.status in _INTERRUPTIBLE:
                    row.status = RECEIVING
                    row.note("new files arrived: status set back to RECEIVING")
                    return row
        row = self._new_row(ctx, project, subject, label, dicom)
        ctx.created[identity] = row.key
        return row

    def _new_row(self, ctx: _ImportContext, project: _Project | None, subject: str, label: str, dicom: _Dicom) -> _Row:
        timestamp = ctx.timestamp or self._new_timestamp()
        project_label = project.id if project else UNASSIGNED
        wanted = ctx.folder or label
        folder = next(
            (
                f
                for f in [wanted] + [f"{wanted}_{n}" for n in (1, 2, 3)]
                if (project_label, timestamp, f) not in self.rows
            ),
            None,
        )  # §1.5: suffix _1.._3 on a clash
        if folder is None:
            raise _HttpError(500, f"Unable to create a prearchive session folder for {wanted}: name clash")
        autoarchive = _code_name(project.prearchive_code if project else None)
        requested = next((v for v in (_assignment(t, "AA") for t in dicom.comments) if v), "").lower()
        if requested in ("true", "t"):  # §4 AA: override
            autoarchive = "AutoArchive"
        elif requested in ("false", "f"):
            autoarchive = "Manual"
        row = _Row(
            project=project.id if project else None,
            timestamp=timestamp,
            folder=folder,
            name=label,
            tag=dicom.study_uid,
            subject=subject,
            status=RECEIVING,
            lastmod=_now(),
            scan_datetime=_dicom_datetime(dicom.study_date, dicom.study_time),
            has_study_time=bool(dicom.study_time),
            autoarchive=autoarchive,
            prevent_anon="true" if ctx.prevent_anon else "false",
            prevent_auto_commit="true" if ctx.prevent_auto_commit else "false",
            source=ctx.source,
            visit=ctx.visit,
            protocol=ctx.protocol,
            timezone=ctx.timezone,
            overwrite_files=ctx.overwrite_files,
        )
        row.note(f"session created by {ctx.user.username}")
        self.rows[row.key] = row
        return row

    @staticmethod
    def _file_name(ctx: _ImportContext, name: str, dicom: _Dicom, files: dict[str, _File]) -> str:
        """`GradualDicomImporter.getSafeFile` (archive/GradualDicomImporter.java:630-659).

        The template namer's name with `rename=true` or when `Files.toFileNameChars(name)` is not a valid file name;
        otherwise that name, unless a file of that name in the scan holds another SOP Instance UID or SOP Class UID
        (then the namer's name; the same pair is overwritten in place). The namer's name itself is never checked,
        so a file already there under it is overwritten.
        """
        safe = dicom.template_file_name()
        if ctx.rename:
            return safe
        requested = _to_file_name_chars(name)
        if not _VALID_FILE_NAME.fullmatch(requested):
            return safe
        existing = files.get(requested)
        if existing is None:
            return requested
        same = existing.dicom.sop_uid == dicom.sop_uid and existing.dicom.sop_class == dicom.sop_class
        return requested if same else safe

    # -- prearchive: operations ----------------------------------------------------------------------------------

    def row(self, key: Key) -> _Row | None:
        with self.lock:
            return self.rows.get(key)

    def pause(self) -> None:
        if self.config.operation_seconds > 0:
            time.sleep(self.config.operation_seconds)

    def build(self, key: Key, *, only_from: frozenset[str] | None = None) -> _Row | None:
        """QUEUED_BUILDING/...-> BUILDING -> READY (or ERROR; back to RECEIVING if files arrived meanwhile)."""
        with self.lock:
            row = self.rows.get(key)
            if row is None or (only_from is not None and row.status not in only_from):
                return None
            if row.status.startswith("_") or row.status == BUILDING:
                # PrearcSessionResource.postActionBuild/postActionCommit (restlet/resources/prearchive/
                # PrearcSessionResource.java:333-339, 403-437, same at d3a896206 and 4fb6bc14): 409 "session document
                # locked" when PrearcDatabase.setStatus(..., BUILDING) refuses, i.e. isLocked: the status is one of
                # PrearcUtils.inProcessStatusMap's `_` values, set by LockAndSync.run/lockSession while a build
                # (_BUILDING, here BUILDING), archive (_ARCHIVING), move or delete runs. An import only takes per-file
                # locks (the row stays RECEIVING), so it never makes a build answer 409; nor do ARCHIVING/QUEUED_*.
                raise _HttpError(409, "session document locked")
            row.status = BUILDING
        self.pause()
        with self.lock:
            if self.rows.get(row.key) is not row:
                return None
            interrupted = row.status == RECEIVING_INTERRUPT
            row.lastmod = _now()
            if not any(row.scans.values()):
                row.status = ERROR
                row.note("build failed: no files")
                return row
            row.built = True
            row.catalog = {
                scan_id: _BuiltScan(
                    next(iter(files.values())).dicom.series_description,
                    _SCAN_TYPES.get(next(iter(files.values())).dicom.modality, "xnat:otherDicomScanData"),
                    tuple(files),
                )
                for scan_id, files in row.scans.items()
                if files
            }
            row.uploaded = _timestamp_datetime(row.timestamp)
            row.scan_time = row.scan_datetime.strftime("%H:%M:%S") if row.scan_datetime and row.has_study_time else ""
            row.status = RECEIVING if interrupted else READY
            row.note("session built" + (" (interrupted by new files)" if interrupted else ""))
            return row

    def archive(self, key: Key, options: _ArchiveOptions, *, from_statuses: frozenset[str] = _ARCHIVABLE) -> str:
        """Archive one row (§6): lock it, merge into the archive, delete the row; CONFLICT/ERROR on failure."""
        with self.lock:
            row = self.rows.get(key)
            if row is None:
                raise _HttpError(404, f"/prearchive/projects/{key[0]}/{key[1]}/{key[2]} not found.")
            if row.status not in from_statuses:
                raise _HttpError(403, "Operation already in progress on this prearchive entry.")
            row.status = LOCKED_ARCHIVING
        self.pause()
        with self.lock:
            try:
                uri = self._merge(row, options)
            except _ArchiveError as failure:
                row.status = CONFLICT if failure.conflict else ERROR
                row.lastmod = _now()
                row.note(f"archive failed: {failure.message}")
                raise
            self.rows.pop(row.key, None)
            return uri

    def delete(self, key: Key) -> None:
        with self.lock:
            row = self.rows.get(key)
            if row is None:
                raise _HttpError(404, f"/prearchive/projects/{key[0]}/{key[1]}/{key[2]} not found.")
            if row.status.startswith("_"):
                raise _HttpError(400, f"Unable to delete the session: it is {row.status}.")
            del self.rows[key]

    def move(self, key: Key, destination: _Project) -> Key:
        with self.lock:
            row = self.rows.get(key)
            if row is None:
                raise _HttpError(404, f"/prearchive/projects/{key[0]}/{key[1]}/{key[2]} not found.")
            if row.status.startswith("_") or row.status in (BUILDING, ARCHIVING, QUEUED_ARCHIVING):
                raise _HttpError(409, "session document locked")
            new_key = (destination.id, row.timestamp, row.folder)
            if new_key in self.rows:
                raise _HttpError(
                    409,
                    f"A prearchive resource with session {row.folder} already exists in the project {destination.id}",
                )
            del self.rows[key]
            row.project = destination.id
            if row.status == QUEUED_MOVING:
                row.status = READY if row.built else RECEIVING
            row.note(f"moved from {key[0]} to {destination.id}")
            self.rows[new_key] = row
            return new_key

    def wants_auto_archive(self, row: _Row) -> bool:
        """§5.3: row autoarchive AutoArchive* or project code ≥4."""
        code = self.code(row.project)
        return row.autoarchive in _AUTO_ARCHIVE_CODES or (code is not None and code >= 4)

    def queued_archive_options(self, row: _Row) -> _ArchiveOptions:
        """§5.3: queued auto-archive uses override=false, append=true, overwriteFiles = code 5 or overwrite_files."""
        code = self.code(row.project)
        overwrite = row.overwrite_files or code == 5 or row.autoarchive == "AutoArchiveOverwrite"
        return _ArchiveOptions(override_exceptions=False, allow_merge=True, overwrite_files=overwrite)

    def idle_pass(self, *, ignore_idle: bool) -> None:
        """One run of the SessionXMLRebuilder (§5.3): build idle RECEIVING rows, then auto-archive as configured."""
        with self.lock:
            now = _now()
            due = [
                row
                for row in self.rows.values()
                if row.status == RECEIVING
                and row.prevent_auto_commit != "true"
                and row.source != "uploader"
                and row.receiving == 0  # SessionXMLRebuilder.java:99 `!PrearcUtils.isSessionReceiving(triple)`
                and (ignore_idle or (now - row.lastmod).total_seconds() >= self.config.idle_build_seconds)
            ]
            for row in due:
                row.status = QUEUED_BUILDING
            keys = [row.key for row in due]
        for key in keys:
            built = self.build(key, only_from=frozenset({QUEUED_BUILDING}))
            if built is None:
                continue
            with self.lock:
                if built.status != READY or not self.wants_auto_archive(built) or self.rows.get(built.key) is not built:
                    continue
                built.status = QUEUED_ARCHIVING
                options = self.queued_archive_options(built)
            try:
                self.archive(built.key, options, from_statuses=frozenset({QUEUED_ARCHIVING}))
            except (_ArchiveError, _HttpError) as exc:
                LOG.info("auto-archive of %s failed: %s", built.url, exc)
