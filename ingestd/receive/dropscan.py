"""Noting what is in a drop folder: the part of the drop-folder watcher that looks, never takes.

`_FolderScan` walks the folder (iteratively, at most `max_depth` levels down), starts the settle clock of
every regular file it meets (`_pending`), logs once what it leaves alone (links, pipes, sockets, devices, a
folder too deep, a path it cannot look at) and forgets what is gone. `ingestd.receive.watcher` builds on it
to take what has settled.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path, PurePosixPath

import structlog

from ingestd.config import DropFolder
from ingestd.logs import path_digest
from ingestd.receive.dropitems import _kind, _Pending, _Signature, _signature, _why
from ingestd.receive.intake import is_ignored, source_name
from ingestd.walk import walk

log = structlog.get_logger("ingestd.watcher")


class _FolderScan:
    """The paths of one drop folder waiting to be taken, and what a scan of it met."""

    def __init__(self, folder: DropFolder) -> None:
        self.folder = folder
        self.root = Path(os.path.abspath(folder.path))  # noqa: PTH100 - absolute without resolving links
        done = folder.done_folder if folder.after == "move" else None
        self.done_folder = Path(os.path.abspath(done)) if done is not None else None  # noqa: PTH100
        self._settle = folder.settle_seconds
        self._pending: dict[Path, _Pending] = {}
        self._skipped: dict[Path, tuple[str, int, int]] = {}  # logged once each: (kind, device, inode)
        self._left: dict[Path, _Signature] = {}  # given up on and left in place: not taken again unless changed
        self._scan_errors: set[tuple[str, str]] = set()  # (path, reason) logged once, while they last
        self._seen: set[Path] | None = None  # what a scan of the whole folder met (None: no such scan runs)
        self._errors_seen: set[tuple[str, str]] = set()  # the scan errors that scan met

    def _relative(self, path: Path) -> PurePosixPath | None:
        """The path relative to the drop folder, or None if it is outside, hidden, partial or done."""
        if self.done_folder is not None and path.is_relative_to(self.done_folder):
            return None
        if not path.is_relative_to(self.root) or path == self.root:
            return None
        relative = PurePosixPath(path.relative_to(self.root).as_posix())
        return None if is_ignored(relative) else relative

    def _scan_tree(self, top: Path) -> None:
        """Note every file below `top`; a scan of the whole folder also forgets what is gone from it."""
        whole = top == self.root and self._seen is None
        if whole:
            self._seen = set()
            self._errors_seen = set()

        def report(error: OSError) -> None:
            self._scan_error(Path(os.fsdecode(error.filename or "")), error)

        depth = 0 if top == self.root else len(top.relative_to(self.root).parts)
        try:
            if depth > self.folder.max_depth:
                self._too_deep(top, depth)
                return
            for here, subdirectories, files in walk(
                top, max_depth=self.folder.max_depth, depth=depth, onerror=report, too_deep=self._too_deep
            ):
                for name in subdirectories:  # a link to a folder: the walk lists it there, never enters it
                    if (here / name).is_symlink():
                        self._note(here / name, walked=True)
                subdirectories[:] = [
                    name
                    for name in subdirectories
                    if self._relative(here / name) is not None and not (here / name).is_symlink()
                ]
                for name in files:
                    self._note(here / name, walked=True)
        finally:
            if whole and self._seen is not None:
                self._forget_unseen(self._seen)
                self._seen = None
                self._scan_errors = self._errors_seen

    def _too_deep(self, folder: Path, depth: int) -> None:
        """Log, once while it lasts, a folder below `max_depth` levels: it is left alone, the scan goes on."""
        shown = source_name(folder.relative_to(self.root).as_posix())
        key = (shown, "deeper than drop_folders[].max_depth")
        self._errors_seen.add(key)
        if key not in self._scan_errors:
            self._scan_errors.add(key)
            log.warning(
                "drop.folder_too_deep", subfolder=path_digest(shown), depth=depth, max_depth=self.folder.max_depth
            )

    def _forget_unseen(self, seen: set[Path]) -> None:
        """After a scan of the whole folder: forget the skipped and left items that are no longer there."""
        self._skipped = {path: key for path, key in self._skipped.items() if path in seen}
        self._left = {path: signature for path, signature in self._left.items() if path in seen}

    def _inside(self, path: Path) -> bool:
        """Say whether every folder between the drop folder and `path` is a folder, not a link to one."""
        parent = path.parent
        while parent != self.root:
            try:
                if not stat.S_ISDIR(parent.lstat().st_mode):
                    return False
            except OSError:
                return False
            parent = parent.parent
        return True

    def _note(self, path: Path, *, walked: bool = False) -> None:
        """Start (or restart) the settle clock of a file; walk a folder; log what is skipped; forget what is gone.

        `walked`: the path comes from walking the folder, which never goes through a link.
        """
        relative = self._relative(path)
        too_deep = relative is None or len(relative.parts) - 1 > self.folder.max_depth  # the scans log the folder
        if too_deep or not (walked or self._inside(path)):
            return
        try:
            info = path.lstat()
        except FileNotFoundError:
            self._pending.pop(path, None)
            return
        except OSError as exc:
            self._scan_error(path, exc)
            return
        if self._seen is not None:
            self._seen.add(path)
        if stat.S_ISDIR(info.st_mode):
            self._scan_tree(path)
            return
        if not stat.S_ISREG(info.st_mode):  # symbolic links, pipes, sockets, devices: never followed or read
            self._skip(path, info)
            return
        self._skipped.pop(path, None)
        signature = _signature(info)
        left = self._left.get(path)
        if left is not None:
            if left == signature:
                return
            del self._left[path]  # changed since it was left: try it afresh
        entry = self._pending.get(path)
        if entry is None or entry.signature != signature:
            self._pending[path] = _Pending(signature, time.monotonic() + self._settle)

    def _scan_error(self, where: Path, error: OSError) -> None:
        """Log a path that cannot be looked at, once while the error lasts (scans of the whole folder tell)."""
        shown = where.relative_to(self.root).as_posix() if where.is_relative_to(self.root) else str(where)
        key = (source_name(shown), _why(error))
        self._errors_seen.add(key)
        if key not in self._scan_errors:
            self._scan_errors.add(key)
            log.warning("drop.scan_error", file=path_digest(key[0]), reason=key[1])

    def _skip(self, path: Path, info: os.stat_result) -> None:
        """Log, once, that something that is not a regular file or folder is left alone."""
        self._pending.pop(path, None)
        key = (_kind(info.st_mode), info.st_dev, info.st_ino)
        if self._skipped.get(path) == key:
            return
        self._skipped[path] = key
        detail = source_name(path.relative_to(self.root).as_posix())
        log.warning("drop.item_skipped", file=path_digest(detail), kind=key[0])
