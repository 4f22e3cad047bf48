"""The one place the pipeline is assembled: assemble -> route -> package/deliver over one journal and state directory.

`ingestd run` (daemon.py), `ingestd import` (bulk.py) and `ingestd demo` (through the daemon) build it here, so that
how a stage runs (its loop, watchdog progress, recovery, live reconfiguration) is decided once:

- `load_rules_for`: the configuration's rules, checked against its XNAT servers;
- `open_spool` / `recover_spool`: the spool and quarantine over the journal, reconciled after a crash once no
  receiver process of an earlier run still writes;
- `build_pipeline`: the stages the configuration asks for (no router without rules, no deliverer without XNAT
  servers; the retention worker in the daemon's pipeline only), connected (the deliverer names labels by the
  router's live rules); `Pipeline.start` starts them in the data's order, `Pipeline.stop` stops them in reverse,
  `Pipeline.reconfigure` applies a reloaded configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ingestd.config import Config
from ingestd.errors import ConfigError
from ingestd.journal import Journal
from ingestd.pipeline.assemble import Assembler, CompletionPolicy
from ingestd.pipeline.attach import SetRouter
from ingestd.pipeline.deliver import Deliverer
from ingestd.pipeline.retention import RetentionWorker
from ingestd.pipeline.route import Router
from ingestd.pipeline.runner import PeriodicWorker
from ingestd.receive.pool import wait_for_receivers
from ingestd.rules import RuleSet, load_rules
from ingestd.rules.shadow import log_shadowed
from ingestd.spool import Quarantine, Spool

__all__ = ["Pipeline", "build_pipeline", "load_rules_for", "open_spool", "recover_spool"]


def load_rules_for(config: Config) -> RuleSet | None:
    """The configuration's rules, checked against its XNAT servers; raises ConfigError."""
    rules = load_rules(config.rules) if config.rules else None
    log_shadowed(rules)  # rules.shadowed: a rule an earlier one keeps from ever matching
    if rules is not None:
        unknown = sorted({rule.route.server for rule in rules.rules} - set(config.xnat.servers))
        if unknown and config.xnat.servers:
            raise ConfigError(
                "rules", [f"rules route to XNAT server(s) {', '.join(unknown)}, not defined under xnat.servers"]
            )
    return rules


def open_spool(config: Config, journal: Journal) -> tuple[Spool, Quarantine]:
    """The spool and the quarantine of the configuration's state directory, recording in `journal`."""
    spool = Spool(config.spool_dir, journal, min_free_bytes=config.spool.min_free_mb * 2**20)
    return spool, Quarantine(config.quarantine_dir, journal)


def recover_spool(config: Config, spool: Spool, quarantine: Quarantine) -> None:
    """Reconcile the spool with the journal after a crash (call it holding the state directory's lock)."""
    with wait_for_receivers(config):  # no receiver of an earlier run may still be writing
        spool.recover(quarantine)


@dataclass
class Pipeline:
    """The stages over one journal; each is None when the configuration leaves it out."""

    assembler: Assembler | None
    router: Router | None
    deliverer: Deliverer | None
    retention: RetentionWorker | None = None  # removes what `retention:` says is done with (the daemon's)
    set_router: SetRouter | None = None  # routes attachment sets (non-DICOM files) with their studies' routes
    running: list[PeriodicWorker] = field(default_factory=list)  # started, in order

    @property
    def workers(self) -> list[PeriodicWorker]:
        stages = (self.assembler, self.router, self.set_router, self.deliverer, self.retention)
        return [worker for worker in stages if worker is not None]

    def start(self) -> None:
        """Start the stages in the data's order (the router removes what an interrupted batch left in the outbox,
        the deliverer makes its packages folder, before their first check)."""
        for worker in self.workers:
            worker.start()
            self.running.append(worker)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the running stages in reverse order, each within `timeout` s (None: as long as it takes)."""
        for worker in reversed(self.running):
            worker.stop(timeout)
        self.running.clear()

    def reconfigure(self, config: Config, rules: RuleSet | None) -> None:
        """Apply a reloaded configuration and rules: the rules, the XNAT servers and delivery settings, the batch
        failure limits, the completion times and the wedge limit change live; a stage is never added or removed."""
        if self.router is not None and rules is not None:
            self.router.rules = rules
        if self.set_router is not None and rules is not None:
            self.set_router.rules = rules
            self.set_router.config = config
        if self.deliverer is not None:
            self.deliverer.reconfigure(config)
        if self.retention is not None:
            self.retention.reconfigure(config)
        if self.assembler is not None:
            self.assembler.policy = CompletionPolicy(config.study_idle_seconds, config.study_max_wait_seconds)
        for worker in (self.assembler, self.router, self.set_router):
            if worker is not None:
                worker.wedged_after = config.wedged_worker_seconds
                worker.failures = config.batch_failures


def build_pipeline(
    journal: Journal,
    config: Config,
    rules: RuleSet | None,
    *,
    assemble: bool = True,
    interval: float = 1.0,
    retain: bool | None = None,
) -> Pipeline:
    """The stages for `config` and `rules`, not started: the assembler (unless `assemble` is False: `ingestd
    import` completes its batches itself), the router when there are rules, the deliverer when there are rules and
    XNAT servers, the retention worker when `retain` (by default: with the assembler, so the daemon's pipeline has
    it and `ingestd import`'s has not). Each looks for work every `interval` seconds."""
    assembler = None
    if assemble:
        assembler = Assembler(
            journal,
            CompletionPolicy(config.study_idle_seconds, config.study_max_wait_seconds),
            interval=interval,
            failures=config.batch_failures,
        )
        assembler.wedged_after = config.wedged_worker_seconds
    router = deliverer = set_router = None
    if rules is not None:
        router = Router(journal, rules, config.state_dir, interval=interval, failures=config.batch_failures)
        router.wedged_after = config.wedged_worker_seconds
        quarantine = Quarantine(config.quarantine_dir, journal)
        set_router = SetRouter(journal, rules, config, quarantine, interval=interval)
        set_router.wedged_after = config.wedged_worker_seconds
        if config.xnat.servers:
            deliverer = Deliverer(journal, config, interval=interval)
            live = router
            deliverer.rules = lambda: live.rules  # the rules in force, across reloads
    retention = (
        RetentionWorker(journal, config, interval=interval) if (assemble if retain is None else retain) else None
    )
    return Pipeline(assembler, router, deliverer, retention, set_router)
