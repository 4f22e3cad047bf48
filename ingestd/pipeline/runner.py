"""The one loop every stage of the pipeline runs in.

A stage (`Assembler`, `Router`, `Deliverer`) is a `BatchWorker`: a thread that, every `interval` seconds, asks
the stage which batches are due (`due`) and hands each to `process`, one at a time, in that order. The loop does
the rest, the same way for every stage:

- each batch is isolated: an exception no code expected in one batch is contained to it, and the others go on;
- progress is reported (`beat`) before each batch, so that the daemon's watchdog can tell slow from wedged;
- the failed batch is counted in the journal and the metrics, logged, and due again after a back-off that doubles
  (`batch_failures.initial_seconds` .. `max_seconds`);
- after `batch_failures.max_attempts` failures it is held with the stage's `FAILED_HOLD` code and the last error.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import structlog

from ingestd.config import BatchFailures
from ingestd.journal import BatchRow, Journal
from ingestd.logs import redact_value
from ingestd.metrics import STAGE_FAILURES
from ingestd.states import FAILED_HOLD, HoldCode, Stage

__all__ = [
    "BatchFailures",
    "BatchWorker",
    "Failure",
    "PeriodicWorker",
    "count_batch_failure",
    "failure_backoff",
    "failure_text",
    "note_failure",
    "record_stage_failure",
]

log = structlog.get_logger("ingestd.worker")


class PeriodicWorker:
    """A daemon thread that calls `check()` every `interval` seconds until `stop()`.

    An exception in one check is logged and the next check runs: the journal still holds the last committed
    state, so the work is simply tried again. `alive()` tells the daemon's watchdog whether the thread runs,
    `wedged()` whether the running check has gone without progress for longer than `wedged_after` seconds
    (a check that may take long calls `beat()` between units of work: a batch, an instance, an XNAT request).
    """

    name = "worker"
    wedged_after = 300.0  # seconds without progress in one check; the daemon sets it from the configuration

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.check_started: float | None = None  # time.monotonic() when the running check began; None between
        self.last_progress: float | None = None  # ... when it began or last called beat()
        self.last_finished: float | None = None  # ... when the last check ended

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> bool:
        """Let the running check finish and end the thread; wait up to `timeout` s (None: for as long as it
        takes). Return whether the thread has ended."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def beat(self) -> None:
        """Say that the running check is making progress (it is not wedged)."""
        self.last_progress = time.monotonic()

    def wedged(self, now: float | None = None) -> float | None:
        """Seconds the running check has gone without progress, if that is more than `wedged_after`; else None."""
        progress = self.last_progress
        if self.check_started is None or progress is None:
            return None
        idle = (time.monotonic() if now is None else now) - progress
        return idle if idle > self.wedged_after else None

    def stack(self, limit: int = 8) -> list[str]:
        """Where the worker's thread is now, innermost last (`file:line function`), for the log."""
        frame = sys._current_frames().get(self._thread.ident or -1)
        if frame is None:
            return []
        return [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame, limit=limit)]

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def check(self) -> int:
        """Do the work that is due; return how much was done."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check_started = self.last_progress = time.monotonic()
            try:
                self.check()
            except Exception:
                log.exception("worker.check_failed", worker=self.name)
            finally:
                self.check_started = None
                self.last_finished = time.monotonic()


class BatchWorker(PeriodicWorker):
    """A stage of the pipeline: says which batches are `due` and how to `process` one; the loop is `check`."""

    stage: ClassVar[Stage]

    def __init__(self, journal: Journal, interval: float, failures: BatchFailures | None = None) -> None:
        super().__init__(interval)
        self.journal = journal
        self.failures = failures or BatchFailures()

    def due(self, now: float) -> Iterable[BatchRow]:
        """The batches to process in this check, in order (a generator may stop early: the loop asks lazily)."""
        raise NotImplementedError

    def process(self, batch: BatchRow, now: float) -> int:
        """Do the stage's work on one batch; return how much was done (a batch, or the steps taken)."""
        raise NotImplementedError

    def hold(self, batch: BatchRow, code: HoldCode, reason: str) -> None:
        """Hold `batch` with `code` and `reason`, and log it."""
        raise NotImplementedError

    def failed(self, batch: BatchRow, exc: Exception) -> None:
        """One unexpected failure of `batch` (called inside the `except`): counted, retried later, held after
        `failures.max_attempts`."""
        reason = count_batch_failure(self.journal, self.stage, batch, exc, self.failures)
        if reason is not None:
            self.hold(batch, FAILED_HOLD[self.stage], reason)

    def check(self, now: float | None = None) -> int:
        """Process every due batch, each on its own; return how many were processed (a failed one counts as
        one). Stops between batches once the worker is stopping."""
        now = time.time() if now is None else now
        done = 0
        for batch in self.due(now):
            if self.stopping:
                break
            self.beat()
            try:
                done += self.process(batch, now)
            except Exception as exc:  # noqa: BLE001 - contained to this batch; counted, retried, then held
                self.failed(batch, exc)
                done += 1
        return done


