"""Retention's file system side: how many bytes what a plan names takes on disk, and removing it.

A path that is already gone is not an error (an earlier pass removed it and stopped before the journal recorded
it; the deliverer cleaned up after a delivery): it counts nothing. A symbolic link is removed, never followed.
Anything else that cannot be removed raises OSError to the caller, who leaves the item's rows as they were.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from ingestd.retention.plan import BatchRemoval

__all__ = ["item_paths", "measure", "measure_quarantine", "remove", "remove_quarantine", "tree_size"]


def tree_size(path: Path) -> int:
    """Bytes of the file, link or folder at `path` (every file below a folder); 0 when it is not there."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size
    total = 0
    for folder, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += (Path(folder) / name).lstat().st_size
            except FileNotFoundError:
                continue
    return total


def _remove_path(path: Path) -> int:
    """Remove the file, link or folder at `path`; return the bytes it took."""
    size = tree_size(path)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return 0
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    return size


def measure(state_dir: Path, removal: BatchRemoval) -> int:
    """Bytes the batch's files and folders take now."""
    return sum(tree_size(state_dir / path) for path in (*removal.files, *removal.trees))


def remove(state_dir: Path, removal: BatchRemoval) -> int:
    """Remove the batch's files and folders, then its folders left empty; return the bytes freed."""
    freed = sum(_remove_path(state_dir / path) for path in (*removal.files, *removal.trees))
    for folder in removal.prune:  # deepest first; a folder still holding something stays
        try:
            (state_dir / folder).rmdir()
        except OSError:
            continue
    return freed


def item_paths(quarantine_dir: Path, name: str) -> tuple[Path, Path]:
    """A quarantined item and its reason sidecar."""
    return quarantine_dir / name, quarantine_dir / f"{name}.reason.json"


def measure_quarantine(quarantine_dir: Path, name: str) -> int:
    return sum(tree_size(path) for path in item_paths(quarantine_dir, name))


def remove_quarantine(quarantine_dir: Path, name: str) -> int:
    """Remove a quarantined item (a file or a folder) and then its sidecar; return the bytes freed."""
    item, sidecar = item_paths(quarantine_dir, name)
    return _remove_path(item) + _remove_path(sidecar)
