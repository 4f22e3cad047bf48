"""What XNAT's answers say, read strictly: messages of status pages, URI lists, JSON, ResultSet tables, catalogs.

A body cut short on the way (a proxy) or an error page where an answer was expected is a retryable `XnatError`,
never taken for an answer. `PrearchiveRow`, `TokenInfo` and `Holdings` are what the client returns.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import defusedxml.ElementTree
import requests

from ingestd.xnat.errors import XnatError

_H3 = re.compile(r"<h3>(.*?)</h3>", re.IGNORECASE | re.DOTALL)


_TAG = re.compile(r"<[^>]+>")


@dataclass(frozen=True, slots=True)
class PrearchiveRow:
    project: str
    timestamp: str
    folder: str
    name: str
    subject: str
    study_uid: str
    status: str
    url: str  # /prearchive/projects/P/TS/FOLDER (no /data)
    lastmod: str = ""  # when XNAT last wrote to the session (refreshed at most every 15 s while it receives)


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """An alias token as XNAT describes it: when it expires (epoch seconds; None if XNAT did not say)."""

    alias: str
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class Holdings:
    """What XNAT shows it holds in one place, per file: the SOP Instance UIDs of DICOM catalog entries (archive
    only: XNAT's REST API exposes no catalog of a prearchive session) and the file names.

    ingestd names every zip entry `<series UID>/<SOP Instance UID>.dcm`; XNAT keeps that name as the file's
    (GradualDicomImporter.getSafeFile: the entry's last path component, valid as `[\\w.-]+`), so a file name is a
    per-instance identity too: another batch's instances have other SOP Instance UIDs, and so other names.
    """

    uids: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()

    def holds(self, sop_uid: str) -> bool:
        return sop_uid in self.uids or f"{sop_uid}.dcm" in self.names


def _message(response: requests.Response) -> str:
    """XNAT's message from a response: the status page's <h3>, else the first line of text."""
    text = response.text or ""
    found = _H3.search(text)
    if found:
        return " ".join(_TAG.sub("", found.group(1)).split())[:500]
    return " ".join(_TAG.sub(" ", text).split())[:500] or response.reason or "no message"


def _is_html(response: requests.Response) -> bool:
    head = (response.text or "")[:200].lstrip().lower()
    return head.startswith(("<html", "<!doctype")) or "text/html" in response.headers.get("Content-Type", "")


def _uri_list(response: requests.Response) -> list[str]:
    """The URIs of a `text/uri-list` answer (import, archive). XNAT ends every line with CRLF (Importer.represent,
    SecureResource.returnDefaultRepresentation): a non-empty body without its final line end was cut short on the
    way (a proxy), and a cut URI must not be taken for where XNAT filed the data: a retryable XnatError."""
    text = response.text
    if text.strip() and not text.endswith("\n"):
        raise XnatError(
            f"XNAT answered {urlsplit(response.url).path} cut short ({len(response.content)} bytes, no line end)",
            retryable=True,
        )
    return [line.strip() for line in text.splitlines() if line.strip()]


def _epoch(value: Any) -> float | None:
    """Epoch seconds from a Java Date as XNAT's serializer writes it (epoch milliseconds); None if absent."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value) / 1000
    except ValueError:
        return None


def _json(response: requests.Response) -> Any:
    """The JSON body, or a retryable XnatError: a reply cut short by a proxy, or an error page, is not an answer."""
    try:
        return response.json()
    except ValueError:
        raise XnatError(
            f"XNAT answered {response.request.method} {urlsplit(response.url).path} with something that is not JSON"
            f" ({len(response.content)} bytes)",
            retryable=True,
        ) from None


def _rows(response: requests.Response) -> list[dict[str, str]]:
    if "csv" in response.headers.get("Content-Type", ""):
        return list(csv.DictReader(io.StringIO(response.text)))
    payload = _json(response)
    result_set = payload.get("ResultSet") if isinstance(payload, dict) else None
    result = result_set.get("Result") if isinstance(result_set, dict) else None
    if not isinstance(result, list):
        raise XnatError(
            f"XNAT answered {urlsplit(response.url).path} with JSON that is not a ResultSet table", retryable=True
        )
    return [row for row in result if isinstance(row, dict)]


def _catalog_entries(body: bytes) -> list[tuple[str, str]]:
    """(UID, file name) of every entry of a catalog document (`cat:entry`, in entry sets too); either may be ''.

    Parsed with defusedxml: the document comes from a server, and entity expansion must not take the daemon down.
    """
    try:
        root = defusedxml.ElementTree.fromstring(body)
    except (defusedxml.ElementTree.ParseError, defusedxml.DefusedXmlException) as exc:
        raise XnatError(f"XNAT answered a catalog that is not XML ({type(exc).__name__})", retryable=True) from None
    entries = []
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] != "entry":
            continue
        uri = element.get("URI", "")
        entries.append((element.get("UID", "").strip(), uri.replace("\\", "/").rsplit("/", 1)[-1]))
    return entries


def _dicom_resources(experiment: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(scan ID, resource label) of each DICOM resource of each scan in an experiment's JSON item. Real scans carry
    more resources (NIFTI, SNAPSHOTS, BIDS): only those whose format is DICOM, or labelled DICOM or secondary."""
    for child in experiment.get("children", []):
        if child.get("field") != "scans/scan":
            continue
        for scan in child.get("items", []):
            scan_id = str(scan.get("data_fields", {}).get("ID", ""))
            for resource in _resources(scan):
                fields = resource.get("data_fields", {})
                label = str(fields.get("label", ""))
                if str(fields.get("format", "")).upper() == "DICOM" or label.upper() in ("DICOM", "SECONDARY"):
                    yield scan_id, label


def _resources(scan: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for child in scan.get("children", []):
        if child.get("field") == "file":
            yield from child.get("items", [])
