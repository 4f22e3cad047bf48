"""The web page's password file (`ui.password_file`): one `user:hash` line per person, and `ingestd ui-password`.

A hash is scrypt (the standard library's `hashlib.scrypt`: memory-hard, no dependency to add) of the password with
a random salt of its own, written `scrypt$N$r$p$salt$hash` (salt and hash in unpadded base64url): N = 2^15, r = 8,
p = 1 take 32 MiB and 0.2 to 0.3 s of a core per check (measured on a small 2-core server), which a guesser pays
for every guess. Lines that are blank or start with `#` are kept as they are. The file is a secret like the token
file: a regular file only its owner may read (`ingestd.ui.session.read_private`), read again at every request, so
that a changed password is taken up (and that user's sessions ended) without a restart.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import getpass
import hashlib
import hmac
import os
import re
import secrets
import sys
from pathlib import Path
from typing import TextIO

from ingestd.durable import fsync_dir
from ingestd.errors import IngestdError
from ingestd.ui.session import read_private

__all__ = [
    "MIN_PASSWORD_CHARS",
    "PasswordError",
    "PasswordFileError",
    "hash_password",
    "read_passwords",
    "run_ui_password",
    "verify_password",
    "write_password",
]

SCHEME = "scrypt"
N, R, P = 2**15, 8, 1
SALT_BYTES, HASH_BYTES = 16, 32
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024
_MAX_FILE_BYTES = 256 * 1024
USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# What a hash in the file may ask for: enough for stronger settings, not enough to make one check take the machine.
_N_RANGE, _R_RANGE, _P_RANGE = (2**10, 2**20), (1, 32), (1, 16)


class PasswordFileError(IngestdError):
    """The password file cannot be used (missing, readable by others, or a line that is not `user:hash`)."""


class PasswordError(IngestdError):
    """A password or user name that cannot be set (too short, not typed the same twice, a bad user name)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    memory = 128 * r * (n + p + 2) + (1 << 20)
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=memory, dklen=length)


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    """`scrypt$N$r$p$salt$hash` of `password` with a new random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(_scrypt(password, salt, n, r, p, HASH_BYTES))}"


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """The parameters, salt and hash of an encoded hash; ValueError when it is not one ingestd accepts."""
    scheme, n_text, r_text, p_text, salt_text, hash_text = encoded.split("$")  # ValueError: not six fields
    n, r, p = int(n_text), int(r_text), int(p_text)
    try:
        salt, digest = _unb64(salt_text), _unb64(hash_text)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if (
        scheme != SCHEME
        or n & (n - 1)
        or not _N_RANGE[0] <= n <= _N_RANGE[1]
        or not _R_RANGE[0] <= r <= _R_RANGE[1]
        or not _P_RANGE[0] <= p <= _P_RANGE[1]
        or len(salt) < SALT_BYTES
        or not 16 <= len(digest) <= 64
    ):
        raise ValueError("parameters out of range")
    return n, r, p, salt, digest


_DUMMY = f"{SCHEME}${N}${R}${P}${_b64(bytes(SALT_BYTES))}${_b64(bytes(HASH_BYTES))}"


def verify_password(password: str, encoded: str | None) -> bool:
    """Whether `password` is the one `encoded` was made from (compared in constant time). With `encoded` None (no
    such user) a hash is computed all the same, so that the answer takes as long as for a user that exists."""
    n, r, p, salt, digest = _parse(encoded or _DUMMY)
    given = _scrypt(password[:MAX_PASSWORD_CHARS], salt, n, r, p, len(digest))
    return hmac.compare_digest(given, digest) and encoded is not None


def _entries(text: str, path: Path) -> dict[str, str]:
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()  # noqa: PLW2901 - the line, trimmed
        if not line or line.startswith("#"):
            continue
        user, _, encoded = line.partition(":")
        try:
            _parse(encoded)
        except ValueError:
            user = ""
        if USER.fullmatch(user) is not None and user not in users:
            users[user] = encoded
            continue
        # never the line itself: a password typed where a hash belongs would land in the log
        raise PasswordFileError(
            f"the ui password file {path} line {number} is not `user:scrypt$...` (a user named once): write its"
            f" entries with `ingestd ui-password --config FILE USER`"
        )
    return users


def _read_text(path: Path) -> str:
    try:
        data = read_private(path, "ui password file", _MAX_FILE_BYTES)
    except IngestdError as exc:
        raise PasswordFileError(str(exc)) from None
    if len(data) > _MAX_FILE_BYTES:
        raise PasswordFileError(f"the ui password file {path} is larger than {_MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PasswordFileError(f"the ui password file {path} is not UTF-8 text") from None


def read_passwords(path: Path) -> dict[str, str]:
    """User -> encoded hash, from `path`: refused (PasswordFileError) unless only its owner may read it."""
    return _entries(_read_text(path), path)


def write_password(path: Path, user: str, password: str) -> bool:
    """Set `user`'s password in `path` (created 0600, or replaced whole by a rename: a reader sees the old file or
    the new one); True when the user had one. Other lines are kept as they are."""
    if USER.fullmatch(user) is None:
        raise PasswordError("a user name is 1 to 64 letters, digits, and . _ @ - (starting with a letter or digit)")
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise PasswordError(f"a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters")
    lines: list[str] = []
    owner: tuple[int, int] | None = None
    if path.exists():
        text = _read_text(path)
        _entries(text, path)  # the daemon's rules: a file others may read, or with a broken line, is left alone
        lines = text.splitlines()
        info = path.stat()
        owner = (info.st_uid, info.st_gid)
    entry = f"{user}:{hash_password(password)}"
    had = any(line.strip().partition(":")[0] == user for line in lines)
    lines = [entry if line.strip().partition(":")[0] == user else line for line in lines] if had else [*lines, entry]
    _replace(path, ("\n".join(lines) + "\n").encode("utf-8"), owner)
    return had


def _replace(path: Path, data: bytes, owner: tuple[int, int] | None) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise PasswordFileError(f"cannot write next to {path}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)
            if owner is not None and os.geteuid() == 0:  # root edits the service user's file: it stays theirs
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise PasswordFileError(f"cannot write {path}: {exc.strerror}") from None
    fsync_dir(path.parent)


def _ask(stdin: TextIO) -> str:
    """The password: typed twice without echo at a terminal, else the first line of the standard input."""
    if not stdin.isatty():
        return stdin.readline().rstrip("\r\n")
    first = getpass.getpass("New password: ")
    if first != getpass.getpass("The same again: "):
        raise PasswordError("the two passwords differ; nothing was changed")
    return first


def run_ui_password(config_path: Path, user: str, stdin: TextIO | None = None) -> int:
    """`ingestd ui-password --config FILE USER`: set USER's password in the configuration's ui.password_file."""
    from ingestd.config import load_config  # noqa: PLC0415 - the command's only use of the configuration

    path = load_config(config_path).ui.password_file
    if path is None:
        raise PasswordError(f"{config_path} names no ui.password_file: add `ui: {{password_file: FILE}}` first")
    if USER.fullmatch(user) is None:  # before the password is asked for
        raise PasswordError("a user name is 1 to 64 letters, digits, and . _ @ - (starting with a letter or digit)")
    existed = path.exists()
    had = write_password(path, user, _ask(stdin or sys.stdin))
    what = "changed" if had else "set"
    ending = ": that user's sessions have ended" if had else ""
    print(f"{what} the password of {user} in {path} (mode 0600){ending}")
    if not existed and os.geteuid() == 0:
        print(f"{path} is new and belongs to root: chown it to the user ingestd runs as (or run this as that user)")
    return 0
