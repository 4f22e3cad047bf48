"""The web page in a real browser (Debian's headless Chromium, tests/browser.py) against a real daemon (`ingestd
run`) and the XNAT stand-in, as a lab admin uses it: log in through the form; the overview; a study dropped in a
folder named after its patient that no rule takes, shown held with its reason and what to do; the rules file fixed
and Retry pressed; the study archived (checked by SOP Instance UID in the stand-in). Then what must not work: a
logged-out visitor acting (no buttons; a post refused, nothing done), a form posted from another site and a form
with a tampered token (refused, nothing done). No page shows a planted patient value, but the answer to "Show
identifiers" (audited without the values, gone again on the next GET). Every page is saved as a
screenshot (build/screenshots/<test>/) and checked for the accessibility basics (tests.browser).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect
from pydicom.dataset import Dataset

from ingestd.testing.xnat import FakeXnat
from tests.browser import Pages, accessibility_problems
from tests.dicom import make_study, write_instances
from tests.lab import xnat_holdings
from tests.procs import SCANNER_RULES, DaemonProcess, free_port, wait_until, write_xnat_daemon_config
from tests.spooled import PATIENT_FOLDER, PATIENT_ID
from tests.test_retry import batches, in_state, outgoing_uids

TOKEN = "browser-token-0123456789abcdef"
# What STORESCU sends is taken (SCANNER_RULES); a study from the drop folder is not: held `unrouted`.
FIXED_RULES = SCANNER_RULES.replace("calling_aet: STORESCU", "drop_folder: drop")


def _config(root: Path, xnat: FakeXnat, *, public_read: bool = False) -> Path:
    """A daemon with the page (token login; `public_read` on loopback if asked), fed by the drop folder `drop`."""
    (root / "drop").mkdir()
    token_file = root / "ui.token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    public = ", public_read: true" if public_read else ""
    return write_xnat_daemon_config(
        root,
        free_port(),
        xnat.url,
        extra=f"drop_folders: [{{path: {root / 'drop'}, settle_seconds: 0.3}}]\n"
        f"ui: {{token_file: {token_file}{public}}}\n",
    )


def _drop_patient_folder(root: Path, study: list[Dataset]) -> None:
    """The study into the drop folder, in a folder named after its patient, all at once."""
    staging = root / "staging" / PATIENT_FOLDER
    write_instances(study, staging)
    staging.rename(root / "drop" / PATIENT_FOLDER)


def _planted(study: list[Dataset]) -> set[str]:
    """The patient's values, the study's original UIDs and the patient-named folder: on no page."""
    uids = {str(ds.get(key)) for ds in study for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    return {PATIENT_ID, PATIENT_FOLDER, "Synthetic", str(study[0].PatientName), *uids}


def _assert_no_phi(pages: Pages, study: list[Dataset]) -> None:
    assert pages.html, "no page recorded"
    for name, html in pages.html.items():
        for value in _planted(study):
            assert value not in html, f"{value!r} shown on {name}"


def _assert_accessible(page: Page) -> None:
    problems = accessibility_problems(page)
    assert not problems, f"{page.url}:\n" + "\n".join(problems)


def _log_in(pages: Pages, base: str) -> Page:
    page = pages.visit(f"{base}/ui/login", "login")
    _assert_accessible(page)
    page.get_by_label("Token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{base}/ui/")
    return page


def test_a_held_study_is_shown_retried_on_the_page_and_archived(
    tmp_path: Path, xnat: FakeXnat, browser_pages: Pages
) -> None:
    config = _config(tmp_path, xnat)
    study = make_study(series=1, per_series=3)
    uid = str(study[0].StudyInstanceUID)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        base = f"http://127.0.0.1:{int(daemon.wait_logged('metrics.started')['port'])}"
        page = browser_pages.visit(f"{base}/ui/studies", "not-logged-in")
        assert page.url == f"{base}/ui/login"  # every page needs the login
        _log_in(browser_pages, base)
        browser_pages.shot("overview-empty")
        expect(page.locator("p.status")).to_have_text("ok")
        expect(page.get_by_role("row", name="DropFolderWatcher yes")).to_be_visible()

        _drop_patient_folder(tmp_path, study)
        batch_id, _, code, _ = wait_until(lambda: in_state(tmp_path, uid, "held"), 60, message="held")
        assert code == "unrouted"
        page.reload()
        browser_pages.shot("overview-held")
        expect(page.get_by_role("table").filter(has_text="Held, by reason")).to_contain_text("unrouted")
        expect(page.locator("a[href='/ui/studies?state=held']")).to_have_text("1")  # studies by state

        page.get_by_role("link", name="Studies").click()
        page.get_by_label("State").select_option("held")
        page.get_by_role("button", name="Filter").click()
        page.wait_for_url(f"{base}/ui/studies?state=held**")
        browser_pages.shot("studies-held")
        row = page.locator("tr", has=page.get_by_role("link", name=str(batch_id), exact=True))
        expect(row).to_contain_text("unrouted no rule matches this study")
        expect(row.locator(".hint")).to_contain_text("no rule matches: fix the rules")
        expect(row).to_contain_text("drop:drop")

        row.get_by_role("link", name=str(batch_id), exact=True).click()
        page.wait_for_url(f"{base}/ui/studies/{batch_id}")
        browser_pages.shot("study-held")
        expect(page.locator("dd.state-held")).to_have_text("held")
        expect(page.locator("dd.hint")).to_contain_text("no rule matches: fix the rules")
        for label in ("Retry", "Retry now", "Release"):
            expect(page.get_by_role("button", name=label, exact=True)).to_be_visible()

        (tmp_path / "lab.rules.yaml").write_text(FIXED_RULES, encoding="utf-8")  # the admin fixes the rules
        page.get_by_role("button", name="Retry", exact=True).click()
        page.wait_for_url(f"{base}/ui/studies/{batch_id}")
        browser_pages.shot("retry-pressed")

        def retried() -> bool:
            page.reload()
            browser_pages.keep("retry-under-way")
            return "re-routed with rule set" in (page.locator("section.outcome").text_content() or "")

        wait_until(retried, 60, interval=0.5, message="the retry's outcome on the page")
        expect(page.locator("section.outcome")).to_contain_text("reloaded its configuration, rules and credentials")
        browser_pages.shot("retry-done")
        wait_until(lambda: in_state(tmp_path, uid, "delivered"), 60, message="delivered")
        page.reload()
        expect(page.locator("dd.state-delivered")).to_have_text("delivered")
        # a delivered study: Resend and Show identifiers, beside Log out; no Retry or Release any more
        expect(page.get_by_role("button")).to_have_count(3)
        for label in ("Resend", "Show identifiers", "Log out"):
            expect(page.get_by_role("button", name=label, exact=True)).to_be_visible()
        browser_pages.shot("study-delivered")
        browser_pages.visit(f"{base}/ui/", "overview-delivered")
        expect(page.locator("a[href='/ui/studies?state=delivered']")).to_have_text("1")
        expect(page.locator("a[href='/ui/studies?state=held']")).to_have_text("0")
        browser_pages.visit(f"{base}/ui/quarantine", "quarantine")
        page.get_by_role("button", name="Log out").click()
        page.wait_for_url(f"{base}/ui/login")
        assert daemon.terminate() == 0
    archived, prearchived = xnat_holdings(xnat, "PROJ")
    sent = outgoing_uids(tmp_path, batch_id)
    assert len(sent) == 3 and sorted(archived) == sent and not prearchived
    _assert_no_phi(browser_pages, study)
    log = (tmp_path / "daemon.log").read_text(encoding="utf-8")
    assert '"event": "ui.action"' in log and '"event": "daemon.reload"' in log
    assert TOKEN not in log and uid not in log


# -- refusals: one daemon with a held study for the module -------------------------------------------------------


@dataclass
class HeldSite:
    """A running daemon (the page readable without a login: public_read) holding one study `unrouted`."""

    root: Path
    base: str
    batch_id: int
    study: list[Dataset]
    daemon: DaemonProcess
    xnat: FakeXnat

    def study_url(self, action: str = "") -> str:
        return f"{self.base}/ui/studies/{self.batch_id}" + (f"/{action}" if action else "")

    def assert_nothing_done(self) -> None:
        """The study is still held as it was, no action ran, and XNAT got nothing."""
        uid = str(self.study[0].StudyInstanceUID)
        assert batches(self.root)[uid][1:3] == ("held", "unrouted")
        assert not self.daemon.logged("ui.action")
        assert not self.xnat.experiments() and not self.xnat.prearchive_files()


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HeldSite]:
    root = tmp_path_factory.mktemp("held")
    with pytest.MonkeyPatch.context() as env, FakeXnat(version="1.8.10") as xnat:
        env.setenv("INGESTD_TEST_KEY", "t" * 40)
        env.setenv("XNAT_TEST_USER", "ingestd")
        env.setenv("XNAT_TEST_PASSWORD", "pw-for-tests")
        xnat.add_user("ingestd", "pw-for-tests")
        xnat.add_project("PROJ", members=["ingestd"])
        study = make_study(series=1, per_series=2)
        uid = str(study[0].StudyInstanceUID)
        with DaemonProcess(_config(root, xnat, public_read=True), root / "daemon.log") as daemon:
            daemon.wait_logged("daemon.started")
            base = f"http://127.0.0.1:{int(daemon.wait_logged('metrics.started')['port'])}"
            _drop_patient_folder(root, study)
            batch_id = wait_until(lambda: in_state(root, uid, "held"), 60, message="held")[0]
            yield HeldSite(root, base, batch_id, study, daemon, xnat)
            assert daemon.terminate() == 0
    log = (root / "daemon.log").read_text(encoding="utf-8")
    assert TOKEN not in log and uid not in log


def _csrf(page: Page, path: str) -> str:
    value = page.locator(f"form[action='{path}'] input[name=csrf]").get_attribute("value")
    assert value
    return value


def _post_form(page: Page, action: str, csrf: str) -> int:
    """Post a form with `csrf` to `action` from the page shown (its own site), as a browser posts a form; the
    answer's status."""
    with page.expect_navigation() as answer:
        page.evaluate(
            """([action, csrf]) => {
                const form = document.createElement("form");
                form.method = "post";
                form.action = action;
                const field = document.createElement("input");
                field.type = "hidden"; field.name = "csrf"; field.value = csrf;
                form.appendChild(field);
                document.body.appendChild(form);
                form.submit();
            }""",
            [action, csrf],
        )
    response = answer.value
    assert response is not None
    return response.status


