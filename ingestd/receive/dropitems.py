"""What the drop-folder watcher knows about a path, and the signals of one attempt at taking it.

A file counts as settled while its `_Signature` (device, inode, size, times) stays the same; `_Pending` is a
path waiting to be taken. `_Retry`, `_Stopped` and `_Failed` are how a step of taking a source tells the
watcher what to do with it next (`ingestd.receive.watcher`).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple


class _Retry(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Leave the source where it is and try it again later."""

    def __init__(self, reason: str, delay: float) -> None:
        super().__init__(reason)
        self.delay = delay


class _Stopped(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The watcher is stopping: leave the source where it is for the next start."""


class _Failed(Exception):  # noqa: N818 - a control-flow signal: one failed attempt at a source
    """Taking the source failed in a way that may pass (or not): `reason` says which step, and why."""

    def __init__(self, reason: str, *, readable: bool = True, unexpected: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.readable = readable  # False: the file itself could not be read (copying it would fail too)
        self.unexpected = unexpected  # not an OSError: logged with its traceback


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _kind(mode: int) -> str:
    """What a path that is neither a regular file nor a folder is, as `drop.item_skipped` names it."""
    kinds = (
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "named pipe"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    )
    return next((name for test, name in kinds if test(mode)), "unknown")


# -- paths -------------------------------------------------------------------------------------------


class _Signature(NamedTuple):
    """What must stay the same for a file to count as settled."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int


def _signature(info: os.stat_result) -> _Signature:
    return _Signature(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@dataclass(slots=True)
class _Pending:
    """A path waiting to be taken (or a folder to be removed): how it looked, and when to look again.

    What was learnt about it holds for that look only: a file that changes gets a new entry.
    """

    signature: _Signature
    due: float
    attempts: int = 0  # failed attempts (not spool refusals): at `max_attempts`, the watcher gives up
    incomplete_since: float | None = None  # when it was first found settled but not whole


def _numbered(target: Path) -> Path:
    """`target`, or `name-1.ext`, `name-2.ext`, ... when it exists (`.tar.gz` counts as one extension)."""
    if not target.exists():
        return target
    name = target.name
    base, dot, extension = name.partition(".")
    for number in range(1, 1_000_000):
        candidate = target.with_name(f"{base}-{number}{dot}{extension}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"too many files named like {target} in the done folder")
