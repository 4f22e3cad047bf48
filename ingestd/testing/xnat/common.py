"""The stand-in's constants, small helpers, and the responses and errors every handler answers with."""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from email.utils import collapse_rfc2231_value
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from typing import Any

# --------------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------------

# §5.2 prearchive statuses (the full enum is accepted by set-status; the fake itself uses the subset below).
RECEIVING = "RECEIVING"
RECEIVING_INTERRUPT = "RECEIVING_INTERRUPT"
QUEUED_BUILDING = "QUEUED_BUILDING"
BUILDING = "BUILDING"
READY = "READY"
ERROR = "ERROR"
CONFLICT = "CONFLICT"
QUEUED_ARCHIVING = "QUEUED_ARCHIVING"
ARCHIVING = "ARCHIVING"
LOCKED_ARCHIVING = "_ARCHIVING"
QUEUED_DELETING = "QUEUED_DELETING"
LOCKED_DELETING = "_DELETING"
QUEUED_MOVING = "QUEUED_MOVING"
LOCKED_MOVING = "_MOVING"
ALL_STATUSES = frozenset(
    {
        "ARCHIVING", "BUILDING", "CONFLICT", "DELETING", "ERROR", "MOVING", "READY", "RECEIVING",
        "RECEIVING_INTERRUPT", "SEPARATING", "QUEUED_ARCHIVING", "QUEUED_BUILDING", "QUEUED_DELETING",
        "QUEUED_MOVING", "QUEUED_SEPARATING", "_ARCHIVING", "_BUILDING", "_CONFLICT", "_DELETING", "_MOVING",
        "_RECEIVING", "_RECEIVING_INTERRUPT", "_SEPARATING",
    }
)  # fmt: skip
# §3.4 step 5: rows that new files reuse (as is / set back to RECEIVING); anything else gets a new row.
_REUSE_AS_IS = frozenset({RECEIVING, RECEIVING_INTERRUPT})
_INTERRUPTIBLE = frozenset({READY, ERROR, CONFLICT, QUEUED_BUILDING})
# States from which an explicit build or an archive may start; anything else is an operation in progress.
_BUILDABLE = frozenset({RECEIVING, READY, ERROR, CONFLICT, QUEUED_BUILDING})
_ARCHIVABLE = frozenset({RECEIVING, READY, ERROR, CONFLICT})
_AUTO_ARCHIVE_CODES = frozenset({"AutoArchive", "AutoArchiveOverwrite"})

UNASSIGNED = "Unassigned"
ROW_COLUMNS = (
    "project", "timestamp", "lastmod", "uploaded", "scan_date", "scan_time", "subject", "folderName", "name", "tag",
    "status", "url", "autoarchive", "prevent_anon", "prevent_auto_commit", "SOURCE", "VISIT", "PROTOCOL", "TIMEZONE",
)  # fmt: skip

# §3.1: the internal file name XNAT gives a raw body, derived from the Content-Type only.
_UPLOAD_NAMES = {
    "application/zip": "upload.zip",
    "application/x-tar": "upload.tar",
    "application/x-gtar": "upload.tar.gz",
    "application/x-gzip": "upload.gzip",
    "application/octet-stream": "upload",
    "application/dicom": "upload.dcm",
    "application/x-mirc": "upload.dcm",
    "application/x-mirc-dicom": "upload.dcm",
    "application/pdf": "upload.pdf",
}
_GRADUAL_TYPES = frozenset({"application/dicom", "application/x-mirc", "application/x-mirc-dicom"})
_HANDLERS = frozenset({"DICOM-zip", "gradual-DICOM", "SI"})

