"""Assembly: decide when a batch of a study is complete, and mark it so in the journal.

C-STORE carries no "study done" signal, so completion is a policy: quiet for `study_idle_seconds` since
the last instance, or waiting longer than `study_max_wait_seconds` since the first. The decision is a pure
function of the batch's times and `now`; the `Assembler` around it is the only part that touches the journal,
and runs in the loop every stage shares (`ingestd.pipeline.runner`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import structlog

from ingestd.config import BatchFailures
from ingestd.journal import BatchRow, Journal
from ingestd.logs import uid_digest
from ingestd.pipeline.runner import BatchWorker
from ingestd.states import HoldCode, Stage, StudyState

__all__ = ["Assembler", "CompletionPolicy", "is_complete"]

log = structlog.get_logger("ingestd.assemble")


@dataclass(frozen=True, slots=True)
class CompletionPolicy:
    idle_seconds: float
    max_wait_seconds: float


def is_complete(first_received: float, last_received: float, now: float, policy: CompletionPolicy) -> bool:
    """Say whether a batch first seen at `first_received` and last fed at `last_received` is complete."""
    return now - last_received >= policy.idle_seconds or now - first_received >= policy.max_wait_seconds


class Assembler(BatchWorker):
    """A thread that moves quiet batches from `receiving` to `complete`."""

    name = "assembler"
    stage = Stage.ASSEMBLE

    def __init__(
        self,
        journal: Journal,
        policy: CompletionPolicy,
        interval: float = 1.0,
        failures: BatchFailures | None = None,
    ) -> None:
        super().__init__(journal, interval, failures)
        self.policy = policy

    def due(self, now: float) -> Iterator[BatchRow]:
        for batch in self.journal.batches((StudyState.RECEIVING,)):
            if batch.retry_at <= now and is_complete(batch.first_received, batch.last_received, now, self.policy):
                yield batch

    def process(self, batch: BatchRow, now: float) -> int:
        if not self.journal.complete_batch(batch.id, batch.last_received, now):
            return 0  # an instance arrived meanwhile
        log.info(
            "assemble.study_complete",
            batch_id=batch.id,
            study=uid_digest(batch.study_uid),
            batch_number=batch.batch,
            series=batch.series,
            instances=batch.instances,
            forced=now - batch.last_received < self.policy.idle_seconds,
        )
        return 1

    def hold(self, batch: BatchRow, code: HoldCode, reason: str) -> None:
        if self.journal.hold_batch(batch.id, code, reason, time.time(), from_state=StudyState.RECEIVING):
            log.warning("assemble.held", batch_id=batch.id, study=uid_digest(batch.study_uid), reason=reason)
