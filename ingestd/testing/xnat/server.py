"""A faithful in-process stand-in for an XNAT 1.8 server (import -> prearchive -> archive), for tests and labs.

Behaviour follows `shared/reference/xnat-api.md` (cited below as §n), surprises included: unknown projects land in
`Unassigned` with status 200, archive conflicts answer HTTP 500 (not 409), octet-stream zips are refused with
`Unsupported format UNKNOWN`, a bad zip entry aborts the import *after* earlier entries were stored, and sessions
sit in `RECEIVING` until an idle builder builds them. Where it matters for clients, behaviour is checked against
XNAT's own source (xnat-web, cited `file:line` or Class.method in comments): DICOM-zip uploads are read as a stream
the way java.util.zip.ZipInputStream reads them, files are named as GradualDicomImporter.getSafeFile names them,
and archiving merges catalogs by SOP Instance UID as MergeCatCatalog does. Standard library HTTP server + pydicom
only.

Usage::

    with FakeXnat(version="1.8.10", idle_build_seconds=0.2, rebuild_repeat_seconds=0.1) as xnat:
        xnat.add_user("alice", "secret")
        xnat.add_project("PROJ", owners=["alice"], prearchive_code=0)
        requests.post(f"{xnat.url}/data/services/import?PROJECT_ID=PROJ", data=zip_bytes,
                      headers={"Content-Type": "application/zip"}, auth=("alice", "secret"))
        xnat.build_now()
        assert xnat.prearchive_rows("PROJ")[0]["status"] == "READY"

Public API (`FakeXnat`):

* ``FakeXnat(*, version="1.8.10", host="127.0.0.1", port=0, idle_build_seconds=300.0,
  rebuild_repeat_seconds=60.0, session_timeout_seconds=900.0, archive_timeout_seconds=600.0,
  operation_seconds=0.0, site_id="XNAT", use_sop_instance_uid=True, token_lifetime_seconds=172800.0,
  max_failed_logins=20, lockout_seconds=3600.0, password_expiration_seconds=None, require_login=True,
  context_path="", lastmod_refresh_seconds=None, extra_scan_resources=())`` -- `version` switches the
  1.8.8 / 1.8.9 / 1.8.10 behaviour (≥1.8.9: `projects?permissions=`
  without a known `dataType` is a bare 500; ≥1.8.10: default import handler, DICOM-zip
  `project`/`subject`/`session`/`dest`/`action=commit`, nested archives, `Ignore-Unparsable` scope) and is what
  `/xapi/siteConfig/buildInfo` (open, no login) and `.../buildInfo/version` report; `token_lifetime_seconds` is
  `aliasTokenTimeout`; `max_failed_logins`/`lockout_seconds` lock an account after that many failures (0 = never);
  `password_expiration_seconds` is `passwordExpirationInterval` (None = no expiry); `require_login=False` serves
  anonymous requests as `guest` (403, not 401); `context_path` (e.g. ``"/xnat"``) serves everything under it only
  (`url` includes it; body URIs stay `/data/...`, redirects to XNAT pages include it); the idle builder
  replaces XNAT's minutes by seconds (§5.3);
  `operation_seconds` makes every build and archive take that long, so tests can observe `BUILDING`/`_ARCHIVING`
  and lock contention; `use_sop_instance_uid` is the site preference `useSopInstanceUidToUniquelyIdentifyDicom`
  (archived catalog entries matched by SOP Instance UID, else by file name); `lastmod_refresh_seconds` is
  GradualDicomImporter.updateSessionLastMod's 15 s (a row's lastmod is refreshed by new files at most that often;
  default: 15 s scaled like the idle time, ``min(15, idle_build_seconds / 20)``); `extra_scan_resources` (e.g.
  ``("NIFTI", "SNAPSHOTS", "BIDS")``) gives every newly archived scan those resources too, with a few files each,
  in the experiment JSON/XML, the scan's resource listing, catalogs and file listings (``archived_files`` stays
  DICOM only).
* ``start()`` (returns self), ``stop()``, context manager; ``url`` (``http://127.0.0.1:PORT``).
* ``add_user(username, password, *, admin=False)``; ``add_project(project_id, *, owners=(), members=(),
  collaborators=(), prearchive_code=0, aliases=(), name=None)`` -- owners/members may edit, collaborators only
  read, site admins do everything; ``issue_token(username) -> (alias, secret)``; ``expire_sessions()``.
* Accounts and tokens: ``expire_tokens(username=None) -> int`` (the alias-token sweep, for one user or all; returns
  how many went); ``failed_logins(username) -> int``; ``is_locked(username) -> bool``; ``expire_password(username)``
  (authenticated requests then answer 302 to `{url}/app/template/XDATScreen_UpdateUser.vm`);
  ``set_password(username, password)``; ``disable_user(username, *, inactivity=False)`` (by an admin: every login
  401; for inactivity: the password logs in, then 302 to `{url}/app/template/InactiveAccount.vm`);
  ``unverify_user(username)`` (logins 401); ``enable_user(username)`` (undoes those and any lockout).
* Fault injection, each for the next `times` requests whose method matches and whose path starts with
  `path_prefix`: ``fail_next(method, path_prefix, *, status=503, times=1, body=None, html=True,
  after_processing=False, delay=0.0)`` -- `body` is the message (inside a Restlet status page when `html`,
  else plain text); `after_processing=True` does the real work first (files stored, session archived) and then
  answers the failure, like a proxy 504 after XNAT finished; `delay` sleeps before answering.
  ``html_error_with_200_next(method, path_prefix, message=...)`` answers 200 with an HTML error page (what
  `format=html` uploads do) without doing the work.
  ``reset_next(method, path_prefix, *, times=1, after_bytes=None)`` resets the connection (TCP RST) part-way
  through the body: for `POST /data/services/import` after `after_bytes` (default half the body), with every entry
  of a raw DICOM-zip upload that lies wholly inside them stored as a complete upload would store it (the rows stay
  RECEIVING; multipart and other uploads store nothing); elsewhere after at most 64 KiB, processing nothing;
  logged with status 0.
  ``truncate_next(method, path_prefix, *, times=1, keep_bytes=None)`` does the real work and answers with the real
  status and headers but only the first `keep_bytes` of the body (default half; Content-Length to match).
  ``proxy_timeout_next(path_prefix="/data/services/import", *, after_seconds, import_seconds, method="POST",
  times=1)`` -- nginx's 504 page after `after_seconds` while XNAT goes on in the background: an import's entries
  are stored one by one over `import_seconds` (row RECEIVING, lastmod throttled, no idle build while it writes);
  `stop()` ends it. ``hold_row_lock(project, timestamp, folder, seconds, *, status="_BUILDING")`` -- the row
  locked as XNAT's LockAndSync locks it, so `?action=build|commit` answer 409 "session document locked".
* Anonymisation: ``set_anon_script(script, *, project=None, enabled=True, fails=False)`` -- the site-wide or a
  project's DicomEdit script (None removes it; scripts are never run). A failing enabled site script makes each
  import entry answer 400 "unable to read DICOM object NAME" (new row deleted; `prevent_anon` spares it); a failing
  project script fails the archive (row ERROR). Read back via ``GET /xapi/anonymize/site``, ``.../site/enabled``,
  ``/xapi/anonymize/projects/P``, ``.../projects/P/enabled``, ``/data/config/anon/script`` and
  ``/data/projects/P/config/anon/projects/P``.
* Silent drops: ``drop_entries(predicate, *, stage="filter")`` -- `predicate(sop_instance_uid,
  series_instance_uid, series_description) -> bool`; matching objects are accepted (200) and not stored, by a
  series import filter (`stage="filter"`, before any row exists) or a site-wide DicomEdit reject
  (`stage="anonymization"`: row created, file written and deleted, rows with `prevent_anon` spared);
  ``drop_entries(None)`` removes every rule.
* ``faults_pending()`` counts the injected faults not yet met; ``clear_faults()`` forgets every pending fault,
  reset, truncation, proxy timeout and drop rule. A client that hangs up part-way
  through an upload body is treated like a reset there (a streamed DICOM-zip keeps the entries read whole).
* Inspection: ``prearchive_rows(project=None)`` (the §5.1 row dicts, `project` may be ``"Unassigned"``),
  ``prearchive_files(project=None)`` (row url -> file name -> SOP Instance UID, built or not),
  ``experiments(project=None)`` (`ExperimentRecord` snapshots), ``archived_files(project, label)`` (the bytes of
  an archived session's files by `<scan>/<name>`), ``requests_log`` (a copy of every
  ``(method, path+query, status)``), ``build_now()`` (one idle-builder pass ignoring the idle time, including the
  auto-archive that follows a build).

Command line (a lab can point ingestd at it)::

    python -m ingestd.testing.fake_xnat --port 8080 --user admin:admin --project PROJ

Archived scans answer what a verifying client reads: ``.../scans/{id}/resources`` (CatalogResourceList columns),
``.../scans/{id}/resources/{DICOM|resource id}`` (the catalog XML, one `cat:entry` with `UID` per file),
``.../files``, under `/data/projects/P/subjects/S/experiments/E`, `/data/experiments/{ID}` and the `/archive`
aliases. Prearchive scan/resource/file listings answer from what the last build catalogued.

Deliberate simplifications (see each [INF] in the reference): files live in memory; a minimal xnat.xsd (the
session types the stand-in files, their scans and resources; enough for xnatpy to walk projects, subjects,
experiments, scans and resources), no CSRF, anonymisation scripts only as `set_anon_script` failures and
`drop_entries`' rejects, no custom routing rules, no `Direct-Archive`, no concurrent-send detection, no
PET/MR separation, no file history in the archive.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import hashlib
import html
import io
import json
import logging
import re
import secrets
import signal
import struct
import tarfile
import threading
import time
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import Message
from email.utils import collapse_rfc2231_value
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import SHUT_RDWR, SO_LINGER, SOL_SOCKET, socket
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from pydicom import dcmread

from ingestd.wakeup import Wakeup

__all__ = ["ExperimentRecord", "FakeXnat", "ScanRecord", "main"]

LOG = logging.getLogger("ingestd.testing.fake_xnat")

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
# org.nrg.xnat.Files (dicom-xnat): toFileNameChars replaces every char matching [^\w.-] with `_`; isValidFilename is
# [\w.-]+. Java's \w is ASCII only ([A-Za-z0-9_]), so the classes are spelt out (Python's \w is Unicode).
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


# A minimal xnat.xsd: the types the stand-in answers with (projects, subjects, imaging sessions of the modalities it
# files), with the fields it fills. Real XNAT serves its full schemas; xnatpy builds its classes from whatever it gets.
_XNAT_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema targetNamespace="http://nrg.wustl.edu/xnat" xmlns:xnat="http://nrg.wustl.edu/xnat"
    xmlns:xs="http://www.w3.org/2001/XMLSchema" elementFormDefault="qualified" attributeFormDefault="unqualified">
  <xs:element name="Project" type="xnat:projectData"/>
  <xs:element name="Subject" type="xnat:subjectData"/>
  <xs:element name="MRSession" type="xnat:mrSessionData"/>
  <xs:element name="CTSession" type="xnat:ctSessionData"/>
  <xs:element name="PETSession" type="xnat:petSessionData"/>
  <xs:element name="OtherDicomSession" type="xnat:otherDicomSessionData"/>
  <xs:complexType name="projectData">
    <xs:sequence>
      <xs:element name="name" type="xs:string" minOccurs="0"/>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
  </xs:complexType>
  <xs:complexType name="subjectData">
    <xs:sequence>
      <xs:element name="experiments" minOccurs="0">
        <xs:complexType>
          <xs:sequence>
            <xs:element name="experiment" type="xnat:subjectAssessorData" minOccurs="0" maxOccurs="unbounded"/>
          </xs:sequence>
        </xs:complexType>
      </xs:element>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string"/>
    <xs:attribute name="project" type="xs:string"/>
    <xs:attribute name="label" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="experimentData">
    <xs:sequence>
      <xs:element name="date" type="xs:date" minOccurs="0"/>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
    <xs:attribute name="project" type="xs:string" use="required"/>
    <xs:attribute name="label" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="subjectAssessorData">
    <xs:complexContent>
      <xs:extension base="xnat:experimentData">
        <xs:sequence>
          <xs:element name="subject_ID" type="xs:string"/>
        </xs:sequence>
      </xs:extension>
    </xs:complexContent>
  </xs:complexType>
  <xs:complexType name="imageSessionData">
    <xs:complexContent>
      <xs:extension base="xnat:subjectAssessorData">
        <xs:sequence>
          <xs:element name="UID" type="xs:string" minOccurs="0"/>
          <xs:element name="modality" type="xs:string" minOccurs="0"/>
          <xs:element name="scans" minOccurs="0">
            <xs:complexType>
              <xs:sequence>
                <xs:element name="scan" type="xnat:imageScanData" minOccurs="0" maxOccurs="unbounded"/>
              </xs:sequence>
            </xs:complexType>
          </xs:element>
        </xs:sequence>
      </xs:extension>
    </xs:complexContent>
  </xs:complexType>
  <xs:complexType name="abstractResource">
    <xs:attribute name="label" type="xs:string"/>
    <xs:attribute name="file_count" type="xs:integer"/>
    <xs:attribute name="file_size" type="xs:integer"/>
  </xs:complexType>
  <xs:complexType name="resource">
    <xs:complexContent>
      <xs:extension base="xnat:abstractResource">
        <xs:attribute name="URI" type="xs:string"/>
        <xs:attribute name="format" type="xs:string"/>
        <xs:attribute name="content" type="xs:string"/>
      </xs:extension>
    </xs:complexContent>
  </xs:complexType>
  <xs:complexType name="resourceCatalog">
    <xs:complexContent><xs:extension base="xnat:resource"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="imageScanData">
    <xs:sequence>
      <xs:element name="file" type="xnat:abstractResource" minOccurs="0" maxOccurs="unbounded"/>
    </xs:sequence>
    <xs:attribute name="ID" type="xs:string" use="required"/>
    <xs:attribute name="type" type="xs:string"/>
    <xs:attribute name="UID" type="xs:string"/>
    <xs:attribute name="project" type="xs:string"/>
  </xs:complexType>
  <xs:complexType name="mrScanData">
    <xs:complexContent><xs:extension base="xnat:imageScanData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="ctScanData">
    <xs:complexContent><xs:extension base="xnat:imageScanData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="petScanData">
    <xs:complexContent><xs:extension base="xnat:imageScanData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="otherDicomScanData">
    <xs:complexContent><xs:extension base="xnat:imageScanData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="mrSessionData">
    <xs:complexContent><xs:extension base="xnat:imageSessionData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="ctSessionData">
    <xs:complexContent><xs:extension base="xnat:imageSessionData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="petSessionData">
    <xs:complexContent><xs:extension base="xnat:imageSessionData"/></xs:complexContent>
  </xs:complexType>
  <xs:complexType name="otherDicomSessionData">
    <xs:complexContent><xs:extension base="xnat:imageSessionData"/></xs:complexContent>
  </xs:complexType>
</xs:schema>
"""


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
    """`org.nrg.xnat.Labels.toLabelChars`: every character outside [A-Za-z0-9_-] becomes `_` (§4)."""
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


