"""Routing attachment sets: which session each set of non-DICOM files goes to, and where in it.

An attachment set (a batch of kind `files`: `ingestd.journal.attachments`) is complete once its upload went quiet,
as a study's batch is (the same `Assembler`). The `SetRouter` then decides, in this order:

1. **Which study.** The studies whose instances came in the same upload (`upload_batches`). With none, the set is
   resource-only: each file is routed by the first *files-only* rule whose `when` holds (`files_only_decision`:
   source conditions, labels from the file's folders), so a tree `<subject>/<session>/qBOLD/...` of many sessions
   becomes one set per session (`split_set`). With studies, each file goes with the study whose instances lie in
   the deepest folder it shares (two studies as close: held `attach-ambiguous`); one set per study.
2. **Wait, follow, or hold.** A set follows its study's route (its rule, server, labels, archive, profile), taken
   from the study's latest routed batch. A study not routed yet (still receiving, complete): the set waits. A study
   held or released: the set is held `study-held`, and looks again every `attachments.recheck_seconds` (it moves
   on by itself once the study is routed).
3. **Where each file goes** (`place_files` of the rule's `attach:` entries): level, scan, resource label and name.
   Files no entry takes go to quarantine with the reason; a label or name XNAT would refuse holds the set (`label`).

Then `route_set` records the route and the outgoing files in one transaction, and the deliverer takes over
(`ingestd.pipeline.attachsteps`). Reasons and log lines never name a file: paths below a drop folder may hold a
patient's name.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

import structlog

from ingestd.config import Config
from ingestd.journal import BatchRow, Journal, Source
from ingestd.journal.attachments import (
    AttachedFile,
    OutgoingFile,
    held_sets,
    remove_files,
    route_set,
    set_files,
    set_recheck,
    split_set,
    upload_batches,
    upload_instances,
)
from ingestd.logs import path_digest
from ingestd.pipeline.route import path_parts, route_record
from ingestd.pipeline.runner import BatchWorker
from ingestd.rules import Held, Routed, RuleSet, StudyFacts
from ingestd.rules.attach import files_only_decision, place_files
from ingestd.spool import Quarantine
from ingestd.states import BatchKind, HoldCode, Stage, StudyState

__all__ = ["SetRouter", "closest_study"]

log = structlog.get_logger("ingestd.attach")

_WAITING = frozenset({StudyState.RECEIVING, StudyState.COMPLETE})
_FOLLOWED = frozenset({StudyState.ROUTED, StudyState.DELIVERED})


def _folders(relative: str) -> tuple[str, ...]:
    return PurePosixPath(relative).parts[:-1]


def _shared(first: tuple[str, ...], second: tuple[str, ...]) -> int:
    count = 0
    for one, other in zip(first, second, strict=False):
        if one != other:
            break
        count += 1
    return count


def closest_study(relative: str, studies: Mapping[str, Collection[tuple[str, ...]]]) -> str | None:
    """The study (by UID) whose instances lie in the deepest folder `relative` shares, or None when two or more
    are as close. `studies`: each study's instance folders (paths below the drop folder, archives opened)."""
    folders = _folders(relative)
    depth = {uid: max((_shared(folders, other) for other in where), default=-1) for uid, where in studies.items()}
    best = max(depth.values(), default=-1)
    closest = [uid for uid, shared in depth.items() if shared == best]
    return closest[0] if len(closest) == 1 else None


@dataclass(frozen=True, slots=True)
class _Group:
    """Files of a set that go the same way: with one study, by one files-only route, or held for one reason."""

    study: str | None = None
    routed: Routed | None = None
    held: Held | None = None


