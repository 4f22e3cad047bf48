"""The journal: ingestd's state in SQLite (WAL), the single source of truth for instances and studies.

A study is kept as batches: `(study_uid, batch)`. Instances that arrive after a batch left `receiving`
open the next batch of the same study. The journal holds no file contents, only facts and spool paths
built from validated UIDs. Its tables and migrations are in `ingestd.journal.schema`, its rows in
`ingestd.journal.rows`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ingestd.header import InstanceHeader
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
)
from ingestd.journal.schema import JournalVersionError, check_version, create_or_migrate
from ingestd.states import RETRY_STEP, Step, StudyState, check_batch_transition, check_step_transition

__all__ = ["RELEASED_PREFIX", "Journal", "Tx"]

_LOCK_TIMEOUT = 30.0
RELEASED_PREFIX = "released by a person: "  # what `release_batch` puts before the hold's reason


class Tx:
    """One open write transaction (`Journal.transaction()`): the writes that only make sense inside one.

    Only `Journal.transaction` makes one; its methods write through the transaction's connection, and the
    transaction commits or rolls back as the `with` block ends.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        return self.connection.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any]) -> sqlite3.Cursor:
        return self.connection.executemany(sql, parameters)

    def receiving_batch(self, study_uid: str, source: Source, now: float) -> tuple[int, int]:
        """The (id, number) of the study's batch still receiving, opening the next batch if there is none."""
        row = self.connection.execute(
            "SELECT id, batch, state FROM batches WHERE study_uid = ? ORDER BY batch DESC LIMIT 1",
            (study_uid,),
        ).fetchone()
        if row is not None and row["state"] == StudyState.RECEIVING:
            return row["id"], row["batch"]
        number = 1 if row is None else row["batch"] + 1
        return self._open_batch(study_uid, number, source, now), number

    def batch_for(self, study_uid: str, number: int, source: Source, now: float) -> int:
        """The id of batch `number` of a study, created in `receiving` if the journal lacks it."""
        row = self.connection.execute(
            "SELECT id FROM batches WHERE study_uid = ? AND batch = ?", (study_uid, number)
        ).fetchone()
        if row is not None:
            return int(row["id"])
        return self._open_batch(study_uid, number, source, now)

    def _open_batch(self, study_uid: str, number: int, source: Source, now: float) -> int:
        cursor = self.connection.execute(
            "INSERT INTO batches (study_uid, batch, state, source_kind, source, first_received, last_received,"
            " state_changed) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (study_uid, number, StudyState.RECEIVING, source.kind, source.name, now, now, now),
        )
        return int(cursor.lastrowid or 0)

    def insert_instance(
        self,
        batch_id: int,
        header: InstanceHeader,
        size: int,
        data_offset: int,
        source: Source,
        now: float,
        spool_path: str,
        data_sha256: str | None = None,
    ) -> None:
        self.connection.execute(
            "INSERT INTO instances (batch_id, study_uid, series_uid, sop_uid, sop_class_uid, transfer_syntax,"
            " modality, series_number, size, data_offset, source_kind, source, source_detail, received_at,"
            " spool_path, data_sha256, upload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                batch_id,
                header.study_uid,
                header.series_uid,
                header.sop_uid,
                header.sop_class_uid,
                header.transfer_syntax,
                header.modality,
                header.series_number,
                size,
                data_offset,
                source.kind,
                source.name,
                source.detail,
                now,
                spool_path,
                data_sha256,
                source.upload,
            ),
        )
        self.connection.execute("UPDATE batches SET last_received = ? WHERE id = ?", (now, batch_id))

    def update_instance(
        self,
        instance_id: int,
        header: InstanceHeader,
        size: int,
        data_offset: int,
        source: Source,
        now: float,
        data_sha256: str | None = None,
    ) -> None:
        self.connection.execute(
            "UPDATE instances SET series_uid = ?, sop_class_uid = ?, transfer_syntax = ?, modality = ?,"
            " series_number = ?, size = ?, data_offset = ?, source_kind = ?, source = ?, source_detail = ?,"
            " received_at = ?, data_sha256 = ?, upload = ? WHERE id = ?",
            (
                header.series_uid,
                header.sop_class_uid,
                header.transfer_syntax,
                header.modality,
                header.series_number,
                size,
                data_offset,
                source.kind,
                source.name,
                source.detail,
                now,
                data_sha256,
                source.upload,
                instance_id,
            ),
        )
        self.connection.execute(
            "UPDATE batches SET last_received = ? WHERE id = (SELECT batch_id FROM instances WHERE id = ?)",
            (now, instance_id),
        )

    def add_superseded(self, instance_id: int, path: str, now: float) -> None:
        """Record that the copy of an instance stored so far was kept aside at `path` (relative to the state
        directory), replaced by a copy with other content, with a `superseded` receipt in its name."""
        self.connection.execute(
            "INSERT INTO superseded (batch_id, instance_id, sop_uid, path, size, source_kind, source, source_detail,"
            " received_at, at) SELECT batch_id, id, sop_uid, ?, size, source_kind, source, source_detail,"
            " received_at, ? FROM instances WHERE id = ?",
            (path, now, instance_id),
        )
        self.connection.execute(
            "INSERT INTO receipts (batch_id, sop_uid, outcome, source_kind, source, size, at)"
            " SELECT batch_id, sop_uid, 'superseded', source_kind, source, size, ? FROM instances WHERE id = ?",
            (now, instance_id),
        )

    def add_receipt(self, batch_id: int, sop_uid: str, outcome: str, source: Source, size: int, now: float) -> None:
        self.connection.execute(
            "INSERT INTO receipts (batch_id, sop_uid, outcome, source_kind, source, size, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (batch_id, sop_uid, outcome, source.kind, source.name, size, now),
        )