# --------------------------------------------------------------------------------------------------------------
# DICOM parsing and archive unpacking
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dicom:
    """The header values the fake routes and describes sessions by."""

    sop_class: str
    sop_uid: str
    study_uid: str
    series_uid: str
    series_number: str
    series_description: str
    modality: str
    patient_name: str
    patient_id: str
    comments: tuple[str, str, str]  # Patient Comments, Study Comments, Additional Patient History (§4)
    study_description: str
    accession: str
    study_date: str
    study_time: str
    instance_number: str

    @property
    def scan_id(self) -> str:
        """§3.4 step 6: scan = SeriesNumber, else a hash of the series UID."""
        return self.series_number or str(abs(_java_hash(self.series_uid)))

    def template_file_name(self) -> str:
        """The site's DICOM file namer with its default template (what XNAT falls back to for a file's name).

        xnat-web `TemplatizedDicomFileNamer.makeFileName` (org/nrg/dcm/id/TemplatizedDicomFileNamer.java) with
        libs/xdat SiteConfigPreferences `dicomFileNameTemplate` default
        `${StudyInstanceUID}-${SeriesNumber}-${InstanceNumber}-${HashSOPClassUIDWithSOPInstanceUID}` (no extension,
        so `.dcm` is appended); a blank value is `no-value-for-<keyword>`; the hash is the Java `List.hashCode()` of
        the two values, unsigned, in base 36. `GradualDicomImporter.getSafeFile` strips leading dots.
        """
        values = {
            "StudyInstanceUID": self.study_uid,
            "SeriesNumber": self.series_number,
            "InstanceNumber": self.instance_number,
            "SOPClassUID": self.sop_class,
            "SOPInstanceUID": self.sop_uid,
        }
        values = {key: value or f"no-value-for-{key}" for key, value in values.items()}
        digest = _base36(_java_list_hash([values["SOPClassUID"], values["SOPInstanceUID"]]))
        name = f"{values['StudyInstanceUID']}-{values['SeriesNumber']}-{values['InstanceNumber']}-{digest}.dcm"
        return name.lstrip(".")


_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "Modality", "PatientName", "PatientID", "PatientComments", "StudyComments", "AdditionalPatientHistory",
    "StudyDescription", "AccessionNumber", "StudyDate", "StudyTime", "InstanceNumber",
)  # fmt: skip
# pydicom may warn on odd input; `warnings.catch_warnings` is process-global, so parsing is serialised.
_PARSE_LOCK = threading.Lock()


def _looks_like_dicom(data: bytes) -> bool:
    """A Part 10 file, or a bare data set starting with a group 0002/0008 element (dcm4che guesses the same)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    if len(data) < 8 or int.from_bytes(data[0:2], "little") not in (0x0002, 0x0008):
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    return int.from_bytes(data[4:8], "little") <= len(data) - 8


def _value(dataset: Any, keyword: str) -> str:
    value = dataset.get(keyword)
    if value is None:
        return ""
    return str(value).strip()


def _parse_dicom(base: str, data: bytes, *, require_uids: bool = True) -> _Dicom:
    """Read one object; `base` is the name XNAT's file writer gives it (used in the error messages).

    `require_uids=False` leaves the SOP Class/Instance UID checks to `_require_uids`: GradualDicomImporter.call
    makes them only after the series import filters (archive/GradualDicomImporter.java:193-211).
    """
    if not _looks_like_dicom(data):
        raise _EntryError(f"unable to read DICOM object {base}", unreadable=True)
    try:
        with _PARSE_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
            values = {keyword: _value(dataset, keyword) for keyword in _KEYWORDS}
    except Exception as exc:  # pydicom raises many types on garbage; all mean "unreadable"
        raise _EntryError(f"unable to read DICOM object {base}", unreadable=True) from exc
    dicom = _Dicom(
        sop_class=values["SOPClassUID"],
        sop_uid=values["SOPInstanceUID"],
        study_uid=values["StudyInstanceUID"],
        series_uid=values["SeriesInstanceUID"],
        series_number=values["SeriesNumber"],
        series_description=values["SeriesDescription"],
        modality=values["Modality"],
        patient_name=values["PatientName"],
        patient_id=values["PatientID"],
        comments=(values["PatientComments"], values["StudyComments"], values["AdditionalPatientHistory"]),
        study_description=values["StudyDescription"],
        accession=values["AccessionNumber"],
        study_date=values["StudyDate"],
        study_time=values["StudyTime"],
        instance_number=values["InstanceNumber"],
    )
    if require_uids:
        _require_uids(base, dicom)
    return dicom


def _require_uids(base: str, dicom: _Dicom) -> None:
    if not dicom.sop_class:
        raise _EntryError(f"object {base} contains no SOP Class UID", unreadable=False)
    if not dicom.sop_uid:
        raise _EntryError(f"object {base} contains no SOP Instance UID", unreadable=False)


def _archive_kind(name: str) -> str | None:
    """`Format.getFormat`: purely from the (case-sensitive) file name (§3.1)."""
    if name.endswith((".zip", ".zar")):
        return "zip"
    if name.endswith((".tar", ".xar")):
        return "tar"
    if name.endswith((".tgz", ".tar.gz")):
        return "tgz"
    return None


def _iter_entries(name: str, data: bytes, *, nested: bool, cut: bool = False) -> Iterator[tuple[str, bytes]]:
    """The file entries of a zip/tar/tgz, lazily (so a later failure comes after earlier entries were stored).

    `cut`: `data` is what arrived before the connection was reset, so needing more than that fails.
    """
    kind = _archive_kind(name)
    if kind == "zip":
        yield from _zip_entries(data, nested=nested, cut=cut)
    elif kind is not None:
        yield from _tar_entries(data, gzip=kind == "tgz", nested=nested)
        if cut:  # TarArchiveInputStream reads on to the end-of-archive blocks [INF: a cut in the padding is rare]
            raise _unreadable_archive()


def _expand(entry_name: str, data: bytes, *, nested: bool) -> Iterator[tuple[str, bytes]]:
    """One archive entry: a nested archive's entries, or (the entry's file writer name, its bytes); that name is the
    entry name's last path component (helpers/ArchiveEntryFileWriterWrapper.java:25-34)."""
    if nested and _archive_kind(entry_name) is not None:  # ≥1.8.10 unpacks nested archives (§3.2)
        yield from _iter_entries(entry_name, data, nested=nested)
    else:
        yield _last_path_component(entry_name), data


_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # PK\x03\x04 local file header, 30 bytes
_ZIP64_MAGIC = 0xFFFFFFFF


def _unreadable_archive() -> _HttpError:
    """DicomZipImporter.importCompressedFile: any IOException of the archive stream (java.util.zip.ZipException,
    EOFException, a reset connection) -> ClientException "unable to read data from file" (archive/DicomZipImporter.java
    importCompressedFile)."""
    return _HttpError(400, "unable to read data from file")


def _zip_entries(data: bytes, *, nested: bool, cut: bool = False) -> Iterator[tuple[str, bytes]]:
    """The entries of a zip as `java.util.zip.ZipInputStream` reads it (DicomZipImporter.importZipFile): local file
    headers in stream order, the central directory never consulted; directories (names ending in `/`) skipped.

    Reading stops cleanly where ZipInputStream.getNextEntry returns null: fewer than 30 bytes left (its EOFException
    on the header is caught) or a signature other than PK\x03\x04 (the central directory, or a body that is no zip at
    all, §3.6). Anything else that cannot be read raises "unable to read data from file" *after* the earlier entries
    were yielded (and stored). A body cut by a reset (`cut`) fails wherever more bytes are needed: a reset stream
    throws an IOException, not the EOF that ends the entries quietly (see `_Api.process_cut`).
    """
    for name, content in _zip_stream(data, cut=cut):
        if not name.endswith("/"):
            yield from _expand(name, content, nested=nested)


@dataclass(frozen=True)
class _LocalEntry:
    """One local file header as ZipInputStream.readLOC takes it; `start` is where the entry's data begin."""

    name: str
    method: int
    descriptor: bool  # general purpose flag bit 3: CRC and sizes follow the data
    crc: int
    compressed: int
    size: int
    start: int


def _zip_stream(data: bytes, *, cut: bool) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each local entry, following Java 8's ZipInputStream.readLOC / read / readEnd."""
    pos = 0
    while True:
        if len(data) - pos < _LOCAL_HEADER.size:
            if cut:
                raise _unreadable_archive()
            return  # readLOC's EOFException is caught: getNextEntry returns null
        entry = _local_entry(data, pos)
        if entry is None:
            return
        if entry.method == zipfile.ZIP_STORED:  # ZipInputStream reads `size` bytes (remaining = entry.size)
            content = data[entry.start : entry.start + entry.size]
            if len(content) < entry.size:
                raise _unreadable_archive()
            pos = entry.start + entry.size
            if zlib.crc32(content) != entry.crc:
                raise _unreadable_archive()  # "invalid entry CRC"
            yield entry.name, content
            continue
        content, end = _inflate_entry(data, entry)
        # The importer has the whole content (and the file written) before the read that hits the entry's end
        # checks the data descriptor, so an entry whose descriptor is cut off is stored before reading fails.
        yield entry.name, content
        if end is None:
            raise _unreadable_archive()
        pos = end


def _local_entry(data: bytes, pos: int) -> _LocalEntry | None:
    """The local header at `pos`, or None where there is none (the central directory, or no zip at all)."""
    signature, _, flags, method, _, _, crc, compressed, size, name_length, extra_length = _LOCAL_HEADER.unpack_from(
        data, pos
    )
    if signature != b"PK\x03\x04":
        return None
    start = pos + _LOCAL_HEADER.size + name_length + extra_length
    if len(data) < start:
        raise _unreadable_archive()  # readFully of the name/extra: EOFException, not caught there
    try:  # ZipInputStream(InputStream) decodes names as UTF-8
        name = data[pos + _LOCAL_HEADER.size : pos + _LOCAL_HEADER.size + name_length].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _unreadable_archive() from exc
    if flags & 0x1:
        raise _unreadable_archive()  # "encrypted ZIP entry not supported"
    descriptor = bool(flags & 0x8)
    if descriptor and method != zipfile.ZIP_DEFLATED:
        raise _unreadable_archive()  # "only DEFLATED entries can have EXT descriptor": its end cannot be found
    if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise _unreadable_archive()  # "invalid compression method"
    if not descriptor and _ZIP64_MAGIC in (compressed, size):
        extra = data[start - extra_length : start]
        compressed, size = _zip64_sizes(extra, compressed, size)
    return _LocalEntry(name, method, descriptor, crc, compressed, size, start)


def _inflate_entry(data: bytes, entry: _LocalEntry) -> tuple[bytes, int | None]:
    """A deflated entry's content and where the next header starts (None: its data descriptor is cut off); with a
    data descriptor the deflate stream's own end delimits the data (ZipInputStream inflates until it finishes)."""
    limit = len(data) if entry.descriptor else min(len(data), entry.start + entry.compressed)
    view = memoryview(data)
    inflater = zlib.decompressobj(-15)
    parts: list[bytes] = []
    pos = entry.start
    try:
        while not inflater.eof and pos < limit:  # fed in slices: the end is unknown until the inflater finishes
            chunk = view[pos : min(pos + 65536, limit)]
            parts.append(inflater.decompress(chunk))
            pos += len(chunk) - len(inflater.unused_data)
    except zlib.error as exc:
        raise _unreadable_archive() from exc
    if not inflater.eof:
        raise _unreadable_archive()  # "Unexpected end of ZLIB input stream": cut short or corrupt
    content = b"".join(parts)
    read = pos - entry.start
    crc, compressed, size = entry.crc, entry.compressed, entry.size
    if entry.descriptor:
        # readEnd (Java 8): the descriptor has 8-byte sizes only when an inflated or deflated size exceeds
        # 0xFFFFFFFF, and its PK\x07\x08 signature is optional. (So Java 8 misreads the small zip64 descriptors
        # that Python's zipfile writes to an unseekable stream with force_zip64, and refuses the entry.)
        width = 8 if len(content) > _ZIP64_MAGIC or read > _ZIP64_MAGIC else 4
        if data[pos : pos + 4] == b"PK\x07\x08":
            pos += 4
        if len(data) - pos < 4 + 2 * width:
            return content, None
        crc = int.from_bytes(data[pos : pos + 4], "little")
        compressed = int.from_bytes(data[pos + 4 : pos + 4 + width], "little")
        size = int.from_bytes(data[pos + 4 + width : pos + 4 + 2 * width], "little")
        pos += 4 + 2 * width
    if size != len(content) or compressed != read or zlib.crc32(content) != crc:
        # "invalid entry size / compressed size / CRC". XNAT's message then depends on where the importer was
        # reading (a small object's header read -> "unable to read DICOM object ..."; later -> 507) [INF].
        raise _unreadable_archive()
    return content, pos


def _zip64_sizes(extra: bytes, compressed: int, size: int) -> tuple[int, int]:
    """ZipEntry.setExtra0 for a local header: the zip64 block (0x0001) holds the original size, then the compressed
    size (both must be there)."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001 and length >= 16:
            return struct.unpack_from("<Q", extra, pos + 12)[0], struct.unpack_from("<Q", extra, pos + 4)[0]
        pos += 4 + length
    return compressed, size


def _tar_entries(data: bytes, *, gzip: bool, nested: bool) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz" if gzip else "r:") as archive:
            for member in archive:
                extracted = archive.extractfile(member) if member.isfile() else None
                if extracted is not None:
                    yield from _expand(member.name, extracted.read(), nested=nested)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _HttpError(400, "unable to read data from file") from exc


# --------------------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _User:
    username: str
    password: str
    admin: bool = False
    # Account state (xhbm_xdat_user_auth / xdat_user): failed-login count and lockout time (HibernateXdatUserAuthService
    # .addFailedLoginAttempt), when the password was last set (XnatExpiredPasswordFilter QUERY_BY_INTERVAL), enabled,
    # disabled-for-inactivity (XnatDatabaseAuthenticationProvider.PreAuthenticationChecks.disabledDueToInactivity),
    # email-verified.
    failed_logins: int = 0
    locked_at: float | None = None
    password_updated: float = field(default_factory=time.time)
    password_expired: bool = False
    enabled: bool = True
    inactive: bool = False
    verified: bool = True


@dataclass
class _Project:
    id: str
    name: str
    owners: set[str]
    members: set[str]
    collaborators: set[str]
    prearchive_code: int
    aliases: tuple[str, ...]


@dataclass
class _Token:
    alias: str
    secret: str
    username: str
    created: float
    expires: float
    serial: int


@dataclass
class _HttpSession:
    id: str
    username: str
    last_access: float
    # XnatExpiredPasswordFilter caches its verdict in the HTTP session attribute "expired" (lines 71-73, 248-266): once
    # a session was found not expired it is never checked again.
    password_not_expired: bool = False


@dataclass
class _File:
    name: str
    data: bytes
    dicom: _Dicom


@dataclass(frozen=True)
class _BuiltScan:
    """One scan of a built prearchive session: its session XML values and its catalog's file names."""

    series_description: str
    xsi_type: str
    names: tuple[str, ...]


