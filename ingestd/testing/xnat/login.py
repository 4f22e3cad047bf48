"""The authentication of every request (§2) and the auth and bootstrap handlers (§2, §8.1)."""

from __future__ import annotations

import uuid

from ingestd.testing.xnat.catalog import _token_json
from ingestd.testing.xnat.common import (
    _INTERACTIVE_RE,
    _UUID_RE,
    _basic_credentials,
    _cookie,
    _HttpError,
    _json,
    _login_failure_message,
    _Response,
    _same_secret,
    _text,
)
from ingestd.testing.xnat.model import _Token, _User
from ingestd.testing.xnat.routing import _ApiBase, _is_data_path, _Request


class _LoginApi(_ApiBase):
    """Authentication of every request and the auth and bootstrap handlers (§2, §8.1)."""

    def _authenticate(self, request: _Request) -> None:
        """§2: Basic (password or alias token) or JSESSIONID; data paths need it (401, or 302 for browsers)."""
        authorization = request.headers.get("Authorization")
        result = self.store.authenticate(authorization, _cookie(request.headers, "JSESSIONID"))
        if result is not None:
            request.user, request.session, request.new_session = result
            self._password_filter(request)
            return
        credentials = _basic_credentials(authorization) if authorization else None
        if credentials is not None and credentials[0]:
            # security/XnatBasicAuthenticationFilter.doFilterInternal:84-111: failed Basic credentials end every request
            # (open URLs and guest sites included) with sendError(401, AdminUtils.GetLoginFailureMessage()): Tomcat's
            # page, no WWW-Authenticate header.
            raise _HttpError(401, _login_failure_message(self.config.max_failed_logins), tomcat=True)
        if not _is_data_path(request.path) or request.path == "/data/services/auth":
            return
        if request.path == "/xapi/siteConfig/buildInfo" and request.method == "GET":
            # An open URL (web/src/main/resources/META-INF/xnat/security/configured-urls.yaml `openUrls`;
            # XapiRequestMappingAspect.evaluate lets GETs of open URLs through): no login needed.
            return
        if not self.config.require_login:
            # requireLogin=false: UpdateSecurityFilterHandlerMethod.updateSecurityFilter maps `/**` to permitAll and
            # restlet/guard/XnatSecureGuard.authenticate:108 lets credential-less requests in, so no credentials or a
            # dead JSESSIONID are served as guest (protected resources then answer 403/empty lists, not 401).
            request.user = self.store.guest
            return
        if _INTERACTIVE_RE.fullmatch(request.headers.get("User-Agent") or ""):
            raise _HttpError(302, headers=[("Location", self.config.context_path + "/app/template/Login.vm")])
        raise _HttpError(
            401,
            "Full authentication is required to access this resource",
            headers=[("WWW-Authenticate", 'Basic realm="XNAT Protected Area"')],
            tomcat=True,
        )

    def _password_filter(self, request: _Request) -> None:
        """security/XnatExpiredPasswordFilter.doFilterInternal:67-204 (added right after the Basic filter,
        initialization/SecurityConfig.java:318), for every authenticated request, REST and Basic included: an account
        disabled for inactivity (it can still log in, see `_Store.check_password`) gets 302 to
        `{siteUrl}/app/template/InactiveAccount.vm`; an expired password 302 to
        `{siteUrl}/app/template/XDATScreen_UpdateUser.vm` (paths from SecurityConfig.expiredPasswordFilter:195-203;
        TurbineUtils.GetFullServerPath = the siteUrl preference, which includes any context path). A session once
        found not expired is never checked again (session attribute "expired"). The login/logout pages it exempts are
        /app pages this stand-in does not guard."""
        user, session = request.user, request.session
        if user is None or session is None or user is self.store.guest:
            return
        if not user.enabled:
            raise _HttpError(302, headers=[("Location", self.site_url() + "/app/template/InactiveAccount.vm")])
        if session.password_not_expired:
            return
        with self.store.lock:
            expired = self.store.password_expired(user)
        if expired:
            raise _HttpError(302, headers=[("Location", self.site_url() + "/app/template/XDATScreen_UpdateUser.vm")])
        session.password_not_expired = True

    # -- auth and bootstrap (§2, §8.1) ----------------------------------------------------------------------------

    def root(self, request: _Request) -> _Response:
        return _Response(302, headers=[("Location", self.config.context_path + "/app/template/Login.vm")])

    def login_page(self, request: _Request) -> _Response:
        page = "<!DOCTYPE html><html><head><title>XNAT</title></head><body><form>Login</form></body></html>"
        return _text(page, content_type="text/html;charset=UTF-8")

    def login(self, request: _Request) -> _Response:
        """`PUT`/`POST /data/services/auth` (open): 200 text body = new session id + cookie; 401 otherwise."""
        if request.method not in ("PUT", "POST"):
            raise _HttpError(405, "Method Not Allowed", headers=[("Allow", "POST, PUT")])
        username = request.params.get("username") or request.params.get("j_username") or ""
        password = request.params.get("password") or request.params.get("j_password") or ""
        # restlet/extensions/AuthenticationRestlet: XnatProviderManager.retrieveAuthMethod picks the alias-token
        # provider for an unknown UUID-shaped username, so a token logs in here too; any AuthenticationException (bad
        # password, locked, disabled, unverified) is fail(): 401 "Authentication failed.", counted as a failed login.
        user = self.store.check_password(username, password)
        if user is None:
            raise _HttpError(401, "Authentication failed.")
        request.user, request.session, request.new_session = user, self.store.new_session(user), True
        return _text(request.session.id)

    def jsession(self, request: _Request) -> _Response:
        if request.session is None:
            request.session, request.new_session = self.store.new_session(request.agent), True
        text = request.session.id
        if request.params.flag("CSRF"):
            text += f"; XNAT_CSRF={uuid.uuid5(uuid.NAMESPACE_OID, text)}"
        return _text(text)

    def logout(self, request: _Request) -> _Response:
        if request.session is not None:
            with self.store.lock:
                self.store.sessions.pop(request.session.id, None)
            request.session = None
        return _Response(200)

    def whoami(self, request: _Request) -> _Response:
        return _text(f"User '{request.agent.username}' is logged in")

    def _token_agent(self, request: _Request) -> _User:
        """restlet/services/AliasTokenRestlet constructor:88-98: the guest may not use tokens, non-admins only their
        own. Whoever is logged in may use it, however they logged in (Basic with an alias token included)."""
        user = request.agent
        username = request.group("user") if "user" in request.groups else user.username
        if user is self.store.guest or username.lower() == "guest":
            raise _HttpError(403, "The guest user can't request alias tokens")
        if username.lower() != user.username.lower() and not user.admin:
            raise _HttpError(403, "Non-admin users can only request operations on alias tokens for their own account")
        return user

    def _path_token(self, request: _Request) -> _Token:
        """AliasTokenRestlet constructor:63-86: `{TOKEN}` is an alias (UUID) or a numeric id; unknown -> 404."""
        name = request.group("alias")
        with self.store.lock:
            if _UUID_RE.fullmatch(name):
                token = self.store.live_token(name)
                if token is None:
                    raise _HttpError(404, f"Can't find an alias token with the alias {name}")
            else:
                token = next((t for t in self.store.tokens.values() if name.isdigit() and t.serial == int(name)), None)
                if token is None:
                    raise _HttpError(404, f"Can't find an alias token with the ID {name}")
        user = self._token_agent(request)
        if token.username.lower() != user.username.lower() and not user.admin:
            raise _HttpError(403, "Non-admin users can only request operations on alias tokens for their own account")
        return token

    def token_issue(self, request: _Request) -> _Response:
        """`GET /data/services/tokens/issue[/user/{USERNAME}]`: the AliasToken entity as JSON (libs/xdat
        entities/AliasToken.java getters + AbstractHibernateEntity id/enabled/created/timestamp/disabled, Dates as
        epoch ms). `estimatedExpirationTime` = issue time + `aliasTokenTimeout` (HibernateAliasTokenService
        .issueTokenForUser:93-110); `expired` is the @Transient isExpired() getter, serialized too; `validIPAddresses`
        is null for a token issued here (no addresses given) [INF: that Jackson writes nulls]."""
        self._token_agent(request)
        username = request.group("user") if "user" in request.groups else request.agent.username
        with self.store.lock:
            if username not in self.store.users:  # AliasTokenRestlet.represent:118-121: the user lookup fails -> 400
                raise _HttpError(400, f"An error occurred retrieving the user: {username}")
        return _json(_token_json(self.store.issue_token(username)))

    def token_show(self, request: _Request) -> _Response:
        """`GET /data/services/tokens/show[/user/{USERNAME}]`: the user's live tokens, each serialized as `issue`
        answers it (AliasTokenRestlet.represent OP_SHOW: findTokensForUser, an empty list when none; restlet
        XNATApplication.java:333 attaches /services/tokens/{OPERATION})."""
        self._token_agent(request)
        username = request.group("user") if "user" in request.groups else request.agent.username
        with self.store.lock:
            tokens = [t for t in self.store.tokens.values() if t.username.lower() == username.lower()]
        return _json([_token_json(token) for token in sorted(tokens, key=lambda t: t.serial)])

    def token_validate(self, request: _Request) -> _Response:
        """`{"valid": <username>}` or `{"valid": null}` (HibernateAliasTokenService.validateToken returns the user or
        null; AliasTokenRestlet.represent:137-149 puts it in a map as is)."""
        token = self._path_token(request)
        valid = _same_secret(token.secret, request.group("secret"))
        return _json({"valid": token.username if valid else None})

    def token_invalidate(self, request: _Request) -> _Response:
        token = self._path_token(request)
        with self.store.lock:
            self.store.tokens.pop(token.alias, None)
        return _json({"result": "OK"})
