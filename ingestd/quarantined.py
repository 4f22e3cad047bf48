"""What the quarantine holds, by content and source: so that the same bad file is kept once, not once per import.

Each item kept in quarantine is recorded in the journal's `quarantine` table with its source (kind, name and the
path within it) and, for copies and archive members, the SHA-256 of its content. `ingestd import` run again on
the same folder meets the same `notes.txt`: `kept_before` finds the earlier copy (still there, not purged by
retention), and the import reports it as already quarantined instead of copying it again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ingestd.durable import file_digest
from ingestd.journal import Journal, Source

__all__ = ["content_digest", "kept_before"]


def content_digest(item: bytes | Path) -> str:
    """The SHA-256 (hex) of bytes, or of a file's content (read in pieces)."""
    return hashlib.sha256(item).hexdigest() if isinstance(item, bytes) else file_digest(item)


def kept_before(journal: Journal, root: Path, source: Source, sha256: str) -> str | None:
    """The name of an item kept earlier from the same source with the same content and still in `root`, or None."""
    return next((name for name in journal.quarantined_copies(source, sha256) if (root / name).is_file()), None)