@dataclass
class _Row:
    """One prearchive session (§5.1); `scans` maps scan id -> file name -> file."""

    project: str | None
    timestamp: str
    folder: str
    name: str
    tag: str
    subject: str
    status: str
    lastmod: datetime
    scan_datetime: datetime | None
    has_study_time: bool
    autoarchive: str
    prevent_anon: str
    prevent_auto_commit: str
    source: str
    visit: str
    protocol: str
    timezone: str
    overwrite_files: bool
    uploaded: datetime | None = None
    scan_time: str = ""
    built: bool = False
    scans: dict[str, dict[str, _File]] = field(default_factory=dict)
    # What the last build wrote: scan id -> (series description, the file names its catalog lists). XNAT's prearchive
    # scan/resource/file listings and the archiver read the session XML and catalogs, not the folder, so files that
    # arrive after a build (the row set back to RECEIVING) stay invisible there until the next build.
    catalog: dict[str, _BuiltScan] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)
    # Imports writing to the row now: PrearcUtils.lockFile's per-file locks (CACHE_DIR/prearc_locks/P/TS/FOLDER), which
    # SessionXMLRebuilder checks through PrearcUtils.isSessionReceiving before an idle build.
    receiving: int = 0

    @property
    def project_label(self) -> str:
        return self.project or UNASSIGNED

    @property
    def key(self) -> Key:
        return (self.project_label, self.timestamp, self.folder)

    @property
    def url(self) -> str:
        return f"/prearchive/projects/{self.project_label}/{self.timestamp}/{self.folder}"

    @property
    def modality(self) -> str:
        for files in (self.catalogued() if self.built else self.scans).values():
            for item in files.values():
                return item.dicom.modality
        return ""

    def catalogued(self) -> dict[str, dict[str, _File]]:
        """The files the last build catalogued that are still on disk (CatalogUtils.getFile skips missing ones)."""
        found: dict[str, dict[str, _File]] = {}
        for scan_id, built in self.catalog.items():
            files = self.scans.get(scan_id, {})
            present = {name: files[name] for name in built.names if name in files}
            if present:
                found[scan_id] = present
        return found

    def note(self, message: str) -> None:
        self.log.append(f"{_java_timestamp(_now())} {message}")

    def as_dict(self) -> dict[str, str]:
        return {
            "project": self.project_label,
            "timestamp": self.timestamp,
            "lastmod": _java_timestamp(self.lastmod),
            "uploaded": _java_timestamp(self.uploaded),
            "scan_date": _java_timestamp(self.scan_datetime),
            "scan_time": self.scan_time,
            "subject": self.subject,
            "folderName": self.folder,
            "name": self.name,
            "tag": self.tag,
            "status": self.status,
            "url": self.url,
            "autoarchive": self.autoarchive,
            "prevent_anon": self.prevent_anon,
            "prevent_auto_commit": self.prevent_auto_commit,
            "SOURCE": self.source,
            "VISIT": self.visit,
            "PROTOCOL": self.protocol,
            "TIMEZONE": self.timezone,
        }


@dataclass
class ScanRecord:
    """One archived scan: `files` maps file name -> SOP Instance UID."""

    id: str
    series_uid: str
    type: str
    xsi_type: str
    files: dict[str, str]


@dataclass
class ExperimentRecord:
    """One archived imaging session (a snapshot; changing it changes nothing on the server)."""

    project: str
    subject: str
    label: str
    id: str
    study_uid: str
    xsi_type: str
    scans: dict[str, ScanRecord]


@dataclass
class _Scan:
    id: str
    series_uid: str
    type: str
    xsi_type: str
    resource_id: int  # the DICOM resource's xnat_abstractresource_id
    files: dict[str, _File] = field(default_factory=dict)  # the DICOM catalog's entries: URI (file name) -> file
    extras: dict[str, _ExtraResource] = field(default_factory=dict)  # `extra_scan_resources`: label -> resource


@dataclass
class _ExtraResource:
    """A non-DICOM scan resource (NIFTI, SNAPSHOTS, BIDS...), as pipelines and container services add them."""

    label: str
    resource_id: int
    format: str
    content: str
    files: dict[str, bytes]


@dataclass
class _Experiment:
    id: str
    project: str
    subject: str
    label: str
    study_uid: str
    xsi_type: str
    modality: str
    date: str
    inserted: datetime
    scans: dict[str, _Scan] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"/data/archive/projects/{self.project}/subjects/{self.subject}/experiments/{self.label}"

    def record(self) -> ExperimentRecord:
        scans = {
            scan_id: ScanRecord(
                scan.id, scan.series_uid, scan.type, scan.xsi_type, {n: f.dicom.sop_uid for n, f in scan.files.items()}
            )
            for scan_id, scan in self.scans.items()
        }
        return ExperimentRecord(self.project, self.subject, self.label, self.id, self.study_uid, self.xsi_type, scans)


@dataclass
class _AnonScript:
    """A DicomEdit anonymisation script (config tool `anon`): site-wide (path `script`) or a project's."""

    script: str
    enabled: bool
    fails: bool
    version: int


@dataclass(frozen=True)
class _Drop:
    """A rule that drops objects silently: `predicate(sop_instance_uid, series_instance_uid, series_description)`."""

    predicate: Callable[[str, str, str], bool]
    stage: str  # "filter" (series import filter) or "anonymization" (site-wide DicomEdit reject)


@dataclass
class _Subject:
    id: str
    project: str
    label: str


@dataclass
class _ImportContext:
    """What one import request says about routing and the rows it creates (§3.3)."""

    user: _User
    project: str | None = None
    subject: str | None = None
    label: str | None = None
    timestamp: str | None = None
    folder: str | None = None
    rename: bool = False
    prevent_anon: bool = False
    prevent_auto_commit: bool = False
    source: str = ""
    visit: str = ""
    protocol: str = ""
    timezone: str = ""
    overwrite_files: bool = False
    new_rows_only: bool = False  # SI: every upload is a new prearchive folder
    created: dict[tuple[str | None, str, str], Key] = field(default_factory=dict)
    pace: float = 0.0  # `proxy_timeout_next`: seconds each stored entry takes to arrive (its file lock held)
    locked: list[_Row] = field(default_factory=list)  # rows whose `receiving` this import holds


@dataclass(frozen=True)
class _ArchiveOptions:
    """The archiver's flags (§6.3): relabels plus overrideExceptions / allowSessionMerge / overwriteFiles."""

    project: str | None = None
    subject: str | None = None
    label: str | None = None
    override_exceptions: bool = False
    allow_merge: bool = True
    overwrite_files: bool = False


@dataclass
class _Config:
    version: str
    site_id: str
    idle_build_seconds: float
    rebuild_repeat_seconds: float
    session_timeout_seconds: float
    archive_timeout_seconds: float
    operation_seconds: float
    use_sop_instance_uid: bool = True
    token_lifetime_seconds: float = 2 * 24 * 3600.0
    # Site preferences (libs/xdat/.../preferences/SiteConfigPreferences.java): maxFailedLogins 20,
    # maxFailedLoginsLockoutDuration "1 hour", passwordExpirationInterval "1 year" (None = expiry disabled here),
    # requireLogin true; `context_path` is the servlet context the webapp is deployed under ("" = ROOT).
    max_failed_logins: int = 20
    lockout_seconds: float = 3600.0
    password_expiration_seconds: float | None = None
    require_login: bool = True
    context_path: str = ""
    lastmod_refresh_seconds: float = 15.0
    extra_scan_resources: tuple[str, ...] = ()

    @property
    def version_numbers(self) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", self.version)[:3])

    @property
    def modern(self) -> bool:
        """≥1.8.10: DICOM-zip default, `project`/`dest`/`action=commit` in DICOM-zip, nested archives (§0)."""
        return self.version_numbers >= (1, 8, 10)

    @property
    def editable_projects_cached(self) -> bool:
        """≥1.8.9: `permissions=` project lists come from DefaultGroupsAndPermissionsCache (XNAT-7845, b30a31bc9)."""
        return self.version_numbers >= (1, 8, 9)


class _Store:
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

    def next_serial(self) -> int:
        with self.lock:
            self._serial += 1
            return self._serial

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

    # -- authentication -----------------------------------------------------------------------------------------

    def check_password(self, username: str, password: str, *, tokens: bool = True) -> _User | None:
        """One login attempt through Spring's provider chain (xnat-web security/XnatProviderManager.authenticate).

        XnatProviderManager.retrieveAuthMethod (lines 130-161) sends a known username to the localdb provider and an
        unknown UUID-shaped one to the alias-token provider. A localdb failure of any kind (bad password, locked,
        disabled, unverified) is published as a failed attempt (XnatAuthenticationEventPublisher.FailedAttemptsManager
        .addFailedLoginAttempt): the count goes up even while locked, and reaching exactly `maxFailedLogins` sets the
        lockout time (libs/xdat HibernateXdatUserAuthService.addFailedLoginAttempt:110-126). While locked
        (XDATUser.isAccountNonLocked: lockout time set) even the right password fails
        (XnatDatabaseAuthenticationProvider PreAuthenticationChecks: LockedException). A success clears the count
        (FailedAttemptsManager.clearCount).
        ResetFailedLogins (hourly, `0 0 * * * *`) unlocks accounts whose lockout is older than
        `maxFailedLoginsLockoutDuration`; the stand-in unlocks exactly `lockout_seconds` after the lockout (real XNAT:
        up to an hour later). Failed token logins count nowhere (no xhbm_xdat_user_auth row for an alias).
        """
        with self.lock:
            user = self.users.get(username)
            if user is None:
                token_login = tokens and _UUID_RE.fullmatch(username) is not None
                return self._token_login(username, password) if token_login else None
            self._unlock_if_due(user)
            ok = (
                user.locked_at is None
                # PreAuthenticationChecks: disabled accounts fail unless disabled for inactivity (then the expired
                # password filter answers 302 InactiveAccount.vm instead, see `_Api._password_filter`).
                and (user.enabled or user.inactive)
                # additionalAuthenticationChecks:178 (emailVerification defaults to true): unverified accounts fail.
                and (user.verified or not user.enabled)
                and _same_secret(user.password, password)
            )
            if ok:
                if self.config.max_failed_logins > 0:
                    user.failed_logins = 0
                return user
            if self.config.max_failed_logins > 0:
                user.failed_logins += 1
                if user.failed_logins == self.config.max_failed_logins:
                    user.locked_at = time.time()
        return None

    def _token_login(self, alias: str, secret: str) -> _User | None:
        """security/alias/AliasTokenAuthenticationProvider: the token must still exist (the hourly sweep
        ClearExpiredAliasTokens deletes tokens created more than `aliasTokenTimeout` ago, libs/xdat
        AliasTokenDAO.findByExpired; nothing else checks the expiry), the secret must match, and its user must pass
        Users.validateUserLogin (enabled, verified, not locked: AliasTokenAuthenticationProvider
        .additionalAuthenticationChecks)."""
        token = self.live_token(alias)
        if token is None or not _same_secret(token.secret, secret):
            return None
        user = self.users.get(token.username)
        if user is None:
            return None
        self._unlock_if_due(user)
        if not user.enabled or not user.verified or user.locked_at is not None:
            return None
        return user

    def live_token(self, alias: str) -> _Token | None:
        """A token the sweep has not removed; the stand-in sweeps continuously (XNAT: hourly, so a real token may
        outlive its `estimatedExpirationTime` by up to an hour, never less)."""
        with self.lock:
            token = self.tokens.get(alias)
            if token is not None and time.time() >= token.expires:
                del self.tokens[alias]
                return None
            return token

    def _unlock_if_due(self, user: _User) -> None:
        """security/ResetFailedLogins.java QUERY: count >= max and lockout_time < now - duration -> 0, unlocked."""
        if (
            user.locked_at is not None
            and user.failed_logins >= self.config.max_failed_logins
            and time.time() - user.locked_at >= self.config.lockout_seconds
        ):
            user.failed_logins, user.locked_at = 0, None

    def password_expired(self, user: _User) -> bool:
        """XnatExpiredPasswordFilter.isPasswordExpired: `now() - password_updated > passwordExpirationInterval`."""
        if user.password_expired:
            return True
        limit = self.config.password_expiration_seconds
        return limit is not None and time.time() - user.password_updated > limit

    def live_session(self, session_id: str | None) -> _HttpSession | None:
        if not session_id:
            return None
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                return None
            if time.monotonic() - session.last_access > self.config.session_timeout_seconds:
                del self.sessions[session_id]
                return None
            session.last_access = time.monotonic()
            return session

    def new_session(self, user: _User) -> _HttpSession:
        session = _HttpSession(uuid.uuid4().hex.upper(), user.username, time.monotonic())  # 32 upper-case hex
        with self.lock:
            self.sessions[session.id] = session
        return session

    def authenticate(
        self, authorization: str | None, session_id: str | None
    ) -> tuple[_User, _HttpSession, bool] | None:
        """(user, HTTP session, session is new) or None (bad Basic credentials, or no live session).

        security/XnatBasicAuthenticationFilter.authenticationIsRequired (lines 104-129): Basic credentials are not
        checked at all when the session is already authenticated as that user (or as the user of that alias token), so
        a wrong password next to a live cookie of the same user passes; for another user they are checked.
        """
        session = self.live_session(session_id)
        if authorization:
            credentials = _basic_credentials(authorization)
            if credentials is not None and session is not None:
                username = credentials[0]
                with self.lock:
                    token = self.tokens.get(username) if username not in self.users else None
                    user = self.users.get(session.username)
                if user is not None and session.username in (username, token.username if token else None):
                    return user, session, False
            user = self.check_password(*credentials) if credentials else None
            if user is None:
                return None
            if session is not None and session.username == user.username:
                return user, session, False
            return user, self.new_session(user), True
        if session is None:
            return None
        with self.lock:
            user = self.users.get(session.username)
        return (user, session, False) if user else None

    def issue_token(self, username: str) -> _Token:
        now = time.time()
        token = _Token(
            str(uuid.uuid4()), secrets.token_urlsafe(32), username, now, now + self.config.token_lifetime_seconds, 0
        )
        token.serial = self.next_serial()
        with self.lock:
            self.tokens[token.alias] = token
        return token

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

    def _merge(self, row: _Row, options: _ArchiveOptions) -> str:
        if not row.built:  # §5.2: no session XML yet -> ERROR [INF]
            raise _ArchiveError("Unable to load the session XML: the session has not been built.", conflict=False)
        project_id = options.project or row.project
        if project_id is None:
            raise _ArchiveError("Cannot archive sessions from the Unassigned folder.", conflict=False)
        label = options.label or row.name or row.folder
        subject = options.subject or row.subject
        if not subject:
            raise _ArchiveError("Unable to identify the subject of the session.", conflict=False)
        xsi_type = _SESSION_TYPES.get(row.modality, "xnat:otherDicomSessionData")
        anon = self.project_anon.get(project_id)
        if anon is not None and anon.enabled and anon.fails and row.prevent_anon != "true":
            # The project script runs at archive (MergePrearcToArchiveSession.java:55 -> PrearcSessionAnonymizer ->
            # ProjectAnonymizer); its failure fails the archive (row ERROR). The message is [INF].
            raise _ArchiveError(f"Anonymization failed for project {project_id}: the DicomEdit script failed.",
                                conflict=False)  # fmt: skip
        existing = self.experiments.get((project_id, label))
        if existing is None:
            existing = _Experiment(
                f"{self.config.site_id}_E{self.next_serial():05d}", project_id, subject, label, row.tag, xsi_type,
                row.modality, row.scan_datetime.strftime("%Y-%m-%d") if row.scan_datetime else "", _now(),
            )  # fmt: skip
            plan = [(scan_id, files) for scan_id, files in row.catalogued().items()]
        else:
            self._check_session(existing, row, subject, xsi_type, options)
            plan = self._plan_scans(existing, row, options)
        # Every catalog is merged before anything moves (MergeSessionsA.call: mergeSessions, then the directories),
        # so a conflict leaves the archive as it was.
        merged = [
            (scan_id, files, self._merge_catalog(existing.scans[scan_id].files, files) if scan_id in existing.scans
             else dict(files))
            for scan_id, files in plan
        ]  # fmt: skip
        self._ensure_subject(project_id, subject)
        self.experiments[(project_id, label)] = existing
        for scan_id, files, entries in merged:
            first = next(iter(files.values())).dicom
            scan = existing.scans.get(scan_id)
            if scan is None:
                scan = _Scan(
                    scan_id,
                    first.series_uid,
                    first.series_description,
                    _SCAN_TYPES.get(first.modality, "xnat:otherDicomScanData"),
                    self.next_serial(),
                )
                scan.extras = {
                    extra: _extra_resource(extra, self.next_serial(), scan_id, first.series_description)
                    for extra in self.config.extra_scan_resources
                }
                existing.scans[scan_id] = scan
            scan.files = entries
        return existing.uri

    def _merge_catalog(self, existing: dict[str, _File], incoming: dict[str, _File]) -> dict[str, _File]:
        """`MergeCatCatalog.merge` of an incoming DICOM catalog into an existing one; the new entries (name -> file).

        helpers/merge/MergeCatCatalog.java: each incoming entry is matched by SOP Instance UID when the site
        preference `useSopInstanceUidToUniquelyIdentifyDicom` is on (libs/xdat SiteConfigPreferences: default true),
        else (or when no UID matches) by URI, i.e. file name (`locateExistingEntry`). No match: added. A match is
        overwritten (the archiver passes overwrite = allowSessionMerge, true once it got here); when it was found
        under another name, that older file is removed (`handleFilenameChange`). With the UID preference on, an
        incoming file whose name is taken by an entry with another UID is a conflict (`throwForDicomUidConflict`),
        which MergePrearcToArchiveSession turns into a 409 ClientException (row CONFLICT).
        """
        by_uid = self.config.use_sop_instance_uid
        entries = dict(existing)
        first_with_uid: dict[str, str] = {}  # CatalogUtils.getDCMEntryByUID finds the first entry with the UID
        for entry_name, entry in entries.items():
            first_with_uid.setdefault(entry.dicom.sop_uid, entry_name)
        for name, item in incoming.items():
            uid = item.dicom.sop_uid
            found = first_with_uid.get(uid) if by_uid and uid else None
            if found is None and name in entries:
                found = name
            if found is None:
                entries[name] = item
                first_with_uid.setdefault(uid, name)
                continue
            if by_uid and name in entries and entries[name].dicom.sop_uid != uid:
                raise _ArchiveError(
                    "A DICOM file with the same name but different UID already exists. "
                    "There is no way to override this conflict, you will need to fix your data.",
                    conflict=True,
                )
            if found != name:
                del entries[found]
            entries[name] = item
            if by_uid:
                first_with_uid[uid] = name
        return entries

    @staticmethod
    def _check_session(existing: _Experiment, row: _Row, subject: str, xsi_type: str, options: _ArchiveOptions) -> None:
        """The session-level rows of the §6.3 merge matrix, in PrearcSessionArchiver.checkForConflicts' order
        (archive/PrearcSessionArchiver.java:358-392 at 4fb6bc14, :353-387 at d3a896206): PRE_EXISTS, modality,
        subject, UID. The existing session is found by label across the whole project (GetExptByProjectIdentifier,
        :178), so a label another subject's session uses fails here, at archive, with 409 (CONFLICT row); MODALITY_MOD
        has two spaces after "process." in the source."""
        if not options.allow_merge:
            raise _ArchiveError("Session already exists, retry with overwrite enabled", conflict=True)
        if existing.xsi_type != xsi_type:
            raise _ArchiveError(
                "Invalid modification of session modality via archive process.  Data may require a manual merge.",
                conflict=True,
            )
        if existing.subject != subject:
            raise _ArchiveError(
                "Invalid modification of session subject via archive process.: "
                f"{existing.label} Already Exists for another Subject",
                conflict=True,
            )
        if existing.study_uid != row.tag and not options.override_exceptions:
            raise _ArchiveError("Invalid modification of session UID via archive process.", conflict=True)

    @staticmethod
    def _plan_scans(existing: _Experiment, row: _Row, options: _ArchiveOptions) -> list[tuple[str, dict[str, _File]]]:
        """The scan-level rows of the §6.3 matrix: where each incoming scan goes, or the conflict.

        Without overwriteFiles, MergeSessionsA.checkForConflict (helpers/merge/MergeSessionsA.java:80-110) refuses
        any overlap with the existing session: a file path that exists already -> "Session already exists with
        matching files."; else an incoming entry whose UID or URI a matching scan's catalog has already
        (SessionOverwriteCheck.detectOverwrite) -> "Session already exists with the same resources.".
        """
        by_uid = {scan.series_uid: scan.id for scan in existing.scans.values()}
        taken = set(existing.scans)
        plan: list[tuple[str, dict[str, _File]]] = []
        same_files = same_entries = False
        for scan_id, files in row.catalogued().items():
            series_uid = next(iter(files.values())).dicom.series_uid
            target = scan_id
            other = by_uid.get(series_uid)
            if other is not None and other != scan_id:
                if not options.override_exceptions:
                    raise _ArchiveError(
                        f"Session already contains a scan with the same UID, but a different number ({other}).",
                        conflict=True,
                    )
                target = other
            elif scan_id in existing.scans and existing.scans[scan_id].series_uid != series_uid:
                # "scan IDs corrected, merged" (§6.3); the corrected ID's form is [INF].
                target = next(f"{scan_id}-{n}" for n in range(1, 10_000) if f"{scan_id}-{n}" not in taken)
            taken.add(target)
            if target in existing.scans:
                there = existing.scans[target].files
                same_files = same_files or bool(set(files) & set(there))
                uids = {item.dicom.sop_uid for item in there.values()}
                same_entries = same_entries or any(item.dicom.sop_uid in uids for item in files.values())
            plan.append((target, files))
        if not options.overwrite_files and same_files:
            raise _ArchiveError("Session already exists with matching files.", conflict=True)
        if not options.overwrite_files and same_entries:
            raise _ArchiveError("Session already exists with the same resources.", conflict=True)
        return plan

    def subject_id(self, project_id: str, label: str) -> str:
        with self.lock:
            return self._ensure_subject(project_id, label).id

    def _ensure_subject(self, project_id: str, label: str) -> _Subject:
        subject = self.subjects.get((project_id, label))
        if subject is None:  # §6.1: the subject is created if missing
            subject = _Subject(f"{self.config.site_id}_S{self.next_serial():05d}", project_id, label)
            self.subjects[(project_id, label)] = subject
        return subject

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


