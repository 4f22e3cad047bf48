"""The journal's read model: what people and monitors see, read without ever taking the journal's write lock.

`ingestd status` (text and `--json`), the systemd STATUS line and the counts the metrics export are all built here,
from a read-only SQLite connection of their own (`JournalStatus`): in WAL mode a reader runs beside the writer and
never waits for it, and the writer never waits for a reader. The counts are aggregate queries (`GROUP BY`) that
SQLite answers from an index, however many instances the journal holds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ingestd.config import Config
from ingestd.journal import Delivery, Journal, Route, Totals
from ingestd.journal.schema import JournalVersionError, check_version
from ingestd.logs import uid_digest
from ingestd.states import Step, StudyState

__all__ = ["JournalStatus", "status_data", "status_line"]

# Delivery steps before anything was sent: no instance can be missing from XNAT yet (unless a look found some).
_NOT_SENT_YET = (Step.PACKAGE, Step.PREFLIGHT, Step.IMPORT, Step.IMPORTING)
# States whose batch no longer waits in the spool for ingestd.
_GONE = (StudyState.DELIVERED, StudyState.RELEASED)


class JournalStatus:
    """A read-only connection to the journal for counts: its own connection and lock, never the writer's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        try:
            check_version(self._db, path)
        except (JournalVersionError, sqlite3.Error):
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def state_counts(self) -> dict[str, int]:
        """Batches by state (an index scan of `batches`; no instance is read)."""
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM batches GROUP BY state").fetchall()
        return {str(state): int(count) for state, count in rows}

    def heartbeat(self) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'heartbeat'").fetchone()
        return str(row[0]) if row else None

    def totals(self, receipts_after: int = 0) -> Totals:
        """What the metrics report, in one snapshot: receipts by source and outcome (those with an id above
        `receipts_after`, and the highest id), batches by state, held batches by code, quarantined items by kind."""
        with self._lock:
            db = self._db
            db.execute("BEGIN")  # one snapshot for all of it
            try:
                return Totals(
                    receipts_upto=int(db.execute("SELECT COALESCE(MAX(id), 0) FROM receipts").fetchone()[0]),
                    receipts=tuple(
                        (str(kind), str(source), str(outcome), int(count), int(size or 0))
                        for kind, source, outcome, count, size in db.execute(
                            "SELECT source_kind, source, outcome, COUNT(*), SUM(size) FROM receipts WHERE id > ?"
                            " GROUP BY source_kind, source, outcome ORDER BY 1, 2, 3",
                            (receipts_after,),
                        )
                    ),
                    states=tuple(
                        (str(state), int(count))
                        for state, count in db.execute("SELECT state, COUNT(*) FROM batches GROUP BY state")
                    ),
                    held_reasons=tuple(
                        (str(code), int(count))
                        for code, count in db.execute(
                            "SELECT coalesce(hold_code, 'unknown'), COUNT(*) FROM batches WHERE state = ? GROUP BY 1",
                            (StudyState.HELD,),
                        )
                    ),
                    quarantine=tuple(
                        (str(kind), int(count))
                        for kind, count in db.execute("SELECT source_kind, COUNT(*) FROM quarantine GROUP BY 1")
                    ),
                )
            finally:
                db.execute("COMMIT")


def status_line(counts: dict[str, int]) -> str:
    """The systemd STATUS line: the batches in each state."""
    states = ", ".join(f"{count} {state}" for state, count in sorted(counts.items())) or "no studies"
    return f"serving; studies: {states}"


def _study_reference(study_uid: str, route: Route | None, show_uids: bool) -> str:
    """How status names a study: its outgoing UID once de-identified, else a digest unless UIDs are asked for."""
    if route is not None and route.profile:
        return route.study_uid
    if show_uids:
        return study_uid
    from ingestd.logs import uid_digest  # noqa: PLC0415 - keeps `status` light

    return uid_digest(study_uid)


def _route_data(route: Route | None) -> dict[str, Any] | None:
    if route is None:
        return None
    keys = ("rule", "rules_version", "server", "project", "subject", "session", "profile", "dropped_instances")
    return {key: getattr(route, key) for key in keys} | {"archive": route.archive}


def _delivery_data(delivery: Delivery | None, counts: tuple[int, int] | None, now: float) -> dict[str, Any] | None:
    if delivery is None:
        return None
    keys = ("step", "attempts", "faults", "shortfalls", "last_error", "prearchive_url", "archive_uri", "zip_size")
    data = {key: getattr(delivery, key) for key in keys}
    data["next_attempt_in_seconds"] = max(0.0, round(delivery.next_attempt_at - now, 1))
    instances, verified = counts or (0, 0)
    data["instances"], data["verified"] = instances, verified
    looked = delivery.step not in _NOT_SENT_YET or delivery.shortfalls
    data["missing"] = instances - verified if looked and delivery.step != Step.DONE else 0
    return data


