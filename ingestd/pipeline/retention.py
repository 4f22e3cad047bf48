"""The retention worker: in the daemon, one retention pass (`ingestd.retention.purge`) at start and then every
`retention.check_interval_seconds`.

It is a `PeriodicWorker` like the stages, so the daemon's watchdog covers it: it looks every `interval` seconds
whether a pass is due, and a pass beats after each batch or item it removes. Each pass logs `retention.purged`
(counts per kind and bytes) and moves the `ingestd_retention_*` metrics; an item that cannot be removed is logged
(`retention.failed`), left as it was, and tried again next pass.
"""

from __future__ import annotations

import time

import structlog

from ingestd.config import Config
from ingestd.journal import Journal
from ingestd.metrics import RETENTION_BYTES, RETENTION_LAST_RUN, RETENTION_PURGED
from ingestd.pipeline.runner import PeriodicWorker
from ingestd.retention import KINDS, Outcome, purge

__all__ = ["RetentionWorker", "record_outcome"]

log = structlog.get_logger("ingestd.retention")


def record_outcome(outcome: Outcome, seconds: float) -> None:
    """Log a pass (`retention.purged`, and `retention.failed` per item left) and count it in the metrics."""
    for kind in KINDS:
        count, size = outcome.purged[kind]
        RETENTION_PURGED.labels(kind=kind).inc(count)
        RETENTION_BYTES.labels(kind=kind).inc(size)
    RETENTION_LAST_RUN.set_to_current_time()
    for failure in outcome.failures:
        log.warning("retention.failed", kind=failure.kind, item=failure.item, error=failure.error)
    log.info(
        "retention.purged",
        delivered_batches=outcome.purged["delivered"][0],
        released_batches=outcome.purged["released"][0],
        quarantine_items=outcome.purged["quarantine"][0],
        receipts=outcome.purged["receipts"][0],
        outgoing_rows=outcome.purged["outgoing"][0],
        bytes=outcome.bytes,
        failures=len(outcome.failures),
        seconds=round(seconds, 3),
    )


class RetentionWorker(PeriodicWorker):
    """Runs a retention pass when one is due: first within `interval` seconds of `start()`, then every
    `config.retention.check_interval_seconds` (a reloaded configuration's interval counts from the last pass)."""

    name = "retention"

    def __init__(self, journal: Journal, config: Config, interval: float = 1.0) -> None:
        super().__init__(interval)
        self.journal = journal
        self.config = config
        self.wedged_after = config.wedged_worker_seconds
        self._last_pass: float | None = None  # time.monotonic() when the last pass began

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self.wedged_after = config.wedged_worker_seconds

    def due(self, monotonic: float) -> bool:
        every = self.config.retention.check_interval_seconds
        return self._last_pass is None or monotonic - self._last_pass >= every

    def check(self, now: float | None = None) -> int:
        """Run a pass if one is due (or `now` is given: a pass for that time, as a test's clock says)."""
        started = time.monotonic()
        if now is None and not self.due(started):
            return 0
        self._last_pass = started
        outcome = purge(self.config, self.journal, now, beat=self.beat, stopping=lambda: self.stopping)
        record_outcome(outcome, time.monotonic() - started)
        return sum(count for count, _size in outcome.purged.values())
