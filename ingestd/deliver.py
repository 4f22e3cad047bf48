"""Delivery: package each routed batch, import it into XNAT's prearchive, wait for XNAT, archive, verify.

One row per batch in the journal's `deliveries` table says which step comes next, when, and what XNAT
answered so far; every step commits before and after it talks to XNAT, so a restart resumes exactly where
the last run stopped. The steps:

    package -> preflight -> import -> wait -> archive -> verify -> done
                              |(crash)   |                 |(crash)
                           importing   (READY)          archiving

`importing` and `archiving` are written *before* the request: finding one at start means the request may or
may not have reached XNAT. Then the batch is looked for first (prearchive by project, StudyInstanceUID and
session label; archive by project, subject and label) and adopted if XNAT has it, so a retry never creates a
second session. A retryable failure (XNAT down, 5xx, timeouts, a refused login) schedules the same step again
with exponential back-off and jitter, up to the server's attempt and age caps; a permanent one (XNAT's own
refusal, a conflict, a missing project) holds the batch with XNAT's message.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ingestd.config import Config, XnatServer
from ingestd.journal import Journal, StudyState
from ingestd.metrics import DELIVERIES, RETRIES, STAGE_SECONDS, stage_seconds
from ingestd.package import write_package
from ingestd.worker import PeriodicWorker
from ingestd.xnat import XnatClient, XnatError, scan_counts

__all__ = ["Deliverer", "HoldError", "backoff_seconds", "wedge_limit"]

log = structlog.get_logger("ingestd.deliver")


_STEPS_PER_CHECK = 12  # at most this many steps of one batch per check, so that other batches get their turn
_WEDGE_MARGIN_SECONDS = 120.0  # beyond the longest XNAT wait: journal writes, a zip entry, a slow disk


def wedge_limit(config: Config) -> float:
    """Seconds the deliverer may go without progress before it counts as wedged: the configured limit, and at
    least the longest one XNAT request may wait for its answer (the client reports progress otherwise) plus a
    margin, so that a slow but legitimate archive request is never taken for a wedge."""
    waits = [XnatClient.longest_wait_seconds(server) for server in config.xnat.servers.values()]
    return max([config.wedged_worker_seconds, *(wait + _WEDGE_MARGIN_SECONDS for wait in waits)])


class HoldError(Exception):
    """The batch cannot go on without a person: held with this reason."""


def backoff_seconds(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """The wait before attempt `attempt + 1`: doubling from `initial`, capped at `maximum`, jittered ±50 %."""
    base = min(maximum, initial * 2 ** max(0, attempt - 1))
    return float(base * rng.uniform(0.5, 1.5))


@dataclass(frozen=True, slots=True)
class _Job:
    """One batch's delivery as a step sees it: the route, the journal row, the server and its client."""

    batch_id: int
    route: Mapping[str, Any]
    delivery: Mapping[str, Any]
    server: XnatServer
    client: XnatClient

    @property
    def project(self) -> str:
        return str(self.route["project"])

    @property
    def subject(self) -> str:
        return str(self.route["subject"])

    @property
    def session(self) -> str:
        return str(self.route["session"])

    @property
    def study_uid(self) -> str:
        return str(self.route["study_uid"])


