"""The journal's rows as typed values: what its queries return and what its writers take."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from ingestd.states import Step

__all__ = [
    "BatchInstance",
    "BatchRow",
    "Delivery",
    "InstanceRow",
    "Outgoing",
    "Quarantined",
    "Route",
    "RouteRecord",
    "Source",
    "Superseded",
    "Totals",
]


@dataclass(frozen=True, slots=True)
class Source:
    """Where an instance came from: a DICOM peer (calling AE, called AE) or a drop folder (folder, file)."""

    kind: str  # "dicom" or "folder"
    name: str  # the calling AE title, or the drop folder
    detail: str = ""  # the called AE title and peer address, or the file's path within the folder
    # The upload it came in (None for C-STORE): the top-level entry below the drop folder (`sub01`, `x.zip`), or
    # `ingestd import`'s argument within its folder. Files of the same upload go with the same study
    # (`ingestd.journal.attachments`).
    upload: str | None = None


@dataclass(frozen=True, slots=True)
class InstanceRow:
    id: int
    batch_id: int
    batch_state: str
    sop_uid: str
    size: int
    data_offset: int
    spool_path: str
    data_sha256: str | None  # SHA-256 of the data set (hex); None until computed (see Spool._same_data)


@dataclass(frozen=True, slots=True)
class BatchRow:
    id: int
    study_uid: str
    batch: int
    state: str
    source_kind: str
    source: str
    first_received: float
    last_received: float
    state_changed: float
    reason: str | None
    hold_code: str | None  # why it is held, as a short code (`unrouted`, `xnat-refused`, ...); None unless held
    failures: int  # unexpected failures of the stage it is in, since it entered that stage
    retry_at: float  # after a failure: the stage tries it again from then on
    note: str | None  # what a person should know that no state says (re-sent after a release, say); no patient data
    forced_rule: str | None  # the rule a person chose (`ingestd resend --route`); None: the first that matches
    purged_at: float | None  # when retention removed its files (released batches only)
    series: int
    instances: int  # a batch of files (`kind` files): its files
    size: int
    kind: str = "dicom"  # states.BatchKind: `dicom` (instances of one study) or `files` (an attachment set)
    upload: str | None = None  # a batch of files: the upload its files came in (with `source_kind` and `source`)


@dataclass(frozen=True, slots=True)
class BatchInstance:
    """One instance of a batch, as the router reads it."""

    id: int
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    source_kind: str
    source: str
    source_detail: str
    spool_path: str


@dataclass(frozen=True, slots=True)
class RouteRecord:
    """What the rules decided for a batch: recorded with the rules' version, kept for delivery."""

    rule: str
    rules_version: str
    server: str
    project: str
    subject: str
    session: str
    archive: bool
    profile: str | None
    study_uid: str  # the study's UID as it leaves (new if de-identified)
    dropped: tuple[tuple[str, int, str], ...]  # (series UID as received, instances, reason)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One instance as it will leave: its (new) UIDs and its file, relative to the state directory."""

    instance_id: int
    series_uid: str
    sop_uid: str
    path: str
    size: int
    verified: str | None = None  # where XNAT was last seen holding it (`archive`, `prearchive`), or None


@dataclass(frozen=True, slots=True)
class Superseded:
    """A copy of an instance kept aside because a different copy replaced it (`ingestd status` lists them)."""

    batch_id: int
    study_uid: str
    sop_uid: str
    path: str  # relative to the state directory
    size: int
    source_kind: str
    source: str
    received_at: float
    at: float


@dataclass(frozen=True, slots=True)
class Quarantined:
    """An item set aside in the quarantine folder, and why."""

    path: str
    reason: str
    source_kind: str
    source: str
    at: float
    purged_at: float | None  # when retention removed its file and reason (the row stays); None: still there


@dataclass(frozen=True, slots=True)
class Totals:
    """What the metrics count, read in one snapshot of the journal."""

    receipts_upto: int  # the highest receipt id: the next read counts only receipts above it
    receipts: tuple[tuple[str, str, str, int, int], ...]  # (source kind, source, outcome, count, bytes)
    states: tuple[tuple[str, int], ...]  # (batch state, batches)
    held_reasons: tuple[tuple[str, int], ...]  # (hold code, held batches)
    quarantine: tuple[tuple[str, int], ...]  # (source kind, items)


@dataclass(frozen=True, slots=True)
class Route:
    """A routed batch's route as the journal keeps it (the `routes` table): where it goes, decided by which rule."""

    batch_id: int
    rule: str
    rules_version: str
    server: str
    project: str
    subject: str
    session: str
    archive: bool
    profile: str | None
    study_uid: str  # the study's UID as it leaves (new if de-identified)
    instances: int
    dropped_instances: int
    decided_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Route:
        return cls(
            batch_id=int(row["batch_id"]),
            rule=row["rule"],
            rules_version=row["rules_version"],
            server=row["server"],
            project=row["project"],
            subject=row["subject"],
            session=row["session"],
            archive=bool(row["archive"]),
            profile=row["profile"],
            study_uid=row["study_uid"],
            instances=int(row["instances"]),
            dropped_instances=int(row["dropped_instances"]),
            decided_at=float(row["decided_at"]),
        )

    def label(self, name: str) -> str:
        """One of the XNAT labels by its name: `project`, `subject` or `session`."""
        return {"project": self.project, "subject": self.subject, "session": self.session}[name]


@dataclass(frozen=True, slots=True)
class Delivery:
    """Where a routed batch's delivery is (the `deliveries` table): its step, its attempts, what XNAT answered."""

    batch_id: int
    step: Step
    attempts: int  # failed attempts of the current step
    next_attempt_at: float
    started_at: float
    step_started_at: float
    last_error: str | None
    zip_path: str | None  # relative to the state directory
    zip_size: int | None
    zip_sha256: str | None
    prearchive_url: str | None
    archive_uri: str | None
    build_requested_at: float | None
    finished_at: float | None
    answered: bool  # XNAT answered the last import
    shortfalls: int  # resends of instances XNAT did not keep
    faults: int  # XNAT faults (5xx, resets) counted apart from attempts
    retried_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Delivery:
        return cls(
            batch_id=int(row["batch_id"]),
            step=Step(row["step"]),
            attempts=int(row["attempts"]),
            next_attempt_at=float(row["next_attempt_at"]),
            started_at=float(row["started_at"]),
            step_started_at=float(row["step_started_at"]),
            last_error=row["last_error"],
            zip_path=row["zip_path"],
            zip_size=row["zip_size"],
            zip_sha256=row["zip_sha256"],
            prearchive_url=row["prearchive_url"],
            archive_uri=row["archive_uri"],
            build_requested_at=row["build_requested_at"],
            finished_at=row["finished_at"],
            answered=bool(row["answered"]),
            shortfalls=int(row["shortfalls"]),
            faults=int(row["faults"]),
            retried_at=row["retried_at"],
        )
