"""The drop-folder watcher: DICOM files, folders and archives dropped into a folder, taken into the spool.

One watcher per configured folder. A watchdog observer (inotify, or polling for network shares) only
tells the watcher which paths to look at; a single worker thread does the rest. A file is taken once it
has settled (unchanged in size, times and inode for `settle_seconds`) and is whole: a DICOM file that
parses to its end with its Pixel Data if it is an image, an archive with its end (`ingestd.dicomfile`,
`ingestd.receive.archives`). A settled file that is not whole yet waits (a writer may have paused), and
goes to quarantine only once it has stayed unchanged and incomplete for `incomplete_seconds`. Hidden and
partial files (`.name`, `*.part`, `*.tmp`, ...) are left alone until renamed. A source file or archive is
deleted or moved to the done folder only after every instance in it is in the spool and the journal, so a
crash at any point loses nothing: taking the same bytes again is a duplicate, a no-op in the spool. A file
that changes while it is taken is left where it is and taken again once it settles.

What is not DICOM but a rule's `attach:` takes (the `attachable` predicate the daemon gives, over the file's path
with archives opened) is kept in the attachment spool (`ingestd.attachspool`), durable and journaled before the
file it came from is removed, like an instance. Every instance and attached file carries its upload: the top-level
entry below the drop folder it came in (`sub01`, `scan.zip`).

What is not DICOM (and not attached), is corrupt or is a hostile archive goes to quarantine with its reason. A
refusal by the spool or the attachment spool (full, unwritable) leaves the file where it is, to be tried again
later. Any other failure (the file cannot be read, or removed, or moved) is tried again `max_attempts` times in
all, then the file goes to quarantine with the reason; if it cannot be moved either, it is left in place, a note
with the reason goes to quarantine instead, and it is not tried again until it changes.
Symbolic links, named pipes, sockets and device files are never opened, followed or removed: each is logged once
as skipped.

Whatever the tree looks like, a scan goes on with the rest of it: folders are walked iteratively, a folder more
than `max_depth` levels down is logged once and left alone, and a watcher whose file-system observer cannot
follow the tree (watchdog walks it recursively) or whose observer stops falls back to its own periodic scans.
"""

from __future__ import annotations

import queue
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from ingestd.attachspool import AttachmentSpool, Readable
from ingestd.config import Archives, DropFolder
from ingestd.dicomfile import PreparedInstance
from ingestd.errors import IngestdError, SpoolError
from ingestd.journal import Source
from ingestd.logs import hide_member_names, path_digest
from ingestd.metrics import DROP_SOURCES
from ingestd.receive.dropitems import _Failed, _numbered, _Pending, _Retry, _Signature, _signature, _Stopped, _why
from ingestd.receive.dropscan import _FolderScan
from ingestd.receive.intake import (
    NotTheFileError,
    SourceIncomplete,
    SourceRejected,
    is_ignored,
    path_parts,
    source_name,
    take_source,
    upload_of,
)
from ingestd.receive.observer import _EventHandler, _observer_running, _stop_observer
from ingestd.spool import Quarantine, Spool, StoreOutcome, fsync_dir, make_dirs_durably, move_durably

__all__ = [
    "RETRY_SECONDS",
    "DropFolderError",
    "DropFolderWatcher",
    "is_ignored",
]

log = structlog.get_logger("ingestd.watcher")

_MIN_RESCAN_SECONDS = 2.0
RETRY_SECONDS = 30.0  # after a spool refusal or an I/O error, try the source again this much later
_ERROR_PAUSE_SECONDS = 1.0


class DropFolderError(IngestdError):
    """A drop folder cannot be watched (missing, or not a folder)."""


