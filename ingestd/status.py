"""The journal's read model: what people and monitors see, read without ever taking the journal's write lock.

`ingestd status` (text and `--json`), the systemd STATUS line and the counts the metrics export are all built here,
from a read-only SQLite connection of their own (`JournalStatus`): in WAL mode a reader runs beside the writer and
never waits for it, and the writer never waits for a reader. The counts are aggregate queries (`GROUP BY`) that
SQLite answers from an index, however many instances the journal holds.

`status_data` names every batch without patient data, so that a lab admin can tell held studies apart: its
modalities, series and instances, where it came from (calling AE title, drop folder name, or `import`), when it
arrived, the rule and the XNAT labels it was routed to. A label is shown as it is only when it cannot carry a header
value as received: the route de-identifies, or its rule's template does not use an identifying attribute
(`ingestd.rules.identifying_labels`, as the router's log lines decide); otherwise it is a keyed digest, the one the
logs carry (`ingestd.logs.path_digest`). `--show-uids` shows the originals.

Attachment sets (batches of kind `files`: non-DICOM files of one upload, `ingestd.journal.attachments`) are listed
with the studies' batches, through the same states: with their files instead of instances, their resources (once
routed) instead of series, and, while routed, how many of their files XNAT was seen holding. A set's upload (a
folder name below a drop folder, maybe a patient's name) is a keyed digest unless `--show-paths`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ingestd.config import Config
from ingestd.errors import IngestdError
from ingestd.importprogress import running_imports
from ingestd.journal import BatchRow, Delivery, Journal, Route, Totals
from ingestd.journal.schema import JournalVersionError, check_version
from ingestd.logs import hide_labels, path_digest, uid_digest
from ingestd.states import BatchKind, Step, StudyState

__all__ = ["BatchSummary", "JournalStatus", "LabelPolicy", "status_data", "status_line"]

# Delivery steps before anything was sent: no instance can be missing from XNAT yet (unless a look found some).
_NOT_SENT_YET = (Step.PACKAGE, Step.PREFLIGHT, Step.IMPORT, Step.IMPORTING)
# Per routed attachment set: its target resources, its outgoing files and those XNAT was seen holding.
_SETS_SQL = (
    "SELECT batch_id, count(DISTINCT level || '/' || scan || '/' || resource), count(*), count(verified_at)"
    " FROM attachments_out GROUP BY batch_id"
)
# States whose batch no longer waits in the spool for ingestd.
_GONE = (StudyState.DELIVERED, StudyState.RELEASED)
_LABEL_NAMES = ("project", "subject", "session")
_TIMES = ("started_at", "step_started_at", "finished_at")  # a delivery's start, its current step's, its end (Unix)
_EVERY_LABEL = frozenset(_LABEL_NAMES)
# Every batch with its counts and modalities. The instances are aggregated first, in one pass in batch order (the
# index on batch_id), then joined to the batches: at a million instances, quicker than `Journal.batches()`'s join
# that aggregates without the modalities.
_BATCHES_SQL = (
    "SELECT b.id, b.study_uid, b.batch, b.state, b.source_kind, b.source, b.first_received,"
    " b.last_received, b.state_changed, b.reason, b.hold_code, b.failures, b.retry_at,"
    " b.note, b.forced_rule, b.purged_at,"
    " coalesce(s.series, 0), coalesce(s.instances, f.files, 0), coalesce(s.size, f.size, 0), b.kind, b.upload,"
    " s.modalities FROM batches b LEFT JOIN ("
    "SELECT batch_id, count(DISTINCT series_uid) AS series, count(*) AS instances, sum(size) AS size,"
    " group_concat(DISTINCT modality) AS modalities FROM instances GROUP BY batch_id"
    ") s ON s.batch_id = b.id LEFT JOIN ("
    "SELECT batch_id, count(*) AS files, sum(size) AS size FROM attached_files GROUP BY batch_id"
    ") f ON f.batch_id = b.id ORDER BY b.last_received DESC"
)


@dataclasses.dataclass(frozen=True, slots=True)
class BatchSummary:
    """A batch as `ingestd status` lists it: the journal's row and the modalities of its instances."""

    row: BatchRow
    modalities: tuple[str, ...]


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

    def batch_summaries(self) -> list[BatchSummary]:
        """Every batch, newest first, with its series, instance and byte counts and its modalities (sorted)."""
        with self._lock:
            rows = self._db.execute(_BATCHES_SQL).fetchall()
        return [
            BatchSummary(BatchRow(*row[:-1]), tuple(sorted({m for m in (row[-1] or "").split(",") if m})))
            for row in rows
        ]

    def routes(self) -> dict[int, Route]:
        """Every route by batch id (plain rows: a third of the time `Journal.routes` takes for thousands)."""
        fields = [field.name for field in dataclasses.fields(Route)]
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(fields)} FROM routes").fetchall()  # noqa: S608 - own names
        archive = fields.index("archive")
        found: dict[int, Route] = {}
        for row in rows:
            values = list(row)
            values[archive] = bool(values[archive])
            found[values[0]] = Route(*values)
        return found

    def deliveries(self) -> dict[int, Delivery]:
        """Every delivery by batch id (plain rows, as `routes`)."""
        fields = [field.name for field in dataclasses.fields(Delivery)]
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(fields)} FROM deliveries").fetchall()  # noqa: S608
        step, answered = fields.index("step"), fields.index("answered")
        found: dict[int, Delivery] = {}
        for row in rows:
            values = list(row)
            values[step], values[answered] = Step(values[step]), bool(values[answered])
            found[values[0]] = Delivery(*values)
        return found

    def set_counts(self) -> dict[int, tuple[int, int, int]]:
        """Per routed attachment set: (resources it goes to, outgoing files, files XNAT was last seen holding)."""
        with self._lock:
            rows = self._db.execute(_SETS_SQL).fetchall()
        return {int(row[0]): (int(row[1]), int(row[2]), int(row[3])) for row in rows}

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
    """The systemd STATUS line: the batches in each state (studies' batches and attachment sets alike)."""
    states = ", ".join(f"{count} {state}" for state, count in sorted(counts.items())) or "no studies"
    return f"serving; studies: {states}"