# --------------------------------------------------------------------------------------------------------------
# Requests and routing
# --------------------------------------------------------------------------------------------------------------


class _Params:
    """Query (and form) parameters: case-sensitive keys, repeatable values."""

    def __init__(self, values: dict[str, list[str]] | None = None) -> None:
        self._values: dict[str, list[str]] = {key: list(v) for key, v in (values or {}).items()}

    def get(self, key: str) -> str | None:
        values = self._values.get(key)
        return values[0] if values else None

    def all(self, key: str) -> list[str]:
        return list(self._values.get(key, []))

    def flag(self, key: str) -> bool:
        return (self.get(key) or "").strip().lower() == "true"

    def add(self, key: str, value: str) -> None:
        self._values.setdefault(key, []).append(value)

    def set(self, key: str, value: str) -> None:
        self._values[key] = [value]

    def merge(self, values: dict[str, list[str]]) -> None:
        for key, items in values.items():
            self._values.setdefault(key, []).extend(items)


@dataclass
class _Request:
    method: str
    target: str
    path: str
    params: _Params
    headers: Message
    body: bytes
    user: _User | None = None
    session: _HttpSession | None = None
    new_session: bool = False
    groups: dict[str, str] = field(default_factory=dict)
    cut: bool = False  # the body is what was read before the connection was reset (`reset_next`)
    import_seconds: float = 0.0  # `proxy_timeout_next`: how long the upload takes to arrive

    @property
    def content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()

    @property
    def agent(self) -> _User:
        if self.user is None:  # every data route is authenticated before its handler runs
            raise _HttpError(401, "Unauthorized")
        return self.user

    def fmt(self, default: str = "json") -> str:
        return (self.params.get("format") or default).strip().lower()

    def group(self, name: str) -> str:
        return unquote(self.groups[name])


Handler = Callable[[_Request], _Response]


@dataclass(frozen=True)
class _Route:
    methods: frozenset[str]
    pattern: re.Pattern[str]
    handler: Handler


@dataclass
class _Fault:
    method: str
    prefix: str
    status: int
    remaining: int
    body: str | None
    html: bool
    after_processing: bool
    delay: float

    def response(self) -> _Response:
        message = self.body if self.body is not None else f"{self.status} {_phrase(self.status)}"
        if self.html:
            return _Response(self.status, _status_page(self.status, message), "text/html;charset=UTF-8")
        return _Response(self.status, message.encode(), "text/plain;charset=UTF-8")


@dataclass
class _Reset:
    method: str
    prefix: str
    remaining: int
    after_bytes: int | None


@dataclass
class _Truncation:
    method: str
    prefix: str
    remaining: int
    keep_bytes: int | None


@dataclass
class _ProxyTimeout:
    method: str
    prefix: str
    remaining: int
    after_seconds: float
    import_seconds: float


# nginx's own 504 page (ngx_http_special_response.c: ngx_http_error_504_page + ngx_http_error_tail).
_NGINX_504 = (
    b"<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
    b"<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


def _normalise(path: str) -> str:
    """`/REST` is `/data`; `/data/archive/X` is `/data/X` for every archive URI (§1.1; XNATApplication.attachArchiveURI
    attaches `/projects...`, `/experiments...` and `/subjects...` a second time under `/archive`)."""
    if path == "/REST" or path.startswith("/REST/"):
        path = "/data" + path[5:]
    for alias in ("/data/archive/projects", "/data/archive/experiments", "/data/archive/subjects"):
        if path == alias or path.startswith(alias + "/"):
            path = "/data" + path[len("/data/archive") :]
    return path.rstrip("/") or "/"


def _is_data_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in ("/data", "/xapi", "/fs"))


@dataclass(frozen=True)
class _Dest:
    kind: str  # "prearchive" or "archive"
    project: str | None = None
    timestamp: str | None = None
    folder: str | None = None
    subject: str | None = None
    label: str | None = None


def _parse_dest(dest: str) -> _Dest | None:
    """§3.3 `dest` forms, with or without `/data`."""
    path = dest.split("?", 1)[0]
    for prefix in ("/data", "/REST"):
        if path.startswith(prefix + "/"):
            path = path[len(prefix) :]
    parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
    if parts[:1] == ["prearchive"] and (len(parts) == 1 or (parts[1] == "projects" and 3 <= len(parts) <= 5)):
        values = [*parts[2:], None, None, None]
        return _Dest("prearchive", values[0], values[1], values[2])
    if parts[:2] != ["archive", "projects"] or len(parts) not in (3, 5, 7):
        return None
    if (len(parts) >= 5 and parts[3] != "subjects") or (len(parts) == 7 and parts[5] != "experiments"):
        return None
    values = [*parts[2:], None, None, None, None]
    return _Dest("archive", project=values[0], subject=values[2], label=values[4])


def _prearc_key(src: str) -> Key | None:
    match = _PREARC_URI.match(src.split("?", 1)[0])
    return (unquote(match.group(1)), unquote(match.group(2)), unquote(match.group(3))) if match else None


_PA = r"/data/prearchive/projects/(?P<project>[^/]+)/(?P<timestamp>[^/]+)/(?P<folder>[^/]+)"
_EXP = r"/data/projects/(?P<project>[^/]+)(?:/subjects/(?P<subject>[^/]+))?/experiments/(?P<experiment>[^/]+)"
_EXP_BY_ID = r"/data/experiments/(?P<experiment_id>[^/]+)"  # XNATApplication: /experiments/{EXPT_ID|ASSESSED_ID}/...


