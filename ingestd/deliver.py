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

Failures: a retryable XNAT error (XNAT down, 5xx, timeouts) runs the same step again with exponential back-off
and jitter, up to the server's attempt and age caps; a refused login pauses every delivery to that server (see
ingestd.breaker) without charging any batch; XNAT's own refusal (a conflict, a missing project) holds the batch
with XNAT's message; an error no code expected (a missing outbox file, a bug)
is contained to its batch, retried with back-off and held after `batch_failures.max_attempts`; XNAT answering an
import without keeping every file (a site anonymization script or import filter dropping some) is sent again
`delivery.max_resends` times, then held.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ingestd.breaker import Breaker
from ingestd.config import Config, XnatServer
from ingestd.journal import Journal, Outgoing
from ingestd.logs import hide_labels, path_digest
from ingestd.metrics import DELIVERIES, RETRIES, STAGE_SECONDS, stage_seconds
from ingestd.package import write_package
from ingestd.rules import RuleSet, identifying_labels
from ingestd.states import Step, StudyState
from ingestd.worker import PeriodicWorker, failure_backoff, failure_text, record_stage_failure
from ingestd.xnat import Holdings, PrearchiveRow, XnatClient, XnatError, XnatLoginError, save_credentials_file

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
    """The batch cannot go on without a person: held with this code and reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def backoff_seconds(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """The wait before attempt `attempt + 1`: doubling from `initial`, capped at `maximum`, jittered ±50 %."""
    base = min(maximum, initial * 2 ** max(0, attempt - 1))
    return float(base * rng.uniform(0.5, 1.5))


_READY = "READY"
_BROKEN = frozenset({"CONFLICT", "ERROR"})


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

    @property
    def archives(self) -> bool:
        return bool(self.route["archive"])


@dataclass(frozen=True, slots=True)
class _Look:
    """One look at XNAT for a batch: its prearchive sessions (same project, Study Instance UID and label) with
    the files of the built ones (READY, CONFLICT, ERROR), and what its archived experiment holds."""

    rows: tuple[PrearchiveRow, ...]
    built: Mapping[str, Holdings]  # row url -> its files
    archived: Holdings

    def place(self, sop_uid: str) -> str | None:
        """`archive`, `prearchive` (a READY session of ours), `broken` (one XNAT set to CONFLICT or ERROR), None."""
        if self.archived.holds(sop_uid):
            return "archive"
        found = {row.status for row in self.rows if self.built.get(row.url, Holdings()).holds(sop_uid)}
        if _READY in found:
            return "prearchive"
        return "broken" if found else None


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
        self.breaker = Breaker(journal)
        self._settling: dict[int, tuple[str, float]] = {}  # batch -> (lastmod seen, since when it has not moved)
        self._token_due: dict[str, float] = {}  # server -> when to look at its alias token again
        # The rules in force (the daemon's router's, live across reloads): which labels logs name by digests.
        self.rules: Callable[[], RuleSet | None] = lambda: None
        self._steps: Mapping[Step, Callable[[_Job], None]] = {
            Step.PACKAGE: self._step_package,
            Step.PREFLIGHT: self._step_preflight,
            Step.IMPORT: self._step_import,
            Step.IMPORTING: self._step_importing,
            Step.WAIT: self._step_wait,
            Step.VERIFY: self._step_verify,
            Step.ARCHIVE: self._step_archive,
            Step.ARCHIVING: self._step_archiving,
        }

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
        self.breaker.wake()  # a reload is what an admin does after fixing credentials: try paused servers now
        self._token_due.clear()

    def check(self) -> int:
        """Advance every due batch through the steps that are due now; return how many steps were taken.

        Each batch is on its own: whatever one step raises is contained to its batch (counted, retried with
        back-off, held after `batch_failures.max_attempts`), and the other batches go on.
        """
        self._apply_pending()
        advanced = 0
        routes = self.journal.routes(StudyState.ROUTED)  # not every route ever decided: those it may step
        admitted: dict[str, bool] = {}
        for batch in sorted(self.journal.batches((StudyState.ROUTED,)), key=lambda b: b.id):
            if self.stopping:
                break
            name = str(routes[batch.id]["server"])
            if name not in admitted:
                admitted[name] = self._admit(name)
            if not admitted[name]:
                continue  # paused after a refused login: the batch keeps its place and its attempts
            delivery = self.journal.delivery(batch.id)
            if delivery is None:
                self.journal.start_delivery(batch.id, time.time())
                delivery = self.journal.delivery(batch.id)
            # One step after the other while the batch is due: the next check is a poll interval away.
            for _ in range(_STEPS_PER_CHECK):
                if delivery is None or delivery["next_attempt_at"] > time.time() or self.stopping:
                    break
                if not self.breaker.admits(name, time.time()):
                    admitted[name] = False  # a login was refused just now: the server's other batches wait too
                    break
                try:
                    self.step(batch.id, routes[batch.id], delivery)
                except Exception as exc:  # noqa: BLE001 - contained to this batch; counted, retried, then held
                    self._fault(batch.id, delivery, exc)
                advanced += 1
                if self.journal.batch_state(batch.id) != StudyState.ROUTED:
                    break
                delivery = self.journal.delivery(batch.id)
        return advanced

    # -- servers -------------------------------------------------------------------------------------------

    def _admit(self, name: str) -> bool:
        """Whether batches of server `name` may take steps in this check: it is not paused, or the one login tried
        now (when its pause is due to end) went through. Also looks after its alias token, if it logs in with one."""
        server = self.config.xnat.servers.get(name)
        if server is None:
            return True  # the step holds the batch: no such server
        now = time.time()
        if self.breaker.probe_due(name, now):
            client = self._client(name, server)
            try:
                client.close()
                client.login()
            except XnatLoginError as exc:
                self.breaker.refused(name, server, str(exc), now)
                return False
            except XnatError as exc:  # XNAT down or slow: try the login again later, no refusal counted
                self.breaker.postpone(name, server.poll_interval_seconds * 6, now)
                log.warning("xnat.login_probe_failed", server=name, error=str(exc))
                return False
            self.breaker.accepted(name, now)
        if not self.breaker.admits(name, now):
            return False
        if now >= self._token_due.get(name, 0.0):
            self._tend_token(name, server)
        return self.breaker.admits(name, now)

    def _tend_token(self, name: str, server: XnatServer) -> None:
        """Renew the alias token the server's credentials file holds before XNAT lets it expire (2 days after it was
        issued by default: aliasTokenTimeout); warn when the token comes from .netrc or the environment."""
        now = time.time()
        self._token_due[name] = now + 3600.0
        client = self._client(name, server)
        try:
            info = client.token_info()
            if info is None or info.expires_at is None:
                return
            left = info.expires_at - now
            if left > server.token_renew_seconds:
                self._token_due[name] = min(now + 3600.0, info.expires_at - server.token_renew_seconds)
                return
            if server.credentials.file is None:
                log.warning(
                    "xnat.token_expiring",
                    server=name,
                    expires_in_seconds=round(left),
                    detail="issue a new alias token in XNAT and update the credentials, or use a credentials file,"
                    " which ingestd renews by itself",
                )
                return
            alias, secret, expires_at = client.issue_token()
            save_credentials_file(server.credentials.file, alias, secret)
            client.close()  # the next request logs in with the new token
            log.info(
                "xnat.token_renewed",
                server=name,
                expires_in_seconds=None if expires_at is None else round(expires_at - now),
            )
        except XnatLoginError as exc:
            self.breaker.refused(name, server, str(exc), now)
        except (XnatError, OSError) as exc:
            self._token_due[name] = now + 600.0
            log.warning("xnat.token_check_failed", server=name, error=str(exc))

    # -- one step ------------------------------------------------------------------------------------------

    def step(self, batch_id: int, route: Mapping[str, Any], delivery: Mapping[str, Any]) -> None:
        name = str(route["server"])
        server = self.config.xnat.servers.get(name)
        step = Step(delivery["step"])
        self._current = (batch_id, step)
        self.beat()
        try:
            if server is None:
                raise HoldError("no-server", f"no XNAT server named '{name}' in the configuration (xnat.servers)")
            self._steps[step](_Job(batch_id, route, delivery, server, self._client(name, server)))
        except HoldError as exc:
            self._hold(batch_id, exc.code, exc.reason, step)
        except XnatLoginError as exc:
            assert server is not None  # noqa: S101 - a missing server holds before any request
            self.breaker.refused(name, server, str(exc), time.time())
        except XnatError as exc:
            if not exc.retryable:
                self._hold(batch_id, exc.code, str(exc), step)
            else:
                self._retry(batch_id, delivery, server, str(exc))
        finally:
            self._current = None

    def _client(self, name: str, server: XnatServer) -> XnatClient:
        client = self._clients.get(name)
        if client is None:
            client = self._clients[name] = XnatClient(name, server, progress=self.beat)
        return client

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

    def _retry(self, batch_id: int, delivery: Mapping[str, Any], server: XnatServer | None, error: str) -> None:
        assert server is not None  # noqa: S101 - a missing server holds before any request
        attempts = int(delivery["attempts"]) + 1
        age_hours = (time.time() - float(delivery["started_at"])) / 3600
        step = self.journal.delivery(batch_id) or delivery  # the step may have moved on (import -> importing)
        if attempts >= server.retry.max_attempts or age_hours >= server.retry.max_age_hours:
            reason = f"gave up after {attempts} attempts over {age_hours:.1f} h: {error}"
            self._hold(batch_id, "xnat-unreachable", reason, step["step"])
            return
        wait = backoff_seconds(attempts, server.retry.initial_seconds, server.retry.max_seconds, self._rng)
        self.journal.update_delivery(batch_id, attempts=attempts, last_error=error, next_attempt_at=time.time() + wait)
        RETRIES.labels(step=str(step["step"])).inc()
        log.warning(
            "deliver.retry_scheduled",
            batch_id=batch_id,
            step=step["step"],
            attempt=attempts,
            wait_seconds=round(wait, 1),
            error=self._hide_labels(self.journal.routes().get(batch_id), error),
        )

    def _hide_labels(self, route: Mapping[str, Any] | None, text: str) -> str:
        """`text` for a log line: the labels a rule without `anonymize` built from raw identifying values, as
        digests (a route the journal no longer has: all its labels)."""
        if route is None:
            return text
        hidden = identifying_labels(self.rules(), route)
        return hide_labels(text, [str(route[name]) for name in hidden])

    def _fault(self, batch_id: int, delivery: Mapping[str, Any], exc: Exception) -> None:
        """An error no step expected: count it against this batch, try again later, hold after the bound."""
        policy = self.config.batch_failures
        current = self.journal.delivery(batch_id) or delivery
        faults = int(current["faults"]) + 1
        held = faults >= policy.max_attempts
        wait = 0.0 if held else failure_backoff(faults, policy)
        stage = "package" if current["step"] == Step.PACKAGE else "deliver"
        record_stage_failure(stage, exc, batch_id=batch_id, failures=faults, retry_seconds=wait)
        error = failure_text(exc)
        self.journal.update_delivery(batch_id, faults=faults, last_error=error, next_attempt_at=time.time() + wait)
        if held:
            reason = f"{current['step']} failed {faults} times, last: {error}"
            self._hold(batch_id, f"{stage}-failed", reason, current["step"])

    def _hold(self, batch_id: int, code: str, reason: str, step: str) -> None:
        self._settling.pop(batch_id, None)
        self.journal.update_delivery(batch_id, last_error=reason, retried_at=None)  # a retry is spent by a new hold
        if self.journal.hold_batch(batch_id, code, f"deliver: {reason}", time.time(), from_state=StudyState.ROUTED):
            DELIVERIES.labels(outcome="held").inc()
            shown = self._hide_labels(self.journal.routes().get(batch_id), reason)
            log.warning("deliver.held", batch_id=batch_id, step=step, code=code, reason=shown)

    # -- the steps -------------------------------------------------------------------------------------------

    def _step_package(self, job: _Job) -> None:
        """Zip what XNAT does not hold yet: every outgoing instance the first time, what `verify` found missing
        after that."""
        outgoing = self.journal.outgoing(job.batch_id)
        if not outgoing:
            raise HoldError("nothing-to-send", "the batch has no outgoing instances")
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
        first = job.delivery["zip_path"] is None  # a resend passed the pre-flight before
        self._advance(
            job.batch_id,
            Step.PREFLIGHT if first else Step.IMPORT,
            zip_path=str(package.path.relative_to(self.state_dir)),
            zip_size=package.size,
            zip_sha256=package.sha256,
        )

    def _step_preflight(self, job: _Job) -> None:
        project, subject, session = job.project, job.subject, job.session
        job.client.check_project(project)
        # With overwrite=append XNAT merges whatever is archived into an existing experiment of that label, even
        # another study; a label already taken by another study must stop here, before anything is sent. A label is
        # unique in the project, not in the subject: XNAT refuses at archive a session whose label another
        # subject's experiment holds, so the look-up is project-wide.
        experiment = job.client.project_experiment(project, session)
        if experiment is not None:
            self._check_same_study(experiment, job)
            if job.client.experiment(project, subject, session) is None:
                raise HoldError(
                    "label-taken",
                    f"XNAT already has a session labelled {session} in project {project} under another subject than"
                    f" {subject}: change the rule's session label template so that each study gets its own",
                )
        self._advance(job.batch_id, Step.IMPORT, progress=True)

    def _check_same_study(self, experiment: Mapping[str, Any], job: _Job) -> None:
        existing = str(experiment.get("data_fields", {}).get("UID", ""))
        if existing and existing != job.study_uid:
            raise HoldError(
                "label-taken",
                f"XNAT already has {job.project}/{job.subject}/{job.session} for another study: "
                "change the rule's session label template so that each study gets its own",
            )

    def _step_import(self, job: _Job) -> None:
        """Upload the zip. `importing` is committed first: from then on, whatever happens, `verify` looks."""
        project, subject, session = job.project, job.subject, job.session
        self._advance(job.batch_id, Step.IMPORTING, answered=0, build_requested_at=None)
        started = time.monotonic()
        uris = job.client.import_zip(self.state_dir / str(job.delivery["zip_path"]), project, subject, session)
        if len(uris) > 1:
            raise HoldError(
                "xnat-split", f"XNAT filed the upload as {len(uris)} sessions (expected one): {' '.join(uris)}"
            )
        if not uris:  # 200 with an empty body: XNAT kept none of the files (verify counts the shortfall)
            log.info("deliver.imported", batch_id=job.batch_id, uri=None, seconds=stage_seconds("import", started))
            self._advance(job.batch_id, Step.VERIFY, progress=True, answered=1)
            return
        uri = uris[0]
        if not uri.startswith(f"/data/prearchive/projects/{project}/"):
            raise HoldError(
                "xnat-misfiled", f"XNAT filed the upload under {uri}, not in the prearchive of project {project}"
            )
        shown = self._hide_labels(job.route, uri)
        log.info("deliver.imported", batch_id=job.batch_id, uri=shown, seconds=stage_seconds("import", started))
        self._advance(job.batch_id, Step.WAIT, progress=True, prearchive_url=uri.removeprefix("/data"), answered=1)

    def _step_importing(self, job: _Job) -> None:
        """An upload that may or may not have reached XNAT, wholly or in part: look before sending anything."""
        self._advance(job.batch_id, Step.VERIFY)

    def _step_wait(self, job: _Job) -> None:
        """Poll our prearchive session until XNAT has built it (or archived or dropped it), then verify."""
        url = str(job.delivery["prearchive_url"])
        row = job.client.prearchive_session(url)
        waited = time.time() - float(job.delivery["step_started_at"])
        if row is not None and row.status == _READY:
            STAGE_SECONDS.labels(stage="build_wait").observe(max(0.0, waited))
            if job.archives and job.delivery["answered"]:
                # XNAT answered the import, so it read every entry: archive now, and verify in the archive (what is
                # missing there, whatever the reason, is sent again). Saves a look at the prearchive per study.
                self._advance(job.batch_id, Step.ARCHIVE, prearchive_url=row.url)
                return
        if row is None or row.status == _READY or row.status in _BROKEN:
            self._advance(job.batch_id, Step.VERIFY)
            return
        if waited > job.server.ready_timeout_seconds:
            raise HoldError("not-ready", f"the prearchive session {url} is still {row.status} after {waited:.0f} s")
        if (
            row.status == "RECEIVING"
            and waited > job.server.build_wait_seconds
            and not job.delivery["build_requested_at"]
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

    def _step_verify(self, job: _Job) -> None:
        """Look at what XNAT holds, instance by instance, and decide the next step from that alone."""
        outgoing = self.journal.outgoing(job.batch_id)
        look = self._look(job, outgoing)
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
        unsettled = [row for row in look.rows if row.status != _READY and row.status not in _BROKEN]
        if unsettled:  # a session of ours is still receiving, building or archiving: what it holds shows later
            self._advance(job.batch_id, Step.WAIT, prearchive_url=unsettled[0].url, build_requested_at=None)
            return
        if missing:  # into our session even when XNAT set it to CONFLICT or ERROR: new files reopen it
            self._resend(job, len(missing), len(places))
            return
        broken = [row for row in look.rows if row.status in _BROKEN]
        if broken and any(place == "broken" for place in places.values()):
            self._broken(job, broken[0])
            return
        # Everything is in XNAT, some of it only in a READY prearchive session, and the rule archives: archive it.
        url = next(
            row.url
            for row in look.rows
            if row.status == _READY and any(look.built.get(row.url, Holdings()).holds(uid) for uid in places)
        )
        self._advance(job.batch_id, Step.ARCHIVE, prearchive_url=url)

    def _look(self, job: _Job, outgoing: list[Outgoing]) -> _Look:
        rows = tuple(
            row
            for row in job.client.prearchive(job.project)
            # A site admin's listing of a project also shows Unassigned sessions (docs/xnat.md): only the project's.
            if row.project == job.project and row.study_uid == job.study_uid and row.name == job.session
        )
        experiment = job.client.experiment(job.project, job.subject, job.session)
        archived = Holdings()
        if experiment is not None:
            self._check_same_study(experiment, job)
            archived = job.client.archive_holdings(experiment)
        built: dict[str, Holdings] = {}
        if not all(archived.holds(item.sop_uid) for item in outgoing):  # the prearchive only matters then
            for row in rows:
                if row.status == _READY or row.status in _BROKEN:
                    holdings = job.client.prearchive_holdings(row.url)  # None: never built (an ERROR row, say)
                    if holdings is not None:
                        built[row.url] = holdings
        return _Look(rows, built, archived)

    def _broken(self, job: _Job, row: PrearchiveRow) -> None:
        """A session of ours that XNAT set to CONFLICT or ERROR: held, with XNAT's own words; after `ingestd retry`
        archived again (CONFLICT, rule archives) or rebuilt (anything else), once."""
        if not job.delivery["retried_at"]:
            said = job.client.prearchive_log(row.url)
            raise HoldError(
                "xnat-conflict", f"XNAT set the prearchive session {row.url} to {row.status}: {said or 'no log entry'}"
            )
        if row.status == "CONFLICT" and job.archives:
            self._advance(job.batch_id, Step.ARCHIVE, prearchive_url=row.url, retried_at=None)
            return
        if not job.client.build(row.url):  # locked: XNAT is doing something with it; look again later
            self._wait(job.batch_id, job.server.poll_interval_seconds)
            return
        self._advance(job.batch_id, Step.WAIT, prearchive_url=row.url, retried_at=None, build_requested_at=time.time())

    def _resend(self, job: _Job, missing: int, instances: int) -> None:
        """Some instances are nowhere in XNAT: package and import just those again, into the same session."""
        shortfalls = int(job.delivery["shortfalls"]) + int(bool(job.delivery["answered"]))
        if shortfalls > self.config.delivery.max_resends:
            raise HoldError(
                "incomplete",
                f"XNAT answered {shortfalls} imports but does not hold {missing} of the {instances} instances of "
                "this batch: a site anonymization script or a series import filter may drop them (see XNAT's "
                "prearchive log); the spool keeps them",
            )
        log.info("deliver.resend", batch_id=job.batch_id, missing=missing, instances=instances, shortfalls=shortfalls)
        self._advance(job.batch_id, Step.PACKAGE, shortfalls=shortfalls, answered=0)

    def _step_archive(self, job: _Job) -> None:
        """Archive our READY prearchive session. `archiving` is committed first: from then on, `verify` looks."""
        project, subject, session = job.project, job.subject, job.session
        self._advance(job.batch_id, Step.ARCHIVING)
        started = time.monotonic()
        uri = job.client.archive(str(job.delivery["prearchive_url"]), project, subject, session)
        shown = self._hide_labels(job.route, uri)
        log.info("deliver.archived", batch_id=job.batch_id, uri=shown, seconds=stage_seconds("archive", started))
        self._advance(job.batch_id, Step.VERIFY, progress=True, archive_uri=uri)

    def _step_archiving(self, job: _Job) -> None:
        """An archive request that may have been carried out: look before asking again."""
        self._advance(job.batch_id, Step.VERIFY)

    def _done(self, job: _Job, where: str) -> None:
        self._settling.pop(job.batch_id, None)
        if not self.journal.finish_delivery(job.batch_id, time.time()):
            return
        DELIVERIES.labels(outcome="delivered").inc()
        hidden = identifying_labels(self.rules(), job.route)
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


def _remove_empty(folder: Path, root: Path) -> None:
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
