"""Delivery: package each routed batch, import it into XNAT's prearchive, wait, archive, and verify by identity.

One row per batch in the journal's `deliveries` table says which step comes next, when, and what XNAT answered
so far; the steps and their allowed transitions are declared in `ingestd.states`. Every step commits before and
after it talks to XNAT, so a restart resumes exactly where the last run stopped:

    package -> preflight -> import -> importing -> wait -> verify -> done
                                        |(crash)              |  ^
                                        +--------> verify <---+  +-- archive -> archiving
                                                     |
                                                     +--> package (only what XNAT lacks) -> import

`verify` is the only place a batch is judged: it asks XNAT what it holds, file by file, and compares that with
the batch's outgoing instances by SOP Instance UID (the archive's DICOM catalogs carry each file's SOP Instance
UID; the prearchive exposes file names, which ingestd makes `<SOP Instance UID>.dcm` and XNAT keeps; see
docs/delivery.md). Counts are never evidence: another batch of the same study can satisfy a count. From that one
look it decides: every instance where the rule says (the archive when the rule archives; the archive or a READY
prearchive session otherwise) -> done; a session of ours still receiving or building -> wait; instances XNAT
holds nowhere -> package and import just those again, into the same session (`overwrite=append`); all held but
some only in the prearchive while the rule archives -> archive that session. An interrupted import or archive
(`importing`, `archiving` found at start, or a failed request) always goes to `verify`: nothing is adopted on
less evidence, and nothing is sent again before looking. The spool is deleted only once the batch is done.
The look itself is `ingestd.pipeline.holdings`; logins, pauses and alias tokens are `ingestd.pipeline.servers`.

Failures: a retryable XNAT error (XNAT down, 5xx, timeouts) runs the same step again with exponential back-off
and jitter, up to the server's attempt and age caps; a refused login pauses every delivery to that server (see
ingestd.pipeline.breaker) without charging any batch; XNAT's own refusal (a conflict, a missing project) holds the batch
with XNAT's message; an error no code expected (a missing outbox file, a bug)
is contained to its batch, retried with back-off and held after `batch_failures.max_attempts`; XNAT answering an
import without keeping every file (a site anonymization script or import filter dropping some) is sent again
`delivery.max_resends` times, then held.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog

from ingestd.config import Config, XnatServer
from ingestd.journal import BatchRow, Delivery, Journal, Route
from ingestd.journal.attachments import held_sets, set_recheck, start_set_delivery
from ingestd.logs import hide_labels, path_digest
from ingestd.metrics import DELIVERIES, RETRIES, STAGE_SECONDS, stage_seconds
from ingestd.pipeline.attachsteps import SET_STEPS, recheck_no_session
from ingestd.pipeline.holdings import BROKEN, LABEL_TAKEN_ADVICE, READY, HoldError, Job, check_same_study, look_at
from ingestd.pipeline.package import write_package
from ingestd.pipeline.runner import BatchWorker, note_failure
from ingestd.pipeline.servers import XnatServers
from ingestd.rules import RuleSet, identifying_labels
from ingestd.states import FAILED_HOLD, BatchKind, HoldCode, Stage, Step, StudyState
from ingestd.xnat import Holdings, PrearchiveRow, XnatClient, XnatError, XnatLoginError

__all__ = ["STEPS", "Deliverer", "HoldError", "backoff_seconds", "wedge_limit"]

log = structlog.get_logger("ingestd.deliver")


_STEPS_PER_CHECK = 12  # at most this many steps of one batch per check, so that other batches get their turn
_WEDGE_MARGIN_SECONDS = 120.0  # beyond the longest XNAT wait: journal writes, a zip entry, a slow disk


def wedge_limit(config: Config) -> float:
    """Seconds the deliverer may go without progress before it counts as wedged: the configured limit, and at
    least the longest one XNAT request may wait for its answer (the client reports progress otherwise) plus a
    margin, so that a slow but legitimate archive request is never taken for a wedge."""
    waits = [XnatClient.longest_wait_seconds(server) for server in config.xnat.servers.values()]
    return max([config.wedged_worker_seconds, *(wait + _WEDGE_MARGIN_SECONDS for wait in waits)])


def backoff_seconds(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """The wait before attempt `attempt + 1`: doubling from `initial`, capped at `maximum`, jittered ±50 %."""
    base = min(maximum, initial * 2 ** max(0, attempt - 1))
    return float(base * rng.uniform(0.5, 1.5))


class Deliverer(BatchWorker):
    """A thread that moves routed batches through the delivery steps, one batch at a time."""

    name = "deliverer"
    stage = Stage.DELIVER

    def __init__(self, journal: Journal, config: Config, interval: float = 1.0) -> None:
        super().__init__(journal, interval, config.batch_failures)
        self.config = config
        self.state_dir = config.state_dir
        self.packages = config.state_dir / "packages"
        self._rng = random.Random()  # jitter, not secrets
        self._pending: Config | None = None
        self._current: tuple[int, str] | None = None  # the batch and step being taken now
        self.wedged_after = wedge_limit(config)
        self.servers = XnatServers(journal, config.xnat.servers, self.beat)
        self.breaker = self.servers.breaker
        self._settling: dict[int, tuple[str, float]] = {}  # batch -> (lastmod seen, since when it has not moved)
        self._routes: dict[int, Route] = {}  # the routes of the running check
        self._admitted: dict[str, bool] = {}  # server -> whether its batches take steps in the running check
        # The rules in force (the daemon's router's, live across reloads): which labels logs name by digests.
        self.rules: Callable[[], RuleSet | None] = lambda: None

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
        self.servers.close()
        return True

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded configuration from the next check on (the worker thread applies it between steps)."""
        self._pending = config

    def _apply_pending(self) -> None:
        config, self._pending = self._pending, None
        if config is None:
            return
        self.config = config
        self.failures = config.batch_failures
        self.wedged_after = wedge_limit(config)
        self.servers.reconfigure(config.xnat.servers)

    def check(self, now: float | None = None) -> int:
        """Advance every due batch through the steps that are due now; return how many steps were taken.

        Each batch is on its own (the runner's loop): whatever one step raises is contained to its batch (counted,
        retried with back-off, held after `batch_failures.max_attempts`), and the other batches go on.
        """
        self._apply_pending()
        self._routes = self.journal.routes(StudyState.ROUTED)  # not every route ever decided: those it may step
        self._admitted = {}
        return super().check(now)

    def due(self, now: float) -> Iterator[BatchRow]:
        """The routed batches, oldest first, of the servers that admit deliveries now (see `_admit`)."""
        routed = sorted(self.journal.batches((StudyState.ROUTED,)), key=lambda b: b.id)
        waiting = held_sets(self.journal, HoldCode.NO_SESSION, now)  # sets that look for their session again
        for batch in [*routed, *waiting]:
            if self.stopping:
                return
            if batch.state == StudyState.HELD:
                route = self.journal.route(batch.id)
                if route is None:
                    continue
                self._routes[batch.id] = route
            name = self._routes[batch.id].server
            if name not in self._admitted:
                self._admitted[name] = self._admit(name)
            if self._admitted[name]:
                yield batch  # else paused after a refused login: the batch keeps its place and its attempts

    def process(self, batch: BatchRow, now: float) -> int:
        """Take the batch's steps one after the other while it is due: the next check is a poll interval away."""
        route = self._routes[batch.id]
        name = route.server
        if batch.state == StudyState.HELD:
            return self._recheck(batch, route)
        delivery = self.journal.delivery(batch.id)
        if delivery is None:
            start = start_set_delivery if batch.kind == BatchKind.FILES else Journal.start_delivery
            start(self.journal, batch.id, time.time())
            delivery = self.journal.delivery(batch.id)
        taken = 0
        for _ in range(_STEPS_PER_CHECK):
            if delivery is None or delivery.next_attempt_at > time.time() or self.stopping:
                break
            if not self.breaker.admits(name, time.time()):
                self._admitted[name] = False  # a login was refused just now: the server's other batches wait too
                break
            self.step(batch.id, route, delivery)
            taken += 1
            if self.journal.batch_state(batch.id) != StudyState.ROUTED:
                break
            delivery = self.journal.delivery(batch.id)
        return taken

    def _admit(self, name: str) -> bool:
        return self.servers.admit(name)

    def _recheck(self, batch: BatchRow, route: Route) -> int:
        """An attachment set held `no-session`: on to `locate` once XNAT has the session (else looked at later)."""
        server = self.config.xnat.servers.get(route.server)
        delivery = self.journal.delivery(batch.id)
        if server is None or delivery is None:
            return 0
        job = Job(batch.id, route, delivery, server, self._client(route.server, server))
        try:
            moved = recheck_no_session(self, job, lambda: self.journal.retry_batch(batch.id, time.time()))
        except XnatLoginError as exc:
            self.breaker.refused(route.server, server, str(exc), time.time())
            return 0
        except XnatError:
            set_recheck(self.journal, batch.id, time.time() + self.config.attachments.recheck_seconds)
            return 0
        return int(moved)

    # What the steps of an attachment set (ingestd.pipeline.attachsteps) call.
    def advance(self, batch_id: int, step: Step, *, progress: bool = False, **fields: Any) -> None:
        self._advance(batch_id, step, progress=progress, **fields)

    def wait(self, batch_id: int, seconds: float, **fields: Any) -> None:
        self._wait(batch_id, seconds, **fields)

    # -- one step ------------------------------------------------------------------------------------------

    def step(self, batch_id: int, route: Route, delivery: Delivery) -> None:
        name = route.server
        server = self.config.xnat.servers.get(name)
        step = delivery.step
        self._current = (batch_id, step)
        self.beat()
        try:
            if server is None:
                raise HoldError(
                    HoldCode.NO_SERVER, f"no XNAT server named '{name}' in the configuration (xnat.servers)"
                )
            job = Job(batch_id, route, delivery, server, self._client(name, server))
            if step in SET_STEPS:
                SET_STEPS[step](self, job)
            else:
                STEPS[step](self, job)
        except HoldError as exc:
            self._hold(batch_id, exc.code, exc.reason, step)
        except XnatLoginError as exc:
            assert server is not None  # noqa: S101 - a missing server holds before any request
            self.breaker.refused(name, server, str(exc), time.time())
        except XnatError as exc:
            if not exc.retryable:
                self._hold(batch_id, HoldCode(exc.code), str(exc), step)
            else:
                self._retry(batch_id, delivery, server, str(exc))
        finally:
            self._current = None

    def _client(self, name: str, server: XnatServer) -> XnatClient:
        return self.servers.client(name, server)

    def _advance(self, batch_id: int, step: Step, *, progress: bool = False, **fields: Any) -> None:
        """Move to `step`, due now. `progress`: XNAT answered a request that moves the delivery on (pre-flight
        passed, an import or an archive answered), which ends a run of failed attempts. Other moves keep the count,
        so that a loop of interrupted uploads (import, reset, verify, resend) still ends at the attempt cap."""
        now = time.time()
        if progress:
            fields.update(attempts=0, last_error=None)
        self.journal.update_delivery(batch_id, step=step, next_attempt_at=now, step_started_at=now, **fields)

    def _wait(self, batch_id: int, seconds: float, **fields: Any) -> None:
        self.journal.update_delivery(batch_id, next_attempt_at=time.time() + seconds, **fields)

    def _retry(self, batch_id: int, delivery: Delivery, server: XnatServer | None, error: str) -> None:
        assert server is not None  # noqa: S101 - a missing server holds before any request
        attempts = delivery.attempts + 1
        age_hours = (time.time() - delivery.started_at) / 3600
        step = self.journal.delivery(batch_id) or delivery  # the step may have moved on (import -> importing)
        if attempts >= server.retry.max_attempts or age_hours >= server.retry.max_age_hours:
            reason = f"gave up after {attempts} attempts over {age_hours:.1f} h: {error}"
            self._hold(batch_id, HoldCode.XNAT_UNREACHABLE, reason, step.step)
            return
        wait = backoff_seconds(attempts, server.retry.initial_seconds, server.retry.max_seconds, self._rng)
        self.journal.update_delivery(batch_id, attempts=attempts, last_error=error, next_attempt_at=time.time() + wait)
        RETRIES.labels(step=str(step.step)).inc()
        log.warning(
            "deliver.retry_scheduled",
            batch_id=batch_id,
            step=step.step,
            attempt=attempts,
            wait_seconds=round(wait, 1),
            error=self._hide_labels(self.journal.route(batch_id), error),
        )

    def _hide_labels(self, route: Route | None, text: str) -> str:
        """`text` for a log line: the labels a rule without `anonymize` built from raw identifying values, as
        digests (a route the journal no longer has: all its labels)."""
        if route is None:
            return text
        hidden = self._identifying(route)
        return hide_labels(text, [route.label(name) for name in hidden])

    def _identifying(self, route: Route) -> frozenset[str]:
        return identifying_labels(
            self.rules(), rule=route.rule, rules_version=route.rules_version, profile=route.profile
        )

    def failed(self, batch: BatchRow, exc: Exception) -> None:
        """An error no step expected: count it against this batch's delivery, try again later, hold after the bound
        (the `package` step counts as a stage of its own)."""
        current = self.journal.delivery(batch.id)
        if current is None:
            raise exc  # the delivery could not even be started: the journal fails, not this batch
        stage = Stage.PACKAGE if current.step == Step.PACKAGE else Stage.DELIVER
        failure = note_failure(
            stage, exc, batch_id=batch.id, failures=current.faults + 1, policy=self.config.batch_failures
        )
        self.journal.update_delivery(
            batch.id, faults=failure.failures, last_error=failure.error, next_attempt_at=time.time() + failure.wait
        )
        if failure.held:
            reason = f"{current.step} failed {failure.failures} times, last: {failure.error}"
            self._hold(batch.id, FAILED_HOLD[stage], reason, current.step)

    def hold(self, batch: BatchRow, code: HoldCode, reason: str) -> None:
        delivery = self.journal.delivery(batch.id)
        self._hold(batch.id, code, reason, "" if delivery is None else delivery.step)

    def _hold(self, batch_id: int, code: HoldCode, reason: str, step: str) -> None:
        self._settling.pop(batch_id, None)
        self.journal.update_delivery(batch_id, last_error=reason, retried_at=None)  # a retry is spent by a new hold
        if self.journal.hold_batch(batch_id, code, f"deliver: {reason}", time.time(), from_state=StudyState.ROUTED):
            if code == HoldCode.NO_SESSION:  # an attachment set looks for its session again, by itself
                set_recheck(self.journal, batch_id, time.time() + self.config.attachments.recheck_seconds)
            DELIVERIES.labels(outcome=StudyState.HELD).inc()
            shown = self._hide_labels(self.journal.route(batch_id), reason)
            log.warning("deliver.held", batch_id=batch_id, step=step, code=code, reason=shown)

    # -- the steps -------------------------------------------------------------------------------------------

    def _step_package(self, job: Job) -> None:
        """Zip what XNAT does not hold yet: every outgoing instance the first time, what `verify` found missing
        after that."""
        outgoing = self.journal.outgoing(job.batch_id)
        if not outgoing:
            raise HoldError(HoldCode.NOTHING_TO_SEND, "the batch has no outgoing instances")
        sending = [item for item in outgoing if item.verified is None] or outgoing
        started = time.monotonic()
        package = write_package(
            sending,
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
        first = job.delivery.zip_path is None  # a resend passed the pre-flight before
        self._advance(
            job.batch_id,
            Step.PREFLIGHT if first else Step.IMPORT,
            zip_path=str(package.path.relative_to(self.state_dir)),
            zip_size=package.size,
            zip_sha256=package.sha256,
        )

    def _step_preflight(self, job: Job) -> None:
        project, subject, session = job.project, job.subject, job.session
        job.client.check_project(project)
        # With overwrite=append XNAT merges whatever is archived into an existing experiment of that label, even
        # another study; a label already taken by another study must stop here, before anything is sent. A label is
        # unique in the project, not in the subject: XNAT refuses at archive a session whose label another
        # subject's experiment holds, so the look-up is project-wide.
        experiment = job.client.project_experiment(project, session)
        if experiment is not None:
            check_same_study(experiment, job)
            if job.client.experiment(project, subject, session) is None:
                raise HoldError(
                    HoldCode.LABEL_TAKEN,
                    f"XNAT already has a session labelled {session} in project {project} under another subject than"
                    f" {subject} (a label is unique in a project); nothing was sent. {LABEL_TAKEN_ADVICE}",
                )
        self._advance(job.batch_id, Step.IMPORT, progress=True)

    def _step_import(self, job: Job) -> None:
        """Upload the zip. `importing` is committed first: from then on, whatever happens, `verify` looks."""
        project, subject, session = job.project, job.subject, job.session
        self._advance(job.batch_id, Step.IMPORTING, answered=0, build_requested_at=None)
        started = time.monotonic()
        uris = job.client.import_zip(self.state_dir / str(job.delivery.zip_path), project, subject, session)
        if len(uris) > 1:
            raise HoldError(
                HoldCode.XNAT_SPLIT, f"XNAT filed the upload as {len(uris)} sessions (expected one): {' '.join(uris)}"
            )
        if not uris:  # 200 with an empty body: XNAT kept none of the files (verify counts the shortfall)
            log.info("deliver.imported", batch_id=job.batch_id, uri=None, seconds=stage_seconds("import", started))
            self._advance(job.batch_id, Step.VERIFY, progress=True, answered=1)
            return
        uri = uris[0]
        if not uri.startswith(f"/data/prearchive/projects/{project}/"):
            raise HoldError(
                HoldCode.XNAT_MISFILED, f"XNAT filed the upload under {uri}, not in the prearchive of project {project}"
            )
        shown = self._hide_labels(job.route, uri)
        log.info("deliver.imported", batch_id=job.batch_id, uri=shown, seconds=stage_seconds("import", started))
        self._advance(job.batch_id, Step.WAIT, progress=True, prearchive_url=uri.removeprefix("/data"), answered=1)

    def _step_importing(self, job: Job) -> None:
        """An upload that may or may not have reached XNAT, wholly or in part: look before sending anything."""
        self._advance(job.batch_id, Step.VERIFY)

    def _step_wait(self, job: Job) -> None:
        """Poll our prearchive session until XNAT has built it (or archived or dropped it), then verify."""
        url = str(job.delivery.prearchive_url)
        row = job.client.prearchive_session(url)
        waited = time.time() - job.delivery.step_started_at
        if row is not None and row.status == READY:
            STAGE_SECONDS.labels(stage="build_wait").observe(max(0.0, waited))
            if job.archives and job.delivery.answered:
                # XNAT answered the import, so it read every entry: archive now, and verify in the archive (what is
                # missing there, whatever the reason, is sent again). Saves a look at the prearchive per study.
                self._advance(job.batch_id, Step.ARCHIVE, prearchive_url=row.url)
                return
        if row is None or row.status == READY or row.status in BROKEN:
            self._advance(job.batch_id, Step.VERIFY)
            return
        if waited > job.server.ready_timeout_seconds:
            raise HoldError(
                HoldCode.NOT_READY, f"the prearchive session {url} is still {row.status} after {waited:.0f} s"
            )
        if (
            row.status == "RECEIVING"
            and waited > job.server.build_wait_seconds
            and not job.delivery.build_requested_at
            and self._settled(job.batch_id, row, job.server.settle_seconds)
            # XNAT up to 1.8.9 builds only after minutes of idleness. Never while an import still writes to the
            # session (an upload whose answer a proxy cut off goes on inside XNAT): built then, it would be judged
            # on part of its files. False (409): the session is locked (another build, an archive): wait.
            and job.client.build(url)
        ):
            self._wait(job.batch_id, job.server.poll_interval_seconds, build_requested_at=time.time())
            return
        self._wait(job.batch_id, job.server.poll_interval_seconds)

    def _settled(self, batch_id: int, row: PrearchiveRow, settle_seconds: float) -> bool:
        """Whether the session's `lastmod` has stayed the same for `settle_seconds` (looked at on each poll;
        counted from the first look after a restart, which errs on the side of waiting)."""
        now = time.monotonic()
        seen = self._settling.get(batch_id)
        if seen is None or seen[0] != row.lastmod:
            self._settling[batch_id] = (row.lastmod, now)
            return settle_seconds <= 0
        return now - seen[1] >= settle_seconds

    def _step_verify(self, job: Job) -> None:
        """Look at what XNAT holds, instance by instance, and decide the next step from that alone."""
        outgoing = self.journal.outgoing(job.batch_id)
        look = look_at(job, outgoing)
        places = {item.sop_uid: look.place(item.sop_uid) for item in outgoing}
        self.journal.set_verified(job.batch_id, places, time.time())
        counts = {place: sum(1 for found in places.values() if found == place) for place in ("archive", "prearchive")}
        missing = [sop_uid for sop_uid, place in places.items() if place is None]
        log.info(
            "deliver.verified",
            batch_id=job.batch_id,
            instances=len(places),
            in_archive=counts["archive"],
            in_prearchive=counts["prearchive"],
            missing=len(missing),
        )
        if counts["archive"] == len(places) or (not job.archives and sum(counts.values()) == len(places)):
            self._done(job, "archive" if counts["archive"] == len(places) else "prearchive")
            return
        unsettled = [row for row in look.rows if row.status != READY and row.status not in BROKEN]
        if unsettled:  # a session of ours is still receiving, building or archiving: what it holds shows later
            self._advance(job.batch_id, Step.WAIT, prearchive_url=unsettled[0].url, build_requested_at=None)
            return
        if missing:  # into our session even when XNAT set it to CONFLICT or ERROR: new files reopen it
            self._resend(job, len(missing), len(places))
            return
        broken = [row for row in look.rows if row.status in BROKEN]
        if broken and any(place == "broken" for place in places.values()):
            self._broken(job, broken[0])
            return
        # Everything is in XNAT, some of it only in a READY prearchive session, and the rule archives: archive it.
        url = next(
            row.url
            for row in look.rows
            if row.status == READY and any(look.built.get(row.url, Holdings()).holds(uid) for uid in places)
        )
        self._advance(job.batch_id, Step.ARCHIVE, prearchive_url=url)

    def _broken(self, job: Job, row: PrearchiveRow) -> None:
        """A session of ours that XNAT set to CONFLICT or ERROR: held, with XNAT's own words; after `ingestd retry`
        archived again (CONFLICT, rule archives) or rebuilt (anything else), once."""
        if not job.delivery.retried_at:
            said = job.client.prearchive_log(row.url)
            raise HoldError(
                HoldCode.XNAT_CONFLICT,
                f"XNAT set the prearchive session {row.url} to {row.status}: {said or 'no log entry'}",
            )
        if row.status == "CONFLICT" and job.archives:
            self._advance(job.batch_id, Step.ARCHIVE, prearchive_url=row.url, retried_at=None)
            return
        if not job.client.build(row.url):  # locked: XNAT is doing something with it; look again later
            self._wait(job.batch_id, job.server.poll_interval_seconds)
            return
        self._advance(job.batch_id, Step.WAIT, prearchive_url=row.url, retried_at=None, build_requested_at=time.time())

    def _resend(self, job: Job, missing: int, instances: int) -> None:
        """Some instances are nowhere in XNAT: package and import just those again, into the same session."""
        shortfalls = job.delivery.shortfalls + int(job.delivery.answered)
        if shortfalls > self.config.delivery.max_resends:
            raise HoldError(
                HoldCode.INCOMPLETE,
                f"XNAT answered {shortfalls} imports but does not hold {missing} of the {instances} instances of "
                "this batch: a site anonymization script or a series import filter may drop them (see XNAT's "
                "prearchive log); the spool keeps them",
            )
        log.info("deliver.resend", batch_id=job.batch_id, missing=missing, instances=instances, shortfalls=shortfalls)
        self._advance(job.batch_id, Step.PACKAGE, shortfalls=shortfalls, answered=0)

    def _step_archive(self, job: Job) -> None:
        """Archive our READY prearchive session. `archiving` is committed first: from then on, `verify` looks."""
        project, subject, session = job.project, job.subject, job.session
        self._advance(job.batch_id, Step.ARCHIVING)
        started = time.monotonic()
        uri = job.client.archive(str(job.delivery.prearchive_url), project, subject, session)
        shown = self._hide_labels(job.route, uri)
        log.info("deliver.archived", batch_id=job.batch_id, uri=shown, seconds=stage_seconds("archive", started))
        self._advance(job.batch_id, Step.VERIFY, progress=True, archive_uri=uri)

    def _step_archiving(self, job: Job) -> None:
        """An archive request that may have been carried out: look before asking again."""
        self._advance(job.batch_id, Step.VERIFY)

    def _done(self, job: Job, where: str) -> None:
        self._settling.pop(job.batch_id, None)
        if not self.journal.finish_delivery(job.batch_id, time.time()):
            return
        DELIVERIES.labels(outcome=StudyState.DELIVERED).inc()
        hidden = self._identifying(job.route)
        log.info(
            "deliver.delivered",
            batch_id=job.batch_id,
            where=where,
            project=path_digest(job.project) if "project" in hidden else job.project,
            subject=path_digest(job.subject) if "subject" in hidden else job.subject,
            session=path_digest(job.session) if "session" in hidden else job.session,
        )
        if not self.config.delivery.keep_after_delivery:
            self._clean(job.batch_id)

    def _clean(self, batch_id: int) -> None:
        """Remove what XNAT now verifiably holds: the zip, the outbox folder and the spooled files (the journal
        stays). Only a delivered batch is cleaned, and a batch is delivered only once every outgoing instance was
        verified in XNAT by its SOP Instance UID."""
        (self.packages / f"{batch_id}.zip").unlink(missing_ok=True)
        shutil.rmtree(self.state_dir / "outbox" / str(batch_id), ignore_errors=True)
        spool = self.state_dir / "spool"
        relatives = self.journal.spool_files(batch_id)
        for relative in relatives:
            (spool / relative).unlink(missing_ok=True)
        for folder in sorted({(spool / relative).parent for relative in relatives}, reverse=True):
            _remove_empty(folder, spool)


# What each step does: the one dispatch of the delivery (`done` takes none). tests/test_states.py checks that every
# step but `done` is here.
STEPS: Mapping[Step, Callable[[Deliverer, Job], None]] = {
    Step.PACKAGE: Deliverer._step_package,
    Step.PREFLIGHT: Deliverer._step_preflight,
    Step.IMPORT: Deliverer._step_import,
    Step.IMPORTING: Deliverer._step_importing,
    Step.WAIT: Deliverer._step_wait,
    Step.VERIFY: Deliverer._step_verify,
    Step.ARCHIVE: Deliverer._step_archive,
    Step.ARCHIVING: Deliverer._step_archiving,
}


def _remove_empty(folder: Path, root: Path) -> None:
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
