"""Where the non-DICOM files at hand would go: the set router's decisions, predicted for `explain` and `--dry-run`.

Pure: the files (their upload and path), the studies read from the same paths with the verdict the router would
give each, and the rules go in; lines come out. The decisions are the `SetRouter`'s (`ingestd.pipeline.attach`),
made with the same functions: the study whose instances share the deepest folder with a file
(`closest_study`), `files_only_decision` for an upload without DICOM, `place_files` for the resource and name.
One thing is not predicted: whether XNAT has the session a set without DICOM goes to (the deliverer looks then).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from ingestd.logs import uid_digest
from ingestd.pipeline.attach import closest_study
from ingestd.rules import Held, Routed, RuleSet, StudyFacts
from ingestd.rules.attach import files_only_decision, place_files

__all__ = ["FileAtHand", "StudyAtHand", "plan_attachments"]


@dataclass(frozen=True, slots=True)
class FileAtHand:
    """A non-DICOM file a rule attaches: its upload (any key the caller gives the same to the studies' instances of
    that upload), its path below the folder (archives opened), and the folder it counts as dropped into."""

    upload: str
    relative: str
    folder: str | None = None


@dataclass(frozen=True, slots=True)
class StudyAtHand:
    """A study read from the same paths: its UID, (upload, path) of each instance, and what the router would do."""

    uid: str
    paths: tuple[tuple[str, str], ...]
    decision: Routed | Held


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def plan_attachments(
    rules: RuleSet,
    files: Sequence[FileAtHand],
    studies: Sequence[StudyAtHand],
    *,
    show_paths: bool,
) -> Iterator[tuple[str, bool]]:
    """(line, would be held) for every group of files that would go one way. `show_paths`: a line per file too
    (paths below a drop folder may hold a patient's name: only for the operator's terminal)."""
    for upload in sorted({file.upload for file in files}):
        mine = sorted(file.relative for file in files if file.upload == upload)
        folder = next(file.folder for file in files if file.upload == upload)
        nearby = {
            study.uid: {PurePosixPath(path).parts[:-1] for where, path in study.paths if where == upload}
            for study in studies
            if any(where == upload for where, _path in study.paths)
        }
        if not nearby:
            by_route: dict[Routed | Held, list[str]] = {}
            for relative in mine:
                facts = StudyFacts(study_uid="", series=(), drop_folder=folder, paths=(relative,))
                by_route.setdefault(files_only_decision(rules, facts), []).append(relative)
            for decision, relatives in by_route.items():
                yield from _placed(rules, decision, relatives, "without DICOM", show_paths=show_paths)
            continue
        verdicts = {study.uid: study.decision for study in studies}
        by_study: dict[str | None, list[str]] = {}
        for relative in mine:
            by_study.setdefault(closest_study(relative, nearby), []).append(relative)
        for uid, relatives in by_study.items():
            if uid is None:
                reason = "each lies as close to two studies of its upload (attach-ambiguous)"
                yield f"{_plural(len(relatives), 'file')}: would be held: {reason}", True
                yield from _paths(relatives, show_paths)
                continue
            yield from _placed(rules, verdicts[uid], relatives, f"with study {uid_digest(uid)}", show_paths=show_paths)


def _paths(
    relatives: Sequence[str], show_paths: bool, names: dict[str, str] | None = None
) -> Iterator[tuple[str, bool]]:
    if not show_paths:
        return
    for relative in relatives:
        yield (f"    {relative}" + (f" -> {names[relative]}" if names and relative in names else ""), False)


def _placed(
    rules: RuleSet, decision: Routed | Held, relatives: list[str], how: str, *, show_paths: bool
) -> Iterator[tuple[str, bool]]:
    files = _plural(len(relatives), "file")
    if isinstance(decision, Held):
        yield f"{files} {how}: would be held ({decision.code}): {decision.reason}", True
        yield from _paths(relatives, show_paths)
        return
    rule = next((candidate for candidate in rules.rules if candidate.name == decision.rule), None)
    if rule is None or not rule.attach:
        reason = f"rule '{decision.rule}' routes the study but attaches no file: they would be quarantined"
        yield f"{files} {how}: {reason}", False
        yield from _paths(relatives, show_paths)
        return
    labels = {"project": decision.project, "subject": decision.subject, "session": decision.session}
    placement = place_files(rule, relatives, labels)
    if placement.problems:
        yield f"{files} {how}: would be held (label): rule '{rule.name}': {placement.problems[0]}", True
        return
    where = f"{decision.server} {decision.project}/{decision.subject}/{decision.session}"
    targets: dict[tuple[str, str, str], list[str]] = {}
    for relative, placed in placement.placed.items():
        targets.setdefault((placed.level, placed.scan, placed.resource), []).append(relative)
    for (level, scan, resource), members in sorted(targets.items()):
        at = f"scan {scan} " if level == "scan" else "the subject's " if level == "subject" else ""
        yield (
            f"{_plural(len(members), 'file')} {how}: rule {rule.name} would attach to {where}, {at}resource {resource}",
            False,
        )
        yield from _paths(sorted(members), show_paths, {r: placement.placed[r].name for r in members})
    if placement.unmatched:
        reason = f"no attach: entry of rule '{rule.name}' takes them: they would be quarantined"
        yield f"{_plural(len(placement.unmatched), 'file')} {how}: {reason}", False
        yield from _paths(placement.unmatched, show_paths)
