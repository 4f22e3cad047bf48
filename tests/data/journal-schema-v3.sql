-- The journal schema of ingestd at schema version 3 (before data set digests), as its _SCHEMA created it.
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
    UNIQUE (batch_id, sop_uid)
);
CREATE INDEX IF NOT EXISTS instances_sop ON instances (study_uid, sop_uid);
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
    at REAL NOT NULL
);
