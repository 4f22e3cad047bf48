"""What the quarantine holds, by content and source: so that the same bad file is kept once, not once per import.

Each item kept in quarantine is recorded in the journal's `quarantine` table with its source (kind, name and the
path within it) and, for copies and archive members, the SHA-256 of its content. `ingestd import` run again on
the same folder meets the same `notes.txt`: `kept_before` finds the earlier copy (still there, not purged by
retention), and the import reports it as already quarantined instead of copying it again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ingestd.journal import Journal, Source, Tx

__all__ = ["content_digest", "kept_before", "record"]

_CHUNK = 1 << 20


def content_digest(item: bytes | Path) -> str:
    """The SHA-256 (hex) of a file's content (read in pieces) or of bytes."""
    if isinstance(item, bytes):
        return hashlib.sha256(item).hexdigest()
    digest = hashlib.sha256()
    with item.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record(tx: Tx, name: str, reason: str, source: Source, sha256: str | None, now: float) -> None:
    """Journal the item `name` kept in quarantine: why, from where, and its content's digest (None: a moved file)."""
    tx.execute(
        "INSERT INTO quarantine (path, reason, source_kind, source, source_detail, sha256, at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (name, reason, source.kind, source.name, source.detail, sha256, now),
    )


def kept_before(journal: Journal, root: Path, source: Source, sha256: str) -> str | None:
    """The name of an item kept earlier from the same source with the same content and still in `root`, or None."""
    with journal.transaction() as tx:  # short; the journal offers no read of these columns
        rows = tx.execute(
            "SELECT path FROM quarantine WHERE sha256 = ? AND source_kind = ? AND source = ? AND source_detail = ?"
            " AND purged_at IS NULL ORDER BY id DESC",
            (sha256, source.kind, source.name, source.detail),
        ).fetchall()
    return next((str(row[0]) for row in rows if (root / str(row[0])).is_file()), None)
