"""The drop-folder watcher: DICOM files, folders and archives dropped into a folder, taken into the spool.

One watcher per configured folder. A watchdog observer (inotify, or polling for network shares) only
tells the watcher which paths to look at; a single worker thread does the rest. A file is taken once it
has settled (unchanged in size, times and inode for `settle_seconds`); hidden and partial files
(`.name`, `*.part`, `*.tmp`, ...) are left alone until renamed. A source file or archive is deleted or
moved to the done folder only after every instance in it is in the spool and the journal, so a crash at
any point loses nothing: taking the same bytes again is a duplicate, a no-op in the spool.

What is not DICOM, is corrupt or is a hostile archive goes to quarantine with its reason. A refusal by
the spool (full, unwritable) leaves the file where it is, to be tried again later.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from ingestd.config import Archives, DropFolder
from ingestd.dicomfile import PreparedInstance
from ingestd.errors import IngestdError, SpoolError
from ingestd.journal import Source
from ingestd.logs import hide_member_names, path_digest
from ingestd.metrics import DROP_SOURCES
from ingestd.receive.intake import SourceRejected, is_ignored, take_source
from ingestd.spool import Quarantine, Spool, StoreOutcome, fsync_dir, make_dirs_durably, move_durably

__all__ = [
    "RETRY_SECONDS",
    "DropFolderError",
    "DropFolderWatcher",
    "is_ignored",
]

log = structlog.get_logger("ingestd.watcher")

# Our own reads cause open/close-without-write events, and a folder is "modified" by every file created
# in it: neither says anything new about a path to take.
_IGNORED_EVENTS = frozenset({"opened", "closed_no_write", "attrib"})
_MIN_RESCAN_SECONDS = 2.0
RETRY_SECONDS = 30.0  # after a spool refusal or an I/O error, try the source again this much later
_ERROR_PAUSE_SECONDS = 1.0


class DropFolderError(IngestdError):
    """A drop folder cannot be watched (missing, or not a folder)."""


class _Retry(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Leave the source where it is and try it again later."""

    def __init__(self, reason: str, delay: float) -> None:
        super().__init__(reason)
        self.delay = delay


class _Stopped(Exception):  # noqa: N818 - a control-flow signal, not an error
    """The watcher is stopping: leave the source where it is for the next start."""


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
    """A path waiting to be taken (or a folder to be removed): how it looked, and when to look again."""

    signature: _Signature
    due: float


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


# -- the watchdog side -------------------------------------------------------------------------------


class _EventHandler(FileSystemEventHandler):
    """Passes the paths of file-system events to the watcher's queue. Never raises: watchdog would stop."""

    def __init__(self, paths: queue.SimpleQueue[str | None]) -> None:
        super().__init__()
        self._paths = paths

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            if event.event_type in _IGNORED_EVENTS or (event.is_directory and event.event_type == "modified"):
                return
            self._paths.put(os.fsdecode(event.src_path))
            destination = getattr(event, "dest_path", "")
            if destination:
                self._paths.put(os.fsdecode(destination))
        except Exception:
            log.exception("drop.event_error", fs_event=type(event).__name__)


# -- the watcher -------------------------------------------------------------------------------------