_SESSION_TYPES = {"MR": "xnat:mrSessionData", "CT": "xnat:ctSessionData", "PT": "xnat:petSessionData"}
_SCAN_TYPES = {"MR": "xnat:mrScanData", "CT": "xnat:ctScanData", "PT": "xnat:petScanData"}
_XML_ROOTS = {"MR": "xnat:MRSession", "CT": "xnat:CTSession", "PT": "xnat:PETSession"}

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_INTERACTIVE_RE = re.compile(r".*(MSIE|Mozilla|AppleWebKit|Opera).*")  # §2.2 interactiveAgentIds
# org.nrg.xnat.Files (dicom-xnat, a library outside NrgXnat/xnat, not traced): toFileNameChars replaces every char
# matching [^\w.-] with `_`; isValidFilename is [\w.-]+. Java's \w is ASCII only ([A-Za-z0-9_]), so the classes are
# spelt out (Python's \w is Unicode).
_FILE_NAME_CHAR = re.compile(r"[A-Za-z0-9_.-]")
_VALID_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Restlet's default description of a 404 set without a message (`setStatus(Status.CLIENT_ERROR_NOT_FOUND)`).
_NOT_FOUND = "The server has not found anything matching the request URI"
# Restlet's default description of a 500 set without a message (`setStatus(Status.SERVER_ERROR_INTERNAL)`).
_SERVER_ERROR = "The server encountered an unexpected condition which prevented it from fulfilling the request"
# Data types `SchemaElement.GetElement` knows in the stand-in's site (xnat.xsd element names; `dataType=` of the
# projects-by-permission list).
_KNOWN_DATA_TYPES = frozenset(
    {
        "xnat:projectData", "xnat:subjectData", "xnat:experimentData", "xnat:imageSessionData", "xnat:mrSessionData",
        "xnat:ctSessionData", "xnat:petSessionData", "xnat:imageScanData", "xnat:mrScanData", "xnat:ctScanData",
        "xnat:petScanData",
    }
)  # fmt: skip
_PREARC_URI = re.compile(r"^(?:/data|/REST)?/prearchive/projects/([^/]+)/([^/]+)/([^/]+)/?$")

Key = tuple[str, str, str]  # (project or "Unassigned", timestamp, folderName)


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def _now() -> datetime:
    """Local time at millisecond precision, as XNAT's timestamps are."""
    now = datetime.now()
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _java_timestamp(value: datetime | None) -> str:
    """`java.sql.Timestamp.toString()`: trailing zeros of the fraction dropped, at least one digit (§1.3)."""
    if value is None:
        return ""
    fraction = f"{value.microsecond * 1000:09d}".rstrip("0") or "0"
    return value.strftime("%Y-%m-%d %H:%M:%S.") + fraction


def _timestamp_datetime(timestamp: str) -> datetime | None:
    """The upload time encoded in a prearchive timestamp folder (`yyyyMMdd_HHmmssSSS` or `yyyyMMdd_HHmmss`)."""
    for pattern in ("%Y%m%d_%H%M%S%f", "%Y%m%d_%H%M%S"):
        try:
            return datetime.strptime(timestamp, pattern)
        except ValueError:
            continue
    return None


def _dicom_datetime(date: str, time_of_day: str) -> datetime | None:
    if not re.fullmatch(r"\d{8}", date):
        return None
    digits, _, fraction = re.sub(r"[^0-9.]", "", time_of_day).partition(".")
    digits = (digits + "000000")[:6]
    micros = int((fraction + "000000")[:6]) if fraction.isdigit() else 0
    try:
        return datetime.strptime(date + digits, "%Y%m%d%H%M%S").replace(microsecond=micros)
    except ValueError:
        return None