def test_a_logged_out_visitor_sees_no_buttons_and_cannot_act(held: HeldSite, browser_pages: Pages) -> None:
    path = f"/ui/studies/{held.batch_id}/retry"
    page = browser_pages.visit(held.study_url(), "public-study")  # public_read: readable, not actionable
    expect(page.locator("dd.state-held")).to_have_text("held")
    expect(page.get_by_role("button")).to_have_count(0)
    assert page.locator("form[method=post]").count() == 0
    answer = page.request.post(held.study_url("retry"), form={"csrf": "0" * 64}, max_redirects=0)
    assert answer.status == 403 and "Log in to act" in answer.text()

    page.get_by_role("link", name="Log in").click()  # a public_read visitor logs in to act
    page.wait_for_url(f"{held.base}/ui/login")
    page.get_by_label("Token").fill(TOKEN)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{held.base}/ui/")
    page.goto(held.study_url())
    browser_pages.shot("study-logged-in")
    expect(page.get_by_role("button", name="Retry", exact=True)).to_be_visible()
    token = _csrf(page, path)  # a form token of this session, kept
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{held.base}/ui/login")
    page.goto(held.study_url())
    browser_pages.shot("study-logged-out")
    expect(page.get_by_role("button")).to_have_count(0)
    assert _post_form(page, path, token) == 403  # the right token, but the session is over
    browser_pages.shot("refused-logged-out")
    expect(page.get_by_role("alert")).to_have_text("Log in to act on a study.")
    held.assert_nothing_done()
    assert {entry["reason"] for entry in held.daemon.logged("ui.action_refused")} >= {"not logged in"}
    _assert_no_phi(browser_pages, held.study)


