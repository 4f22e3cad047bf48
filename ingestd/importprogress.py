"""`ingestd import`'s progress where the daemon can read it: one small JSON file per running import.

An import writes `imports/<pid>.json` under the state directory (replaced atomically, at most every
PROGRESS_SECONDS and when its phase changes): when it started, its phase (`scanning` while it takes files,
`delivering` while it waits for its studies) and its counts (`ingestd.progress.Counts`). Nothing else: no path and
no file name (a folder may be named after a patient). The file goes when the import ends, however it ends
(finished, failed, interrupted).

An import killed outright (kill -9, a power cut) cannot remove its file: while it runs it holds an exclusive lock
(flock) on `imports/<pid>.lock`, which the kernel lets go when the process is gone. The reader (the web page,
`ingestd status`) takes an import whose lock it can take as gone: it ignores its file and removes both. A pid used
again by another process after a restart does not fool it: the lock is what counts, not the pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import structlog

from ingestd.progress import PROGRESS_SECONDS, Bar, Counts, Lines

__all__ = ["IMPORTS_DIR", "ImportProgress", "Recorded", "RunningImport", "running_imports"]

log = structlog.get_logger("ingestd.import")

IMPORTS_DIR = "imports"
_MAX_FILE_BYTES = 4096
_MAX_FILES = 100  # a state directory with more files than this in imports/ is not read further
# What a progress file may say: the counts as integers (no other field of Counts is written or read).
_COUNT_KEYS = tuple(key for key, value in asdict(Counts()).items() if isinstance(value, int) and key != "delivering")


@dataclass(frozen=True, slots=True)
class RunningImport:
    """One import under way, as its progress file says."""

    pid: int
    started: float
    updated: float
    phase: str  # scanning | delivering
    counts: dict[str, int]

    def elapsed(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.started)


class ImportProgress:
    """The progress file of this import: `start()` it, `update()` it as often as you like, `remove()` it at the end."""

    def __init__(self, state_dir: Path, interval: float = PROGRESS_SECONDS, *, pid: int | None = None) -> None:
        self.folder = state_dir / IMPORTS_DIR
        self.pid = os.getpid() if pid is None else pid
        self.interval = interval
        self.started = time.time()
        self._lock: IO[bytes] | None = None
        self._written_at = -interval
        self._phase = ""
        self._done = False

    @property
    def path(self) -> Path:
        return self.folder / f"{self.pid}.json"

    @property
    def lock_path(self) -> Path:
        return self.folder / f"{self.pid}.lock"

    def start(self, counts: Counts) -> None:
        """Create the folder and the lock (held until `remove`), and write the first file. Best effort: a state
        directory this process may not write to leaves the import without a progress file, not failing."""
        try:
            self.folder.mkdir(mode=0o750, exist_ok=True)
            # Locked under another name, then renamed: `<pid>.lock` is never there unlocked while its import runs.
            locking = self.folder / f".{self.pid}.lock.tmp"
            descriptor = os.open(locking, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            self._lock = os.fdopen(descriptor, "wb")
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(locking, self.lock_path)
        except OSError as exc:
            self._close_lock()
            self._done = True
            log.warning("import.progress_unrecorded", reason=exc.strerror or type(exc).__name__)
            return
        self.update(counts, force=True)

    def update(self, counts: Counts, *, force: bool = False) -> None:
        """Write the counts if PROGRESS_SECONDS passed since the last write, or the phase changed, or `force`."""
        if self._done or self._lock is None:
            return
        phase = "delivering" if counts.delivering else "scanning"
        now = time.monotonic()
        if not force and phase == self._phase and now - self._written_at < self.interval:
            return
        record = {
            "pid": self.pid,
            "started": round(self.started, 3),
            "updated": round(time.time(), 3),
            "phase": phase,
            "counts": {key: int(getattr(counts, key)) for key in _COUNT_KEYS},
        }
        temporary = self.folder / f".{self.pid}.json.tmp"
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                json.dump(record, file)
            os.replace(temporary, self.path)
        except OSError:
            return  # a full disk must not stop the import: the page shows the last counts written
        self._written_at, self._phase = now, phase

    def remove(self) -> None:
        """The import ended: its file goes (the file first, then the lock it holds)."""
        self._done = True
        for path in (self.path, self.folder / f".{self.pid}.json.tmp"):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self.lock_path.unlink(missing_ok=True)
        self._close_lock()

    def _close_lock(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.close()
            self._lock = None


class Recorded:
    """The import's progress shown (a bar or lines) and recorded in its progress file; a context manager that
    writes the file on entry and removes it on exit, whatever ends the import."""

    def __init__(self, shown: Lines | Bar, state_dir: Path, counts: Counts) -> None:
        self.shown = shown
        self.record = ImportProgress(state_dir)
        self.counts = counts

    def show(self, counts: Counts, *, final: bool = False) -> None:
        self.shown.show(counts, final=final)
        self.record.update(counts)

    def close(self, counts: Counts) -> None:
        self.shown.close(counts)

    def __enter__(self) -> Recorded:
        self.record.start(self.counts)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.record.remove()


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # another user's process: it exists
    return False


def _gone(lock_path: Path, pid: int) -> bool:
    """Whether the import that held `lock_path` is gone: its lock can be taken (or the file is missing)."""
    try:
        descriptor = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError:  # not ours to open (another user's import): whether its process still exists
        return _process_gone(pid)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held: the import runs
        return False
    finally:
        os.close(descriptor)
    return True


def _parse(text: str, pid: int) -> RunningImport | None:
    try:
        record: Any = json.loads(text)
        counts = record["counts"]
        return RunningImport(
            pid=pid,
            started=float(record["started"]),
            updated=float(record["updated"]),
            phase=str(record["phase"]) if record["phase"] in ("scanning", "delivering") else "scanning",
            counts={key: int(counts.get(key, 0)) for key in _COUNT_KEYS},
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def running_imports(state_dir: Path) -> list[RunningImport]:
    """The imports under way on `state_dir`, oldest first. The files of imports that are gone are removed."""
    folder = state_dir / IMPORTS_DIR
    try:
        names = sorted(entry.name for entry in os.scandir(folder) if entry.name.endswith(".json"))[:_MAX_FILES]
    except OSError:
        return []
    found: list[RunningImport] = []
    for name in names:
        stem = name.removesuffix(".json")
        if not stem.isdigit():
            continue
        pid, path = int(stem), folder / name
        if _gone(folder / f"{stem}.lock", pid):
            for stale in (path, folder / f"{stem}.lock", folder / f".{stem}.json.tmp"):
                with contextlib.suppress(OSError):
                    stale.unlink(missing_ok=True)
            continue
        try:
            with path.open("r", encoding="utf-8") as file:
                text = file.read(_MAX_FILE_BYTES + 1)
        except OSError:
            continue
        running = _parse(text, pid) if len(text) <= _MAX_FILE_BYTES else None
        if running is not None:
            found.append(running)
    found.sort(key=lambda running: running.started)
    return found