def _java_hash(text: str) -> int:
    """Java's `String.hashCode()` (XNAT names scans without a SeriesNumber after the series UID hash [INF])."""
    value = 0
    for char in text:
        value = (31 * value + ord(char)) & 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def _label_chars(value: str) -> str:
    """`org.nrg.xnat.Labels.toLabelChars` (dicom-xnat, not traced): characters outside [A-Za-z0-9_-] become `_` (§4)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", value)


def _assignment(text: str, key: str) -> str:
    """A "contained assignment" such as `Project: P1` anywhere in a comment field (§4); "" if absent."""
    match = re.search(rf"(?:^|[\s,;]){key}\s*:\s*([A-Za-z0-9_-]*)", text, flags=re.IGNORECASE)
    return match.group(1) if match else ""


def _code_name(code: int | None) -> str:
    """The prearchive `autoarchive` column for a project prearchive code (§7)."""
    if code is None:
        return ""
    if code == 4:
        return "AutoArchive"
    if code == 5:
        return "AutoArchiveOverwrite"
    return "Manual" if code < 4 else ""


def _csv_cell(value: str) -> str:
    """Apache commons `escapeCsv`: quote only when the value contains a comma, quote, CR or LF (§1.3)."""
    if any(char in value for char in ',"\r\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


def _xml(value: str) -> str:
    return html.escape(value, quote=True)


def _multipart_file_name(name: str) -> str:
    """A multipart part's file name as XNAT keeps it: everything after the last backslash only.

    xnat-web SecureResource.getFileWritersAndLoadParams (restlet/resources/SecureResource.java:1295-1298).
    """
    return name[name.rfind("\\") + 1 :]


def _last_path_component(name: str) -> str:
    """`ArchiveEntryFileWriterWrapper.getLastPathComponent` (helpers/ArchiveEntryFileWriterWrapper.java:31-34).

    `s.split("[\\\\/]")`: that Java regex is a character class of a forward slash only, so a backslash is *not* a
    separator, and `String.split` drops trailing empty strings ("a/b/" -> "b").
    """
    parts = name.split("/")
    while parts and not parts[-1]:
        parts.pop()
    return parts[-1] if parts else ""


def _to_file_name_chars(name: str) -> str:
    """`org.nrg.xnat.Files.toFileNameChars`: every char outside [\\w.-] becomes `_`.

    Java works on UTF-16 code units, so a character outside the BMP (a surrogate pair) becomes two underscores.
    """
    return "".join(c if _FILE_NAME_CHAR.fullmatch(c) else "__" if ord(c) > 0xFFFF else "_" for c in name)


def _java_list_hash(values: Sequence[str]) -> int:
    """`java.util.List.hashCode()` of strings: h = 31 * h + e.hashCode(), starting at 1, in 32-bit arithmetic."""
    value = 1
    for item in values:
        value = (31 * value + _java_hash(item)) & 0xFFFFFFFF
    return value


def _base36(value: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        value, rest = divmod(value, 36)
        out = digits[rest] + out
        if value == 0:
            return out


def _param_of(header_value: str, name: str, header: str = "content-type") -> str | None:
    message = Message()
    message[header] = header_value
    value = message.get_param(name, header=header)
    if value is None:
        return None
    if isinstance(value, tuple):
        return collapse_rfc2231_value(value)
    return value


def _basic_credentials(header: str) -> tuple[str, str] | None:
    if not header.lower().startswith("basic "):
        return None
    try:
        raw = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = raw.partition(":")
    return (username, password) if sep else None


def _cookie(headers: Message, name: str) -> str | None:
    for raw in headers.get_all("Cookie") or []:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(str(raw))
        except CookieError:
            continue
        if name in jar:
            return jar[name].value
    return None


def _same_secret(left: str, right: str) -> bool:
    return secrets.compare_digest(left.encode("utf-8"), right.encode("utf-8"))


# --------------------------------------------------------------------------------------------------------------
# Responses and errors
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


def _status_page(status: int, message: str) -> bytes:
    """Restlet 1.1's StatusFilter page: the message is the `<h3>` (§1.4)."""
    if 400 <= status < 418:
        anchor = f"#sec10.4.{status - 399}"
    elif 500 <= status < 506:
        anchor = f"#sec10.5.{status - 499}"
    else:
        anchor = ""
    return (
        "<html>\n<head>\n   <title>Status page</title>\n</head>\n<body>\n"
        f"<h3>{html.escape(message, quote=False)}</h3><p>You can get technical details "
        f'<a href="http://www.w3.org/Protocols/rfc2616/rfc2616-sec10.html{anchor}">here</a>.<br>\n'
        'Please continue your visit at our <a href="/">home page</a>.\n</p>\n</body>\n</html>\n'
    ).encode()


def _login_failure_message(max_failed_logins: int) -> str:
    """libs/xdat AdminUtils.GetLoginFailureMessage: the `uiLoginFailureMessage` preference (its default below, from
    SiteConfigPreferences.getUiLoginFailureMessage) with `%d` = maxFailedLogins, or DEFAULT_LOGIN_FAILURE_MESSAGE
    when maxFailedLogins is not positive."""
    if max_failed_logins <= 0:
        return "Login attempt failed. Please try again."
    return (
        "Your login attempt failed because the username and password combination you provided was invalid or your "
        f"user already has the maximum number of user sessions open. After {max_failed_logins} failed login attempts, "
        "your user account will be locked. If you believe your account is currently locked, you can:<ul><li>Unlock it "
        "by resetting your password</li><li>Wait one hour for it to unlock automatically</li></ul>"
    )