class _OtherSite(BaseHTTPRequestHandler):
    """Another site's page: a form that posts itself to the daemon's action as soon as it is opened."""

    page = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def other_site() -> Iterator[tuple[int, type[_OtherSite]]]:
    """A second local HTTP server (its port, and its handler class whose `page` the test sets)."""
    handler = type("OtherSite", (_OtherSite,), {"page": b""})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="other-site", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1]), handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_forms_from_another_site_or_with_a_tampered_token_are_refused(
    held: HeldSite, browser_pages: Pages, other_site: tuple[int, type[_OtherSite]]
) -> None:
    port, handler = other_site
    path = f"/ui/studies/{held.batch_id}/retry"
    page = _log_in(browser_pages, held.base)
    page.goto(held.study_url())
    browser_pages.shot("study")
    token = _csrf(page, path)
    # Even with the session's right form token (as if it leaked), a post from another site is refused.
    handler.page = (
        f'<!doctype html><html lang="en"><title>another site</title><body><form method="post"'
        f' action="{held.base}{path}"><input type="hidden" name="csrf" value="{token}"></form>'
        "<script>document.forms[0].submit()</script></body></html>"
    ).encode()
    refused = set()
    for host, why in (("127.0.0.1", "cross-site"), ("localhost", "not logged in")):
        # 127.0.0.1 on another port: the same site to the browser, which sends the SameSite=Strict cookie; the
        # daemon refuses the form by its origin. localhost: another site, the browser sends no cookie at all.
        with page.expect_response(f"{held.base}{path}") as answer:
            page.goto(f"http://{host}:{port}/")
        assert answer.value.status == 403
        page.wait_for_load_state()
        browser_pages.shot(f"refused-from-{host}")
        refused.add(why)

    page.goto(held.study_url())
    field = page.locator(f"form[action='{path}'] input[name=csrf]")
    field.evaluate("(input) => { input.value = input.value.slice(1) + input.value[0]; }")  # tampered
    page.get_by_role("button", name="Retry", exact=True).click()
    browser_pages.shot("refused-tampered")
    expect(page.get_by_role("heading", level=1)).to_have_text("Refused")
    expect(page.get_by_role("alert")).to_have_text("The form has expired: open the study's page again.")
    page.goto(held.study_url())
    other = _csrf(page, f"/ui/studies/{held.batch_id}/release")
    assert _post_form(page, path, other) == 403  # the token of another action
    refused.add("wrong form token")

    held.assert_nothing_done()
    reasons = [entry["reason"] for entry in held.daemon.logged("ui.action_refused")]
    assert refused <= set(reasons) and reasons.count("wrong form token") >= 2
    _assert_no_phi(browser_pages, held.study)


