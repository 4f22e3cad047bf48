"""The web page's login: the token a person types, and the signed session cookie that a right token earns.

The token lives in `ui.token_file`, a file only the service's user may read (as a credentials file:
`ingestd.xnat.credentials`); it is read again at every login, so that a new token is taken up without a restart.
A session is a cookie `<expires>.<nonce>.<mac>`: the MAC is an HMAC-SHA-256 under a key derived from the
installation's digest key (`ingestd.digestkey`, or a random key of this process when it cannot be read) and from
the token itself, so that changing the token ends every session. Nothing is stored per session but the nonces of
those logged out (until they expire).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ingestd.errors import IngestdError

__all__ = ["COOKIE", "MIN_TOKEN_CHARS", "Sessions", "TokenError", "read_token"]

COOKIE = "ingestd_ui"
MIN_TOKEN_CHARS = 16
_MAX_TOKEN_BYTES = 4096


class TokenError(IngestdError):
    """The configured token file cannot be used (missing, readable by others, empty or too short)."""


def read_token(path: Path) -> str:
    """The token in `path`: refused (TokenError, never with the token) unless only its owner may read it."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise TokenError(f"the ui token file {path} is not a regular file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise TokenError(f"the ui token file {path} is readable by others: chmod 600 {path}")
        with path.open("rb") as file:
            data = file.read(_MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise TokenError(f"cannot read the ui token file {path}: {exc.strerror or type(exc).__name__}") from None
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
    expires: int
    nonce: str


class Sessions:
    """Signs and checks session cookies for one token (a new token: new keys, every earlier cookie refused)."""

    def __init__(self, base_key: bytes | None, lifetime_seconds: float) -> None:
        self._base_key = base_key if base_key is not None else secrets.token_bytes(32)
        self.lifetime_seconds = lifetime_seconds
        self._ended: dict[str, int] = {}  # nonce -> expiry: sessions logged out before they expired
        self._lock = threading.Lock()

    def _key(self, token: str) -> bytes:
        material = b"ingestd-ui-session\0" + hashlib.sha256(token.encode("utf-8")).digest()
        return hmac.new(self._base_key, material, hashlib.sha256).digest()

    def sign(self, token: str, *, now: float | None = None, expires: int | None = None) -> str:
        """A new session's cookie value (`expires`: Unix time; by default `lifetime_seconds` from `now`)."""
        now = time.time() if now is None else now
        expires = int(now + self.lifetime_seconds) if expires is None else expires
        payload = f"{expires}.{secrets.token_urlsafe(16)}"
        mac = hmac.new(self._key(token), payload.encode("ascii"), hashlib.sha256).hexdigest()
        return f"{payload}.{mac}"

    def check(self, value: str, token: str, *, now: float | None = None) -> Session | None:
        """The session a cookie value stands for, or None: forged, altered, expired or logged out."""
        parts = value.split(".")
        if len(parts) != 3 or not parts[0].isdigit() or len(parts[0]) > 12:
            return None
        payload = f"{parts[0]}.{parts[1]}"
        try:
            expected = hmac.new(self._key(token), payload.encode("ascii"), hashlib.sha256).hexdigest()
        except UnicodeEncodeError:
            return None
        if not hmac.compare_digest(expected, parts[2]):
            return None
        session = Session(int(parts[0]), parts[1])
        now = time.time() if now is None else now
        if session.expires <= now:
            return None
        with self._lock:
            if session.nonce in self._ended:
                return None
        return session

    def form_token(self, session: Session, token: str, action: str) -> str:
        """The CSRF token of a form posted to `action` (a path) in `session`: HMAC(session key, session id + path)."""
        message = f"csrf\0{session.nonce}\0{action}".encode("utf-8", "replace")
        return hmac.new(self._key(token), message, hashlib.sha256).hexdigest()

    def form_token_matches(self, session: Session, token: str, action: str, given: str) -> bool:
        """Whether `given` is the CSRF token of `action` in `session` (compared in constant time)."""
        return hmac.compare_digest(self.form_token(session, token, action).encode(), given.encode("utf-8", "replace"))

    def end(self, session: Session, *, now: float | None = None) -> None:
        """Log a session out: its cookie is refused from now on, even if a copy of it was kept."""
        now = time.time() if now is None else now
        with self._lock:
            self._ended = {nonce: at for nonce, at in self._ended.items() if at > now}
            self._ended[session.nonce] = session.expires
