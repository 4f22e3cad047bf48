"""One retention pass: plan from a snapshot of the journal, then remove, batch by batch and item by item.

A batch's files are removed inside a write transaction that first checks the batch is still as planned (delivered
or released, at the same time, not purged) and records `purged_at` only after its files are gone; a crash in between
rolls the row back, and the next pass removes what is left (nothing, or the rest) and records it. Holding the
journal's lock while the files go is what makes `ingestd unrelease` (which refuses a purged batch) and `ingestd
resend` (which links a delivered batch's copies holding the same lock) see either every file or none. It costs the
receivers' commits a wait: 0.4 s for a batch of 3000 instances kept with their outbox copies.
Quarantined items: their files first, then their rows in one transaction. Receipts and outgoing rows: deleted in
one transaction.

A batch's paths are read when its turn comes (one batch's at a time in memory, however many are due: after an
upgrade, every batch delivered before retention existed is due at once), each in a short read of its own, so a long
pass never holds a snapshot that keeps the journal's WAL from being checkpointed.

`preview` makes the same plan and measures it without writing anything (`ingestd purge --dry-run`, `status`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingestd.config import Config, Retention
from ingestd.journal import Journal
from ingestd.retention import files, store
from ingestd.retention.plan import (
    KINDS,
    BatchFacts,
    BatchRemoval,
    QuarantineFacts,
    batch_removal,
    due_batches,
    due_quarantine,
    receipt_batches,
)

__all__ = ["Failure", "Outcome", "Plan", "execute", "make_plan", "preview", "purge", "removals", "retention_summary"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What is due at `now`: batches (with their kind), quarantined items, the batches whose rows go."""

    now: float
    batches: tuple[tuple[BatchFacts, str], ...]
    protected: frozenset[str]  # paths that batches being worked on refer to: never removed
    quarantine: tuple[QuarantineFacts, ...]
    receipt_batches: tuple[int, ...]
    rows: tuple[int, int]  # (receipts, outgoing rows) of those batches, when planned


@dataclass(frozen=True, slots=True)
class Failure:
    kind: str
    item: str  # `#<batch id>` or the quarantined item's name (never a patient's data)
    error: str


@dataclass
class Outcome:
    """What a pass removed (or, for a preview, would remove): per kind, (items, bytes); and the items by name."""

    purged: dict[str, tuple[int, int]] = field(default_factory=lambda: dict.fromkeys(KINDS, (0, 0)))
    items: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    failures: list[Failure] = field(default_factory=list)

    def add(self, kind: str, count: int, size: int, item: str | None = None) -> None:
        old_count, old_size = self.purged[kind]
        self.purged[kind] = (old_count + count, old_size + size)
        if item is not None:
            self.items[kind].append(item)

    @property
    def bytes(self) -> int:
        return sum(size for _count, size in self.purged.values())


def make_plan(db: sqlite3.Connection, retention: Retention, now: float) -> Plan:
    """The plan for `now`, from one snapshot of the journal."""
    with store.snapshot(db):
        batches = store.read_batches(db)
        due = tuple(due_batches(batches, retention, now))
        protected = frozenset(store.protected_paths(db)) if due else frozenset()
        receipts = tuple(receipt_batches(batches, retention, now))
        rows = store.count_rows(db, receipts) if receipts else (0, 0)
        quarantine = tuple(due_quarantine(store.read_quarantine(db), retention, now))
    return Plan(now, due, protected, quarantine, receipts, rows)


def removals(db: sqlite3.Connection, plan: Plan) -> Iterator[tuple[BatchFacts, BatchRemoval]]:
    """Each due batch with what goes of it, read when it is its turn."""
    for batch, kind in plan.batches:
        yield batch, batch_removal(batch.id, kind, store.batch_paths(db, batch.id), plan.protected)


def preview(config: Config, now: float | None = None, *, measure: bool = True) -> Outcome:
    """What a pass would remove at `now`, measured on disk (without `measure`: counted only, 0 bytes: what `status`
    shows, which must stay fast however much is due); writes nothing (a read-only connection)."""
    outcome = Outcome()
    if not config.journal_path.exists():
        return outcome
    with store.read_only(config.journal_path) as db:
        plan = make_plan(db, config.retention, time.time() if now is None else now)
        if measure:
            for batch, removal in removals(db, plan):
                outcome.add(removal.kind, 1, _measured(files.measure, config.state_dir, removal), f"#{batch.id}")
        else:
            for batch, kind in plan.batches:
                outcome.add(kind, 1, 0, f"#{batch.id}")
    for item in plan.quarantine:
        size = _measured(files.measure_quarantine, config.quarantine_dir, item.path) if measure else 0
        outcome.add("quarantine", 1, size, item.path)
    outcome.add("receipts", plan.rows[0], 0)
    outcome.add("outgoing", plan.rows[1], 0)
    return outcome


