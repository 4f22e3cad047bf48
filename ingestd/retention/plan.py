"""What retention would remove, decided from the journal's rows and `now` alone (no file system, no clock).

The rules (`retention:` in the configuration; `None` days: kept for ever):

- a **delivered** batch, `delivered_days` after its delivery: the copies `delivery.keep_after_delivery` kept (its
  spooled files, its outbox folder, its package zip) and the copies of its instances kept aside in `superseded/`;
  a delivered attachment set (a batch of kind `files`): its files' copies under `attachments/`;
- a **released** batch, `released_days` after a person released it: the same files (a held batch may have been
  routed and packaged before it was released); a released attachment set: its files' copies under `attachments/`
  (the rows of its files stay, as the instances' rows do);
- a **quarantined** item, `quarantine_days` after it was quarantined: the item and its reason sidecar (the row
  stays, with `purged_at`);
- the journal's **receipts** of a delivered batch, `receipts_days` after its delivery, and its **outgoing** rows (the
  instances as they were sent) with them. The batch, its route, its delivery and its instances' rows stay: they are
  the record of what was received and where it went.

Nothing of a batch in any other state (receiving, complete, routed, held) is ever named, and no path that a batch
not being purged still refers to (a later batch of the same study has its own paths; this is a second guard).
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Iterable, Set
from dataclasses import dataclass, field

from ingestd.config import Retention
from ingestd.states import StudyState

__all__ = [
    "BATCH_KINDS",
    "DAY",
    "KINDS",
    "BatchFacts",
    "BatchPaths",
    "BatchRemoval",
    "QuarantineFacts",
    "batch_kind",
    "batch_removal",
    "due_batches",
    "due_quarantine",
    "is_due",
    "receipt_batches",
    "safe_relative",
]

DAY = 86400.0
BATCH_KINDS = {StudyState.DELIVERED: "delivered", StudyState.RELEASED: "released"}
# What retention removes, by kind (the metrics' `kind` label, `ingestd purge`'s lines, `status`'s `would_purge`).
KINDS = ("delivered", "released", "quarantine", "receipts", "outgoing")
# The state directory's folders retention may remove from (a journal path elsewhere is never followed).
_ROOTS = ("spool", "outbox", "packages", "superseded", "attachments")
# Roots whose hidden entries (`spool/.tmp`, `attachments/.tmp`) are the writer's own temporary files: never named.
_OWN_TEMP = ("spool", "attachments")


@dataclass(frozen=True, slots=True)
class BatchFacts:
    """What retention needs of a batch's row."""

    id: int
    state: str
    state_changed: float  # when it was delivered or released (for a batch in one of those states)
    purged_at: float | None


@dataclass(frozen=True, slots=True)
class QuarantineFacts:
    id: int
    path: str  # the item's name in the quarantine folder
    at: float
    purged_at: float | None


@dataclass(frozen=True, slots=True)
class BatchPaths:
    """Every path the journal knows for a batch, relative to the state directory."""

    spool: tuple[str, ...] = ()  # `spool/<study>/<batch>/<series>/<sop>.dcm`
    outgoing: tuple[str, ...] = ()  # `outbox/<batch id>/...`
    superseded: tuple[str, ...] = ()  # `superseded/...`
    zip_path: str | None = None  # the delivery's package, when one was written
    attachments: tuple[str, ...] = ()  # an attachment set's files: `attachments/<random>`


@dataclass(frozen=True, slots=True)
class BatchRemoval:
    """What goes of one batch: files, whole folders, and the folders to remove once empty (deepest first)."""

    batch_id: int
    kind: str
    files: tuple[str, ...]
    trees: tuple[str, ...]
    prune: tuple[str, ...] = field(default=())


def is_due(days: float | None, since: float, now: float) -> bool:
    """Whether something dated `since` is `days` old at `now` (never when `days` is None: kept for ever)."""
    return days is not None and since + days * DAY <= now


def batch_kind(batch: BatchFacts, retention: Retention, now: float) -> str | None:
    """`delivered` or `released` when the batch's files are due to go at `now`; None otherwise (any other state,
    too young, already purged)."""
    if batch.purged_at is not None:
        return None
    if batch.state == StudyState.DELIVERED and is_due(retention.delivered_days, batch.state_changed, now):
        return "delivered"
    if batch.state == StudyState.RELEASED and is_due(retention.released_days, batch.state_changed, now):
        return "released"
    return None


