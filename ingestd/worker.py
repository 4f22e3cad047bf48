"""The shape every background step of the daemon shares: a thread that checks the journal every so often."""

from __future__ import annotations

import threading

import structlog

__all__ = ["PeriodicWorker"]

log = structlog.get_logger("ingestd.worker")


class PeriodicWorker:
    """A daemon thread that calls `check()` every `interval` seconds until `stop()`.

    An exception in one check is logged and the next check runs: the journal still holds the last committed
    state, so the work is simply tried again. `alive()` tells the daemon's watchdog whether the thread runs.
    """

    name = "worker"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def check(self) -> int:
        """Do the work that is due; return how much was done."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:
                log.exception("worker_failed", worker=self.name)
