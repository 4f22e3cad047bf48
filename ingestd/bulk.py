"""`ingestd import`: folders, files and archives already on disk, taken through the daemon's own path to XNAT.

Every file under the paths given is taken as a drop folder takes it (`ingestd.receive.intake`): one instance, or
every member of a zip or tar, into the spool and the journal, each from
`Source("folder", <the folder given>, <its path within it>)` (`a/b.zip!c/d.dcm` for an archive member), so that the
rules' `drop_folder`, `path` and `{path[N]}` see the layout of the folder tree. A file given on its own counts as
dropped into its folder. The upload of everything under a folder given is `.`, that of a file given alone its name.
Hidden and partial files are passed over (and counted); what is not DICOM but a rule's `attach:` takes is copied
into the attachment spool (`ingestd.attachspool`), a file of its upload's attachment set; what is not DICOM (and not
attached), is corrupt or is a hostile archive is copied to quarantine with its reason. The user's files are never
moved or deleted.

Once everything is spooled, the batches the import touched (the studies' and the attachment sets') are marked
complete at once (nothing waits for `study_idle_seconds`), and the import waits until each is delivered, held or
released (handed over to a person: counted as such, never as delivered, and the exit status is 1 as for a held one):

- without a daemon, the import takes the state directory's lock itself (no daemon starts meanwhile), recovers the
  spool as the daemon does, and runs the router and the deliverer in its own process;
- with a daemon running (it holds the lock), the import only spools and completes its batches, through the journal
  (SQLite serialises the writers), and watches the daemon route and deliver them; should the daemon stop
  meanwhile, the import takes the lock and finishes the work itself.

Running it again on the same files delivers nothing twice: identical bytes are a duplicate in the spool (a no-op)
and in the attachment spool (the same content at the same path of the same upload),
and an instance of an already delivered batch whose spooled copy was removed after delivery is recognised by its
SOP Instance UID and size. Such studies are reported as already delivered. A file already kept in quarantine by an
earlier import (the same content from the same path) is not copied again: it is reported as already quarantined.

`--dry-run` reads and groups the files and prints what the rules would do with each study; it writes nothing.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TextIO

import pydicom
import structlog
from tqdm.contrib.logging import logging_redirect_tqdm

from ingestd.attachspool import AttachmentSpool, Readable
from ingestd.config import Archives, Config
from ingestd.dicomfile import PreparedInstance
from ingestd.errors import SpoolError
from ingestd.importprogress import Recorded
from ingestd.journal import BatchInstance, Journal, Source
from ingestd.logs import hide_member_names, path_digest, uid_digest
from ingestd.pipeline.attachplan import FileAtHand, StudyAtHand, plan_attachments
from ingestd.pipeline.build import Pipeline, build_pipeline, load_rules_for, open_spool, recover_spool
from ingestd.pipeline.route import header_facts, study_facts
from ingestd.progress import Bar, Counts, Lines
from ingestd.quarantined import content_digest
from ingestd.receive.intake import SourceFile, Sources, find_sources, path_parts, read_source, source_name
from ingestd.rules import Held, Routed, RuleSet, StudyFacts
from ingestd.rules.attach import attachable
from ingestd.rules.verdict import Screened, label_clashes, verdict
from ingestd.statedir import StateDirLockedError, lock_state_dir
from ingestd.states import StudyState

__all__ = ["Counts", "SourceFile", "Sources", "find_sources", "run_import"]

log = structlog.get_logger("ingestd.import")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_DONE = frozenset({StudyState.DELIVERED, StudyState.RELEASED})
_WORKER_SECONDS = 0.2  # how often the import's own router and deliverer look for work


# -- taking files ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Problem:
    """A file or archive member not taken: kept in quarantine with its reason, or not readable at all."""

    detail: str
    reason: str
    unreadable: bool = False
    already: bool = False  # kept in quarantine by an earlier import: not copied again


class _Taker:
    """Takes files one at a time: their instances to `instance`, what a rule attaches to `attach`, what is bad to
    `keep` with the reason."""

    def __init__(self, limits: Archives, counts: Counts, rules: RuleSet | None = None) -> None:
        self.limits = limits
        self.counts = counts
        self.rules = rules  # whose `attach:` globs say which files that are not DICOM are attached
        self.problems: list[_Problem] = []

    def attachable(self, relative: str) -> bool:
        return self.rules is not None and attachable(self.rules, relative)

    def take(self, file: SourceFile) -> None:
        root, upload = source_name(str(file.root)), source_name(file.upload)

        def source(detail: str) -> Source:
            return Source("folder", root, detail, upload)

        read_source(
            file,
            self.limits,
            found=lambda prepared, detail: self.instance(prepared, source(detail)),
            refused=lambda detail, reason, name, item: self._reject(source(detail), reason, name, item),
            unreadable=self.unreadable,
            attachable=self.attachable,
            attached=lambda detail, content: self.attach(source(detail), content),
        )
        self.counts.scanned += 1

    def take_all(self, sources: Sources, show: Callable[[Counts], object] = lambda _counts: None) -> None:
        """Take every file found, after noting what could not be read while looking for them."""
        for detail, reason in sources.unreadable:
            self.unreadable(detail, reason)
        for file in sources.files:
            self.take(file)
            show(self.counts)

    def unreadable(self, detail: str, reason: str) -> None:
        detail = source_name(detail)
        self.problems.append(_Problem(detail, reason, unreadable=True))
        self.counts.unreadable += 1
        log.error("import.file_unreadable", file=path_digest(detail), reason=reason)

    def _reject(self, source: Source, reason: str, name: str, item: bytes | Path) -> None:
        kept = self.keep(source, reason, name, item)
        self.problems.append(_Problem(source.detail, reason, already=not kept))
        if kept:
            self.counts.quarantined += 1
        else:
            self.counts.already_quarantined += 1

    def instance(self, prepared: PreparedInstance, source: Source) -> None:
        raise NotImplementedError

    def attach(self, source: Source, content: bytes | Readable) -> None:
        """Keep a file that is not DICOM, which a rule attaches: its bytes, or its open file to read to its end."""
        raise NotImplementedError

    def keep(self, source: Source, reason: str, name: str, item: bytes | Path) -> bool:
        """Keep a rejected file (its path) or archive member (its bytes) aside; False if it was kept before."""
        raise NotImplementedError


class _Importer(_Taker):
    """Spools the files of an import and follows the batches it touched until each is delivered or held."""

    def __init__(
        self, config: Config, journal: Journal, counts: Counts, lock: IO[str] | None, rules: RuleSet | None = None
    ) -> None:
        super().__init__(config.archives, counts, rules)
        self.config = config
        self.journal = journal
        self.lock = lock  # the state directory's lock, when the import holds it (no daemon runs)
        self.spool, self.quarantine = open_spool(config, journal)
        self.attachments = AttachmentSpool(config.state_dir, journal, min_free_bytes=config.spool.min_free_mb * 2**20)
        self.touched: dict[int, str] = {}  # batch id -> its state when the import first touched it (sets too)

    def instance(self, prepared: PreparedInstance, source: Source) -> None:
        header = prepared.header
        known = self.journal.find_instance(header.study_uid, header.sop_uid)
        if (
            known is not None
            and known.batch_state == StudyState.DELIVERED
            and known.size == len(prepared.prefix) + len(prepared.body)
            and not (self.spool.root / known.spool_path).exists()
        ):  # delivered, its spooled copy removed since: the spool cannot compare the bytes any more
            self.counts.known += 1
            self._touch(known.batch_id)
            return
        outcome = self.spool.store(prepared.prefix, prepared.body, header, source)
        if outcome.outcome == "duplicate":
            self.counts.known += 1
        else:
            self.counts.spooled += 1
        self._touch(outcome.batch_id)

    def attach(self, source: Source, content: bytes | Readable) -> None:
        stored = self.attachments.store(content, source, path_parts(source.detail))
        self.counts.attached += 1
        if stored.outcome == "duplicate":
            self.counts.attached_known += 1
        log.info("import.file_attached", file=path_digest(source.detail), outcome=stored.outcome, size=stored.size)
        self._touch(stored.batch_id)

    def _touch(self, batch_id: int) -> None:
        if batch_id not in self.touched:
            self.touched[batch_id] = self.journal.batch_state(batch_id) or StudyState.RECEIVING
            self.counts.studies = len(self.touched)

    def keep(self, source: Source, reason: str, name: str, item: bytes | Path) -> bool:
        try:
            digest = content_digest(item)
            earlier = self.quarantine.kept_before(source, digest)
            if earlier is not None:  # the same file, imported again: its copy is there
                log.info("import.file_already_quarantined", file=path_digest(source.detail), item=earlier.name)
                return False
            if isinstance(item, Path):
                self.quarantine.put_copy(item, reason, source, sha256=digest)
            else:
                self.quarantine.put_bytes(name, item, reason, source)
        except OSError as exc:
            raise SpoolError(f"cannot write to the quarantine ({exc.strerror or exc})") from None
        log.warning("import.file_quarantined", file=path_digest(source.detail), reason=hide_member_names(reason))
        return True

    def complete(self) -> None:
        """Move the touched batches still receiving to complete, at once."""
        for _attempt in range(20):  # an instance arriving meanwhile (from a scanner) moves last_received on
            receiving = [b for b in self.journal.batches((StudyState.RECEIVING,)) if b.id in self.touched]
            if not receiving:
                return
            for batch in receiving:
                self.journal.complete_batch(batch.id, batch.last_received, time.time())
        log.warning("import.batches_receiving", detail="instances keep arriving for them: the assembler decides")

    def finished(self) -> bool:
        """Update the counts from the journal; say whether every touched batch is delivered, released or held."""
        return self.counts.tally(self.journal.batch_state(batch_id) for batch_id in self.touched)

    def wait(self, rules: RuleSet, progress: Recorded, poll: float) -> None:
        """Wait until every touched batch is finished, routing and delivering them here unless a daemon does.

        Should the daemon stop meanwhile, the import takes the state directory's lock and does the rest itself.
        """
        pipeline: Pipeline | None = None
        try:
            if self.lock is not None:
                pipeline = self._start_pipeline(rules)
            while not self.finished():
                progress.show(self.counts)
                if self.lock is None:
                    self.lock = _try_lock(self.config)
                    if self.lock is not None:
                        log.warning("import.daemon_stopped", detail="the import routes and delivers the rest itself")
                        pipeline = self._start_pipeline(rules)
                time.sleep(poll)
        finally:
            if pipeline is not None:
                pipeline.stop()

    def close(self) -> None:
        self.journal.close()
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def _start_pipeline(self, rules: RuleSet) -> Pipeline:
        """The router and the deliverer, started (the import completes its batches itself: no assembler)."""
        pipeline = build_pipeline(self.journal, self.config, rules, assemble=False, interval=_WORKER_SECONDS)
        try:
            pipeline.start()
        except BaseException:
            pipeline.stop()
            raise
        return pipeline

    def summary(self) -> Iterator[str]:
        """The table of the touched batches: study digest, state, instances, XNAT labels, URI or held reason."""
        routes, deliveries = self.journal.routes(), self.journal.deliveries()
        rows: list[tuple[str, ...]] = []
        for batch in sorted((b for b in self.journal.batches() if b.id in self.touched), key=lambda b: b.id):
            route, delivery = routes.get(batch.id), deliveries.get(batch.id)
            before = self.touched[batch.id]
            state = f"already {before}" if before in _DONE and batch.state == before else batch.state
            uri = ""
            if delivery is not None:
                uri = delivery.archive_uri or (f"/data{delivery.prearchive_url}" if delivery.prearchive_url else "")
            labels = f"{route.project}/{route.subject}/{route.session}" if route else "-"
            result = (batch.reason or "") if batch.state == StudyState.HELD else str(uri)
            rows.append((f"{uid_digest(batch.study_uid)}#{batch.batch}", state, str(batch.instances), labels, result))
        yield from _table(("STUDY", "STATE", "INSTANCES", "XNAT", "URI OR REASON"), rows)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> Iterator[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        yield "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()


def _totals(totals: str, problems: list[_Problem], *, show_paths: bool, kept: str) -> Iterator[str]:
    """The totals line, then a line per file or member not taken (by a digest of its path unless `show_paths`)."""
    yield totals
    for problem in problems:
        name, reason = (
            (problem.detail, problem.reason)
            if show_paths
            else (path_digest(problem.detail), hide_member_names(problem.reason))
        )
        what = "unreadable" if problem.unreadable else "already quarantined" if problem.already else kept
        yield f"  {what}: {name}: {reason}"
    if problems and not show_paths:
        yield "  (files are named by a digest of their path; --show-paths names them)"


def _try_lock(config: Config) -> IO[str] | None:
    try:
        return lock_state_dir(config.state_dir)
    except StateDirLockedError:
        return None


# -- dry run -----------------------------------------------------------------------------------------


@dataclass
class _Study:
    instances: list[BatchInstance] = field(default_factory=list)
    headers: dict[str, dict[str, str | tuple[str, ...]]] = field(default_factory=dict)
    sops: set[str] = field(default_factory=set)
    uploads: set[tuple[str, str]] = field(default_factory=set)  # (upload, path below the folder) of its instances


class _Survey(_Taker):
    """Reads the files of a dry run into studies, as the journal would hold them; keeps nothing."""

    def __init__(self, limits: Archives, counts: Counts, rules: RuleSet | None = None) -> None:
        super().__init__(limits, counts, rules)
        self.studies: dict[str, _Study] = {}
        self.attached: list[str] = []  # the source details of the files a rule would attach
        self.attached_files: list[FileAtHand] = []  # and each as the set router would see it
        self.verdicts: dict[str, Routed | Held] = {}  # what the router would do with each study (`decisions`)

    def instance(self, prepared: PreparedInstance, source: Source) -> None:
        header = prepared.header
        study = self.studies.setdefault(header.study_uid, _Study())
        if header.sop_uid in study.sops:
            self.counts.known += 1
            return
        study.sops.add(header.sop_uid)
        study.uploads.add((_upload_key(source), path_parts(source.detail)))
        self.counts.spooled += 1
        if header.series_uid not in study.headers:  # one header per series, as the router reads them
            data = pydicom.dcmread(io.BytesIO(prepared.prefix + prepared.body), stop_before_pixels=True)
            study.headers[header.series_uid] = header_facts(data)
        study.instances.append(
            BatchInstance(
                id=len(study.instances),
                series_uid=header.series_uid,
                sop_uid=header.sop_uid,
                sop_class_uid=header.sop_class_uid,
                modality=header.modality,
                source_kind=source.kind,
                source=source.name,
                source_detail=source.detail,
                spool_path="",
            )
        )

    def keep(self, source: Source, reason: str, name: str, item: bytes | Path) -> bool:
        return True  # a dry run keeps nothing: it says what would be kept

    def attach(self, source: Source, content: bytes | Readable) -> None:
        self.attached.append(source.detail)  # a dry run reads no further: it says what would be attached
        self.attached_files.append(FileAtHand(_upload_key(source), path_parts(source.detail), source.name))

    def decisions(self, rules: RuleSet) -> Iterator[tuple[str, bool]]:
        """A line per study saying what the rules would do, and whether it would be held."""
        verdicts: list[tuple[str, Routed | Held]] = []
        facts: dict[str, StudyFacts] = {}
        for uid, study in self.studies.items():
            facts[uid] = study_facts(uid, study.instances, study.headers)
            screened = [Screened(i.series_uid, i.sop_class_uid, i.modality) for i in study.instances]
            verdicts.append((uid, verdict(rules, facts[uid], screened)))  # as the router decides it
        clashes = label_clashes(verdicts)
        for uid, routed in verdicts:
            study, decision = self.studies[uid], clashes.get(uid, routed)
            self.verdicts[uid] = decision
            what = f"{uid_digest(uid)}: {len(study.instances)} instance(s) in {len(facts[uid].series)} series"
            if isinstance(decision, Held):
                yield f"{what}: would be held ({decision.code}): {decision.reason}", True
                continue
            dropped = sum(count for _uid, count, _reason in decision.dropped_series)
            how = [
                "archived" if decision.archive else "left in the prearchive",
                f"de-identified by profile {decision.profile}" if decision.profile else "not de-identified",
                *([f"{dropped} instance(s) dropped"] if dropped else []),
            ]
            yield (
                f"{what}: rule {decision.rule} would deliver to {decision.server} "
                f"{decision.project}/{decision.subject}/{decision.session} ({', '.join(how)})",
                False,
            )


def _upload_key(source: Source) -> str:
    """The upload as the journal tells them apart: the folder given and the upload within it."""
    return f"{source.name}\n{source.upload}"


def _dry_run(rules: RuleSet, sources: Sources, limits: Archives, out: TextIO, *, show_paths: bool) -> int:
    counts = Counts(files=len(sources.files), passed_over=sources.passed_over)
    survey = _Survey(limits, counts, rules)
    survey.take_all(sources)
    held = 0
    for line, would_hold in survey.decisions(rules):
        held += would_hold
        print(line, file=out)
    studies = [StudyAtHand(uid, tuple(study.uploads), survey.verdicts[uid]) for uid, study in survey.studies.items()]
    for line, would_hold in plan_attachments(rules, survey.attached_files, studies, show_paths=show_paths):
        held += would_hold
        print(line, file=out)
    totals = (
        f"dry run: {counts.scanned} files, {counts.spooled} instances in {len(survey.studies)} studies"
        f" ({held} would be held), {len(survey.attached)} files to attach, {counts.quarantined} would be"
        f" quarantined, {counts.unreadable} unreadable;"
        " nothing was written or sent"
    )
    for line in _totals(totals, survey.problems, show_paths=show_paths, kept="would be quarantined"):
        print(line, file=out)
    return EXIT_FAILED if held or counts.unreadable or not (survey.studies or survey.attached) else EXIT_OK


# -- the command -------------------------------------------------------------------------------------


def _usage(message: str) -> int:
    print(f"ingestd import: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_import(
    config: Config,
    paths: Sequence[Path],
    *,
    rules_files: Sequence[Path] = (),
    dry_run: bool = False,
    show_paths: bool = False,
    config_name: str = "FILE",
    out: TextIO | None = None,
    poll_seconds: float = 0.25,
) -> int:
    """Import `paths`; return the exit status: 0 all delivered, 1 any held (or unreadable), 2 usage or configuration.

    Raises ConfigError for bad rules (the command prints every problem and exits 2).
    """
    out = out or sys.stdout
    missing = [path for path in paths if not path.exists()]
    if missing:
        return _usage(f"no such file or folder: {missing[0]}")
    rules = load_rules_for(config.model_copy(update={"rules": tuple(rules_files)}) if rules_files else config)
    if rules is None:
        return _usage("no rules: give --rules FILE, or list rules files under `rules:` in the configuration")
    if not (dry_run or config.xnat.servers):
        return _usage("no XNAT server under xnat.servers in the configuration: there is nowhere to deliver to")
    lock = None if dry_run else _try_lock(config)
    configured = load_rules_for(config) if rules_files and not dry_run and lock is None else rules
    if configured is None or configured.version != rules.version:
        return _usage(
            f"a daemon runs on {config.state_dir} and routes by the rules of its configuration: "
            "import without --rules, or stop the daemon first"
        )
    importer = None
    try:
        started = time.monotonic()
        sources = find_sources(paths)
        log.info(
            "import.started",
            paths=len(paths),
            files=len(sources.files),
            passed_over=sources.passed_over,
            dry_run=dry_run,
            daemon_running=None if dry_run else lock is None,
        )
        if dry_run:
            status = _dry_run(rules, sources, config.archives, out, show_paths=show_paths)
            log.info("import.finished", dry_run=True, exit_status=status, seconds=round(time.monotonic() - started, 3))
            return status
        print(
            f"import: {len(sources.files)} files under {len(paths)} path(s); "
            + (
                "a daemon runs: it routes and delivers"
                if lock is None
                else "no daemon runs: routing and delivering here"
            ),
            file=out,
            flush=True,
        )
        counts = Counts(files=len(sources.files), passed_over=sources.passed_over)
        importer, lock = _Importer(config, Journal(config.journal_path), counts, lock, rules), None
        status = _run(importer, rules, sources, out, show_paths, config_name, poll_seconds)
    finally:
        if importer is not None:
            importer.close()
        if lock is not None:
            lock.close()
    log.info(
        "import.finished",
        dry_run=False,
        exit_status=status,
        seconds=round(time.monotonic() - started, 3),
        files=counts.files,
        instances_spooled=counts.spooled,
        instances_known=counts.known,
        files_attached=counts.attached,
        quarantined=counts.quarantined,
        already_quarantined=counts.already_quarantined,
        unreadable=counts.unreadable,
        studies=counts.studies,
        delivered=counts.delivered,
        held=counts.held,
        released=counts.released,
    )
    return status


def _run(
    importer: _Importer, rules: RuleSet, sources: Sources, out: TextIO, show_paths: bool, config_name: str, poll: float
) -> int:
    """Spool, complete, wait, print the summary; return the exit status."""
    config, counts = importer.config, importer.counts
    shown = Bar(out) if out.isatty() else Lines(out)
    progress = Recorded(shown, config.state_dir, counts)  # also where the daemon's web page reads it
    try:
        with progress, logging_redirect_tqdm() if isinstance(shown, Bar) else contextlib.nullcontext():
            if importer.lock is not None:  # no receiver of an earlier daemon may still be writing: recover_spool waits
                recover_spool(config, importer.spool, importer.quarantine)
                importer.attachments.recover()
            importer.take_all(sources, progress.show)
            importer.complete()
            counts.delivering = True
            importer.finished()
            log.info(
                "import.spooled",
                files=counts.scanned,
                instances_spooled=counts.spooled,
                instances_known=counts.known,
                files_attached=counts.attached,
                quarantined=counts.quarantined,
                unreadable=counts.unreadable,
                studies=counts.studies,
            )
            importer.wait(rules, progress, poll)
            importer.finished()
            progress.close(counts)
    except SpoolError as exc:
        progress.close(counts)
        print(
            f"ingestd import: the spool refused an instance or an attached file ({exc}); nothing more was taken."
            " What was spooled waits in the journal: run the import again once the spool has room",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:
        progress.close(counts)
        print(
            "\ningestd import: interrupted. What was spooled stays in the journal: the daemon, or the import run"
            " again, finishes it",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    released = f", {counts.released} released" if counts.released else ""
    print(
        f"\n{counts.studies} stud{'y' if counts.studies == 1 else 'ies'}: {counts.delivered} delivered,"
        f" {counts.held} held{released}",
        file=out,
    )
    for line in importer.summary():
        print(line, file=out)
    totals = (
        f"{counts.scanned} files: {counts.spooled} instances spooled, {counts.known} already known, "
        + (f"{counts.attached} attached ({counts.attached_known} already kept), " if counts.attached else "")
        + f"{counts.quarantined} quarantined, {counts.already_quarantined} already quarantined, "
        f"{counts.unreadable} unreadable, {counts.passed_over} passed over"
        " (hidden, partial or links)"
    )
    for line in _totals(totals, importer.problems, show_paths=show_paths, kept="quarantined"):
        print(line, file=out)
    if counts.quarantined or counts.already_quarantined:
        print(f"  {config.quarantine_dir} keeps each quarantined item beside a .reason.json naming its path", file=out)
    if counts.held:
        print(
            f"held studies wait for a person: fix the cause, then `ingestd retry --config {config_name} STUDY`"
            " (STUDY as above, without #batch), or `ingestd release`",
            file=out,
        )
    if counts.released:
        print(
            "released studies were handed over to a person (`ingestd release`): ingestd did not deliver them and"
            " will not; `ingestd status` lists them",
            file=out,
        )
    if not importer.touched:
        print("ingestd import: no DICOM instance found", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if counts.succeeded else EXIT_FAILED