class Journal:
    """A connection to the journal, safe to share between threads (one writer at a time).

    Several processes may open the same journal. Writers take SQLite's write lock with BEGIN IMMEDIATE and
    retry every fraction of a millisecond while another holds it: SQLite's own busy handler sleeps 1, 2, 5,
    10 ms and more between tries, which made two receiver processes slower than one.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        uri = f"file:{path}?mode=ro" if read_only else f"file:{path}"
        self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=0)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        if read_only:
            self._check_readable()
        else:
            self._db.execute("PRAGMA journal_mode = WAL")
            # FULL: a committed row survives power loss and reboot, not only a killed process.
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._create_schema()

    def _create_schema(self) -> None:  # a new journal at the current schema, or an older one migrated, at once
        with self.transaction() as tx:
            create_or_migrate(tx.connection, self.path)

    def _check_readable(self) -> None:
        """A reader cannot migrate: it refuses a journal of another schema, saying what to do."""
        try:
            with self._lock:
                check_version(self._db, self.path)
        except JournalVersionError:
            self._db.close()
            raise

    def schema_version(self) -> int:
        return int(self.meta("schema_version") or 0)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """Run the block as one write transaction, taken at once (BEGIN IMMEDIATE); commit or roll back.

        The writes that must share a transaction with others (a batch opened, an instance and its receipt) are
        methods of the `Tx` it yields, and of nothing else: they cannot be called outside one.
        """
        with self._lock:
            self._begin()
            try:
                yield Tx(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _begin(self, timeout: float = _LOCK_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        pause = 0.0001
        while True:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise sqlite3.OperationalError(
                        f"the journal {self.path} stayed locked by another writer for {timeout:.0f} s"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 1.5, 0.005)

    # -- instances ---------------------------------------------------------------------------------

    def find_instance(self, study_uid: str, sop_uid: str) -> InstanceRow | None:
        """The newest stored copy of an instance in any batch of its study."""
        with self._lock:
            row = self._db.execute(
                "SELECT i.id, i.batch_id, b.state, i.sop_uid, i.size, i.data_offset, i.spool_path, i.data_sha256 "
                "FROM instances i JOIN batches b ON b.id = i.batch_id "
                "WHERE i.study_uid = ? AND i.sop_uid = ? ORDER BY b.batch DESC LIMIT 1",
                (study_uid, sop_uid),
            ).fetchone()
        return InstanceRow(*row) if row else None

    def next_batch_number(self, study_uid: str) -> int:
        """The number of the batch a new instance of the study would join now (a read; no lock taken)."""
        with self._lock:
            row = self._db.execute(
                "SELECT batch, state FROM batches WHERE study_uid = ? ORDER BY batch DESC LIMIT 1", (study_uid,)
            ).fetchone()
        if row is None:
            return 1
        return int(row["batch"]) + (0 if row["state"] == StudyState.RECEIVING else 1)

    def set_instance_digest(self, instance_id: int, data_sha256: str) -> None:  # journaled before digests were kept
        with self._lock:
            self._db.execute("UPDATE instances SET data_sha256 = ? WHERE id = ?", (data_sha256, instance_id))

    def query(self, sql: str, parameters: Any = ()) -> list[sqlite3.Row]:  # a read for a module of this package
        with self._lock:
            return self._db.execute(sql, parameters).fetchall()

    def superseded(self) -> list[Superseded]:
        """The copies kept aside because a different copy of the same instance replaced them, newest first."""
        rows = self.query(
            "SELECT s.batch_id, b.study_uid, s.sop_uid, s.path, s.size, s.source_kind, s.source, s.received_at,"
            " s.at FROM superseded s JOIN batches b ON b.id = s.batch_id ORDER BY s.at DESC"
        )
        return [Superseded(*row) for row in rows]

    def spool_paths(self) -> set[str]:
        return {row[0] for row in self.query("SELECT spool_path FROM instances")}

    def instance_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM instances").fetchone()[0])

    # -- studies -----------------------------------------------------------------------------------

    def batches(self, states: tuple[str, ...] | None = None) -> list[BatchRow]:
        """Every batch (or those in `states`), newest first, with series, instance and byte counts."""
        with self._lock:
            rows = self._db.execute(
                "SELECT b.id, b.study_uid, b.batch, b.state, b.source_kind, b.source, b.first_received,"
                " b.last_received, b.state_changed, b.reason, b.hold_code, b.failures, b.retry_at,"
                " b.note, b.forced_rule, b.purged_at, count(DISTINCT i.series_uid),"
                " count(i.id) + coalesce(max(f.files), 0), coalesce(sum(i.size), 0) + coalesce(max(f.size), 0),"
                " b.kind, b.upload FROM batches b LEFT JOIN instances i ON i.batch_id = b.id LEFT JOIN ("
                "SELECT batch_id, count(*) AS files, sum(size) AS size FROM attached_files GROUP BY batch_id"
                ") f ON f.batch_id = b.id WHERE ?1 IS NULL OR b.state IN (SELECT value FROM json_each(?1))"
                " GROUP BY b.id ORDER BY b.last_received DESC",
                (json.dumps(states) if states else None,),
            ).fetchall()
        return [BatchRow(*row) for row in rows]

    def complete_batch(self, batch_id: int, last_received: float, now: float) -> bool:
        """Move a receiving batch to `complete` unless an instance arrived after `last_received`."""
        check_batch_transition(batch_id, StudyState.RECEIVING, StudyState.COMPLETE)
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE batches SET state = ?, state_changed = ?, failures = 0, retry_at = 0"
                " WHERE id = ? AND state = ? AND last_received = ?",
                (StudyState.COMPLETE, now, batch_id, StudyState.RECEIVING, last_received),
            )
            return cursor.rowcount == 1

    def batch_instances(self, batch_id: int) -> list[BatchInstance]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, series_uid, sop_uid, sop_class_uid, modality, source_kind, source, source_detail,"
                " spool_path FROM instances WHERE batch_id = ? ORDER BY series_uid, id",
                (batch_id,),
            ).fetchall()
        return [BatchInstance(*row) for row in rows]

    def hold_batch(
        self, batch_id: int, code: str, reason: str, now: float, *, from_state: str = StudyState.COMPLETE
    ) -> bool:
        """Move a batch to `held` with a short code and the reason (neither may carry patient data)."""
        check_batch_transition(batch_id, from_state, StudyState.HELD)
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE batches SET state = ?, state_changed = ?, reason = ?, hold_code = ? WHERE id = ? AND state = ?",
                (StudyState.HELD, now, reason, code, batch_id, from_state),
            )
            return cursor.rowcount == 1

    def record_failure(self, batch_id: int, state: str, retry_at: float) -> int:
        """Count one unexpected failure of the stage a batch is in (`state`); return the failures so far."""
        with self.transaction() as db:
            db.execute(
                "UPDATE batches SET failures = failures + 1, retry_at = ? WHERE id = ? AND state = ?",
                (retry_at, batch_id, state),
            )
            row = db.execute("SELECT failures FROM batches WHERE id = ?", (batch_id,)).fetchone()
            return int(row[0]) if row else 0

    def route_batch(self, batch_id: int, route: RouteRecord, outgoing: list[Outgoing], now: float) -> bool:
        """Record a complete batch's route and outgoing instances and move it to `routed`, in one transaction."""
        check_batch_transition(batch_id, StudyState.COMPLETE, StudyState.ROUTED)
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE batches SET state = ?, state_changed = ?, reason = NULL, hold_code = NULL, failures = 0,"
                " retry_at = 0 WHERE id = ? AND state = ?",
                (StudyState.ROUTED, now, batch_id, StudyState.COMPLETE),
            )
            if cursor.rowcount != 1:
                return False
            db.execute(
                "INSERT INTO routes (batch_id, rule, rules_version, server, project, subject, session, archive,"
                " profile, study_uid, instances, dropped_instances, decided_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    batch_id,
                    route.rule,
                    route.rules_version,
                    route.server,
                    route.project,
                    route.subject,
                    route.session,
                    int(route.archive),
                    route.profile,
                    route.study_uid,
                    len(outgoing),
                    sum(count for _series, count, _reason in route.dropped),
                    now,
                ),
            )
            db.executemany(
                "INSERT INTO dropped_series (batch_id, series_uid, instances, reason) VALUES (?, ?, ?, ?)",
                [(batch_id, series, count, reason) for series, count, reason in route.dropped],
            )
            db.executemany(
                "INSERT INTO outgoing (batch_id, instance_id, series_uid, sop_uid, path, size)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(batch_id, o.instance_id, o.series_uid, o.sop_uid, o.path, o.size) for o in outgoing],
            )
            return True

    def routes(self, state: StudyState | None = None) -> dict[int, Route]:
        """The route of every routed batch (or of those now in `state`), by batch id."""
        with self._lock:
            if state is None:
                rows = self._db.execute("SELECT * FROM routes").fetchall()
            else:  # by the index of batches' states: a few rows, however many batches were ever routed
                rows = self._db.execute(
                    "SELECT r.* FROM batches b JOIN routes r ON r.batch_id = b.id WHERE b.state = ?", (state,)
                ).fetchall()
        return {int(row["batch_id"]): Route.from_row(row) for row in rows}

    def route(self, batch_id: int) -> Route | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM routes WHERE batch_id = ?", (batch_id,)).fetchone()
        return Route.from_row(row) if row else None

    def outgoing(self, batch_id: int) -> list[Outgoing]:
        with self._lock:
            rows = self._db.execute(
                "SELECT instance_id, series_uid, sop_uid, path, size, verified FROM outgoing WHERE batch_id = ?"
                " ORDER BY id",
                (batch_id,),
            ).fetchall()
        return [Outgoing(*row) for row in rows]

    # -- the daemon's own facts ------------------------------------------------------------------------

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        rows = self.query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def meta_items(self, prefix: str) -> list[tuple[str, str]]:
        """Every (key, value) whose key starts with `prefix`, by key."""
        with self._lock:
            rows = self._db.execute(
                "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ? ORDER BY key", (len(prefix), prefix)
            ).fetchall()
        return [(str(key), str(value)) for key, value in rows]

    # -- deliveries ------------------------------------------------------------------------------------

    def batch_state(self, batch_id: int) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return str(row[0]) if row else None

    def delivery(self, batch_id: int) -> Delivery | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM deliveries WHERE batch_id = ?", (batch_id,)).fetchone()
        return Delivery.from_row(row) if row else None

    def deliveries(self) -> dict[int, Delivery]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM deliveries").fetchall()
        return {int(row["batch_id"]): Delivery.from_row(row) for row in rows}

    def start_delivery(self, batch_id: int, now: float) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO deliveries (batch_id, step, next_attempt_at, started_at, step_started_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (batch_id, Step.PACKAGE, now, now, now),
            )

    def update_delivery(self, batch_id: int, **fields: Any) -> None:
        """Set columns of a batch's delivery row in one transaction (column names are ours, never input).

        A new `step` must be a declared transition from the current one (`ingestd.states.STEP_TRANSITIONS`).
        """
        names = ", ".join(f"{name} = ?" for name in fields)
        with self.transaction() as db:
            if "step" in fields:
                row = db.execute("SELECT step FROM deliveries WHERE batch_id = ?", (batch_id,)).fetchone()
                if row is not None:
                    check_step_transition(batch_id, row[0], str(fields["step"]))
            db.execute(f"UPDATE deliveries SET {names} WHERE batch_id = ?", (*fields.values(), batch_id))  # noqa: S608

    def finish_delivery(self, batch_id: int, now: float) -> bool:
        """Record that XNAT holds every outgoing instance of a routed batch: step `done`, state `delivered`."""
        check_batch_transition(batch_id, StudyState.ROUTED, StudyState.DELIVERED)
        with self.transaction() as db:
            row = db.execute("SELECT step FROM deliveries WHERE batch_id = ?", (batch_id,)).fetchone()
            if row is not None:
                check_step_transition(batch_id, row[0], Step.DONE)
            # The one promise this method exists for: never "delivered" on anything less than every outgoing instance
            # seen where the route says (the archive when it archives; else the archive or a READY session).
            unverified = db.execute(
                "SELECT count(*) FROM outgoing o JOIN routes r ON r.batch_id = o.batch_id WHERE o.batch_id = ?"
                " AND (o.verified IS NULL OR o.verified NOT IN ('archive', 'prearchive')"
                " OR (r.archive AND o.verified != 'archive'))",
                (batch_id,),
            ).fetchone()[0]
            if unverified:
                raise AssertionError(f"batch {batch_id}: {unverified} outgoing instances are not verified in XNAT")
            db.execute("UPDATE deliveries SET step = ?, finished_at = ? WHERE batch_id = ?", (Step.DONE, now, batch_id))
            cursor = db.execute(
                "UPDATE batches SET state = ?, state_changed = ?, reason = NULL, hold_code = NULL"
                " WHERE id = ? AND state = ?",
                (StudyState.DELIVERED, now, batch_id, StudyState.ROUTED),
            )
            return cursor.rowcount == 1

    def verification(self) -> dict[int, tuple[int, int]]:
        """Per routed batch: (outgoing instances, those XNAT was last seen to hold, anywhere)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT batch_id, count(*), count(verified) FROM outgoing"
                " WHERE batch_id IN (SELECT id FROM batches WHERE state = ?) GROUP BY batch_id",
                (StudyState.ROUTED,),
            ).fetchall()
        return {int(row[0]): (int(row[1]), int(row[2])) for row in rows}

    def set_verified(self, batch_id: int, places: dict[str, str | None], now: float) -> None:
        """Record where XNAT holds each outgoing instance (by SOP Instance UID as it leaves): `archive`,
        `prearchive` (a READY session), `broken` (a session in CONFLICT or ERROR), or None (not found); in one
        transaction, as seen in one look at XNAT."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE outgoing SET verified = ?, verified_at = ? WHERE batch_id = ? AND sop_uid = ?",
                [(place, now if place else None, batch_id, sop_uid) for sop_uid, place in places.items()],
            )

    def spool_files(self, batch_id: int) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT spool_path FROM instances WHERE batch_id = ?", (batch_id,))]

    # -- held batches: a person's decisions ------------------------------------------------------------

    def retry_batch(self, batch_id: int, now: float) -> str | None:
        """Put a held batch back to work: routing again, or its delivery from the step that can make progress
        (`ingestd.states.RETRY_STEP`: `verify` once anything was sent), with a fresh schedule and budget.

        Returns the state it moved to, or None if it was not held.
        """
        with self.transaction() as db:
            row = db.execute("SELECT state FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None or row["state"] != StudyState.HELD:
                return None
            routed = db.execute("SELECT 1 FROM routes WHERE batch_id = ?", (batch_id,)).fetchone() is not None
            state = StudyState.ROUTED if routed else StudyState.COMPLETE
            check_batch_transition(batch_id, StudyState.HELD, state)
            db.execute(
                "UPDATE batches SET state = ?, state_changed = ?, reason = NULL, hold_code = NULL, failures = 0,"
                " retry_at = 0 WHERE id = ?",
                (state, now, batch_id),
            )
            delivery = db.execute("SELECT step FROM deliveries WHERE batch_id = ?", (batch_id,)).fetchone()
            if delivery is not None:
                db.execute(
                    "UPDATE deliveries SET step = ?, attempts = 0, faults = 0, shortfalls = 0, answered = 0,"
                    " next_attempt_at = ?, started_at = ?, step_started_at = ?, last_error = NULL,"
                    " build_requested_at = NULL, retried_at = ? WHERE batch_id = ?",
                    (RETRY_STEP[Step(delivery["step"])], now, now, now, now, batch_id),
                )
            return str(state)

    def release_batch(self, batch_id: int, now: float) -> bool:
        """A person takes a held batch over: ingestd stops working on it and deletes nothing."""
        check_batch_transition(batch_id, StudyState.HELD, StudyState.RELEASED)
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE batches SET state = ?, state_changed = ?, reason = ? || reason WHERE id = ? AND state = ?",
                (StudyState.RELEASED, now, RELEASED_PREFIX, batch_id, StudyState.HELD),
            )
            return cursor.rowcount == 1

    # -- quarantine --------------------------------------------------------------------------------

    def add_quarantine(self, path: str, reason: str, source: Source, now: float, sha256: str | None = None) -> None:
        """Journal an item kept in quarantine: why, from where, and its content's SHA-256 (None: a moved file)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO quarantine (path, reason, source_kind, source, source_detail, sha256, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (path, reason, source.kind, source.name, source.detail, sha256, now),
            )

    def quarantined_copies(self, source: Source, sha256: str) -> list[str]:
        """The names of the items kept from `source` with content `sha256` and not purged, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT path FROM quarantine WHERE sha256 = ? AND source_kind = ? AND source = ? AND source_detail = ?"
                " AND purged_at IS NULL ORDER BY id DESC",
                (sha256, source.kind, source.name, source.detail),
            )
            return [str(row[0]) for row in rows]

    def quarantined(self) -> list[Quarantined]:
        with self._lock:
            sql = "SELECT path, reason, source_kind, source, at, purged_at FROM quarantine ORDER BY at DESC"
            return [Quarantined(*row) for row in self._db.execute(sql)]
