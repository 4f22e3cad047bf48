"""The web page, live: fragments of the pages that `static/ui.js` fetches every few seconds and swaps in.

Each fragment is the part of its page that changes, rendered server-side from the partial template the full page
includes (templates/partials/), so that page and fragment never differ:

* `/ui/fragments/overview`: health, services, studies by state, the imports under way, the XNAT servers;
* `/ui/fragments/studies?<the page's filters>`: the study table;
* `/ui/fragments/studies/<batch id>`: one study's state, delivery step, attempts, last error and the outcome of an
  action while it is under way.

A fragment is shown exactly where its page is (a login, or `ui.public_read` with a loopback Host); otherwise it
answers 401 (not a redirect to the login page, which a script would swap in), and the script stops and asks the
person to log in again. The pages work without the script: the overview reloads itself (`<noscript>` refresh), the
others show what was true when they were opened.

Imports under way (`ingestd import`, `ingestd.importprogress`) are listed on the overview with their counts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment

from ingestd.admin.statusfilter import FILTER_KEYS, FilterError
from ingestd.config import Config
from ingestd.eventbuffer import EventBuffer
from ingestd.importprogress import running_imports
from ingestd.ui import views
from ingestd.ui.actions import Actions
from ingestd.ui.session import Session
from ingestd.ui.studyextras import study_extras

__all__ = ["LIVE_SECONDS", "Live"]

LIVE_SECONDS = 5  # the script fetches its page's fragment this often (while the tab is shown)
_STUDY = re.compile(r"/ui/fragments/studies/([0-9]{1,12})")


StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class Pages(Protocol):
    """What the fragments use of the pages' application (`ingestd.ui.app.UiApp`): its checks, data and answers."""

    health: Callable[[], dict[str, Any]]
    actions: Actions
    events: EventBuffer | None
    _env: Environment

    @property
    def config(self) -> Config: ...

    def _session(self, environ: dict[str, Any]) -> Session | None: ...
    def _public(self, environ: dict[str, Any]) -> bool: ...
    def _data(self) -> dict[str, Any]: ...
    def _send(
        self,
        start_response: StartResponse,
        code: int,
        body: bytes,
        content_type: str = ...,
        headers: Iterable[tuple[str, str]] = ...,
    ) -> list[bytes]: ...


def imports(app: Pages, *, now: float | None = None) -> list[dict[str, Any]]:
    """The imports under way on the daemon's state directory: counts, phase and elapsed time (no path)."""
    now = time.time() if now is None else now
    return [
        {"pid": running.pid, "started": running.started, "elapsed": running.elapsed(now), "phase": running.phase}
        | running.counts
        for running in running_imports(app.config.state_dir)
    ]


class Live:
    """The fragments of one `UiApp` and the script that fetches them."""

    def __init__(self, app: Pages) -> None:
        self.app = app
        self.script = resources.files("ingestd.ui").joinpath("static/ui.js").read_bytes()

    def overview_context(self) -> dict[str, Any]:
        """What the overview's live part shows (the page and its fragment)."""
        app = self.app
        context = views.overview(app.config, app.health, app._data())
        return context | {"imports": imports(app), "live_seconds": LIVE_SECONDS}

    def studies_page(self, environ: dict[str, Any]) -> dict[str, Any]:
        """What the studies page needs to refresh its table: the fragment's URL with the page's filters."""
        query = parse_qs(str(environ.get("QUERY_STRING") or ""), max_num_fields=50)
        chosen = [(key, value) for key in FILTER_KEYS for value in query.get(key, ()) if value.strip()]
        suffix = f"?{urlencode(chosen)}" if chosen else ""
        return {"live_url": f"/ui/fragments/studies{suffix}", "live_seconds": LIVE_SECONDS}

    def route(self, environ: dict[str, Any], start_response: StartResponse, path: str) -> list[bytes]:
        """Answer `/ui/fragments/...` (GET or HEAD only)."""
        app = self.app
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return app._send(start_response, 405, b"Fragments are read-only.\n", "text/plain; charset=utf-8")
        session = app._session(environ)
        if session is None and not app._public(environ):
            return app._send(start_response, 401, b"Log in again.\n", "text/plain; charset=utf-8")
        if path == "/ui/fragments/overview":
            return self._fragment(start_response, "partials/overview_live.html", **self.overview_context())
        if path == "/ui/fragments/studies":
            return self._studies(environ, start_response)
        study = _STUDY.fullmatch(path)
        if study is not None:
            return self._study(start_response, int(study.group(1)))
        return app._send(start_response, 404, b"No such fragment.\n", "text/plain; charset=utf-8")

    def _fragment(self, start_response: StartResponse, template: str, code: int = 200, **context: Any) -> list[bytes]:
        body = self.app._env.get_template(template).render(**context).encode("utf-8")
        return self.app._send(start_response, code, body)

    def _studies(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        query = parse_qs(str(environ.get("QUERY_STRING") or ""), max_num_fields=50)
        try:
            chosen = views.filters_from_query(query)
        except FilterError:
            chosen = None
        if chosen is None:  # the page says why; its table stays empty
            context: dict[str, Any] = {"studies": [], "total": 0}
            return self._fragment(start_response, "partials/studies_table.html", 400, filtered=True, **context)
        context = views.studies(self.app._data(), chosen)
        return self._fragment(start_response, "partials/studies_table.html", filtered=bool(chosen), **context)

    def _study(self, start_response: StartResponse, batch_id: int) -> list[bytes]:
        study = views.study(self.app._data(), batch_id)
        if study is None:
            return self.app._send(start_response, 404, b"No such study.\n", "text/plain; charset=utf-8")
        outcome = self.app.actions.last(batch_id)
        extras = study_extras(self.app.config, study, self.app.events)
        return self._fragment(start_response, "partials/study_live.html", s=study, outcome=outcome, **extras)
