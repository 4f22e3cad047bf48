"""Retention's reads of the journal (a read-only connection of its own: a snapshot, never the write lock) and its
writes (through `Journal.transaction`, each one re-checking what the plan was made from)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from ingestd.journal import Tx
from ingestd.journal.schema import check_version
from ingestd.retention.plan import BatchFacts, BatchPaths, QuarantineFacts
from ingestd.states import StudyState

__all__ = [
    "LAST_RUN_KEY",
    "REMOVED_RECEIPTS_KEY",
    "batch_paths",
    "count_rows",
    "delete_rows",
    "last_run",
    "mark_batch_purged",
    "mark_quarantine_purged",
    "protected_paths",
    "purged_quarantine",
    "read_batches",
    "read_only",
    "read_quarantine",
    "record_last_run",
    "removed_receipts",
    "snapshot",
]

LAST_RUN_KEY = "retention_last_run"  # the journal's `meta` row: when retention last ran and what it removed
REMOVED_RECEIPTS_KEY = "retention_removed_receipts"  # ... what the receipts it deleted counted
_TERMINAL = (StudyState.DELIVERED, StudyState.RELEASED)
# The rows of the batches listed (JSON, ?1) that are still delivered (?2); of the receipts, all but the newest of
# all: SQLite gives a new row the highest id + 1, and the metrics count the receipts above the highest id they saw;
# were the newest deleted, the next ones would reuse ids already passed.
_TALLY_RECEIPTS = (
    "SELECT source_kind, source, outcome, count(*), coalesce(sum(size), 0) FROM receipts"
    " WHERE batch_id IN (SELECT value FROM json_each(?1)) AND batch_id IN (SELECT id FROM batches WHERE state = ?2)"
    " AND id < (SELECT max(id) FROM receipts) GROUP BY 1, 2, 3"
)
_DELETE_RECEIPTS = (
    "DELETE FROM receipts"
    " WHERE batch_id IN (SELECT value FROM json_each(?1)) AND batch_id IN (SELECT id FROM batches WHERE state = ?2)"
    " AND id < (SELECT max(id) FROM receipts)"
)
_DELETE_OUTGOING = (
    "DELETE FROM outgoing"
    " WHERE batch_id IN (SELECT value FROM json_each(?1)) AND batch_id IN (SELECT id FROM batches WHERE state = ?2)"
)


@contextmanager
def read_only(journal_path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the journal (each statement reads the latest commit; `snapshot` for several)."""
    with closing(sqlite3.connect(f"file:{journal_path}?mode=ro", uri=True, isolation_level=None)) as db:
        check_version(db, journal_path)
        yield db


@contextmanager
def snapshot(db: sqlite3.Connection) -> Iterator[None]:
    """Read the statements of the block from one snapshot of the journal."""
    db.execute("BEGIN")
    try:
        yield
    finally:
        db.execute("COMMIT")


def _ids(ids: Iterable[int]) -> str:
    return json.dumps(sorted(set(ids)))


def read_batches(db: sqlite3.Connection) -> list[BatchFacts]:
    """The delivered and released batches (by the index of states: no other batch is ever read)."""
    rows = db.execute(
        "SELECT id, state, state_changed, purged_at FROM batches WHERE state IN (?, ?)", _TERMINAL
    ).fetchall()
    return [BatchFacts(int(r[0]), str(r[1]), float(r[2]), r[3]) for r in rows]


def read_quarantine(db: sqlite3.Connection) -> list[QuarantineFacts]:
    rows = db.execute("SELECT id, path, at, purged_at FROM quarantine WHERE purged_at IS NULL").fetchall()
    return [QuarantineFacts(int(r[0]), str(r[1]), float(r[2]), r[3]) for r in rows]


def purged_quarantine(journal_path: Path) -> dict[str, float]:
    """The quarantined items whose files retention removed, by name (`ingestd status` shows them as purged): the
    row stays, the file and its reason sidecar are gone."""
    with read_only(journal_path) as db:
        rows = db.execute("SELECT path, purged_at FROM quarantine WHERE purged_at IS NOT NULL").fetchall()
    return {str(path): float(at) for path, at in rows}


def batch_paths(db: sqlite3.Connection, batch_id: int) -> BatchPaths:
    """Every path the journal knows for one batch, relative to the state directory."""
    spool = tuple(
        f"spool/{r[0]}" for r in db.execute("SELECT spool_path FROM instances WHERE batch_id = ?", (batch_id,))
    )
    outgoing = tuple(str(r[0]) for r in db.execute("SELECT path FROM outgoing WHERE batch_id = ?", (batch_id,)))
    superseded = tuple(str(r[0]) for r in db.execute("SELECT path FROM superseded WHERE batch_id = ?", (batch_id,)))
    row = db.execute("SELECT zip_path FROM deliveries WHERE batch_id = ?", (batch_id,)).fetchone()
    attachments = tuple(
        str(r[0]) for r in db.execute("SELECT spool_path FROM attached_files WHERE batch_id = ?", (batch_id,))
    )
    return BatchPaths(spool, outgoing, superseded, row[0] if row else None, attachments)