def _tomcat_page(status: int, message: str) -> bytes:
    """Tomcat's own error page, for errors raised before Restlet (Spring Security) [INF §1.4]."""
    phrase = _phrase(status)
    return (
        f'<!doctype html><html lang="en"><head><title>HTTP Status {status} - {phrase}</title></head>'
        f"<body><h1>HTTP Status {status} - {phrase}</h1><hr/><p><b>Type</b> Status Report</p>"
        f"<p><b>Message</b> {html.escape(message)}</p><hr/><h3>Apache Tomcat</h3></body></html>"
    ).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class _HttpError(Exception):
    """An error answer: a Restlet status page (or Tomcat page) with `message`, or an empty redirect."""

    def __init__(
        self, status: int, message: str = "", *, headers: Sequence[tuple[str, str]] = (), tomcat: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message or _phrase(status)
        self.headers = list(headers)
        self.tomcat = tomcat

    def response(self) -> _Response:
        if 300 <= self.status < 400:
            return _Response(self.status, headers=self.headers)
        page = _tomcat_page if self.tomcat else _status_page
        return _Response(self.status, page(self.status, self.message), "text/html;charset=UTF-8", self.headers)


class _EntryError(_HttpError):
    """A per-entry import failure (§3.4 step 1); `unreadable` marks a DICOM coding error (≤1.8.9 skips only those)."""

    def __init__(self, message: str, *, unreadable: bool) -> None:
        super().__init__(400, message)
        self.unreadable = unreadable


class _ArchiveError(Exception):
    """The archive step failed; `conflict` ones leave the row CONFLICT, the others ERROR (§6.4)."""

    def __init__(self, message: str, *, conflict: bool) -> None:
        super().__init__(message)
        self.message = message
        self.conflict = conflict


def _text(text: str, *, status: int = 200, content_type: str = "text/plain;charset=UTF-8") -> _Response:
    return _Response(status, text.encode(), content_type)


def _json(value: Any, *, status: int = 200) -> _Response:
    return _Response(status, json.dumps(value).encode(), "application/json;charset=UTF-8")


def _uri_list(uris: Sequence[str], fmt: str | None = None) -> _Response:
    """§3.6: `text/uri-list`, each URI + CRLF; `format=txt` gives a bare single URI; empty body when none."""
    if fmt == "txt":
        body = uris[0] if len(uris) == 1 else "".join(uri + "\r\n" for uri in uris)
        return _text(body)
    if fmt == "html":
        items = "".join(f"<li>{html.escape(uri)}</li>" for uri in uris)
        return _text(f"<html><body><ul>{items}</ul></body></html>", content_type="text/html;charset=UTF-8")
    return _Response(200, "".join(uri + "\r\n" for uri in uris).encode(), "text/uri-list")


def _table(
    columns: Sequence[str], rows: Sequence[dict[str, str]], fmt: str, *, meta: Sequence[tuple[str, str]] = ()
) -> _Response:
    """A ResultSet table (§1.3) as JSON (every value a string), CSV, XML (XFTTable shape) or HTML.

    `meta`: table properties that JSONTableRepresentation.write appends after `Result` (restlet/representations/
    JSONTableRepresentation.java), in the Hashtable's enumeration order the caller gives.
    """
    cells = [[str(row.get(column, "")) for column in columns] for row in rows]
    if fmt == "csv":
        lines = [",".join(_csv_cell(c) for c in columns)] + [",".join(_csv_cell(c) for c in line) for line in cells]
        return _Response(200, ("\n".join(lines) + "\n").encode(), "text/csv;charset=UTF-8")
    if fmt == "xml":
        head = "".join(f"<column>{_xml(c)}</column>" for c in columns)
        body = "".join("<row>" + "".join(f"<cell>{_xml(c)}</cell>" for c in line) + "</row>" for line in cells)
        text = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<results><columns>{head}</columns><rows>{body}</rows></results>'
        )
        return _Response(200, text.encode(), "text/xml;charset=UTF-8")
    if fmt == "html":
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in line) + "</tr>" for line in cells)
        return _text(f"<html><body><table><tr>{head}</tr>{body}</table></body></html>", content_type="text/html")
    result = [dict(zip(columns, line, strict=True)) for line in cells]
    if not meta:
        return _json({"ResultSet": {"Result": result}})
    extra = ",".join(f"{json.dumps(key)}: {json.dumps(value)}" for key, value in meta)
    text = '{"ResultSet":{"Result":' + json.dumps(result, separators=(",", ":")) + ", " + extra + "}}"
    return _Response(200, text.encode(), "application/json;charset=UTF-8")