class SetRouter(BatchWorker):
    """A thread that routes complete attachment sets, and looks again at sets held `study-held`."""

    name = "set-router"
    stage = Stage.ROUTE

    def __init__(self, journal: Journal, rules: RuleSet, config: Config, quarantine: Quarantine, interval: float = 1.0):
        super().__init__(journal, interval, config.batch_failures)
        self.rules = rules
        self.config = config
        self.quarantine = quarantine
        self.state_dir = config.state_dir

    def due(self, now: float) -> Iterator[BatchRow]:
        for batch in sorted(self.journal.batches((StudyState.COMPLETE,)), key=lambda b: b.id):
            if batch.kind == BatchKind.FILES and batch.retry_at <= now:
                yield batch
        yield from held_sets(self.journal, HoldCode.STUDY_HELD, now)  # sets that look at their study again

    def process(self, batch: BatchRow, now: float) -> int:
        if batch.state == StudyState.HELD:
            return self._recheck(batch, now)
        return self.route(batch, now)

    def hold(self, batch: BatchRow, code: HoldCode, reason: str) -> None:
        self._hold(batch, code, reason)

    def _hold(self, batch: BatchRow, code: HoldCode, reason: str, *, rule: str | None = None) -> None:
        if self.journal.hold_batch(batch.id, code, f"{code}: {reason}", time.time(), from_state=batch.state):
            if code == HoldCode.STUDY_HELD:
                set_recheck(self.journal, batch.id, time.time() + self.config.attachments.recheck_seconds)
            log.warning("attach.held", batch_id=batch.id, rule=rule, code=code, reason=reason)

    def _recheck(self, batch: BatchRow, now: float) -> int:
        """A set held `study-held`: back to `complete` once its study has a route (routed or delivered)."""
        states = {state for _id, _uid, state in self._linked(batch)}
        if states & _FOLLOWED or states & _WAITING or not states:
            if self.journal.retry_batch(batch.id, now) is not None:
                log.info("attach.study_routed", batch_id=batch.id)
                return 1
            return 0
        set_recheck(self.journal, batch.id, now + self.config.attachments.recheck_seconds)
        return 0

    def _linked(self, batch: BatchRow) -> list[tuple[int, str, str]]:
        return upload_batches(self.journal, batch.source_kind, batch.source, batch.upload or "")

    # -- one set ---------------------------------------------------------------------------------------

    def route(self, batch: BatchRow, now: float) -> int:
        files = set_files(self.journal, batch.id)
        if not files:
            self._hold(batch, HoldCode.EMPTY, "the set has no files left (each is in quarantine with its reason)")
            return 1
        rules = self.rules  # one rules version for the whole set
        linked = self._linked(batch)
        groups = self._groups(batch, files, linked, rules)
        if len(groups) > 1:
            ordered = list(groups.values())
            created = split_set(self.journal, batch.id, [[f.id for f in group] for group in ordered], now)
            log.info("attach.set_split", batch_id=batch.id, sets=len(created) + 1)
            return 1
        ((group, members),) = groups.items()
        if group.held is not None:
            self._hold(batch, group.held.code, group.held.reason, rule=group.held.rule)
            return 1
        if group.routed is not None:
            return self._route(batch, members, group.routed, rules, study_uid="")
        return self._follow(batch, members, group.study or "", linked, rules)

    def _groups(
        self, batch: BatchRow, files: list[AttachedFile], linked: list[tuple[int, str, str]], rules: RuleSet
    ) -> dict[_Group, list[AttachedFile]]:
        groups: dict[_Group, list[AttachedFile]] = {}
        if not linked:
            folder = batch.source if batch.source_kind == "folder" else None
            for file in files:
                facts = StudyFacts(study_uid=batch.study_uid, series=(), drop_folder=folder, paths=(file.relative,))
                decision = files_only_decision(rules, facts)
                key = _Group(routed=decision) if isinstance(decision, Routed) else _Group(held=decision)
                groups.setdefault(key, []).append(file)
            return groups
        studies: dict[str, set[tuple[str, ...]]] = {}
        for _batch_id, study_uid, detail in upload_instances(
            self.journal, batch.source_kind, batch.source, batch.upload or ""
        ):
            studies.setdefault(study_uid, set()).add(_folders(path_parts(detail)))
        for file in files:
            study = closest_study(file.relative, studies)
            if study is None:
                reason = (
                    f"a file lies as close to {len(studies)} studies of its upload: put each session's files in the "
                    "folder of its DICOM (or drop them apart), then `ingestd release` this set and drop them again"
                )
                key = _Group(held=Held(reason=reason, code=HoldCode.ATTACH_AMBIGUOUS))
            else:
                key = _Group(study=study)
            groups.setdefault(key, []).append(file)
        return groups

    def _follow(
        self, batch: BatchRow, files: list[AttachedFile], study: str, linked: list[tuple[int, str, str]], rules: RuleSet
    ) -> int:
        """Route a set with its study: the route of the study's latest routed or delivered batch."""
        mine = [(batch_id, state) for batch_id, uid, state in linked if uid == study]
        followed = [batch_id for batch_id, state in mine if state in _FOLLOWED]
        if not followed:
            if any(state in _WAITING for _id, state in mine):
                return 0  # the study is on its way: the set waits, complete
            numbers = ", ".join(str(batch_id) for batch_id, _state in mine)
            reason = (
                f"its study (batch {numbers}) is held or released: the files follow once it is routed "
                f"(`ingestd retry {mine[-1][0]}`); looked at again every {self.config.attachments.recheck_seconds:g} s"
            )
            self._hold(batch, HoldCode.STUDY_HELD, reason)
            return 1
        route = self.journal.route(max(followed))
        if route is None:  # pragma: no cover - a routed batch has a route (one transaction)
            return 0
        rule = next((candidate for candidate in rules.rules if candidate.name == route.rule), None)
        if rule is None:
            reason = f"rule '{route.rule}', which routed its study, is not in the rules in force: add it back"
            self._hold(batch, HoldCode.UNROUTED, reason)
            return 1
        decision = Routed(
            rule=route.rule,
            server=route.server,
            project=route.project,
            subject=route.subject,
            session=route.session,
            archive=route.archive,
            profile=route.profile,
            kept_series=(),
            dropped_series=(),
        )
        return self._route(batch, files, decision, rules, study_uid=route.study_uid)

    def _route(
        self, batch: BatchRow, files: list[AttachedFile], decision: Routed, rules: RuleSet, *, study_uid: str
    ) -> int:
        rule = next((candidate for candidate in rules.rules if candidate.name == decision.rule), None)
        if rule is None:  # pragma: no cover - files_only_decision names a rule of `rules`
            return 0
        labels = {"project": decision.project, "subject": decision.subject, "session": decision.session}
        placement = place_files(rule, [file.relative for file in files], labels)
        if placement.problems:
            self._hold(batch, HoldCode.LABEL, f"rule '{rule.name}': {placement.problems[0]}", rule=rule.name)
            return 1
        unmatched = [file for file in files if file.relative in set(placement.unmatched)]
        if unmatched:
            self._keep_aside(batch, unmatched, f"no attach: entry of rule '{rule.name}' takes this file's path")
        outgoing = [
            OutgoingFile(file.id, placed.level, placed.scan, placed.resource, placed.name, file.size, file.md5)
            for file in files
            if (placed := placement.placed.get(file.relative)) is not None
        ]
        if not outgoing:
            reason = f"no file of the set matches an attach: entry of rule '{rule.name}' (they are in quarantine)"
            self._hold(batch, HoldCode.UNROUTED, reason, rule=rule.name)
            return 1
        record = route_record(decision, rules.version, study_uid)
        if route_set(self.journal, batch.id, record, outgoing, time.time()):
            log.info(
                "attach.routed",
                batch_id=batch.id,
                rule=rule.name,
                files=len(outgoing),
                resources=len({(o.level, o.scan, o.resource) for o in outgoing}),
                quarantined=len(unmatched),
            )
        return 1

    def _keep_aside(self, batch: BatchRow, files: list[AttachedFile], reason: str) -> None:
        """Move files no entry takes into quarantine with `reason`, then forget them (one by one: a crash between
        the two leaves the file's row pointing at nothing, which the next routing finds and skips)."""
        kept: list[int] = []
        for file in files:
            source = Source(file.source_kind, file.source, file.source_detail, file.upload)
            path = self.state_dir / file.spool_path
            try:
                item = self.quarantine.put_file(path, reason, source)
            except FileNotFoundError:
                kept.append(file.id)
                continue
            kept.append(file.id)
            log.warning("attach.file_quarantined", batch_id=batch.id, file=path_digest(file.relative), item=item.name)
        remove_files(self.journal, kept)