def test_every_page_passes_the_accessibility_basics(held: HeldSite, browser_pages: Pages) -> None:
    page = _log_in(browser_pages, held.base)  # the login page is checked there
    for url, name in (
        (f"{held.base}/ui/", "overview"),
        (f"{held.base}/ui/studies", "studies"),
        (f"{held.base}/ui/studies?state=nonsense", "studies-bad-filter"),
        (held.study_url(), "study-held"),
        (f"{held.base}/ui/quarantine", "quarantine"),
        (f"{held.base}/ui/nowhere", "not-found"),
    ):
        browser_pages.visit(url, name)
        _assert_accessible(page)
    # Every state colour of the style sheet, on a page of its own site, as the pages show them.
    css = page.request.get(f"{held.base}/ui/static/style.css").text()
    page.goto(f"{held.base}/ui/")
    page.evaluate(
        """(css) => {
            const names = [...new Set(css.match(/\\.(status|state)-[a-z-]+/g) || [])].map((n) => n.slice(1));
            const table = document.createElement("table");
            for (const name of names) {
                const row = table.insertRow();
                row.className = name;
                const cell = row.insertCell();
                cell.className = name;
                cell.innerHTML =
                    `<span class="${name}">${name}</span> <a href="#">link</a> <span class="hint">hint</span>`;
            }
            document.querySelector("main").appendChild(table);
        }""",
        css,
    )
    browser_pages.shot("state-colours")
    assert page.locator("td.status-ok").count() >= 1 and page.locator("tr.state-held").count() >= 1
    _assert_accessible(page)
    _assert_no_phi(browser_pages, held.study)


def test_identifiers_show_only_after_the_toggle_and_are_gone_when_hidden(held: HeldSite, browser_pages: Pages) -> None:
    uid = str(held.study[0].StudyInstanceUID)
    page = _log_in(browser_pages, held.base)
    browser_pages.visit(held.study_url(), "study-digests")
    before = len(held.daemon.logged("ui.identifiers_shown"))
    page.get_by_role("button", name="Show identifiers", exact=True).click()
    page.wait_for_load_state()
    shown = page.content()  # not recorded in browser_pages.html: this page is meant to carry them
    page.screenshot(path=str(browser_pages.folder / "90-identifiers-shown.png"), full_page=True)
    expect(page.get_by_role("heading", name="Identifiers shown")).to_be_visible()
    assert uid in shown  # the Study Instance UID as received (a drop folder's study has no source path to show)
    assert page.locator("[data-live]").count() == 0  # the identified answer is not polled into digests
    _assert_accessible(page)
    wait_until(lambda: len(held.daemon.logged("ui.identifiers_shown")) > before, 10, message="the audit event")
    audit = held.daemon.logged("ui.identifiers_shown")[-1]
    assert audit["batch_id"] == held.batch_id and audit["user"] is None  # the token login has no user name
    assert uid not in str(audit) and PATIENT_FOLDER not in str(audit)  # the event, without the values
    page.get_by_role("link", name="hide the identifiers").click()
    page.wait_for_url(held.study_url())
    browser_pages.shot("study-hidden-again")
    page.reload()  # a reload shows digests: the identifiers are not kept in the session
    browser_pages.shot("study-reloaded")
    held.assert_nothing_done()
    _assert_no_phi(browser_pages, held.study)
    log = (held.root / "daemon.log").read_text(encoding="utf-8")
    assert uid not in log and PATIENT_FOLDER not in log