def _original_path(quarantine_dir: Path, item: str) -> str | None:
    """Where a quarantined item came from, as its sidecar says (None if it cannot be read)."""
    try:
        sidecar = json.loads((quarantine_dir / f"{item}.reason.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(sidecar.get("detail") or "") or None


def _hide_member_names(config: Config, quarantine: list[dict[str, Any]]) -> None:
    """Archive member names in quarantine reasons as the logs name them: by digests under the installation's key."""
    from ingestd.digestkey import read_digest_key  # noqa: PLC0415 - keeps `status` light
    from ingestd.logs import hide_member_names, use_digest_key  # noqa: PLC0415

    key = read_digest_key(config.state_dir)
    if key is not None:  # else (another user's key): digests that match no log line, the names hidden all the same
        use_digest_key(key)
    for item in quarantine:
        item["reason"] = hide_member_names(str(item["reason"]))


def status_data(config: Config, *, running: bool, show_uids: bool = False, show_paths: bool = False) -> dict[str, Any]:
    """What `ingestd status` shows (and `--json` prints): studies, quarantined items, superseded copies, XNAT
    servers and the daemon's health (`running`: whether a daemon holds the state directory's lock)."""
    if not config.journal_path.exists():
        return {"studies": [], "quarantine": [], "journal": str(config.journal_path), "exists": False}
    from ingestd.journal.servers import server_states  # noqa: PLC0415 - keeps the metrics and the STATUS line light

    journal = Journal(config.journal_path, read_only=True)
    try:
        now = time.time()
        routes = journal.routes()
        deliveries = journal.deliveries()
        verification = journal.verification()
        studies: list[dict[str, Any]] = [
            {
                "batch_id": batch.id,
                "study": _study_reference(batch.study_uid, routes.get(batch.id), show_uids),
                "batch": batch.batch,
                "state": batch.state,
                "series": batch.series,
                "instances": batch.instances,
                "bytes": batch.size,
                "source_kind": batch.source_kind,
                "source": batch.source,
                "first_received": batch.first_received,
                "last_received": batch.last_received,
                "age_seconds": round(now - batch.first_received, 1),
                "quiet_seconds": round(now - batch.last_received, 1),
                "reason": batch.reason,
                "hold_code": batch.hold_code,
                "route": _route_data(routes.get(batch.id)),
                "delivery": _delivery_data(deliveries.get(batch.id), verification.get(batch.id), now),
            }
            for batch in journal.batches()
        ]
        quarantine = [dataclasses.asdict(item) for item in journal.quarantined()]
        superseded = [
            {
                "batch_id": item.batch_id,
                "study": _study_reference(item.study_uid, routes.get(item.batch_id), show_uids),
                "instance": item.sop_uid if show_uids else uid_digest(item.sop_uid),
                "path": item.path if show_uids else "superseded/...",
                "bytes": item.size,
                "source_kind": item.source_kind,
                "source": item.source,
                "received_at": item.received_at,
                "superseded_at": item.at,
            }
            for item in journal.superseded()
        ]
        if show_paths:
            for item in quarantine:
                item["original_path"] = _original_path(config.quarantine_dir, item["path"])
        else:
            _hide_member_names(config, quarantine)
        heartbeat = journal.meta("heartbeat")
        servers = [state.as_dict(now) for state in server_states(journal)]
    finally:
        journal.close()
    held: dict[str, int] = {}
    for study in studies:
        if study["state"] == StudyState.HELD:
            code = study["hold_code"] or "unknown"
            held[code] = held.get(code, 0) + 1
    stat = os.statvfs(config.state_dir)
    health: dict[str, Any] = {
        "running": running,
        "last_heartbeat_seconds_ago": round(now - float(heartbeat), 1) if heartbeat else None,
        "spool_bytes": sum(s["bytes"] for s in studies if s["state"] not in _GONE),
        "disk_free_bytes": stat.f_bavail * stat.f_frsize,
        "held_by_reason": held,
        "paused_servers": [server["server"] for server in servers if server["state"] == "paused"],
    }
    from ingestd.retention import retention_summary  # noqa: PLC0415 - keeps the metrics and the STATUS line light

    return {
        "retention": retention_summary(config, now),
        "health": health,
        "xnat_servers": servers,
        "studies": studies,
        "quarantine": quarantine,
        "superseded": superseded,
        "journal": str(config.journal_path),
        "exists": True,
    }
