"""The study page and its actions, over real HTTP against a real MetricsServer on a real spooled state directory.

The study page shows what `ingestd status --json` knows of one batch and no planted patient value; an unknown id
is a 404. Retry, retry now, release and unrelease are forms for a logged-in user only, each with a CSRF token bound
to the session and the action's path: logged out, cross-site, without or with a wrong token (another action's,
another session's) a post is refused (403, `ui.action_refused` without values) and the journal is unchanged; a GET
on an action does nothing. A right post does what the command does (the same journal states as `ingestd release`,
`unrelease` and `retry` reach) and redirects to the study page, which shows what the command printed.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests
from structlog.testing import capture_logs

from ingestd.cli import main
from ingestd.journal import Journal
from ingestd.states import StudyState
from tests.spooled import KEY, PATIENT_ID, SpooledState, spooled_state
from tests.test_ui import TOKEN, _login, _phi, _token_file, _with_ui, serving

NOTE = "<script>alert('x')</script>"


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SpooledState:
    """The four spooled batches (OTHER held `unrouted`), the held one with a note holding markup."""
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    spooled = spooled_state(tmp_path)
    journal = Journal(spooled.config.journal_path)
    try:
        with journal.transaction() as tx:
            tx.execute("UPDATE batches SET note = ? WHERE id = ?", (NOTE, spooled.batch_ids["OTHER"]))
    finally:
        journal.close()
    return spooled


_CSRF = re.compile(
    r'<form method="post" action="([^"]+)" class="action">\s*<input type="hidden" name="csrf" value="([0-9a-f]+)">'
)


def _forms(html: str) -> dict[str, str]:
    """The action forms of a study page: action path -> CSRF token."""
    return dict(_CSRF.findall(html))


def _journal_state(spooled: SpooledState, batch_id: int) -> str:
    journal = Journal(spooled.config.journal_path)
    try:
        return str(journal.batch_state(batch_id))
    finally:
        journal.close()


def _all_states(spooled: SpooledState) -> list[tuple[int, str, str | None]]:
    journal = Journal(spooled.config.journal_path)
    try:
        return sorted((batch.id, batch.state, batch.hold_code) for batch in journal.batches())
    finally:
        journal.close()


def test_the_study_page_shows_one_batch_without_phi(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    held, raw = state.batch_ids["OTHER"], state.batch_ids["drop"]
    with serving(config) as (url, _app):
        session = _login(url)
        listing = session.get(f"{url}/ui/studies", timeout=10).text
        pages = {}
        for name, batch_id in state.batch_ids.items():
            assert f'<a href="/ui/studies/{batch_id}">{batch_id}</a>' in listing
            page = session.get(f"{url}/ui/studies/{batch_id}", timeout=10)
            assert page.status_code == 200, name
            assert f"<title>Batch {batch_id} · ingestd</title>" in page.text
            pages[name] = page.text
        missing = session.get(f"{url}/ui/studies/99999", timeout=10)
        assert missing.status_code == 404
        assert session.get(f"{url}/ui/studies/abc", timeout=10).status_code == 404
        assert session.get(f"{url}/ui/studies/{held}/nothing", timeout=10).status_code == 404
    other = pages["OTHER"]
    assert "unrouted" in other and "What to do" in other and "no rule matches" in other and "CT" in other
    assert NOTE not in other and "&lt;script&gt;" in other  # escaped
    assert set(_forms(other)) == {f"/ui/studies/{held}/{action}" for action in ("retry", "retry-now", "release")}
    routed = pages["drop"]
    assert "raw-drop" in routed and "sha256:" in routed  # its labels carry the Patient ID: shown as digests
    assert _forms(routed) == {}  # routed: nothing to do by hand
    assert raw != held
    html = "\n".join(pages.values()) + missing.text
    for value in _phi(state):
        assert value not in html, value
    assert "DOE" not in html


def test_logged_out_the_page_has_no_buttons_and_a_post_is_refused(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root), public_read=True)
    held = state.batch_ids["OTHER"]
    with serving(config) as (url, _app), capture_logs() as logged:
        page = requests.get(f"{url}/ui/studies/{held}", timeout=10)
        assert page.status_code == 200
        assert _forms(page.text) == {}
        # a logged-in user's token does not help a request without the session
        session = _login(url)
        forms = _forms(session.get(f"{url}/ui/studies/{held}", timeout=10).text)
        path = f"/ui/studies/{held}/release"
        answer = requests.post(f"{url}{path}", data={"csrf": forms[path]}, allow_redirects=False, timeout=10)
        assert answer.status_code == 403
    assert _journal_state(state, held) == StudyState.HELD
    refused = [event for event in logged if event["event"] == "ui.action_refused"]
    assert [(event["reason"], event["action"], event["batch_id"]) for event in refused] == [
        ("not logged in", "release", held)
    ]


def test_a_missing_wrong_or_foreign_csrf_token_is_refused(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    held = state.batch_ids["OTHER"]
    path = f"/ui/studies/{held}/release"
    with serving(config) as (url, _app), capture_logs() as logged:
        session, other = _login(url), _login(url)
        forms = _forms(session.get(f"{url}/ui/studies/{held}", timeout=10).text)
        theirs = _forms(other.get(f"{url}/ui/studies/{held}", timeout=10).text)
        retry_token = forms[f"/ui/studies/{held}/retry"]
        wrong = [
            {},
            {"csrf": ""},
            {"csrf": "0" * 64},
            {"csrf": retry_token},  # another action's
            {"csrf": theirs[path]},  # another session's
            {"csrf": forms[path][:-1]},
            {"csrf": "é" * 10},
        ]
        for data in wrong:
            answer = session.post(f"{url}{path}", data=data, allow_redirects=False, timeout=10)
            assert answer.status_code == 403, data
        # the right token, from another site's page: refused too
        for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}):
            answer = session.post(
                f"{url}{path}", data={"csrf": forms[path]}, headers=headers, allow_redirects=False, timeout=10
            )
            assert answer.status_code == 403, headers
        assert _journal_state(state, held) == StudyState.HELD
        # logged out: the session's tokens are worthless
        right = session.cookies.copy()
        session.post(f"{url}/ui/logout", timeout=10)
        answer = requests.post(
            f"{url}{path}", data={"csrf": forms[path]}, cookies=right, allow_redirects=False, timeout=10
        )
        assert answer.status_code == 403
    assert _journal_state(state, held) == StudyState.HELD
    refused = [event for event in logged if event["event"] == "ui.action_refused"]
    assert len(refused) == len(wrong) + 4
    assert {event["reason"] for event in refused} == {
        "no form token",
        "wrong form token",
        "cross-site",
        "not logged in",
    }
    text = json.dumps(logged, default=str)
    assert forms[path] not in text and TOKEN not in text
    assert not [event for event in logged if event["event"] == "ui.action"]


def test_a_get_on_an_action_does_nothing(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    held = state.batch_ids["OTHER"]
    before = _all_states(state)
    with serving(config) as (url, _app), capture_logs() as logged:
        session = _login(url)
        forms = _forms(session.get(f"{url}/ui/studies/{held}", timeout=10).text)
        for path, token in forms.items():
            for method in ("GET", "HEAD", "PUT", "DELETE"):
                answer = session.request(
                    method, f"{url}{path}", params={"csrf": token}, allow_redirects=False, timeout=10
                )
                assert answer.status_code == 405, (method, path)
    assert _all_states(state) == before
    assert not [event for event in logged if event["event"] in ("ui.action", "ui.action_refused")]


def _act(session: requests.Session, url: str, batch_id: int, action: str) -> str:
    """Post the study page's form for `action`; the study page it redirects to."""
    forms = _forms(session.get(f"{url}/ui/studies/{batch_id}", timeout=10).text)
    path = f"/ui/studies/{batch_id}/{action}"
    assert path in forms, (action, sorted(forms))
    answer = session.post(f"{url}{path}", data={"csrf": forms[path]}, allow_redirects=False, timeout=30)
    assert answer.status_code == 303, answer.text
    assert answer.headers["Location"] == f"/ui/studies/{batch_id}"
    page = session.get(f"{url}{answer.headers['Location']}", timeout=10)
    assert page.status_code == 200
    return page.text