@dataclass(frozen=True, slots=True)
class Failure:
    """One more unexpected failure of a batch in a stage, counted and logged: when it is tried again, or held."""

    failures: int  # this one included
    wait: float  # seconds before the batch is due again; 0 when it is held now
    held: bool
    error: str  # the error as `failure_text` gives it


def note_failure(stage: Stage, exc: BaseException, *, batch_id: int, failures: int, policy: BatchFailures) -> Failure:
    """Count and log the `failures`-th failure of a batch (call it inside the `except`); say what follows."""
    held = failures >= policy.max_attempts
    wait = 0.0 if held else failure_backoff(failures, policy)
    record_stage_failure(stage, exc, batch_id=batch_id, failures=failures, retry_seconds=wait)
    return Failure(failures, wait, held, failure_text(exc))


def failure_text(exc: BaseException) -> str:
    """An unexpected error as a line for the journal, the log and `ingestd status`: its kind and message, with
    UIDs as digests (a spool path is made of them) and an OSError by its description only (never a path)."""
    kind = type(exc).__name__
    if isinstance(exc, OSError):
        return f"{kind}: {exc.strerror or 'I/O error'}"
    message = " ".join(str(exc).split())[:300]
    return str(redact_value(f"{kind}: {message}" if message else kind))


def failure_backoff(failures: int, policy: BatchFailures) -> float:
    """Seconds before a batch that failed `failures` times is tried again: doubling, capped."""
    return float(min(policy.max_seconds, policy.initial_seconds * 2 ** max(0, failures - 1)))


def count_batch_failure(
    journal: Journal, stage: Stage, batch: BatchRow, exc: BaseException, policy: BatchFailures
) -> str | None:
    """One unexpected failure of `batch` in `stage` (call it inside the `except`): counted in the journal and the
    metrics, logged, and the batch due again after a back-off. Returns the reason to hold it with once
    `policy.max_attempts` is reached, else None."""
    failure = note_failure(stage, exc, batch_id=batch.id, failures=batch.failures + 1, policy=policy)
    journal.record_failure(batch.id, batch.state, time.time() + failure.wait)
    return f"{stage}: failed {failure.failures} times, last: {failure.error}" if failure.held else None


def record_stage_failure(
    stage: Stage, exc: BaseException, *, batch_id: int, failures: int, retry_seconds: float
) -> None:
    """Count and log one failure of a batch in a stage (call it inside the `except`): with the traceback the
    first time, as one line after that; `retry_seconds` is when it is tried again (0: it is held now)."""
    kind = type(exc).__name__
    STAGE_FAILURES.labels(stage=stage, kind=kind).inc()
    error, wait = failure_text(exc), round(retry_seconds, 1)
    if failures == 1:
        log.exception(
            "worker.batch_failed", stage=stage, batch_id=batch_id, kind=kind, failures=failures, error=error,
            wait_seconds=wait,
        )  # fmt: skip
    else:
        log.warning(
            "worker.batch_failed", stage=stage, batch_id=batch_id, kind=kind, failures=failures, error=error,
            wait_seconds=wait,
        )  # fmt: skip