class _Api:
    """The HTTP behaviour: authentication, the routing table and one small handler per resource."""

    def __init__(self, store: _Store, config: _Config, jobs: ThreadPoolExecutor, site_url: Callable[[], str]) -> None:
        self.store = store
        self.config = config
        self.jobs = jobs
        self.site_url = site_url
        self.faults: list[_Fault] = []
        self.resets: list[_Reset] = []  # connections cut mid-upload
        self.truncations: list[_Truncation] = []  # answers cut short by a proxy
        self.proxy_timeouts: list[_ProxyTimeout] = []  # a proxy's 504 while XNAT goes on importing
        self.background: list[threading.Thread] = []  # imports still running after their 504
        self.stopping = threading.Event()
        self.log: list[tuple[str, str, int]] = []
        self._log_lock = threading.Lock()
        get, post, put, delete = "GET", "POST", "PUT", "DELETE"
        table: list[tuple[str, str, Handler]] = [
            (get, r"/", self.root),
            (get, r"/app(?:/.*)?", self.login_page),
            ("GET POST PUT DELETE", r"/data/services/auth", self.login),
            ("GET POST", r"/data/JSESSION", self.jsession),
            (delete, r"/data/JSESSION", self.logout),
            (get, r"/data/auth", self.whoami),
            (get, r"/data/services/tokens/issue", self.token_issue),
            (get, r"/data/services/tokens/issue/user/(?P<user>[^/]+)", self.token_issue),
            (get, r"/data/services/tokens/show", self.token_show),
            (get, r"/data/services/tokens/show/user/(?P<user>[^/]+)", self.token_show),
            (get, r"/data/services/tokens/validate/(?P<alias>[^/]+)/(?P<secret>[^/]+)", self.token_validate),
            (get, r"/data/services/tokens/invalidate/(?P<alias>[^/]+)", self.token_invalidate),
            (get, r"/xapi/siteConfig/buildInfo", self.build_info),
            (get, r"/xapi/siteConfig/buildInfo/(?P<property>[^/]+)", self.build_property),
            (get, r"/xapi/schemas", self.schemas),
            (get, r"/xapi/schemas/(?P<schema>[A-Za-z0-9_/-]+)", self.schema),
            (get, r"/data/search/elements(?:/(?P<element>[^/]+))?", self.search_elements),
            (get, r"/data/projects", self.projects),
            (get, r"/data/projects/(?P<project>[^/]+)", self.project),
            (get, r"/data/projects/(?P<project>[^/]+)/prearchive_code", self.prearchive_code),
            (put, r"/data/projects/(?P<project>[^/]+)/prearchive_code/(?P<code>[^/]+)", self.set_prearchive_code),
            (get, r"/data/projects/(?P<project>[^/]+)/subjects", self.subjects),
            (get, r"/data/projects/(?P<project>[^/]+)/subjects/(?P<subject>[^/]+)", self.subject),
            (get, r"/data/projects/(?P<project>[^/]+)(?:/subjects/(?P<subject>[^/]+))?/experiments", self.experiments),
            *[
                route
                for experiment in (_EXP, _EXP_BY_ID)
                for scan in [experiment + r"/scans/(?P<scan>[^/]+)"]
                for route in (
                    (get, experiment, self.experiment),
                    (get, experiment + r"/scans", self.scans),
                    (get, scan, self.scan),
                    (get, scan + r"/resources", self.scan_resources),
                    (get, scan + r"/resources/(?P<resource>[^/]+)", self.scan_catalog),
                    (get, scan + r"/resources/(?P<resource>[^/]+)/files", self.scan_files),
                    (get, scan + r"/resources/(?P<resource>[^/]+)/files/(?P<name>.+)", self.scan_file),
                )
            ],
            (post, r"/data/services/import", self.import_),
            (post, r"/data/services/archive", self.archive),
            (post, r"/data/services/prearchive/(?P<action>delete|rebuild|move)", self.batch),
            ("GET PUT", r"/data/prearchive", self.prearchive),
            (get, r"/data/prearchive/projects", self.prearchive),
            (get, r"/data/prearchive/projects/(?P<projects>[^/]+)", self.prearchive_projects),
            (get, _PA, self.session_get),
            (post, _PA, self.session_post),
            (delete, _PA, self.session_delete),
            (get, _PA + r"/scans", self.session_scans),
            (get, _PA + r"/scans/(?P<scan>[^/]+)/resources", self.session_resources),
            (get, _PA + r"/scans/(?P<scan>[^/]+)/resources/(?P<resource>[^/]+)/files", self.session_files),
            (get, _PA + r"/scans/(?P<scan>[^/]+)/resources/(?P<resource>[^/]+)/files/(?P<name>.+)", self.session_file),
            (get, _PA + r"/logs(?:/(?P<last>last))?", self.session_logs),
            (get, r"/xapi/anonymize/site", self.anon_site),
            (get, r"/xapi/anonymize/site/enabled", self.anon_site_enabled),
            (get, r"/xapi/anonymize/projects/(?P<project>[^/]+)", self.anon_project),
            (get, r"/xapi/anonymize/projects/(?P<project>[^/]+)/enabled", self.anon_project_enabled),
            (get, r"/data/config/anon/script", self.anon_config),
            (get, r"/data/projects/(?P<project>[^/]+)/config/anon/projects/(?P<target>[^/]+)", self.anon_config),
        ]
        self.routes = [
            _Route(frozenset(methods.split()), re.compile(f"^{pattern}$"), handler)
            for methods, pattern, handler in table
        ]

    # -- plumbing -----------------------------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Message, body: bytes) -> _Response:
        """Answer one request: faults first (§10 proxies), then authentication, routing and the handler."""
        path = urlsplit(target).path
        proxy = self._take_proxy_timeout(method, path)
        if proxy is not None:
            response = self._proxy_timeout(proxy, method, target, headers, body)
            with self._log_lock:
                self.log.append((method, target, response.status))
            return response
        fault = self._take_fault(method, path)
        if fault is not None and not fault.after_processing:
            time.sleep(fault.delay)
            response = fault.response()
        else:
            response = self._process(method, target, headers, body)
            if fault is not None:
                time.sleep(fault.delay)
                response = fault.response()
        truncation = self._take_truncation(method, path)
        if truncation is not None:  # the real status and headers, the body cut (Content-Length follows the body)
            keep = len(response.body) // 2 if truncation.keep_bytes is None else truncation.keep_bytes
            response.body = response.body[: max(keep, 0)]
        with self._log_lock:
            self.log.append((method, self.config.context_path + target, response.status))
        return response

    def below_context(self, target: str) -> str | None:
        """The request target below the context path (`context_path`), or None when it lies outside it. Every route,
        fault prefix and `_normalise`d path is relative to the context path; `requests_log` keeps the target as
        sent."""
        context = self.config.context_path
        if not context:
            return target
        if target == context or target.startswith((context + "/", context + "?")):
            rest = target[len(context) :]
            return rest if rest.startswith("/") else "/" + rest
        return None

    def take_reset(self, method: str, target: str) -> _Reset | None:
        """The reset that applies to this request, if any (counted and logged with status 0)."""
        path = urlsplit(target).path
        with self._log_lock:
            for reset in self.resets:
                if reset.remaining > 0 and reset.method == method.upper() and path.startswith(reset.prefix):
                    reset.remaining -= 1
                    self.log.append((method, self.config.context_path + target, 0))
                    return reset
        return None

    @staticmethod
    def streams_body(method: str, target: str) -> bool:
        """Whether XNAT consumes this request's body as it arrives: only the import service's in-body uploads."""
        return method.upper() == "POST" and _normalise(urlsplit(target).path) == "/data/services/import"

    def process_cut(self, method: str, target: str, headers: Message, body: bytes) -> None:
        """What XNAT did with a request whose connection was reset after `body` arrived (no answer reaches anyone).

        Only a raw DICOM-zip upload is processed as it streams (archive/DicomZipImporter.java importZipFile: a
        ZipInputStream over the request entity, each entry handed to GradualDicomImporter.call, which stores it at
        once): the entries read whole before the cut are stored exactly as in a complete upload, then reading fails
        ("unable to read data from file"), so the request ends before the >=1.8.10 synchronous build and the rows stay
        RECEIVING for the idle builder. Everything else stores nothing: multipart bodies are parsed whole by
        commons-fileupload before the importer runs (restlet/resources/SecureResource.java:1273-1277), and SI and
        gradual-DICOM fail on the cut before a row is written [INF].
        """
        self._process(method, target, headers, body, cut=True)

    def _take_truncation(self, method: str, path: str) -> _Truncation | None:
        with self._log_lock:
            for truncation in self.truncations:
                if (
                    truncation.remaining > 0
                    and truncation.method == method.upper()
                    and path.startswith(truncation.prefix)
                ):
                    truncation.remaining -= 1
                    return truncation
        return None

    def _take_proxy_timeout(self, method: str, path: str) -> _ProxyTimeout | None:
        with self._log_lock:
            for proxy in self.proxy_timeouts:
                if proxy.remaining > 0 and proxy.method == method.upper() and path.startswith(proxy.prefix):
                    proxy.remaining -= 1
                    return proxy
        return None

    def _proxy_timeout(
        self, proxy: _ProxyTimeout, method: str, target: str, headers: Message, body: bytes
    ) -> _Response:
        """nginx's `proxy_read_timeout` while XNAT goes on: the request is processed in the background, its entries
        stored one by one over `import_seconds` (DicomZipImporter.importZipFile reads the request as a ZipInputStream
        and GradualDicomImporter.call stores each entry as it arrives), and the client gets nginx's 504 page after
        `after_seconds`, whatever XNAT does later."""

        def work() -> None:
            try:
                response = self._process(method, target, headers, body, import_seconds=proxy.import_seconds)
                LOG.info("import behind a proxy timeout ended with %s", response.status)
            except Exception:
                LOG.exception("import behind a proxy timeout failed")

        thread = threading.Thread(target=work, name="fake-xnat-slow-import", daemon=True)
        with self._log_lock:
            self.background = [t for t in self.background if t.is_alive()] + [thread]
        thread.start()
        self.stopping.wait(proxy.after_seconds)
        return _Response(504, _NGINX_504, "text/html")

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._log_lock:
            for fault in self.faults:
                if fault.remaining > 0 and fault.method == method.upper() and path.startswith(fault.prefix):
                    fault.remaining -= 1
                    return fault
        return None

    def _process(
        self, method: str, target: str, headers: Message, body: bytes, *, cut: bool = False, import_seconds: float = 0.0
    ) -> _Response:
        split = urlsplit(target)
        request = _Request(
            method,
            target,
            _normalise(split.path),
            _Params(parse_qs(split.query, keep_blank_values=True)),
            headers,
            body,
            cut=cut,
            import_seconds=import_seconds,
        )
        self._read_form(request)
        try:
            self._authenticate(request)
            route, groups = self._match(request)
            request.groups = groups
            if request.method == "GET":  # reads never wait, so they see one consistent state under the lock
                with self.store.lock:
                    response = route.handler(request)
            else:  # writes take the lock themselves, released while an operation "runs" (operation_seconds)
                response = route.handler(request)
        except _HttpError as error:
            response = error.response()
        except Exception:
            LOG.exception("fake XNAT failed on %s %s", method, target)
            response = _HttpError(500, "Internal Server Error").response()
        if request.session is not None:
            # Tomcat scopes JSESSIONID to the context path ("/" for ROOT); XnatExpiredPasswordFilter:35-36 sets
            # SESSION_EXPIRATION_TIME on contextPath + "/".
            context = self.config.context_path
            if request.new_session:
                response.headers.append(
                    ("Set-Cookie", f"JSESSIONID={request.session.id}; Path={context or '/'}; HttpOnly")
                )
            timeout_ms = int(self.config.session_timeout_seconds * 1000)
            response.headers.append(
                ("Set-Cookie", f'SESSION_EXPIRATION_TIME="{int(time.time() * 1000)},{timeout_ms}"; Path={context}/')
            )
        return response

    @staticmethod
    def _read_form(request: _Request) -> None:
        """Form bodies (and a JSON object body, §5.5) add to the query parameters; import bodies are files."""
        if not request.body or request.path == "/data/services/import":
            return
        if request.content_type == "application/x-www-form-urlencoded":
            request.params.merge(parse_qs(request.body.decode("utf-8", "replace"), keep_blank_values=True))
        elif request.content_type == "application/json" and request.path.startswith("/data/prearchive"):
            try:
                value = json.loads(request.body)
            except ValueError:
                return
            if isinstance(value, dict):
                request.params.merge({str(k): [str(v)] for k, v in value.items()})

    def _authenticate(self, request: _Request) -> None:
        """§2: Basic (password or alias token) or JSESSIONID; data paths need it (401, or 302 for browsers)."""
        authorization = request.headers.get("Authorization")
        result = self.store.authenticate(authorization, _cookie(request.headers, "JSESSIONID"))
        if result is not None:
            request.user, request.session, request.new_session = result
            self._password_filter(request)
            return
        credentials = _basic_credentials(authorization) if authorization else None
        if credentials is not None and credentials[0]:
            # security/XnatBasicAuthenticationFilter.doFilterInternal:75-84: failed Basic credentials end every request
            # (open URLs and guest sites included) with sendError(401, AdminUtils.GetLoginFailureMessage()): Tomcat's
            # page, no WWW-Authenticate header.
            raise _HttpError(401, _login_failure_message(self.config.max_failed_logins), tomcat=True)
        if not _is_data_path(request.path) or request.path == "/data/services/auth":
            return
        if request.path == "/xapi/siteConfig/buildInfo" and request.method == "GET":
            # An open URL (web/src/main/resources/META-INF/xnat/security/configured-urls.yaml `openUrls`;
            # XapiRequestMappingAspect.evaluate lets GETs of open URLs through): no login needed.
            return
        if not self.config.require_login:
            # requireLogin=false: UpdateSecurityFilterHandlerMethod.updateSecurityFilter maps `/**` to permitAll and
            # restlet/guard/XnatSecureGuard.authenticate:89 lets credential-less requests in, so no credentials or a
            # dead JSESSIONID are served as guest (protected resources then answer 403/empty lists, not 401).
            request.user = self.store.guest
            return
        if _INTERACTIVE_RE.fullmatch(request.headers.get("User-Agent") or ""):
            raise _HttpError(302, headers=[("Location", self.config.context_path + "/app/template/Login.vm")])
        raise _HttpError(
            401,
            "Full authentication is required to access this resource",
            headers=[("WWW-Authenticate", 'Basic realm="XNAT Protected Area"')],
            tomcat=True,
        )

    def _password_filter(self, request: _Request) -> None:
        """security/XnatExpiredPasswordFilter.doFilterInternal:126-166 (added right after the Basic filter,
        initialization/SecurityConfig.java:318), for every authenticated request, REST and Basic included: an account
        disabled for inactivity (it can still log in, see `_Store.check_password`) gets 302 to
        `{siteUrl}/app/template/InactiveAccount.vm`; an expired password 302 to
        `{siteUrl}/app/template/XDATScreen_UpdateUser.vm` (paths from SecurityConfig.expiredPasswordFilter:195-203;
        TurbineUtils.GetFullServerPath = the siteUrl preference, which includes any context path). A session once
        found not expired is never checked again (session attribute "expired"). The login/logout pages it exempts are
        /app pages this stand-in does not guard."""
        user, session = request.user, request.session
        if user is None or session is None or user is self.store.guest:
            return
        if not user.enabled:
            raise _HttpError(302, headers=[("Location", self.site_url() + "/app/template/InactiveAccount.vm")])
        if session.password_not_expired:
            return
        with self.store.lock:
            expired = self.store.password_expired(user)
        if expired:
            raise _HttpError(302, headers=[("Location", self.site_url() + "/app/template/XDATScreen_UpdateUser.vm")])
        session.password_not_expired = True

    def _match(self, request: _Request) -> tuple[_Route, dict[str, str]]:
        allowed: set[str] = set()
        for route in self.routes:
            match = route.pattern.match(request.path)
            if match is None:
                continue
            if request.method in route.methods:
                return route, {k: v for k, v in match.groupdict().items() if v is not None}
            allowed |= route.methods
        if allowed:
            raise _HttpError(405, "Method Not Allowed", headers=[("Allow", ", ".join(sorted(allowed)))])
        if _is_data_path(request.path):
            raise _HttpError(404, "The server has not found anything matching the request URI")
        raise _HttpError(404, f"The requested resource [{request.path}] is not available", tomcat=True)

    def _project(self, request: _Request, *, edit: bool = False) -> _Project:
        """The `{project}` of the path (ID or alias): 404 if unknown, 403 without read (or edit) rights."""
        name = request.group("project")
        project = self.store.project(name)
        if project is None:
            raise _HttpError(404, f"Unable to find project {name}")
        allowed = self.store.can_edit if edit else self.store.can_read
        if not allowed(request.agent, project):
            raise _HttpError(403, f"The current user does not have access to the requested project: {name}")
        return project

    # -- auth and bootstrap (§2, §8.1) ----------------------------------------------------------------------------

    def root(self, request: _Request) -> _Response:
        return _Response(302, headers=[("Location", self.config.context_path + "/app/template/Login.vm")])

    def login_page(self, request: _Request) -> _Response:
        page = "<!DOCTYPE html><html><head><title>XNAT</title></head><body><form>Login</form></body></html>"
        return _text(page, content_type="text/html;charset=UTF-8")

    def login(self, request: _Request) -> _Response:
        """`PUT`/`POST /data/services/auth` (open): 200 text body = new session id + cookie; 401 otherwise."""
        if request.method not in ("PUT", "POST"):
            raise _HttpError(405, "Method Not Allowed", headers=[("Allow", "POST, PUT")])
        username = request.params.get("username") or request.params.get("j_username") or ""
        password = request.params.get("password") or request.params.get("j_password") or ""
        # restlet/extensions/AuthenticationRestlet: XnatProviderManager.retrieveAuthMethod picks the alias-token
        # provider for an unknown UUID-shaped username, so a token logs in here too; any AuthenticationException (bad
        # password, locked, disabled, unverified) is fail(): 401 "Authentication failed.", counted as a failed login.
        user = self.store.check_password(username, password)
        if user is None:
            raise _HttpError(401, "Authentication failed.")
        request.user, request.session, request.new_session = user, self.store.new_session(user), True
        return _text(request.session.id)

    def jsession(self, request: _Request) -> _Response:
        if request.session is None:
            request.session, request.new_session = self.store.new_session(request.agent), True
        text = request.session.id
        if request.params.flag("CSRF"):
            text += f"; XNAT_CSRF={uuid.uuid5(uuid.NAMESPACE_OID, text)}"
        return _text(text)

    def logout(self, request: _Request) -> _Response:
        if request.session is not None:
            with self.store.lock:
                self.store.sessions.pop(request.session.id, None)
            request.session = None
        return _Response(200)

    def whoami(self, request: _Request) -> _Response:
        return _text(f"User '{request.agent.username}' is logged in")

    def _token_agent(self, request: _Request) -> _User:
        """restlet/services/AliasTokenRestlet constructor:88-98: the guest may not use tokens, non-admins only their
        own. Whoever is logged in may use it, however they logged in (Basic with an alias token included)."""
        user = request.agent
        username = request.group("user") if "user" in request.groups else user.username
        if user is self.store.guest or username.lower() == "guest":
            raise _HttpError(403, "The guest user can't request alias tokens")
        if username.lower() != user.username.lower() and not user.admin:
            raise _HttpError(403, "Non-admin users can only request operations on alias tokens for their own account")
        return user

    def _path_token(self, request: _Request) -> _Token:
        """AliasTokenRestlet constructor:63-86: `{TOKEN}` is an alias (UUID) or a numeric id; unknown -> 404."""
        name = request.group("alias")
        with self.store.lock:
            if _UUID_RE.fullmatch(name):
                token = self.store.live_token(name)
                if token is None:
                    raise _HttpError(404, f"Can't find an alias token with the alias {name}")
            else:
                token = next((t for t in self.store.tokens.values() if name.isdigit() and t.serial == int(name)), None)
                if token is None:
                    raise _HttpError(404, f"Can't find an alias token with the ID {name}")
        user = self._token_agent(request)
        if token.username.lower() != user.username.lower() and not user.admin:
            raise _HttpError(403, "Non-admin users can only request operations on alias tokens for their own account")
        return token

    def token_issue(self, request: _Request) -> _Response:
        """`GET /data/services/tokens/issue[/user/{USERNAME}]`: the AliasToken entity as JSON (libs/xdat
        entities/AliasToken.java getters + AbstractHibernateEntity id/enabled/created/timestamp/disabled, Dates as
        epoch ms). `estimatedExpirationTime` = issue time + `aliasTokenTimeout` (HibernateAliasTokenService
        .issueTokenForUser:93-110); `expired` is the @Transient isExpired() getter, serialized too; `validIPAddresses`
        is null for a token issued here (no addresses given) [INF: that Jackson writes nulls]."""
        self._token_agent(request)
        username = request.group("user") if "user" in request.groups else request.agent.username
        with self.store.lock:
            if username not in self.store.users:  # AliasTokenRestlet.represent:118-121: the user lookup fails -> 400
                raise _HttpError(400, f"An error occurred retrieving the user: {username}")
        return _json(_token_json(self.store.issue_token(username)))

    def token_show(self, request: _Request) -> _Response:
        """`GET /data/services/tokens/show[/user/{USERNAME}]`: the user's live tokens, each serialized as `issue`
        answers it (AliasTokenRestlet.represent OP_SHOW: findTokensForUser, an empty list when none; restlet
        XNATApplication.java:333 attaches /services/tokens/{OPERATION})."""
        self._token_agent(request)
        username = request.group("user") if "user" in request.groups else request.agent.username
        with self.store.lock:
            tokens = [t for t in self.store.tokens.values() if t.username.lower() == username.lower()]
        return _json([_token_json(token) for token in sorted(tokens, key=lambda t: t.serial)])

    def token_validate(self, request: _Request) -> _Response:
        """`{"valid": <username>}` or `{"valid": null}` (HibernateAliasTokenService.validateToken returns the user or
        null; AliasTokenRestlet.represent:137-149 puts it in a map as is)."""
        token = self._path_token(request)
        valid = _same_secret(token.secret, request.group("secret"))
        return _json({"valid": token.username if valid else None})

    def token_invalidate(self, request: _Request) -> _Response:
        token = self._path_token(request)
        with self.store.lock:
            self.store.tokens.pop(token.alias, None)
        return _json({"result": "OK"})

    def _build_properties(self) -> dict[str, str]:
        """xapi/rest/settings/SiteConfigApi.getBuildInfo -> XnatAppInfo.getSystemProperties: the MANIFEST.MF
        attributes, `version` = Implementation-Version (the release number, e.g. "1.8.10"), every value a string."""
        return {
            "version": self.config.version,
            "buildNumber": "fake",
            "buildDate": "Thu Jan 01 00:00:00 UTC 1970",
            "commit": "fake",
            "sha": "fake",
            "branch": "fake",
            "isDirty": "false",
            "timestamp": "0",
        }

    def build_info(self, request: _Request) -> _Response:
        """`GET /xapi/siteConfig/buildInfo` (open URL). `/data/version` does not exist in 1.8 (no such route in
        restlet/XNATApplication.java): it answers 404 and clients fall back to this."""
        return _json(self._build_properties())

    def build_property(self, request: _Request) -> _Response:
        """`GET /xapi/siteConfig/buildInfo/{property}` (SiteConfigApi.getBuildProperty): the bare string (a String
        return value goes through Spring's StringHttpMessageConverter: `1.8.10`, not `"1.8.10"`); not an open URL,
        so it needs a login [INF: the guest is refused like an anonymous request]; an unknown property is null: an
        empty 200 [INF]."""
        if request.user is None or request.user is self.store.guest:
            raise _HttpError(401, headers=[("WWW-Authenticate", 'Basic realm="XNAT Protected Area"')], tomcat=True)
        value = self._build_properties().get(request.group("property"), "")
        return _text(value, content_type="application/json")

    def schemas(self, request: _Request) -> _Response:
        return _json(["xnat"])  # one minimal schema: enough for xnatpy to build its session classes

    def schema(self, request: _Request) -> _Response:
        if request.group("schema") != "xnat":
            raise _HttpError(404, f"No schema named {request.group('schema')}")
        return _text(_XNAT_XSD, content_type="application/xml")

    def search_elements(self, request: _Request) -> _Response:
        if "element" in request.groups:
            return _table(["FIELD_ID", "HEADER", "SUMMARY", "TYPE", "REQUIRES_VALUE", "DESC"], [], request.fmt())
        return _table(["ELEMENT_NAME", "PLURAL", "SINGULAR", "COUNT"], [], request.fmt())

    # -- projects, subjects, experiments (§6, §7, §8) ------------------------------------------------------------

    def projects(self, request: _Request) -> _Response:
        permissions = request.params.get("permissions")
        if permissions is not None:
            return self._projects_by_permission(request, permissions)
        with self.store.lock:
            visible = [p for p in self.store.projects.values() if self.store.can_read(request.agent, p)]
        rows = [
            {
                "ID": p.id, "secondary_ID": p.id, "name": p.name, "description": "", "pi_firstname": "",
                "pi_lastname": "", "URI": f"/data/projects/{p.id}",
            }
            for p in visible
        ]  # fmt: skip
        return _table(
            ["ID", "secondary_ID", "name", "description", "pi_firstname", "pi_lastname", "URI"], rows, request.fmt()
        )

    def _projects_by_permission(self, request: _Request, permissions: str) -> _Response:
        """`GET /data/projects?permissions=read|edit|create|delete|active[&dataType=T]`: restlet/resources/
        ProjectListResource.PermissionsProjectHandler (chosen whenever `permissions` is present). Columns `id`,
        `secondary_id` (lower case), rows sorted by secondary_id. Every exception in the handler ends in
        ProjectListResource.represent's catch: a bare `setStatus(SERVER_ERROR_INTERNAL)`, i.e. Restlet's default 500
        page, no message (a blank or unknown `permissions` value included, on every version).

        ≤1.8.8 (ProjectListResource before XNAT-7845 b30a31bc9): without dataType a project is listed when
        UserHelperServiceI.hasEditAccessToSessionDataByTag (XDATUser.hasAccessTo: site admin or an editable project),
        whatever `permissions` says; with dataType, Permissions.can(user, dataType + "/project", id, permissions).
        ≥1.8.9 (d3a896206 has b30a31bc9): services/cache/DefaultGroupsAndPermissionsCache.getProjectsForDatatypeAction
        calls SchemaElement.GetElement(dataType) first, which throws ElementNotFoundException("NULL") for a missing
        dataType (GenericWrapperElement.GetElement) and ElementNotFoundException for an unknown one, neither caught:
        a bare 500. With a known type: data admins get every project (`SELECT ID,secondary_ID FROM xnat_projectData`,
        PostgreSQL folds the names to lower case), others the projects where their groups (or guest's) hold
        `{permissions}_element` on `{dataType}/project`. The reference (xnat-api.md §12) agrees.
        """
        if permissions not in ("read", "edit", "create", "delete", "active"):
            raise _HttpError(500, _SERVER_ERROR)
        data_type = request.params.get("dataType")
        if self.config.editable_projects_cached and data_type not in _KNOWN_DATA_TYPES:
            raise _HttpError(500, _SERVER_ERROR)
        agent = request.agent
        with self.store.lock:
            if not data_type:  # ≤1.8.8 only: edit access to session data, whatever `permissions` says
                allowed = [p for p in self.store.projects.values() if self.store.can_edit(agent, p)]
            elif data_type not in _KNOWN_DATA_TYPES:  # ≤1.8.8: no permission on an unknown type [INF]
                allowed = []
            else:
                check = self.store.can_read if permissions in ("read", "active") else self.store.can_edit
                if permissions == "delete":  # owners only (XDATUser.getOwnedProjects: delete = owner)
                    check = lambda user, project: user.admin or user.username in project.owners  # noqa: E731
                allowed = [p for p in self.store.projects.values() if check(agent, p)]
        rows = [{"id": p.id, "secondary_id": p.id} for p in sorted(allowed, key=lambda p: p.id)]
        return _table(["id", "secondary_id"], rows, request.fmt())

    def project(self, request: _Request) -> _Response:
        project = self._project(request)
        fields = {"ID": project.id, "secondary_ID": project.id, "name": project.name, "description": ""}
        if request.fmt() == "xml":
            attributes = " ".join(f"{k}={_xml_attr(v)}" for k, v in fields.items() if k != "description")
            return _text(
                f'<xnat:Project xmlns:xnat="http://nrg.wustl.edu/xnat" {attributes}/>', content_type="text/xml"
            )
        meta = {"xsi:type": "xnat:projectData", "isHistory": False}
        return _json({"items": [{"meta": meta, "data_fields": fields, "children": []}]})

    def prearchive_code(self, request: _Request) -> _Response:
        return _text(str(self._project(request).prearchive_code))

    def set_prearchive_code(self, request: _Request) -> _Response:
        project = self._project(request, edit=True)
        raw = request.group("code")
        mapping = {"true": "1", "false": "0"}
        value = mapping.get(raw.lower(), raw)
        if not re.fullmatch(r"-?\d+", value):
            raise _HttpError(400, f"The submitted code {raw} is invalid: must be an integer.")
        with self.store.lock:
            project.prearchive_code = int(value)
        return _Response(200)

    def subjects(self, request: _Request) -> _Response:
        project = self._project(request)
        with self.store.lock:
            found = [s for (p, _), s in self.store.subjects.items() if p == project.id]
        rows = [{"ID": s.id, "project": s.project, "label": s.label, "URI": f"/data/subjects/{s.id}"} for s in found]
        return _table(["ID", "project", "label", "URI"], rows, request.fmt())

    def subject(self, request: _Request) -> _Response:
        found = self._subject(request, self._project(request))
        fields = {"ID": found.id, "label": found.label, "project": found.project}
        return _json(
            {
                "items": [
                    {
                        "meta": {"xsi:type": "xnat:subjectData", "isHistory": False},
                        "data_fields": fields,
                        "children": [],
                    }
                ]
            }
        )

    def _subject(self, request: _Request, project: _Project) -> _Subject:
        name = request.group("subject")
        with self.store.lock:
            for subject in self.store.subjects.values():
                if subject.project == project.id and name in (subject.label, subject.id):
                    return subject
        raise _HttpError(404, f"Unable to find subject {name}")

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

    # -- anonymisation scripts (config tool `anon`) --------------------------------------------------------------

    def anon_site(self, request: _Request) -> _Response:
        """`GET /xapi/anonymize/site` (xapi/rest/dicom/AnonymizeApi.java:72-84, d3a896206 and 4fb6bc14): the script."""
        with self.store.lock:
            script = self.store.site_anon.script if self.store.site_anon else ""
        return _text(script)

    def anon_site_enabled(self, request: _Request) -> _Response:
        """`GET /xapi/anonymize/site/enabled` (AnonymizeApi.java:95-98): the preference
        enableSitewideAnonymizationScript as JSON `true`/`false`."""
        with self.store.lock:
            enabled = self.store.site_anon is not None and self.store.site_anon.enabled
        return _json(enabled)

    def anon_project(self, request: _Request) -> _Response:
        """`GET /xapi/anonymize/projects/{P}` (AnonymizeApi.java:115-125): the script, or 204 (NoContentException)
        when the project has none."""
        project = self._project(request)
        with self.store.lock:
            anon = self.store.project_anon.get(project.id)
        return _text(anon.script) if anon is not None else _Response(204)

    def anon_project_enabled(self, request: _Request) -> _Response:
        """`GET /xapi/anonymize/projects/{P}/enabled` (AnonymizeApi.java:149-152): isProjectScriptEnabled."""
        project = self._project(request)
        with self.store.lock:
            anon = self.store.project_anon.get(project.id)
        return _json(anon is not None and anon.enabled)

    def anon_config(self, request: _Request) -> _Response:
        """The config service's view (§9: `/data/config/anon/script`, `/data/projects/P/config/anon/projects/P`):
        the configuration row with its `status` (enabled/disabled) and `contents`; `contents=true` answers the script
        alone; 404 without one. Column set as the config service lists them [INF]."""
        project = self._project(request) if "project" in request.groups else None
        with self.store.lock:
            anon = self.store.project_anon.get(project.id) if project else self.store.site_anon
        if anon is None or (project is not None and request.group("target") != project.id):
            raise _HttpError(404, _NOT_FOUND)
        if request.params.flag("contents"):
            return _text(anon.script)
        row = {
            "tool": "anon", "path": f"projects/{project.id}" if project else "script",
            "project": project.id if project else "", "status": "enabled" if anon.enabled else "disabled",
            "contents": anon.script, "version": str(anon.version), "unversioned": "false", "reason": "",
            "xnatUser": "admin", "create_date": "",
        }  # fmt: skip
        return _table(list(row), [row], request.fmt())

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


