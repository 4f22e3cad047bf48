"""`ingestd retry` in the journal: put a held batch back to work with the rules loaded now (its route dropped) or on
the route it has; push waiting batches to be tried at once; and the two facts `retry` and the daemon share through
the journal's meta table (the rule set the daemon runs, a request to try paused XNAT servers now).

Re-routing drops everything the router and the deliverer recorded for the batch: its `routes`, `outgoing`,
`dropped_series` and `deliveries` rows, in one transaction that also moves it from `held` to `complete`, where the
router takes it up again. Its files of that route (the de-identified copies in `outbox/<id>`, the package zip)
are removed first, while the batch is still held and no worker touches it: after the move the router may
write `outbox/<id>` again at any moment, and removing it then could take the new copies. A crash between the two
leaves a held batch with its route and without those files; nothing was sent (see below), so the next
`ingestd retry` re-routes it again. The spooled originals are never touched.

A batch whose delivery may already have put something into XNAT keeps its route unless the person says
otherwise (`sent_ok`): re-routing it would leave what XNAT holds behind (an orphan prearchive session, part of
an archived session) and send the study again under other labels. `SentEvidence` says what the journal knows.

An attachment set (a batch of kind `files`, `ingestd.journal.attachments`) is retried the same way: re-routing drops
its `routes`, `attachments_out` and `deliveries` rows in the transaction that moves it back to `complete` (its
spooled files under `attachments/` stay: they are its originals); its route is kept when XNAT may hold some of its
files already: a file was seen in XNAT's listing (`attachments_out.verified_at`), or its delivery went past
`locate` (an upload may have been sent).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from ingestd.journal.attachments import attachments_out
from ingestd.journal.rows import Route
from ingestd.journal.store import Journal, Tx
from ingestd.states import BatchKind, Step, StudyState, check_batch_transition

__all__ = [
    "DAEMON_RULES_KEY",
    "WAKE_KEY",
    "DaemonRules",
    "Pushed",
    "Retried",
    "RetryOutcome",
    "SentEvidence",
    "daemon_rules",
    "push_now",
    "record_daemon_rules",
    "request_wake",
    "retry_held",
    "sent_evidence",
    "wake_requested",
]

DAEMON_RULES_KEY = "daemon_rules"
WAKE_KEY = "wake_requested"


@dataclass(frozen=True, slots=True)
class SentEvidence:
    """What the journal knows that says XNAT may already hold part of a batch (none of it: nothing was sent)."""

    step: str
    prearchive_url: str | None  # the prearchive session XNAT filed the last import under (`/prearchive/...`)
    archive_uri: str | None  # the archived session an archive request answered
    verified: int  # outgoing instances (an attachment set: files) XNAT was last seen to hold
    instances: int  # outgoing instances (an attachment set: files) of the route
    noun: str = "instances"  # `files` for an attachment set

    def describe(self) -> str:
        """In ingestd's words: why the route is kept (no patient data: XNAT's own labels and URLs only)."""
        parts = [f"its delivery reached step {self.step}"]
        if self.verified:
            parts.append(f"XNAT was seen holding {self.verified} of its {self.instances} {self.noun}")
        if self.prearchive_url:
            parts.append(f"XNAT filed an upload as the prearchive session /data{self.prearchive_url}")
        if self.archive_uri:
            parts.append(f"XNAT archived it as {self.archive_uri}")
        return ", ".join(parts)


def _set_evidence(db: Tx, batch_id: int) -> SentEvidence | None:
    """An attachment set's: a file seen in XNAT, or a delivery past `locate` (an upload may have gone out)."""
    row = db.execute("SELECT step FROM deliveries WHERE batch_id = ?", (batch_id,)).fetchone()
    verified, files = db.execute(
        "SELECT count(verified_at), count(*) FROM attachments_out WHERE batch_id = ?", (batch_id,)
    ).fetchone()
    step = str(row["step"]) if row is not None else None
    if not verified and step in (None, Step.LOCATE):
        return None
    return SentEvidence(step or "none", None, None, int(verified), int(files), "files")


def _evidence(db: Tx, batch_id: int) -> SentEvidence | None:
    kind = db.execute("SELECT kind FROM batches WHERE id = ?", (batch_id,)).fetchone()
    if kind is not None and kind["kind"] == BatchKind.FILES:
        return _set_evidence(db, batch_id)
    row = db.execute("SELECT * FROM deliveries WHERE batch_id = ?", (batch_id,)).fetchone()
    if row is None:
        return None
    # Only a first `package` (no zip yet) and the `preflight` (reached once, before the first upload) come before
    # anything is sent; `package` and `import` are reached again by a resend, after a look at XNAT found some.
    verified, instances = db.execute(
        "SELECT count(verified), count(*) FROM outgoing WHERE batch_id = ?", (batch_id,)
    ).fetchone()
    first_package = row["step"] == Step.PACKAGE and row["zip_path"] is None
    answered = row["prearchive_url"] or row["archive_uri"] or row["answered"] or row["shortfalls"]
    if (first_package or row["step"] == Step.PREFLIGHT) and not (answered or verified):
        return None
    return SentEvidence(str(row["step"]), row["prearchive_url"], row["archive_uri"], int(verified), int(instances))


