"""The resource file API of archived experiments, scans and subjects: uploads, listings, downloads, deletes (res §1-§4,
§6: docs/xnat-resources.md, whose citations these are). `W:` = xnat-web `web/src/main/java/org/nrg/xnat/`.

Every route is FileList's (W:restlet/XNATApplication.java 232-267, also under `/data/archive`, which `_normalise`
folds): `.../resources/{R}/files[/{path}]` below `/projects/P/subjects/S/experiments/E`, `/projects/P/experiments/E`,
`/experiments/E`, the scans of the first and the last, `/projects/P/subjects/S` and `/subjects/S`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import unquote

from ingestd.testing.xnat.common import _HttpError, _Response, _table
from ingestd.testing.xnat.model import _Experiment, _Project, _Resource, _Subject
from ingestd.testing.xnat.prearchive import _PrearchiveApi
from ingestd.testing.xnat.resource_files import (
    UnreadableError,
    archive_kind,
    catalogue,
    file_path,
    flag,
    hack_check,
    members,
    refused_name,
    writers,
)
from ingestd.testing.xnat.routing import _EXP, _EXP_BY_ID, Handler, _multipart, _Request

_SUBJ = r"/data/projects/(?P<project>[^/]+)/subjects/(?P<subject>[^/]+)"
_SUBJ_BY_ID = r"/data/subjects/(?P<subject_id>[^/]+)"
# The scan routes need the subject: there is no /projects/P/experiments/E/scans route (res §2).
_EXP_SUBJ = _SUBJ + r"/experiments/(?P<experiment>[^/]+)"
_SCAN = r"/scans/(?P<scan>[^/]+)"
_FILES = r"/resources/(?P<resource>[^/]+)/files(?:/(?P<name>.+))?"
# Every owner route: experiments (3 forms), their scans (2 forms, res §2), subjects (2 forms).
OWNERS = (_EXP, _EXP_BY_ID, _EXP_SUBJ + _SCAN, _EXP_BY_ID + _SCAN, _SUBJ, _SUBJ_BY_ID)
_FILES_COLUMNS = ("Name", "Size", "URI", "collection", "file_tags", "file_format", "file_content", "cat_ID", "digest")
_RESOURCE_COLUMNS = (
    "xnat_abstractresource_id", "label", "element_name", "category", "cat_id", "cat_desc", "file_count", "file_size",
    "tags", "content", "format",
)  # fmt: skip


@dataclass
class _Owner:
    """What a resource hangs on, as XNATTemplate resolved it from the URL."""

    kind: str  # "experiment", "scan", "subject"
    project: _Project
    resources: dict[str, _Resource]
    base: str  # XNATCatalogTemplate.getBaseURI (82-121): the listing URIs' prefix
    cat_id: str  # the owning item's ID (listing column `cat_id` of the resources table)
    scan_resources: int = 0  # how many resources the scan had before (the first one gets content RAW)
    others: frozenset[str] = frozenset()  # a scan's DICOM and pipeline resources, by label and by id


def _catalog_path(owner: _Owner, label: str) -> str:
    """Where XNAT keeps the catalog (ResourceModifierA.createCatalog 176-192) [INF: the archive root]."""
    return f"/data/xnat/archive/{owner.project.id}/arc001/{owner.cat_id}/RESOURCES/{label}/{label}_catalog.xml"


class _ResourceApi(_PrearchiveApi):
    """Handlers of the resource file API on archived data."""

    def resource_routes(self) -> list[tuple[str, str, Handler]]:
        """(methods, pattern, handler) of every resource route; ahead of the scan-resource GETs they extend."""
        routes: list[tuple[str, str, Handler]] = []
        for owner in OWNERS:
            routes.append(("PUT POST", owner + _FILES, self.resource_upload))
            routes.append(("GET", owner + _FILES, self.resource_get))
            routes.append(("DELETE", owner + _FILES, self.resource_delete))
            if "scan" not in owner:  # a scan's resources table is the archive module's (it lists these too)
                routes.append(("GET", owner + r"/resources", self.resource_list))
        return routes

    # -- resolution ---------------------------------------------------------------------------------------------

    def _owner(self, request: _Request) -> _Owner:
        """XNATTemplate's lookups (W:restlet/resources/files/XNATTemplate.java 77-107, 145-209, 268-271): 404
        "Unable to identify project|subject|experiment|scan" (a project the user may not read is unknown too)."""
        groups = request.groups
        agent = request.agent
        store = self.store
        project: _Project | None = None
        if "project" in groups:
            project = store.project(unquote(groups["project"]))
            if project is None or not store.can_read(agent, project):
                raise _HttpError(404, "Unable to identify project")
        subject: _Subject | None = None
        wanted_subject = groups.get("subject") or groups.get("subject_id")
        if wanted_subject is not None:
            name = unquote(wanted_subject)
            subject = next(  # `/subjects/{S}` alone: an ID; below a project: a label or an ID [INF]
                (
                    s
                    for s in store.subjects.values()
                    if (s.id == name if project is None else s.project == project.id and name in (s.label, s.id))
                ),
                None,
            )
            owning = store.project(subject.project) if subject else None
            if subject is None or owning is None or not store.can_read(agent, owning):
                raise _HttpError(404, "Unable to identify subject")
            project = owning
        wanted = groups.get("experiment") or groups.get("experiment_id")
        if wanted is None:
            assert subject is not None and project is not None  # noqa: S101 - every route names one of the two
            base = f"/data/projects/{project.id}/subjects/{subject.id}" if "project" in groups else "/data"
            return _Owner("subject", project, subject.resources, base, subject.id)
        experiment = self._find_experiment(unquote(wanted), project, subject)
        owning = store.project(experiment.project)
        if owning is None or not store.can_read(agent, owning):
            raise _HttpError(404, "Unable to identify experiment")
        project = owning
        prefix = ""
        if "project" in groups and subject is not None:
            prefix = f"/projects/{project.id}/subjects/{subject.id}"
        base = f"/data{prefix}/experiments/{experiment.id}"
        if "scan" not in groups:
            return _Owner("experiment", project, experiment.resources, base, experiment.id)
        scan = experiment.scans.get(unquote(groups["scan"]))
        if scan is None:
            raise _HttpError(404, "Unable to identify scan")
        count = (1 if scan.files else 0) + len(scan.extras) + len(scan.resources)  # DICOM, pipelines, uploads
        others = {"DICOM", str(scan.resource_id)} | {
            n for x in scan.extras.values() for n in (x.label, str(x.resource_id))
        }
        return _Owner("scan", project, scan.resources, f"{base}/scans/{scan.id}", scan.id, count, frozenset(others))

    def _find_experiment(self, name: str, project: _Project | None, subject: _Subject | None) -> _Experiment:
        """`{E}` as an experiment ID first, then as a label in the project (XNATTemplate 77-107)."""
        found = [e for e in self.store.experiments.values() if e.id == name]
        if not found and project is not None:
            found = [e for e in self.store.experiments.values() if e.project == project.id and e.label == name]
        if project is not None:
            found = [e for e in found if e.project == project.id]
        if subject is not None:
            found = [e for e in found if e.subject == subject.label]
        if not found:
            raise _HttpError(404, "Unable to identify experiment")
        return found[0]

    def _resource(self, request: _Request, owner: _Owner) -> tuple[str, _Resource | None]:
        """(label, the resource if it exists). A label of digits only is a resource ID (XNATCatalogTemplate 52-70):
        one this owner does not have is 403."""
        label = request.groups["resource"]
        if label.isdigit():
            found = next((r for r in owner.resources.values() if str(r.id) == label), None)
            if found is None:
                raise _HttpError(
                    403,
                    f"The user {request.agent.username} requested 1 resources by ID (i.e. not by qualified resource "
                    f"label) but was denied access to all of them: {label}",
                )
            return found.label, found
        return label, owner.resources.get(label)

    # -- upload (res §1) ----------------------------------------------------------------------------------------

    def resource_upload(self, request: _Request) -> _Response:
        """`FileList.handlePost` (W:restlet/resources/files/FileList.java 262-398; PUT is POST, 256-259)."""
        with self.store.lock:
            owner = self._owner(request)
            label, _ = self._resource(request, owner)
        if request.groups["resource"] in owner.others:
            raise _HttpError(500, "The XNAT stand-in does not model uploads into a scan's DICOM or pipeline resources")
        if hack_check(label):  # res §3: the catalogs fail to load, `parent` stays null: the default 200
            return _Response(200)
        if not self.store.can_edit(request.agent, owner.project):  # res §1.1: no else branch
            return _Response(200)
        name = file_path(request.groups.get("name") or "").removeprefix("/")
        body = self._writers(request, name)
        params = request.params
        overwrite = flag(params.get("overwrite"))
        extract = flag(params.get("extract"))
        fmt, content, description = params.get("format"), params.get("content"), params.get("description")
        written: list[str] = []
        duplicates: list[str] = []
        with self.store.lock:
            resource = owner.resources.get(label)
            if resource is None:  # res §1.7: created first, kept even if the write fails
                resource = _Resource(self.store.next_serial(), label)
                if owner.kind == "scan" and owner.scan_resources == 0:
                    resource.content = "RAW"  # DirectScanResourceImpl.addResource 59-64: a scan's first resource
                owner.resources[label] = resource
            # CatalogUtils.configureResource 1672-1704: given values overwrite, tags pile up
            resource.format = fmt if fmt is not None else resource.format
            resource.content = content if content is not None else resource.content
            resource.description = description if description is not None else resource.description
            tags = tuple(params.all("tags"))
            resource.tags.extend(tags)
            seen = resource.version
            try:
                self._store_files(owner, resource, body, overwrite, extract, request.cut, written, duplicates)
            except UnreadableError as exc:
                if request.cut:
                    return _Response(0)
                raise _HttpError(500, f"Unable to extract the archive: {exc}") from exc
        if request.cut:  # the copy broke off: bytes on disk, no catalog entry, no answer (res §6)
            return _Response(0)
        self.store.pause()
        with self.store.lock:
            if resource.version != seen:  # CatalogUtils.writeCatalogToFile 1992-2003 (res §1.8)
                raise _HttpError(
                    500,
                    f"Another thread or process modified {_catalog_path(owner, label)} since I last read it or I "
                    "don't have a previous checksum to compare. To avoid overwriting changes, I'm throwing an "
                    "exception.",
                )
            for path in written:
                if extract and not overwrite and path in resource.catalog:
                    continue  # storeCatalogEntry 1726-1733: unknown extracted paths only, unless overwrite
                catalogue(resource, path, checksums=self.config.checksums, fmt=fmt, content=content, tags=tags)
            resource.version += 1
        if duplicates and not overwrite:  # FileList 345-349: 200, not 409
            # JSONObjectRepresentation(MediaType.TEXT_HTML, new JSONObject(...)): org.json's compact form
            answer = json.dumps({"duplicates": duplicates}, separators=(",", ":")).encode()
            return _Response(200, answer, "text/html;charset=UTF-8")
        return _Response(200, b"", "text/plain;charset=UTF-8")

    def _writers(self, request: _Request, name: str) -> list[tuple[str, bytes]]:
        chunked = "chunked" in (request.headers.get("Transfer-Encoding") or "").lower()
        chunked = chunked and request.headers.get("Content-Length") is None
        parts = None
        if request.content_type.startswith("multipart/") and not request.cut:
            parts = [(filename, payload) for _, filename, payload in _multipart(request)]
        return list(
            writers(
                request.method,
                request.content_type,
                chunked,
                flag(request.params.get("inbody")),
                name,
                request.body,
                parts,
            ).writers
        )

    @staticmethod
    def _store_files(
        owner: _Owner,
        resource: _Resource,
        body: list[tuple[str, bytes]],
        overwrite: bool,
        extract: bool,
        cut: bool,
        written: list[str],
        duplicates: list[str],
    ) -> None:
        """CatalogUtils.storeCatalogEntry 1706-1799, up to the catalog write: bytes to disk, duplicates noted.

        `FileWriterWrapper.write` (W:helpers/FileWriterWrapper.java 104-126) copies into the final path, so a copy
        that breaks off (`cut`) leaves what arrived there."""
        for name, data in body:
            kind = archive_kind(name) if extract else None
            if kind is not None:  # members at the resource root, the archive itself never kept (res §1.4)
                for member, content in members(kind, name, data, cut=cut):
                    if member in resource.disk and not overwrite:
                        duplicates.append(member)
                        continue
                    resource.disk[member] = content
                    if not refused_name(member):  # storeCatalogEntry 1728: XNAT_CATALOGABLE_FILE_FILTER
                        written.append(member)
                continue
            on_disk = name in resource.disk or name == f"{resource.label}_catalog.xml"
            if on_disk and refused_name(name):  # 1753-1756: only a file already there is refused
                raise _HttpError(500, f"XNAT cannot catalog {name.rsplit('/', 1)[-1]}")
            if on_disk and not overwrite:
                duplicates.append(name)
                continue
            resource.disk[name] = data  # an overwritten catalogued file is deleted first (moveToHistory)
            if not cut:
                written.append(name)

    # -- listings, downloads, deletes (res §4) ------------------------------------------------------------------

    def resource_get(self, request: _Request) -> _Response:
        """`GET .../files` (FileList.handleSingleCatalog 671-708) or `.../files/{path}` (the bytes)."""
        owner = self._owner(request)
        if request.groups["resource"] in owner.others:  # a scan's DICOM and pipeline resources: the archive module's
            return self.scan_file(request) if request.groups.get("name") else self.scan_files(request)
        label, resource = self._resource(request, owner)
        missing = _Response(204) if flag(request.params.get("accept-not-found")) else None  # FileList 631
        if resource is None:  # FileList.handleMultipleCatalogs over no resource: an empty table
            if "name" in request.groups:
                if missing is not None:
                    return missing
                raise _HttpError(404, "Unable to find file.")
            return _table(_FILES_COLUMNS, [], request.fmt(), meta=(("title", "Files"),))
        name = request.groups.get("name")
        if name:
            path = file_path(name)
            if path not in resource.catalog or path not in resource.disk:
                if missing is not None:
                    return missing
                raise _HttpError(404, "Unable to find file.")
            return _Response(200, resource.disk[path], "application/octet-stream")
        rows = [
            {
                "Name": entry.name.rsplit("/", 1)[-1], "Size": str(entry.size),
                "URI": f"{owner.base}/resources/{resource.id}/files/{entry.name}", "collection": label,
                "file_tags": ",".join(entry.tags), "file_format": entry.format or "",
                "file_content": entry.content or "", "cat_ID": str(resource.id), "digest": entry.digest,
            }
            for entry in resource.catalog.values()
        ]  # fmt: skip
        return _table(_FILES_COLUMNS, rows, request.fmt(), meta=(("title", "Files"),))

    def resource_delete(self, request: _Request) -> _Response:
        """`DELETE .../files/{path}` (FileList.handleDelete 400-483): entry and file gone; 404 "No matched files";
        403 without edit rights."""
        with self.store.lock:
            owner = self._owner(request)
            _, resource = self._resource(request, owner)
            if not self.store.can_edit(request.agent, owner.project):
                raise _HttpError(403, "User account doesn't have permission to modify this session.")
            path = file_path(request.groups.get("name") or "")
            if resource is None or path not in resource.catalog:
                raise _HttpError(404, "No matched files")
            del resource.catalog[path]
            if not request.params.get("removeFiles") or flag(request.params.get("removeFiles")):
                resource.disk.pop(path, None)
            resource.version += 1
        return _Response(200)

    def resource_list(self, request: _Request) -> _Response:
        """`GET .../resources` (CatalogResourceList, as `scan_resources` answers it): one row per resource, counts
        and sizes from the catalog."""
        owner = self._owner(request)
        category = {"experiment": "resources", "subject": "resources"}.get(owner.kind, "scans")
        rows = [
            {
                "xnat_abstractresource_id": str(r.id), "label": r.label, "element_name": "xnat:resourceCatalog",
                "category": category, "cat_id": owner.cat_id, "cat_desc": "", "file_count": str(len(r.catalog)),
                "file_size": str(sum(e.size for e in r.catalog.values())), "tags": ",".join(r.tags),
                "content": r.content or "", "format": r.format or "",
            }
            for r in owner.resources.values()
        ]  # fmt: skip
        meta = (("totalRecords", str(len(rows))), ("title", "Resources"))
        return _table(_RESOURCE_COLUMNS, rows, request.fmt(), meta=meta)