# --------------------------------------------------------------------------------------------------------------
# Representations
# --------------------------------------------------------------------------------------------------------------


def _token_json(token: _Token) -> dict[str, Any]:
    """An AliasToken entity as XNAT's serializer writes it (libs/xdat entities/AliasToken.java getters plus
    AbstractHibernateEntity id/enabled/created/timestamp/disabled, Dates as epoch ms)."""
    return {
        "alias": token.alias,
        "secret": token.secret,
        "singleUse": False,
        "estimatedExpirationTime": int(token.expires * 1000),
        "xdatUserId": token.username,
        "validIPAddresses": None,
        "expired": time.time() > token.expires,
        "id": token.serial,
        "enabled": True,
        "created": int(token.created * 1000),
        "timestamp": int(token.created * 1000),
        "disabled": 0,
    }


def _data_url(key: Key) -> str:
    return f"/data/prearchive/projects/{key[0]}/{key[1]}/{key[2]}"


def _xml_attr(value: str) -> str:
    return '"' + _xml(value) + '"'


def _multipart(request: _Request) -> Iterator[tuple[str, str | None, bytes]]:
    """(field name, file name or None, payload) of each part of a multipart/form-data body."""
    boundary = _param_of(request.headers.get("Content-Type") or "", "boundary")
    if not boundary:
        raise _HttpError(400, "Unable to parse the multipart request: no boundary.")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    for chunk in (b"\r\n" + request.body).split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, payload = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disposition = ""
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value.strip()
        name = _param_of(disposition, "name", "content-disposition") or ""
        filename = _param_of(disposition, "filename", "content-disposition")
        yield name, filename, payload


