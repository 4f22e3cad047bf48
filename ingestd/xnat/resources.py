"""XNAT's resource file API, as attachment delivery uses it: where a resource is, what it lists, putting files in.

How XNAT behaves here is traced to its source in docs/xnat-resources.md ("res §n" below). What matters to a client:

* an upload answers **200** whatever happened: empty when stored, `{"duplicates":[...]}` with Content-Type
  `text/html` when a name was already on disk and `overwrite` was not asked (nothing stored then, res §1.5), and an
  empty 200 too when the account may only read (res §1.1). So `upload_zip` returns the duplicates, and the caller
  checks the listing afterwards (res §6);
* the body must carry a Content-Length: a chunked raw body that is not `application/zip` is refused (500, res §1.2);
  a file object that requests can `fstat` is sent with one;
* a listing comes from the catalog, not the disk: `Size` and `digest` (MD5, when the site's `checksums` are on) are
  what XNAT recorded (res §4); a file interrupted mid-upload is on disk but not listed (res §6).

Every function takes an `XnatClient` and raises its `XnatError` (retryable for connection errors and 5xx).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import requests

from ingestd.xnat.client import XnatClient, _ReportingFile
from ingestd.xnat.errors import XnatError
from ingestd.xnat.responses import _is_html, _message, _rows

__all__ = [
    "ResourceFile",
    "download",
    "experiment_id",
    "list_resource",
    "resource_path",
    "scan_ids",
    "subject_exists",
    "upload_file",
    "upload_zip",
]

_JSON = {"format": "json"}
LEVELS = ("session", "scan", "subject")
# 500s of an upload that no retry changes (res §1.2, §1.3): a name XNAT will not catalog, a body it cannot take.
_PERMANENT_UPLOAD_500 = ("XNAT cannot catalog", "In-body File posts must include")


@dataclass(frozen=True, slots=True)
class ResourceFile:
    """One file a resource lists."""

    name: str  # path inside the resource: the listing URI after `/files/` (URL-decoded), else `Name`
    size: int | None
    digest: str  # MD5 hex as XNAT lists it; "" when XNAT gives none (checksums off, prearchive)


def _q(value: str) -> str:
    return quote(value, safe="")


def resource_path(base: str, level: str, scan: str, resource: str, *, project: str, subject: str) -> str:
    """The path of a resource (without `/files`): `base` is `/data/experiments/<ID>` (archived) or
    `/data/prearchive/projects/P/TS/S`, its components unquoted; every component is URL-quoted here.

    session: `{base}/resources/{L}`; scan: `{base}/scans/{SCAN}/resources/{L}` (archived only: prearchive scan
    resources are read-only, res §5); subject: `/data/projects/{P}/subjects/{S}/resources/{L}` (res §2).
    """
    if level not in LEVELS:
        raise ValueError(f"unknown resource level {level!r}: expected one of {', '.join(LEVELS)}")
    label = _q(resource)
    if level == "subject":
        return f"/data/projects/{_q(project)}/subjects/{_q(subject)}/resources/{label}"
    quoted = "/".join(_q(part) for part in base.split("/"))
    if level == "session":
        return f"{quoted}/resources/{label}"
    if base.startswith("/data/prearchive/"):
        raise ValueError("a prearchive session's scan resources cannot be written (XNAT allows only GET there)")
    return f"{quoted}/scans/{_q(scan)}/resources/{label}"


def list_resource(client: XnatClient, path: str) -> list[ResourceFile] | None:
    """The files a resource's catalog lists (`GET {path}/files?format=json`, res §4); None when XNAT answers 404.

    Archived: 404 is no such experiment, scan or subject; a label the owner does not have lists no files ([]).
    Prearchive: 404 is a session not built (or gone: archived, deleted) *or* a label it does not have yet
    (PrearcSessionResourceCatalogFiles.getRepresentation answers 404 for an unknown resource)."""
    response = client.request("GET", f"{path}/files", "list a resource's files", params=_JSON, allow=(404,))
    if response.status_code == 404:
        return None
    return [_resource_file(row) for row in _rows(response)]


def _resource_file(row: dict[str, str]) -> ResourceFile:
    uri = str(row.get("URI") or "")
    _, found, after = uri.partition("/files/")
    name = unquote(after) if found and after else str(row.get("Name") or "")
    try:
        size: int | None = int(str(row.get("Size") or ""))
    except ValueError:
        size = None
    return ResourceFile(name, size, str(row.get("digest") or "").lower())


def upload_zip(client: XnatClient, path: str, zip_path: Path, *, name: str, overwrite: bool) -> tuple[str, ...]:
    """Put the files of a zip into a resource, extracted at its root (`PUT {path}/files/{name}?extract=true`,
    res §1.4); return the names XNAT reported as already there (nothing of them stored, res §1.5), () when it
    stored everything. The zip itself is not kept. `overwrite=True` replaces files already there.

    The body is the open file: requests sends a file it can `fstat` with a Content-Length, never chunked."""
    if not name.endswith(".zip"):
        raise ValueError(f"the upload name must end in .zip (lower case) for XNAT to extract it: {name!r}")
    params = {"extract": "true"}
    if overwrite:
        params["overwrite"] = "true"
    size = zip_path.stat().st_size
    headers = {"Content-Type": "application/zip", "Content-Length": str(size)}
    with _ReportingFile(zip_path, client.progress) as body:
        response = _put(client, f"{path}/files/{_q(name)}", f"upload {name} into a resource", body, headers, params)
    return _duplicates(client, response, name)


def _put(
    client: XnatClient, url: str, doing: str, body: _ReportingFile, headers: dict[str, str], params: dict[str, str]
) -> requests.Response:
    """One upload; the 500s no retry can change are made permanent (a concurrent catalog write, a 5xx, stays
    retryable)."""
    try:
        return client.request("PUT", url, doing, params=params, data=body, headers=headers, allow=(200,))
    except XnatError as exc:
        if exc.status == 500 and any(text in str(exc) for text in _PERMANENT_UPLOAD_500):
            raise XnatError(str(exc), retryable=False, status=500) from None
        raise


def _duplicates(client: XnatClient, response: requests.Response, name: str) -> tuple[str, ...]:
    """The names of FileList's `{"duplicates":[...]}` (text/html, 200), () for an empty 200. Any other 200 body (an
    HTML error page) is XNAT refusing: a permanent XnatError."""
    text = response.text.strip()
    if not text:
        return ()
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("duplicates"), list):
        return tuple(str(item) for item in payload["duplicates"])
    detail = _message(response) if _is_html(response) else text[:200]
    raise XnatError(f"XNAT {client.name} could not upload {name} into a resource: {detail}", retryable=False)


def upload_file(client: XnatClient, path: str, name: str, file_path: Path) -> None:
    """Put one file into a resource under `name` (`PUT {path}/files/{name}`, raw body): for a prearchive session,
    which never extracts and always overwrites (res §5)."""
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(file_path.stat().st_size)}
    quoted = "/".join(_q(part) for part in name.split("/"))
    with _ReportingFile(file_path, client.progress) as body:
        response = _put(client, f"{path}/files/{quoted}", "upload a file into a resource", body, headers, {})
    duplicates = _duplicates(client, response, "a file")
    if duplicates:
        raise XnatError(
            f"XNAT {client.name} kept the file it had under that name instead of the upload", retryable=False
        )


def download(client: XnatClient, path: str, name: str) -> bytes:
    """The bytes of one file of a resource (`GET {path}/files/{name}`); XnatError on 404 "Unable to find file."."""
    quoted = "/".join(_q(part) for part in name.split("/"))
    response = client.request("GET", f"{path}/files/{quoted}", "download a resource file")
    return response.content


def experiment_id(client: XnatClient, project: str, subject: str, session: str) -> str | None:
    """The accession ID of the archived experiment labelled `session` of that project and subject, or None."""
    item = client.experiment(_q(project), _q(subject), _q(session))
    if item is None:
        return None
    found = str(item.get("data_fields", {}).get("ID", ""))
    return found or None


def scan_ids(client: XnatClient, experiment_id: str) -> frozenset[str]:
    """The IDs of an archived experiment's scans (`GET /data/experiments/{ID}/scans`); XnatError (404, permanent)
    for an experiment XNAT does not have."""
    response = client.request(
        "GET", f"/data/experiments/{_q(experiment_id)}/scans", "list an experiment's scans", params=_JSON
    )
    return frozenset(str(row.get("ID", "")) for row in _rows(response)) - {""}


def subject_exists(client: XnatClient, project: str, subject: str) -> bool:
    """Whether the project has a subject with that label (or ID)."""
    response = client.request(
        "GET",
        f"/data/projects/{_q(project)}/subjects/{_q(subject)}",
        "look up a subject",
        params=_JSON,
        allow=(404,),
    )
    return response.status_code != 404