class Deliverer(PeriodicWorker):
    """A thread that moves routed batches through the delivery steps, one batch at a time."""

    name = "deliverer"

    def __init__(self, journal: Journal, config: Config, interval: float = 1.0) -> None:
        super().__init__(interval)
        self.journal = journal
        self.config = config
        self.state_dir = config.state_dir
        self.packages = config.state_dir / "packages"
        self._clients: dict[str, XnatClient] = {}
        self._rng = random.Random()  # jitter, not secrets
        self._pending: Config | None = None
        self._current: tuple[int, str] | None = None  # the batch and step being taken now
        self.wedged_after = wedge_limit(config)

    def start(self) -> None:
        self.packages.mkdir(parents=True, exist_ok=True)
        super().start()

    def stop(self, timeout: float | None = None) -> bool:
        """Let the step in progress finish if it can within `timeout` s, then log out of XNAT.

        A step still running then is abandoned, safely: `importing` or `archiving` was committed before its
        request went out, and the next start looks in XNAT before asking again. The thread is left alone (its
        XNAT client included) and ends with the process. Return whether the thread has ended.
        """
        if not super().stop(timeout):
            batch_id, step = self._current or (None, None)
            log.warning(
                "deliver.step_abandoned",
                batch_id=batch_id,
                step=step,
                timeout=None if timeout is None else round(timeout, 1),
            )
            return False
        for client in self._clients.values():
            client.close()
        return True

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded configuration from the next check on (the worker thread applies it between steps)."""
        self._pending = config

    def _apply_pending(self) -> None:
        config, self._pending = self._pending, None
        if config is None:
            return
        old, self.config = self.config.xnat.servers, config
        self.wedged_after = wedge_limit(config)
        for name in [name for name, client in self._clients.items() if config.xnat.servers.get(name) != old.get(name)]:
            self._clients.pop(name).close()  # its settings changed: log in again with the new ones

    def check(self) -> int:
        """Advance every due batch through the steps that are due now; return how many steps were taken."""
        self._apply_pending()
        advanced = 0
        routes = self.journal.routes()
        for batch in sorted(self.journal.batches((StudyState.ROUTED,)), key=lambda b: b.id):
            if self.stopping:
                break
            delivery = self.journal.delivery(batch.id)
            if delivery is None:
                self.journal.start_delivery(batch.id, time.time())
                delivery = self.journal.delivery(batch.id)
            # One step after the other while the batch is due: the next check is a poll interval away.
            for _ in range(_STEPS_PER_CHECK):
                if delivery is None or delivery["next_attempt_at"] > time.time() or self.stopping:
                    break
                self.step(batch.id, routes[batch.id], delivery)
                advanced += 1
                if self.journal.batch_state(batch.id) != StudyState.ROUTED:
                    break
                delivery = self.journal.delivery(batch.id)
        return advanced

    # -- one step ------------------------------------------------------------------------------------------

    def step(self, batch_id: int, route: Mapping[str, Any], delivery: Mapping[str, Any]) -> None:
        name = str(route["server"])
        server = self.config.xnat.servers.get(name)
        step = str(delivery["step"])
        self._current = (batch_id, step)
        self.beat()
        try:
            if server is None:
                raise HoldError(f"no XNAT server named '{name}' in the configuration (xnat.servers)")
            handler = getattr(self, f"_step_{step}")
            handler(_Job(batch_id, route, delivery, server, self._client(name, server)))
        except HoldError as exc:
            self._hold(batch_id, str(exc), step)
        except XnatError as exc:
            if not exc.retryable:
                self._hold(batch_id, str(exc), step)
            else:
                self._retry(batch_id, delivery, server, str(exc))
        finally:
            self._current = None

    def _client(self, name: str, server: XnatServer) -> XnatClient:
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = XnatClient(name, server, progress=self.beat)
        return client

    def _advance(self, batch_id: int, step: str, **fields: Any) -> None:
        now = time.time()
        self.journal.update_delivery(
            batch_id, step=step, next_attempt_at=now, step_started_at=now, attempts=0, last_error=None, **fields
        )

    def _wait(self, batch_id: int, seconds: float, **fields: Any) -> None:
        self.journal.update_delivery(batch_id, next_attempt_at=time.time() + seconds, **fields)

    def _retry(self, batch_id: int, delivery: Mapping[str, Any], server: XnatServer | None, error: str) -> None:
        assert server is not None  # noqa: S101 - a missing server holds before any request
        attempts = int(delivery["attempts"]) + 1
        age_hours = (time.time() - float(delivery["started_at"])) / 3600
        if attempts >= server.retry.max_attempts or age_hours >= server.retry.max_age_hours:
            self._hold(batch_id, f"gave up after {attempts} attempts over {age_hours:.1f} h: {error}", delivery["step"])
            return
        wait = backoff_seconds(attempts, server.retry.initial_seconds, server.retry.max_seconds, self._rng)
        self.journal.update_delivery(batch_id, attempts=attempts, last_error=error, next_attempt_at=time.time() + wait)
        RETRIES.labels(step=str(delivery["step"])).inc()
        log.warning(
            "deliver.retry_scheduled",
            batch_id=batch_id,
            step=delivery["step"],
            attempt=attempts,
            wait_seconds=round(wait, 1),
            error=error,
        )

    def _hold(self, batch_id: int, reason: str, step: str) -> None:
        self.journal.update_delivery(batch_id, last_error=reason)
        if self.journal.hold_batch(batch_id, f"deliver: {reason}", time.time(), from_state=StudyState.ROUTED):
            DELIVERIES.labels(outcome="held").inc()
            log.warning("deliver.held", batch_id=batch_id, step=step, reason=reason)

    # -- the steps -------------------------------------------------------------------------------------------

    def _step_package(self, job: _Job) -> None:
        outgoing = self.journal.outgoing(job.batch_id)
        if not outgoing:
            raise HoldError("the batch has no outgoing instances")
        started = time.monotonic()
        package = write_package(
            outgoing,
            self.state_dir,
            self.packages / f"{job.batch_id}.zip",
            self.config.delivery.compression,
            progress=self.beat,
        )
        log.info(
            "deliver.packaged",
            batch_id=job.batch_id,
            entries=package.entries,
            bytes=package.size,
            seconds=stage_seconds("package", started),
        )
        self._advance(
            job.batch_id,
            "preflight",
            zip_path=str(package.path.relative_to(self.state_dir)),
            zip_size=package.size,
            zip_sha256=package.sha256,
        )

    def _step_preflight(self, job: _Job) -> None:
        project, subject, session = job.project, job.subject, job.session
        job.client.check_project(project)
        # With overwrite=append XNAT merges whatever is archived into an existing experiment of that label, even
        # another study; a label already taken by another study must stop here, before anything is sent.
        experiment = job.client.experiment(project, subject, session)
        existing = str((experiment or {}).get("data_fields", {}).get("UID", ""))
        if existing and existing != job.study_uid:
            raise HoldError(
                f"XNAT already has {project}/{subject}/{session} for another study: "
                "change the rule's session label template so that each study gets its own"
            )
        self._advance(job.batch_id, "import")

    def _step_import(self, job: _Job) -> None:
        project, subject, session = job.project, job.subject, job.session
        self.journal.update_delivery(job.batch_id, step="importing", step_started_at=time.time())
        started = time.monotonic()
        uris = job.client.import_zip(self.state_dir / str(job.delivery["zip_path"]), project, subject, session)
        if len(uris) != 1:
            raise HoldError(f"XNAT answered the import with {len(uris)} sessions (expected one): {' '.join(uris)}")
        uri = uris[0]
        expected = f"/data/prearchive/projects/{project}/"
        if not uri.startswith(expected):
            raise HoldError(f"XNAT filed the upload under {uri}, not in the prearchive of project {project}")
        log.info("deliver.imported", batch_id=job.batch_id, uri=uri, seconds=stage_seconds("import", started))
        self._advance(job.batch_id, "wait", prearchive_url=uri.removeprefix("/data"))

    def _step_importing(self, job: _Job) -> None:
        """An import that may have reached XNAT: adopt what XNAT has, else import again."""
        project, subject, session = job.project, job.subject, job.session
        study_uid = job.study_uid
        for row in job.client.prearchive(project):
            if row.study_uid == study_uid and row.name == session:
                log.info("deliver.adopted", batch_id=job.batch_id, uri=f"/data{row.url}", where="prearchive")
                self._advance(job.batch_id, "wait", prearchive_url=row.url)
                return
        experiment = job.client.experiment(project, subject, session)
        if experiment is not None and self._holds_batch(experiment, job):
            log.info("deliver.adopted", batch_id=job.batch_id, where="archive")
            self._advance(job.batch_id, "verify")
            return
        self._step_import(job)

    def _step_wait(self, job: _Job) -> None:
        url = str(job.delivery["prearchive_url"])
        row = job.client.prearchive_session(url)
        waited = time.time() - float(job.delivery["step_started_at"])
        if row is None:  # gone: an auto-archive project may have archived it already
            self._advance(job.batch_id, "verify")
            return
        if row.status == "READY":
            STAGE_SECONDS.labels(stage="build_wait").observe(max(0.0, waited))
            self._advance(job.batch_id, "archive" if job.route["archive"] else "verify")
            return
        if row.status in ("CONFLICT", "ERROR"):
            said = job.client.prearchive_log(url)
            raise HoldError(f"XNAT set the prearchive session {url} to {row.status}: {said or 'no log entry'}")
        if waited > job.server.ready_timeout_seconds:
            raise HoldError(f"the prearchive session {url} is still {row.status} after {waited:.0f} s")
        if (
            row.status == "RECEIVING"
            and waited > job.server.build_wait_seconds
            and not job.delivery["build_requested_at"]
        ):
            job.client.build(url)  # XNAT up to 1.8.9 builds only after minutes of idleness
            self._wait(job.batch_id, job.server.poll_interval_seconds, build_requested_at=time.time())
            return
        self._wait(job.batch_id, job.server.poll_interval_seconds)

    def _step_archive(self, job: _Job) -> None:
        project, subject, session = job.project, job.subject, job.session
        self.journal.update_delivery(job.batch_id, step="archiving", step_started_at=time.time())
        started = time.monotonic()
        uri = job.client.archive(str(job.delivery["prearchive_url"]), project, subject, session)
        log.info("deliver.archived", batch_id=job.batch_id, uri=uri, seconds=stage_seconds("archive", started))
        self._advance(job.batch_id, "verify", archive_uri=uri)

    def _step_archiving(self, job: _Job) -> None:
        """An archive request that may have been carried out: look before asking again."""
        row = job.client.prearchive_session(str(job.delivery["prearchive_url"]))
        if row is None:
            self._advance(job.batch_id, "verify")
        elif row.status == "READY":
            self._step_archive(job)
        elif row.status in ("CONFLICT", "ERROR"):
            said = job.client.prearchive_log(row.url)
            raise HoldError(f"XNAT set {row.url} to {row.status} while archiving it: {said or 'no log entry'}")
        else:
            self._wait(job.batch_id, job.server.poll_interval_seconds)

    def _step_verify(self, job: _Job) -> None:
        project, subject, session = job.project, job.subject, job.session
        if not job.route["archive"] and job.delivery["prearchive_url"]:
            row = job.client.prearchive_session(str(job.delivery["prearchive_url"]))
            if row is not None and row.status == "READY":
                self._done(job, "prearchive")
                return
        experiment = job.client.experiment(project, subject, session)
        if experiment is None:
            raise HoldError(f"XNAT has no experiment {project}/{subject}/{session} after archiving")
        uid = str(experiment.get("data_fields", {}).get("UID", ""))
        if uid and uid != job.study_uid:
            raise HoldError(f"the experiment {project}/{subject}/{session} belongs to another study")
        if not self._holds_batch(experiment, job):
            raise HoldError(f"the experiment {project}/{subject}/{session} lacks instances of this batch")
        self._done(job, "archive")

    def _holds_batch(self, experiment: Mapping[str, Any], job: _Job) -> bool:
        """The experiment is this study and has at least as many files per series as this batch sends."""
        fields = experiment.get("data_fields", {})
        if fields.get("UID") and fields.get("UID") != job.study_uid:
            return False
        counts = scan_counts(experiment)
        sent: dict[str, int] = {}
        for item in self.journal.outgoing(job.batch_id):
            sent[item.series_uid] = sent.get(item.series_uid, 0) + 1
        return all(counts.get(series, 0) >= count for series, count in sent.items())

    def _done(self, job: _Job, where: str) -> None:
        self.journal.finish_delivery(job.batch_id, time.time())
        DELIVERIES.labels(outcome="delivered").inc()
        log.info(
            "deliver.delivered",
            batch_id=job.batch_id,
            where=where,
            project=job.project,
            subject=job.subject,
            session=job.session,
        )
        if not self.config.delivery.keep_after_delivery:
            self._clean(job.batch_id)

    def _clean(self, batch_id: int) -> None:
        """Remove what XNAT now holds: the zip, the outbox folder and the spooled files (the journal stays)."""
        (self.packages / f"{batch_id}.zip").unlink(missing_ok=True)
        shutil.rmtree(self.state_dir / "outbox" / str(batch_id), ignore_errors=True)
        spool = self.state_dir / "spool"
        relatives = self.journal.spool_files(batch_id)
        for relative in relatives:
            (spool / relative).unlink(missing_ok=True)
        for folder in sorted({(spool / relative).parent for relative in relatives}, reverse=True):
            _remove_empty(folder, spool)


def _remove_empty(folder: Path, root: Path) -> None:
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
