"""The web page, live (ingestd/ui/live.py, static/ui.js): fragments over real HTTP against a real MetricsServer.

A fragment is readable exactly where its page is (a login, or public_read with a loopback Host; 401 otherwise, also
once the session is gone); it is the part its page includes, rendered from the same partial template; the script is
served from the package with the right type and the CSP allows it (and fetches to the same origin) and nothing else;
no planted patient value appears in any fragment; imports under way show on the overview.
"""

from __future__ import annotations

import re
from pathlib import Path

import requests
from playwright.sync_api import expect

from ingestd.importprogress import ImportProgress
from ingestd.journal import Journal
from ingestd.progress import Counts
from ingestd.ui.session import COOKIE
from tests.browser import Pages
from tests.spooled import SpooledState
from tests.test_ui import TOKEN, _login, _phi, _token_file, _with_ui, serving
from tests.test_ui import state as state  # noqa: PLC0414 - the spooled state fixture, shared
from tests.test_ui_auth import _basic, _password_file
from tests.test_ui_auth import _login as _password_login

FRAGMENTS = ("/ui/fragments/overview", "/ui/fragments/studies", "/ui/fragments/studies?state=held")


def _study_fragments(state: SpooledState) -> list[str]:
    return [f"/ui/fragments/studies/{batch_id}" for batch_id in state.batch_ids.values()]


def _region(page: str) -> str:
    """What a page's live region holds (between its opening tag and the status line after it)."""
    match = re.search(r'<div id="live"[^>]*>\n(.*)</div>\n<p class="small live-status"', page, re.DOTALL)
    assert match is not None, page
    return match.group(1)


def _without_time(html: str) -> str:
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "TIME", html)


