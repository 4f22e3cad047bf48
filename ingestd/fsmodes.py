"""File modes of what ingestd keeps: 0750 folders, 0640 files, whatever the umask it was started with.

The state directory holds PHI (spooled and quarantined instances, the journal's paths and reasons): only the
service's user and its group may read it. A process that writes there sets its umask to 027 once
(`restrict_umask`), so that everything it creates afterwards (SQLite's journal and its -wal/-shm, spool and
outbox files, packages, folders made by `mkdir`) gets those modes; `restrict_tree` tightens what an earlier run
(or an older version, or another umask) left looser; `restrict` fixes one item moved in from elsewhere (a
dropped file moved into quarantine keeps the dropper's mode through a rename).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

from ingestd.walk import walk

__all__ = ["DIR_MODE", "FILE_MODE", "UMASK", "restrict", "restrict_tree", "restrict_umask"]

DIR_MODE = 0o750
FILE_MODE = 0o640
UMASK = 0o027


def restrict_umask() -> int:
    """Make files and folders this process creates from now on 0640 and 0750 at most; return the old umask."""
    return os.umask(UMASK)


def restrict(path: Path, *, own: bool = False) -> None:
    """Give one file 0640 or one folder 0750 (never loosening a stricter mode's owner bits); links are left.

    With `own`, a file another user owns (whose mode we may not change) is replaced by our own 0640 copy.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    _restrict(path, info.st_mode, own=own)


def _restrict(path: Path, mode: int, *, own: bool = False) -> None:
    if stat.S_ISDIR(mode):
        wanted = DIR_MODE
    elif stat.S_ISREG(mode):
        wanted = FILE_MODE
    else:
        return  # a link, a socket: chmod would follow or fail
    if stat.S_IMODE(mode) != wanted:
        try:
            path.chmod(wanted)
        except PermissionError:  # not ours (the dropper's, root's): we may not change its mode
            if own and stat.S_ISREG(mode):
                _replace_with_own_copy(path)


def _replace_with_own_copy(path: Path) -> None:
    """Replace another user's file with a 0640 copy of our own, in one rename (the folder is ours).

    A file dropped by another user keeps that user's 0644 through the rename into quarantine; only a copy we create
    gets our mode. The copy is fsync'd before it replaces the original, so a crash leaves one or the other, whole.
    Unreadable, or in a folder we may not write: left as it is.
    """
    temporary = path.with_name(f".{path.name}.ingestd-own")
    try:
        with path.open("rb") as source:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with os.fdopen(descriptor, "wb") as copy:
                os.fchmod(copy.fileno(), FILE_MODE)
                shutil.copyfileobj(source, copy, 1024 * 1024)
                copy.flush()
                os.fsync(copy.fileno())
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()


def restrict_tree(root: Path, *, own: bool = False) -> None:
    """`restrict` `root` and everything below it (iteratively; links are neither followed nor changed)."""
    restrict(root, own=own)
    if not root.is_dir() or root.is_symlink():
        return
    for folder, subfolders, others in walk(root, max_depth=1_000_000):
        for name in (*subfolders, *others):
            path = folder / name
            with contextlib.suppress(FileNotFoundError):
                _restrict(path, path.lstat().st_mode, own=own)