def sent_evidence(journal: Journal, batch_id: int) -> SentEvidence | None:
    """Whether the batch's delivery may already have put anything into XNAT, and what says so; None: nothing was
    sent (no delivery yet, or a first package or pre-flight with no upload and nothing seen in XNAT)."""
    with journal.transaction() as db:
        return _evidence(db, batch_id)


class RetryOutcome(StrEnum):
    """What `retry_held` did to one batch."""

    REROUTED = "rerouted"  # route dropped (or it had none): the router routes it again with the rules in force
    KEPT_ROUTE = "kept-route"  # asked to: back to its delivery on the route it has
    KEPT_SENT = "kept-sent"  # XNAT may hold part of it already: back to its delivery on its route, not re-routed
    NOT_HELD = "not-held"


@dataclass(frozen=True, slots=True)
class Retried:
    """One batch as `retry_held` left it."""

    batch_id: int
    outcome: RetryOutcome
    old_route: Route | None  # the route it had (dropped when re-routed), None if it was never routed
    sent: SentEvidence | None  # why the route was kept (KEPT_SENT), or what was sent before a forced re-route
    missing_files: int = 0  # a kept route's outgoing files that are not on disk any more


def retry_held(
    journal: Journal, state_dir: Path, batch_id: int, now: float, *, keep_route: bool = False, sent_ok: bool = False
) -> Retried:
    """Put a held batch back to work: re-routed with the rules in force (its route dropped: see the module's
    docstring), or on its route (`keep_route`, or when XNAT may hold part of it and not `sent_ok`) from the step
    that can make progress (`Journal.retry_batch`). A batch that is not held is left as it is."""
    if journal.batch_state(batch_id) != StudyState.HELD:
        return Retried(batch_id, RetryOutcome.NOT_HELD, None, None)
    route = journal.route(batch_id)
    sent = sent_evidence(journal, batch_id) if route is not None else None
    missing = 0
    if route is not None and not keep_route and (sent is None or sent_ok):
        _remove_route_files(journal, state_dir, batch_id)
        moved = _drop_route(journal, batch_id, now, sent_ok=sent_ok)
        outcome = RetryOutcome.REROUTED
    else:  # never routed (back to `complete`: routed with the rules in force), or its route kept
        if route is not None:
            missing = _missing_files(journal, state_dir, batch_id)
        moved = journal.retry_batch(batch_id, now) is not None
        outcome = (
            RetryOutcome.REROUTED
            if route is None
            else RetryOutcome.KEPT_ROUTE
            if keep_route
            else RetryOutcome.KEPT_SENT
        )
    return Retried(batch_id, outcome if moved else RetryOutcome.NOT_HELD, route, sent, missing)


def _missing_files(journal: Journal, state_dir: Path, batch_id: int) -> int:
    """A routed batch's outgoing files (a set's: its spooled files) that are not on disk any more."""
    paths = [item.path for item in journal.outgoing(batch_id)]
    paths += [item.spool_path for item in attachments_out(journal, batch_id)]
    return sum(1 for path in paths if not (state_dir / path).is_file())


def _remove_route_files(journal: Journal, state_dir: Path, batch_id: int) -> None:
    """The files of a held batch's route: its outbox folder and its package zip (never a spooled original)."""
    delivery = journal.delivery(batch_id)
    zips = {state_dir / "packages" / f"{batch_id}.zip"}
    if delivery is not None and delivery.zip_path:
        zips.add(state_dir / delivery.zip_path)
    for path in zips:
        path.unlink(missing_ok=True)
    for folder in (state_dir / "outbox" / str(batch_id), state_dir / "outbox" / f".tmp-{batch_id}"):
        shutil.rmtree(folder, ignore_errors=True)


