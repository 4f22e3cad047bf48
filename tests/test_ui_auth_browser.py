"""The password login and HTTP Basic in Debian's headless Chromium (tests/browser.py) against a real MetricsServer
on a real spooled state: the form asks for a user name and password and logs in; with Basic the browser answers the
challenge with its credentials, shows no Log out, and a study page's button (its form token bound to the user, the
post from the page's own origin) does what it says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, expect
from playwright.sync_api import Error as PlaywrightError

from tests.browser import Pages, accessibility_problems
from tests.spooled import KEY, SpooledState, spooled_state
from tests.test_ui import _with_ui, serving
from tests.test_ui_actions import _journal_state
from tests.test_ui_auth import ALICE, _password_file

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SpooledState:
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    return spooled_state(tmp_path)


def test_the_password_form_in_a_browser(browser_pages: Pages, state: SpooledState) -> None:
    config = _with_ui(state.config, password_file=_password_file(state.root, {"alice": ALICE}))
    with serving(config) as (url, _app):
        page = browser_pages.visit(f"{url}/ui/", "login form")
        assert page.url == f"{url}/ui/login"
        assert accessibility_problems(page) == []
        page.get_by_label("User name").fill("alice")
        page.get_by_label("Password").fill("not-her-password")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("alert")).to_have_text("Wrong user name or password.")
        browser_pages.shot("wrong password")
        page.get_by_label("User name").fill("alice")
        page.get_by_label("Password").fill(ALICE)
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("button", name="Log out")).to_be_visible()
        assert page.url == f"{url}/ui/"
        browser_pages.shot("logged in")
    for html in browser_pages.html.values():
        assert ALICE not in html


@pytest.fixture
def basic_server(state: SpooledState) -> Iterator[str]:
    passwords = _password_file(state.root, {"alice": ALICE})
    with serving(_with_ui(state.config, password_file=passwords, http_basic=True)) as (url, _app):
        yield url


def test_basic_in_a_browser(chromium: Browser, basic_server: str, state: SpooledState, tmp_path: Path) -> None:
    url, held = basic_server, state.batch_ids["OTHER"]
    anonymous = chromium.new_context()
    try:
        # no credentials: the challenge, which headless Chromium (no dialog to ask in) answers with an error
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            anonymous.new_page().goto(f"{url}/ui/")
    finally:
        anonymous.close()
    context = chromium.new_context(http_credentials={"username": "alice", "password": ALICE})
    try:
        page = context.new_page()
        page.goto(f"{url}/ui/studies/{held}")
        expect(page.get_by_role("heading", level=1)).to_contain_text(str(held))
        expect(page.get_by_role("button", name="Log out")).to_have_count(0)
        expect(page.get_by_role("link", name="Log in")).to_have_count(0)
        page.screenshot(path=str(tmp_path / "basic-study.png"), full_page=True)
        page.get_by_role("button", name="Release", exact=True).click()  # posted from the page: same origin
        page.wait_for_url(f"{url}/ui/studies/{held}")
        assert _journal_state(state, held) == "released"
    finally:
        context.close()