def _study_reference(study_uid: str, route: Route | None, show_uids: bool) -> str:
    """How status names a study: its outgoing UID once de-identified, else a digest unless UIDs are asked for."""
    if route is not None and route.profile:
        return route.study_uid
    if show_uids:
        return study_uid
    return uid_digest(study_uid)


class LabelPolicy:
    """Which labels of a route status names by a digest: those `ingestd.rules.identifying_labels` says the logs do.

    The rules are loaded (once, and only) when a route without a profile is shown: its labels are safe only if its
    rule, at the version it was routed with, builds none of them from a raw identifying value. Rules that cannot be
    loaded here (no rules configured, a key file only the service may read, a mistake since) fail closed: every
    label of such a route is a digest.
    """

    def __init__(self, rules_files: tuple[Path, ...]) -> None:
        self._files = rules_files
        self._loaded = False
        self._rules: Any = None

    def hidden(self, route: Route) -> frozenset[str]:
        if route.profile:
            return frozenset()
        if not self._loaded:
            self._loaded = True
            if self._files:
                from ingestd.rules import load_rules  # noqa: PLC0415 - only for routes without a profile

                try:
                    self._rules = load_rules(self._files)
                except (IngestdError, OSError, ValueError):
                    self._rules = None  # fail closed: every label a digest
        if self._rules is None:
            return _EVERY_LABEL  # as identifying_labels says without the rules, without importing them
        from ingestd.rules import identifying_labels  # noqa: PLC0415

        return identifying_labels(self._rules, rule=route.rule, rules_version=route.rules_version, profile=None)


def _route_data(route: Route | None, labels: dict[str, str] | None) -> dict[str, Any] | None:
    if route is None or labels is None:
        return None
    keys = ("rule", "rules_version", "server", "profile", "dropped_instances")
    return {key: getattr(route, key) for key in keys} | labels | {"archive": route.archive}


