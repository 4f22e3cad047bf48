"""Finding the batches a person names: by batch id, by the study digest `ingestd status` shows, or by a Study
Instance UID (the original, or the new one a de-identified study was sent with)."""

from __future__ import annotations

from collections.abc import Iterable

from ingestd.journal import BatchRow, Journal
from ingestd.logs import uid_digest

__all__ = ["find_batches", "matches"]


def matches(batch: BatchRow, reference: str, outgoing_uid: str | None = None) -> bool:
    """Whether `reference` names `batch`: its id (`12` or `#12`), its study's digest (`sha256:...`, as `status`
    shows it), its original Study Instance UID, or the new UID it was sent with (`outgoing_uid`)."""
    reference = reference.strip()
    return reference.removeprefix("#") == str(batch.id) or reference in (
        batch.study_uid,
        uid_digest(batch.study_uid),
        outgoing_uid,
    )


def find_batches(journal: Journal, reference: str | None, states: Iterable[str]) -> list[int]:
    """The ids of the batches in `states` that `reference` names (every one of them when it is None), oldest first."""
    wanted = tuple(states)
    routes = journal.routes()
    return sorted(
        batch.id
        for batch in journal.batches(wanted)
        if reference is None or matches(batch, reference, routes[batch.id].study_uid if batch.id in routes else None)
    )
