"""Run the service until SIGTERM or SIGINT: the pipeline (built by `ingestd.pipeline.build`) and the receivers.

Start-up reconciles the spool with the journal (crash recovery), then starts the pipeline's stages, one watcher
per drop folder and the listener. Stopping is graceful and bounded by `stop_timeout_seconds`: no new associations,
stores in flight finish, the current delivery step finishes or is abandoned (the journal resumes it), the
journal is closed last.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import IO, Any, Protocol

import structlog

from ingestd import __version__
from ingestd.admin.checkconfig import check_config
from ingestd.attachspool import AttachmentSpool
from ingestd.config import Config, load_config
from ingestd.deadline import ProcessDeadline
from ingestd.errors import ConfigError
from ingestd.journal import Journal
from ingestd.journal.retries import record_daemon_rules
from ingestd.logs import event_buffer
from ingestd.metrics import (
    REGISTRY,
    AssociationCounters,
    JournalCollector,
    MetricsServer,
    record_daemon,
    record_daemon_stopping,
)
from ingestd.notify import SystemdNotifier
from ingestd.pipeline.assemble import Assembler
from ingestd.pipeline.build import Pipeline, build_pipeline, load_rules_for, open_spool, recover_spool
from ingestd.pipeline.deliver import Deliverer
from ingestd.pipeline.route import Router
from ingestd.pipeline.runner import PeriodicWorker, failure_text
from ingestd.receive.listener import DicomListener, bind_listening_socket
from ingestd.receive.pool import ReceiverPool
from ingestd.receive.watcher import DropFolderWatcher
from ingestd.rules.attach import attachable
from ingestd.statedir import lock_state_dir
from ingestd.status import JournalStatus, status_line
from ingestd.wakeup import Wakeup

__all__ = ["Daemon"]

log = structlog.get_logger("ingestd.daemon")

RELOAD_SECONDS = 60.0  # the deadline of a reload (reading the files again), when stop_timeout_seconds is shorter


class _Service(Protocol):
    def start(self) -> None: ...
    def stop(self) -> object: ...
    def alive(self) -> bool: ...


def _name(service: _Service) -> str:
    return str(getattr(service, "name", type(service).__name__))


class Daemon:
    """The running service: spool, journal, listener, watchers and assembler over one state directory."""

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path  # what SIGHUP reloads; None: reloading is not possible
        self.stopping = threading.Event()
        self._reload_requested = False
        self._pipeline: Pipeline | None = None
        self._lock_file: IO[str] | None = None
        self.journal: Journal | None = None
        self._status: JournalStatus | None = None  # the read model's connection (the STATUS line)
        self.listener: DicomListener | None = None
        self._services: list[_Service] = []
        self._metrics: MetricsServer | None = None
        self._collector: JournalCollector | None = None
        self._ready = False
        self._stop_requested_at: float | None = None  # time.monotonic() of the first SIGTERM/SIGINT
        self.abandoned: list[str] = []  # services still running when the last stop() gave up on them

    @property
    def _assembler(self) -> Assembler | None:
        return None if self._pipeline is None else self._pipeline.assembler

    @property
    def _router(self) -> Router | None:
        return None if self._pipeline is None else self._pipeline.router

    @property
    def _deliverer(self) -> Deliverer | None:
        return None if self._pipeline is None else self._pipeline.deliverer

    def _attachable(self, relative: str) -> bool:
        """Whether a rule in force (across reloads) attaches a non-DICOM file at `relative` (ingestd.rules.attach)."""
        router = self._router
        return router is not None and attachable(router.rules, relative)

    def _lock_state_dir(self) -> None:
        self._lock_file = lock_state_dir(self.config.state_dir)

    def start(self) -> None:
        """Recover the spool and start every service; return once they are running."""
        config = self.config
        rules = load_rules_for(config)  # a bad rules file stops the start, nothing else
        self._lock_state_dir()
        self.journal = Journal(config.journal_path)
        spool, quarantine = open_spool(config, self.journal)
        recover_spool(config, spool, quarantine)
        attachments = AttachmentSpool(config.state_dir, self.journal, min_free_bytes=config.spool.min_free_mb * 2**20)
        attachments.recover()  # copies of non-DICOM files no journal row names: their drop file is still there
        associations = AssociationCounters(config.listener.processes) if config.listener.enabled else None
        self._start_metrics(associations)
        self._pipeline = pipeline = build_pipeline(self.journal, config, rules)
        try:
            pipeline.start()
        finally:
            self._services.extend(pipeline.running)
        if rules is None:
            log.warning("daemon.rules_missing", detail="no rules configured: complete studies wait, nothing is routed")
        else:
            log.info("daemon.rules_loaded", files=[str(path) for path in rules.sources], version=rules.version)
            if pipeline.deliverer is None:
                log.warning(
                    "daemon.xnat_missing", detail="no xnat.servers configured: routed studies wait, nothing is sent"
                )
        for folder in config.drop_folders:
            watcher = DropFolderWatcher(
                folder, config.archives, spool, quarantine, attachable=self._attachable, attachments=attachments
            )
            watcher.start()
            self._services.append(watcher)
        if config.listener.enabled:
            listening = None
            if config.listener.processes > 1:
                # The receivers are up before anything accepts, so the first associations spread too.
                listening = bind_listening_socket(config.listener)
                pool = ReceiverPool(config, listening, config.listener.processes - 1, associations)
                self._services.append(pool)
                pool.start()
            self.listener = DicomListener(
                config.listener,
                spool,
                listening_socket=listening,
                associations=None if associations is None else associations.slot(0),
            )
            self.listener.start()
            self._services.append(self.listener)
        where = None if self.listener is None else (config.listener.host, self.listener.port, config.listener.ae_title)
        record_daemon(self.journal, self._metrics, where)  # what `ingestd health` reads: no HTTP needed
        # What `ingestd retry` reads to tell which rule set the daemon routes with (and that a SIGHUP took effect).
        record_daemon_rules(self.journal, os.getpid(), "started", None if rules is None else rules.version)
        self._ready = True
        log.info("daemon.started", version=__version__, state_dir=str(config.state_dir), pid=os.getpid())

    def _start_metrics(self, associations: AssociationCounters | None) -> None:
        """Serve /metrics, /healthz and the web page (/ui/). A port that cannot be bound is logged: receiving matters
        more."""
        config = self.config
        self._collector = JournalCollector(config.journal_path, config.spool_dir, associations)
        REGISTRY.register(self._collector)
        if not config.metrics.enabled:
            return
        ui = None
        if config.ui.enabled:
            from ingestd.ui import UiApp  # noqa: PLC0415 - Jinja2 and the templates only when the page is served

            ui = UiApp(config, self.health, events=event_buffer())  # the study page's recent log events
            ui.rules_in_force = lambda: None if self._router is None else self._router.rules  # across reloads
            ui.current_config = lambda: self.config  # what a reload applied: the rules files, the XNAT servers
        server = MetricsServer(config.metrics.host, config.metrics.port, REGISTRY, self.health, ui=ui)
        try:
            server.start()
        except OSError as exc:
            log.error(
                "metrics.unavailable",
                host=config.metrics.host,
                port=config.metrics.port,
                reason=exc.strerror or str(exc),
            )
            return
        self._metrics = server

    @property
    def metrics_port(self) -> int | None:
        """The port /metrics and /healthz are served on (useful when configured as 0); None when not served."""
        return None if self._metrics is None else self._metrics.port

    def health(self) -> dict[str, Any]:
        """Liveness and readiness, as /healthz reports them."""
        services: dict[str, bool] = {}
        seen: Counter[str] = Counter()
        for service in self._services:
            name = _name(service)
            seen[name] += 1  # one watcher per drop folder: watcher, watcher-2, ...
            services[name if seen[name] == 1 else f"{name}-{seen[name]}"] = service.alive()
        wedged = sorted(
            service.name
            for service in self._services
            if isinstance(service, PeriodicWorker) and service.wedged() is not None
        )
        live = all(services.values()) and not wedged
        ready = self._ready and not self.stopping.is_set()
        xnat = self._deliverer.breaker.states() if self._deliverer is not None else {}
        paused = sorted(name for name, state in xnat.items() if state["state"] == "paused")
        if live and ready and paused:
            status = "degraded"  # alive and receiving, but deliveries to these servers wait for a person
        elif live and ready:
            status = "ok"
        elif self.stopping.is_set():
            status = "stopping"
        else:
            status = "starting" if live else "failing"
        return {
            "status": status,
            "live": live,
            "ready": ready,
            "services": services,
            "wedged": wedged,
            "xnat": xnat,
            "paused_servers": paused,
        }

    def stop(self, timeout: float | None = None) -> None:
        """Stop every service within `timeout` s, then close the journal.

        `timeout` defaults to `stop_timeout_seconds`, counted from the SIGTERM/SIGINT if one came. The services
        stop side by side, each in a thread of its own, so that none waits for another: the listener and the
        receiver processes accept no new association and let open ones go on for a grace period, then abort
        them (a store in flight still finishes; what was acknowledged is durable); the watchers leave the file
        being taken for the next start; the workers finish their current check, the deliverer its current step.

        What has not ended by the deadline is abandoned and listed in `abandoned`. That is safe: the journal
        commits every state change before the work it stands for (`importing` before the upload, say), so the
        next start resumes it as after a crash. The journal and the state directory's lock are then left open,
        since an abandoned thread may still be using the journal: the caller should end the process at once
        (`ingestd run` does). Nothing is closed under a thread that is mid-transaction.
        """
        self._ready = False
        if self.journal is not None:
            try:
                record_daemon_stopping(self.journal)  # `ingestd health` says "stopping" from now on
            except Exception as exc:  # noqa: BLE001 - a journal that cannot be written must not stop the stop
                log.warning("daemon.stop_record_failed", error=failure_text(exc))
        requested = self._stop_requested_at
        started = time.monotonic() if requested is None else requested
        budget = self.config.stop_timeout_seconds if timeout is None else timeout
        reserve = min(2.0, max(0.75, budget / 10))  # after the services: the metrics server (0.5 s), journal, log
        services_until = started + budget - reserve
        stoppers: list[tuple[_Service, threading.Thread]] = []
        for service in reversed(self._services):
            thread = threading.Thread(
                target=self._stop_service, args=(service, services_until), name=f"stop-{_name(service)}", daemon=True
            )
            thread.start()
            stoppers.append((service, thread))
        for _service, thread in stoppers:
            thread.join(max(0.0, services_until + 0.1 - time.monotonic()))
        self.abandoned = [
            _name(service)
            for service, thread in stoppers
            if thread.is_alive() or (isinstance(service, PeriodicWorker) and service.alive())
        ]
        self._services.clear()
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
        if self._collector is not None:
            REGISTRY.unregister(self._collector)
            self._collector = None
        if self.abandoned:
            log.warning(
                "daemon.stop_abandoned",
                services=self.abandoned,
                timeout=budget,
                detail="still running at the stop deadline; the journal resumes their work at the next start",
            )
        else:
            if self._status is not None:
                self._status.close()
                self._status = None
            if self.journal is not None:
                self.journal.close()
                self.journal = None
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None
        log.info("daemon.stopped", seconds=round(time.monotonic() - started, 2), abandoned=self.abandoned or None)

    def _stop_service(self, service: _Service, until: float) -> None:
        """Stop one service, giving it until `until` (time.monotonic()) where it takes a time limit."""
        budget = max(0.0, until - time.monotonic())
        try:
            if isinstance(service, DicomListener):
                service.stop(grace_seconds=min(self.config.association_grace_seconds, budget))
            elif isinstance(service, PeriodicWorker | ReceiverPool | DropFolderWatcher):
                service.stop(timeout=budget)
            else:
                service.stop()
        except Exception:
            log.exception("daemon.service_stop_failed", service=type(service).__name__)

    def _wedged(self) -> list[str]:
        """The workers whose running check has made no progress for longer than their limit; each is logged."""
        wedged = []
        for service in self._services:
            if isinstance(service, PeriodicWorker) and (seconds := service.wedged()) is not None:
                wedged.append(service.name)
                log.error(
                    "daemon.worker_wedged",
                    worker=service.name,
                    seconds=round(seconds, 1),
                    limit_seconds=service.wedged_after,
                    stack=service.stack(),
                )
        return wedged

    def run(self) -> int:
        """Start, serve until SIGTERM or SIGINT, then stop gracefully. Returns the exit status.

        Under systemd (`Type=notify`) it reports READY=1 once every service runs, a STATUS= line with the
        journal's counts, WATCHDOG=1 while every worker thread is alive and none is wedged, and STOPPING=1.
        A worker that died stops the pings, is logged, and makes the daemon exit with status 1 (systemd restarts
        it; the journal resumes everything).

        A wedged worker (a check without progress for longer than `wedged_worker_seconds`; the deliverer's
        limit is at least its longest XNAT wait) is treated the same way: `daemon.worker_wedged` is logged with
        where the thread is stuck, the pings stop at once, and the daemon stops gracefully (the wedged thread is
        abandoned at the stop deadline) and exits with status 1. It exits by itself rather than only waiting for
        systemd's watchdog so that a wedge is also cured without systemd (Docker's restart policy restarts it)
        and the other services still stop gracefully instead of being killed; STOPPING=1 disarms systemd's
        watchdog for that stop, TimeoutStopSec= bounds it.

        A thread that holds the GIL and does not let go (C code that never releases it) freezes the main loop
        itself: no check, no signal handler can run. For that, the main loop re-arms a deadline kept by a thread
        that needs no GIL (`ProcessDeadline`, faulthandler's watchdog) at every tick, with `stop_timeout_seconds`,
        and with what is left of it when a stop begins: should the main loop not come round in time, every
        thread's stack goes to stderr and the process exits with status 1 (systemd restarts it; the journal
        resumes). SIGTERM is so honoured within `stop_timeout_seconds` whatever a worker is doing.
        """

        # The handlers take no lock (the stdlib logging handler's is reentrant; `wake` is a pipe, never an Event:
        # see ingestd/wakeup.py): the main loop does the rest.
        wake = Wakeup()

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            log.info("daemon.signal", signal=signal.Signals(signum).name)
            if self._stop_requested_at is None:
                self._stop_requested_at = time.monotonic()  # the stop deadline counts from here
            wake.notify()

        def request_reload(signum: int, _frame: FrameType | None) -> None:
            log.info("daemon.signal", signal=signal.Signals(signum).name)
            self._reload_requested = True
            wake.notify()

        notifier = SystemdNotifier()
        handlers = {signal.SIGTERM: request_stop, signal.SIGINT: request_stop, signal.SIGHUP: request_reload}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        deadline = ProcessDeadline()
        try:
            self.start()
            return self._serve(wake, notifier, deadline)
        finally:
            if self._stop_requested_at is not None:
                self.stopping.set()
            requested = self._stop_requested_at
            started = time.monotonic() if requested is None else requested
            deadline.arm(started + self.config.stop_timeout_seconds - time.monotonic())
            notifier.stopping()
            self.stop()
            deadline.disarm()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake.close()

    def _serve(self, wake: Wakeup, notifier: SystemdNotifier, deadline: ProcessDeadline) -> int:
        """The main loop of `run`, once started: until a stop is requested (0), a worker dies or wedges (1)."""
        if self.journal is not None:
            self.journal.set_meta("heartbeat", f"{time.time():.3f}")
        notifier.ready(self._status_line())
        while self._stop_requested_at is None:
            # Read at every tick: a reload may change stop_timeout_seconds. A few ticks fit in the deadline.
            tick = self.config.stop_timeout_seconds
            deadline.arm(tick)
            interval = min(5.0, tick / 4, notifier.watchdog_seconds / 2 if notifier.watchdog_seconds else 5.0)
            wake.wait(interval)
            if self._stop_requested_at is not None:
                break
            if self._reload_requested:
                self._reload_requested = False
                notifier.send("RELOADING=1")
                deadline.arm(max(tick, RELOAD_SECONDS))  # reading a large lookup table may take a while
                self._reload_safely()
                notifier.send("READY=1")
            dead = [type(service).__name__ for service in self._services if not service.alive()]
            if dead:
                log.error("daemon.worker_died", services=dead)
                return 1
            if self._wedged():  # no more WATCHDOG=1: the daemon stops and exits with status 1
                return 1
            if self.journal is not None:
                self.journal.set_meta("heartbeat", f"{time.time():.3f}")  # `ingestd status` shows its age
            if notifier.enabled:
                notifier.send("WATCHDOG=1", f"STATUS={self._status_line()}")
        return 0

    def _reload_safely(self) -> None:
        """`reload`, which must never end the daemon: whatever it raises is logged, the daemon goes on."""
        try:
            self.reload()
        except Exception as exc:  # noqa: BLE001 - MemoryError included: the running configuration stays in force
            log.error("daemon.reload", outcome="failed", reason=failure_text(exc))

    def reload(self) -> bool:
        """Load the configuration file and its rules again; apply what can change live. False if refused.

        The new files are checked first, as `ingestd check-config` checks them; on any error the running ones stay
        in force and the errors are logged. Rules, XNAT servers, delivery settings, batch failure limits, retention
        and the completion times change live; batches already routed keep the rule they were routed with (the
        journal holds their route). The listener, drop folders, state directory and spool need a restart, which is
        logged.
        """
        if self.config_path is None:
            log.warning("daemon.reload", outcome="unavailable", detail="the daemon was not started from a file")
            return False
        try:
            # What `check-config` calls an error refuses a reload as it refuses a start (the files it names, the
            # credentials' modes, keys given twice...); the rules' own keys are checked as the rules load.
            report = check_config(self.config_path, keys=False)
            if report.errors:
                raise ConfigError(str(self.config_path), report.errors)
            new = load_config(self.config_path)
            rules = load_rules_for(new)
        except ConfigError as exc:
            log.error("daemon.reload", outcome="refused", reason="invalid", problems=exc.problems)
            self._record_rules("refused", list(exc.problems))
            return False
        except Exception as exc:  # noqa: BLE001 - MemoryError, RecursionError...: nothing is applied, the daemon goes on
            log.error("daemon.reload", outcome="refused", reason=failure_text(exc))
            self._record_rules("refused", [failure_text(exc)])
            return False
        old = self.config
        if self._pipeline is not None:
            self._pipeline.reconfigure(new, rules)
        live = {
            "rules",
            "xnat",
            "delivery",
            "batch_failures",
            "retention",
            "study_idle_seconds",
            "study_max_wait_seconds",
            "stop_timeout_seconds",
            "wedged_worker_seconds",
        }
        restart = sorted(
            key for key in type(old).model_fields if key not in live and getattr(old, key) != getattr(new, key)
        )
        if (rules is None) != (self._router is None) or (new.xnat.servers and self._deliverer is None):
            restart.append("rules or xnat (turned on or off)")
        self.config = new.model_copy(
            update={key: getattr(old, key) for key in type(old).model_fields if key in restart}
        )
        log.info(
            "daemon.reload",
            outcome="applied",
            rules_version=rules.version if rules is not None else None,
            needs_restart=restart or None,
        )
        self._record_rules("applied", [])
        return True

    def _record_rules(self, outcome: str, problems: list[str]) -> None:
        """Record in the journal the rule set in force after a reload, and the reload's outcome (`ingestd retry`
        waits for it). Never ends the daemon: a journal that cannot be written is logged."""
        router = self._router
        if self.journal is None:
            return
        try:
            version = None if router is None else router.rules.version
            record_daemon_rules(self.journal, os.getpid(), outcome, version, problems)
        except Exception as exc:  # noqa: BLE001 - the reload itself is done; only its record is missing
            log.error("daemon.reload_record_failed", reason=failure_text(exc))

    def _status_line(self) -> str:
        """The systemd STATUS line, counted on a read-only connection of its own: never under the write lock."""
        if self.journal is None:
            return "starting"
        if self._status is None:
            self._status = JournalStatus(self.journal.path)
        return status_line(self._status.state_counts())
