"""Prometheus metrics and the /healthz endpoint, served on `metrics.host:metrics.port` (127.0.0.1 by default).

Three sources feed one registry:

* what the journal knows is read from it at scrape time, through a read-only connection: instances and bytes
  received by source, studies by state, held studies by reason, quarantined items. Those counts are exact,
  include the receiver processes' work, and survive restarts (they are the journal's totals);
* the associations, counted by every receiver process into a small shared-memory array;
* counters and histograms the main process's steps update: drop-folder sources taken and quarantined,
  deliveries by outcome, retries, stage durations.

`/healthz` answers 200 with a JSON body while the daemon is live (every worker running, none wedged) and
ready (started, not stopping), 503 otherwise, with the same body saying why. An XNAT server paused after a refused
login does not make the daemon unhealthy (it still receives and spools): the body's `status` is then `degraded`,
and `xnat` / `paused_servers` say which server and why.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingestd.journal import Journal, Totals
from ingestd.states import StudyState
from ingestd.status import JournalStatus

__all__ = [
    "DELIVERIES",
    "DROP_SOURCES",
    "REGISTRY",
    "RETENTION_BYTES",
    "RETENTION_LAST_RUN",
    "RETENTION_PURGED",
    "RETRIES",
    "STAGE_FAILURES",
    "STAGE_SECONDS",
    "AssociationCounters",
    "AssociationSlot",
    "DaemonRecord",
    "JournalCollector",
    "MetricsServer",
    "record_daemon",
    "stage_seconds",
]

log = structlog.get_logger("ingestd.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

DROP_SOURCES = Counter(
    "ingestd_drop_sources",
    "Drop-folder sources (files and archives) finished, by folder and outcome (taken, quarantined)",
    ["folder", "outcome"],
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "ingestd_deliveries",
    "Batches whose delivery to XNAT ended, by outcome (delivered, held)",
    ["outcome"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "ingestd_delivery_retries",
    "Delivery steps scheduled again after a retryable failure (XNAT down, 5xx, timeout), by step",
    ["step"],
    registry=REGISTRY,
)
LOGIN_REFUSALS = Counter(
    "ingestd_xnat_login_refusals",
    "Logins an XNAT server refused (credentials, expired password or token, locked or disabled account), by server",
    ["server"],
    registry=REGISTRY,
)
SERVER_PAUSED = Gauge(
    "ingestd_xnat_server_paused",
    "1 while deliveries to an XNAT server are paused after a refused login, else 0, by server",
    ["server"],
    registry=REGISTRY,
)
STAGE_FAILURES = Counter(
    "ingestd_stage_failures",
    "Unexpected failures of one batch in a stage (assemble, route, package, deliver), by stage and kind of error;"
    " the batch is tried again with back-off, then held",
    ["stage", "kind"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "ingestd_stage_duration_seconds",
    "How long a step took for one batch, by stage (route, package, import, build_wait, archive)",
    ["stage"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)

RETENTION_PURGED = Counter(
    "ingestd_retention_purged",
    "What retention removed, by kind: delivered and released batches' files, quarantined items (batches, items);"
    " receipts and outgoing journal rows (rows)",
    ["kind"],
    registry=REGISTRY,
)
RETENTION_BYTES = Counter(
    "ingestd_retention_purged_bytes",
    "Bytes of files retention removed from the state directory, by kind (delivered, released, quarantine)",
    ["kind"],
    registry=REGISTRY,
)
RETENTION_LAST_RUN = Gauge(
    "ingestd_retention_last_run_timestamp_seconds",
    "When the daemon's retention worker last finished a pass (Unix time); 0 before the first",
    registry=REGISTRY,
)


def stage_seconds(stage: str, started: float) -> float:
    """Record how long `stage` took since `started` (a time.monotonic()); return the seconds, for the log."""
    seconds = time.monotonic() - started
    STAGE_SECONDS.labels(stage=stage).observe(seconds)
    return round(seconds, 3)


_CONTEXT = multiprocessing.get_context("spawn")
_FIELDS = ("active", "accepted", "rejected")


class AssociationSlot:
    """One receiver process's association counters: a slice of the shared array, updated under a local lock.

    Only its own process writes a slot, so a thread lock suffices; the daemon reads all slots at scrape time.
    """

    def __init__(self, array: Any, index: int) -> None:
        self._array = array
        self._base = index * len(_FIELDS)
        self._lock = threading.Lock()

    def __getstate__(self) -> tuple[Any, int]:
        return self._array, self._base

    def __setstate__(self, state: tuple[Any, int]) -> None:
        self._array, self._base = state
        self._lock = threading.Lock()

    def add(self, field: str, amount: int = 1) -> None:
        index = self._base + _FIELDS.index(field)
        with self._lock:
            self._array[index] += amount

    def reset_active(self) -> None:
        """A (re)started receiver holds no association yet, whatever a dead predecessor left counted."""
        with self._lock:
            self._array[self._base] = 0


class AssociationCounters:
    """Association counters of the main listener and every receiver process, in shared memory."""

    def __init__(self, slots: int) -> None:
        self._array = _CONTEXT.RawArray("q", slots * len(_FIELDS))
        self.slots = slots

    def slot(self, index: int) -> AssociationSlot:
        return AssociationSlot(self._array, index)

    def totals(self) -> dict[str, int]:
        values = list(self._array)
        width = len(_FIELDS)
        return {field: sum(values[i::width]) for i, field in enumerate(_FIELDS)}


def _removed_receipts(journal_path: Path) -> dict[tuple[str, str, str], tuple[int, int]]:
    from ingestd.retention.store import read_only, removed_receipts  # noqa: PLC0415 - only at the first scrape

    with read_only(journal_path) as db:
        return removed_receipts(db)


class JournalCollector(Collector):
    """The metrics read from the journal (and the spool's file system) at each scrape."""

    def __init__(self, journal_path: Path, spool_dir: Path, associations: AssociationCounters | None = None) -> None:
        self.journal_path = journal_path
        self.spool_dir = spool_dir
        self.associations = associations
        # Receipts only grow: each scrape adds those after the last one it counted, so that a scrape stays
        # cheap however many instances the journal has seen (the first one sums them all: ~1 s per million).
        self._receipts_upto = 0
        self._receipts: dict[tuple[str, str, str], tuple[int, int]] = {}
        self._lock = threading.Lock()

    def _read(self) -> tuple[Totals, str | None]:
        status = JournalStatus(self.journal_path)  # WAL: a reader never blocks the writers
        try:
            with self._lock:
                if self._receipts_upto == 0:  # the first read: what the receipts retention deleted counted, too
                    self._receipts = _removed_receipts(self.journal_path)
                totals = status.totals(receipts_after=self._receipts_upto)
                for kind, source, outcome, count, size in totals.receipts:
                    before = self._receipts.get((kind, source, outcome), (0, 0))
                    self._receipts[kind, source, outcome] = (before[0] + count, before[1] + size)
                self._receipts_upto = totals.receipts_upto
                receipts = tuple((*key, *value) for key, value in sorted(self._receipts.items()))
            return dataclasses.replace(totals, receipts=receipts), status.heartbeat()
        finally:
            status.close()

    def collect(self) -> Iterator[Metric]:
        totals, heartbeat = self._read()
        instances = CounterMetricFamily(
            "ingestd_instances_received",
            "Instances received, by kind (dicom, folder), source (calling AE or drop folder) and outcome"
            " (stored, duplicate, replaced)",
            labels=["kind", "source", "outcome"],
        )
        received = CounterMetricFamily(
            "ingestd_received_bytes", "Bytes of instances received, by kind and source", labels=["kind", "source"]
        )
        by_source: dict[tuple[str, str], int] = {}
        for kind, source, outcome, count, size in totals.receipts:
            instances.add_metric([kind, source, outcome], count)
            by_source[kind, source] = by_source.get((kind, source), 0) + size
        for (kind, source), size in sorted(by_source.items()):
            received.add_metric([kind, source], size)
        yield instances
        yield received
        studies = GaugeMetricFamily(
            "ingestd_studies", "Batches in the journal (of studies, and attachment sets), by state", labels=["state"]
        )
        counts = dict(totals.states)
        for state in StudyState:
            studies.add_metric([state], counts.get(state, 0))
        yield studies
        held = GaugeMetricFamily(
            "ingestd_held_studies",
            "Held batches (of studies, and attachment sets), by the hold's code (unrouted, xnat-refused, ...)",
            labels=["reason"],
        )
        for code, count in sorted(totals.held_reasons):
            held.add_metric([code], count)
        yield held
        quarantined = CounterMetricFamily(
            "ingestd_quarantined_items", "Items put in quarantine, by kind of source", labels=["kind"]
        )
        for kind, count in totals.quarantine:
            quarantined.add_metric([kind], count)
        yield quarantined
        stat = os.statvfs(self.spool_dir)
        yield GaugeMetricFamily(
            "ingestd_spool_free_bytes", "Free space on the spool's file system", value=stat.f_bavail * stat.f_frsize
        )
        if heartbeat is not None:
            yield GaugeMetricFamily(
                "ingestd_heartbeat_timestamp_seconds",
                "When the supervisor last found every worker alive",
                value=float(heartbeat),
            )
        if self.associations is not None:
            counted = self.associations.totals()
            yield GaugeMetricFamily(
                "ingestd_associations_active", "DICOM associations open now", value=counted["active"]
            )
            associations = CounterMetricFamily(
                "ingestd_associations", "DICOM associations requested, by outcome", labels=["outcome"]
            )
            associations.add_metric(["accepted"], counted["accepted"])
            associations.add_metric(["rejected"], counted["rejected"])
            yield associations


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the log; errors still reach the WSGI app's own handling."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the daemon's exit


Health = Callable[[], dict[str, Any]]
_StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], _StartResponse], Iterable[bytes]]


