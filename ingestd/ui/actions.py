"""The web page's actions on one batch: retry, retry now, release, unrelease and resend, by the code the commands
run.

`retry` and `retry now` are `ingestd retry BATCH` and `ingestd retry --now BATCH` (`ingestd.admin.retry.run_retry`),
`release` is what `ingestd release BATCH` does (`Journal.release_batch` on the held batch), `unrelease` is
`ingestd unrelease BATCH` and `resend` is `ingestd resend BATCH` (`ingestd.admin.resend.run_unrelease`,
`run_resend`: a delivered study sent again as a new batch, by the rule that delivered it, from the copies the spool
kept; refused as the command refuses it when they are gone). Each returns the lines the command would print.

Inside the daemon `run_retry` finds the daemon's own process holding the state directory's lock: it signals it
(SIGHUP, which the main thread answers by reloading the rules) and waits until the reload is recorded, up to a
minute. So an action runs in a worker thread of its own, one at a time; the HTTP thread waits for it at most
`WAIT_SECONDS` and otherwise answers that it is under way (the study page then shows its outcome when it ends).

What a command prints may quote a route's labels (a reason, a prearchive URL); the page shows them as
`ingestd status` does: those the rule builds from raw identifying values as digests (`ingestd.logs.hide_labels`).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from ingestd.admin.batchref import find_batches
from ingestd.config import Config
from ingestd.errors import ConfigError, IngestdError
from ingestd.journal import Journal
from ingestd.logs import hide_labels
from ingestd.states import BatchKind, StudyState
from ingestd.status import LabelPolicy

__all__ = ["ACTIONS", "Actions", "Outcome", "applicable"]

log = structlog.get_logger("ingestd.ui")

# What the page calls each action (the last part of its URL) and what its button says.
ACTIONS = {
    "retry": "Retry",
    "retry-now": "Retry now",
    "release": "Release",
    "unrelease": "Unrelease",
    "resend": "Resend",
}
_BY_STATE = {
    StudyState.HELD.value: ("retry", "retry-now", "release"),
    StudyState.RELEASED.value: ("unrelease",),
    StudyState.DELIVERED.value: ("resend",),
}
WAIT_SECONDS = 5.0  # how long a request waits for its action before answering "under way"


def applicable(state: str, kind: str = BatchKind.DICOM) -> tuple[str, ...]:
    """The actions that apply to a batch in `state` (held: retry, retry now, release; released: unrelease;
    delivered: resend, but never for an attachment set (`kind` files), which `ingestd resend` refuses)."""
    actions = _BY_STATE.get(state, ())
    return tuple(action for action in actions if action != "resend" or kind != BatchKind.FILES)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one action did, in the command's words: `done` False while it is still running."""

    action: str
    lines: tuple[str, ...]
    done: bool
    ok: bool
    at: float


def _release(config: Config, batch_id: int, out: Callable[[str], None]) -> bool:
    """`ingestd release BATCH`: the held batch is taken over by hand."""
    if not config.journal_path.exists():
        out(f"no journal at {config.journal_path}")
        return False
    journal = Journal(config.journal_path)
    try:
        if not find_batches(journal, str(batch_id), (StudyState.HELD,)):
            out("no held study matches")
            return False
        out(f"batch {batch_id}: {'released' if journal.release_batch(batch_id, time.time()) else 'not held'}")
    finally:
        journal.close()
    return True


def _unrelease_or_resend(config: Config, action: str, batch_id: int, out: Callable[[str], None]) -> bool:
    """`ingestd unrelease BATCH` or `ingestd resend BATCH` (the rule that delivered it), printed as they print."""
    from ingestd.admin.resend import run_resend, run_unrelease  # noqa: PLC0415 - loads the rules; only for these

    stdout, stderr = io.StringIO(), io.StringIO()
    if action == "resend":
        status = run_resend(config, str(batch_id), None, stdout, stderr)
    else:
        status = run_unrelease(config, str(batch_id), stdout, stderr)
    for line in (stdout.getvalue() + stderr.getvalue()).splitlines():
        out(line.removeprefix("ingestd: "))
    return status == 0


def _retry(config: Config, batch_id: int, out: Callable[[str], None], *, now: bool) -> bool:
    from ingestd.admin.retry import RetryRequest, run_retry  # noqa: PLC0415 - loads the rules

    return run_retry(config, RetryRequest(study=str(batch_id), now=now), out) == 0


def run_action(config: Config, action: str, batch_id: int, out: Callable[[str], None]) -> bool:
    """Do `action` on `batch_id` as its command does, printing through `out`; whether it did something. The
    command's refusals (IngestdError, ConfigError with its problems) are printed as the command prints them."""
    try:
        if action == "release":
            return _release(config, batch_id, out)
        if action in ("unrelease", "resend"):
            return _unrelease_or_resend(config, action, batch_id, out)
        return _retry(config, batch_id, out, now=action == "retry-now")
    except ConfigError as exc:
        for problem in exc.problems:
            out(problem)
    except IngestdError as exc:
        out(str(exc))
    return False


def _identifying_labels(config: Config, batch_id: int) -> list[str]:
    """The labels of the batch's route (if any) that `ingestd status` shows as digests: taken before the action,
    which may drop the route."""
    if not config.journal_path.exists():
        return []
    journal = Journal(config.journal_path, read_only=True)
    try:
        route = journal.route(batch_id)
    finally:
        journal.close()
    if route is None:
        return []
    return [route.label(name) for name in LabelPolicy(config.rules).hidden(route)]


class Actions:
    """Runs the page's actions one at a time in a worker thread, and keeps each batch's last outcome."""

    def __init__(self, config_of: Callable[[], Config], wait_seconds: float = WAIT_SECONDS) -> None:
        self.config_of = config_of  # the configuration as it is now (a reload may change the rules files)
        self.wait_seconds = wait_seconds
        self._outcomes: dict[int, Outcome] = {}
        self._lock = threading.Lock()
        self._busy = threading.Lock()  # held while an action runs

    def last(self, batch_id: int) -> Outcome | None:
        with self._lock:
            return self._outcomes.get(batch_id)

    def start(self, action: str, batch_id: int) -> Outcome:
        """Start `action` on `batch_id`; its outcome once it ends, or within `wait_seconds` one with `done` False."""
        if not self._busy.acquire(blocking=False):
            refused = Outcome(action, ("another action is under way: try again in a moment",), True, False, time.time())
            with self._lock:
                running = self._outcomes.get(batch_id)
                if running is None or running.done:  # a running one of this batch stays shown until it ends
                    self._outcomes[batch_id] = refused
            return refused
        lines: list[str] = []
        finished = threading.Event()

        def work() -> None:
            ok = False
            try:
                config = self.config_of()
                hidden = _identifying_labels(config, batch_id)
                ok = run_action(config, action, batch_id, lambda line: lines.append(hide_labels(line, hidden)))
            except Exception as exc:  # the page says so; the log has the traceback
                log.exception("ui.action_failed", batch_id=batch_id, action=action, error=type(exc).__name__)
                lines.append("the action failed; the log says why")
            finally:
                with self._lock:
                    self._outcomes[batch_id] = Outcome(action, tuple(lines), True, ok, time.time())
                self._busy.release()
                finished.set()

        with self._lock:
            self._outcomes[batch_id] = Outcome(action, ("under way",), False, False, time.time())
        threading.Thread(target=work, name=f"ui-{action}-{batch_id}", daemon=True).start()
        finished.wait(self.wait_seconds)
        outcome = self.last(batch_id)
        assert outcome is not None  # noqa: S101 - set above
        return outcome
