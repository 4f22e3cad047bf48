"""Files and folders made durable: each write fsync'd, each new name's folder fsync'd, a move that a crash leaves
in one place or the other. The spool, the quarantine, the router and the watcher build their ordering on these."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "file_digest",
    "fsync_dir",
    "fsync_tree",
    "link_then_unlink",
    "make_dirs_durably",
    "move_durably",
    "remove_quietly",
    "write_all",
    "write_durably",
]

_READ_PIECE = 1024 * 1024  # a file is hashed this much at a time


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def file_digest(path: Path, offset: int = 0) -> str:
    """The SHA-256 of a file's bytes from `offset` on (hex), read a piece at a time."""
    digest = hashlib.sha256()
    with path.open("rb", buffering=0) as stream:
        stream.seek(offset)
        piece = bytearray(_READ_PIECE)
        with memoryview(piece) as view:
            while got := stream.readinto(view):
                digest.update(view[:got])
    return digest.hexdigest()


def write_durably(path: Path, chunks: Sequence[bytes | memoryview]) -> int:
    """Write `chunks` to a new file at `path` (0640) and fsync it; return the number of bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        total = sum(len(chunk) for chunk in chunks)
        written = os.writev(fd, chunks)
        if written < total:  # a short write: finish chunk by chunk
            offset = 0
            for chunk in chunks:
                view = memoryview(chunk)[max(0, written - offset) :]
                offset += len(chunk)
                while len(view):
                    view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return total


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def link_then_unlink(source: Path, target: Path) -> None:
    """Give `source` the name `target` unless `target` exists (FileExistsError); then drop the name `source`."""
    os.link(source, target)
    source.unlink()


def fsync_tree(root: Path) -> None:
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_dirs_durably(directory: Path) -> None:
    """Create `directory` and any missing parents, each new entry made durable."""
    missing = []
    current = directory
    while not current.is_dir():
        missing.append(current)
        current = current.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_dir(new.parent)


def move_durably(source: Path, target: Path) -> None:
    """Move a file or folder to `target` (whose folder exists) so that a crash leaves it in one place or the other.

    Across file systems it is copied to a temporary name, fsync'd, renamed into place, and only then removed.
    """
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        temporary = target.with_name(f".{target.name}.ingestd-copy")
        if source.is_dir():
            shutil.copytree(source, temporary)
        else:
            shutil.copyfile(source, temporary)
        fsync_tree(temporary)
        os.replace(temporary, target)
        fsync_dir(target.parent)
        if source.is_dir():
            shutil.rmtree(source)
        else:
            source.unlink()
    fsync_dir(target.parent)
    fsync_dir(source.parent)