def _set_delivery_data(
    delivery: Delivery | None, counts: tuple[int, int, int] | None, now: float
) -> dict[str, Any] | None:
    """An attachment set's delivery: its step (`locate`, `upload`, `uploading`, `check`) and how many of its
    outgoing files XNAT's listing was last seen to hold (`attachments_out.verified_at`)."""
    if delivery is None:
        return None
    keys = ("step", "attempts", "faults", "shortfalls", "last_error", "archive_uri", *_TIMES)
    data = {key: getattr(delivery, key) for key in keys}
    data["next_attempt_in_seconds"] = max(0.0, round(delivery.next_attempt_at - now, 1))
    _resources, files, verified = counts or (0, 0, 0)
    data["instances"], data["files"], data["verified"] = 0, files, verified
    data["missing"] = files - verified if delivery.step != Step.DONE else 0
    return data


def _delivery_data(delivery: Delivery | None, counts: tuple[int, int] | None, now: float) -> dict[str, Any] | None:
    if delivery is None:
        return None
    keys = ("step", "attempts", "faults", "shortfalls", "last_error", "prearchive_url", "archive_uri", "zip_size")
    data = {key: getattr(delivery, key) for key in (*keys, *_TIMES)}
    data["next_attempt_in_seconds"] = max(0.0, round(delivery.next_attempt_at - now, 1))
    instances, verified = counts or (0, 0)
    data["instances"], data["verified"] = instances, verified
    looked = delivery.step not in _NOT_SENT_YET or delivery.shortfalls
    data["missing"] = instances - verified if looked and delivery.step != Step.DONE else 0
    return data


def _source(batch: BatchRow, drop_folders: dict[str, str], show_paths: bool) -> tuple[str, str]:
    """A batch's source as JSON gives it and as the table names it: the calling AE title, `drop:<folder name>` for
    a configured drop folder, `import` for any other folder (whose path, which a person chose and which may hold a
    patient's name, is a digest unless `show_paths`)."""
    if batch.source_kind == "dicom":
        return batch.source, batch.source
    if batch.source_kind == "folder":
        if batch.source in drop_folders:
            return batch.source, f"drop:{drop_folders[batch.source]}"
        return (batch.source, f"import:{batch.source}") if show_paths else (path_digest(batch.source), "import")
    return batch.source, f"{batch.source_kind}:{batch.source}"


def _study(
    summary: BatchSummary,
    route: Route | None,
    delivery: dict[str, Any] | None,
    source: tuple[str, str],
    hidden: frozenset[str],
    *,
    now: float,
    show_uids: bool,
    show_paths: bool = False,
    resources: int | None = None,
    digest: Callable[[str], str] = path_digest,
) -> dict[str, Any]:
    """One batch as `status_data` lists it (`resources`: the resources a routed attachment set goes to)."""
    batch = summary.row
    labels: dict[str, str] | None = None
    hide: Callable[[str], str] = str
    if route is not None:
        shown = frozenset() if show_uids else hidden
        labels = {name: digest(route.label(name)) if name in shown else route.label(name) for name in _LABEL_NAMES}
        originals = [route.label(name) for name in shown]
        hide = lambda text: hide_labels(text, originals)  # noqa: E731 - one line, used twice
        if delivery is not None and originals:
            for key in ("last_error", "prearchive_url", "archive_uri"):
                if key in delivery:
                    delivery[key] = hide(delivery[key]) if delivery[key] else delivery[key]
    files = batch.kind == BatchKind.FILES
    return {
        "batch_id": batch.id,
        "kind": batch.kind,
        # a set's key is a digest of its upload already; still shown as a digest, as a study's UID is
        "study": (batch.study_uid if show_uids else uid_digest(batch.study_uid))
        if files
        else _study_reference(batch.study_uid, route, show_uids),
        "batch": batch.batch,
        "state": batch.state,
        "modalities": list(summary.modalities),
        "series": 0 if files else batch.series,
        "instances": 0 if files else batch.instances,
        "files": batch.instances if files else 0,
        "resources": resources,
        "upload": None if batch.upload is None else (batch.upload if show_paths else digest(batch.upload)),
        "bytes": batch.size,
        "source_kind": batch.source_kind,
        "source": source[0],
        "source_name": source[1],
        "first_received": batch.first_received,
        "last_received": batch.last_received,
        "state_changed": batch.state_changed,
        "age_seconds": round(now - batch.first_received, 1),
        "quiet_seconds": round(now - batch.last_received, 1),
        "reason": hide(batch.reason) if batch.reason else batch.reason,
        "hold_code": batch.hold_code,
        "note": batch.note,
        "rule": route.rule if route is not None else batch.forced_rule,
        "forced_rule": batch.forced_rule,
        "labels": labels,
        "hidden_labels": sorted(hidden) if route is not None and not show_uids else [],
        "purged_at": batch.purged_at,
        "route": _route_data(route, labels),
        "delivery": delivery,
    }


