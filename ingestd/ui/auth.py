"""Who a request to the web page comes from: a session cookie earned at the login form (with the token of
`ui.token_file`, or a user's password of `ui.password_file`), or with `ui.http_basic` the browser's HTTP Basic
login, checked at every request against the password file (`ingestd.ui.passwords`).

Wrong tokens and passwords, from anyone, count together: after MAX_WRONG_PER_MINUTE in a minute every login waits
until the minute has passed (HTTP Basic credentials already checked right still pass: a guesser does not lock the
lab out). A right password is remembered (as an HMAC under a key of this process, with its user's hash) so that
Basic, which sends it with every request, pays scrypt once, not per page.

HTTP Basic sends the password with every request: it is accepted only where it has not crossed a network in
clear, that is from this machine itself (a browser here, or a reverse proxy here that says `X-Forwarded-Proto:
https`). A request from another machine, or one a proxy forwarded without saying https, is refused (403) without
asking for a password (a 401 would make the browser send it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Any, Literal

from ingestd.errors import IngestdError
from ingestd.ui.passwords import MAX_PASSWORD_CHARS, read_passwords, verify_password
from ingestd.ui.session import COOKIE, Session, Sessions, read_token, token_matches
from ingestd.uiconfig import Ui, is_loopback

__all__ = ["BASIC_CHALLENGE", "MAX_WRONG_PER_MINUTE", "Auth", "Granted", "Refusal"]

# Wrong tokens or passwords tolerated per minute (from anyone): beyond, every login waits until the minute has
# passed. A token of 16+ random characters cannot be guessed anyway; this keeps a flood of guesses out of the log.
MAX_WRONG_PER_MINUTE = 20
BASIC_CHALLENGE = ("WWW-Authenticate", 'Basic realm="ingestd", charset="UTF-8"')
_BASIC_SESSION = "ingestd.ui.basic"  # the environ key of a Basic request's session, once checked
_MAX_REMEMBERED = 256
_HASHING_AT_ONCE = 2  # scrypt takes 32 MiB each: a burst of logins queues rather than taking the machine's memory
_UNAVAILABLE = "The login is unavailable; the log says why."
_FORWARDED = ("HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_HOST", "HTTP_FORWARDED")


@dataclass(frozen=True)
class Granted:
    """A right login: the new session's cookie value, and who (None with the token)."""

    cookie: str
    user: str | None


@dataclass(frozen=True)
class Refusal:
    """A refused login or Basic request: the HTTP code, why (logged; None: nothing to log) and what the page says;
    `form`: show the login form again."""

    code: int
    reason: str | None
    message: str
    user: str | None = None
    form: bool = False


def _first(value: object) -> str:
    return str(value or "").split(",")[0].strip().lower()


def _unencrypted(environ: dict[str, Any]) -> bool:
    """Whether Basic credentials of this request crossed (or would cross) a network in clear."""
    if environ.get("wsgi.url_scheme") == "https":
        return False
    if not is_loopback(str(environ.get("REMOTE_ADDR") or "")):
        return True  # another machine, over plain HTTP (what it says in X-Forwarded-Proto proves nothing)
    proxied = any(environ.get(header) for header in _FORWARDED)
    return proxied and _first(environ.get("HTTP_X_FORWARDED_PROTO")) != "https"