class DropFolderWatcher(_FolderScan):
    """Watch one drop folder and take what settles in it into the spool.

    `start()` scans the folder (files dropped while ingestd was down), starts the observer and the
    worker thread; `stop()` ends both. `scan_once()` runs one synchronous pass without any thread:
    it notes every file and takes those that have settled.

    `attachable` says whether a rule in force attaches a file that is not DICOM at a path (`path_parts`, below the
    folder); it is read at each file, so the daemon may give one that follows the rules' reloads. Such files go
    to `attachments`; without it (None) nothing is attached, whatever `attachable` says.
    """

    def __init__(
        self,
        folder: DropFolder,
        limits: Archives,
        spool: Spool,
        quarantine: Quarantine,
        *,
        retry_seconds: float = RETRY_SECONDS,
        attachable: Callable[[str], bool] = lambda _relative: False,
        attachments: AttachmentSpool | None = None,
    ) -> None:
        super().__init__(folder)
        self.limits = limits
        self.spool = spool
        self.quarantine = quarantine
        self.attachable = attachable
        self.attachments = attachments
        self.rescan_seconds = max(_MIN_RESCAN_SECONDS, folder.settle_seconds, folder.poll_interval_seconds)
        self.retry_seconds = retry_seconds
        self._paths: queue.SimpleQueue[str | None] = queue.SimpleQueue()
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
            try:
                self._scan_tree(self.root)  # what was dropped while ingestd was down
            except Exception:  # a bug, say: the worker's scans try again, the rest of the daemon starts
                log.exception("drop.watcher_error", folder=str(self.root))
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
            _stop_observer(self._observer, timeout)
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
        """A started watchdog observer (inotify, else polling), or None: the worker's own scans then suffice.

        Both of watchdog's observers walk the tree recursively: a tree too deep for them (RecursionError), like
        inotify's watch or instance limits (OSError), makes them fail; the next one is tried, with a log line.
        """
        interval = self.folder.poll_interval_seconds
        kinds: list[Any] = [PollingObserver] if self.folder.polling else [Observer, PollingObserver]
        for kind in kinds:
            observer: Any = kind(timeout=interval) if kind is PollingObserver else kind()
            try:
                observer.schedule(_EventHandler(self._paths), str(self.root), recursive=True)
                observer.start()
            except Exception as exc:  # noqa: BLE001 - any failure of the observer leaves the scans
                _stop_observer(observer, 1.0)
                self._observer_fallback(kind, exc)
                continue
            return observer
        return None

    def _observer_fallback(self, kind: Any, exc: BaseException | None) -> None:
        if exc is None:
            reason = "it stopped"
        elif isinstance(exc, RecursionError):
            reason = "it cannot follow a folder nested this deep"
        elif isinstance(exc, OSError):
            reason = _why(exc)
        else:
            reason = type(exc).__name__
        log.warning(
            "drop.watcher_polling_fallback",
            folder=str(self.root),
            observer="polling" if kind is PollingObserver else "inotify",
            reason=reason,
            rescan_seconds=self.rescan_seconds,
        )

    def _check_observer(self) -> None:
        """Let an observer whose thread died (watchdog walks a moved-in tree recursively) go: scans go on."""
        observer = self._observer
        if observer is None or _observer_running(observer):
            return
        self._observer = None
        _stop_observer(observer, 1.0)
        self._observer_fallback(type(observer), None)

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
                self._check_observer()
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

    # -- taking what has settled -------------------------------------------------------------------

    def _process_due(self) -> int:
        finished = 0
        for path, entry in sorted(self._pending.items()):
            if self._stopping.is_set():
                break
            if entry.due <= time.monotonic():
                current = self._settled(path, entry)
                if current is not None:
                    finished += self._take(path, current)
        self._remove_emptied_folders()
        return finished

    def _settled(self, path: Path, entry: _Pending) -> _Pending | None:
        """The entry of a file that has not changed since it was last looked at; None if it changed or went."""
        try:
            info = path.lstat()
        except FileNotFoundError:
            self._pending.pop(path, None)
            return None
        if not stat.S_ISREG(info.st_mode):  # replaced by a link, a pipe, ...
            self._skip(path, info)
            return None
        signature = _signature(info)
        if signature != entry.signature:
            self._pending[path] = _Pending(signature, time.monotonic() + self._settle)
            return None
        return entry

    def _take(self, path: Path, entry: _Pending) -> int:
        """Take one settled source; return 1 if it is finished (taken, quarantined or left), else 0."""
        detail = source_name(path.relative_to(self.root).as_posix())
        finished = False
        try:
            finished = self._take_source(path, detail, entry)
        except _Retry as exc:
            entry.due = time.monotonic() + exc.delay
            log.warning(
                "drop.file_retry",
                file=path_digest(detail),
                reason=hide_member_names(str(exc)),
                retry_in=exc.delay,
            )
        except _Stopped:
            pass
        except FileNotFoundError:  # gone (moved away by someone) before it was finished: nothing to do
            self._pending.pop(path, None)
        except _Failed as exc:
            finished = self._failed(path, detail, entry, exc)
        except OSError as exc:
            finished = self._failed(path, detail, entry, _Failed(f"cannot be taken: {_why(exc)}"))
        except Exception as exc:  # noqa: BLE001 - a journal error, a bug: logged with its traceback, the others go on
            failure = _Failed(f"cannot be taken: {type(exc).__name__}", unexpected=True)
            finished = self._failed(path, detail, entry, failure)
        if not finished:
            return 0
        self._pending.pop(path, None)
        self._note_emptied(path.parent)
        return 1

    def _failed(self, path: Path, detail: str, entry: _Pending, failure: _Failed) -> bool:
        """Count a failed attempt; give up on the file at `max_attempts`. Say whether it is finished."""
        entry.attempts += 1
        again = entry.attempts < self.folder.max_attempts
        retry_in = self.retry_seconds if again else None
        if failure.unexpected:  # with the traceback (this runs in the except clause)
            log.exception(
                "drop.file_failed",
                file=path_digest(detail),
                reason=hide_member_names(failure.reason),
                attempt=entry.attempts,
                retry_in=retry_in,
            )
        else:
            log.error(
                "drop.file_failed",
                file=path_digest(detail),
                reason=hide_member_names(failure.reason),
                attempt=entry.attempts,
                retry_in=retry_in,
            )
        if again:
            entry.due = time.monotonic() + self.retry_seconds
            return False
        reason = f"{failure.reason} (failed {entry.attempts} times: drop_folders[].max_attempts)"
        self._give_up(path, detail, entry, reason, readable=failure.readable)
        return True

    def _give_up(self, path: Path, detail: str, entry: _Pending, reason: str, *, readable: bool) -> None:
        """Move the file to quarantine with `reason`; if that fails too, leave it and keep a note in quarantine."""
        try:
            if not (readable or self._same_device(path)):
                raise _Failed("moving it to another file system means reading it, and it cannot be read")
            self._quarantine_source(path, detail, reason)
            return
        except FileNotFoundError:
            return  # gone meanwhile: nothing is left to keep
        except _Failed as exc:
            why = exc.reason
        except OSError as exc:
            why = _why(exc)
        except Exception as exc:  # noqa: BLE001 - the journal, say: the file is left in place all the same
            why = type(exc).__name__
        self._left[path] = entry.signature
        note_reason = f"{reason}; left in the drop folder, as it cannot be moved to quarantine ({why})"
        item = ""
        try:
            note = f"{note_reason}\nThe file is still in the drop folder: see `detail` in the .reason.json.\n"
            item = self.quarantine.put_bytes(
                "left-in-drop-folder.txt", note.encode(), note_reason, self._source(detail)
            ).name
        except Exception:  # noqa: BLE001 - the log line below is then the only record
            item = ""
        log.error("drop.file_left", file=path_digest(detail), item=item, reason=hide_member_names(note_reason))

    def _same_device(self, path: Path) -> bool:
        try:
            return path.lstat().st_dev == self.quarantine.root.stat().st_dev
        except OSError:
            return False

    def _source(self, detail: str) -> Source:
        return Source("folder", str(self.folder.path), detail, upload_of(detail))

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

    def _attach(self, detail: str, content: bytes | Readable, check: Callable[[], object]) -> str:
        """Keep a file or member that is not DICOM in the attachment spool; return the journal's outcome."""
        if self._stopping.is_set():
            raise _Stopped
        assert self.attachments is not None  # noqa: S101 - take_source attaches only when it is given
        try:
            stored = self.attachments.store(content, self._source(detail), path_parts(detail), check=check)
        except SpoolError as exc:
            raise _Retry(f"the attachment spool refused a file: {exc}", self.retry_seconds) from None
        log.info(
            "drop.file_attached",
            file=path_digest(detail),
            outcome=stored.outcome,
            batch_id=stored.batch_id,
            size=stored.size,
        )
        return stored.outcome

    def _take_source(self, path: Path, detail: str, entry: _Pending) -> bool:
        """Spool the file, or every good member of the archive, keep what is bad in quarantine, then finish it.

        Returns False when the file is not whole yet and waits; True when it is finished.
        """
        signature = entry.signature
        outcomes: list[str] = []

        def unchanged() -> None:
            self._check_unchanged(path, signature)

        def store(prepared: PreparedInstance, member: str) -> None:
            outcomes.append(self._store(prepared, member).outcome)

        def attach(member: str, content: bytes | Readable) -> None:
            outcomes.append(self._attach(member, content, unchanged))

        try:
            taken = take_source(
                path,
                detail,
                self.limits,
                size=signature.size,
                store=store,
                reject_member=self._quarantine_member,
                check=unchanged,
                identity=(signature.device, signature.inode),
                attachable=self.attachable,
                attach=None if self.attachments is None else attach,
            )
        except SourceIncomplete as exc:
            self._check_unchanged(path, signature)
            return self._incomplete(path, detail, entry, exc.reason)
        except SourceRejected as exc:
            self._check_unchanged(path, signature)
            self._quarantine_source(path, detail, exc.reason)
            return True
        except NotTheFileError:
            raise _Retry("the file changed while it was being read", 0.0) from None
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _Failed(f"cannot be read: {_why(exc)}", readable=False) from None
        self._check_unchanged(path, signature)
        self._finish(path)
        DROP_SOURCES.labels(folder=str(self.folder.path), outcome="taken").inc()
        if taken.archive is None:
            log.info(
                "drop.file_taken", file=path_digest(detail), instances=taken.instances, attached=taken.attached,
                spool=outcomes[0],
            )  # fmt: skip
            return True
        log.info(
            "drop.archive_taken",
            file=path_digest(detail),
            members=taken.instances + taken.rejected + taken.attached,
            instances=taken.instances,
            attached=taken.attached,
            quarantined=taken.rejected,
        )
        return True

    def _incomplete(self, path: Path, detail: str, entry: _Pending, reason: str) -> bool:
        """A settled file that is not whole: wait for the rest, up to `incomplete_seconds`, then quarantine it."""
        now = time.monotonic()
        bound = self.folder.incomplete_seconds
        if entry.incomplete_since is None:
            entry.incomplete_since = now
            log.warning(
                "drop.file_incomplete", file=path_digest(detail), reason=hide_member_names(reason), wait_seconds=bound
            )
        deadline = entry.incomplete_since + bound
        if now < deadline:
            entry.due = deadline  # unchanged, it stays as it is; a change starts it afresh
            return False
        reason = f"{reason} (unchanged and incomplete for {bound:g} s: drop_folders[].incomplete_seconds)"
        self._quarantine_source(path, detail, reason)
        return True

    def _quarantine_member(self, detail: str, name: str, data: bytes, reason: str) -> None:
        """Keep a bad member of an archive in quarantine (once its good ones are all spooled)."""
        try:
            item = self.quarantine.put_bytes(name, data, reason, self._source(detail))
        except OSError as exc:
            raise _Failed(f"cannot keep a bad member in quarantine: {_why(exc)}") from None
        log.warning(
            "drop.member_quarantined", file=path_digest(detail), item=item.name, reason=hide_member_names(reason)
        )

    def _quarantine_source(self, path: Path, detail: str, reason: str) -> None:
        try:
            item = self.quarantine.put_file(path, reason, self._source(detail))
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _Failed(f"cannot be moved to quarantine ({reason}): {_why(exc)}") from None
        DROP_SOURCES.labels(folder=str(self.folder.path), outcome="quarantined").inc()
        log.warning("drop.file_quarantined", file=path_digest(detail), item=item.name, reason=hide_member_names(reason))

    # -- after taking ------------------------------------------------------------------------------

    def _finish(self, path: Path) -> None:
        """Delete the taken source, or move it to the done folder under its relative path."""
        what = "removed" if self.done_folder is None else "moved to the done folder"
        try:
            if self.done_folder is None:
                path.unlink()
                fsync_dir(path.parent)
                return
            target = _numbered(self.done_folder / path.relative_to(self.root))
            make_dirs_durably(target.parent)
            move_durably(path, target)
        except FileNotFoundError:
            return  # gone already: its instances are spooled, nothing is lost
        except OSError as exc:
            raise _Failed(f"its instances are spooled, but it cannot be {what}: {_why(exc)}") from None

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