def _experiment_item(experiment: _Experiment, subject_id: str) -> dict[str, Any]:
    """An xnatpy-style `items` entry (§8.2) of an archived session."""
    scans = [
        {
            "meta": {"xsi:type": scan.xsi_type, "isHistory": False},
            "data_fields": {
                "ID": scan.id, "type": scan.type, "series_description": scan.type, "UID": scan.series_uid,
                "xsi:type": scan.xsi_type, "image_session_ID": experiment.id, "project": experiment.project,
            },
            "children": [
                {
                    "field": "file",
                    "items": [
                        {
                            "meta": {"xsi:type": "xnat:resourceCatalog", "isHistory": False},
                            "data_fields": {
                                "xnat_abstractresource_id": resource_id, "label": label, "file_count": len(files),
                                "file_size": sum(len(data) for data in files.values()), "format": fmt,
                                "content": content,
                            },
                            "children": [],
                        }
                        for label, resource_id, fmt, content, files in _scan_resources(scan)
                    ],
                }
            ],
        }
        for scan in experiment.scans.values()
    ]  # fmt: skip
    fields = {
        "ID": experiment.id, "label": experiment.label, "project": experiment.project, "subject_ID": subject_id,
        "UID": experiment.study_uid, "modality": experiment.modality, "date": experiment.date,
    }  # fmt: skip
    children = [{"field": "scans/scan", "items": scans}] if scans else []
    return {"meta": {"xsi:type": experiment.xsi_type, "isHistory": False}, "data_fields": fields, "children": children}


def _experiment_xml(experiment: _Experiment, subject_id: str) -> str:
    root = _XML_ROOTS.get(experiment.modality, "xnat:OtherDicomSession")
    scans = "".join(
        f"<xnat:scan ID={_xml_attr(s.id)} type={_xml_attr(s.type)} UID={_xml_attr(s.series_uid)} "
        f'xsi:type="{s.xsi_type}">'
        + "".join(
            f"<xnat:file label={_xml_attr(label)} format={_xml_attr(fmt)} content={_xml_attr(content)} "
            'xsi:type="xnat:resourceCatalog"/>'
            for label, _, fmt, content, _ in _scan_resources(s)
        )
        + "</xnat:scan>"
        for s in experiment.scans.values()
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} ID={_xml_attr(experiment.id)} '
        f"project={_xml_attr(experiment.project)} label={_xml_attr(experiment.label)} "
        f"UID={_xml_attr(experiment.study_uid)} "
        'xmlns:xnat="http://nrg.wustl.edu/xnat" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<xnat:subject_ID>{_xml(subject_id)}</xnat:subject_ID><xnat:scans>{scans}</xnat:scans></{root}>"
    )


_CATALOG_NAMESPACES = (
    'xmlns:arc="http://nrg.wustl.edu/arc" xmlns:cat="http://nrg.wustl.edu/catalog" '
    'xmlns:pipe="http://nrg.wustl.edu/pipe" xmlns:prov="http://www.nbirn.net/prov" '
    'xmlns:scr="http://nrg.wustl.edu/scr" '
    'xmlns:val="http://nrg.wustl.edu/val" xmlns:wrk="http://nrg.wustl.edu/workflow" '
    'xmlns:xdat="http://nrg.wustl.edu/security" xmlns:xnat="http://nrg.wustl.edu/xnat" '
    'xmlns:xnat_a="http://nrg.wustl.edu/xnat_assessments" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
)


# `extra_scan_resources`: (format, content, file names by scan id and series description) of the usual labels.
_EXTRA_RESOURCES: dict[str, tuple[str, str, Callable[[str, str], list[str]]]] = {
    "NIFTI": ("NIFTI", "NIFTI_RAW", lambda scan, desc: [f"{desc}_{scan}.nii.gz", f"{desc}_{scan}.json"]),
    "SNAPSHOTS": ("GIF", "SNAPSHOTS", lambda scan, desc: [f"{scan}_qc.gif", f"{scan}_qc_t.gif"]),
    "BIDS": ("BIDS", "BIDS", lambda scan, desc: [f"sub-01_run-{scan}_{desc}.nii.gz", f"sub-01_run-{scan}_{desc}.json"]),
}


def _extra_resource(label: str, resource_id: int, scan_id: str, description: str) -> _ExtraResource:
    """A pipeline's resource for an archived scan, with a few small files."""
    desc = _to_file_name_chars(description or "scan")
    fmt, content, names = _EXTRA_RESOURCES.get(label, (label, label, lambda scan, _: [f"{label.lower()}_{scan}.dat"]))
    files = {name: f"{label} {scan_id} {name}\n".encode() for name in names(scan_id, desc)}
    return _ExtraResource(label, resource_id, fmt, content, files)


def _scan_resources(scan: _Scan) -> list[tuple[str, int, str, str, dict[str, bytes]]]:
    """(label, xnat_abstractresource_id, format, content, name -> bytes) of every resource of a scan, DICOM first."""
    found = [("DICOM", scan.resource_id, "DICOM", "RAW", {n: f.data for n, f in scan.files.items()})]
    found += [(x.label, x.resource_id, x.format, x.content, x.files) for x in scan.extras.values()]
    return found


def _find_extra(scan: _Scan, name: str) -> _ExtraResource | None:
    return next((x for x in scan.extras.values() if name in (x.label, str(x.resource_id))), None)


def _extra_catalog_xml(extra: _ExtraResource) -> str:
    """A non-DICOM resource's catalog: `cat:Catalog`, one `cat:entry` per file, no UID."""
    entries = "".join(
        f"\t<cat:entry ID={_xml_attr(name)} URI={_xml_attr(name)} "
        f'digest="{hashlib.md5(data, usedforsecurity=False).hexdigest()}" format={_xml_attr(extra.format)}/>\n'
        for name, data in extra.files.items()
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<cat:Catalog {_CATALOG_NAMESPACES}>\n<cat:entries>\n{entries}'
        "</cat:entries>\n</cat:Catalog>\n"
    )


def _catalog_xml(scan: _Scan) -> str:
    """A scan's DICOM catalog as the catalog bean serialises it: root `cat:DCMCatalog` (UID = the series UID), one
    `cat:entry` (xsi:type `cat:dcmEntry`) per file with its name as `URI` and `ID`, its SOP Instance UID as `UID`,
    attributes in alphabetical order, as in the catalogs XNAT writes (web/src/test/resources/catalogs/
    scan_4_catalog.xml, dicom/duplicates/scan_5_catalog.xml). The audit attributes (createdBy, createdTime, ...)
    and metaFields are left out."""
    entries = []
    for name, item in scan.files.items():
        number = f" instanceNumber={_xml_attr(item.dicom.instance_number)}" if item.dicom.instance_number else ""
        digest = hashlib.md5(item.data, usedforsecurity=False).hexdigest()
        entries.append(
            f"\t<cat:entry ID={_xml_attr(name)} UID={_xml_attr(item.dicom.sop_uid)} URI={_xml_attr(name)} "
            f'digest="{digest}" format="DICOM"{number} xsi:type="cat:dcmEntry"/>\n'
        )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<cat:DCMCatalog UID={_xml_attr(scan.series_uid)} '
        f"{_CATALOG_NAMESPACES}>\n<cat:entries>\n{''.join(entries)}</cat:entries>\n</cat:DCMCatalog>\n"
    )


def _session_xml(row: _Row) -> str:
    """The prearchive session document (a minimal form of what the session builder writes)."""
    root = _XML_ROOTS.get(row.modality, "xnat:OtherDicomSession")
    scans = []
    for scan_id, files in row.catalogued().items():
        first = next(iter(files.values())).dicom
        scan_type = row.catalog[scan_id].xsi_type
        scans.append(
            f"<xnat:scan ID={_xml_attr(scan_id)} type={_xml_attr(row.catalog[scan_id].series_description)} "
            f'UID={_xml_attr(first.series_uid)} xsi:type="{scan_type}"><xnat:file label="DICOM" format="DICOM" '
            f'content="RAW" xsi:type="xnat:resourceCatalog" '
            f'URI="SCANS/{_xml(scan_id)}/DICOM/scan_{_xml(scan_id)}_catalog.xml"/>'
            "</xnat:scan>"
        )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<{root} project={_xml_attr(row.project_label)} '
        f'label={_xml_attr(row.name)} UID={_xml_attr(row.tag)} xmlns:xnat="http://nrg.wustl.edu/xnat" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<xnat:subject_ID>{_xml(row.subject)}</xnat:subject_ID><xnat:scans>{''.join(scans)}</xnat:scans></{root}>"
    )


def _zip_row(row: _Row) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for scan_id, files in row.scans.items():
            for name, item in files.items():
                archive.writestr(f"{row.folder}/SCANS/{scan_id}/DICOM/{name}", item.data)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------------------------------------------