def _measured(measure: Callable[[Path, Any], int], folder: Path, what: Any) -> int:
    """Bytes on disk, or 0 when they cannot be read (`status` as a user who may not look into every folder)."""
    try:
        return measure(folder, what)
    except OSError:
        return 0


def purge(
    config: Config,
    journal: Journal,
    now: float | None = None,
    *,
    beat: Callable[[], None] = lambda: None,
    stopping: Callable[[], bool] = lambda: False,
) -> Outcome:
    """Remove what is due at `now` (a writer's `journal`); `beat` is called after each item, and the pass ends early
    (what is left is due again next time) once `stopping()` says so."""
    with store.read_only(journal.path) as db:
        plan = make_plan(db, config.retention, time.time() if now is None else now)
    return execute(plan, config, journal, beat=beat, stopping=stopping)


def execute(
    plan: Plan,
    config: Config,
    journal: Journal,
    *,
    beat: Callable[[], None] = lambda: None,
    stopping: Callable[[], bool] = lambda: False,
) -> Outcome:
    """Carry out `plan`: each batch only if it is still as planned; record the pass in the journal's meta."""
    outcome = Outcome()
    with store.read_only(journal.path) as db:
        for batch, removal in removals(db, plan):
            if stopping():
                break
            _purge_batch(config.state_dir, journal, batch, removal, plan.now, outcome)
            beat()
    _purge_quarantine(config.quarantine_dir, journal, plan, outcome, beat, stopping)
    if plan.receipt_batches and not stopping():
        with journal.transaction() as tx:
            receipts, outgoing = store.delete_rows(tx, plan.receipt_batches)
        outcome.add("receipts", receipts, 0)
        outcome.add("outgoing", outgoing, 0)
    with journal.transaction() as tx:
        store.record_last_run(tx, plan.now, outcome.purged, len(outcome.failures))
    return outcome


def _purge_batch(
    state_dir: Path, journal: Journal, batch: BatchFacts, removal: BatchRemoval, now: float, outcome: Outcome
) -> None:
    try:
        with journal.transaction() as tx:
            if not store.mark_batch_purged(tx, batch, now):  # taken back, or purged by someone else meanwhile
                return
            freed = files.remove(state_dir, removal)  # the mark commits only once this has removed everything
    except OSError as exc:
        outcome.failures.append(Failure(removal.kind, f"#{batch.id}", exc.strerror or type(exc).__name__))
        return
    outcome.add(removal.kind, 1, freed, f"#{batch.id}")


def _purge_quarantine(
    quarantine_dir: Path,
    journal: Journal,
    plan: Plan,
    outcome: Outcome,
    beat: Callable[[], None],
    stopping: Callable[[], bool],
) -> None:
    removed: list[int] = []
    for item in plan.quarantine:
        if stopping():
            break
        try:
            freed = files.remove_quarantine(quarantine_dir, item.path)
        except OSError as exc:
            outcome.failures.append(Failure("quarantine", item.path, exc.strerror or type(exc).__name__))
            continue
        removed.append(item.id)
        outcome.add("quarantine", 1, freed, item.path)
        beat()
    if removed:
        with journal.transaction() as tx:
            store.mark_quarantine_purged(tx, removed, plan.now)


def retention_summary(config: Config, now: float | None = None) -> dict[str, Any]:
    """What `ingestd status` shows of retention: when it last ran and what it removed then, what it would remove
    now (per kind: [items, None]: counted, not measured, so that `status` stays fast however much is due; `ingestd
    purge --dry-run` measures) and how often it runs. Read-only."""
    last: dict[str, Any] | None = None
    if config.journal_path.exists():
        with store.read_only(config.journal_path) as db:
            last = store.last_run(db)
    would = preview(config, now, measure=False)  # counts: `ingestd purge --dry-run` measures the bytes
    return {
        "last_run": None if last is None else last.get("at"),
        "last_purged": None if last is None else last.get("purged"),
        "would_purge": {kind: [count, None] for kind, (count, _size) in would.purged.items()},
        "check_interval_seconds": config.retention.check_interval_seconds,
    }
