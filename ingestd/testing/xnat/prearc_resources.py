"""Session-level resources of a prearchive session (res §5: docs/xnat-resources.md): `PUT|GET
/data/prearchive/projects/P/TS/S/resources/L/files[/NAME]` and `GET .../resources`.

W:restlet/resources/prearchive/PrearcSessionResourceCatalogFiles.java: `handlePut` 71-146 reads the body as every
upload does (the same 400/406/500 rules), then needs the session XML (`PrearcSessionResourceA.retrieveSessionBean`
70-94: 404 "Unable to locate prearc resource." before the first build), writes every file over whatever is there (no
`extract`, no `overwrite`, no duplicates), and adds a catalog entry (SIZE, no digest) only for a name it does not
list yet. `getRepresentation` 147-186 lists `Name` (the file's name), `Size` (the file's length on disk, not the
SIZE metafield) and `URI`. No class allows POST (XNATApplication 293-299): 405.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from ingestd.testing.xnat.common import _HttpError, _Response, _table
from ingestd.testing.xnat.model import _Entry, _Resource, _Row
from ingestd.testing.xnat.resource_files import escape_param
from ingestd.testing.xnat.resources import _ResourceApi
from ingestd.testing.xnat.routing import _PA, Handler, _Request

_PA_FILES = _PA + r"/resources/(?P<resource>[^/]+)/files(?:/(?P<name>.+))?"


class _PrearcResourceApi(_ResourceApi):
    """Handlers of the prearchive session resources."""

    def prearc_resource_routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("PUT", _PA_FILES, self.prearc_upload),
            ("GET", _PA_FILES, self.prearc_files),
            ("GET", _PA + r"/resources", self.prearc_resources),
        ]

    def _prearc_row(self, request: _Request) -> _Row:
        key = self._session_key(request)  # 403 without edit rights on the project (getPrearcSessionDir)
        row = self.store.rows.get(key)
        if row is None or not row.built:  # no session XML yet
            raise _HttpError(404, "Unable to locate prearc resource.")
        return row

    def prearc_upload(self, request: _Request) -> _Response:
        # The writer's name is the URL remainder as sent, XML-escaped, never URL-decoded: `a%201.pdf` is that name.
        name = escape_param(request.groups.get("name") or "")
        body = self._writers(request, name)  # before the session is looked up (handlePut 74-85)
        label = request.groups["resource"]
        with self.store.lock:
            row = self._prearc_row(request)
            resource = row.resources.get(label)
            if resource is None:
                resource = _Resource(self.store.next_serial(), label)
                row.resources[label] = resource
            for path, data in body:
                resource.disk[path] = data  # FileWriterWrapper.write: over whatever was there
                if request.cut:  # the copy broke off: the bytes stay, no entry, no answer
                    return _Response(0)
                if path not in resource.catalog:  # only a new name gets an entry: a re-upload keeps the old SIZE
                    resource.catalog[path] = _Entry(path, len(data), "")
            resource.version += 1
        return _Response(200)

    def prearc_files(self, request: _Request) -> _Response:
        with self.store.lock:
            row = self._prearc_row(request)
            resource = row.resources.get(request.groups["resource"])
            if resource is None:
                raise _HttpError(404, "The server has not found anything matching the request URI")
            name = request.groups.get("name")
            if name:
                path = escape_param(name)  # CatalogUtils.getEntryByURI(catalog, filepath)
                if path not in resource.catalog or path not in resource.disk:
                    raise _HttpError(404, "Unable to find file.")  # getFile null [INF: the status]
                return _Response(200, resource.disk[path], "application/octet-stream")
            base = unquote(urlsplit(request.target).path).rstrip("/")
            rows = [
                {
                    "Name": entry.name.rsplit("/", 1)[-1],
                    "Size": str(len(resource.disk[entry.name])),
                    "URI": f"{base}/{entry.name}",  # constructURI: the entry's URI as it is [INF]
                }
                for entry in resource.catalog.values()
                if entry.name in resource.disk  # CatalogUtils.getFile: a missing file is skipped
            ]
        return _table(["Name", "Size", "URI"], rows, request.fmt())

    def prearc_resources(self, request: _Request) -> _Response:
        """The session's own resources [INF: the columns, as the scan-level listing has them]."""
        with self.store.lock:
            row = self._prearc_row(request)
            rows = [
                {
                    "label": r.label,
                    "file_count": str(len(r.catalog)),
                    "file_size": str(sum(len(r.disk.get(n, b"")) for n in r.catalog)),
                }
                for r in row.resources.values()
            ]
        return _table(["label", "file_count", "file_size"], rows, request.fmt())