def _content_length(headers: Message) -> int:
    try:
        return max(int(headers.get("Content-Length") or 0), 0)
    except ValueError:
        return 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: _Api) -> None:
        super().__init__(address, _Handler)
        self.api = api
        self.connections: set[socket] = set()
        self.connections_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOG.debug("connection from %s ended with an error", client_address, exc_info=True)

    def close_connections(self) -> None:
        with self.connections_lock:
            open_sockets = list(self.connections)
        for sock in open_sockets:
            try:
                sock.shutdown(SHUT_RDWR)
            except OSError:
                continue


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeXnat/1.8"

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        server = cast(_Server, self.server)
        with server.connections_lock:
            server.connections.add(self.connection)

    def finish(self) -> None:
        server = cast(_Server, self.server)
        with server.connections_lock:
            server.connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("%s " + format, self.address_string(), *args)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_some(self, limit: int | None) -> bytes:
        """Up to `limit` bytes of the (de-chunked) body; all of it when `limit` is None."""
        if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
            length = _content_length(self.headers)
            return self.rfile.read(length if limit is None else min(limit, length))
        chunks: list[bytes] = []
        got = 0
        while limit is None or got < limit:
            size = int(self.rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                break
            want = size if limit is None else min(size, limit - got)
            chunks.append(self.rfile.read(want))
            got += want
            if want == size:
                self.rfile.readline(65537)
        return b"".join(chunks)

    def _cut(self, api: _Api, reset: _Reset, target: str) -> None:
        """A connection reset mid-upload (`reset_next`): read part of the body, let XNAT do what it does with that
        part, then reset the connection (RST, not a clean close)."""
        try:
            if api.streams_body(self.command, target):
                length = _content_length(self.headers)
                chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
                if reset.after_bytes is not None:
                    body = self._read_some(reset.after_bytes)
                elif chunked:
                    whole = self._read_some(None)
                    body = whole[: len(whole) // 2]
                else:
                    body = self._read_some(length // 2)
                api.process_cut(self.command, target, self.headers, body)
            else:
                self._read_some(65536 if reset.after_bytes is None else reset.after_bytes)
        except (OSError, ValueError):
            LOG.debug("reading the body of a request to be reset failed", exc_info=True)
        self.connection.setsockopt(SOL_SOCKET, SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _serve(self, *, head: bool = False) -> None:
        server = cast(_Server, self.server)
        target = server.api.below_context(self.path)
        if target is None:  # outside the webapp's context path: Tomcat's own 404
            self.close_connection = True
            self._send(
                _HttpError(404, f"The requested resource [{self.path}] is not available", tomcat=True).response()
            )
            return
        reset = server.api.take_reset(self.command, target)
        if reset is not None:
            self._cut(server.api, reset, target)
            return
        try:
            body = self._read_body()
        except ValueError:
            self.send_error(400, "Bad request body")
            return
        if len(body) < _content_length(self.headers):
            # The client went away part-way through the body: XNAT does with what arrived what it does after a
            # reset (a streamed DICOM-zip keeps the entries read whole), and nobody is there to answer.
            if server.api.streams_body(self.command, target):
                server.api.process_cut(self.command, target, self.headers, body)
            self.close_connection = True
            return
        response = server.api.handle("GET" if head else self.command, target, self.headers, body)
        self._send(response, head=head)

    def _send(self, response: _Response, *, head: bool = False) -> None:
        self.send_response(response.status)
        if response.content_type is not None:
            self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(response.body)


# --------------------------------------------------------------------------------------------------------------
# The public facade
# --------------------------------------------------------------------------------------------------------------


class FakeXnat:
    """An XNAT 1.8 stand-in on a local port (see the module docstring for the API and its limits)."""

    def __init__(
        self,
        *,
        version: str = "1.8.10",
        host: str = "127.0.0.1",
        port: int = 0,
        idle_build_seconds: float = 300.0,
        rebuild_repeat_seconds: float = 60.0,
        session_timeout_seconds: float = 900.0,
        archive_timeout_seconds: float = 600.0,
        operation_seconds: float = 0.0,
        site_id: str = "XNAT",
        use_sop_instance_uid: bool = True,
        token_lifetime_seconds: float = 2 * 24 * 3600.0,
        max_failed_logins: int = 20,
        lockout_seconds: float = 3600.0,
        password_expiration_seconds: float | None = None,
        require_login: bool = True,
        context_path: str = "",
        lastmod_refresh_seconds: float | None = None,
        extra_scan_resources: Sequence[str] = (),
    ) -> None:
        context_path = context_path.rstrip("/")
        if context_path and not context_path.startswith("/"):
            raise ValueError(f"context_path must be empty or start with '/': {context_path!r}")
        if lastmod_refresh_seconds is None:  # XNAT's 15 s against its 5-minute idle build, scaled like the idle time
            lastmod_refresh_seconds = min(15.0, idle_build_seconds / 20)
        self._config = _Config(
            version=version,
            site_id=site_id,
            idle_build_seconds=idle_build_seconds,
            rebuild_repeat_seconds=rebuild_repeat_seconds,
            session_timeout_seconds=session_timeout_seconds,
            archive_timeout_seconds=archive_timeout_seconds,
            operation_seconds=operation_seconds,
            use_sop_instance_uid=use_sop_instance_uid,
            token_lifetime_seconds=token_lifetime_seconds,
            max_failed_logins=max_failed_logins,
            lockout_seconds=lockout_seconds,
            password_expiration_seconds=password_expiration_seconds,
            require_login=require_login,
            context_path=context_path,
            lastmod_refresh_seconds=lastmod_refresh_seconds,
            extra_scan_resources=tuple(extra_scan_resources),
        )
        self._timers: list[tuple[threading.Timer, Callable[[], None]]] = []
        self._host = host
        self._port = port
        self._store = _Store(self._config)
        self._jobs = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fake-xnat-job")
        self._api = _Api(self._store, self._config, self._jobs, lambda: self.url)
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeXnat is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self._config.context_path}"

    @property
    def version(self) -> str:
        return self._config.version

    def start(self) -> FakeXnat:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._api.stopping.clear()
        self._server = _Server((self._host, self._port), self._api)
        server_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-xnat-http", daemon=True
        )
        builder_thread = threading.Thread(target=self._builder_loop, name="fake-xnat-idle-builder", daemon=True)
        self._threads = [server_thread, builder_thread]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop the HTTP server, the idle builder and the job pool, and wait for them."""
        server, self._server = self._server, None
        self._stopping.set()
        self._api.stopping.set()
        for timer, release in self._timers:
            timer.cancel()
            release()
        self._timers = []
        if server is not None:
            server.shutdown()
            server.close_connections()
            server.server_close()
        with self._api._log_lock:
            background, self._api.background = self._api.background, []
        for thread in [*self._threads, *background]:
            thread.join(timeout=10)
        self._threads = []
        self._jobs.shutdown(wait=True)
        self._jobs = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fake-xnat-job")
        self._api.jobs = self._jobs

    def __enter__(self) -> FakeXnat:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _builder_loop(self) -> None:
        while not self._stopping.wait(self._config.rebuild_repeat_seconds):
            try:
                self._store.idle_pass(ignore_idle=False)
            except Exception:
                LOG.exception("fake XNAT idle builder failed")

    # -- set-up -------------------------------------------------------------------------------------------------

    def add_user(self, username: str, password: str, *, admin: bool = False) -> None:
        with self._store.lock:
            self._store.users[username] = _User(username, password, admin)

    def add_project(
        self,
        project_id: str,
        *,
        owners: Iterable[str] = (),
        members: Iterable[str] = (),
        collaborators: Iterable[str] = (),
        prearchive_code: int = 0,
        aliases: Iterable[str] = (),
        name: str | None = None,
    ) -> None:
        project = _Project(
            project_id,
            name or project_id,
            set(owners),
            set(members),
            set(collaborators),
            prearchive_code,
            tuple(aliases),
        )
        with self._store.lock:
            self._store.projects[project_id] = project

    def issue_token(self, username: str) -> tuple[str, str]:
        """An alias token for `username`: (alias UUID, secret), usable as Basic credentials."""
        token = self._store.issue_token(username)
        return token.alias, token.secret

    def expire_sessions(self) -> None:
        """Invalidate every JSESSIONID (clients must log in again)."""
        with self._store.lock:
            self._store.sessions.clear()

    # -- accounts and tokens ------------------------------------------------------------------------------------

    def _user(self, username: str) -> _User:
        user = self._store.users.get(username)
        if user is None:
            raise KeyError(f"no user {username!r}")
        return user

    def expire_tokens(self, username: str | None = None) -> int:
        """What XNAT's alias-token sweep does to tokens past `aliasTokenTimeout` (ClearExpiredAliasTokens ->
        HibernateAliasTokenService.invalidateExpiredTokens deletes them), for every token of `username` (or of
        everyone) now; returns how many were removed."""
        with self._store.lock:
            doomed = [a for a, t in self._store.tokens.items() if username is None or t.username == username]
            for alias in doomed:
                del self._store.tokens[alias]
        return len(doomed)

    def failed_logins(self, username: str) -> int:
        """The account's failed-login count (xhbm_xdat_user_auth.failed_login_attempts; it keeps counting while
        locked and drops to 0 on a success or when the lockout ends)."""
        with self._store.lock:
            user = self._user(username)
            self._store._unlock_if_due(user)
            return user.failed_logins

    def is_locked(self, username: str) -> bool:
        """Whether the account is locked out after `max_failed_logins` failures (until `lockout_seconds` pass)."""
        with self._store.lock:
            user = self._user(username)
            self._store._unlock_if_due(user)
            return user.locked_at is not None

    def expire_password(self, username: str) -> None:
        """Make the account's password expired (as if last set longer ago than the site's passwordExpirationInterval):
        its authenticated requests then answer 302 to the change-password page (sessions already found not expired
        keep working)."""
        with self._store.lock:
            self._user(username).password_expired = True

    def set_password(self, username: str, password: str) -> None:
        """Change the account's password (clears an expired password; password_updated = now)."""
        with self._store.lock:
            user = self._user(username)
            user.password, user.password_expired, user.password_updated = password, False, time.time()

    def disable_user(self, username: str, *, inactivity: bool = False) -> None:
        """Disable the account. By an admin (`inactivity=False`): every login (password, token, form) fails with 401
        and counts as a failed login. For inactivity (`inactivity=True`, what XNAT's DisableInactiveUsers job does):
        the password still logs in, then every authenticated request answers 302 to the inactive-account page; tokens
        fail (Users.validateUserLogin). Existing sessions are left alone [INF]."""
        with self._store.lock:
            user = self._user(username)
            user.enabled, user.inactive = False, inactivity

    def unverify_user(self, username: str) -> None:
        """Mark the account's email as unverified (site preference emailVerification, default on): logins fail with
        401 (XnatDatabaseAuthenticationProvider.additionalAuthenticationChecks: CredentialsExpiredException)."""
        with self._store.lock:
            self._user(username).verified = False

    def enable_user(self, username: str) -> None:
        """Undo `disable_user` / `unverify_user` / a lockout (as an admin enabling and verifying the account)."""
        with self._store.lock:
            user = self._user(username)
            user.enabled, user.inactive, user.verified = True, False, True
            user.failed_logins, user.locked_at = 0, None

    # -- fault injection ----------------------------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        path_prefix: str,
        *,
        status: int = 503,
        times: int = 1,
        body: str | None = None,
        html: bool = True,
        after_processing: bool = False,
        delay: float = 0.0,
    ) -> None:
        """Answer the next `times` matching requests with `status` (see the module docstring)."""
        fault = _Fault(method.upper(), path_prefix, status, times, body, html, after_processing, delay)
        with self._api._log_lock:
            self._api.faults.append(fault)

    def reset_next(self, method: str, path_prefix: str, *, times: int = 1, after_bytes: int | None = None) -> None:
        """Cut the connection of the next `times` matching requests part-way through their body (a TCP reset).

        `POST /data/services/import`: `after_bytes` of the body (default: half of it) are read, and what XNAT does
        with them happens: a raw DICOM-zip upload has every entry that lies wholly inside them stored, as a complete
        upload would (rows stay RECEIVING; see `_Api.process_cut`); other uploads store nothing. Other paths: up to
        `after_bytes` (default 64 KiB) are read and nothing is processed. `requests_log` records each with status 0.
        """
        with self._api._log_lock:
            self._api.resets.append(_Reset(method.upper(), path_prefix, times, after_bytes))

    def truncate_next(self, method: str, path_prefix: str, *, times: int = 1, keep_bytes: int | None = None) -> None:
        """A reply cut short by a proxy: the next `times` matching requests are processed as usual and answered with
        the real status and headers but only the first `keep_bytes` of the body (default: half), Content-Length
        matching what is sent (so a JSON listing arrives as invalid JSON)."""
        with self._api._log_lock:
            self._api.truncations.append(_Truncation(method.upper(), path_prefix, times, keep_bytes))

    def drop_entries(self, predicate: Callable[[str, str, str], bool] | None, *, stage: str = "filter") -> None:
        """Make XNAT accept and silently drop objects: `predicate(sop_instance_uid, series_instance_uid,
        series_description)` returns True for those to drop; None removes every rule.

        The import still answers 200 and stores nothing for such an object (DICOM-zip entries and gradual-DICOM
        uploads). `stage="filter"` is a series import filter: dropped before any prearchive row exists
        (archive/GradualDicomImporter.java:193-200). `stage="anonymization"` is a site-wide DicomEdit script that
        rejects the file (:388-400): the row is found or created first, the file written and deleted again (an earlier
        copy it overwrote included), and rows whose `prevent_anon` is true are not affected.
        """
        if predicate is None:
            with self._store.lock:
                self._store.drops.clear()
            return
        if stage not in ("filter", "anonymization"):
            raise ValueError(f"unknown stage {stage!r}: expected 'filter' or 'anonymization'")
        with self._store.lock:
            self._store.drops.append(_Drop(predicate, stage))

    def proxy_timeout_next(
        self,
        path_prefix: str = "/data/services/import",
        *,
        after_seconds: float,
        import_seconds: float,
        method: str = "POST",
        times: int = 1,
    ) -> None:
        """A proxy in front of XNAT (nginx `proxy_read_timeout`) gives up on the next `times` matching requests: the
        client gets nginx's 504 page after `after_seconds` while XNAT goes on. For an import, the upload's entries are
        stored one by one over `import_seconds` in the background (rows RECEIVING, lastmod refreshed at most every
        `lastmod_refresh_seconds`, and the idle builder leaves a row alone while its import still writes to it);
        other requests are processed in the background at once. `stop()` ends the background work."""
        proxy = _ProxyTimeout(method.upper(), path_prefix, times, after_seconds, import_seconds)
        with self._api._log_lock:
            self._api.proxy_timeouts.append(proxy)

    def hold_row_lock(
        self, project: str, timestamp: str, folder: str, seconds: float, *, status: str = "_BUILDING"
    ) -> None:
        """Lock a prearchive row for `seconds` as XNAT's LockAndSync does (status `status`, one of the `_` ones), then
        give it back its status: meanwhile `?action=build` and `?action=commit` answer 409 "session document locked"."""
        if not status.startswith("_") or status not in ALL_STATUSES:
            raise ValueError(f"not a lock status: {status!r}")
        with self._store.lock:
            row = self._store.rows.get((project, timestamp, folder))
            if row is None:
                raise KeyError((project, timestamp, folder))
            previous, row.status = row.status, status

        def release() -> None:
            with self._store.lock:
                if row.status == status:
                    row.status = previous

        timer = threading.Timer(seconds, release)
        timer.daemon = True
        self._timers.append((timer, release))
        timer.start()

    def set_anon_script(
        self, script: str | None, *, project: str | None = None, enabled: bool = True, fails: bool = False
    ) -> None:
        """Set (None: remove) the site-wide (`project=None`) or a project's DicomEdit anonymisation script. The scripts
        are not run; `fails=True` makes an enabled one fail: the site script during import (each entry answers 400
        "unable to read DICOM object NAME", its new row deleted), a project script at archive (row ERROR). Served by
        `/xapi/anonymize/...` and the config service paths."""
        with self._store.lock:
            current = self._store.site_anon if project is None else self._store.project_anon.get(project)
            version = (current.version if current else 0) + 1
            anon = None if script is None else _AnonScript(script, enabled, fails, version)
            if project is None:
                self._store.site_anon = anon
            elif anon is None:
                self._store.project_anon.pop(project, None)
            else:
                self._store.project_anon[project] = anon

    def faults_pending(self) -> int:
        """How many injected faults (fail_next, reset_next, truncate_next) have not met their request yet."""
        with self._api._log_lock:
            return (
                sum(f.remaining for f in self._api.faults)
                + sum(r.remaining for r in self._api.resets)
                + sum(t.remaining for t in self._api.truncations)
                + sum(p.remaining for p in self._api.proxy_timeouts)
            )

    def clear_faults(self) -> None:
        """Forget every pending fault, reset, truncation and drop rule: XNAT behaves again."""
        with self._api._log_lock:
            self._api.faults.clear()
            self._api.resets.clear()
            self._api.truncations.clear()
            self._api.proxy_timeouts.clear()
        self.drop_entries(None)

    def html_error_with_200_next(
        self, method: str, path_prefix: str, message: str = "The upload failed: the session could not be imported."
    ) -> None:
        """The next matching request gets status 200 with an HTML error page (XNAT's `format=html` style)."""
        self.fail_next(method, path_prefix, status=200, body=message, html=True)

    # -- inspection ---------------------------------------------------------------------------------------------

    def prearchive_rows(self, project: str | None = None) -> list[dict[str, str]]:
        """The prearchive rows (§5.1 dicts), optionally of one project (or "Unassigned")."""
        with self._store.lock:
            return [r.as_dict() for r in self._store.rows.values() if project is None or r.project_label == project]

    def prearchive_files(self, project: str | None = None) -> dict[str, dict[str, str]]:
        """The files every prearchive row holds now, built or not: row url -> file name -> SOP Instance UID."""
        with self._store.lock:
            return {
                row.url: {name: file.dicom.sop_uid for files in row.scans.values() for name, file in files.items()}
                for row in self._store.rows.values()
                if project is None or row.project_label == project
            }

    def experiments(self, project: str | None = None) -> list[ExperimentRecord]:
        """Snapshots of the archived imaging sessions, optionally of one project."""
        with self._store.lock:
            return [e.record() for e in self._store.experiments.values() if project is None or e.project == project]

    def archived_files(self, project: str, label: str) -> dict[str, bytes]:
        """The stored files of an archived session, keyed `<scan id>/<file name>` (tests assert on the bytes)."""
        with self._store.lock:
            for experiment in self._store.experiments.values():
                if experiment.project == project and experiment.label == label:
                    return {
                        f"{scan_id}/{name}": file.data
                        for scan_id, scan in experiment.scans.items()
                        for name, file in scan.files.items()
                    }
        return {}

    @property
    def requests_log(self) -> list[tuple[str, str, int]]:
        """(method, path+query, status) of every request so far."""
        with self._api._log_lock:
            return list(self._api.log)

    def build_now(self) -> None:
        """Run the idle builder once now, ignoring the idle time (auto-archive included)."""
        self._store.idle_pass(ignore_idle=True)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _credentials(value: str) -> tuple[str, str]:
    username, sep, password = value.partition(":")
    if not sep or not username:
        raise argparse.ArgumentTypeError(f"expected NAME:PASSWORD, got {value!r}")
    return username, password


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingestd.testing.fake_xnat", description="Run a fake XNAT 1.8 server in the foreground."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--version", default="1.8.10", help="XNAT version to emulate (1.8.9 vs 1.8.10 behaviour)")
    parser.add_argument(
        "--user", action="append", type=_credentials, default=[], metavar="NAME:PASSWORD", help="a site admin"
    )
    parser.add_argument(
        "--member", action="append", type=_credentials, default=[], metavar="NAME:PASSWORD",
        help="a non-admin user who owns every --project",
    )  # fmt: skip
    parser.add_argument("--project", action="append", default=[], metavar="ID")
    parser.add_argument("--prearchive-code", type=int, default=0, choices=(0, 4, 5), help="for every --project")
    parser.add_argument("--idle-build-seconds", type=float, default=300.0)
    parser.add_argument("--rebuild-repeat-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    xnat = FakeXnat(
        version=args.version,
        host=args.host,
        port=args.port,
        idle_build_seconds=args.idle_build_seconds,
        rebuild_repeat_seconds=args.rebuild_repeat_seconds,
    )
    for username, password in args.user:
        xnat.add_user(username, password, admin=True)
    for username, password in args.member:
        xnat.add_user(username, password)
    for project_id in args.project:
        xnat.add_project(project_id, owners=[u for u, _ in args.member], prearchive_code=args.prearchive_code)
    stop = Wakeup()  # not a threading.Event: its set() in a signal handler can deadlock (ingestd/wakeup.py)
    signal.signal(signal.SIGTERM, lambda *_: stop.notify())
    with xnat:
        LOG.info("fake XNAT %s listening on %s (Ctrl-C stops)", args.version, xnat.url)
        try:
            stop.wait()
        except KeyboardInterrupt:
            LOG.info("stopping")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
