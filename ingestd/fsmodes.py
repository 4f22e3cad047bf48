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


def restrict(path: Path) -> None:
    """Give one file 0640 or one folder 0750 (never loosening a stricter mode's owner bits); links are left."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    _restrict(path, info.st_mode)


def _restrict(path: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        wanted = DIR_MODE
    elif stat.S_ISREG(mode):
        wanted = FILE_MODE
    else:
        return  # a link, a socket: chmod would follow or fail
    if stat.S_IMODE(mode) != wanted:
        with contextlib.suppress(PermissionError):  # not ours (root's, say): nothing we may change
            path.chmod(wanted)


def restrict_tree(root: Path) -> None:
    """`restrict` `root` and everything below it (iteratively; links are neither followed nor changed)."""
    restrict(root)
    if not root.is_dir() or root.is_symlink():
        return
    for folder, subfolders, others in walk(root, max_depth=1_000_000):
        for name in (*subfolders, *others):
            path = folder / name
            with contextlib.suppress(FileNotFoundError):
                _restrict(path, path.lstat().st_mode)