def test_fragments_need_a_login_exactly_as_their_pages(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    with serving(config) as (url, _app):
        for fragment in (*FRAGMENTS, *_study_fragments(state)):
            answer = requests.get(f"{url}{fragment}", allow_redirects=False, timeout=10)
            assert answer.status_code == 401, fragment  # not a redirect: the script would swap the login form in
            assert "Log in again" in answer.text
            assert "batch" not in answer.text.lower()
            assert "Content-Security-Policy" in answer.headers
        session = _login(url)
        for fragment in (*FRAGMENTS, *_study_fragments(state)):
            assert session.get(f"{url}{fragment}", timeout=10).status_code == 200, fragment
        assert session.get(f"{url}/ui/fragments/studies/999999", timeout=10).status_code == 404
        assert session.get(f"{url}/ui/fragments/other", timeout=10).status_code == 404
        assert session.post(f"{url}/ui/fragments/overview", timeout=10).status_code == 405
        kept = dict(session.cookies)
        assert session.post(f"{url}/ui/logout", timeout=10).status_code == 200
        # the session is gone (a copy of its cookie too): the fragments say so, the script asks for a login
        for fragment in FRAGMENTS:
            assert requests.get(f"{url}{fragment}", cookies=kept, timeout=10).status_code == 401


def test_public_read_opens_fragments_to_loopback_names_only(state: SpooledState) -> None:
    config = _with_ui(state.config, public_read=True)
    with serving(config) as (url, _app):
        port = url.rsplit(":", 1)[1]
        for fragment in (*FRAGMENTS, *_study_fragments(state)):
            for host in ("127.0.0.1", "localhost", "[::1]"):
                answer = requests.get(f"{url}{fragment}", headers={"Host": f"{host}:{port}"}, timeout=10)
                assert answer.status_code == 200, (fragment, host)
            for host in ("evil.example", "127.0.0.1.evil.example", "ingest.lab.example"):
                page = fragment.replace("/fragments", "")
                page = "/ui/" if page == "/ui/overview" else page
                shown = requests.get(f"{url}{page}", headers={"Host": host}, allow_redirects=False, timeout=10)
                assert shown.status_code == 303, (page, host)  # the page is not readable there...
                answer = requests.get(f"{url}{fragment}", headers={"Host": host}, allow_redirects=False, timeout=10)
                assert answer.status_code == 401, (fragment, host)  # ...and neither is its fragment


def test_a_fragment_is_what_its_page_includes(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    with serving(config) as (url, _app):
        session = _login(url)
        for page, fragment in (
            ("/ui/", "/ui/fragments/overview"),
            ("/ui/studies", "/ui/fragments/studies"),
            ("/ui/studies?state=held&reason=unrouted", "/ui/fragments/studies?state=held&reason=unrouted"),
            ("/ui/studies?modality=MR&older-than=1s", "/ui/fragments/studies?modality=MR&older-than=1s"),
            *((f"/ui/studies/{n}", f"/ui/fragments/studies/{n}") for n in state.batch_ids.values()),
        ):
            shown = session.get(f"{url}{page}", timeout=10).text
            assert f'data-live="{fragment.replace("&", "&amp;")}"' in shown
            assert 'data-updated=""' in shown
            assert _without_time(_region(shown)) == _without_time(session.get(f"{url}{fragment}", timeout=10).text)
        held = session.get(f"{url}/ui/fragments/studies?state=held", timeout=10).text
        assert "2 of 4 batches." in held and "<strong>unrouted</strong>" in held
        assert "<html" not in held and "<form" not in held  # the table only
        overview = session.get(f"{url}/ui/fragments/overview", timeout=10).text
        assert ">ok<" in overview and "1 quarantined item<" in overview
        assert "No <code>ingestd import</code> under way." in overview
        study = session.get(f"{url}/ui/fragments/studies/{state.batch_ids['OTHER']}", timeout=10).text
        assert "<dt>State</dt>" in study and '<h2 id="delivery">Delivery</h2>' in study
        assert "csrf" not in study  # the actions' forms stay on the page, not in the fragment
        # a filter the page refuses: the page says why and does not refresh; the fragment refuses it too
        wrong = session.get(f"{url}/ui/studies", params={"state": "hled"}, timeout=10)
        assert wrong.status_code == 400 and "data-live=" not in wrong.text
        assert session.get(f"{url}/ui/fragments/studies", params={"state": "hled"}, timeout=10).status_code == 400
        # the overview works without script: it reloads itself, in <noscript> only
        assert '<noscript><meta http-equiv="refresh" content="10"></noscript>' in session.get(f"{url}/ui/").text


def test_the_script_is_served_and_the_csp_allows_it_and_nothing_else(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    with serving(config) as (url, _app):
        script = requests.get(f"{url}/ui/static/ui.js", timeout=10)  # like the style sheet: no login
        assert script.status_code == 200
        assert script.headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert script.headers["X-Content-Type-Options"] == "nosniff"
        assert script.content == (Path(__file__).parents[1] / "ingestd/ui/static/ui.js").read_bytes()
        for word in ("eval(", "new Function", "http://", "https://", "document.write", "import("):
            assert word not in script.text, word
        session = _login(url)
        for page in ("/ui/", "/ui/studies", "/ui/quarantine", f"/ui/studies/{state.batch_ids['OTHER']}"):
            answer = session.get(f"{url}{page}", timeout=10)
            policy = dict(part.strip().split(" ", 1) for part in answer.headers["Content-Security-Policy"].split(";"))
            assert policy == {
                "default-src": "'none'",
                "script-src": "'self'",
                "connect-src": "'self'",
                "style-src": "'self'",
                "img-src": "'self'",
                "form-action": "'self'",
                "frame-ancestors": "'none'",
                "base-uri": "'none'",
            }
            # no inline script, no event handler attribute: what the CSP would refuse is not there to refuse
            assert set(re.findall(r"<script[^>]*>", answer.text)) <= {'<script src="/ui/static/ui.js" defer>'}
            assert "</script>" not in answer.text.replace('<script src="/ui/static/ui.js" defer></script>', "")
            assert not re.search(r"\son[a-z]+=", answer.text)
            assert "javascript:" not in answer.text


def test_no_patient_value_in_any_fragment(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    with serving(config) as (url, _app):
        session = _login(url)
        html = "\n".join(session.get(f"{url}{f}", timeout=10).text for f in (*FRAGMENTS, *_study_fragments(state)))
    for value in _phi(state):
        assert value not in html, value
    assert TOKEN not in html


def test_the_overview_lists_imports_under_way_with_their_counts(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    record = ImportProgress(config.state_dir, pid=4242)  # as an import of pid 4242 would (this process holds its lock)
    counts = Counts(files=120, scanned=80, spooled=70, known=5, quarantined=3, studies=4, delivered=1, held=1)
    with serving(config) as (url, _app):
        session = _login(url)
        try:
            record.start(counts)
            fragment = session.get(f"{url}/ui/fragments/overview", timeout=10).text
            assert '<tr class="import" data-pid="4242">' in fragment
            for cell in ("<td>scanning</td>", '"scanned">80/120<', '"spooled">70<', "<td>5</td>", "<td>3</td>"):
                assert cell in fragment, cell
            assert '"studies">4<' in fragment and '"delivered">1<' in fragment
            assert '<tr class="import"' in session.get(f"{url}/ui/", timeout=10).text  # the page too
            counts.delivering, counts.delivered = True, 3
            record.update(counts)
            fragment = session.get(f"{url}/ui/fragments/overview", timeout=10).text
            assert "<td>delivering</td>" in fragment and '"delivered">3<' in fragment
        finally:
            record.remove()
        fragment = session.get(f"{url}/ui/fragments/overview", timeout=10).text
        assert "data-pid" not in fragment and "No <code>ingestd import</code> under way." in fragment


def test_a_fragment_opens_exactly_where_its_page_opens(state: SpooledState) -> None:
    """Whatever the login scheme becomes, a fragment must follow its page: checked request by request."""
    study = state.batch_ids["OTHER"]
    pairs = [
        ("/ui/", "/ui/fragments/overview"),
        ("/ui/studies?state=held", "/ui/fragments/studies?state=held"),
        (f"/ui/studies/{study}", f"/ui/fragments/studies/{study}"),
    ]
    for public in (False, True):
        config = _with_ui(state.config, token_file=_token_file(state.root), public_read=public)
        with serving(config) as (url, app):
            port = url.rsplit(":", 1)[1]
            good = app.sessions.sign(TOKEN)
            ended = app.sessions.sign(TOKEN)
            session = app.sessions.check(ended, lambda _user: TOKEN)
            assert session is not None
            app.sessions.end(session)
            requests_made = 0
            for cookie in (None, good, ended, "forged", app.sessions.sign("another-token-of-some-length")):
                for host in (f"127.0.0.1:{port}", f"localhost:{port}", "evil.example", "ingest.lab.example:443"):
                    cookies = {COOKIE: cookie} if cookie else {}
                    for page, fragment in pairs:
                        opened = [
                            requests.get(
                                f"{url}{path}",
                                headers={"Host": host},
                                cookies=cookies,
                                allow_redirects=False,
                                timeout=10,
                            ).status_code
                            == 200
                            for path in (page, fragment)
                        ]
                        assert opened[0] == opened[1], (public, cookie, host, page)
                        requests_made += 1
            assert requests_made == 5 * 4 * len(pairs)


def test_in_a_real_browser_the_page_follows_the_journal_without_a_reload(
    state: SpooledState, browser_pages: Pages
) -> None:
    """Headless Chromium (tests/browser.py) under the page's CSP: the script swaps the fragment in (data-updated,
    "updated HH:MM:SS"), fetches nothing while the tab is hidden and at once when it is shown again, a change in the
    journal shows without a navigation, a lost session asks for a login, a
    stopped server says the connection is lost."""
    config = _with_ui(state.config, token_file=_token_file(state.root))
    page = browser_pages.page
    navigations: list[str] = []
    csp_errors: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    page.on("console", lambda message: csp_errors.append(message.text) if "Content Security" in message.text else None)
    live = page.locator("#live")
    # A hidden tab, as far as the page can tell (headless Chromium keeps every tab visible): the test sets it.
    browser_pages.context.add_init_script(
        "window.hideTab = (hidden) => { window.tabHidden = hidden;"
        " document.dispatchEvent(new Event('visibilitychange')); };"
        "Object.defineProperty(document, 'visibilityState', {get: () => (window.tabHidden ? 'hidden' : 'visible')});"
    )
    with serving(config) as (url, app):
        page.goto(f"{url}/ui/login")
        page.get_by_label("Token").fill(TOKEN)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(f"{url}/ui/")
        held = page.locator("a[href='/ui/studies?state=held']")
        expect(held).to_have_text("2")
        expect(live).to_have_attribute("data-updated", re.compile(r"^\d{4}-\d\d-\d\dT"), timeout=15_000)
        expect(page.locator("#live-status")).to_have_text(re.compile(r"^updated \d\d:\d\d:\d\d$"))
        page.evaluate("() => window.hideTab(true)")
        expect(live).to_have_attribute("data-live-state", "paused")
        page.wait_for_timeout(1_000)  # a fetch under way when the tab was hidden ends
        before = live.get_attribute("data-updated")
        page.wait_for_timeout(7_000)  # more than one interval: nothing fetched while hidden
        assert live.get_attribute("data-updated") == before
        page.evaluate("() => window.hideTab(false)")  # shown again: fetched at once
        expect(live).not_to_have_attribute("data-updated", before or "", timeout=2_000)
        expect(live).to_have_attribute("data-live-state", "ok")
        shown = len(navigations)
        journal = Journal(config.journal_path)
        try:
            with journal.transaction() as tx:
                tx.execute("UPDATE batches SET state = 'released' WHERE id = ?", (state.batch_ids["OTHER"],))
        finally:
            journal.close()
        expect(held).to_have_text("1", timeout=15_000)  # fetched and swapped in...
        assert len(navigations) == shown  # ...without a reload
        browser_pages.shot("overview-live")
        cookie = next(c["value"] for c in browser_pages.context.cookies() if c["name"] == COOKIE)
        session = app.sessions.check(cookie, lambda _user: TOKEN)
        assert session is not None
        app.sessions.end(session)  # logged out elsewhere (or expired)
        expect(live).to_have_attribute("data-live-state", "login", timeout=15_000)
        expect(page.get_by_role("link", name="log in again")).to_have_attribute("href", "/ui/login")
        browser_pages.shot("overview-log-in-again")
        page.goto(f"{url}/ui/login")
        page.get_by_label("Token").fill(TOKEN)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(f"{url}/ui/")
        page.goto(f"{url}/ui/studies?state=held")
        expect(live).to_have_attribute("data-live", "/ui/fragments/studies?state=held")
        expect(live).to_have_attribute("data-updated", re.compile(r"^\d{4}-"), timeout=15_000)
        expect(page.get_by_text("1 of 4 batches.")).to_be_visible()
    expect(live).to_have_attribute("data-live-state", "lost", timeout=15_000)  # the server is gone
    expect(page.locator("#live-status")).to_have_text("connection lost: trying again")
    expect(page.get_by_text("1 of 4 batches.")).to_be_visible()  # what was shown stays
    browser_pages.shot("studies-connection-lost")
    assert csp_errors == []


def test_with_passwords_and_http_basic_a_fragment_opens_exactly_where_its_page_opens(state: SpooledState) -> None:
    passwords = _password_file(state.root, {"ana": "ana-password-1", "ben": "ben-password-2"})
    study = state.batch_ids["OTHER"]
    pairs = [("/ui/", "/ui/fragments/overview"), (f"/ui/studies/{study}", f"/ui/fragments/studies/{study}")]
    seen: list[tuple[int, int]] = []
    with serving(_with_ui(state.config, password_file=passwords)) as (url, _app):
        for session in (_password_login(url, "ana", "ana-password-1"), requests.Session()):
            for page, fragment in pairs:
                codes = [
                    session.get(f"{url}{path}", allow_redirects=False, timeout=10).status_code
                    for path in (page, fragment)
                ]
                seen.append((codes[0], codes[1]))
    with serving(_with_ui(state.config, password_file=passwords, http_basic=True)) as (url, _app):
        for headers in (_basic("ana", "ana-password-1"), _basic("ana", "wrong-password"), {}):
            for page, fragment in pairs:
                answers = [requests.get(f"{url}{path}", headers=headers, timeout=10) for path in (page, fragment)]
                seen.append((answers[0].status_code, answers[1].status_code))
                if answers[1].status_code == 401:  # the script stops and asks for a login
                    assert answers[1].headers.get("WWW-Authenticate") == answers[0].headers.get("WWW-Authenticate")
    # opened (200) both, or neither: a password login's page and fragment; Basic's right, wrong and no password
    assert seen == [(200, 200), (200, 200), (303, 401), (303, 401), (200, 200), (200, 200), *[(401, 401)] * 4]
