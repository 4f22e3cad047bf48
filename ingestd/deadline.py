"""The last line of defence against a frozen process: a deadline kept by a thread that needs no GIL.

The daemon's own checks (a dead or wedged worker, SIGTERM) run in the main thread, in Python, so they need the
GIL. A thread that holds the GIL in C code and does not let go (Python's `re` backtracking on a hostile value
did; any C extension may) stops the main thread: no check runs, no signal handler runs, SIGTERM is ignored.
faulthandler's watchdog is a C thread that takes no GIL: armed with a deadline, it writes every thread's Python
stack to stderr and ends the process with status 1 when the deadline passes before it is armed again. The
daemon's main loop re-arms it at every tick and arms it with what is left of `stop_timeout_seconds` when a stop
begins; the journal commits every state change before the work it stands for, so a restart resumes.
"""

from __future__ import annotations

import faulthandler
import sys

__all__ = ["ProcessDeadline"]


def _stderr_fd() -> int:
    """The file descriptor of stderr (fd 2 when sys.stderr is not a real file)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        return 2


class ProcessDeadline:
    """End the process, with every thread's stack on stderr, unless `arm` is called again within its seconds."""

    def __init__(self) -> None:
        self.armed: float | None = None  # the seconds it was last armed with; None when disarmed

    def arm(self, seconds: float) -> None:
        """Start the count again: in `seconds` (at least 0.1), unless re-armed or disarmed, dump and exit 1."""
        self.armed = max(0.1, seconds)
        faulthandler.dump_traceback_later(self.armed, repeat=False, file=_stderr_fd(), exit=True)

    def disarm(self) -> None:
        if self.armed is not None:
            faulthandler.cancel_dump_traceback_later()
            self.armed = None