def _original_path(quarantine_dir: Path, item: str) -> str | None:
    """Where a quarantined item came from, as its sidecar says (None if it cannot be read)."""
    try:
        sidecar = json.loads((quarantine_dir / f"{item}.reason.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(sidecar.get("detail") or "") or None


def _use_installation_key(config: Config) -> None:
    """Digests (labels, import folders, archive members) as the logs make them: under the installation's key."""
    from ingestd.digestkey import read_digest_key  # noqa: PLC0415 - keeps `status` light
    from ingestd.logs import use_digest_key  # noqa: PLC0415

    key = read_digest_key(config.state_dir)
    if key is not None:  # else (another user's key): digests that match no log line, the values hidden all the same
        use_digest_key(key)


def _hide_member_names(quarantine: list[dict[str, Any]]) -> None:
    """Archive member names in quarantine reasons as the logs name them: by digests under the installation's key."""
    from ingestd.logs import hide_member_names  # noqa: PLC0415

    for item in quarantine:
        item["reason"] = hide_member_names(str(item["reason"]))


def status_data(
    config: Config, *, running: bool, show_uids: bool = False, show_paths: bool = False, now: float | None = None
) -> dict[str, Any]:
    """What `ingestd status` shows (and `--json` prints): studies, quarantined items, superseded copies, XNAT
    servers and the daemon's health (`running`: whether a daemon holds the state directory's lock; `now`: the
    clock the ages are counted on, the system's by default)."""
    if not config.journal_path.exists():
        return {"studies": [], "quarantine": [], "journal": str(config.journal_path), "exists": False}
    from ingestd.journal.servers import server_states  # noqa: PLC0415 - keeps the metrics and the STATUS line light

    _use_installation_key(config)
    drop_folders = {str(folder.path): folder.path.name for folder in config.drop_folders}
    labels = LabelPolicy(config.rules)
    journal = Journal(config.journal_path, read_only=True)
    reader = JournalStatus(config.journal_path)
    try:
        now = time.time() if now is None else now
        summaries = reader.batch_summaries()
        digest = functools.cache(path_digest)  # a project label repeats on many routes: one HMAC each
        routes = reader.routes()
        deliveries = reader.deliveries()
        verification = journal.verification()
        sets = reader.set_counts()
        studies: list[dict[str, Any]] = []
        for summary in summaries:
            batch_id = summary.row.id
            route = routes.get(batch_id)
            is_set = summary.row.kind == BatchKind.FILES
            delivery = (
                _set_delivery_data(deliveries.get(batch_id), sets.get(batch_id), now)
                if is_set
                else _delivery_data(deliveries.get(batch_id), verification.get(batch_id), now)
            )
            studies.append(
                _study(
                    summary,
                    route,
                    delivery,
                    _source(summary.row, drop_folders, show_paths),
                    labels.hidden(route) if route is not None else frozenset(),
                    now=now,
                    show_uids=show_uids,
                    show_paths=show_paths,
                    resources=sets[batch_id][0] if is_set and batch_id in sets else None,
                    digest=digest,
                )
            )
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
            _hide_member_names(quarantine)
        heartbeat = journal.meta("heartbeat")
        servers = [state.as_dict(now) for state in server_states(journal)]
    finally:
        reader.close()
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
        "imports": [dataclasses.asdict(running) for running in running_imports(config.state_dir)],
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
