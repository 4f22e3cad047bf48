"""The state directory's lock: one process at a time writes into a state directory (the daemon, or `ingestd import`
when no daemon runs)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

from ingestd.digestkey import load_digest_key
from ingestd.errors import IngestdError
from ingestd.fsmodes import restrict_tree, restrict_umask
from ingestd.logs import use_digest_key

__all__ = ["StateDirLockedError", "lock_holder", "lock_state_dir"]


class StateDirLockedError(IngestdError):
    """Another ingestd already runs on this state directory."""


def lock_state_dir(state: Path) -> IO[str]:
    """Take the state directory's lock (`ingestd.lock`, flock'd exclusively) and write our pid into it.

    Held for as long as the returned file stays open: by the daemon while it runs, by `ingestd import` while it
    works without one. Raises StateDirLockedError when another process holds it.

    Whoever holds the lock writes into the state directory: from here on this process creates files 0640 and
    folders 0750 whatever its umask was, what an earlier run left looser is tightened, and the installation's
    digest key (made on first use) keys the path digests in its logs.
    """
    restrict_umask()
    state.mkdir(parents=True, exist_ok=True, mode=0o750)
    lock = (state / "ingestd.lock").open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StateDirLockedError(
            f"another ingestd is already running on {state} (it holds {state / 'ingestd.lock'})"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    try:
        restrict_tree(state)
        use_digest_key(load_digest_key(state))
    except BaseException:
        lock.close()
        raise
    return lock


def lock_holder(state: Path) -> int | None:
    """The pid of the process holding the state directory's lock (the daemon, or `ingestd import` working without
    one; 0 if it has not written its pid yet), None when none holds it. Takes nothing: a shared lock tried and let go.
    """
    try:
        with (state / "ingestd.lock").open("r") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = lock.read().strip()
                return int(text) if text.isdigit() else 0
            return None
    except FileNotFoundError:
        return None