def due_batches(batches: Iterable[BatchFacts], retention: Retention, now: float) -> list[tuple[BatchFacts, str]]:
    """The batches whose files are due to go, oldest first, each with its kind."""
    due = [(batch, kind) for batch in batches if (kind := batch_kind(batch, retention, now)) is not None]
    return sorted(due, key=lambda item: (item[0].state_changed, item[0].id))


def receipt_batches(batches: Iterable[BatchFacts], retention: Retention, now: float) -> list[int]:
    """The delivered batches whose receipts (and outgoing rows) are due to go, by id."""
    return sorted(
        batch.id
        for batch in batches
        if batch.state == StudyState.DELIVERED and is_due(retention.receipts_days, batch.state_changed, now)
    )


def due_quarantine(items: Iterable[QuarantineFacts], retention: Retention, now: float) -> list[QuarantineFacts]:
    """The quarantined items due to go (not purged yet, `quarantine_days` old), oldest first; an item whose name is
    not a plain name in the quarantine folder is never named."""
    due = [
        item
        for item in items
        if item.purged_at is None
        and is_due(retention.quarantine_days, item.at, now)
        and safe_relative(item.path, roots=()) == item.path
        and "/" not in item.path
    ]
    return sorted(due, key=lambda item: (item.at, item.id))


def safe_relative(path: str | None, roots: tuple[str, ...] = _ROOTS) -> str | None:
    """`path` when it is a normalized relative path inside one of `roots` (or any, when `roots` is empty) and not
    a root itself; None otherwise (absolute, `..`, elsewhere)."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        return None
    normal = posixpath.normpath(path)
    if normal != path or normal.startswith(".."):
        return None
    head, _, rest = normal.partition("/")
    if roots and (head not in roots or not rest):
        return None
    if roots and head in _OWN_TEMP and rest.startswith("."):  # the spool's (intake's) temp folder is its own
        return None
    return normal


def protected_outboxes(protected: Set[str]) -> frozenset[str]:
    """The names of the outbox folders (batch ids) holding a protected path: computed once per set of protected
    paths, not once per batch (a pass over 2,000 due batches and 22,000 protected paths compared 44 M strings)."""
    return _outboxes(protected if isinstance(protected, frozenset) else frozenset(protected))


@functools.lru_cache(maxsize=4)
def _outboxes(protected: frozenset[str]) -> frozenset[str]:
    return frozenset(path.split("/", 2)[1] for path in protected if path.startswith("outbox/") and path.count("/") >= 2)


def batch_removal(batch_id: int, kind: str, paths: BatchPaths, protected: Set[str]) -> BatchRemoval:
    """What goes of a due batch: its spooled files (an attachment set's files), superseded copies and package files,
    and its outbox folder whole; never a path in `protected` (one that a batch not being purged refers to), and the
    outbox folder file by file when a protected path is inside it."""
    outbox = f"outbox/{batch_id}"
    shared_outbox = str(batch_id) in protected_outboxes(protected)
    candidates = [
        *paths.spool,
        *paths.attachments,
        *paths.superseded,
        *(paths.outgoing if shared_outbox else ()),
        f"packages/{batch_id}.zip",
        f"packages/.tmp-{batch_id}.zip",
        *((paths.zip_path,) if paths.zip_path else ()),
    ]
    files = sorted({safe for path in candidates if (safe := safe_relative(path)) is not None} - protected)
    trees = () if shared_outbox else (outbox,)
    prune = {parent for path in files if path.startswith(("spool/", "superseded/")) for parent in _parents(path)}
    return BatchRemoval(batch_id, kind, tuple(files), trees, tuple(sorted(prune, key=lambda p: (-p.count("/"), p))))


def _parents(path: str) -> list[str]:
    """The folders between a file and its root folder (`spool`, `superseded`), the root excluded."""
    parents = []
    parent = posixpath.dirname(path)
    while "/" in parent:
        parents.append(parent)
        parent = posixpath.dirname(parent)
    return parents
