"""Accounts: password and alias-token logins, JSESSIONID sessions, lockout and expiry (§2)."""

from __future__ import annotations

import secrets
import threading
import time
import uuid

from ingestd.testing.xnat.common import _UUID_RE, _basic_credentials, _same_secret
from ingestd.testing.xnat.model import _Config, _HttpSession, _Token, _User


class _Accounts:
    """The store's accounts half: logins by password or alias token, HTTP sessions, lockout (§2)."""

    config: _Config
    lock: threading.RLock
    users: dict[str, _User]
    tokens: dict[str, _Token]
    sessions: dict[str, _HttpSession]
    _serial: int

    def next_serial(self) -> int:
        with self.lock:
            self._serial += 1
            return self._serial

    def check_password(self, username: str, password: str, *, tokens: bool = True) -> _User | None:
        """One login attempt through Spring's provider chain (xnat-web security/XnatProviderManager.authenticate).

        XnatProviderManager.retrieveAuthMethod (lines 161-192) sends a known username to the localdb provider and an
        unknown UUID-shaped one to the alias-token provider. A localdb failure of any kind (bad password, locked,
        disabled, unverified) is published as a failed attempt (XnatAuthenticationEventPublisher.FailedAttemptsManager
        .addFailedLoginAttempt): the count goes up even while locked, and reaching exactly `maxFailedLogins` sets the
        lockout time (libs/xdat HibernateXdatUserAuthService.addFailedLoginAttempt:110-126). While locked
        (XDATUser.isAccountNonLocked: lockout time set) even the right password fails
        (XnatDatabaseAuthenticationProvider PreAuthenticationChecks: LockedException). A success clears the count
        (FailedAttemptsManager.clearCount).
        ResetFailedLogins (hourly, `0 0 * * * *`) unlocks accounts whose lockout is older than
        `maxFailedLoginsLockoutDuration`; the stand-in unlocks exactly `lockout_seconds` after the lockout (real XNAT:
        up to an hour later). Failed token logins count nowhere (no xhbm_xdat_user_auth row for an alias).
        """
        with self.lock:
            user = self.users.get(username)
            if user is None:
                token_login = tokens and _UUID_RE.fullmatch(username) is not None
                return self._token_login(username, password) if token_login else None
            self._unlock_if_due(user)
            ok = (
                user.locked_at is None
                # PreAuthenticationChecks: disabled accounts fail unless disabled for inactivity (then the expired
                # password filter answers 302 InactiveAccount.vm instead, see `_Api._password_filter`).
                and (user.enabled or user.inactive)
                # additionalAuthenticationChecks:178 (emailVerification defaults to true): unverified accounts fail.
                and (user.verified or not user.enabled)
                and _same_secret(user.password, password)
            )
            if ok:
                if self.config.max_failed_logins > 0:
                    user.failed_logins = 0
                return user
            if self.config.max_failed_logins > 0:
                user.failed_logins += 1
                if user.failed_logins == self.config.max_failed_logins:
                    user.locked_at = time.time()
        return None

    def _token_login(self, alias: str, secret: str) -> _User | None:
        """security/alias/AliasTokenAuthenticationProvider: the token must still exist (the hourly sweep
        ClearExpiredAliasTokens deletes tokens created more than `aliasTokenTimeout` ago, libs/xdat
        AliasTokenDAO.findByExpired; nothing else checks the expiry), the secret must match, and its user must pass
        Users.validateUserLogin (enabled, verified, not locked: AliasTokenAuthenticationProvider
        .additionalAuthenticationChecks)."""
        token = self.live_token(alias)
        if token is None or not _same_secret(token.secret, secret):
            return None
        user = self.users.get(token.username)
        if user is None:
            return None
        self._unlock_if_due(user)
        if not user.enabled or not user.verified or user.locked_at is not None:
            return None
        return user

    def live_token(self, alias: str) -> _Token | None:
        """A token the sweep has not removed; the stand-in sweeps continuously (XNAT: hourly, so a real token may
        outlive its `estimatedExpirationTime` by up to an hour, never less)."""
        with self.lock:
            token = self.tokens.get(alias)
            if token is not None and time.time() >= token.expires:
                del self.tokens[alias]
                return None
            return token

    def _unlock_if_due(self, user: _User) -> None:
        """security/ResetFailedLogins.java QUERY: count >= max and lockout_time < now - duration -> 0, unlocked."""
        if (
            user.locked_at is not None
            and user.failed_logins >= self.config.max_failed_logins
            and time.time() - user.locked_at >= self.config.lockout_seconds
        ):
            user.failed_logins, user.locked_at = 0, None

    def password_expired(self, user: _User) -> bool:
        """XnatExpiredPasswordFilter.isPasswordExpired: `now() - password_updated > passwordExpirationInterval`."""
        if user.password_expired:
            return True
        limit = self.config.password_expiration_seconds
        return limit is not None and time.time() - user.password_updated > limit

    def live_session(self, session_id: str | None) -> _HttpSession | None:
        if not session_id:
            return None
        with self.lock:
            session = self.sessions.get(session_id)
            if session is None:
                return None
            if time.monotonic() - session.last_access > self.config.session_timeout_seconds:
                del self.sessions[session_id]
                return None
            session.last_access = time.monotonic()
            return session

    def new_session(self, user: _User) -> _HttpSession:
        session = _HttpSession(uuid.uuid4().hex.upper(), user.username, time.monotonic())  # 32 upper-case hex
        with self.lock:
            self.sessions[session.id] = session
        return session

    def authenticate(
        self, authorization: str | None, session_id: str | None
    ) -> tuple[_User, _HttpSession, bool] | None:
        """(user, HTTP session, session is new) or None (bad Basic credentials, or no live session).

        security/XnatBasicAuthenticationFilter.authenticationIsRequired (lines 132-157): Basic credentials are not
        checked at all when the session is already authenticated as that user (or as the user of that alias token), so
        a wrong password next to a live cookie of the same user passes; for another user they are checked.
        """
        session = self.live_session(session_id)
        if authorization:
            credentials = _basic_credentials(authorization)
            if credentials is not None and session is not None:
                username = credentials[0]
                with self.lock:
                    token = self.tokens.get(username) if username not in self.users else None
                    user = self.users.get(session.username)
                if user is not None and session.username in (username, token.username if token else None):
                    return user, session, False
            user = self.check_password(*credentials) if credentials else None
            if user is None:
                return None
            if session is not None and session.username == user.username:
                return user, session, False
            return user, self.new_session(user), True
        if session is None:
            return None
        with self.lock:
            user = self.users.get(session.username)
        return (user, session, False) if user else None

    def issue_token(self, username: str) -> _Token:
        now = time.time()
        token = _Token(
            str(uuid.uuid4()), secrets.token_urlsafe(32), username, now, now + self.config.token_lifetime_seconds, 0
        )
        token.serial = self.next_serial()
        with self.lock:
            self.tokens[token.alias] = token
        return token
