"""Routing: apply the rules to every complete batch and write what will leave, de-identified by its profile.

For each batch in `complete` (oldest first), the router reads one representative header per series, asks the
rules (`ingestd.rules.verdict`, pure: the rule, its labels and the profile's screening; the batch's `forced_rule`,
chosen by `ingestd resend`, whatever its `when` says) for a route, and then
either holds the batch with the reason, or writes its outgoing instances and moves it to `routed` in one journal
transaction:

- without a profile, the outgoing instances are the spooled files themselves;
- with a profile, every kept instance is screened and de-identified (`ingestd.deid`) into
  `outbox/.tmp-<batch>/<new series UID>/<new SOP UID>.dcm`, each file fsync'd; only when all succeeded is the
  folder renamed to `outbox/<batch>` and the route committed. A failure anywhere holds the whole batch and
  removes the partial folder, so no partially de-identified file is ever handed on.

A crash at any point leaves the batch `complete` (the route is committed last); the next run removes the
leftovers and does the same work again, with the same result (the de-identification is deterministic).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ingestd.config import BatchFailures
from ingestd.deid.engine import DeidError, Labels, anonymize, screen
from ingestd.deid.profile import Profile
from ingestd.deid.stream import PIXEL_TAGS, open_instance, write_instance
from ingestd.header import is_valid_uid
from ingestd.journal import BatchInstance, BatchRow, Journal, Outgoing, RouteRecord
from ingestd.logs import path_digest, uid_digest
from ingestd.metrics import stage_seconds
from ingestd.pipeline.runner import BatchWorker
from ingestd.receive.intake import path_parts  # re-exported: where the watcher and the import compute it
from ingestd.rules import Held, Routed, RuleSet, SeriesFacts, StudyFacts, identifying_labels
from ingestd.rules.verdict import Screened, verdict
from ingestd.spool import fsync_dir, make_dirs_durably
from ingestd.states import BatchKind, HoldCode, Stage, StudyState

__all__ = ["Router", "Written", "deidentify_file", "header_facts", "path_parts", "route_record", "study_facts"]

log = structlog.get_logger("ingestd.route")

_SKIPPED_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})


def header_facts(ds: Dataset) -> dict[str, str | tuple[str, ...]]:
    """The top-level standard attributes of a data set as strings (multi-valued ones as tuples), by keyword."""
    facts: dict[str, str | tuple[str, ...]] = {}
    for elem in ds:
        if elem.tag.group % 2 or elem.tag.group == 0x0002 or elem.VR in _SKIPPED_VRS or not elem.keyword:
            continue
        if elem.tag in PIXEL_TAGS:  # left on disk (ingestd.deid.stream), and not a fact
            continue
        value = elem.value
        if isinstance(value, MultiValue | list):
            facts[elem.keyword] = tuple(str(v) for v in value)
        elif value is None:
            facts[elem.keyword] = ""
        elif isinstance(value, bytes):
            continue
        else:
            facts[elem.keyword] = str(value)
    return facts


def route_record(decision: Routed, rules_version: str, study_uid: str) -> RouteRecord:
    """What the journal keeps of a routing decision (`study_uid`: the study's UID as it leaves, or "" for files
    without a study)."""
    return RouteRecord(
        rule=decision.rule,
        rules_version=rules_version,
        server=decision.server,
        project=decision.project,
        subject=decision.subject,
        session=decision.session,
        archive=decision.archive,
        profile=decision.profile,
        study_uid=study_uid,
        dropped=decision.dropped_series,
    )


def study_facts(
    study_uid: str, instances: list[BatchInstance], headers: dict[str, dict[str, str | tuple[str, ...]]]
) -> StudyFacts:
    """What the rules see of a batch: one header per series (`headers` by series UID) and the sources."""
    counts: dict[str, int] = {}
    sop_classes: dict[str, str] = {}
    for instance in instances:
        counts[instance.series_uid] = counts.get(instance.series_uid, 0) + 1
        sop_classes.setdefault(instance.series_uid, instance.sop_class_uid)
    series = tuple(
        SeriesFacts(
            series_uid=uid, instance_count=counts[uid], headers=headers.get(uid, {}), sop_class_uid=sop_classes[uid]
        )
        for uid in counts
    )
    dicom = [i for i in instances if i.source_kind == "dicom"]
    folder = [i for i in instances if i.source_kind == "folder"]
    return StudyFacts(
        study_uid=study_uid,
        series=series,
        calling_aet=dicom[0].source if dicom else None,
        called_aet=dicom[0].source_detail.split("@", 1)[0] if dicom else None,
        drop_folder=folder[0].source if folder else None,
        paths=tuple(sorted({path_parts(i.source_detail) for i in folder})),
    )


@dataclass(frozen=True, slots=True)
class Written:
    """One de-identified instance on disk: its new UIDs and its size in bytes."""

    study_uid: str
    series_uid: str
    sop_uid: str
    size: int


def deidentify_file(path: Path, profile: Profile, labels: Labels, folder: Path) -> Written:
    """Read one instance, screen and de-identify it into `folder/<new SOP Instance UID>.dcm`, fsync'd.

    Pixel Data is never read into memory: it is copied from `path` into the new file in chunks
    (`ingestd.deid.stream`), so memory stays flat on any instance size. The daemon and `ingestd anonymize` both
    go through here. Raises DeidError (held) or OSError; nothing is left in `folder` when it raises.
    """
    with open_instance(path, folder) as instance:
        screen(instance.dataset, profile)
        out = anonymize(instance.dataset, profile, labels)
        uids = [str(out.get(keyword, "")) for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        if not all(is_valid_uid(uid) for uid in uids):
            raise DeidError(
                HoldCode.ENGINE, "the de-identified instance has no valid Study, Series or SOP Instance UID"
            )
        size = write_instance(out, folder / f"{uids[2]}.dcm")
    return Written(uids[0], uids[1], uids[2], size)


# The states whose batches keep their outbox folder when the router starts.
_ROUTE_KEPT = (StudyState.ROUTED, StudyState.HELD, StudyState.RELEASED)


class Router(BatchWorker):
    """A thread that routes complete batches, one at a time, oldest first.

    Each batch is on its own (the runner's loop): an error no code expected (a spool file pydicom cannot read, say)
    is counted against that batch only, which is tried again with back-off and held after `failures.max_attempts`.
    """

    name = "router"
    stage = Stage.ROUTE

    def __init__(
        self,
        journal: Journal,
        rules: RuleSet,
        state_dir: Path,
        interval: float = 1.0,
        failures: BatchFailures | None = None,
    ) -> None:
        super().__init__(journal, interval, failures)
        self.rules = rules
        self.state_dir = state_dir
        self.spool_dir = state_dir / "spool"
        self.outbox = state_dir / "outbox"

    def start(self) -> None:
        self.recover()
        super().start()

    def recover(self) -> None:
        """Remove outbox folders no journal row points at: the leftovers of a batch interrupted mid-way.

        A held or released batch with a route keeps its folder: `ingestd retry --keep-route` (after `ingestd
        unrelease`) delivers it from there; a re-route removes it itself, retention a released batch's."""
        make_dirs_durably(self.outbox)
        routed = {batch_id for state in _ROUTE_KEPT for batch_id in self.journal.routes(state)}
        for entry in self.outbox.iterdir():
            name = entry.name.removeprefix(".tmp-")
            if not (name.isdigit() and int(name) in routed and not entry.name.startswith(".tmp-")):
                shutil.rmtree(entry, ignore_errors=True)
        fsync_dir(self.outbox)

    def due(self, now: float) -> list[BatchRow]:
        batches = sorted(self.journal.batches((StudyState.COMPLETE,)), key=lambda b: b.id)
        # attachment sets (kind `files`) are routed by ingestd.pipeline.attach
        return [batch for batch in batches if batch.retry_at <= now and batch.kind == BatchKind.DICOM]

    def process(self, batch: BatchRow, now: float) -> int:
        self.route(batch)
        return 1

    def failed(self, batch: BatchRow, exc: Exception) -> None:
        shutil.rmtree(self.outbox / f".tmp-{batch.id}", ignore_errors=True)
        super().failed(batch, exc)

    # -- one batch -------------------------------------------------------------------------------------

    def route(self, batch: BatchRow) -> None:
        started = time.monotonic()
        instances = self.journal.batch_instances(batch.id)
        try:
            facts = study_facts(batch.study_uid, instances, self._headers(instances))
        except OSError as exc:
            self._hold(batch, HoldCode.SPOOL, f"{HoldCode.SPOOL}: a spooled instance cannot be read ({exc.strerror})")
            return
        rules = self.rules  # one rules version for the whole batch, even if SIGHUP swaps them meanwhile
        screened = [Screened(i.series_uid, i.sop_class_uid, i.modality) for i in instances]
        # as `explain` and `import --dry-run` predict it; a rule a person chose (`ingestd resend --route`) applies
        # whatever its `when` says
        decision = verdict(rules, facts, screened, rule=batch.forced_rule)
        if isinstance(decision, Held):
            reason = decision.reason
            if batch.forced_rule is not None and decision.code == HoldCode.UNROUTED:
                reason = (
                    f"`ingestd resend` chose rule '{batch.forced_rule}', which the rules in force do not have: add it"
                    " (then `systemctl reload ingestd` and `ingestd retry`), or release this batch and resend the"
                    " delivered one with --route naming an existing rule"
                )
            self._hold(batch, HoldCode(decision.code), f"{decision.code}: {reason}", rule=decision.rule)
            return
        profile = rules.profiles.get(decision.profile) if decision.profile else None
        kept = [i for i in instances if i.series_uid in set(decision.kept_series)]
        try:
            study_uid, outgoing = (
                self._write_outbox(batch, kept, profile, decision)
                if profile is not None
                else (batch.study_uid, [self._as_spooled(i) for i in kept])
            )
        except DeidError as exc:
            self._hold(batch, HoldCode(exc.code), f"{exc.code}: {exc.reason}", rule=decision.rule)
            return
        except OSError as exc:
            shutil.rmtree(self.outbox / f".tmp-{batch.id}", ignore_errors=True)
            reason = f"{HoldCode.OUTBOX}: cannot write the outgoing instances ({exc.strerror})"
            self._hold(batch, HoldCode.OUTBOX, reason, rule=decision.rule)
            return
        record = route_record(decision, rules.version, study_uid)
        if not self.journal.route_batch(batch.id, record, outgoing, time.time()):
            return  # the batch changed state meanwhile (it cannot today; a later `retry` might)
        # labels from raw identifying values, without anonymize
        hidden = identifying_labels(rules, rule=decision.rule, rules_version=rules.version, profile=decision.profile)
        labels = {"project": decision.project, "subject": decision.subject, "session": decision.session}
        shown = {name: path_digest(value) if name in hidden else value for name, value in labels.items()}
        log.info(
            "route.routed",
            batch_id=batch.id,
            study=uid_digest(batch.study_uid),
            rule=decision.rule,
            rules_version=rules.version,
            project=shown["project"],
            subject=shown["subject"],
            session=shown["session"],
            profile=decision.profile,
            instances=len(outgoing),
            dropped_instances=sum(count for _uid, count, _reason in decision.dropped_series),
            seconds=stage_seconds("route", started),
        )

    def _headers(self, instances: Iterable[BatchInstance]) -> dict[str, dict[str, str | tuple[str, ...]]]:
        headers: dict[str, dict[str, str | tuple[str, ...]]] = {}
        for instance in instances:
            if instance.series_uid not in headers:
                # Pixel Data stays on disk; a deflated instance is inflated to disk, never into memory.
                with open_instance(self.spool_dir / instance.spool_path, self.outbox) as opened:
                    headers[instance.series_uid] = header_facts(opened.dataset)
        return headers

    def _as_spooled(self, instance: BatchInstance) -> Outgoing:
        path = self.spool_dir / instance.spool_path
        return Outgoing(
            instance.id, instance.series_uid, instance.sop_uid, f"spool/{instance.spool_path}", path.stat().st_size
        )

    def _write_outbox(
        self, batch: BatchRow, kept: list[BatchInstance], profile: Profile, decision: Routed
    ) -> tuple[str, list[Outgoing]]:
        temp = self.outbox / f".tmp-{batch.id}"
        final = self.outbox / str(batch.id)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        temp.mkdir(parents=True)
        labels = Labels(project=decision.project, subject=decision.subject, session=decision.session)
        outgoing: list[Outgoing] = []
        study_uids: set[str] = set()
        folders: set[Path] = set()
        try:
            for instance in kept:
                self.beat()  # a study of thousands of instances takes minutes, and is not wedged
                written = deidentify_file(self.spool_dir / instance.spool_path, profile, labels, temp)
                series_uid, sop_uid = written.series_uid, written.sop_uid
                study_uids.add(written.study_uid)
                folder = temp / series_uid
                if folder not in folders:
                    folder.mkdir()
                    folders.add(folder)
                (temp / f"{sop_uid}.dcm").rename(folder / f"{sop_uid}.dcm")
                size = written.size
                relative = f"outbox/{batch.id}/{series_uid}/{sop_uid}.dcm"
                outgoing.append(Outgoing(instance.id, series_uid, sop_uid, relative, size))
            for folder in folders:
                fsync_dir(folder)
            fsync_dir(temp)
            os.replace(temp, final)
            fsync_dir(self.outbox)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        if len(study_uids) != 1:
            shutil.rmtree(final, ignore_errors=True)
            raise DeidError(HoldCode.ENGINE, f"the batch's instances left with {len(study_uids)} Study Instance UIDs")
        return study_uids.pop(), outgoing

    def hold(self, batch: BatchRow, code: HoldCode, reason: str) -> None:
        self._hold(batch, code, reason)

    def _hold(self, batch: BatchRow, code: HoldCode, reason: str, rule: str | None = None) -> None:
        if self.journal.hold_batch(batch.id, code, reason, time.time()):
            log.warning(
                "route.held", batch_id=batch.id, study=uid_digest(batch.study_uid), rule=rule, code=code, reason=reason
            )
