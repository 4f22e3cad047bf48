"""Receiver processes that share the listener's port, so associations use more than one core.

One Python process is bound by its interpreter lock: concurrent associations in one process share one core
for their Python work. With `listener.processes` above 1 (the default is 1: since ingestd serves the data
phase itself, storing costs little Python and one process kept up best on 2 cores) the daemon starts
`listener.processes - 1` extra receiver processes. Each gets a
duplicate of the main process's listening socket and accepts from it (whichever process is free first takes
a new association), opens its own connection to the journal (SQLite serialises the writers) and writes into
the same spool. They only receive: the watcher and the assembler run in the main process.

A receiver process dies with the daemon (PR_SET_PDEATHSIG asks the kernel to send it SIGTERM, which it handles
gracefully), and holds a shared lock on `receivers.lock` while it runs, so a restarted daemon waits for the
last one to finish before it reconciles the spool.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import IO

import structlog

from ingestd.config import Config
from ingestd.journal import Journal
from ingestd.logs import configure_logging
from ingestd.metrics import AssociationCounters, AssociationSlot
from ingestd.receive.listener import DicomListener
from ingestd.spool import Spool
from ingestd.wakeup import Wakeup

__all__ = ["ReceiverPool", "wait_for_receivers"]

log = structlog.get_logger("ingestd.receivers")

_PR_SET_PDEATHSIG = 1
_CONTEXT = multiprocessing.get_context("spawn")


def _receivers_lock(config: Config) -> Path:
    return config.state_dir / "receivers.lock"


def wait_for_receivers(config: Config, timeout: float = 120.0) -> IO[str]:
    """Take the receivers lock exclusively: block until no receiver process of an earlier run is alive.

    Returns the open lock file; close it to let this run's receivers start.
    """
    lock = _receivers_lock(config).open("a+")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                raise TimeoutError(
                    f"receiver processes of an earlier run still hold {_receivers_lock(config)}"
                ) from None
            time.sleep(0.1)


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _receiver_main(
    config: Config,
    listening: socket.socket,
    index: int,
    parent: int,
    ready: Connection,
    associations: AssociationSlot | None = None,
) -> None:
    """Run one receiver process until SIGTERM or SIGINT (the target of a spawned process)."""
    stopping = Wakeup()  # not a threading.Event: its set() in a signal handler can deadlock (ingestd/wakeup.py)

    def request_stop(_signum: int, _frame: FrameType | None) -> None:
        stopping.notify()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    _die_with_parent(parent)
    configure_logging(config.logging.level, config.logging.format)
    structlog.contextvars.bind_contextvars(receiver=index)
    with _receivers_lock(config).open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        journal = Journal(config.journal_path)
        spool = Spool(config.spool_dir, journal, min_free_bytes=config.spool.min_free_mb * 2**20)
        if associations is not None:
            associations.reset_active()
        listener = DicomListener(config.listener, spool, listening_socket=listening, associations=associations)
        try:
            listener.start()
            # A pipe, not a multiprocessing.Event: setting an Event whose waiter was killed can hang for ever.
            with contextlib.suppress(OSError):
                ready.send(listener.port)
                ready.close()
            stopping.wait()
        finally:
            listener.stop(grace_seconds=config.association_grace_seconds)
            journal.close()


class ReceiverPool:
    """The extra receiver processes of a daemon, restarted if one dies."""

    def __init__(
        self,
        config: Config,
        listening: socket.socket,
        count: int,
        associations: AssociationCounters | None = None,
    ) -> None:
        self.config = config
        self.associations = associations  # slot 0 is the main process's listener, slot N receiver N
        self.listening = listening
        self.count = count
        self._processes: dict[int, BaseProcess] = {}
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="receiver-supervisor", daemon=True)

    def _spawn(self, index: int) -> None:
        ready_reader, ready_writer = _CONTEXT.Pipe(duplex=False)
        process = _CONTEXT.Process(
            target=_receiver_main,
            args=(
                self.config,
                self.listening,
                index,
                os.getpid(),
                ready_writer,
                None if self.associations is None else self.associations.slot(index),
            ),
            name=f"ingestd-receiver-{index}",
            daemon=False,
        )
        process.start()
        ready_writer.close()
        with ready_reader:
            try:
                ready = ready_reader.poll(60) and ready_reader.recv() is not None
            except (EOFError, OSError):  # it died before it was listening
                ready = False
        if not ready:
            log.error("receive.receiver_process", index=index, state="not_ready", pid=process.pid)
        else:
            log.info("receive.receiver_process", index=index, state="started", pid=process.pid)
        self._processes[index] = process

    def alive(self) -> bool:
        return self._supervisor.is_alive()

    def start(self) -> None:
        for index in range(1, self.count + 1):
            self._spawn(index)
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            for index, process in list(self._processes.items()):
                if process.is_alive() or self._stop.is_set():
                    continue
                log.error("receive.receiver_process", index=index, state="died", exitcode=process.exitcode)
                try:
                    self._spawn(index)
                except Exception:  # keep supervising the others
                    log.exception("receive.receiver_restart_failed", index=index)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop every receiver gracefully (SIGTERM), killing any that has not finished within `timeout` s."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._supervisor.is_alive():
            self._supervisor.join(timeout)
        for process in list(self._processes.values()):
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        for index, process in list(self._processes.items()):
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("receive.receiver_process", index=index, state="killed")
                process.kill()
                process.join()
        self._processes.clear()
