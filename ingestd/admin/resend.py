"""`ingestd unrelease` and `ingestd resend`: a release taken back, a delivered study sent again.

`unrelease` puts a released batch back to `held` with the reason it had, so that `ingestd retry` works on it once
the cause is fixed. `resend` makes a new batch of a delivered study from the copies the spool kept
(`delivery.keep_after_delivery`), routed by the rule that delivered it or the one `--route` names; the daemon
routes and delivers it like any other (into the same session: XNAT merges by SOP Instance UID, nothing twice).
Both name studies as `ingestd status` does: batch ids and digests, never a UID they were not given.

An attachment set (non-DICOM files attached to a session as resources) is never re-sent: `resend` refuses it and
says to drop the files again (`SET_RESEND_REFUSED`). `unrelease` takes a set back like any batch.
"""

from __future__ import annotations

import difflib
import sys
import time
from typing import TextIO

from ingestd.admin.batchref import find_batches
from ingestd.config import Config
from ingestd.journal import Journal
from ingestd.journal.resends import (
    SET_RESEND_REFUSED,
    ResendRefusedError,
    UnreleaseRefusedError,
    resend_batch,
    unrelease_batch,
)
from ingestd.logs import uid_digest
from ingestd.pipeline.build import load_rules_for
from ingestd.states import BatchKind, StudyState

__all__ = ["run_command", "run_resend", "run_unrelease"]


def _open(config: Config, err: TextIO) -> Journal | None:
    if not config.journal_path.exists():
        print(f"ingestd: no journal at {config.journal_path}", file=err)
        return None
    return Journal(config.journal_path)


def run_command(command: str, config: Config, reference: str, route: str | None) -> int:
    """`ingestd unrelease STUDY` or `ingestd resend STUDY [--route RULE]`; the exit status."""
    return run_unrelease(config, reference) if command == "unrelease" else run_resend(config, reference, route)


def run_unrelease(config: Config, reference: str, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Put the released batches `reference` names back to held; 0 when each one is, else 1."""
    out, err = out or sys.stdout, err or sys.stderr  # the streams at the call, not at import
    journal = _open(config, err)
    if journal is None:
        return 1
    try:
        batches = find_batches(journal, reference, (StudyState.RELEASED,))
        if not batches:
            print("ingestd: no released study matches (`ingestd status` lists them)", file=err)
            return 1
        status = 0
        for batch_id in batches:
            try:
                if not unrelease_batch(journal, batch_id, time.time()):
                    print(f"batch {batch_id}: not released any more", file=out)
                    continue
            except UnreleaseRefusedError as exc:
                print(f"ingestd: {exc}", file=err)
                status = 1
                continue
            row = next(b for b in journal.batches((StudyState.HELD,)) if b.id == batch_id)
            print(
                f"batch {batch_id}: held again ({row.reason}); fix the cause, then `ingestd retry {batch_id}`", file=out
            )
            later = [b.id for b in journal.batches() if b.study_uid == row.study_uid and b.batch > row.batch]
            if later:
                print(
                    f"batch {batch_id}: note: the study was received again since (batch {', '.join(map(str, later))});"
                    " retrying both sends it to XNAT twice",
                    file=out,
                )
        return status
    finally:
        journal.close()


def run_resend(
    config: Config, reference: str, route: str | None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Send the delivered batch `reference` names again as a new batch; 0 when it was made, else 1."""
    out, err = out or sys.stdout, err or sys.stderr
    journal = _open(config, err)
    if journal is None:
        return 1
    try:
        batches = find_batches(journal, reference, (StudyState.DELIVERED,))
        refused = _refusal(journal, reference, batches)
        if refused is not None:
            print(f"ingestd: {refused}", file=err)
            return 1
        batch_id = batches[0]
        delivered = journal.route(batch_id)
        rule = route or (delivered.rule if delivered is not None else None)
        problem = _rule_problem(config, rule, chosen=route is not None)
        if problem is not None:
            print(f"ingestd: batch {batch_id}: {problem}", file=err)
            return 1
        assert rule is not None  # noqa: S101 - _rule_problem says so otherwise
        try:
            resent = resend_batch(journal, config.spool_dir, batch_id, rule, time.time())
        except ResendRefusedError as exc:
            print(f"ingestd: {exc}", file=err)
            return 1
        study = next(b.study_uid for b in journal.batches() if b.id == resent.batch_id)
        print(
            f"batch {resent.batch_id} ({uid_digest(study)}#{resent.number}): {resent.instances} instances re-sent from"
            f" batch {batch_id} with rule '{rule}'; the daemon routes and delivers it (`ingestd status`)",
            file=out,
        )
        return 0
    finally:
        journal.close()


def _refusal(journal: Journal, reference: str, delivered: list[int]) -> str | None:
    """Why `resend` sends nothing for `reference` (`delivered`: the delivered batches it names); None: it may."""
    named = set(find_batches(journal, reference, tuple(StudyState)))
    sets = sorted(batch.id for batch in journal.batches() if batch.id in named and batch.kind == BatchKind.FILES)
    if sets:
        return f"batch {', '.join(map(str, sets))}: {SET_RESEND_REFUSED}"
    if not delivered:
        return (
            "no delivered study matches: only a delivered study can be re-sent (a held one: `ingestd retry`;"
            " `ingestd status` lists them)"
        )
    if len(delivered) > 1:
        return (
            f"the study has {len(delivered)} delivered batches ({', '.join(map(str, delivered))}): name one by its"
            " batch id"
        )
    return None


def _rule_problem(config: Config, rule: str | None, *, chosen: bool) -> str | None:
    """Why `rule` cannot route the re-sent study now (None: it can)."""
    rules = load_rules_for(config)
    if rules is None:
        return "the configuration names no rules files, so nothing would route the re-sent study"
    if rule is None:
        return "its route is not in the journal: name a rule with --route"
    names = [candidate.name for candidate in rules.rules]
    if rule in names:
        return None
    close = difflib.get_close_matches(rule, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (the rules are: {', '.join(names)})"
    if chosen:
        return f"no rule named '{rule}' in the rules in force{hint}"
    return f"rule '{rule}', which delivered it, is no longer in the rules: name one with --route{hint}"