class DropFolderWatcher:
    """Watch one drop folder and take what settles in it into the spool.

    `start()` scans the folder (files dropped while ingestd was down), starts the observer and the
    worker thread; `stop()` ends both. `scan_once()` runs one synchronous pass without any thread:
    it notes every file and takes those that have settled.
    """

    def __init__(
        self,
        folder: DropFolder,
        limits: Archives,
        spool: Spool,
        quarantine: Quarantine,
        *,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.folder = folder
        self.limits = limits
        self.spool = spool
        self.quarantine = quarantine
        self.root = Path(os.path.abspath(folder.path))  # noqa: PTH100 - absolute without resolving links
        done = folder.done_folder if folder.after == "move" else None
        self.done_folder = Path(os.path.abspath(done)) if done is not None else None  # noqa: PTH100
        self.rescan_seconds = max(_MIN_RESCAN_SECONDS, folder.settle_seconds, folder.poll_interval_seconds)
        self.retry_seconds = retry_seconds
        self._settle = folder.settle_seconds
        self._paths: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._pending: dict[Path, _Pending] = {}
        self._emptied: dict[Path, _Pending] = {}
        self._lock = threading.Lock()  # one pass at a time: the worker's or scan_once's
        self._stopping = threading.Event()
        self._observer: Any = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Scan the folder and start watching it. Raises DropFolderError if the folder is missing."""
        if not self.root.is_dir():
            raise DropFolderError(
                f"drop folder {self.root} does not exist or is not a folder; create it or correct "
                "drop_folders[].path in the configuration"
            )
        if self._thread is not None:
            raise RuntimeError("this drop folder watcher is already started")
        self._stopping.clear()
        self._observer = self._start_observer()
        with self._lock:
            self._scan_tree(self.root)  # what was dropped while ingestd was down
        self._thread = threading.Thread(target=self._run, name=f"ingestd-drop-{self.root.name}", daemon=True)
        self._thread.start()
        log.info(
            "drop.watcher_started",
            folder=str(self.root),
            polling=self.folder.polling,
            settle_seconds=self._settle,
            files_found=len(self._pending),
        )

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the observer and the worker (the source being taken, if any, is left for the next start)."""
        self._stopping.set()
        self._paths.put(None)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("drop.watcher_stop_timed_out", folder=str(self.root), timeout=timeout)
            self._thread = None
        log.info("drop.watcher_stopped", folder=str(self.root))

    def scan_once(self) -> int:
        """Note every file in the folder and take those that have settled; return how many were finished.

        A file first seen here is taken by a later pass, `settle_seconds` on (at once if that is 0).
        """
        with self._lock:
            self._scan_tree(self.root)
            return self._process_due()

    def _start_observer(self) -> Any:
        interval = self.folder.poll_interval_seconds
        observer: Any = PollingObserver(timeout=interval) if self.folder.polling else Observer()
        observer.schedule(_EventHandler(self._paths), str(self.root), recursive=True)
        try:
            observer.start()
        except OSError as exc:  # inotify watch or instance limit reached: polling still works
            log.warning("drop.watcher_polling_fallback", folder=str(self.root), reason=str(exc))
            observer = PollingObserver(timeout=interval)
            observer.schedule(_EventHandler(self._paths), str(self.root), recursive=True)
            observer.start()
        return observer

    # -- the worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        next_scan = time.monotonic() + self.rescan_seconds
        while not self._stopping.is_set():
            try:
                paths = self._wait_for_paths(self._next_due(next_scan) - time.monotonic())
                if self._stopping.is_set():
                    break
                with self._lock:
                    for path in paths:
                        self._note(path)
                    if time.monotonic() >= next_scan:
                        self._scan_tree(self.root)
                        next_scan = time.monotonic() + self.rescan_seconds
                    self._process_due()
            except Exception:
                log.exception("drop.watcher_error", folder=str(self.root))
                self._stopping.wait(_ERROR_PAUSE_SECONDS)

    def _next_due(self, next_scan: float) -> float:
        with self._lock:
            dues = [entry.due for entry in (*self._pending.values(), *self._emptied.values())]
        return min([next_scan, *dues])

    def _wait_for_paths(self, timeout: float) -> list[Path]:
        """Block until a path arrives or `timeout` passes; return every path queued by then."""
        try:
            first = self._paths.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return []
        queued = [first]
        while True:
            try:
                queued.append(self._paths.get_nowait())
            except queue.Empty:
                break
        return [Path(path) for path in dict.fromkeys(queued) if path is not None]

    # -- noting paths ------------------------------------------------------------------------------

    def _relative(self, path: Path) -> PurePosixPath | None:
        """The path relative to the drop folder, or None if it is outside, hidden, partial or done."""
        if self.done_folder is not None and path.is_relative_to(self.done_folder):
            return None
        if not path.is_relative_to(self.root) or path == self.root:
            return None
        relative = PurePosixPath(path.relative_to(self.root).as_posix())
        return None if is_ignored(relative) else relative

    def _scan_tree(self, top: Path) -> None:
        def report(error: OSError) -> None:
            where = Path(os.fsdecode(error.filename or ""))
            shown = where.relative_to(self.root).as_posix() if where.is_relative_to(self.root) else str(where)
            log.warning("drop.scan_error", file=path_digest(shown), reason=error.strerror)

        for directory, subdirectories, files in os.walk(top, onerror=report):
            here = Path(directory)
            subdirectories[:] = [name for name in subdirectories if self._relative(here / name) is not None]
            for name in files:
                self._note(here / name)

    def _note(self, path: Path) -> None:
        """Start (or restart) the settle clock of a file; walk a folder; forget what is gone."""
        if self._relative(path) is None:
            return
        try:
            info = path.lstat()
        except FileNotFoundError:
            self._pending.pop(path, None)
            return
        if stat.S_ISDIR(info.st_mode):
            self._scan_tree(path)
            return
        if not stat.S_ISREG(info.st_mode):  # symbolic links, pipes, sockets: never followed or read
            return
        signature = _signature(info)
        entry = self._pending.get(path)
        if entry is None or entry.signature != signature:
            self._pending[path] = _Pending(signature, time.monotonic() + self._settle)

    # -- taking what has settled -------------------------------------------------------------------

    def _process_due(self) -> int:
        finished = 0
        for path, entry in sorted(self._pending.items()):
            if self._stopping.is_set():
                break
            if entry.due <= time.monotonic() and self._settled(path, entry):
                finished += self._take(path, entry)
        self._remove_emptied_folders()
        return finished

    def _settled(self, path: Path, entry: _Pending) -> bool:
        try:
            signature = _signature(path.lstat())
        except FileNotFoundError:
            self._pending.pop(path, None)
            return False
        if signature != entry.signature:
            entry.signature = signature
            entry.due = time.monotonic() + self._settle
            return False
        return True

    def _take(self, path: Path, entry: _Pending) -> int:
        """Take one settled source; return 1 if it is finished (taken or quarantined), else 0."""
        relative = path.relative_to(self.root).as_posix()
        try:
            self._take_source(path, relative, entry.signature)
        except _Retry as exc:
            entry.due = time.monotonic() + exc.delay
            log.warning(
                "drop.file_retry",
                file=path_digest(relative),
                reason=hide_member_names(str(exc)),
                retry_in=exc.delay,
            )
            return 0
        except _Stopped:
            return 0
        except OSError as exc:
            entry.due = time.monotonic() + self.retry_seconds
            log.error(
                "drop.file_failed",
                file=path_digest(relative),
                reason=exc.strerror or type(exc).__name__,
                retry_in=self.retry_seconds,
            )
            return 0
        except Exception:  # a journal error, a bug: this source waits, the others go on
            entry.due = time.monotonic() + self.retry_seconds
            log.exception("drop.file_failed", file=path_digest(relative), retry_in=self.retry_seconds)
            return 0
        self._pending.pop(path, None)
        self._note_emptied(path.parent)
        return 1

    def _source(self, detail: str) -> Source:
        return Source("folder", str(self.folder.path), detail)

    def _check_unchanged(self, path: Path, signature: _Signature) -> None:
        try:
            unchanged = _signature(path.lstat()) == signature
        except FileNotFoundError:
            unchanged = False
        if not unchanged:
            raise _Retry("the file changed while it was being read", 0.0)

    def _store(self, prepared: PreparedInstance, detail: str) -> StoreOutcome:
        if self._stopping.is_set():
            raise _Stopped
        try:
            return self.spool.store(prepared.prefix, prepared.body, prepared.header, self._source(detail))
        except SpoolError as exc:
            raise _Retry(f"the spool refused the instance: {exc}", self.retry_seconds) from None

    def _take_source(self, path: Path, relative: str, signature: _Signature) -> None:
        """Spool the file, or every good member of the archive, keep what is bad in quarantine, then finish it."""
        outcomes: list[str] = []

        def store(prepared: PreparedInstance, detail: str) -> None:
            outcomes.append(self._store(prepared, detail).outcome)

        try:
            taken = take_source(
                path,
                relative,
                self.limits,
                size=signature.size,
                store=store,
                reject_member=self._quarantine_member,
                check=lambda: self._check_unchanged(path, signature),
            )
        except SourceRejected as exc:
            self._check_unchanged(path, signature)
            self._quarantine_source(path, relative, exc.reason, self._source(relative))
            return
        self._check_unchanged(path, signature)
        self._finish(path)
        DROP_SOURCES.labels(folder=str(self.folder.path), outcome="taken").inc()
        if taken.archive is None:
            log.info("drop.file_taken", file=path_digest(relative), instances=1, spool=outcomes[0])
            return
        log.info(
            "drop.archive_taken",
            file=path_digest(relative),
            members=taken.instances + taken.rejected,
            instances=taken.instances,
            quarantined=taken.rejected,
        )

    def _quarantine_member(self, detail: str, name: str, data: bytes, reason: str) -> None:
        """Keep a bad member of an archive in quarantine (once its good ones are all spooled)."""
        item = self.quarantine.put_bytes(name, data, reason, self._source(detail))
        log.warning(
            "drop.member_quarantined", file=path_digest(detail), item=item.name, reason=hide_member_names(reason)
        )

    def _quarantine_source(self, path: Path, relative: str, reason: str, source: Source) -> None:
        item = self.quarantine.put_file(path, reason, source)
        DROP_SOURCES.labels(folder=str(self.folder.path), outcome="quarantined").inc()
        log.warning(
            "drop.file_quarantined", file=path_digest(relative), item=item.name, reason=hide_member_names(reason)
        )

    # -- after taking ------------------------------------------------------------------------------

    def _finish(self, path: Path) -> None:
        """Delete the taken source, or move it to the done folder under its relative path."""
        if self.done_folder is None:
            path.unlink()
            fsync_dir(path.parent)
            return
        target = _numbered(self.done_folder / path.relative_to(self.root))
        make_dirs_durably(target.parent)
        move_durably(path, target)

    def _note_emptied(self, directory: Path) -> None:
        """Remember a folder a source was taken out of, to remove it once it stays empty."""
        if directory == self.root or not directory.is_relative_to(self.root):
            return
        try:
            info = directory.lstat()
        except FileNotFoundError:
            return
        self._emptied[directory] = _Pending(_signature(info), time.monotonic() + self._settle)

    def _remove_emptied_folders(self) -> None:
        """Remove the folders sources were taken out of once they have been empty for `settle_seconds`."""
        for directory, entry in sorted(self._emptied.items(), reverse=True):
            if entry.due > time.monotonic():
                continue
            del self._emptied[directory]
            try:
                signature = _signature(directory.lstat())
                if signature != entry.signature:  # something was added or removed since: look again later
                    self._note_emptied(directory)
                    continue
                directory.rmdir()  # fails, harmlessly, if anything is in it
            except OSError:
                continue
            fsync_dir(directory.parent)
            log.info("drop.folder_removed", subfolder=path_digest(directory.relative_to(self.root).as_posix()))
            self._note_emptied(directory.parent)
