"""The archive: experiments, scans, resources and files (§6, §7), and the archive service (§6)."""

from __future__ import annotations

import logging
import re
from concurrent.futures import TimeoutError as FutureTimeoutError

from ingestd.testing.xnat.catalog import (
    _catalog_xml,
    _experiment_item,
    _experiment_xml,
    _extra_catalog_xml,
    _find_extra,
    _scan_resources,
)
from ingestd.testing.xnat.common import (
    _ARCHIVABLE,
    _AUTO_ARCHIVE_CODES,
    _SESSION_TYPES,
    ARCHIVING,
    ROW_COLUMNS,
    UNASSIGNED,
    Key,
    _ArchiveError,
    _HttpError,
    _java_timestamp,
    _json,
    _Response,
    _table,
    _text,
    _uri_list,
)
from ingestd.testing.xnat.model import _ArchiveOptions, _Experiment, _Project, _Row, _Scan
from ingestd.testing.xnat.routing import _Params, _prearc_key, _Request
from ingestd.testing.xnat.site import _SiteApi

LOG = logging.getLogger("ingestd.testing.xnat")


class _ArchiveApi(_SiteApi):
    """Archived experiments, scans, catalogs and files, and `POST /data/services/archive`."""

    def experiments(self, request: _Request) -> _Response:
        project = self._project(request)
        subject = self._subject(request, project) if "subject" in request.groups else None
        with self.store.lock:
            found = [
                e for e in self.store.experiments.values()
                if e.project == project.id and (subject is None or e.subject == subject.label)
            ]  # fmt: skip
            subject_ids = {e.subject: self.store.subject_id(e.project, e.subject) for e in found}
        rows = [
            {
                "ID": e.id, "project": e.project, "label": e.label, "subject_ID": subject_ids[e.subject],
                "subject_label": e.subject, "UID": e.study_uid, "xsiType": e.xsi_type, "date": e.date,
                "insert_date": _java_timestamp(e.inserted), "URI": f"/data/experiments/{e.id}",
            }
            for e in found
        ]  # fmt: skip
        columns = [
            "ID",
            "project",
            "label",
            "subject_ID",
            "subject_label",
            "UID",
            "xsiType",
            "date",
            "insert_date",
            "URI",
        ]
        return _table(columns, rows, request.fmt())

    def _experiment(self, request: _Request) -> _Experiment:
        if "experiment_id" in request.groups:  # /data/experiments/{ID}: the accession ID only
            wanted = request.group("experiment_id")
            with self.store.lock:
                found = next((e for e in self.store.experiments.values() if e.id == wanted), None)
                project = self.store.project(found.project) if found else None
            if found is None or project is None:
                raise _HttpError(404, f"Unable to find experiment {wanted}")
            if not self.store.can_read(request.agent, project):
                raise _HttpError(403, f"The current user does not have access to the requested project: {project.id}")
            return found
        project = self._project(request)
        name = request.group("experiment")
        subject = request.group("subject") if "subject" in request.groups else None
        with self.store.lock:
            for experiment in self.store.experiments.values():
                if experiment.project != project.id or name not in (experiment.label, experiment.id):
                    continue
                owner_id = self.store.subject_id(experiment.project, experiment.subject)
                if subject is None or subject in (experiment.subject, owner_id):
                    return experiment
        raise _HttpError(404, f"Unable to find experiment {name}")

    def experiment(self, request: _Request) -> _Response:
        experiment = self._experiment(request)
        with self.store.lock:
            subject_id = self.store.subject_id(experiment.project, experiment.subject)
            item = _experiment_item(experiment, subject_id)
        if request.fmt("xml") == "json":
            return _json({"items": [item]})
        return _text(_experiment_xml(experiment, subject_id), content_type="text/xml;charset=UTF-8")

    def scans(self, request: _Request) -> _Response:
        experiment = self._experiment(request)
        rows = [
            {
                "ID": s.id, "type": s.type, "series_description": s.type, "UID": s.series_uid, "xsiType": s.xsi_type,
                "quality": "usable", "file_count": str(len(s.files)), "URI": f"{experiment.uri}/scans/{s.id}",
            }
            for s in experiment.scans.values()
        ]  # fmt: skip
        columns = ["ID", "type", "series_description", "UID", "xsiType", "quality", "file_count", "URI"]
        return _table(columns, rows, request.fmt())

    def _scan(self, request: _Request) -> tuple[_Experiment, _Scan]:
        experiment = self._experiment(request)
        scan = experiment.scans.get(request.group("scan"))
        if scan is None:
            raise _HttpError(404, f"Unable to find scan {request.group('scan')}")
        return experiment, scan

    def scan(self, request: _Request) -> _Response:
        _, scan = self._scan(request)
        fields = {"ID": scan.id, "type": scan.type, "UID": scan.series_uid, "series_description": scan.type}
        return _json(
            {
                "items": [
                    {"meta": {"xsi:type": scan.xsi_type, "isHistory": False}, "data_fields": fields, "children": []}
                ]
            }
        )

    def scan_resources(self, request: _Request) -> _Response:
        """A scan's resources (restlet/resources/files/CatalogResourceList.java `represent`): the columns of
        XNATTemplate.loadCatalogs (`xnat_abstractresource_id`, `label`, `element_name`, `category`, `cat_id`,
        `cat_desc`) as CatalogUtils.populateTable extends them (`file_count`, `file_size`, `tags`, `content`,
        `format`), with the table metadata `title` and `totalRecords` in the JSON."""
        _, scan = self._scan(request)
        columns = [
            "xnat_abstractresource_id", "label", "element_name", "category", "cat_id", "cat_desc", "file_count",
            "file_size", "tags", "content", "format",
        ]  # fmt: skip
        rows = [
            {
                "xnat_abstractresource_id": str(resource_id),
                "label": label,
                "element_name": "xnat:resourceCatalog",
                "category": "scans",
                "cat_id": scan.id,
                "cat_desc": scan.type,
                "file_count": str(len(files)),
                "file_size": str(sum(len(data) for data in files.values())),
                "tags": "",
                "content": content,
                "format": fmt,
            }
            for label, resource_id, fmt, content, files in _scan_resources(scan)
        ]
        meta = (("totalRecords", str(len(rows))), ("title", "Resources"))
        return _table(columns, rows, request.fmt(), meta=meta)

    def scan_catalog(self, request: _Request) -> _Response:
        """`GET .../scans/{SCAN_ID}/resources/{RESOURCE_ID}`: the resource's catalog document, always XML.

        XNATApplication.attachArchiveURI (restlet/XNATApplication.java:223,229) -> CatalogResource.represent
        (restlet/resources/files/CatalogResource.java:87-128): `BeanRepresentation(catalogData.catBean, TEXT_XML)`.
        The resource is named by label or by its xnat_abstractresource_id; anything not found (experiment, scan,
        resource) is 404 "Unable to find the specified catalog." (an unknown project or subject fails earlier, in
        XNATTemplate's constructor).
        """
        missing = _HttpError(404, "Unable to find the specified catalog.")
        if "project" in request.groups:
            project = self.store.project(request.group("project"))
            if project is None:
                raise _HttpError(404, "Unable to identify project")
            if "subject" in request.groups:
                name = request.group("subject")
                with self.store.lock:
                    known = any(
                        s.project == project.id and name in (s.label, s.id) for s in self.store.subjects.values()
                    )
                if not known:
                    raise _HttpError(404, "Unable to identify subject")
        try:
            _, scan = self._scan(request)
        except _HttpError as error:
            raise missing from error
        if request.group("resource") in ("DICOM", str(scan.resource_id)):
            return _text(_catalog_xml(scan), content_type="text/xml;charset=UTF-8")
        extra = _find_extra(scan, request.group("resource"))
        if extra is None:
            raise missing
        return _text(_extra_catalog_xml(extra), content_type="text/xml;charset=UTF-8")

    def _scan_files(self, request: _Request) -> tuple[str, str, str, dict[str, bytes]]:
        """(files URI, resource label, format, file name -> bytes) of a scan resource named by label or ID."""
        experiment, scan = self._scan(request)
        wanted = request.group("resource")
        for label, resource_id, fmt, _, files in _scan_resources(scan):
            if wanted in (label, str(resource_id)):
                return f"{experiment.uri}/scans/{scan.id}/resources/{label}/files", label, fmt, files
        raise _HttpError(404, f"Unable to find resource {wanted}")

    def scan_files(self, request: _Request) -> _Response:
        base, label, fmt, files = self._scan_files(request)
        rows = [
            {"Name": n, "Size": str(len(data)), "URI": f"{base}/{n}", "collection": label, "file_format": fmt}
            for n, data in files.items()
        ]
        return _table(["Name", "Size", "URI", "collection", "file_format"], rows, request.fmt())

    def scan_file(self, request: _Request) -> _Response:
        _, label, _, files = self._scan_files(request)
        found = files.get(request.group("name"))
        if found is None:
            raise _HttpError(404, f"Unable to find file {request.group('name')}")
        return _Response(200, found, "application/dicom" if label == "DICOM" else "application/octet-stream")

    # -- archive (§6) -------------------------------------------------------------------------------------------

    def _archivable_key(self, request: _Request, src: str) -> tuple[Key, _Project]:
        """§6.4 checks of one `src`, in XNAT's order."""
        path = src.split("?", 1)[0]
        if re.match(r"^(?:/data|/REST)?/archive/", path):
            raise _HttpError(400, f"Invalid src URI ({src})")
        key = _prearc_key(src)
        if key is None:
            raise _HttpError(400, f"Invalid src URI ({src})")
        if key[0] == UNASSIGNED:
            raise _HttpError(400, "Cannot archive sessions from the Unassigned folder.")
        project = self.store.project(key[0])
        if project is None:
            raise _HttpError(500, f"{src} invalid.")
        if not self.store.can_edit(request.agent, project):
            raise _HttpError(403, src)
        key = (project.id, key[1], key[2])
        if self.store.row(key) is None:
            raise _HttpError(404, f"/prearchive/projects/{key[0]}/{key[1]}/{key[2]} not found.")
        return key, project

    def archive(self, request: _Request) -> _Response:
        params = request.params
        sources = params.all("src")
        if not sources and all(params.get(k) for k in ("project", "PREARC_TIMESTAMP", "PREARC_SESSION_FOLDER")):
            sources = [f"/prearchive/projects/{params.get('project')}/{params.get('PREARC_TIMESTAMP')}/"
                       f"{params.get('PREARC_SESSION_FOLDER')}"]  # fmt: skip
            params.set("project", "")
        if not sources:
            raise _HttpError(404, "Unknown prearchive session.")
        if len(sources) > 1:
            return self._archive_batch(request, sources)
        key, _ = self._archivable_key(request, sources[0])
        target = params.get("project")
        if target:
            destination = self.store.project(target)
            if destination is None or not self.store.can_edit(request.agent, destination):
                raise _HttpError(403, "Invalid permissions for new project.")
            target = destination.id
        overwrite = params.get("overwrite")
        override = overwrite in ("append", "delete", "override")  # Archiver.finishSingleSessionArchive (§6.3)
        row = self.store.row(key)
        code = self.store.code(key[0])
        options = _ArchiveOptions(
            project=target or None,
            subject=params.get("subject") or params.get("SUBJECT_ID"),
            label=self._archive_label(params, row),
            override_exceptions=override,
            allow_merge=True,
            overwrite_files=override or params.flag("overwrite_files") or code == 5,
        )
        redirect = params.flag("redirect") or (row is not None and self._auto_archive(params, row, code))
        uri = self._run_archive(key, options)
        if redirect:  # §6.2: 303 without a body
            return _Response(303, headers=[("Location", self.site_url() + uri)])
        return _uri_list([uri])

    @staticmethod
    def _archive_label(params: _Params, row: _Row | None) -> str | None:
        """§6.1: session, else {xsiType}/label, else EXPT_LABEL, else label (then the row's name)."""
        xsi_type = _SESSION_TYPES.get(row.modality, "xnat:otherDicomSessionData") if row else ""
        for key in ("session", f"{xsi_type}/label", "EXPT_LABEL", "label"):
            if params.get(key):
                return params.get(key)
        return None

    @staticmethod
    def _auto_archive(params: _Params, row: _Row, code: int | None) -> bool:
        """`PrearcSession.isAutoArchive` (§6.2): the row first, then an explicit parameter, then the project."""
        if row.autoarchive in _AUTO_ARCHIVE_CODES:
            return True
        explicit = params.get("auto-archive") or params.get("AA")
        if explicit is not None:
            return explicit.strip().lower() == "true"
        return code is not None and code >= 4

    def _run_archive(self, key: Key, options: _ArchiveOptions) -> str:
        """Queue the archive job and wait for it up to the timeout (§6.2); failures are 500 `FAILED: ...`."""
        future = self.jobs.submit(self.store.archive, key, options)
        try:
            return future.result(timeout=self.config.archive_timeout_seconds)
        except FutureTimeoutError as exc:
            raise _HttpError(
                500, f"The session {key[0]}/{key[1]}/{key[2]} did not complete within the configured timeout interval."
            ) from exc
        except _ArchiveError as failure:
            raise _HttpError(
                500, f"FAILED: Unable to archive {key[2]}: Operation Failed: {failure.message}"
            ) from failure

    def _archive_batch(self, request: _Request, sources: list[str]) -> _Response:
        """§6.3/§6.5 batch mode: rows go ARCHIVING, the answer comes at once, archiving continues in the background."""
        overwrite = request.params.get("overwrite")
        keys = [self._archivable_key(request, src)[0] for src in sources]
        rows: list[dict[str, str]] = []
        with self.store.lock:
            for key in keys:
                row = self.store.rows[key]
                if row.status not in _ARCHIVABLE:
                    raise _HttpError(403, "Operation already in progress on this prearchive entry.")
            for key in keys:
                row = self.store.rows[key]
                row.status = ARCHIVING
                rows.append(row.as_dict())
        for key in keys:
            code = self.store.code(key[0])
            options = _ArchiveOptions(
                override_exceptions=overwrite == "delete",
                allow_merge=overwrite in ("append", "delete"),
                overwrite_files=overwrite in ("append", "delete")
                or request.params.flag("overwrite_files")
                or code == 5,
            )
            self.jobs.submit(self._quiet_archive, key, options, frozenset({ARCHIVING}))
        return _table(ROW_COLUMNS, rows, request.fmt("xml"))

    def _quiet_archive(self, key: Key, options: _ArchiveOptions, from_statuses: frozenset[str]) -> None:
        try:
            self.store.archive(key, options, from_statuses=from_statuses)
        except (_ArchiveError, _HttpError) as exc:
            LOG.info("background archive of %s failed: %s", key, exc)
