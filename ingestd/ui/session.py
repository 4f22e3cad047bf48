"""The web page's login: the token or password a person types, and the signed session cookie that earns.

The token lives in `ui.token_file`, the passwords' hashes in `ui.password_file` (`ingestd.ui.passwords`): files only
the service's user may read (as a credentials file: `ingestd.xnat.credentials`), read again at every request, so
that a new token or password is taken up without a restart. A session is a cookie `<expires>.<nonce>.<mac>` (with
a password: `<expires>.<nonce>.<user>.<mac>`, the user name in base64url): the MAC is an HMAC-SHA-256 under a key
derived from the installation's digest key (`ingestd.digestkey`, or a random key of this process when it cannot be
read) and from the token, or from the user's line of the password file, so that changing the token ends every
session and changing a password ends that user's. Nothing is stored per session but the nonces of those logged out
(until they expire).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ingestd.errors import IngestdError

__all__ = ["COOKIE", "MIN_TOKEN_CHARS", "Session", "Sessions", "TokenError", "read_private", "read_token"]

COOKIE = "ingestd_ui"
MIN_TOKEN_CHARS = 16
_MAX_TOKEN_BYTES = 4096


class TokenError(IngestdError):
    """The configured token file cannot be used (missing, readable by others, empty or too short)."""


def read_private(path: Path, what: str, limit: int) -> bytes:
    """Up to `limit` + 1 bytes of a secret file (the token file, the password file): refused (TokenError, never
    with its content) unless it is a regular file only its owner may read."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise TokenError(f"the {what} {path} is not a regular file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise TokenError(f"the {what} {path} is readable by others: chmod 600 {path}")
        with path.open("rb") as file:
            return file.read(limit + 1)
    except OSError as exc:
        raise TokenError(f"cannot read the {what} {path}: {exc.strerror or type(exc).__name__}") from None


def read_token(path: Path) -> str:
    """The token in `path`: refused (TokenError, never with the token) unless only its owner may read it."""
    data = read_private(path, "ui token file", _MAX_TOKEN_BYTES)
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        token = ""
    if len(data) > _MAX_TOKEN_BYTES or len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise TokenError(
            f"the ui token file {path} must hold one token of {MIN_TOKEN_CHARS} to {_MAX_TOKEN_BYTES} characters"
            f" without spaces: e.g. `openssl rand -hex 24 > {path}; chmod 600 {path}`"
        )
    return token


def token_matches(given: str, token: str) -> bool:
    """Whether the typed token is the configured one, in time that does not depend on where they differ."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in person: `user` (None with the token), and `secret`, what its keys derive from (the token, or the
    user's line of the password file: a new password ends that user's sessions)."""

    expires: int
    nonce: str
    user: str | None = None
    secret: str = field(default="", repr=False)


def _encode_user(user: str) -> str:
    return base64.urlsafe_b64encode(user.encode("utf-8")).decode("ascii").rstrip("=")


def _decode_user(text: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None


class Sessions:
    """Signs and checks session cookies for one token or password line (a new one: new keys, earlier cookies
    refused)."""

    def __init__(self, base_key: bytes | None, lifetime_seconds: float) -> None:
        self._base_key = base_key if base_key is not None else secrets.token_bytes(32)
        self.lifetime_seconds = lifetime_seconds
        self._ended: dict[str, int] = {}  # nonce -> expiry: sessions logged out before they expired
        self._lock = threading.Lock()

    def _key(self, secret: str) -> bytes:
        material = b"ingestd-ui-session\0" + hashlib.sha256(secret.encode("utf-8")).digest()
        return hmac.new(self._base_key, material, hashlib.sha256).digest()

    def sign(
        self, secret: str, *, user: str | None = None, now: float | None = None, expires: int | None = None
    ) -> str:
        """A new session's cookie value (`expires`: Unix time; by default `lifetime_seconds` from `now`): `secret` is
        the token, or `user`'s line of the password file."""
        now = time.time() if now is None else now
        expires = int(now + self.lifetime_seconds) if expires is None else expires
        payload = f"{expires}.{secrets.token_urlsafe(16)}"
        if user is not None:
            payload += f".{_encode_user(user)}"
        mac = hmac.new(self._key(secret), payload.encode("ascii"), hashlib.sha256).hexdigest()
        return f"{payload}.{mac}"

    def check(
        self, value: str, secret_of: Callable[[str | None], str | None], *, now: float | None = None
    ) -> Session | None:
        """The session a cookie value stands for, or None: forged, altered, expired, logged out, or its user's
        secret gone or changed (`secret_of(user)`: the token for None, a user's password line, None if none)."""
        parts = value.split(".")
        user = _decode_user(parts[2]) if len(parts) == 4 else None
        malformed = len(parts) not in (3, 4) or not parts[0].isdigit() or len(parts[0]) > 12
        secret = None if malformed or (len(parts) == 4 and user is None) else secret_of(user)
        if secret is None:
            return None
        try:
            expected = hmac.new(self._key(secret), ".".join(parts[:-1]).encode("ascii"), hashlib.sha256).hexdigest()
        except UnicodeEncodeError:
            return None
        session = Session(int(parts[0]), parts[1], user, secret)
        now = time.time() if now is None else now
        with self._lock:
            ended = session.nonce in self._ended
        if not hmac.compare_digest(expected, parts[-1]) or session.expires <= now or ended:
            return None
        return session

    def form_token(self, session: Session, action: str) -> str:
        """The CSRF token of a form posted to `action` (a path) in `session`: HMAC(session key, session id + path);
        the session key derives from the token or from the user's password line."""
        message = f"csrf\0{session.nonce}\0{action}".encode("utf-8", "replace")
        return hmac.new(self._key(session.secret), message, hashlib.sha256).hexdigest()

    def form_token_matches(self, session: Session, action: str, given: str) -> bool:
        """Whether `given` is the CSRF token of `action` in `session` (compared in constant time)."""
        return hmac.compare_digest(self.form_token(session, action).encode(), given.encode("utf-8", "replace"))

    def end(self, session: Session, *, now: float | None = None) -> None:
        """Log a session out: its cookie is refused from now on, even if a copy of it was kept."""
        now = time.time() if now is None else now
        with self._lock:
            self._ended = {nonce: at for nonce, at in self._ended.items() if at > now}
            self._ended[session.nonce] = session.expires
