"""`ingestd explain` and `ingestd anonymize`: the daemon's rules and de-identification, run on files at hand.

Files and folders are read by the daemon's intake (`ingestd.receive.intake`: hidden and partial files passed over,
archives opened, a missing preamble or file meta completed), grouped into studies, and given the same facts the
router builds from the journal (`ingestd.pipeline.route.study_facts`): as if dropped into a drop folder at the given
path, or received over DICOM when `--calling-aet` is given. What happens to each study is the router's own decision
(`ingestd.rules.verdict`), and `anonymize` writes through `ingestd.pipeline.route.deidentify_file`, the daemon's own
path.

`ingestd explain --config FILE BATCH` explains a study already in the spool: the batch (by id, study digest or UID,
`ingestd.admin.batchref`) is read as the router reads it, from the journal's rows (its calling AE title or drop
folder, what the rules see) and the spooled files (`ingestd.deid.stream.open_instance`, one header per series),
with the rules the configuration names (or `--rules`). It only reads: the journal is opened read-only and nothing
is written to the state directory.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from ingestd.config import Archives, Config
from ingestd.deid.engine import Change, DeidError, Labels, anonymize, screen
from ingestd.deid.stream import open_instance
from ingestd.dicomfile import PreparedInstance
from ingestd.journal import BatchInstance, BatchRow, Journal
from ingestd.journal.attachments import attachments_out, set_files
from ingestd.logs import quiet_pydicom, uid_digest
from ingestd.pipeline.attachplan import FileAtHand, StudyAtHand
from ingestd.pipeline.route import deidentify_file, header_facts, path_parts, study_facts
from ingestd.receive.intake import find_sources, read_source, source_name
from ingestd.rules import Held, Routed, RuleSet, StudyFacts, explain_match
from ingestd.rules.verdict import Screened, label_clashes, verdict
from ingestd.states import BatchKind, StudyState

_GONE = (StudyState.DELIVERED, StudyState.RELEASED)

__all__ = [
    "InputFile",
    "Study",
    "anonymize_studies",
    "explain_batches",
    "explain_studies",
    "read_studies",
    "spooled_study",
    "studies_at_hand",
    "study_verdict",
]


@dataclass(frozen=True, slots=True)
class InputFile:
    path: Path  # the instance as the spool would hold it (preamble and file meta completed), in the scratch folder
    relative: str  # its source detail within the folder it was found in: `a/b.dcm`, `a/b.zip!c/d.dcm`
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    upload: str = ""  # the folder given and the upload within it (which non-DICOM files go with the study)


@dataclass(frozen=True, slots=True)
class Study:
    uid: str
    files: tuple[InputFile, ...]
    facts: StudyFacts
    forced_rule: str | None = None  # a spooled batch's rule chosen by a person (`ingestd resend --route`)


def read_studies(
    paths: Sequence[Path],
    scratch: Path,
    *,
    limits: Archives | None = None,
    calling_aet: str | None = None,
    called_aet: str = "INGESTD",
    attachable: Callable[[str], bool] | None = None,
    attachments: list[FileAtHand] | None = None,
) -> tuple[list[Study], list[tuple[str, str]]]:
    """The studies in `paths`, read as the daemon's intake reads them, and what was skipped with the reason.

    Files are found and read by `ingestd.receive.intake`, as `ingestd import` and a drop folder do: hidden and
    partial files passed over, zip and tar archives opened, a missing preamble or file meta completed. Each
    instance is written to `scratch` as the spool would hold it (the study's files point there). Skipped items
    are named by their path (an archive member as `archive!member`). With `attachable`, the non-DICOM files a rule
    attaches are added to `attachments` instead of being skipped.
    """
    limits = limits or Archives()
    files: list[InputFile] = []
    skipped: list[tuple[str, str]] = []
    headers: dict[str, dict[str, str | tuple[str, ...]]] = {}
    roots: dict[str, str] = {}
    sops: set[tuple[str, str]] = set()
    sources = find_sources(paths)

    def found(prepared: PreparedInstance, detail: str, root: Path, upload: str = "") -> None:
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
                upload=upload,
            )
        )
        roots.setdefault(header.study_uid, source_name(str(root)))

    for detail, reason in sources.unreadable:
        skipped.append((detail, reason))
    for file in sources.files:
        root = file.root

        def skip(detail: str, reason: str, *_item: object, root: Path = root) -> None:
            skipped.append((f"{root}/{detail}", reason))

        upload = f"{source_name(str(root))}\n{file.upload}"

        def take(prepared: PreparedInstance, detail: str, root: Path = root, upload: str = upload) -> None:
            found(prepared, detail, root, upload)

        def attach(detail: str, _content: object, root: Path = root, upload: str = upload) -> None:
            if attachments is not None:
                attachments.append(FileAtHand(upload, path_parts(detail), source_name(str(root))))

        read_source(
            file,
            limits,
            found=take,
            refused=skip,
            unreadable=skip,
            attachable=attachable or (lambda _relative: False),
            attached=attach,
        )
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


def studies_at_hand(rules: RuleSet, studies: Sequence[Study]) -> list[StudyAtHand]:
    """The studies as the attachment plan sees them: their instances' uploads and paths, and their verdicts."""
    return [
        StudyAtHand(
            study.uid,
            tuple((item.upload, path_parts(item.relative)) for item in study.files),
            study_verdict(rules, study),
        )
        for study in studies
    ]


def study_verdict(rules: RuleSet, study: Study, *, rule: str | None = None) -> Routed | Held:
    """What the daemon's router would do with the study: `ingestd.rules.verdict` over its files."""
    screened = [Screened(item.series_uid, item.sop_class_uid, item.modality) for item in study.files]
    return verdict(rules, study.facts, screened, rule=rule or study.forced_rule)


def explain_studies(
    rules: RuleSet, studies: Sequence[Study], *, all_instances: bool = False, clashes_between: bool = True
) -> Iterator[str]:
    """Lines for the operator: the rules tried, the decision, the labels, dropped series, and per attribute
    what the profile does to one instance of each kept series (every instance with `all_instances`).

    `clashes_between`: the studies arrive together (files at hand), so an earlier one's session label holds a later
    one routed to the same (`label-taken`); spooled batches are delivered each on its own, and are not compared."""
    verdicts = [(study.uid, study_verdict(rules, study)) for study in studies]
    clashes = label_clashes(verdicts) if clashes_between else {}  # a label an earlier study of the run takes
    for study, (_uid, routed) in zip(studies, verdicts, strict=True):
        yield f"study {study.uid}: {len(study.files)} instance(s) in {len(study.facts.series)} series"
        if study.forced_rule:
            yield f"  rule {study.forced_rule} chosen by hand (ingestd resend --route): its `when` is not asked"
        else:
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


def spooled_study(spool_dir: Path, batch: BatchRow, instances: Sequence[BatchInstance], scratch: Path) -> Study:
    """A spooled batch as the router sees it: the facts from its journal rows (calling AE title and called AE, or
    drop folder and paths) and one header per series read from its spooled file, as `Router._headers` reads it
    (`open_instance`: Pixel Data left on disk, a deflated data set inflated into `scratch`, never the spool).

    Raises OSError when a spooled file cannot be read, DeidError when it cannot be parsed.
    """
    headers: dict[str, dict[str, str | tuple[str, ...]]] = {}
    files: list[InputFile] = []
    for instance in instances:
        path = spool_dir / instance.spool_path
        if instance.series_uid not in headers:
            with open_instance(path, scratch) as opened:
                headers[instance.series_uid] = header_facts(opened.dataset)
        files.append(
            InputFile(
                path=path,
                relative=f"spool/{instance.spool_path}",
                study_uid=batch.study_uid,
                series_uid=instance.series_uid,
                sop_uid=instance.sop_uid,
                sop_class_uid=instance.sop_class_uid,
                modality=instance.modality,
            )
        )
    facts = study_facts(batch.study_uid, list(instances), headers)
    return Study(batch.study_uid, tuple(files), facts, forced_rule=batch.forced_rule)


def _source_text(batch: BatchRow) -> str:
    if batch.source_kind == "dicom":
        return f"over DICOM from {batch.source}"
    return f"from the folder {batch.source}" if batch.source_kind == "folder" else f"from {batch.source_kind}"


def explain_batches(
    config: Config, references: Sequence[str], rules: RuleSet, *, all_instances: bool = False
) -> Iterator[tuple[str, bool]]:
    """`ingestd explain --config FILE BATCH...`: (line, ok) for the spooled batches each reference names (its id,
    study digest or UID): what the rules would do with each now, as the router would do it. Read-only."""
    from ingestd.admin.batchref import find_batches  # noqa: PLC0415 - only for spooled batches

    if not config.journal_path.exists():
        yield f"ingestd: no journal at {config.journal_path}: nothing was received yet", False
        return
    spool_dir = config.state_dir / "spool"
    journal = Journal(config.journal_path, read_only=True)
    try:
        rows = {batch.id: batch for batch in journal.batches()}
        for reference in references:
            found = find_batches(journal, reference, tuple(StudyState))
            if not found:
                yield f"ingestd: no batch is {reference!r} (a batch id, a study digest sha256:... or a UID)", False
                continue
            for batch_id in found:
                yield from _explain_batch(journal, rows[batch_id], spool_dir, rules, all_instances)
    finally:
        journal.close()


def _explain_batch(
    journal: Journal, batch: BatchRow, spool_dir: Path, rules: RuleSet, all_instances: bool
) -> Iterator[tuple[str, bool]]:
    state = f"{batch.state} ({batch.hold_code})" if batch.hold_code else batch.state
    yield (
        f"batch {batch.id}: study {uid_digest(batch.study_uid)} #{batch.batch}, {state}, {batch.instances} "
        f"instance(s) received {_source_text(batch)}",
        True,
    )
    if batch.kind == BatchKind.FILES:
        yield from _explain_set(journal, batch)
        return
    instances = journal.batch_instances(batch.id)
    missing = sum(not (spool_dir / instance.spool_path).is_file() for instance in instances)
    if missing:
        gone = "delivered, and its spooled files removed" if batch.state == StudyState.DELIVERED else "not in the spool"
        yield f"  {missing} of {len(instances)} instance(s) {gone}: nothing to explain", batch.state in _GONE
        return
    with tempfile.TemporaryDirectory(prefix="ingestd-explain-") as scratch:
        try:
            study = spooled_study(spool_dir, batch, instances, Path(scratch))
        except OSError as exc:
            yield f"  a spooled instance cannot be read ({exc.strerror}): {exc.filename}", False
            return
        except DeidError as exc:
            yield f"  held ({exc.code}): {exc.reason}", True
            return
        for line in explain_studies(rules, [study], all_instances=all_instances, clashes_between=False):
            yield line, True


def _explain_set(journal: Journal, batch: BatchRow) -> Iterator[tuple[str, bool]]:
    """An attachment set: its files, and where each goes once routed (paths shown: for the operator only)."""
    out = {item.file_id: item for item in attachments_out(journal, batch.id)}
    route = journal.route(batch.id)
    if route is not None:
        where = f"{route.server} {route.project}/{route.subject}/{route.session}"
        yield f"  routed by rule {route.rule} to {where} ({'archive' if route.archive else 'prearchive'})", True
    else:
        yield "  not routed yet: it follows the route of the study in its upload, or a files-only rule", True
    for file in set_files(journal, batch.id):
        placed = out.get(file.id)
        if placed is None:
            yield f"    {file.relative} ({file.size} bytes)", True
            continue
        scan = f"scan {placed.scan} " if placed.level == "scan" else "subject " if placed.level == "subject" else ""
        seen = "verified in XNAT" if placed.verified_at else "not verified yet"
        yield f"    {file.relative} -> {scan}resource {placed.resource}: {placed.name} ({seen})", True


def run_explain_batches(
    config_file: Path | None,
    references: Sequence[str],
    *,
    default_config: Path,
    rules: Sequence[Path] | None = None,
    calling_aet: str | None = None,
    every: bool = False,
) -> int:
    """`ingestd explain --config FILE BATCH...`: print the explanation (`every`: each instance, not one per series)
    with the configuration's rules or `rules`; 0, 1 when a batch cannot be explained, 2 for a wrong option (raises
    ConfigError for a configuration or rules file that does not load)."""
    from ingestd.config import load_config  # noqa: PLC0415
    from ingestd.rules import load_rules  # noqa: PLC0415

    if calling_aet is not None:
        print(
            "ingestd: --calling-aet is for files; a spooled batch is explained with the source it came from",
            file=sys.stderr,
        )
        return 2
    if config_file is None and any(Path(reference).exists() for reference in references):
        print(
            "ingestd: to explain files give the rules (--rules FILE); to explain a study in the spool, the"
            " configuration (--config FILE) and its batch id, digest or UID",
            file=sys.stderr,
        )
        return 2
    config = load_config(config_file or default_config)
    files = tuple(rules or ()) or config.rules
    if not files:
        print("ingestd: the configuration names no rules files (rules:); give --rules FILE", file=sys.stderr)
        return 1
    quiet_pydicom()
    failed = False
    for line, ok in explain_batches(config, references, load_rules(files), all_instances=every):
        print(line, file=sys.stdout if ok else sys.stderr)
        failed = failed or not ok
    return 1 if failed else 0
