"""The journal's tables (DDL) and the migrations from each earlier schema version, applied at open.

A writer opening a journal reads its `schema_version` (table `meta`), applies every migration after it in order and
then the DDL (`CREATE ... IF NOT EXISTS`: new tables), all in one transaction: an upgrade interrupted half-way leaves
the journal as it was. A reader never migrates; it refuses a journal of another version, saying what to do.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ingestd.errors import IngestdError
from ingestd.states import Step, StudyState

__all__ = ["MIGRATIONS", "SCHEMA", "SCHEMA_VERSION", "JournalVersionError", "check_version", "create_or_migrate"]

SCHEMA_VERSION = 6

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    batch INTEGER NOT NULL,
    state TEXT NOT NULL,
    source_kind TEXT NOT NULL,
    source TEXT NOT NULL,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    state_changed REAL NOT NULL,
    reason TEXT,
    hold_code TEXT,
    failures INTEGER NOT NULL DEFAULT 0,
    retry_at REAL NOT NULL DEFAULT 0,
    note TEXT,
    forced_rule TEXT,
    purged_at REAL,
    kind TEXT NOT NULL DEFAULT 'dicom',
    upload TEXT,
    UNIQUE (study_uid, batch)
);
CREATE INDEX IF NOT EXISTS batches_state ON batches (state);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES batches (id),
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    modality TEXT NOT NULL,
    series_number INTEGER,
    size INTEGER NOT NULL,
    data_offset INTEGER NOT NULL,
    source_kind TEXT NOT NULL,
    source TEXT NOT NULL,
    source_detail TEXT NOT NULL,
    received_at REAL NOT NULL,
    spool_path TEXT NOT NULL UNIQUE,
    data_sha256 TEXT,
    upload TEXT,
    UNIQUE (batch_id, sop_uid)
);
CREATE INDEX IF NOT EXISTS instances_sop ON instances (study_uid, sop_uid);
CREATE INDEX IF NOT EXISTS instances_upload ON instances (source_kind, source, upload);
CREATE TABLE IF NOT EXISTS receipts (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES batches (id),
    sop_uid TEXT NOT NULL,
    outcome TEXT NOT NULL,
    source_kind TEXT NOT NULL,
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS routes (
    batch_id INTEGER PRIMARY KEY REFERENCES batches (id),
    rule TEXT NOT NULL,
    rules_version TEXT NOT NULL,
    server TEXT NOT NULL,
    project TEXT NOT NULL,
    subject TEXT NOT NULL,
    session TEXT NOT NULL,
    archive INTEGER NOT NULL,
    profile TEXT,
    study_uid TEXT NOT NULL,
    instances INTEGER NOT NULL,
    dropped_instances INTEGER NOT NULL,
    decided_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS dropped_series (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES batches (id),
    series_uid TEXT NOT NULL,
    instances INTEGER NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outgoing (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES batches (id),
    instance_id INTEGER NOT NULL REFERENCES instances (id),
    series_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    verified TEXT,
    verified_at REAL,
    UNIQUE (batch_id, sop_uid)
);
CREATE TABLE IF NOT EXISTS deliveries (
    batch_id INTEGER PRIMARY KEY REFERENCES batches (id),
    step TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    started_at REAL NOT NULL,
    step_started_at REAL NOT NULL,
    last_error TEXT,
    zip_path TEXT,
    zip_size INTEGER,
    zip_sha256 TEXT,
    prearchive_url TEXT,
    archive_uri TEXT,
    build_requested_at REAL,
    finished_at REAL,
    answered INTEGER NOT NULL DEFAULT 0,
    shortfalls INTEGER NOT NULL DEFAULT 0,
    faults INTEGER NOT NULL DEFAULT 0,
    retried_at REAL
);
CREATE TABLE IF NOT EXISTS superseded (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES batches (id),
    instance_id INTEGER NOT NULL REFERENCES instances (id),
    sop_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    source_kind TEXT NOT NULL,
    source TEXT NOT NULL,
    source_detail TEXT NOT NULL,
    received_at REAL NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    reason TEXT NOT NULL,
    source_kind TEXT NOT NULL,
    source TEXT NOT NULL,
    at REAL NOT NULL,
    purged_at REAL,
    source_detail TEXT,
    sha256 TEXT
);
CREATE INDEX IF NOT EXISTS quarantine_content ON quarantine (sha256);
CREATE TABLE IF NOT EXISTS attached_files (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES batches (id),
    relative TEXT NOT NULL,
    source_kind TEXT NOT NULL,
    source TEXT NOT NULL,
    source_detail TEXT NOT NULL,
    upload TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    md5 TEXT NOT NULL,
    spool_path TEXT NOT NULL UNIQUE,
    received_at REAL NOT NULL,
    UNIQUE (batch_id, relative)
);
CREATE INDEX IF NOT EXISTS attached_files_upload ON attached_files (source_kind, source, upload, relative);
CREATE TABLE IF NOT EXISTS attachments_out (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL REFERENCES batches (id),
    file_id INTEGER NOT NULL REFERENCES attached_files (id),
    level TEXT NOT NULL,
    scan TEXT NOT NULL DEFAULT '',
    resource TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    md5 TEXT NOT NULL,
    verified_at REAL,
    UNIQUE (batch_id, level, scan, resource, name)
);
"""


