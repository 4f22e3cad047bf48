"""The journal: ingestd's state in SQLite (WAL). The connection and its writes are in `store`, the tables and
migrations in `schema`, the typed rows in `rows`."""

from ingestd.journal.rows import (
    BatchInstance,
    BatchRow,
    Delivery,
    InstanceRow,
    Outgoing,
    Quarantined,
    Route,
    RouteRecord,
    Source,
    Superseded,
    Totals,
)
from ingestd.journal.schema import SCHEMA_VERSION, JournalVersionError
from ingestd.journal.store import Journal, Tx
from ingestd.states import StudyState

__all__ = [
    "SCHEMA_VERSION",
    "BatchInstance",
    "BatchRow",
    "Delivery",
    "InstanceRow",
    "Journal",
    "JournalVersionError",
    "Outgoing",
    "Quarantined",
    "Route",
    "RouteRecord",
    "Source",
    "StudyState",
    "Superseded",
    "Totals",
    "Tx",
]
