"""The journal: ingestd's state in SQLite (WAL). See `ingestd.journal.store`."""

from ingestd.journal.store import (
    SCHEMA_VERSION,
    BatchInstance,
    BatchRow,
    InstanceRow,
    Journal,
    JournalVersionError,
    Outgoing,
    RouteRecord,
    Source,
    StudyState,
)

__all__ = [
    "SCHEMA_VERSION",
    "BatchInstance",
    "BatchRow",
    "InstanceRow",
    "Journal",
    "JournalVersionError",
    "Outgoing",
    "RouteRecord",
    "Source",
    "StudyState",
]
