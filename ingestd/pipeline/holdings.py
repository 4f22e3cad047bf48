"""What XNAT holds for a batch, as the delivery's `verify` step sees it: one look, instance by instance.

The archive's DICOM catalogs carry each file's SOP Instance UID; the prearchive exposes file names, which ingestd
makes `<SOP Instance UID>.dcm` and XNAT keeps (docs/delivery.md). Counts are never evidence: another batch of the
same study can satisfy a count. An experiment under the batch's labels that is another study's holds the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ingestd.config import XnatServer
from ingestd.journal import Delivery, Outgoing, Route
from ingestd.states import HoldCode
from ingestd.xnat import Holdings, PrearchiveRow, XnatClient

__all__ = ["BROKEN", "LABEL_TAKEN_ADVICE", "READY", "HoldError", "Job", "Look", "check_same_study", "look_at"]


class HoldError(Exception):
    """The batch cannot go on without a person: held with this code and reason."""

    def __init__(self, code: HoldCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


READY = "READY"
BROKEN = frozenset({"CONFLICT", "ERROR"})


@dataclass(frozen=True, slots=True)
class Job:
    """One batch's delivery as a step sees it: the route, the journal row, the server and its client."""

    batch_id: int
    route: Route
    delivery: Delivery
    server: XnatServer
    client: XnatClient

    @property
    def project(self) -> str:
        return self.route.project

    @property
    def subject(self) -> str:
        return self.route.subject

    @property
    def session(self) -> str:
        return self.route.session

    @property
    def study_uid(self) -> str:
        return self.route.study_uid

    @property
    def archives(self) -> bool:
        return self.route.archive


@dataclass(frozen=True, slots=True)
class Look:
    """One look at XNAT for a batch: its prearchive sessions (same project, Study Instance UID and label) with
    the files of the built ones (READY, CONFLICT, ERROR), and what its archived experiment holds."""

    rows: tuple[PrearchiveRow, ...]
    built: Mapping[str, Holdings]  # row url -> its files
    archived: Holdings

    def place(self, sop_uid: str) -> str | None:
        """`archive`, `prearchive` (a READY session of ours), `broken` (one XNAT set to CONFLICT or ERROR), None."""
        if self.archived.holds(sop_uid):
            return "archive"
        found = {row.status for row in self.rows if self.built.get(row.url, Holdings()).holds(sop_uid)}
        if READY in found:
            return "prearchive"
        return "broken" if found else None


# What a `label-taken` hold asks of a person: `ingestd retry` routes the study again with the rules as they are
# then, so a fixed template gives it a label of its own (a batch that already sent something keeps its route, and
# `retry` says what to remove in XNAT first).
LABEL_TAKEN_ADVICE = (
    "Give each study its own session label: fix the rule's route.session template (`ingestd explain` shows the"
    " labels it makes), then run `ingestd retry` on this study, which routes it again with the rules as they are then"
    " (if part of it may be in XNAT already, retry says what to delete there first)"
)


def check_same_study(experiment: Mapping[str, Any], job: Job) -> None:
    """Hold the batch if XNAT's experiment of its labels is another study's (by Study Instance UID)."""
    existing = str(experiment.get("data_fields", {}).get("UID", ""))
    if existing and existing != job.study_uid:
        raise HoldError(
            HoldCode.LABEL_TAKEN,
            f"XNAT already has {job.project}/{job.subject}/{job.session} for another study. {LABEL_TAKEN_ADVICE}",
        )


def look_at(job: Job, outgoing: Sequence[Outgoing]) -> Look:
    """Look at what XNAT holds for the batch: its sessions in the prearchive, and its archived experiment; the
    files of built prearchive sessions only when the archive lacks some of the outgoing instances."""
    rows = tuple(
        row
        for row in job.client.prearchive(job.project)
        # A site admin's listing of a project also shows Unassigned sessions (docs/xnat.md): only the project's.
        if row.project == job.project and row.study_uid == job.study_uid and row.name == job.session
    )
    experiment = job.client.experiment(job.project, job.subject, job.session)
    archived = Holdings()
    if experiment is not None:
        check_same_study(experiment, job)
        archived = job.client.archive_holdings(experiment)
    built: dict[str, Holdings] = {}
    if not all(archived.holds(item.sop_uid) for item in outgoing):  # the prearchive only matters then
        for row in rows:
            if row.status == READY or row.status in BROKEN:
                holdings = job.client.prearchive_holdings(row.url)  # None: never built (an ERROR row, say)
                if holdings is not None:
                    built[row.url] = holdings
    return Look(rows, built, archived)
