"""The stand-in's state: users, projects, tokens, HTTP sessions, prearchive rows, archived experiments."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from ingestd.testing.xnat.common import UNASSIGNED, Key, _java_timestamp, _now
from ingestd.testing.xnat.dicom import _Dicom

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
    # XnatExpiredPasswordFilter caches its verdict in the HTTP session attribute "expired" (lines 86, 281-302): once
    # a session was found not expired it is never checked again.
    password_not_expired: bool = False


@dataclass
class _Entry:
    """One `cat:entry` of a resource catalog: what listings show (CatalogUtils.getEntryDetails reads `Size` from the
    entry's SIZE metafield and `digest` from the entry, not from the disk: utils/CatalogUtils.java 535-615)."""

    name: str
    size: int
    digest: str  # MD5 hex, "" when checksums are off or not computed yet (prearchive)
    format: str | None = None
    content: str | None = None
    tags: tuple[str, ...] = ()


@dataclass
class _Resource:
    """A catalog resource (`xnat:resourceCatalog`) of an experiment, scan, subject or prearchive session.

    `disk` is what the resource's folder holds (relative path -> bytes), `catalog` what its catalog lists: the two
    part ways when a write fails after the bytes landed (helpers/FileWriterWrapper.java 104-126 writes straight into
    the final path; CatalogUtils.storeCatalogEntry 1753-1799 catalogues only after the write). `version` counts
    catalog writes: CatalogUtils.writeCatalogToFile (1988-2003) refuses to write a catalog changed since it was read.
    """

    id: int  # xnat_abstractresource_id
    label: str
    format: str | None = None
    content: str | None = None
    description: str | None = None
    tags: list[str] = field(default_factory=list)
    disk: dict[str, bytes] = field(default_factory=dict)
    catalog: dict[str, _Entry] = field(default_factory=dict)
    version: int = 0

    def state(self) -> ResourceState:
        catalog = {name: (entry.size, entry.digest) for name, entry in self.catalog.items()}
        return ResourceState(self.id, dict(self.disk), catalog)


@dataclass(frozen=True)
class ResourceState:
    """A snapshot of one resource: the bytes on disk by path, and what its catalog lists, path -> (Size, digest)."""

    id: int
    disk: dict[str, bytes]
    catalog: dict[str, tuple[int, str]]


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
    # Session-level resources put into the prearchive session (PrearcSessionResourceCatalogFiles), label -> resource:
    # kept through rebuilds, archived with the session.
    resources: dict[str, _Resource] = field(default_factory=dict)

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
    resources: dict[str, _Resource] = field(default_factory=dict)  # uploaded through the resource file API


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
    resources: dict[str, _Resource] = field(default_factory=dict)  # session-level resources, label -> resource

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
    resources: dict[str, _Resource] = field(default_factory=dict)


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
    # Site preference `checksums` (libs/xdat SiteConfigPreferences.java 682-683, default true: MD5 digests in
    # catalogs). `maintainFileHistory` (708-709) is always its default, false: an overwritten file is deleted.
    checksums: bool = True

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
