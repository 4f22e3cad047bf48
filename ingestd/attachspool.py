"""The attachment spool: non-DICOM files a rule's `attach:` takes, each kept as a durable copy, then journaled.

A file is copied into `<state_dir>/attachments/.tmp/<random>.part` a piece at a time (never held in memory whole,
whatever its size), its MD5 (what XNAT's file listing gives as `digest`) and SHA-256 computed on the way; the copy
is fsync'd, renamed to `attachments/<random>`, the folder fsync'd, and only then is it journaled as a file of its
upload's attachment set (`ingestd.journal.attachments.store_file`). Only when that returns may the caller remove
the file it came from. A copy the journal calls a duplicate (the same content at the same path of the same upload)
is removed again at once; one that replaces an earlier copy (other content at the same path, the set still
receiving) has the earlier copy removed after the commit.

A crash between the copy and the journal leaves a file the journal does not know: `recover` (at start, holding
the state directory's lock) removes it and whatever `.tmp` holds; the file it came from is still where it was
(nothing removes it before the commit) and is taken again. Writers hold a shared lock on `attachments/.lock` from
the first byte to the commit, and `recover` takes it exclusively: an `ingestd import` writing beside a daemon that
starts never has its copy removed under it.

The same free-space floor as the spool's (`spool.min_free_mb`) refuses a file (SpoolFullError) before and while it
is written; the caller leaves its file in place to try again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from ingestd.durable import fsync_dir, write_all
from ingestd.errors import SpoolError, SpoolFullError
from ingestd.journal import Journal, Source
from ingestd.journal.attachments import FileStored, known_attachment_paths, store_file

__all__ = ["ATTACHMENTS", "AttachmentSpool", "Readable", "StoredAttachment"]

log = structlog.get_logger("ingestd.attachspool")

ATTACHMENTS = "attachments"  # the folder below the state directory; spool paths in the journal start with it
_TMP = ".tmp"
_LOCK = ".lock"
_PART = ".part"
_PIECE = 1024 * 1024  # copied this much at a time
_SPACE_CHECK_EVERY = 64 * 1024 * 1024  # a file being copied checks the free-space floor this often
_RECOVER_WAIT_SECONDS = 120.0


class Readable(Protocol):
    """What a file is copied from: an open file, or anything that reads like one (b"" at its end)."""

    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class StoredAttachment:
    """What storing one file did: the journal's outcome (`stored`, `duplicate`, `replaced`), its set, its digests."""

    outcome: str
    batch_id: int
    relative: str
    size: int
    sha256: str
    md5: str


def _spool_error(exc: OSError) -> SpoolError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError("the attachments' file system is full; refusing new files")
    return SpoolError(f"cannot write to the attachment spool ({exc.strerror or exc})")


def _written(fd: int, piece: bytes | memoryview, *, sync: bool = False) -> None:
    """Write `piece` whole (and fsync if `sync`); an OSError of the spool's side becomes SpoolError."""
    try:
        write_all(fd, piece)
        if sync:
            os.fsync(fd)
    except OSError as exc:
        raise _spool_error(exc) from None