# Migrations from each earlier schema version to the next, in order. A journal is migrated when the daemon (or any
# writer) opens it; a journal from a newer ingestd is refused rather than misread.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    3: (
        # The hold's code gets its own column (it was the reason text's prefix, parsed back).
        "ALTER TABLE batches ADD COLUMN hold_code TEXT",
        "UPDATE batches SET hold_code = CASE WHEN instr(reason, ':') > 0"  # noqa: S608 - states.py's constants
        " THEN substr(reason, 1, instr(reason, ':') - 1) ELSE 'unknown' END"
        f" WHERE state = '{StudyState.HELD}'",
        # Per-batch failures of a stage (an exception no code expected), retried with back-off, then held.
        "ALTER TABLE batches ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE batches ADD COLUMN retry_at REAL NOT NULL DEFAULT 0",
        # Where XNAT was seen to hold each outgoing instance (verified by SOP Instance UID, not by counts).
        "ALTER TABLE outgoing ADD COLUMN verified TEXT",
        "ALTER TABLE outgoing ADD COLUMN verified_at REAL",
        "ALTER TABLE deliveries ADD COLUMN answered INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE deliveries ADD COLUMN shortfalls INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE deliveries ADD COLUMN faults INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE deliveries ADD COLUMN retried_at REAL",
        # Copies of an instance replaced by a different copy are kept aside (table `superseded`, created by SCHEMA).
        # A delivery that an older ingestd adopted or verified by counts is looked at again, by identity.
        f"UPDATE deliveries SET step = '{Step.VERIFY}' WHERE step IN ('{Step.IMPORTING}', '{Step.ARCHIVING}')"  # noqa: S608
        f" AND batch_id IN (SELECT id FROM batches WHERE state = '{StudyState.ROUTED}')",
    ),
    4: (
        # The SHA-256 of an instance's data set, computed as it is streamed to disk: a copy received again is
        # compared by digest, never by reading both into memory. Rows without one (from before, or a small instance
        # stored from memory) have their file hashed (read in pieces) when a copy arrives, and recorded then.
        "ALTER TABLE instances ADD COLUMN data_sha256 TEXT",
    ),
    5: (
        # What a person should know about a batch that no state says (re-sent after an earlier batch was released,
        # re-sent by `ingestd resend`): shown by `ingestd status`. No patient data.
        "ALTER TABLE batches ADD COLUMN note TEXT",
        # The rule a person chose for the batch (`ingestd resend --route RULE`): the router applies it whatever its
        # `when` says. NULL: the first rule that matches.
        "ALTER TABLE batches ADD COLUMN forced_rule TEXT",
        # When the retention worker removed the files of a released batch or a quarantined item (the row stays, as
        # the record of what happened). NULL: the files are still there.
        "ALTER TABLE batches ADD COLUMN purged_at REAL",
        "ALTER TABLE quarantine ADD COLUMN purged_at REAL",
        # Where in its source a quarantined item came from, and its content's SHA-256 (copies and archive members):
        # `ingestd import` run again finds the copy it kept before instead of keeping another (ingestd.quarantined).
        "ALTER TABLE quarantine ADD COLUMN source_detail TEXT",
        "ALTER TABLE quarantine ADD COLUMN sha256 TEXT",
    ),
    6: (
        # Attachment sets (issue 16): a batch is `dicom` (instances of one study) or `files` (non-DICOM files of one
        # upload, attached to a session as XNAT resources); tables `attached_files` and `attachments_out` are new.
        "ALTER TABLE batches ADD COLUMN kind TEXT NOT NULL DEFAULT 'dicom'",
        # The upload a batch of files (or an instance) came in: the top-level entry below a drop folder, or the
        # `ingestd import` argument; with the source's kind and name it says which files go with which study.
        "ALTER TABLE batches ADD COLUMN upload TEXT",
        "ALTER TABLE instances ADD COLUMN upload TEXT",
    ),
}


class JournalVersionError(IngestdError):
    """The journal's schema is not this ingestd's: newer (refused), or older and opened by a reader (not migrated)."""


def create_or_migrate(db: sqlite3.Connection, path: Path) -> int:
    """Create a new journal at the current schema, or migrate an older one step by step (inside the caller's
    transaction). Returns the version the journal was at (SCHEMA_VERSION for a new one)."""
    existing = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'batches'").fetchone()
    version = SCHEMA_VERSION
    if existing is not None:
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else 1
    if version > SCHEMA_VERSION:
        raise JournalVersionError(
            f"the journal {path} is at schema version {version}, written by a newer ingestd than this "
            f"one (schema {SCHEMA_VERSION}): run that version, or restore a backup of the state directory"
        )
    for step in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS.get(step, ()):
            db.execute(statement)
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    return version


def check_version(db: sqlite3.Connection, path: Path) -> None:
    """A reader cannot migrate: it refuses a journal of another schema, saying what to do."""
    has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is not None
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if has_meta else None
    version = int(row[0]) if row else 0
    if version != SCHEMA_VERSION:
        raise JournalVersionError(
            f"the journal {path} is at schema version {version}, this ingestd reads {SCHEMA_VERSION}: "
            + (
                "start the daemon (`ingestd run`) once, which migrates it"
                if version < SCHEMA_VERSION
                else "it was written by a newer ingestd; run that version"
            )
        )
