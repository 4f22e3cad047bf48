"""The prearchive handlers: listings, sessions, actions and batch services (§5)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import cast
from urllib.parse import unquote, urlsplit

from ingestd.testing.xnat.catalog import _session_xml, _zip_row
from ingestd.testing.xnat.common import (
    _NOT_FOUND,
    ALL_STATUSES,
    ARCHIVING,
    BUILDING,
    QUEUED_ARCHIVING,
    QUEUED_BUILDING,
    QUEUED_DELETING,
    QUEUED_MOVING,
    READY,
    RECEIVING,
    ROW_COLUMNS,
    UNASSIGNED,
    Key,
    _HttpError,
    _Response,
    _table,
    _text,
    _uri_list,
)
from ingestd.testing.xnat.import_service import _ImportApi
from ingestd.testing.xnat.model import _File, _Project, _Row
from ingestd.testing.xnat.routing import _prearc_key, _Request

LOG = logging.getLogger("ingestd.testing.xnat")


class _PrearchiveApi(_ImportApi):
    """Prearchive listings, session actions and the batch services."""

    # -- prearchive (§5) ----------------------------------------------------------------------------------------

    def prearchive(self, request: _Request) -> _Response:
        """`GET /data/prearchive[/projects]`: rows of every project with edit rights, Unassigned for admins."""
        if request.method == "PUT":
            if not request.agent.admin:
                raise _HttpError(403, "Only site administrators can refresh the prearchive.")
            return _Response(200)
        return self._listing(request, None)

    def prearchive_projects(self, request: _Request) -> _Response:
        names = [unquote(n) for n in request.groups["projects"].split(",") if n]
        wanted: set[str] = set()
        for name in names:
            if name == UNASSIGNED:
                if not request.agent.admin:
                    raise _HttpError(403, f"The current user does not have access to the requested project: {name}")
                wanted.add(UNASSIGNED)
                continue
            project = self.store.project(name)
            if project is None and request.agent.admin:
                continue  # unknown project for an admin: 200 with an empty Result
            if project is None or not self.store.can_read(request.agent, project):
                raise _HttpError(403, f"The current user does not have access to the requested project: {name}")
            wanted.add(project.id)
        if request.agent.admin:
            # PrearcSessionListResource.represent (restlet/resources/prearchive/PrearcSessionListResource.java:115-118,
            # same at d3a896206 and 4fb6bc14): the requested projects, plus `null` (Unassigned) whenever the user has
            # all-data access (site admins): an admin's `GET /data/prearchive/projects/P` lists P's rows *and* every
            # Unassigned row; never another project's.
            wanted.add(UNASSIGNED)
        return self._listing(request, wanted)

    def _listing(self, request: _Request, projects: set[str] | None) -> _Response:
        tag = request.params.get("tag")
        if tag is not None and not request.agent.admin:
            raise _HttpError(403, "Only site administrators can search the prearchive by tag.")
        with self.store.lock:
            rows = [
                row.as_dict()
                for row in self.store.rows.values()
                if (
                    row.project_label in projects
                    if projects is not None
                    else self.store.can_edit_label(request.agent, row.project_label)
                )
                and (tag is None or row.tag == tag)
            ]
        return _table(ROW_COLUMNS, rows, request.fmt())

    def _session_key(self, request: _Request) -> Key:
        """A prearchive session path: 500 `No project named X` for unknown projects, 403 without edit rights."""
        name = request.group("project")
        if name == UNASSIGNED:
            if not request.agent.admin:
                raise _HttpError(403, "Unable to modify session data for destination project.")
            return (UNASSIGNED, request.group("timestamp"), request.group("folder"))
        project = self.store.project(name)
        if project is None:
            raise _HttpError(500, f"No project named {name}")
        if not self.store.can_edit(request.agent, project):
            raise _HttpError(403, f"The current user does not have access to the requested project: {name}")
        return (project.id, request.group("timestamp"), request.group("folder"))

    def session_get(self, request: _Request) -> _Response:
        key = self._session_key(request)
        fmt = request.fmt("xml")
        with self.store.lock:
            row = self.store.rows.get(key)
            table = [row.as_dict()] if row else []
            if fmt in ("json", "csv", "html"):
                return _table(ROW_COLUMNS, table, fmt)
            if row is None:
                raise _HttpError(404, f"/prearchive/projects/{key[0]}/{key[1]}/{key[2]} not found.")
            if not row.built:
                raise _HttpError(
                    404,
                    "The named session exists, but its XNAT session document is not available. "
                    "The session is likely invalid or incomplete.",
                )
            if fmt == "zip":
                return _Response(200, _zip_row(row), "application/zip")
            return _text(_session_xml(row), content_type="text/xml;charset=UTF-8")

    def session_post(self, request: _Request) -> _Response:
        key = self._session_key(request)
        action = request.params.get("action")
        if not action:
            raise _HttpError(400, "No action parameter was specified for this request.")
        if self.store.row(key) is None:
            raise _HttpError(404, f"/prearchive/projects/{key[0]}/{key[1]}/{key[2]} not found.")
        actions: dict[str, Callable[[_Request, Key], _Response]] = {
            "build": self._action_build,
            "commit": self._action_commit,
            "move": self._action_move,
            "reset-status": self._action_reset,
            "set-status": self._action_set_status,
        }
        if action not in actions:
            raise _HttpError(400, f"The user requested an unsupported action {action} on the prearchive session.")
        return actions[action](request, key)

    def _action_build(self, request: _Request, key: Key) -> _Response:
        row = self.store.build(key)
        return _uri_list(["/data" + row.url] if row else [])

    def _action_commit(self, request: _Request, key: Key) -> _Response:
        """§5.5 commit: build; archive synchronously (answering 301 + archive URI) if the session is auto-archive."""
        row = self.store.build(key)
        if row is None:
            raise _HttpError(404, f"/prearchive/projects/{key[0]}/{key[1]}/{key[2]} not found.")
        if row.status != READY or not self._auto_archive(request.params, row, self.store.code(row.project)):
            return _uri_list(["/data" + row.url])
        uri = self._run_archive(row.key, self.store.queued_archive_options(row))
        return _Response(301, uri.encode(), "text/plain", [("Location", self.site_url() + uri)])

    def _action_move(self, request: _Request, key: Key) -> _Response:
        destination = self.store.project(request.params.get("newProject"))
        if destination is None or not self.store.can_edit(request.agent, destination):
            raise _HttpError(403, "Unable to modify session data for destination project.")
        new_key = self.store.move(key, destination)
        uri = f"/data/prearchive/projects/{new_key[0]}/{new_key[1]}/{new_key[2]}"
        return _Response(301, uri.encode(), "text/plain", [("Location", self.site_url() + uri)])

    def _action_reset(self, request: _Request, key: Key) -> _Response:
        with self.store.lock:
            row = self.store.rows[key]
            row.status = READY if row.built else RECEIVING  # status from the session XML [INF]
            return _uri_list(["/data" + row.url])

    def _action_set_status(self, request: _Request, key: Key) -> _Response:
        status = request.params.get("status") or ""
        if status not in ALL_STATUSES or status.startswith("_"):
            raise _HttpError(400, f"Invalid status: {status}")
        with self.store.lock:
            row = self.store.rows[key]
            if row.status.startswith("_"):
                raise _HttpError(409, "session document locked")
            row.status = status
            return _uri_list(["/data" + row.url])

    def session_delete(self, request: _Request) -> _Response:
        name = request.group("project")
        if name != UNASSIGNED and self.store.project(name) is None:
            raise _HttpError(404, f"No project named {name}")
        if not self.store.can_edit_label(request.agent, name):
            raise _HttpError(403, "Unable to modify session data for destination project.")
        key = self._session_key(request)
        self.store.delete(key)
        return _Response(200)

    def _built_row(self, request: _Request) -> _Row:
        """The row of a prearchive session path whose session XML exists (a build has run, even if the row went
        back to RECEIVING since); else 404 "Unable to locate prearc resource." (PrearcSessionResourceA
        .retrieveSessionBean, restlet/resources/prearchive/PrearcSessionResourceA.java)."""
        row = self.store.row(self._session_key(request))
        if row is None or not row.built:  # §5.6
            raise _HttpError(404, "Unable to locate prearc resource.")
        return row

    def session_scans(self, request: _Request) -> _Response:
        """PrearcScansListResource: `ID`, `xsiType`, `series_description` of the session XML's scans."""
        row = self._built_row(request)
        with self.store.lock:
            rows = [
                {"ID": scan_id, "xsiType": built.xsi_type, "series_description": built.series_description}
                for scan_id, built in row.catalog.items()
            ]
        return _table(["ID", "xsiType", "series_description"], rows, request.fmt())

    def _session_scan(self, request: _Request) -> dict[str, _File]:
        """The catalogued files of a built session's scan; an unknown scan (PrearcScanResourceList) or resource label
        (PrearcSessionResourceFiles) is a bare 404 (`setStatus(CLIENT_ERROR_NOT_FOUND)`, no message)."""
        row = self._built_row(request)
        with self.store.lock:
            scan_id = request.group("scan")
            if scan_id not in row.catalog or ("resource" in request.groups and request.group("resource") != "DICOM"):
                raise _HttpError(404, _NOT_FOUND)
            return dict(row.catalogued().get(scan_id, {}))

    def session_resources(self, request: _Request) -> _Response:
        files = self._session_scan(request)
        row = {
            "label": "DICOM",
            "file_count": str(len(files)),
            "file_size": str(sum(len(f.data) for f in files.values())),
        }
        return _table(["label", "file_count", "file_size"], [row], request.fmt())

    def session_files(self, request: _Request) -> _Response:
        """PrearcSessionResourceFiles: exactly `Name`, `Size`, `URI`; URI = servlet path + path info (the path as
        requested) + "/" + the entry's URI (PrearcSessionResourceFiles.constructURI)."""
        files = self._session_scan(request)
        base = unquote(urlsplit(request.target).path)
        rows = [{"Name": n, "Size": str(len(f.data)), "URI": f"{base}/{n}"} for n, f in files.items()]
        return _table(["Name", "Size", "URI"], rows, request.fmt())

    def session_file(self, request: _Request) -> _Response:
        found = self._session_scan(request).get(request.group("name"))
        if found is None:
            raise _HttpError(404, "Unable to locate prearc resource.")
        return _Response(200, found.data, "application/dicom")

    def session_logs(self, request: _Request) -> _Response:
        row = self.store.row(self._session_key(request))
        if row is None:
            raise _HttpError(404, "Unable to locate prearc resource.")
        with self.store.lock:
            entries = list(row.log)
        if "last" in request.groups:
            return _text(entries[-1] if entries else "")
        return _table(["entry"], [{"entry": e} for e in entries], request.fmt())

    # -- batch services (§5.7) ----------------------------------------------------------------------------------

    def batch(self, request: _Request) -> _Response:
        action = request.groups["action"]
        keys = self._batch_keys(request)
        destination: _Project | None = None
        if action == "move":
            destination = self.store.project(request.params.get("newProject"))
            if destination is None:
                raise _HttpError(
                    404, f"One or more specified projects does not exist: {request.params.get('newProject')}"
                )
            if not self.store.can_edit(request.agent, destination):
                raise _HttpError(
                    403,
                    f"Invalid permissions for user {request.agent.username} to delete prearchive sessions "
                    f"in one or more projects: {destination.id}",
                )
        queued = {"delete": QUEUED_DELETING, "rebuild": QUEUED_BUILDING, "move": QUEUED_MOVING}[action]
        rows: list[dict[str, str]] = []
        with self.store.lock:
            for key in keys:
                row = self.store.rows[key]
                if row.status.startswith("_") or row.status in (BUILDING, ARCHIVING, QUEUED_ARCHIVING):
                    raise _HttpError(409, "session document locked")
            for key in keys:
                row = self.store.rows[key]
                row.status = queued
                rows.append(row.as_dict())
        synchronous = request.params.get("async") == "false"
        for key in keys:
            job = functools.partial(self._batch_job, action, key, destination)
            if synchronous:
                job()
            else:
                self.jobs.submit(job)
        return _table(ROW_COLUMNS, rows, request.fmt("xml"))

    def _batch_keys(self, request: _Request) -> list[Key]:
        sources = request.params.all("src")
        keys = [_prearc_key(src) for src in sources]
        malformed = [src for src, key in zip(sources, keys, strict=True) if key is None]
        if malformed:
            raise _HttpError(500, f"One or more source values contained a malformed URL: {', '.join(malformed)}")
        found = [k for k in keys if k is not None]
        unknown = sorted({k[0] for k in found if k[0] != UNASSIGNED and self.store.project(k[0]) is None})
        if unknown:
            raise _HttpError(404, f"One or more specified projects does not exist: {', '.join(unknown)}")
        resolved = [
            (k[0] if k[0] == UNASSIGNED else cast(_Project, self.store.project(k[0])).id, k[1], k[2]) for k in found
        ]
        denied = sorted({k[0] for k in resolved if not self.store.can_edit_label(request.agent, k[0])})
        if denied:
            raise _HttpError(
                403,
                f"Invalid permissions for user {request.agent.username} to delete prearchive sessions "
                f"in one or more projects: {', '.join(denied)}",
            )
        for key in resolved:
            if self.store.row(key) is None:
                raise _HttpError(404, f"/prearchive/projects/{key[0]}/{key[1]}/{key[2]} not found.")
        return resolved

    def _batch_job(self, action: str, key: Key, destination: _Project | None) -> None:
        try:
            if action == "delete":
                self.store.pause()
                self.store.delete(key)
            elif action == "rebuild":  # never auto-archives (§5.3 autoArchiveBlocked)
                self.store.build(key, only_from=frozenset({QUEUED_BUILDING}))
            elif destination is not None:
                self.store.pause()
                self.store.move(key, destination)
        except _HttpError as exc:
            LOG.info("prearchive %s of %s failed: %s", action, key, exc.message)
