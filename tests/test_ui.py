"""The web page under /ui/: real HTTP with requests against a real MetricsServer over a real spooled state directory.

Pages render; every page needs a login unless `ui.public_read` (loopback only: refused at configuration load
otherwise); a wrong token is refused and logged without it; a right one gives an HttpOnly, SameSite=Strict cookie
that opens the pages; forged, altered, expired, logged-out and old-token cookies are refused; no planted patient
value (name, ID, the patient's folder, original UIDs) appears in any page's HTML.
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from ingestd.cli import main
from ingestd.config import Config, parse_config
from ingestd.errors import ConfigError
from ingestd.journal import Journal, Source
from ingestd.metrics import MetricsServer
from ingestd.spool import Quarantine
from ingestd.ui import UiApp
from ingestd.ui.auth import MAX_WRONG_PER_MINUTE
from ingestd.ui.session import COOKIE
from ingestd.uiconfig import Ui, is_loopback
from tests.spooled import KEY, PATIENT_FOLDER, PATIENT_ID, SpooledState, spooled_state

TOKEN = "lab-token-0123456789abcdef"
PAGES = ("/ui/", "/ui/studies", "/ui/quarantine")
TITLES = {"/ui/": "Overview", "/ui/studies": "Studies", "/ui/quarantine": "Quarantine"}
NOTE = "<script>alert('x')</script>"


def _health() -> dict[str, Any]:
    return {
        "status": "ok",
        "live": True,
        "ready": True,
        "services": {"listener": True, "watcher": True},
        "wedged": [],
        "xnat": {"main": {"server": "main", "state": "ok"}},
        "paused_servers": [],
    }


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SpooledState:
    """The four spooled batches, a quarantined file from a folder named after the patient, and a note with markup."""
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    spooled = spooled_state(tmp_path)
    journal = Journal(spooled.config.journal_path)
    try:
        source = Source("folder", f"/data/{PATIENT_FOLDER}", f"{PATIENT_FOLDER}/notes.txt")
        Quarantine(spooled.config.quarantine_dir, journal).put_bytes(
            f"{PATIENT_FOLDER}.txt", b"not dicom", "not a DICOM file (no DICM prefix)", source
        )
        with journal.transaction() as tx:
            tx.execute("UPDATE batches SET note = ? WHERE id = ?", (NOTE, spooled.batch_ids["OTHER"]))
    finally:
        journal.close()
    return spooled


def _token_file(root: Path, token: str = TOKEN, mode: int = 0o600) -> Path:
    path = root / "ui.token"
    path.write_text(f"{token}\n", encoding="utf-8")
    path.chmod(mode)
    return path


def _with_ui(config: Config, **ui: Any) -> Config:
    return config.model_copy(update={"ui": Ui(**ui)})


@contextmanager
def serving(config: Config, health: Any = _health) -> Iterator[tuple[str, UiApp]]:
    """A real MetricsServer on a free port of 127.0.0.1 with the page mounted; stopped at the end."""
    app = UiApp(config, health)
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), health, ui=app)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", app
    finally:
        server.stop()


def _login(url: str, token: str = TOKEN) -> requests.Session:
    session = requests.Session()
    answer = session.post(f"{url}/ui/login", data={"token": token}, allow_redirects=False, timeout=10)
    assert answer.status_code == 303, answer.text
    assert answer.headers["Location"] == "/ui/"
    return session


def _phi(state: SpooledState) -> list[str]:
    return [PATIENT_ID, PATIENT_FOLDER, "DOE^JOHN", "DOE^JOHN".replace("^", "&#94;"), "Synthetic", *state.uids()]


def test_every_page_needs_a_login_without_public_read(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    with serving(config) as (url, _app):
        for page in (*PAGES, "/ui"):
            answer = requests.get(f"{url}{page}", allow_redirects=False, timeout=10)
            assert answer.status_code == 303, page
            assert answer.headers["Location"] == "/ui/login"
        login = requests.get(f"{url}/ui/", timeout=10)  # followed: the form
        assert login.status_code == 200
        assert "<title>Log in · ingestd</title>" in login.text
        assert 'type="password"' in login.text
        # the metrics endpoint is as it was
        assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
        assert requests.get(f"{url}/metrics", timeout=10).status_code == 200
        assert requests.get(f"{url}/ui/nothing", timeout=10).status_code == 404
        assert requests.get(f"{url}/other", timeout=10).status_code == 404


def test_a_wrong_token_is_refused_and_logged_without_it(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    wrong = "not-the-token-but-long-enough"
    with serving(config) as (url, _app), capture_logs() as logged:
        for given in (wrong, "", TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
            answer = requests.post(f"{url}/ui/login", data={"token": given}, allow_redirects=False, timeout=10)
            assert answer.status_code == 403
            assert "Set-Cookie" not in answer.headers
            assert "That is not the token." in answer.text
            assert (
                requests.get(f"{url}/ui/", cookies=answer.cookies, allow_redirects=False, timeout=10).status_code == 303
            )
    refused = [event for event in logged if event["event"] == "ui.login_refused"]
    assert len(refused) == 5
    assert {event["reason"] for event in refused} == {"wrong token"}
    assert {event["client"] for event in refused} == {"127.0.0.1"}
    text = json.dumps(logged, default=str)
    assert wrong not in text
    assert TOKEN[:-1] not in text


def test_the_right_token_gives_a_strict_httponly_cookie_that_opens_every_page(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    with serving(config) as (url, _app), capture_logs() as logged:
        answer = requests.post(f"{url}/ui/login", data={"token": f"{TOKEN}"}, allow_redirects=False, timeout=10)
        assert answer.status_code == 303
        cookie = answer.headers["Set-Cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        for attribute in ("HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=43200"):
            assert attribute in cookie
        session = requests.Session()
        session.cookies.update(answer.cookies)
        for page in PAGES:
            shown = session.get(f"{url}{page}", allow_redirects=False, timeout=10)
            assert shown.status_code == 200, page
            assert shown.headers["Content-Type"] == "text/html; charset=utf-8"
            assert f"<title>{TITLES[page]} · ingestd</title>" in shown.text
            assert "default-src 'none'" in shown.headers["Content-Security-Policy"]
            assert shown.headers["Cache-Control"] == "no-store"
            # Not no-referrer: under it Chromium posts the page's own forms with Origin: null, which the login and
            # the actions refuse as another site's (found by tests/test_ui_browser.py).
            assert shown.headers["Referrer-Policy"] == "same-origin"
            assert "Log out" in shown.text
        assert session.get(f"{url}/ui/login", allow_redirects=False, timeout=10).headers["Location"] == "/ui/"
    assert [event["event"] for event in logged if event["event"].startswith("ui.")] == ["ui.login"]


def test_the_pages_show_what_status_shows(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    with serving(config) as (url, _app):
        session = _login(url)
        overview = session.get(f"{url}/ui/", timeout=10).text
        assert '<meta http-equiv="refresh" content="10">' in overview
        assert ">ok<" in overview  # the service's status, from the health facts
        assert 'href="/ui/studies?state=held&amp;reason=unrouted">unrouted</a>' in overview
        assert "INGESTD on 0.0.0.0:11112" in overview
        assert str(state.root / "drop") in overview  # configured drop folders are the admin's, not a patient's
        assert "http://127.0.0.1:9" in overview
        assert "1 quarantined item<" in overview

        every = session.get(f"{url}/ui/studies", timeout=10).text
        assert "4 of 4 batches." in every
        held = session.get(f"{url}/ui/studies", params={"state": "held"}, timeout=10).text
        assert "2 of 4 batches." in held
        assert "<strong>unrouted</strong> no rule matches this study (2 rules tried)" in held
        assert 'class="state-routed"' not in held
        routed = session.get(f"{url}/ui/studies", params={"state": "routed", "source": "SCANNER"}, timeout=10).text
        assert "1 of 4 batches." in routed
        assert "drop:drop" in session.get(f"{url}/ui/studies", params={"source": "drop"}, timeout=10).text
        wrong = session.get(f"{url}/ui/studies", params={"state": "hled"}, timeout=10)
        assert wrong.status_code == 400
        assert "state=hled: no such state" in wrong.text
        assert "did you mean" in wrong.text.lower()

        quarantine = session.get(f"{url}/ui/quarantine", timeout=10).text
        assert "not a DICOM file (no DICM prefix)" in quarantine
        assert "import" in quarantine
        assert "9 B" in quarantine


def test_values_are_escaped(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    with serving(config) as (url, _app):
        session = _login(url)
        page = session.get(f"{url}/ui/studies", timeout=10).text
        assert NOTE not in page
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
        hostile = session.get(f"{url}/ui/studies", params={"source": '"><script>x</script>'}, timeout=10).text
        assert "<script>x" not in hostile
        # the one script the pages load is the package's own file (ui.js); no other script element
        assert re.findall(r"<script[^>]*>", page + hostile) == ['<script src="/ui/static/ui.js" defer>'] * 2


def test_forged_altered_expired_logged_out_and_old_token_cookies_are_refused(state: SpooledState) -> None:
    token_file = _token_file(state.root)
    config = _with_ui(state.config, token_file=token_file)
    with serving(config) as (url, app):

        def opens(value: str) -> bool:
            answer = requests.get(f"{url}/ui/", cookies={COOKIE: value}, allow_redirects=False, timeout=10)
            return answer.status_code == 200

        good = app.sessions.sign(TOKEN)
        assert opens(good)
        expires, nonce, mac = good.split(".")
        assert not opens(f"{int(expires) + 3600}.{nonce}.{mac}")  # a later expiry, same MAC
        assert not opens(f"{expires}.{nonce}x.{mac}")
        assert not opens(f"{expires}.{nonce}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}")
        assert not opens(f"{expires}.{nonce}")
        assert not opens("forged")
        assert not opens("")
        assert not opens(f"{expires}.{nonce}.{mac}.{mac}")
        assert not opens(app.sessions.sign(TOKEN, expires=int(time.time()) - 1))  # signed right, but expired
        assert not opens(app.sessions.sign("another-token-of-some-length"))  # signed for another token
        assert opens(UiApp(config, _health).sessions.sign(TOKEN))  # a restart keeps sessions: the installation's key

        # logged out: that cookie (and a copy kept of it) is refused from then on
        session = _login(url)
        kept = session.cookies[COOKIE]
        assert opens(kept)
        answer = session.post(f"{url}/ui/logout", allow_redirects=False, timeout=10)
        assert answer.status_code == 303
        assert answer.headers["Location"] == "/ui/login"
        assert "Max-Age=0" in answer.headers["Set-Cookie"]
        assert not opens(kept)

        # a new token ends every session
        still = _login(url).cookies[COOKIE]
        assert opens(still)
        _token_file(state.root, "a-new-token-for-the-lab-0001")
        assert not opens(still)
        assert (
            requests.post(f"{url}/ui/login", data={"token": TOKEN}, allow_redirects=False, timeout=10).status_code
            == 403
        )
        _login(url, "a-new-token-for-the-lab-0001")


def test_another_process_key_is_refused(state: SpooledState, tmp_path: Path) -> None:
    """A cookie signed under another installation's digest key does not open this one's pages."""
    config = _with_ui(state.config, token_file=_token_file(state.root))
    other_state = tmp_path / "other-state"
    other_state.mkdir()
    (other_state / "digest.key").write_text("not a key\n", encoding="ascii")  # unusable: a key of the process
    other = UiApp(config.model_copy(update={"state_dir": other_state}), _health)  # no key there: a random one
    with serving(config) as (url, _app):
        answer = requests.get(
            f"{url}/ui/", cookies={COOKIE: other.sessions.sign(TOKEN)}, allow_redirects=False, timeout=10
        )
        assert answer.status_code == 303


def test_a_login_posted_from_another_site_is_refused(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    with serving(config) as (url, _app), capture_logs() as logged:
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
            answer = requests.post(
                f"{url}/ui/login", data={"token": TOKEN}, headers=headers, allow_redirects=False, timeout=10
            )
            assert answer.status_code == 403, headers
            assert "Set-Cookie" not in answer.headers
        same = requests.post(
            f"{url}/ui/login", data={"token": TOKEN}, headers={"Origin": url}, allow_redirects=False, timeout=10
        )
        assert same.status_code == 303
        assert "Secure" not in same.headers["Set-Cookie"]  # plain HTTP on loopback
        proxied = requests.post(  # the lab's reverse proxy with TLS: the browser's host forwarded
            f"{url}/ui/login",
            data={"token": TOKEN},
            headers={
                "Origin": "https://ingest.lab.example",
                "X-Forwarded-Host": "ingest.lab.example",
                "X-Forwarded-Proto": "https",
            },
            allow_redirects=False,
            timeout=10,
        )
        assert proxied.status_code == 303
        assert proxied.headers["Set-Cookie"].endswith("; Secure")
    assert [event["reason"] for event in logged if event["event"] == "ui.login_refused"] == ["cross-site"] * 3


def test_a_token_file_others_may_read_is_refused(state: SpooledState) -> None:
    token_file = _token_file(state.root, mode=0o644)
    config = _with_ui(state.config, token_file=token_file)
    with serving(config) as (url, _app), capture_logs() as logged:
        form = requests.get(f"{url}/ui/login", timeout=10)
        assert "token file cannot be used" in form.text
        answer = requests.post(f"{url}/ui/login", data={"token": TOKEN}, allow_redirects=False, timeout=10)
        assert answer.status_code == 403
        assert "Set-Cookie" not in answer.headers
    (refused,) = [event for event in logged if event["event"] == "ui.login_refused"]
    assert f"chmod 600 {token_file}" in refused["reason"]
    assert TOKEN not in json.dumps(logged, default=str)


@pytest.mark.parametrize("content", ["short", "two words-that-are-long-enough", ""])
def test_a_token_too_short_or_with_spaces_is_refused(state: SpooledState, content: str) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root, content))
    with serving(config) as (url, _app):
        answer = requests.post(f"{url}/ui/login", data={"token": content}, allow_redirects=False, timeout=10)
        assert answer.status_code == 403


def test_without_a_token_file_the_page_is_locked(state: SpooledState) -> None:
    with serving(state.config) as (url, _app):
        form = requests.get(f"{url}/ui/login", timeout=10)
        assert form.status_code == 200
        assert "ui.token_file" in form.text
        assert 'type="password"' not in form.text
        assert (
            requests.post(f"{url}/ui/login", data={"token": ""}, allow_redirects=False, timeout=10).status_code == 403
        )
        assert requests.get(f"{url}/ui/", allow_redirects=False, timeout=10).status_code == 303


def test_public_read_serves_the_pages_to_loopback_names_only(state: SpooledState) -> None:
    config = _with_ui(state.config, public_read=True)
    with serving(config) as (url, _app):
        for page in PAGES:
            answer = requests.get(f"{url}{page}", allow_redirects=False, timeout=10)
            assert answer.status_code == 200, page
            assert "Log out" not in answer.text
        port = url.rsplit(":", 1)[1]
        assert requests.get(f"{url}/ui/", headers={"Host": f"localhost:{port}"}, timeout=10).status_code == 200
        # DNS rebinding: a name of another site pointed at 127.0.0.1 gets the login, not the page
        rebound = requests.get(
            f"{url}/ui/", headers={"Host": f"evil.example:{port}"}, allow_redirects=False, timeout=10
        )
        assert rebound.status_code == 303
        assert requests.post(f"{url}/ui/studies", timeout=10).status_code == 405  # no actions in this slice


def _config_text(root: Path, host: str, ui: str) -> str:
    return f"state_dir: {root}\nmetrics: {{host: '{host}'}}\nui: {ui}\n"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "ingest.lab.example", "127.0.0.1.example"])
def test_public_read_off_loopback_is_refused_at_configuration_load(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(_config_text(tmp_path, host, "{public_read: true}"), "ingestd.yaml")
    text = str(refused.value)
    assert "ui.public_read" in text
    assert f"metrics.host is {host}" in text
    # without public_read, or with the page off, the same host is fine
    parse_config(_config_text(tmp_path, host, "{token_file: /etc/ingestd/ui.token}"), "ingestd.yaml")
    parse_config(_config_text(tmp_path, host, "{enabled: false, public_read: true}"), "ingestd.yaml")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_public_read_on_loopback_loads(tmp_path: Path, host: str) -> None:
    config = parse_config(_config_text(tmp_path, host, "{public_read: true}"), "ingestd.yaml")
    assert config.ui.public_read
    assert is_loopback(host)


def test_the_ui_section_refuses_unknown_keys_and_defaults_to_locked(tmp_path: Path) -> None:
    config = parse_config(f"state_dir: {tmp_path}\n", "ingestd.yaml")
    assert (config.ui.enabled, config.ui.public_read, config.ui.token_file) == (True, False, None)
    with pytest.raises(ConfigError, match=re.escape("ui.public_raed: unknown key")):
        parse_config(f"state_dir: {tmp_path}\nui: {{public_raed: true}}\n", "ingestd.yaml")


def test_a_failing_health_check_still_renders_the_overview(state: SpooledState) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    config = _with_ui(state.config, public_read=True)
    with serving(config, broken) as (url, _app):
        answer = requests.get(f"{url}/ui/", timeout=10)
        assert answer.status_code == 200
        assert "failing" in answer.text
        assert "health check failed" in answer.text


def test_the_style_sheet_is_served_from_the_package(state: SpooledState) -> None:
    with serving(state.config) as (url, _app):
        answer = requests.get(f"{url}/ui/static/style.css", timeout=10)
        assert answer.status_code == 200
        assert answer.headers["Content-Type"] == "text/css; charset=utf-8"
        assert "font-family" in answer.text
        assert requests.get(f"{url}/ui/static/../app.py", timeout=10).status_code == 404


def test_no_planted_patient_value_appears_in_any_page(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    with serving(config) as (url, _app):
        session = _login(url)
        queries: list[dict[str, str]] = [
            {},
            {"state": "held"},
            {"state": "routed"},
            {"state": "held", "reason": "unrouted"},
            {"source": "import"},
            {"source": "drop"},
            {"rule": "raw-drop"},
        ]
        pages = [session.get(f"{url}{page}", timeout=10) for page in PAGES]
        pages += [session.get(f"{url}/ui/studies", params=query, timeout=10) for query in queries]
        pages += [requests.get(f"{url}/ui/login", timeout=10), session.get(f"{url}/ui/nothing", timeout=10)]
        html = "\n".join(page.text for page in pages)
        assert all(page.status_code in (200, 404) for page in pages)
        assert "raw-drop" in html  # the raw rule's route is shown, with its labels as digests
        assert "sha256:" in html
    for value in _phi(state):
        assert value not in html, value
    assert "DOE" not in html


def _check_config(root: Path, ui: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    config = root / "ingestd.yaml"
    config.write_text(f"state_dir: {root / 'state'}\nlistener: {{port: 11112}}\nui: {ui}\n", encoding="utf-8")
    status = main(["check-config", str(config)])
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    return status, err.splitlines()


def test_check_config_checks_the_token_file_like_a_credentials_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "state").mkdir()
    token_file = _token_file(tmp_path)
    assert _check_config(tmp_path, f"{{token_file: {token_file}}}", capsys) == (0, [])
    token_file.chmod(0o640)
    status, errors = _check_config(tmp_path, f"{{token_file: {token_file}}}", capsys)
    assert status == 2
    assert errors == [
        f"{tmp_path / 'ingestd.yaml'}:3: ui.token_file: ui token file {token_file} is readable by others"
        f" (mode 0640): chmod 600 {token_file}"
    ]
    token_file.unlink()
    status, errors = _check_config(tmp_path, f"{{token_file: {token_file}}}", capsys)
    assert status == 2
    assert errors[0].endswith(f"ui token file {token_file} does not exist")
    assert _check_config(tmp_path, f"{{enabled: false, token_file: {token_file}}}", capsys) == (0, [])


def test_a_page_that_fails_answers_500_and_logs_only_its_name(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = _with_ui(parse_config(f"state_dir: {state_dir}\n", "ingestd.yaml"), public_read=True)
    with serving(config) as (url, _app), capture_logs() as logged:
        empty = requests.get(f"{url}/ui/studies", timeout=10)  # no journal yet (before the daemon's first start)
        assert empty.status_code == 200
        assert "0 of 0 batches." in empty.text
        (state_dir / "journal.sqlite").write_bytes(b"not a journal at all " * 100)
        for page in PAGES:
            failed = requests.get(f"{url}{page}", timeout=10)
            assert failed.status_code == 500, page
            assert "The page failed; the log says why." in failed.text
            assert "journal" not in failed.text
    failures = [event for event in logged if event["event"] == "ui.page_failed"]
    assert [event["page"] for event in failures] == ["overview", "studies", "quarantine"]
    assert {event["error"] for event in failures} == {"DatabaseError"}


def test_a_flood_of_wrong_tokens_makes_every_login_wait(state: SpooledState, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    with serving(config) as (url, app), capture_logs() as logged:
        for _ in range(MAX_WRONG_PER_MINUTE):
            assert requests.post(f"{url}/ui/login", data={"token": "guess-" * 4}, timeout=10).status_code == 403
        answer = requests.post(f"{url}/ui/login", data={"token": TOKEN}, allow_redirects=False, timeout=10)
        assert answer.status_code == 429
        assert "Set-Cookie" not in answer.headers
        monkeypatch.setattr(app.auth, "wrong", deque(at - 61 for at in app.auth.wrong))  # a minute on
        assert (
            requests.post(f"{url}/ui/login", data={"token": TOKEN}, allow_redirects=False, timeout=10).status_code
            == 303
        )
    reasons = [event["reason"] for event in logged if event["event"] == "ui.login_refused"]
    assert reasons == ["wrong token"] * MAX_WRONG_PER_MINUTE + ["too many wrong tokens in the last minute"]


def test_head_answers_headers_only(state: SpooledState) -> None:
    with serving(_with_ui(state.config, public_read=True)) as (url, _app):
        answer = requests.head(f"{url}/ui/studies", timeout=10)
        assert answer.status_code == 200
        assert int(answer.headers["Content-Length"]) > 0
        assert answer.content == b""