class AttachmentSpool:
    """Durable copies of attached files under `<state_dir>/attachments/`, recorded in `journal`."""

    def __init__(self, state_dir: Path, journal: Journal, *, min_free_bytes: int = 0) -> None:
        self.state_dir = state_dir
        self.root = state_dir / ATTACHMENTS
        self.tmp = self.root / _TMP
        self.journal = journal
        self.min_free_bytes = min_free_bytes
        self.tmp.mkdir(parents=True, exist_ok=True)

    def check_space(self, incoming: int = 0) -> None:
        """Refuse (SpoolFullError) when `incoming` more bytes would go below the free-space floor."""
        info = os.statvfs(self.root)
        free = info.f_bavail * info.f_frsize
        if free - incoming < self.min_free_bytes:
            raise SpoolFullError(
                f"the attachments' file system has {free // 2**20} MiB free, below the floor of "
                f"{self.min_free_bytes // 2**20} MiB (spool.min_free_mb); refusing new files until space is freed"
            )

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the writers' shared lock: `recover` waits until no copy is between its first byte and its commit."""
        with (self.root / _LOCK).open("a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            yield

    def store(
        self,
        content: bytes | Readable,
        source: Source,
        relative: str,
        *,
        check: Callable[[], object] = lambda: None,
    ) -> StoredAttachment:
        """Keep `content` (bytes, or a file read to its end) as the file at `relative` of `source`'s upload.

        `check` runs once every byte is copied, before the journal is written (the watcher checks there that the
        file did not change meanwhile); whatever it raises goes through and nothing is kept. Returns once the copy
        and its journal row are durable. Raises SpoolFullError below the free-space floor, SpoolError on an I/O
        failure; whatever reading `content` raises goes through. In every failure nothing is kept or journaled.
        """
        name = secrets.token_hex(16)
        part = self.tmp / f"{name}{_PART}"
        final = self.root / name
        with self._writing():
            try:
                size, sha256, md5 = self._copy(content, part)  # the OSError of reading `content` goes through
                check()
                try:
                    os.replace(part, final)
                    fsync_dir(self.root)
                except OSError as exc:
                    final.unlink(missing_ok=True)
                    raise _spool_error(exc) from None
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            try:
                stored = store_file(
                    self.journal,
                    source,
                    relative,
                    size=size,
                    sha256=sha256,
                    md5=md5,
                    spool_path=f"{ATTACHMENTS}/{name}",
                    now=time.time(),
                )
            except BaseException:
                final.unlink(missing_ok=True)
                raise
        self._tidy(stored, final)
        return StoredAttachment(stored.outcome, stored.batch_id, relative, size, sha256, md5)

    def _copy(self, content: bytes | Readable, part: Path) -> tuple[int, str, str]:
        """Write `content` to the new file `part` (0640), hashing it; fsync it. Returns (size, SHA-256, MD5)."""
        sha256, md5 = hashlib.sha256(), hashlib.md5()  # noqa: S324 - MD5 is what XNAT lists, not a security check
        incoming = len(content) if isinstance(content, bytes) else 0
        self.check_space(incoming)
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise _spool_error(exc) from None
        try:
            size = checked = 0
            pieces = (
                (memoryview(content)[at : at + _PIECE] for at in range(0, len(content), _PIECE))
                if isinstance(content, bytes)
                else iter(lambda: content.read(_PIECE), b"")
            )
            for piece in pieces:
                sha256.update(piece)
                md5.update(piece)
                _written(fd, piece)
                size += len(piece)
                if not incoming and size - checked >= _SPACE_CHECK_EVERY:
                    self.check_space(_SPACE_CHECK_EVERY)
                    checked = size
            _written(fd, b"", sync=True)
        finally:
            os.close(fd)
        return size, sha256.hexdigest(), md5.hexdigest()

    def _tidy(self, stored: FileStored, final: Path) -> None:
        """Remove the copy the journal did not keep (a duplicate), or the earlier copy a new one replaced."""
        gone = final if stored.outcome == "duplicate" else None
        if stored.outcome == "replaced" and stored.removed:
            gone = self.state_dir / stored.removed
        if gone is None:
            return
        with contextlib.suppress(OSError):
            gone.unlink(missing_ok=True)
            fsync_dir(gone.parent)

    def recover(self, timeout: float = _RECOVER_WAIT_SECONDS) -> dict[str, int]:
        """Remove what a crash left: every temp file, and every file under `attachments/` the journal does not
        know (copied, never journaled: the file it came from was not removed and is taken again).

        Call it holding the state directory's lock. Waits (up to `timeout`, then TimeoutError) until no writer
        (an `ingestd import` beside it) is between a copy's first byte and its commit."""
        with (self.root / _LOCK).open("a+") as lock:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"a writer still holds {self.root / _LOCK}") from None
                    time.sleep(0.1)
            temp_removed = 0
            for leftover in self.tmp.iterdir():
                with contextlib.suppress(OSError):
                    leftover.unlink()
                    temp_removed += 1
            known = known_attachment_paths(self.journal)
            unknown_removed = 0
            for path in self.root.iterdir():
                if path.name.startswith(".") or not path.is_file() or f"{ATTACHMENTS}/{path.name}" in known:
                    continue
                with contextlib.suppress(OSError):
                    path.unlink()
                    unknown_removed += 1
            if temp_removed or unknown_removed:
                fsync_dir(self.tmp)
                fsync_dir(self.root)
        log.info("attachments.recovered", temp_files_removed=temp_removed, unknown_files_removed=unknown_removed)
        return {"temp_files_removed": temp_removed, "unknown_files_removed": unknown_removed}