class MetricsServer:
    """The HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` (JSON; 200 or 503) and, when given, the
    web page's application (`ui`: ingestd.ui.UiApp) for every path under `/ui`."""

    name = "metrics"

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, health: Health, ui: WsgiApp | None = None
    ) -> None:
        self.ui = ui
        self.host = host
        self.requested_port = port
        self.registry = registry
        self.health = health
        self._metrics_app = make_wsgi_app(registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return 0 if self._server is None else int(self._server.server_address[1])

    def start(self) -> None:
        self._server = make_server(self.host, self.requested_port, self._app, _Server, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics.started", host=self.host, port=self.port)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _app(self, environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if self.ui is not None and (path == "/ui" or path.startswith("/ui/")):
            return self.ui(environ, start_response)
        if path == "/metrics":
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            try:
                health = self.health()
            except Exception as exc:  # noqa: BLE001 - the answer must still come: "not healthy, and why"
                health = {"live": False, "ready": False, "detail": f"health check failed: {type(exc).__name__}"}
            ok = bool(health.get("live")) and bool(health.get("ready"))
            body = json.dumps(health, sort_keys=True).encode() + b"\n"
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        body = b"ingestd: /metrics (Prometheus) and /healthz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]


DAEMON_RECORD = "daemon"  # the journal's meta key of the running daemon's record


@dataclasses.dataclass(frozen=True)
class DaemonRecord:
    """Where the running daemon serves, as it started (a configuration edited since may say otherwise): written
    into the journal once every service runs, read by `ingestd health` (which so needs no HTTP, and no
    configuration that still matches the running daemon)."""

    pid: int
    started_at: float  # time.time() once every service ran; the main loop's heartbeats follow
    metrics: str | None  # http://host:port of /metrics and /healthz; None when disabled or not bound
    listener: tuple[str, int, str] | None  # host, port, called AE title of the DICOM listener; None when disabled
    stopping_since: float | None = None  # time.time() of the start of its stop: it serves no more

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DaemonRecord | None:
        try:
            data = json.loads(text)
            listener = data["listener"]
            return cls(
                pid=int(data["pid"]),
                started_at=float(data["started_at"]),
                metrics=None if data["metrics"] is None else str(data["metrics"]),
                listener=None if listener is None else (str(listener[0]), int(listener[1]), str(listener[2])),
                stopping_since=None if data.get("stopping_since") is None else float(data["stopping_since"]),
            )
        except (ValueError, KeyError, TypeError, IndexError):
            return None


def record_daemon(journal: Journal, metrics: MetricsServer | None, listener: tuple[str, int, str] | None) -> None:
    """Write the running daemon's record (`DaemonRecord`) into the journal."""
    url = None if metrics is None else f"http://{metrics.host}:{metrics.port}"
    record = DaemonRecord(os.getpid(), time.time(), url, listener)
    journal.set_meta(DAEMON_RECORD, record.to_json())


def record_daemon_stopping(journal: Journal) -> None:
    """Mark the running daemon's record as stopping: `ingestd health` says so from then on, not "healthy"."""
    text = journal.meta(DAEMON_RECORD)
    record = None if text is None else DaemonRecord.from_json(text)
    if record is not None and record.pid == os.getpid():
        journal.set_meta(DAEMON_RECORD, dataclasses.replace(record, stopping_since=time.time()).to_json())