def test_release_then_unrelease_as_the_commands_do(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    held = state.batch_ids["OTHER"]
    with serving(config) as (url, _app), capture_logs() as logged:
        session = _login(url)
        page = _act(session, url, held, "release")
        assert _journal_state(state, held) == StudyState.RELEASED
        assert f"batch {held}: released" in page
        assert set(_forms(page)) == {f"/ui/studies/{held}/unrelease"}  # released: only unrelease applies
        page = _act(session, url, held, "unrelease")
        assert _journal_state(state, held) == StudyState.HELD
        assert f"batch {held}: held again" in page and f"ingestd retry {held}" in page
        assert len(_forms(page)) == 3
    done = [(event["action"], event["batch_id"]) for event in logged if event["event"] == "ui.action"]
    assert done == [("release", held), ("unrelease", held)]


@pytest.mark.parametrize("action", ["retry", "retry-now"])
def test_retry_moves_the_batch_as_ingestd_retry_does(
    state: SpooledState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    # the same four batches in a second state directory, retried by the command
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    (tmp_path / "twin").mkdir()
    twin = spooled_state(tmp_path / "twin")
    twin_held = twin.batch_ids["OTHER"]
    command = ["retry", "--config", str(twin.config_file), str(twin_held)]
    assert main([*command[:1], *(["--now"] if action == "retry-now" else []), *command[1:]]) == 0
    expected = _journal_state(twin, twin_held)

    config = _with_ui(state.config, token_file=_token_file(state.root))
    held = state.batch_ids["OTHER"]
    others = [row for row in _all_states(state) if row[0] != held]
    with serving(config) as (url, _app):
        session = _login(url)
        page = _act(session, url, held, action)
    assert _journal_state(state, held) == expected
    assert expected != StudyState.HELD
    assert f"batch {held} (" in page and "re-routed with rule set" in page
    assert "no daemon runs" in page
    assert [row for row in _all_states(state) if row[0] != held] == others  # nothing else moved
    for value in _phi(state):
        assert value not in page, value


def test_an_action_still_running_says_so_and_its_outcome_shows_when_it_ends(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    held = state.batch_ids["OTHER"]
    with serving(config) as (url, app):
        app.actions.wait_seconds = 0  # the request does not wait: as a retry waiting for the daemon's reload
        session = _login(url)
        page = _act(session, url, held, "release")
        deadline = time.monotonic() + 10
        while "under way" in page and time.monotonic() < deadline:
            time.sleep(0.05)
            page = session.get(f"{url}/ui/studies/{held}", timeout=10).text
        assert f"batch {held}: released" in page
    assert _journal_state(state, held) == StudyState.RELEASED


def test_one_action_at_a_time(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    held = state.batch_ids["OTHER"]
    with serving(config) as (url, app):
        session = _login(url)
        assert app.actions._busy.acquire(blocking=False)
        try:
            page = _act(session, url, held, "release")
        finally:
            app.actions._busy.release()
        assert "another action is under way" in page
        assert _journal_state(state, held) == StudyState.HELD
        page = _act(session, url, held, "release")
        assert f"batch {held}: released" in page


def test_what_the_command_prints_shows_identifying_labels_as_digests(state: SpooledState) -> None:
    """The raw rule's labels carry the Patient ID; a reason quoting its session label is shown with a digest, as the
    list shows it, in the outcome of unrelease (which prints the reason) as on the page."""
    raw = state.batch_ids["drop"]
    journal = Journal(state.config.journal_path)
    try:
        route = journal.route(raw)
        assert route is not None and PATIENT_ID in route.label("session")
        reason = f"label-taken: the session label {route.label('session')} is taken in project RAW"
        assert journal.hold_batch(raw, "label-taken", reason, time.time(), from_state=StudyState.ROUTED)
    finally:
        journal.close()
    config = _with_ui(state.config, token_file=_token_file(state.root))
    with serving(config) as (url, _app):
        session = _login(url)
        released = _act(session, url, raw, "release")
        page = _act(session, url, raw, "unrelease")
    assert _journal_state(state, raw) == StudyState.HELD
    assert f"batch {raw}: held again (label-taken: the session label sha256:" in page
    for value in _phi(state):
        assert value not in released + page, value
