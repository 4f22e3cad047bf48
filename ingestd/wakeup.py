"""Waking a waiting thread from a signal handler without taking a lock: a self-pipe.

A Python signal handler runs in the main thread between two bytecodes, possibly while that very thread holds
a lock. `threading.Event.set()` takes the Event's lock, which is not reentrant: when the main thread held it
at that moment (`Event.wait()` takes it again on its way out, so a second signal soon after the first lands
right there), the handler waits for ever on a lock its own thread holds. A receiver process gets SIGTERM
several times in a row when the daemon is killed (PR_SET_PDEATHSIG fires as the daemon's threads end; three
were seen) and hung exactly so. A pipe has no lock: the handler writes a byte, the waiter selects on the
other end.
"""

from __future__ import annotations

import contextlib
import os
import select

__all__ = ["Wakeup"]


class Wakeup:
    """A wake-up call that a signal handler (or any thread) may give: `notify`; one thread `wait`s for it."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def notify(self) -> None:
        """Wake the waiter (now, or at its next `wait`). Takes no lock; safe in a signal handler."""
        with contextlib.suppress(BlockingIOError):  # the pipe is full: a wake-up is pending already
            os.write(self._write, b"\0")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until notified (True) or until `timeout` seconds have passed (False); take every pending call."""
        ready, _, _ = select.select([self._read], [], [], timeout)
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass
        return True

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)
