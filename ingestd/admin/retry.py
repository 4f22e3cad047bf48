"""`ingestd retry`: put held studies back to work with the rules as they are now, and push waiting ones.

A held study is routed again with the rules on disk (its old route dropped: `ingestd.journal.retries`), unless
`--keep-route`, or unless its delivery may already have put something into XNAT: then it goes on with the route it
has, and `retry` says what XNAT holds and how to re-route it anyway (`--reroute-sent`, once that is removed).

The rules are loaded first, as the daemon loads them (`load_rules_for`); if they do not load, nothing is done and
the problems are printed. When a daemon runs on the state directory, it is sent SIGHUP and `retry` waits until the
daemon has recorded the reload (`ingestd.journal.retries.DaemonRules`), so that the router takes the study up
with the rules just loaded, and every XNAT client logs in again with the credentials as they are now; a refused
reload stops `retry` before it changes anything.

`--now` makes due at once what waits between attempts: a delivery's next attempt, a stage's retry after a
failure, and the login of a paused XNAT server (the daemon's deliverer looks for the request at each check).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ingestd.admin.batchref import find_batches
from ingestd.config import Config
from ingestd.errors import IngestdError
from ingestd.journal import BatchRow, Journal
from ingestd.journal.retries import (
    DaemonRules,
    Retried,
    RetryOutcome,
    daemon_rules,
    push_now,
    request_wake,
    retry_held,
)
from ingestd.journal.servers import server_states
from ingestd.logs import uid_digest
from ingestd.pipeline.build import load_rules_for
from ingestd.statedir import lock_holder
from ingestd.states import BatchKind, StudyState

__all__ = ["RetryError", "RetryRequest", "run_retry"]

_WAITING = (StudyState.RECEIVING, StudyState.COMPLETE, StudyState.ROUTED)


class RetryError(IngestdError):
    """`retry` refuses: nothing was changed."""


@dataclass(frozen=True, slots=True)
class RetryRequest:
    """What the person asked for (the command line, parsed)."""

    study: str | None = None  # a batch id, #id, study digest or Study Instance UID
    held: bool = False  # every held study
    all: bool = False  # with `now`: every waiting study
    now: bool = False
    keep_route: bool = False
    reroute_sent: bool = False
    wait_seconds: float = 60.0  # for the daemon to take up the rules


def run_retry(config: Config, request: RetryRequest, out: Callable[[str], None] = print) -> int:
    """Do what `request` asks; print what happened to each batch. Returns the exit status (0: something was done)."""
    if request.all and not request.now:
        raise RetryError("--all is for --now (every waiting study); to retry every held study: --held")
    if request.study is None and not request.held and not request.now:
        raise RetryError("name a study (batch id, digest or Study Instance UID), or --held for every held study")
    if not config.journal_path.exists():
        raise RetryError(f"no journal at {config.journal_path}: nothing was ever received there")
    retrying = request.held or request.study is not None
    version = None
    if retrying and not request.keep_route:
        rules = load_rules_for(config)  # ConfigError: the CLI prints its problems, nothing is done
        if rules is None:  # `ingestd import --rules FILE` routes without them: its studies keep those routes
            out("no rules are configured (rules:): held studies keep the route they have; re-routing needs rules")
            request = replace(request, keep_route=True)
        else:
            version = rules.version
    journal = Journal(config.journal_path)
    try:
        held = find_batches(journal, request.study, (StudyState.HELD,)) if retrying and not request.all else []
        waiting = find_batches(journal, request.study, _WAITING) if request.now and not request.held else []
        if not held and not waiting:
            return _nothing(journal, request, out)
        pid = lock_holder(config.state_dir)
        if held:
            version = _reload_daemon(journal, pid, version, request.wait_seconds, out)
            rows = {batch.id: batch for batch in journal.batches()}
            now = time.time()
            for batch_id in held:
                keep, sent_ok = request.keep_route, request.reroute_sent
                result = retry_held(journal, config.state_dir, batch_id, now, keep_route=keep, sent_ok=sent_ok)
                out(_describe(result, rows[batch_id], version))
        if request.now:
            _push(journal, waiting if request.study is not None else None, out)
        if pid is None:
            out(f"no daemon runs on {config.state_dir}: start it (systemctl start ingestd) to route and deliver them")
    finally:
        journal.close()
    return 0


def _nothing(journal: Journal, request: RetryRequest, out: Callable[[str], None]) -> int:
    """Nothing matched: say what the study named is, if anything, and what would act on it."""
    named = find_batches(journal, request.study, tuple(StudyState)) if request.study is not None else []
    for batch_id in named:
        state = journal.batch_state(batch_id)
        hint = ": `ingestd retry --now` tries it at once if it waits between attempts" if state in _WAITING else ""
        out(f"batch {batch_id}: not held, {state}{hint}")
    if named:
        return 1
    what = "waiting or held" if request.now else "held"
    raise RetryError(f"no {what} study matches" + (f" {request.study}" if request.study else ""))


def _reload_daemon(
    journal: Journal, pid: int | None, version: str | None, wait: float, out: Callable[[str], None]
) -> str | None:
    """Have a running daemon load the rules and credentials as they are now (SIGHUP), and wait until it says it
    did. Returns the rule set version it runs then (or `version`, loaded here, when no daemon runs)."""
    if pid is None:
        return version
    before = daemon_rules(journal)
    if pid == 0 or before is None or before.pid != pid:
        raise RetryError(
            f"another ingestd (pid {pid or 'unknown'}) holds the state directory and is not a daemon that records its"
            " rules (an `ingestd import`?): run retry once it has ended"
        )
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        raise RetryError(
            f"cannot signal the daemon (pid {pid}): run retry as the user the daemon runs as, or reload it"
            " (systemctl reload ingestd) and run retry again"
        ) from None
    except ProcessLookupError:
        raise RetryError(f"the daemon (pid {pid}) ended meanwhile: start it and run retry again") from None
    after = _wait_for_reload(journal, before, wait)
    if after is None:
        raise RetryError(
            f"the daemon (pid {pid}) did not record the reload within {wait:.0f} s: nothing was retried; see its log"
            " (daemon.reload) and run retry again"
        )
    if after.outcome == "refused":
        problems = "; ".join(after.problems) or "see its log (daemon.reload)"
        raise RetryError(
            f"the daemon refused to reload its configuration, so it would route with the old rules: {problems}."
            " Nothing was retried: fix it and run retry again"
        )
    daemon_version = after.version
    changed = version is not None and daemon_version != version
    note = f" (retry read rule set {version}: the files changed meanwhile?)" if changed else ""
    out(f"the daemon (pid {pid}) reloaded its configuration, rules and credentials: rule set {daemon_version}{note}")
    return daemon_version


def _wait_for_reload(journal: Journal, before: DaemonRules, wait: float) -> DaemonRules | None:
    deadline = time.monotonic() + wait
    while True:
        after = daemon_rules(journal)
        if after is not None and after.generation > before.generation:
            return after
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _study(batch: BatchRow) -> str:
    what = "attachment set " if batch.kind == BatchKind.FILES else ""
    return f"{what}{uid_digest(batch.study_uid)}#{batch.batch}"


def _describe(result: Retried, batch: BatchRow, version: str | None) -> str:
    """One line (or a few) for one batch, in ingestd's words; no patient data (rule names, XNAT's URLs)."""
    head = f"batch {result.batch_id} ({_study(batch)}, held {batch.hold_code})"
    old = result.old_route
    if result.outcome == RetryOutcome.NOT_HELD:
        return f"batch {result.batch_id} ({_study(batch)}): not held any more"
    if result.outcome == RetryOutcome.REROUTED:
        dropped = "" if old is None else f"; its route by rule '{old.rule}' (rule set {old.rules_version}) was dropped"
        forced = f"; rule '{batch.forced_rule}' as chosen by resend" if batch.forced_rule else ""
        return f"{head}: re-routed with rule set {version}{dropped}{forced}"
    assert old is not None  # noqa: S101 - a kept route is a route
    kept = f"{head}: kept its route by rule '{old.rule}' (rule set {old.rules_version})"
    if result.outcome == RetryOutcome.KEPT_ROUTE:
        text = f"{kept}; its delivery goes on from where it can make progress"
    elif batch.kind == BatchKind.FILES:
        assert result.sent is not None  # noqa: S101 - kept because something was sent
        text = (
            f"{kept}, because XNAT may already hold some of its files: {result.sent.describe()}. Re-routing would"
            " leave those in the session's resources and attach the files again wherever the rules say now, so its"
            " delivery goes on with the route it has. To re-route it instead, delete its files from the resources"
            f" of that session in XNAT, then run `ingestd retry --reroute-sent {result.batch_id}`"
        )
    else:
        assert result.sent is not None  # noqa: S101 - kept because something was sent
        where = (
            "delete that prearchive session in XNAT (Upload > Prearchive)"
            if result.sent.prearchive_url
            else "delete what XNAT holds of it (see its Prearchive page and the project)"
        )
        if result.sent.archive_uri:
            where += " and the archived session"
        text = (
            f"{kept}, because XNAT may already hold part of it: {result.sent.describe()}. Re-routing would leave that"
            " in XNAT and send the study again under the new labels, so its delivery goes on with the route it has."
            f" To re-route it instead, {where}, then run `ingestd retry --reroute-sent {result.batch_id}`"
        )
    if result.missing_files and batch.kind == BatchKind.FILES:
        text += (
            f". Note: {result.missing_files} of its spooled files are gone from the state directory; if XNAT lacks"
            " any of them its upload fails: drop those files again"
        )
    elif result.missing_files:
        text += (
            f". Note: {result.missing_files} of its outgoing files are gone from the state directory; if XNAT lacks"
            f" any of them its package step fails: then `ingestd retry --reroute-sent {result.batch_id}`"
        )
    return text


def _push(journal: Journal, batch_ids: list[int] | None, out: Callable[[str], None]) -> None:
    """`--now`: make due at once what waits between attempts, and ask the daemon to try paused servers now."""
    now = time.time()
    pushed_any = False
    for pushed in push_now(journal, batch_ids, now):
        pushed_any = True
        wait = "its next delivery attempt" if pushed.waited == "delivery" else "its retry after a failure"
        out(f"batch {pushed.batch_id} ({pushed.state}): {wait} was due in {pushed.seconds_left:.0f} s: due now")
    request_wake(journal, now)
    paused = [state for state in server_states(journal) if state.paused]
    if not pushed_any and not paused:
        out("nothing waits between attempts")
    for state in paused:
        out(
            f"XNAT server {state.server} is paused after {state.refusals} refused logins ({state.reason}):"
            " a login is tried at once; if it is refused again, fix the account or credentials first"
        )