def _drop_route(journal: Journal, batch_id: int, now: float, *, sent_ok: bool) -> bool:
    """In one transaction: drop the batch's route rows (a set's `attachments_out` too) and move it from `held` to
    `complete`. False (nothing
    changed) if it is not held any more, or if XNAT may hold part of it and `sent_ok` is not given."""
    check_batch_transition(batch_id, StudyState.HELD, StudyState.COMPLETE)
    with journal.transaction() as db:
        row = db.execute("SELECT state FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None or row["state"] != StudyState.HELD or (_evidence(db, batch_id) is not None and not sent_ok):
            return False
        for table in ("outgoing", "dropped_series", "attachments_out", "deliveries", "routes"):
            db.execute(f"DELETE FROM {table} WHERE batch_id = ?", (batch_id,))  # noqa: S608 - our table names
        db.execute(
            "UPDATE batches SET state = ?, state_changed = ?, reason = NULL, hold_code = NULL, failures = 0,"
            " retry_at = 0 WHERE id = ?",
            (StudyState.COMPLETE, now, batch_id),
        )
        return True


# -- waiting batches, tried now ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pushed:
    """A batch that waited between attempts, made due now: which wait, and how long it had left."""

    batch_id: int
    state: str
    waited: str  # `delivery` (the next attempt of a delivery step) or `stage` (after an unexpected failure)
    seconds_left: float


def push_now(journal: Journal, batch_ids: list[int] | None, now: float) -> list[Pushed]:
    """Make every batch of `batch_ids` (None: all) that waits between attempts due at once, in one transaction:
    a delivery's next attempt (`deliveries.next_attempt_at`), a stage's retry after a failure (`batches.retry_at`).
    Held, delivered and released batches are not touched (`retry_held` is for held ones)."""
    wanted = json.dumps(batch_ids) if batch_ids is not None else None
    pushed: list[Pushed] = []
    with journal.transaction() as db:
        waiting = db.execute(
            "SELECT b.id, b.state, d.next_attempt_at FROM batches b JOIN deliveries d ON d.batch_id = b.id"
            " WHERE b.state = ? AND d.next_attempt_at > ?"
            " AND (?3 IS NULL OR b.id IN (SELECT value FROM json_each(?3)))",
            (StudyState.ROUTED, now, wanted),
        ).fetchall()
        for row in waiting:
            pushed.append(Pushed(int(row[0]), str(row[1]), "delivery", float(row[2]) - now))
            db.execute("UPDATE deliveries SET next_attempt_at = ? WHERE batch_id = ?", (now, row[0]))
        failed = db.execute(
            "SELECT id, state, retry_at FROM batches WHERE state IN (?, ?, ?) AND retry_at > ?"
            " AND (?5 IS NULL OR id IN (SELECT value FROM json_each(?5)))",
            (StudyState.RECEIVING, StudyState.COMPLETE, StudyState.ROUTED, now, wanted),
        ).fetchall()
        for row in failed:
            pushed.append(Pushed(int(row[0]), str(row[1]), "stage", float(row[2]) - now))
            db.execute("UPDATE batches SET retry_at = 0 WHERE id = ?", (row[0],))
    return sorted(pushed, key=lambda p: (p.batch_id, p.waited))


# -- what `retry` and the daemon tell each other -----------------------------------------------------------------


def request_wake(journal: Journal, now: float | None = None) -> None:
    """Ask a running daemon to try its paused XNAT servers' logins at once (its deliverer looks at each check)."""
    journal.set_meta(WAKE_KEY, f"{time.time() if now is None else now:.6f}")


def wake_requested(journal: Journal) -> float:
    """When a wake-up was last asked for (0: never)."""
    value = journal.meta(WAKE_KEY)
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


@dataclass(frozen=True, slots=True)
class DaemonRules:
    """The rule set a daemon runs, as it recorded it at its start and at each reload (SIGHUP)."""

    pid: int
    generation: int  # counts the starts and reloads: a reload that happened after another moved it on
    outcome: str  # `started`, `applied` (a reload) or `refused` (a reload; the rules in force stay)
    version: str | None  # the rule set in force after it (None: no rules configured)
    problems: tuple[str, ...] = ()  # why a reload was refused
    at: float = 0.0


def record_daemon_rules(
    journal: Journal, pid: int, outcome: str, version: str | None, problems: list[str] | None = None
) -> DaemonRules:
    """Record (meta `daemon_rules`) which rule set the daemon runs after its start or a reload."""
    with journal.transaction() as db:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (DAEMON_RULES_KEY,)).fetchone()
        previous = _parse_daemon_rules(row[0] if row else None)
        record = DaemonRules(
            pid=pid,
            generation=(previous.generation if previous else 0) + 1,
            outcome=outcome,
            version=version,
            problems=tuple(problems or ()),
            at=time.time(),
        )
        value = json.dumps(_as_dict(record))
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (DAEMON_RULES_KEY, value))
    return record


def _as_dict(record: DaemonRules) -> dict[str, object]:
    return {
        "pid": record.pid,
        "generation": record.generation,
        "outcome": record.outcome,
        "version": record.version,
        "problems": list(record.problems),
        "at": record.at,
    }


def _parse_daemon_rules(value: str | None) -> DaemonRules | None:
    if not value:
        return None
    try:
        data = json.loads(value)
        return DaemonRules(
            pid=int(data["pid"]),
            generation=int(data["generation"]),
            outcome=str(data["outcome"]),
            version=None if data.get("version") is None else str(data["version"]),
            problems=tuple(str(problem) for problem in data.get("problems", ())),
            at=float(data.get("at", 0.0)),
        )
    except (ValueError, KeyError, TypeError):
        return None  # written by another version: as if never written


def daemon_rules(journal: Journal) -> DaemonRules | None:
    """What the daemon last recorded about its rules (None: no daemon recorded any)."""
    return _parse_daemon_rules(journal.meta(DAEMON_RULES_KEY))
