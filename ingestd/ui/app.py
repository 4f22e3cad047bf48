"""The web page's WSGI application, mounted under `/ui/` by the metrics endpoint (`ingestd.metrics.MetricsServer`).

Server-rendered HTML (Jinja2, every value escaped), one style sheet and one small script (`static/ui.js`: the
pages' live parts, `ingestd.ui.live`) shipped in the package. Pages:
the overview (`/ui/`), the studies (`/ui/studies`, filtered as `ingestd status --filter` filters) and the
quarantine (`/ui/quarantine`). Every page needs a login (`/ui/login`: the token of `ui.token_file` or a user's
password of `ui.password_file`, for a signed session cookie; or with `ui.http_basic` HTTP Basic at every request:
`ingestd.ui.auth`) unless `ui.public_read` is set, which the configuration allows on loopback
only; even then a request whose Host is not a loopback name needs a login (a web page the browser opened elsewhere
may point a name of its own at 127.0.0.1: DNS rebinding). A form posted from another site is refused (Origin and
Sec-Fetch-Site).

A study's page (`/ui/studies/<batch id>`) carries, for a logged-in user only, the actions that apply to the
batch's state as forms posted to `/ui/studies/<batch id>/<action>` (`ingestd.ui.actions`: the code the commands
run). Each form carries a token, HMAC(session key, session id + action path), checked with the site of the form;
a refused post is logged as `ui.action_refused`, a done one as `ui.action`, and answered by a redirect (303) to
the study's page, which shows what the command would have printed. "Show identifiers" is posted and checked the same
way (`/ui/studies/<batch id>/identifiers`, `ingestd.ui.identify`) and answered, not redirected: the page with the
batch's identifiers, this once, logged as `ui.identifiers_shown`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from jinja2 import Environment, PackageLoader, StrictUndefined

from ingestd.admin.statusfilter import FilterError, StudyFilter
from ingestd.admin.statusview import age, size
from ingestd.config import Config
from ingestd.digestkey import DigestKeyError, read_digest_key
from ingestd.eventbuffer import EventBuffer
from ingestd.states import HoldCode, StudyState
from ingestd.ui import rulespage, views
from ingestd.ui.actions import ACTIONS, Actions, applicable
from ingestd.ui.auth import BASIC_CHALLENGE, Auth, Refusal
from ingestd.ui.identify import IDENTIFIERS, identified_study
from ingestd.ui.live import LIVE_SECONDS, Live
from ingestd.ui.session import COOKIE, Session
from ingestd.ui.studyextras import study_extras
from ingestd.uiconfig import is_loopback

__all__ = ["UiApp"]

log = structlog.get_logger("ingestd.ui")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
Health = Callable[[], dict[str, Any]]

REFRESH_SECONDS = 10  # the overview reloads itself this often
_MAX_FORM_BYTES = 4096
_PAGES = {"/ui": "overview", "/ui/": "overview", "/ui/studies": "studies", "/ui/quarantine": "quarantine"}
_PAGES["/ui/rules"] = "rules"  # ingestd.ui.rulespage
_STUDY = re.compile(r"/ui/studies/([0-9]{1,12})(?:/([a-z-]{1,20}))?")
_STATUS = {
    200: "200 OK",
    303: "303 See Other",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    403: "403 Forbidden",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    413: "413 Content Too Large",
    429: "429 Too Many Requests",
    500: "500 Internal Server Error",
}
# What the browser may load: the style sheet and the one script from here (no inline script, no eval), fragments
# fetched from here, forms posted here, nothing else.
_SECURITY_HEADERS = [
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; img-src 'self';"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    # Not no-referrer: under it a browser posts the page's own forms with `Origin: null`, which _cross_site must
    # refuse (the login failed in Chromium). same-origin sends the page's origin to itself only, never elsewhere.
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
]


def _when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("ingestd.ui", "templates"),
        autoescape=True,  # every template is HTML: every value is escaped, whatever its file name
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["size"] = lambda count: size(int(count or 0))
    env.filters["age"] = lambda seconds: age(float(seconds or 0))
    env.filters["when"] = _when
    return env


def _client(environ: dict[str, Any]) -> str:
    return str(environ.get("REMOTE_ADDR") or "unknown")


def _request_host(environ: dict[str, Any]) -> str:
    host = str(environ.get("HTTP_HOST") or "")
    return urlsplit(f"//{host}").hostname or ""


class UiApp:
    """The WSGI application of `/ui/` (`health`: the daemon's /healthz facts; `running`: what status says;
    `events`: the daemon's recent log events per batch, None where there are none)."""

    def __init__(
        self, config: Config, health: Health, *, running: bool = True, events: EventBuffer | None = None
    ) -> None:
        # The daemon's configuration as it is now (a reload applies new rules files, XNAT servers...): the pages
        # and actions read it at each request. `ui` and `metrics` changes need a restart, so those stay as started.
        self.current_config: Callable[[], Config] = lambda: config
        self.health = health
        self.running = running
        self.events = events
        try:
            key = read_digest_key(config.state_dir)
        except DigestKeyError:
            key = None  # the daemon says so where it uses the key; here a key of this process does as well
        self.auth = Auth(config.ui, key, config.ui.session_hours * 3600)
        self.sessions = self.auth.sessions
        self._env = _environment()
        self._css = resources.files("ingestd.ui").joinpath("static/style.css").read_bytes()
        self.actions = Actions(lambda: self.config)
        self.rules_in_force: rulespage.RulesInForce | None = None  # the daemon's rule set, across reloads
        self.live = Live(self)

    @property
    def config(self) -> Config:
        return self.current_config()

    # -- responses ------------------------------------------------------------------------------------------

    def _send(
        self,
        start_response: StartResponse,
        code: int,
        body: bytes,
        content_type: str = "text/html; charset=utf-8",
        headers: Iterable[tuple[str, str]] = (),
    ) -> list[bytes]:
        start_response(
            _STATUS[code],
            [("Content-Type", content_type), ("Content-Length", str(len(body))), *_SECURITY_HEADERS, *headers],
        )
        return [body]

    def _page(
        self,
        start_response: StartResponse,
        template: str,
        code: int = 200,
        headers: Iterable[tuple[str, str]] = (),
        **context: Any,
    ) -> list[bytes]:
        context.setdefault("nav", True)
        context.setdefault("logged_in", False)
        context.setdefault("can_log_out", not self.config.ui.http_basic)  # a browser forgets Basic when it closes
        context.setdefault("page", "")
        body = self._env.get_template(template).render(**context).encode("utf-8")
        return self._send(start_response, code, body, headers=headers)

    def _message(self, start_response: StartResponse, code: int, title: str, message: str, **extra: Any) -> list[bytes]:
        extra.setdefault("link", None)
        extra.setdefault("link_text", "")
        return self._page(start_response, "message.html", code, title=title, message=message, **extra)

    def _redirect(
        self, start_response: StartResponse, where: str, headers: Iterable[tuple[str, str]] = ()
    ) -> list[bytes]:
        return self._send(start_response, 303, b"", "text/plain", [("Location", where), *headers])

    # -- login ----------------------------------------------------------------------------------------------

    def _session(self, environ: dict[str, Any]) -> Session | None:
        """The request's valid session (its cookie's, or HTTP Basic's), or None."""
        return self.auth.session(environ)

    def _public(self, environ: dict[str, Any]) -> bool:
        """Whether the read-only pages may be shown without a login (only to loopback Host names)."""
        return self.config.ui.public_read and is_loopback(_request_host(environ))

    def _cookie(self, environ: dict[str, Any], value: str, max_age: int) -> tuple[str, str]:
        """The session cookie: `Secure` too when the browser came over HTTPS (a reverse proxy with TLS says so)."""
        https = environ.get("wsgi.url_scheme") == "https" or environ.get("HTTP_X_FORWARDED_PROTO") == "https"
        secure = "; Secure" if https else ""
        return "Set-Cookie", f"{COOKIE}={value}; Path=/ui; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"

    def _cross_site(self, environ: dict[str, Any]) -> bool:
        """Whether a posted form came from a page of another site (what SameSite does not cover: the login)."""
        if str(environ.get("HTTP_SEC_FETCH_SITE") or "") in ("cross-site", "same-site"):
            return True
        origin = str(environ.get("HTTP_ORIGIN") or "")
        if not origin:
            return False
        # Behind a reverse proxy the Host may be the proxy's upstream: the host the browser named is forwarded (a
        # page of another site cannot add that header to a form it posts).
        hosts = {str(environ.get("HTTP_HOST") or ""), str(environ.get("HTTP_X_FORWARDED_HOST") or "")} - {""}
        return origin == "null" or urlsplit(origin).netloc not in hosts

    def _read_form(self, environ: dict[str, Any]) -> dict[str, list[str]] | None:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_FORM_BYTES:
            return None
        body = environ["wsgi.input"].read(length) if length else b""
        return parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)

    def _login(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method in ("GET", "HEAD"):
            if self._session(environ) is not None:  # a public_read visitor gets the form: it is how one acts
                return self._redirect(start_response, "/ui/")
            problem = self.auth.problem()
            what = "password" if self.auth.kind == "password" else "token"
            message = f"The login is unavailable: the {what} file cannot be used; the log says why." if problem else ""
            return self._page(start_response, "login.html", nav=False, kind=self.auth.kind, message=message)
        if method != "POST":
            return self._message(start_response, 405, "Not allowed", "Use the form.")
        return self._login_post(environ, start_response)

    def _login_post(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        """A posted token or password: right, a session cookie and the overview; wrong, 403 (logged without what
        was typed)."""
        client = _client(environ)
        if self._cross_site(environ):
            log.warning("ui.login_refused", client=client, reason="cross-site", user=None)
            return self._message(start_response, 403, "Refused", "A login posted from another site is refused.")
        form = self._read_form(environ)
        if form is None:
            return self._message(start_response, 413, "Too large", "The form is too large.")
        outcome = self.auth.login(form)
        if isinstance(outcome, Refusal):
            log.warning("ui.login_refused", client=client, reason=outcome.reason, user=outcome.user)
            if outcome.form:
                kind = self.auth.kind
                return self._page(start_response, "login.html", 403, nav=False, kind=kind, message=outcome.message)
            return self._message(start_response, outcome.code, "Refused", outcome.message)
        log.info("ui.login", client=client, user=outcome.user)
        cookie = self._cookie(environ, outcome.cookie, int(self.sessions.lifetime_seconds))
        return self._redirect(start_response, "/ui/", [cookie])

    def _basic(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes] | None:
        """With `ui.http_basic`: None when the request's user and password are right, else the refusal's answer."""
        outcome = self.auth.basic(environ)
        if not isinstance(outcome, Refusal):
            if outcome[1]:  # a first request with this password: a login (later ones are not logged)
                log.info("ui.login", client=_client(environ), user=outcome[0].user)
            return None
        if outcome.reason is not None:
            log.warning("ui.login_refused", client=_client(environ), reason=outcome.reason, user=outcome.user)
        headers = [BASIC_CHALLENGE] if outcome.code == 401 else []
        return self._page(
            start_response,
            "message.html",
            outcome.code,
            headers,
            title="Log in",
            message=outcome.message,
            link=None,
            link_text="",
            nav=False,
        )

    def _logout(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        if self.config.ui.http_basic:
            return self._message(
                start_response, 404, "Not found", "With HTTP Basic there is no logout: close the browser."
            )
        if environ.get("REQUEST_METHOD") != "POST":
            return self._message(start_response, 405, "Not allowed", "Log out with the button.")
        if self._cross_site(environ):
            return self._message(start_response, 403, "Refused", "A form posted from another site is refused.")
        session = self._session(environ)
        if session is not None:
            self.sessions.end(session)
            log.info("ui.logout", client=_client(environ), user=session.user)
        return self._redirect(start_response, "/ui/login", [self._cookie(environ, "", 0)])

    # -- pages ----------------------------------------------------------------------------------------------

    def _data(self) -> dict[str, Any]:
        from ingestd.status import status_data  # noqa: PLC0415 - the read model, per request

        return status_data(self.config, running=self.running)

    def _overview(self, start_response: StartResponse, common: dict[str, Any]) -> list[bytes]:
        context = self.live.overview_context()
        return self._page(
            start_response, "overview.html", page="overview", refresh_seconds=REFRESH_SECONDS, **context, **common
        )

    def _studies(self, environ: dict[str, Any], start_response: StartResponse, common: dict[str, Any]) -> list[bytes]:
        query = parse_qs(str(environ.get("QUERY_STRING") or ""), max_num_fields=50)
        error, code = "", 200
        try:
            chosen = views.filters_from_query(query)
        except FilterError as exc:
            error, code, chosen = str(exc).replace("--filter ", ""), 400, StudyFilter()
        context = views.studies(self._data(), chosen) if not error else {"studies": [], "total": 0}
        return self._page(
            start_response,
            "studies.html",
            code,
            page="studies",
            states=[state.value for state in StudyState],
            codes=[code.value for code in HoldCode],
            chosen=views.form_values(query, chosen),
            filtered=bool(chosen),
            error=error,
            **self.live.studies_page(environ),
            **context,
            **common,
        )

    def _quarantine(self, start_response: StartResponse, common: dict[str, Any]) -> list[bytes]:
        context = views.quarantine(self.config, self._data())
        return self._page(start_response, "quarantine.html", page="quarantine", **context, **common)

    def _study(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        batch_id: int,
        session: Session | None,
        identified: bool = False,
    ) -> list[bytes]:
        """The study page; `identified`: with its identifiers (`ingestd.ui.identify`), for a checked post only."""
        study = (
            identified_study(self.config, batch_id, running=self.running)
            if identified
            else views.study(self._data(), batch_id)
        )
        if study is None:
            return self._not_found(start_response, session is not None)
        if identified:  # who saw which batch's identifiers, never the values
            user = None if session is None else session.user
            log.info("ui.identifiers_shown", client=_client(environ), batch_id=batch_id, user=user)
        forms: list[dict[str, str]] = []
        if session is not None:
            for action in (*applicable(str(study["state"]), str(study["kind"])), IDENTIFIERS):
                path = f"/ui/studies/{batch_id}/{action}"
                label = ACTIONS.get(action, "Show identifiers")
                forms.append({"action": path, "label": label, "csrf": self.sessions.form_token(session, path)})
        identify = forms.pop() if forms else None  # the toggle, apart from the actions
        return self._page(
            start_response,
            "study.html",
            page="studies",
            logged_in=session is not None,
            s=study,
            identified=identified,
            forms=forms,
            identify=identify,
            outcome=self.actions.last(batch_id),
            **study_extras(self.config, study, self.events),
            live_seconds=LIVE_SECONDS,
        )

    def _not_found(self, start_response: StartResponse, logged_in: bool = False) -> list[bytes]:
        return self._message(
            start_response,
            404,
            "Not found",
            "No such page.",
            link="/ui/studies",
            link_text="Studies",
            logged_in=logged_in,
        )

    def _act(  # noqa: PLR0911 - one return per refusal
        self, environ: dict[str, Any], start_response: StartResponse, batch_id: int, action: str
    ) -> list[bytes]:
        """A posted action: the session, the form's site and its CSRF token checked, then done as the command does."""
        client, path = _client(environ), f"/ui/studies/{batch_id}/{action}"

        session = self._session(environ)
        user = None if session is None else session.user

        def refuse(code: int, reason: str, message: str) -> list[bytes]:
            log.warning("ui.action_refused", client=client, batch_id=batch_id, action=action, reason=reason, user=user)
            return self._message(
                start_response, code, "Refused", message, link=f"/ui/studies/{batch_id}", link_text="The study"
            )

        if session is None:
            return refuse(403, "not logged in", "Log in to act on a study.")
        if self._cross_site(environ):
            return refuse(403, "cross-site", "A form posted from another site is refused.")
        form = self._read_form(environ)
        if form is None:
            return refuse(413, "form too large", "The form is too large.")
        given = (form.get("csrf") or [""])[0]
        if not given:
            return refuse(403, "no form token", "The form has expired: open the study's page again.")
        if not self.sessions.form_token_matches(session, path, given):
            return refuse(403, "wrong form token", "The form has expired: open the study's page again.")
        if action == IDENTIFIERS:  # the same page with the identifiers, this once
            return self._study(environ, start_response, batch_id, session, identified=True)
        outcome = self.actions.start(action, batch_id)
        log.info(
            "ui.action", client=client, batch_id=batch_id, action=action, ok=outcome.ok, done=outcome.done, user=user
        )
        return self._redirect(start_response, f"/ui/studies/{batch_id}")

    def _dispatch(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:  # noqa: PLR0911 - one return per route
        path = str(environ.get("PATH_INFO") or "/")
        if self.config.ui.http_basic and (refused := self._basic(environ, start_response)) is not None:
            return refused
        if path == "/ui/static/style.css":
            return self._send(start_response, 200, self._css, "text/css; charset=utf-8")
        if path == "/ui/static/ui.js":
            return self._send(start_response, 200, self.live.script, "text/javascript; charset=utf-8")
        if path.startswith("/ui/fragments/"):
            return self.live.route(environ, start_response, path)
        if path in ("/ui/login", "/ui/logout"):
            return (self._login if path == "/ui/login" else self._logout)(environ, start_response)
        study = _STUDY.fullmatch(path)
        if study is not None:
            return self._study_route(environ, start_response, int(study.group(1)), study.group(2))
        page = _PAGES.get(path)
        if page is None:
            return self._message(start_response, 404, "Not found", "No such page.", link="/ui/", link_text="Overview")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return self._message(start_response, 405, "Not allowed", "These pages are read-only.")
        session = self._session(environ)
        if session is None and not self._public(environ):
            return self._redirect(start_response, "/ui/login")
        common = {"logged_in": session is not None}
        if page == "studies":
            return self._studies(environ, start_response, common)
        if page == "rules":
            query, rows = str(environ.get("QUERY_STRING") or ""), lambda: list(self._data()["studies"])
            code, context = rulespage.page(self.config, self.rules_in_force, query, rows)
            return self._page(start_response, "rules.html", code, page="rules", **(context | common))
        return (self._overview if page == "overview" else self._quarantine)(start_response, common)

    def _study_route(
        self, environ: dict[str, Any], start_response: StartResponse, batch_id: int, action: str | None
    ) -> list[bytes]:
        """`/ui/studies/<id>` (GET: the page) and `/ui/studies/<id>/<action>` (POST only: a GET does nothing)."""
        method = environ.get("REQUEST_METHOD", "GET")
        if action is not None:
            if action not in ACTIONS and action != IDENTIFIERS:
                return self._not_found(start_response)
            if method != "POST":
                return self._message(
                    start_response,
                    405,
                    "Not allowed",
                    "Use the study page's buttons.",
                    link=f"/ui/studies/{batch_id}",
                    link_text="The study",
                )
            return self._act(environ, start_response, batch_id, action)
        if method not in ("GET", "HEAD"):
            return self._message(start_response, 405, "Not allowed", "This page is read-only; use its buttons.")
        session = self._session(environ)
        if session is None and not self._public(environ):
            return self._redirect(start_response, "/ui/login")
        return self._study(environ, start_response, batch_id, session)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            body = self._dispatch(environ, start_response)
            return [] if environ.get("REQUEST_METHOD") == "HEAD" else body
        except Exception as exc:  # a page that fails says so (500, logged); the daemon goes on
            page = _PAGES.get(str(environ.get("PATH_INFO") or "/"), "other")
            log.exception("ui.page_failed", page=page, error=type(exc).__name__)  # the traceback, redacted
            return self._message(start_response, 500, "Error", "The page failed; the log says why.")
