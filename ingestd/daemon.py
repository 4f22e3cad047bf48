"""Wire the steps into threads and run them until SIGTERM or SIGINT.

Start-up reconciles the spool with the journal (crash recovery), then starts the listener, one watcher per
drop folder and the assembler. Stopping is graceful: no new associations, stores in flight finish, the
journal is closed last.
"""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, Protocol

import structlog

from ingestd import __version__
from ingestd.assemble import Assembler, CompletionPolicy
from ingestd.config import Config, load_config
from ingestd.deliver import Deliverer
from ingestd.errors import ConfigError, IngestdError
from ingestd.journal import Journal
from ingestd.notify import SystemdNotifier
from ingestd.receive.listener import DicomListener, bind_listening_socket
from ingestd.receive.pool import ReceiverPool, wait_for_receivers
from ingestd.receive.watcher import DropFolderWatcher
from ingestd.route import Router
from ingestd.rules import RuleSet, load_rules
from ingestd.spool import Quarantine, Spool

__all__ = ["Daemon", "StateDirLockedError"]

log = structlog.get_logger("ingestd.daemon")


class StateDirLockedError(IngestdError):
    """Another ingestd already runs on this state directory."""


class _Service(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def alive(self) -> bool: ...


def _load_rules_for(config: Config) -> RuleSet | None:
    """The configuration's rules, checked against its XNAT servers; raises ConfigError."""
    rules = load_rules(config.rules) if config.rules else None
    if rules is not None:
        unknown = sorted({rule.route.server for rule in rules.rules} - set(config.xnat.servers))
        if unknown and config.xnat.servers:
            raise ConfigError(
                "rules", [f"rules route to XNAT server(s) {', '.join(unknown)}, not defined under xnat.servers"]
            )
    return rules


class Daemon:
    """The running service: spool, journal, listener, watchers and assembler over one state directory."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path  # what SIGHUP reloads; None: reloading is not possible
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._reload_requested = False
        self._router: Router | None = None
        self._deliverer: Deliverer | None = None
        self._assembler: Assembler | None = None
        self._lock_file: IO[str] | None = None
        self.journal: Journal | None = None
        self.listener: DicomListener | None = None
        self._services: list[_Service] = []

    def _lock_state_dir(self) -> None:
        state = self.config.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o750)
        lock = (state / "ingestd.lock").open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StateDirLockedError(
                f"another ingestd is already running on {state} (it holds {state / 'ingestd.lock'})"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock_file = lock

    def start(self) -> None:
        """Recover the spool and start every service; return once they are running."""
        config = self.config
        rules = _load_rules_for(config)  # a bad rules file stops the start, nothing else
        self._lock_state_dir()
        self.journal = Journal(config.journal_path)
        spool = Spool(config.spool_dir, self.journal, min_free_bytes=config.spool.min_free_mb * 2**20)
        quarantine = Quarantine(config.quarantine_dir, self.journal)
        with wait_for_receivers(config):  # no receiver of an earlier run may still be writing
            spool.recover(quarantine)
        assembler = Assembler(self.journal, CompletionPolicy(config.study_idle_seconds, config.study_max_wait_seconds))
        assembler.start()
        self._services.append(assembler)
        self._assembler = assembler
        if rules is not None:
            router = Router(self.journal, rules, config.state_dir)
            router.start()
            self._services.append(router)
            self._router = router
            log.info("rules_loaded", files=[str(path) for path in rules.sources], version=rules.version)
            if config.xnat.servers:
                deliverer = Deliverer(self.journal, config)
                deliverer.start()
                self._services.append(deliverer)
                self._deliverer = deliverer
            else:
                log.warning("xnat_missing", detail="no xnat.servers configured: routed studies wait, nothing is sent")
        else:
            log.warning("rules_missing", detail="no rules configured: complete studies wait, nothing is routed")
        for folder in config.drop_folders:
            watcher = DropFolderWatcher(folder, config.archives, spool, quarantine)
            watcher.start()
            self._services.append(watcher)
        if config.listener.enabled:
            listening = None
            if config.listener.processes > 1:
                # The receivers are up before anything accepts, so the first associations spread too.
                listening = bind_listening_socket(config.listener)
                pool = ReceiverPool(config, listening, config.listener.processes - 1)
                self._services.append(pool)
                pool.start()
            self.listener = DicomListener(config.listener, spool, listening_socket=listening)
            self.listener.start()
            self._services.append(self.listener)
        log.info("daemon_started", version=__version__, state_dir=str(config.state_dir), pid=os.getpid())

    def stop(self) -> None:
        """Stop every service, newest first (receivers before the assembler), then close the journal."""
        while self._services:
            service = self._services.pop()
            try:
                service.stop()
            except Exception:
                log.exception("service_stop_failed", service=type(service).__name__)
        if self.journal is not None:
            self.journal.close()
            self.journal = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        log.info("daemon_stopped")

    def run(self) -> int:
        """Start, serve until SIGTERM or SIGINT, then stop gracefully. Returns the exit status.

        Under systemd (`Type=notify`) it reports READY=1 once every service runs, a STATUS= line with the
        journal's counts, WATCHDOG=1 while every worker thread is alive, and STOPPING=1. A worker that died
        stops the pings, is logged, and makes the daemon exit with status 1 (systemd restarts it; the journal
        resumes everything).
        """

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal", signal=signal.Signals(signum).name)
            self.stopping.set()
            self._wake.set()

        def request_reload(signum: int, _frame: FrameType | None) -> None:
            log.info("signal", signal=signal.Signals(signum).name)
            self._reload_requested = True
            self._wake.set()

        notifier = SystemdNotifier()
        handlers = {signal.SIGTERM: request_stop, signal.SIGINT: request_stop, signal.SIGHUP: request_reload}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        status = 0
        try:
            self.start()
            if self.journal is not None:
                self.journal.set_meta("heartbeat", f"{time.time():.3f}")
            notifier.ready(self._status_line())
            interval = min(5.0, notifier.watchdog_seconds / 2) if notifier.watchdog_seconds else 5.0
            while not self.stopping.is_set():
                self._wake.wait(interval)
                self._wake.clear()
                if self.stopping.is_set():
                    break
                if self._reload_requested:
                    self._reload_requested = False
                    notifier.send("RELOADING=1")
                    self.reload()
                    notifier.send("READY=1")
                dead = [type(service).__name__ for service in self._services if not service.alive()]
                if dead:
                    log.error("worker_died", services=dead)
                    status = 1
                    break
                if self.journal is not None:
                    self.journal.set_meta("heartbeat", f"{time.time():.3f}")  # `ingestd status` shows its age
                if notifier.enabled:
                    notifier.send("WATCHDOG=1", f"STATUS={self._status_line()}")
        finally:
            notifier.stopping()
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return status

    def reload(self) -> bool:
        """Load the configuration file and its rules again; apply what can change live. False if refused.

        The new files are validated first; on any error the running ones stay in force and the errors are
        logged. Rules, XNAT servers, delivery settings and the completion times change live; batches already
        routed keep the rule they were routed with (the journal holds their route). The listener, drop folders,
        state directory and spool need a restart, which is logged.
        """
        if self.config_path is None:
            log.warning("reload", outcome="unavailable", detail="the daemon was not started from a file")
            return False
        try:
            new = load_config(self.config_path)
            rules = _load_rules_for(new)
        except ConfigError as exc:
            log.error("reload", outcome="refused", problems=exc.problems)
            return False
        old = self.config
        if self._router is not None and rules is not None:
            self._router.rules = rules
        if self._deliverer is not None:
            self._deliverer.reconfigure(new)
        if self._assembler is not None:
            self._assembler.policy = CompletionPolicy(new.study_idle_seconds, new.study_max_wait_seconds)
        live = {"rules", "xnat", "delivery", "study_idle_seconds", "study_max_wait_seconds"}
        restart = sorted(
            key for key in type(old).model_fields if key not in live and getattr(old, key) != getattr(new, key)
        )
        if (rules is None) != (self._router is None) or (new.xnat.servers and self._deliverer is None):
            restart.append("rules or xnat (turned on or off)")
        self.config = new.model_copy(
            update={key: getattr(old, key) for key in type(old).model_fields if key in restart}
        )
        log.info(
            "reload",
            outcome="applied",
            rules_version=rules.version if rules is not None else None,
            needs_restart=restart or None,
        )
        return True

    def _status_line(self) -> str:
        if self.journal is None:
            return "starting"
        counts: dict[str, int] = {}
        for batch in self.journal.batches():
            counts[batch.state] = counts.get(batch.state, 0) + 1
        states = ", ".join(f"{count} {state}" for state, count in sorted(counts.items())) or "no studies"
        return f"serving; studies: {states}"
