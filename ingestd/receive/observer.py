"""The watchdog side of the drop-folder watcher: file-system events as paths to look at.

A watchdog observer (inotify, or polling for network shares) only tells the watcher which paths to look at
(`ingestd.receive.watcher`); it never decides anything. `_EventHandler` queues the paths of events; an
observer whose threads died is noticed by `_observer_running` and let go by `_stop_observer`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from typing import Any

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler

log = structlog.get_logger("ingestd.watcher")

# Our own reads cause open/close-without-write events, and a folder is "modified" by every file created
# in it: neither says anything new about a path to take.
_IGNORED_EVENTS = frozenset({"opened", "closed_no_write", "attrib"})


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


def _observer_running(observer: Any) -> bool:
    """Whether a watchdog observer and its emitters (and the inotify reader they share) still run."""
    if not observer.is_alive():
        return False
    for emitter in list(observer.emitters):
        reader = getattr(emitter, "_inotify_fd", None)  # watchdog's process-wide inotify reader thread
        if not emitter.is_alive() or (isinstance(reader, threading.Thread) and not reader.is_alive()):
            return False
    return True


def _stop_observer(observer: Any, timeout: float) -> None:
    with contextlib.suppress(Exception):  # an observer that failed to start may fail to stop: nothing to keep
        observer.stop()
        if observer.is_alive():
            observer.join(timeout)
