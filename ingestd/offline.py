"""`ingestd explain` and `ingestd anonymize`: the daemon's rules and de-identification, run on files at hand.

Files and folders are read by the daemon's intake (`ingestd.receive.intake`: hidden and partial files passed over,
archives opened, a missing preamble or file meta completed), grouped into studies, and given the same facts the
router builds from the journal (`ingestd.pipeline.route.study_facts`): as if dropped into a drop folder at the given
path, or received over DICOM when `--calling-aet` is given. What happens to each study is the router's own decision
(`ingestd.rules.verdict`), and `anonymize` writes through `ingestd.pipeline.route.deidentify_file`, the daemon's own
path.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from ingestd.config import Archives
from ingestd.deid.engine import Change, DeidError, Labels, anonymize, screen
from ingestd.deid.stream import open_instance
from ingestd.dicomfile import PreparedInstance
from ingestd.journal import BatchInstance
from ingestd.logs import uid_digest
from ingestd.pipeline.route import deidentify_file, header_facts, study_facts
from ingestd.receive.intake import find_sources, read_source, source_name
from ingestd.rules import Held, Routed, RuleSet, StudyFacts, explain_match
from ingestd.rules.verdict import Screened, label_clashes, verdict

__all__ = ["InputFile", "Study", "anonymize_studies", "explain_studies", "read_studies", "study_verdict"]


@dataclass(frozen=True, slots=True)
class InputFile:
    path: Path  # the instance as the spool would hold it (preamble and file meta completed), in the scratch folder
    relative: str  # its source detail within the folder it was found in: `a/b.dcm`, `a/b.zip!c/d.dcm`
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


def read_studies(
    paths: Sequence[Path],
    scratch: Path,
    *,
    limits: Archives | None = None,
    calling_aet: str | None = None,
    called_aet: str = "INGESTD",
) -> tuple[list[Study], list[tuple[str, str]]]:
    """The studies in `paths`, read as the daemon's intake reads them, and what was skipped with the reason.

    Files are found and read by `ingestd.receive.intake`, as `ingestd import` and a drop folder do: hidden and
    partial files passed over, zip and tar archives opened, a missing preamble or file meta completed. Each
    instance is written to `scratch` as the spool would hold it (the study's files point there). Skipped items
    are named by their path (an archive member as `archive!member`).
    """
    limits = limits or Archives()
    files: list[InputFile] = []
    skipped: list[tuple[str, str]] = []
    headers: dict[str, dict[str, str | tuple[str, ...]]] = {}
    roots: dict[str, str] = {}
    sops: set[tuple[str, str]] = set()
    sources = find_sources(paths)

    def found(prepared: PreparedInstance, detail: str, root: Path) -> None:
        header = prepared.header
        if (header.study_uid, header.sop_uid) in sops:  # as the spool: one instance per SOP Instance UID
            return
        sops.add((header.study_uid, header.sop_uid))
        path = scratch / f"{len(files)}.dcm"
        with path.open("wb") as out:
            out.write(prepared.prefix)
            out.write(prepared.body)
        if header.series_uid not in headers:  # one header per series, as the router reads them
            data = pydicom.dcmread(io.BytesIO(prepared.prefix + prepared.body), stop_before_pixels=True)
            headers[header.series_uid] = header_facts(data)
        files.append(
            InputFile(
                path=path,
                relative=detail,
                study_uid=header.study_uid,
                series_uid=header.series_uid,
                sop_uid=header.sop_uid,
                sop_class_uid=header.sop_class_uid,
                modality=header.modality,
            )
        )
        roots.setdefault(header.study_uid, source_name(str(root)))

    for detail, reason in sources.unreadable:
        skipped.append((detail, reason))
    for file in sources.files:
        root = file.root

        def skip(detail: str, reason: str, *_item: object, root: Path = root) -> None:
            skipped.append((f"{root}/{detail}", reason))

        def take(prepared: PreparedInstance, detail: str, root: Path = root) -> None:
            found(prepared, detail, root)

        read_source(file, limits, found=take, refused=skip, unreadable=skip)
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
                source=calling_aet or roots[uid],
                source_detail=f"{called_aet}@127.0.0.1" if calling_aet else item.relative,
                spool_path=str(item.path),
            )
            for index, item in enumerate(members)
        ]
        series_headers = {item.series_uid: headers[item.series_uid] for item in members}
        studies.append(Study(uid, tuple(members), study_facts(uid, instances, series_headers)))
    return studies, skipped


def study_verdict(rules: RuleSet, study: Study, *, rule: str | None = None) -> Routed | Held:
    """What the daemon's router would do with the study: `ingestd.rules.verdict` over its files."""
    screened = [Screened(item.series_uid, item.sop_class_uid, item.modality) for item in study.files]
    return verdict(rules, study.facts, screened, rule=rule)


def explain_studies(rules: RuleSet, studies: Sequence[Study], *, all_instances: bool = False) -> Iterator[str]:
    """Lines for the operator: the rules tried, the decision, the labels, dropped series, and per attribute
    what the profile does to one instance of each kept series (every instance with `all_instances`)."""
    verdicts = [(study.uid, study_verdict(rules, study)) for study in studies]
    clashes = label_clashes(verdicts)  # a session label an earlier study of the same run takes
    for study, (_uid, routed) in zip(studies, verdicts, strict=True):
        yield f"study {study.uid}: {len(study.files)} instance(s) in {len(study.facts.series)} series"
        for line in explain_match(rules, study.facts):
            yield f"  {line}"
        decision = clashes.get(study.uid, routed)
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
        decision = study_verdict(rules, study, rule=rule)
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