class Auth:
    """The login of the web page as configured by `ui` (files read again at every request)."""

    def __init__(self, ui: Ui, base_key: bytes | None, lifetime_seconds: float) -> None:
        self.ui = ui
        self.sessions = Sessions(base_key, lifetime_seconds)
        self.wrong: deque[float] = deque()  # when wrong tokens or passwords came, in the last minute
        self._lock = threading.Lock()
        self._remember_key = secrets.token_bytes(32)
        self._remembered: set[bytes] = set()
        self._hashing = threading.BoundedSemaphore(_HASHING_AT_ONCE)

    @property
    def kind(self) -> Literal["token", "password"] | None:
        """What the login form asks for; None: no login is configured (the page is locked)."""
        if self.ui.password_file is not None:
            return "password"
        return "token" if self.ui.token_file is not None else None

    @property
    def _noun(self) -> str:
        return "passwords" if self.kind == "password" else "tokens"

    def _users(self) -> dict[str, str]:
        assert self.ui.password_file is not None  # noqa: S101 - only in the password kind
        return read_passwords(self.ui.password_file)

    def problem(self) -> str | None:
        """Why the configured file cannot be used (never with its content), or None."""
        try:
            if self.ui.password_file is not None:
                self._users()
            elif self.ui.token_file is not None:
                read_token(self.ui.token_file)
        except IngestdError as exc:
            return str(exc)
        return None

    def secret_of(self, user: str | None) -> str | None:
        """What `user`'s session keys derive from: the token (user None), the user's password line; None if none."""
        try:
            if self.ui.password_file is not None:
                encoded = self._users().get(user) if user is not None else None
                return None if encoded is None else f"{user}:{encoded}"
            if self.ui.token_file is not None and user is None:
                return read_token(self.ui.token_file)
        except IngestdError:
            return None
        return None

    def session(self, environ: dict[str, Any]) -> Session | None:
        """The request's valid session: its cookie's, or with HTTP Basic the one `basic` checked; else None."""
        if self.ui.http_basic:
            session = environ.get(_BASIC_SESSION)
            return session if isinstance(session, Session) else None
        try:
            morsel = SimpleCookie(str(environ.get("HTTP_COOKIE") or "")).get(COOKIE)
        except CookieError:
            return None
        return None if morsel is None else self.sessions.check(morsel.value, self.secret_of)

    # -- wrong attempts -------------------------------------------------------------------------------------

    def _note_wrong(self) -> None:
        with self._lock:
            self.wrong.append(time.monotonic())

    def throttled(self) -> bool:
        """Whether MAX_WRONG_PER_MINUTE wrong tokens or passwords came in the last minute."""
        now = time.monotonic()
        with self._lock:
            while self.wrong and self.wrong[0] < now - 60:
                self.wrong.popleft()
            return len(self.wrong) >= MAX_WRONG_PER_MINUTE

    def _throttle_refusal(self, user: str | None = None) -> Refusal:
        return Refusal(
            429, f"too many wrong {self._noun} in the last minute", f"Too many wrong {self._noun}: wait a minute.", user
        )

    # -- passwords ------------------------------------------------------------------------------------------

    def _mark(self, user: str, password: str, encoded: str) -> bytes:
        text = f"{user}\0{password}\0{encoded}".encode("utf-8", "replace")
        return hmac.new(self._remember_key, text, hashlib.sha256).digest()

    def _password_right(self, user: str, password: str, users: dict[str, str]) -> tuple[bool, bool]:
        """(right, known before): `password` is `user`'s; a right one checked before is not hashed again."""
        encoded = users.get(user)
        if encoded is not None:
            mark = self._mark(user, password, encoded)
            with self._lock:
                if mark in self._remembered:
                    return True, True
        with self._hashing:
            right = verify_password(password[:MAX_PASSWORD_CHARS], encoded)  # an unknown user takes as long
        if right and encoded is not None:
            with self._lock:
                if len(self._remembered) >= _MAX_REMEMBERED:
                    self._remembered.clear()
                self._remembered.add(mark)
        return right, False

    # -- the login form -------------------------------------------------------------------------------------

    def login(self, form: dict[str, list[str]]) -> Granted | Refusal:
        """A posted login form: a new session, or why not (a wrong token or password is counted)."""
        if self.throttled():
            return self._throttle_refusal()
        if self.kind is None:
            return Refusal(403, "no ui.token_file or ui.password_file configured", _UNAVAILABLE)
        return self._token_login(form) if self.kind == "token" else self._password_login(form)

    def _token_login(self, form: dict[str, list[str]]) -> Granted | Refusal:
        secret = self.secret_of(None)
        if secret is None:
            return Refusal(403, self.problem() or "the token file cannot be used", _UNAVAILABLE)
        if not token_matches((form.get("token") or [""])[0], secret):
            self._note_wrong()
            return Refusal(403, "wrong token", "That is not the token.", form=True)
        return Granted(self.sessions.sign(secret), None)

    def _password_login(self, form: dict[str, list[str]]) -> Granted | Refusal:
        try:
            users = self._users()
        except IngestdError as exc:
            return Refusal(403, str(exc), _UNAVAILABLE)
        user, password = (form.get("user") or [""])[0].strip(), (form.get("password") or [""])[0]
        right, _known = self._password_right(user, password, users)
        if not right:
            self._note_wrong()
            known = user if user in users else None  # never an unknown name: it may be a password typed there
            reason = "wrong password" if known is not None else "unknown user"
            return Refusal(403, reason, "Wrong user name or password.", known, form=True)
        return Granted(self.sessions.sign(f"{user}:{users[user]}", user=user), user)

    # -- HTTP Basic -----------------------------------------------------------------------------------------

    def basic(self, environ: dict[str, Any]) -> tuple[Session, bool] | Refusal:  # noqa: PLR0911 - one per refusal
        """With `ui.http_basic`: the request's user checked (and its session kept in `environ`; True: the password
        was hashed now, a first login), or why not (401 asks the browser for a user and password)."""
        header = str(environ.get("HTTP_AUTHORIZATION") or "")
        if _unencrypted(environ):
            sent = " The password was sent unencrypted: change it (ingestd ui-password)." if header else ""
            return Refusal(
                403,
                "http basic over plain http" if header else "plain http from another machine",
                "HTTP Basic is accepted only over HTTPS through the lab's reverse proxy on this machine, or from this"
                f" machine itself.{sent}",
            )
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "basic":
            return Refusal(401, "wrong scheme" if header else None, "Log in with the lab's user name and password.")
        try:
            user, _, password = base64.b64decode(credentials.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            return Refusal(401, "malformed credentials", "Log in with the lab's user name and password.")
        try:
            users = self._users()
        except IngestdError as exc:
            return Refusal(403, str(exc), _UNAVAILABLE)
        encoded = users.get(user)
        mark = None if encoded is None else self._mark(user, password, encoded)
        with self._lock:
            known = mark is not None and mark in self._remembered
        if not known and self.throttled():
            return self._throttle_refusal(user if encoded is not None else None)
        right, known = self._password_right(user, password, users)
        if not right:
            self._note_wrong()
            known_user = user if encoded is not None else None
            reason = "wrong password" if known_user is not None else "unknown user"
            return Refusal(401, reason, "Wrong user name or password.", known_user)
        session = Session(0, "basic", user, f"{user}:{encoded}")  # no cookie: the form tokens' key only
        environ[_BASIC_SESSION] = session
        return session, not known
