"""The installation's digest key: what keys the digests that name dropped paths and archive members in logs.

A plain SHA-256 of `DOE^JOHN_MRN123/IM0001` can be recovered by hashing guesses (a dictionary of names and record
numbers); an HMAC under a secret that never leaves the state directory cannot. The key is made once per state
directory, atomically (two processes starting together end up with the same one), 0600, as `digest.key`; every
tool that names paths from the state directory (the daemon, `ingestd import`, `ingestd status`) uses it, so that
their digests agree with each other and with the logs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from pathlib import Path

from ingestd.errors import IngestdError

__all__ = ["KEY_FILE", "DigestKeyError", "load_digest_key", "read_digest_key"]

KEY_FILE = "digest.key"
_KEY_BYTES = 32


class DigestKeyError(IngestdError):
    """The state directory's digest key exists but cannot be used."""


def _parse(path: Path, text: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise DigestKeyError(
            f"{path} is not a digest key ({_KEY_BYTES * 2} hex digits); move it away and ingestd makes a new one "
            "(log digests made with the old key then no longer match new ones)"
        )
    return key


def read_digest_key(state_dir: Path) -> bytes | None:
    """The state directory's key, or None when there is none yet or it cannot be read (another user's)."""
    path = state_dir / KEY_FILE
    try:
        text = path.read_text(encoding="ascii")
    except (FileNotFoundError, PermissionError, UnicodeDecodeError):
        return None
    return _parse(path, text)


def load_digest_key(state_dir: Path) -> bytes:
    """The state directory's key, made (0600, atomically, once) if there is none yet. Raises DigestKeyError, OSError."""
    path = state_dir / KEY_FILE
    if not path.exists():
        fd, temporary = tempfile.mkstemp(prefix=f".{KEY_FILE}.", dir=state_dir)  # 0600
        try:
            with os.fdopen(fd, "wb") as file:  # closed once, here: a second close could close another thread's file
                file.write(f"{secrets.token_hex(_KEY_BYTES)}\n".encode())
                file.flush()
                os.fsync(file.fileno())
            with contextlib.suppress(FileExistsError):  # another process made it first: theirs it is
                os.link(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)
        directory = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    if stat.S_IMODE(path.lstat().st_mode) != 0o600:
        path.chmod(0o600)
    return _parse(path, path.read_text(encoding="ascii"))