def protected_paths(db: sqlite3.Connection) -> set[str]:
    """Every path that a batch ingestd is still working on refers to (receiving, complete, routed or held: read
    by the index of states, so a few batches however many were ever delivered), an attachment set's files too."""
    active = tuple(state for state in StudyState if state not in _TERMINAL)
    query = (
        "SELECT 'spool/' || x.spool_path FROM batches b JOIN instances x ON x.batch_id = b.id"
        " WHERE b.state IN (SELECT value FROM json_each(?1))"
        " UNION ALL SELECT x.path FROM batches b JOIN outgoing x ON x.batch_id = b.id"
        " WHERE b.state IN (SELECT value FROM json_each(?1))"
        " UNION ALL SELECT x.path FROM batches b JOIN superseded x ON x.batch_id = b.id"
        " WHERE b.state IN (SELECT value FROM json_each(?1))"
        " UNION ALL SELECT x.zip_path FROM batches b JOIN deliveries x ON x.batch_id = b.id"
        " WHERE x.zip_path IS NOT NULL AND b.state IN (SELECT value FROM json_each(?1))"
        " UNION ALL SELECT x.spool_path FROM batches b JOIN attached_files x ON x.batch_id = b.id"
        " WHERE b.state IN (SELECT value FROM json_each(?1))"
    )
    return {str(row[0]) for row in db.execute(query, (json.dumps([str(state) for state in active]),))}


def count_rows(db: sqlite3.Connection, batch_ids: Iterable[int]) -> tuple[int, int]:
    """(receipts, outgoing rows) of the batches `batch_ids`."""
    ids = _ids(batch_ids)
    receipts = db.execute(  # as `delete_rows` will: all but the newest receipt of all
        "SELECT count(*) FROM receipts WHERE batch_id IN (SELECT value FROM json_each(?))"
        " AND id < (SELECT max(id) FROM receipts)",
        (ids,),
    )
    outgoing = db.execute("SELECT count(*) FROM outgoing WHERE batch_id IN (SELECT value FROM json_each(?))", (ids,))
    return int(receipts.fetchone()[0]), int(outgoing.fetchone()[0])


def removed_receipts(db: sqlite3.Connection) -> dict[tuple[str, str, str], tuple[int, int]]:
    """What the receipts retention deleted counted, by (source kind, source, outcome): (instances, bytes)."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (REMOVED_RECEIPTS_KEY,)).fetchone()
    try:
        entries = json.loads(row[0]) if row else []
        return {(str(k), str(s), str(o)): (int(c), int(b)) for k, s, o, c, b in entries}
    except (ValueError, TypeError):
        return {}


def last_run(db: sqlite3.Connection) -> dict[str, Any] | None:
    """When retention last ran and what it removed (None: never)."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (LAST_RUN_KEY,)).fetchone()
    if row is None:
        return None
    try:
        value = json.loads(row[0])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# -- writes (inside the caller's transaction) ----------------------------------------------------------------------


def mark_batch_purged(tx: Tx, batch: BatchFacts, now: float) -> bool:
    """Whether the batch is still as planned (same state, same time, not purged); if so, mark it purged and forget
    its superseded copies (their files are gone). Call it first in the transaction that removes its files."""
    row = tx.execute("SELECT state, state_changed, purged_at FROM batches WHERE id = ?", (batch.id,)).fetchone()
    if row is None or row[0] != batch.state or float(row[1]) != batch.state_changed or row[2] is not None:
        return False
    tx.execute("UPDATE batches SET purged_at = ? WHERE id = ?", (now, batch.id))
    tx.execute("DELETE FROM superseded WHERE batch_id = ?", (batch.id,))
    return True


def mark_quarantine_purged(tx: Tx, ids: Iterable[int], now: float) -> int:
    cursor = tx.execute(
        "UPDATE quarantine SET purged_at = ? WHERE purged_at IS NULL AND id IN (SELECT value FROM json_each(?))",
        (now, _ids(ids)),
    )
    return int(cursor.rowcount)


def delete_rows(tx: Tx, batch_ids: Iterable[int]) -> tuple[int, int]:
    """Delete the receipts and outgoing rows of the batches `batch_ids` that are still delivered. What the receipts
    counted is added to the journal's tally of removed receipts first (`removed_receipts`), so that the metrics'
    received totals, read from the journal, do not go down."""
    parameters = (_ids(batch_ids), StudyState.DELIVERED)
    tally = removed_receipts(tx.connection)
    for kind, source, outcome, count, size in tx.execute(_TALLY_RECEIPTS, parameters).fetchall():
        before = tally.get((kind, source, outcome), (0, 0))
        tally[kind, source, outcome] = (before[0] + int(count), before[1] + int(size))
    value = json.dumps([[*key, *counts] for key, counts in sorted(tally.items())])
    tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (REMOVED_RECEIPTS_KEY, value))
    receipts = tx.execute(_DELETE_RECEIPTS, parameters).rowcount
    outgoing = tx.execute(_DELETE_OUTGOING, parameters).rowcount
    return int(receipts), int(outgoing)


def record_last_run(tx: Tx, now: float, purged: dict[str, tuple[int, int]], failures: int) -> None:
    value = {"at": now, "purged": {kind: list(pair) for kind, pair in purged.items()}, "failures": failures}
    tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (LAST_RUN_KEY, json.dumps(value)))
