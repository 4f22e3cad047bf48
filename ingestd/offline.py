"""`ingestd explain` and `ingestd anonymize`: the daemon's rules and de-identification, run on files at hand.

Files and folders are read, grouped into studies, and given the same facts the router builds from the journal
(`ingestd.route.study_facts`): as if dropped into a drop folder at the given path, or received over DICOM when
`--calling-aet` is given. `anonymize` writes through `ingestd.route.deidentify_file`, the daemon's own path.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.errors

from ingestd.deid.engine import Change, DeidError, Labels, anonymize, screen
from ingestd.deid.stream import open_instance
from ingestd.journal import BatchInstance
from ingestd.logs import uid_digest
from ingestd.pipeline.route import deidentify_file, header_facts, study_facts
from ingestd.rules import Held, Routed, RuleSet, StudyFacts, decide, explain_match
from ingestd.walk import DEFAULT_MAX_DEPTH, walk

__all__ = ["InputFile", "Study", "anonymize_studies", "explain_studies", "read_studies"]


@dataclass(frozen=True, slots=True)
class InputFile:
    path: Path
    relative: str  # within the folder it was found in (the drop folder, as the rules see it)
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str


@dataclass(frozen=True, slots=True)
class Study:
    uid: str
    files: tuple[InputFile, ...]
    facts: StudyFacts


def _walk(paths: Sequence[Path], skipped: list[tuple[Path, str]]) -> Iterator[tuple[Path, Path]]:
    """(file, the folder it counts as dropped into) for every file under `paths`, sorted.

    A folder nested deeper than `DEFAULT_MAX_DEPTH` levels is not read: it goes to `skipped` with the reason.
    """

    def too_deep(folder: Path, depth: int) -> None:
        skipped.append((folder, f"a folder {depth} levels down, deeper than {DEFAULT_MAX_DEPTH}: not read"))

    for path in paths:
        if path.is_dir():
            for folder, dirs, names in walk(path, too_deep=too_deep):
                dirs.sort()
                for name in sorted(names):
                    yield folder / name, path
        else:
            yield path, path.parent


def read_studies(
    paths: Sequence[Path], *, calling_aet: str | None = None, called_aet: str = "INGESTD"
) -> tuple[list[Study], list[tuple[Path, str]]]:
    """The studies in `paths`, and the files skipped with the reason (not DICOM, no UIDs)."""
    files: list[InputFile] = []
    skipped: list[tuple[Path, str]] = []
    headers: dict[str, dict[str, str | tuple[str, ...]]] = {}
    roots: dict[str, Path] = {}
    for path, root in _walk(paths, skipped):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as exc:
            skipped.append((path, f"not readable as DICOM ({type(exc).__name__})"))
            continue
        uids = [str(ds.get(k, "")).strip() for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        if not all(uids):
            skipped.append((path, "no Study, Series or SOP Instance UID"))
            continue
        item = InputFile(
            path=path,
            relative=path.relative_to(root).as_posix(),
            study_uid=uids[0],
            series_uid=uids[1],
            sop_uid=uids[2],
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            modality=str(ds.get("Modality", "")),
        )
        files.append(item)
        headers.setdefault(item.series_uid, header_facts(ds))
        roots.setdefault(item.study_uid, root)
    studies = []
    by_study: dict[str, list[InputFile]] = {}
    for item in files:
        by_study.setdefault(item.study_uid, []).append(item)
    for uid, members in by_study.items():
        instances = [
            BatchInstance(
                id=index,
                series_uid=item.series_uid,
                sop_uid=item.sop_uid,
                sop_class_uid=item.sop_class_uid,
                modality=item.modality,
                source_kind="dicom" if calling_aet else "folder",
                source=calling_aet or str(roots[uid]),
                source_detail=f"{called_aet}@127.0.0.1" if calling_aet else item.relative,
                spool_path=str(item.path),
            )
            for index, item in enumerate(members)
        ]
        series_headers = {item.series_uid: headers[item.series_uid] for item in members}
        studies.append(Study(uid, tuple(members), study_facts(uid, instances, series_headers)))
    return studies, skipped


def explain_studies(rules: RuleSet, studies: Sequence[Study], *, all_instances: bool = False) -> Iterator[str]:
    """Lines for the operator: the rules tried, the decision, the labels, dropped series, and per attribute
    what the profile does to one instance of each kept series (every instance with `all_instances`)."""
    for study in studies:
        yield f"study {study.uid}: {len(study.files)} instance(s) in {len(study.facts.series)} series"
        for line in explain_match(rules, study.facts):
            yield f"  {line}"
        decision = decide(rules, study.facts)
        if isinstance(decision, Held):
            yield f"  held ({decision.code}): {decision.reason}"
            continue
        yield from _explain_route(rules, study, decision, all_instances)


def _explain_route(rules: RuleSet, study: Study, decision: Routed, all_instances: bool) -> Iterator[str]:
    yield (
        f"  rule {decision.rule} -> server {decision.server}, project {decision.project}, "
        f"subject {decision.subject}, session {decision.session}, archive {str(decision.archive).lower()}"
    )
    for series_uid, count, reason in decision.dropped_series:
        yield f"  drops series {series_uid} ({count} instance(s)): {reason}"
    if decision.profile is None:
        yield "  no de-identification: the instances leave as received"
        return
    profile = rules.profiles[decision.profile]
    yield f"  de-identified by profile {profile.name} (options: {', '.join(sorted(profile.options)) or 'none'})"
    labels = Labels(decision.project, decision.subject, decision.session)
    shown: set[str] = set()
    for item in study.files:
        if item.series_uid not in decision.kept_series or (item.series_uid in shown and not all_instances):
            continue
        shown.add(item.series_uid)
        yield f"  instance {item.relative} (series {item.series_uid}):"
        changes: list[Change] = []
        try:
            with open_instance(item.path, Path(tempfile.gettempdir())) as instance:
                try:
                    screen(instance.dataset, profile)
                except DeidError as exc:
                    yield f"    held ({exc.code}): {exc.reason}"
                anonymize(instance.dataset, profile, labels, changes)
        except DeidError as exc:
            yield f"    held ({exc.code}): {exc.reason}"
        for change in changes:
            name = f"{change.path} {change.keyword}"
            yield f"    {name:<48} {change.action:<13} {change.before!r} -> {change.after!r}  [{change.why}]"


def anonymize_studies(
    rules: RuleSet, studies: Sequence[Study], output: Path, *, rule: str | None = None
) -> Iterator[tuple[str, bool]]:
    """De-identify every study into `output/<new study UID>/<new series UID>/<new SOP UID>.dcm`.

    Yields (message, ok) per study. A study that would be held writes nothing: like the daemon, all or none.
    """
    for study in studies:
        decision = decide(rules, study.facts, rule=rule)
        if isinstance(decision, Held):
            yield f"study {uid_digest(study.uid)}: held ({decision.code}): {decision.reason}", False
            continue
        if decision.profile is None:
            yield f"study {uid_digest(study.uid)}: rule {decision.rule} does not de-identify; nothing written", False
            continue
        profile = rules.profiles[decision.profile]
        labels = Labels(decision.project, decision.subject, decision.session)
        output.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".ingestd-anonymize-", dir=output))  # same disk: moves are renames
        written: list[tuple[Path, Path]] = []
        try:
            for item in study.files:
                if item.series_uid not in decision.kept_series:
                    continue
                done = deidentify_file(item.path, profile, labels, staging)
                target = output / done.study_uid / done.series_uid / f"{done.sop_uid}.dcm"
                written.append((staging / f"{done.sop_uid}.dcm", target))
        except DeidError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            yield f"study {uid_digest(study.uid)}: held ({exc.code}): {exc.reason}", False
            continue
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for staged, target in written:
            target.parent.mkdir(parents=True, exist_ok=True)
            staged.replace(target)
        shutil.rmtree(staging, ignore_errors=True)
        new_study = written[0][1].parent.parent.name if written else "-"
        named = new_study if written else uid_digest(study.uid)  # as `ingestd status` names it: never the original
        yield (
            f"study {named}: rule {decision.rule}, profile {profile.name}: {len(written)} instance(s) -> "
            f"{output / new_study} ({decision.project}/{decision.subject}/{decision.session})",
            True,
        )
