"""The study page's "Show identifiers", its log events and its XNAT links, over real HTTP on a spooled state directory.

Planted patient values (the Patient ID in a route's labels, a folder named after the patient, the original UIDs)
are absent from every page a GET answers; a logged-in user's checked post of "Show identifiers" answers the same
page with them, logged as `ui.identifiers_shown` without them, and the next GET hides them again. Without a login,
from another site or with a wrong form token the post is refused as an action is. The buffer of recent events is
bounded (per batch and in batches), keeps what the log line says after the redaction, and the page lists a batch's
events newest first.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from ingestd.config import Config
from ingestd.eventbuffer import FIELDS_CHARS, VALUE_CHARS, EventBuffer
from ingestd.journal import Journal
from ingestd.logs import redact, uid_digest
from ingestd.metrics import MetricsServer
from ingestd.ui import UiApp
from ingestd.ui.actions import applicable
from ingestd.ui.session import COOKIE
from tests.spooled import KEY, PATIENT_FOLDER, PATIENT_ID, SpooledState, spooled_state
from tests.test_ui import TOKEN, _health, _login, _phi, _token_file, _with_ui
from tests.test_ui_actions import _forms

_IDENTIFY = re.compile(
    r'<form method="post" action="([^"]+/identifiers)" class="identify">\s*'
    r'<input type="hidden" name="csrf" value="([0-9a-f]+)">'
)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SpooledState:
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    return spooled_state(tmp_path)


@contextmanager
def serving(config: Config, events: EventBuffer | None = None) -> Iterator[str]:
    """A real MetricsServer on a free port of 127.0.0.1 with the page (and `events`) mounted; stopped at the end."""
    app = UiApp(config, _health, events=events)
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), _health, ui=app)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()


def _identify_form(html: str) -> tuple[str, str]:
    (found,) = _IDENTIFY.findall(html)
    return found[0], found[1]


def _original_uid(state: SpooledState, name: str) -> str:
    return str(state.studies[name][0].StudyInstanceUID)


def test_identifiers_are_shown_to_a_logged_in_user_once_and_logged_without_them(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    planted = _phi(state)
    with serving(config) as url, capture_logs() as logged:
        session = _login(url)
        shown: dict[str, str] = {}
        for name, batch_id in state.batch_ids.items():
            page = session.get(f"{url}/ui/studies/{batch_id}", timeout=10)
            assert page.status_code == 200
            for value in planted:
                assert value not in page.text, (name, value)
            action, csrf = _identify_form(page.text)
            assert action == f"/ui/studies/{batch_id}/identifiers"
            answer = session.post(f"{url}{action}", data={"csrf": csrf}, allow_redirects=False, timeout=10)
            assert answer.status_code == 200, answer.text
            assert answer.headers["Cache-Control"] == "no-store"
            assert "Identifiers shown" in answer.text and _IDENTIFY.search(answer.text) is None
            shown[name] = answer.text
            again = session.get(f"{url}/ui/studies/{batch_id}", timeout=10).text  # nothing kept
            for value in planted:
                assert value not in again, (name, value)
    for name in state.batch_ids:
        assert _original_uid(state, name) in shown[name], name
    assert f"/data/{PATIENT_FOLDER}" in shown["import"]  # the import folder's path, as --show-paths shows it
    assert PATIENT_ID in shown["drop"]  # the raw rule's labels as XNAT has them
    assert "Shown as digests" not in shown["drop"]
    audit = [event for event in logged if event["event"] == "ui.identifiers_shown"]
    assert sorted(event["batch_id"] for event in audit) == sorted(state.batch_ids.values())
    assert all(set(event) == {"event", "log_level", "client", "batch_id", "user"} for event in audit)
    text = json.dumps(logged)
    for value in planted:
        assert value not in text, value


def test_show_identifiers_is_refused_as_an_action_is(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root), public_read=True)
    batch_id = state.batch_ids["import"]
    path = f"/ui/studies/{batch_id}/identifiers"
    with serving(config) as url, capture_logs() as logged:
        public = requests.get(f"{url}/ui/studies/{batch_id}", timeout=10)
        assert public.status_code == 200 and "Show identifiers" not in public.text  # never to public_read
        session = _login(url)
        own = session.get(f"{url}/ui/studies/{batch_id}", timeout=10).text
        _action, csrf = _identify_form(own)
        retry_csrf = _forms(own)[f"/ui/studies/{batch_id}/retry"]  # another action's token
        other = _login(url)  # another session: its own tokens
        _other_action, foreign = _identify_form(other.get(f"{url}/ui/studies/{batch_id}", timeout=10).text)
        answers = [
            requests.post(f"{url}{path}", data={"csrf": csrf}, allow_redirects=False, timeout=10),  # no login
            session.post(f"{url}{path}", data={"csrf": csrf}, headers={"Origin": "http://evil.example"}, timeout=10),
            session.post(f"{url}{path}", data={"csrf": csrf}, headers={"Sec-Fetch-Site": "cross-site"}, timeout=10),
            session.post(f"{url}{path}", data={}, timeout=10),
            session.post(f"{url}{path}", data={"csrf": foreign}, timeout=10),
            session.post(f"{url}{path}", data={"csrf": retry_csrf}, timeout=10),
        ]
        assert [answer.status_code for answer in answers] == [403] * 6
        assert session.get(f"{url}{path}", timeout=10).status_code == 405  # a GET shows nothing
        html = "\n".join(answer.text for answer in answers)
    for value in _phi(state):
        assert value not in html, value
    refused = [event for event in logged if event["event"] == "ui.action_refused"]
    assert [(event["action"], event["reason"]) for event in refused] == [
        ("identifiers", "not logged in"),
        ("identifiers", "cross-site"),
        ("identifiers", "cross-site"),
        ("identifiers", "no form token"),
        ("identifiers", "wrong form token"),
        ("identifiers", "wrong form token"),
    ]
    assert not [event for event in logged if event["event"] == "ui.identifiers_shown"]


def test_resend_is_offered_on_a_delivered_study_only() -> None:
    assert applicable("delivered") == ("resend",)
    assert applicable("delivered", "files") == ()  # `ingestd resend` refuses an attachment set
    assert "resend" not in applicable("held") and "resend" not in applicable("released")


def _event(batch_id: Any, event: str = "route.held", **fields: Any) -> dict[str, Any]:
    return {"event": event, "level": "info", "timestamp": "2026-12-06T12:00:00Z", "batch_id": batch_id, **fields}


def test_the_event_buffer_is_bounded_per_batch_and_in_batches() -> None:
    buffer = EventBuffer(per_batch=5, batches=3)
    for number in range(12):
        buffer.add(_event(1, n=number))
    assert [e.fields for e in buffer.events(1)] == [f"n={n}" for n in (11, 10, 9, 8, 7)]  # the newest, newest first
    buffer.add({"event": "daemon.started", "level": "info"})  # names no batch: not kept
    buffer.add(_event(True))
    buffer.add(_event("not a batch"))
    assert len(buffer) == 5
    for batch_id in (2, 3, 4):
        buffer.add(_event(batch_id))
    assert buffer.events(1) == []  # the batch named longest ago went first
    buffer.add(_event(2))  # named again: kept over 3
    buffer.add(_event("5"))
    assert buffer.events(3) == [] and len(buffer.events(2)) == 2 and len(buffer.events(5)) == 1
    assert len(buffer) == 4
    buffer.add(_event(4, error=ValueError("boom"), reason="x" * 10_000))
    (fields,) = [e.fields for e in buffer.events(4) if e.fields]
    head = "error=ValueError('boom'), reason="
    assert fields.startswith(f"{head}xxx") and len(fields) == len(head) + VALUE_CHARS
    buffer.add(_event(4, **{f"key{n:02}": "y" * 1000 for n in range(30)}))
    assert len(buffer.events(4)[0].fields) == FIELDS_CHARS
    many = EventBuffer()
    for number in range(2_000):
        for _ in range(60):
            many.add(_event(number, reason="z" * 1000, error="e" * 1000))
    assert len(many) == many.batches * many.per_batch == 10_000  # at most 200 batches of 50 events
    assert all(len(e.fields) <= FIELDS_CHARS for n in range(2_000 - 200, 2_000) for e in many.events(n))


def test_the_page_lists_the_batch_events_newest_first_as_redacted(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    held = state.batch_ids["OTHER"]
    uid = _original_uid(state, "OTHER")
    buffer = EventBuffer()
    buffer.capture(None, "info", redact(None, "info", _event(held, "assemble.study_complete", study=uid_digest(uid))))
    planted = _event(held, "route.held", reason=f"no rule for {uid} of DOE^JOHN", patient_id=PATIENT_ID, code="x<b>")
    buffer.capture(None, "warning", redact(None, "warning", planted))
    buffer.capture(None, "info", redact(None, "info", _event(held + 100, "route.routed")))
    with serving(config, buffer) as url:
        session = _login(url)
        page = session.get(f"{url}/ui/studies/{held}", timeout=10).text
        other = session.get(f"{url}/ui/studies/{state.batch_ids['SCANNER']}", timeout=10).text
    events = page[page.index('id="events"') :]
    assert events.index("route.held") < events.index("assemble.study_complete")
    assert "route.routed" not in events and "x&lt;b&gt;" in events and uid_digest(uid) in events
    assert "None since the daemon started" in other
    for value in _phi(state):
        assert value not in page, value
    with serving(config) as url:
        assert "not served by the daemon" in _login(url).get(f"{url}/ui/studies/{held}", timeout=10).text


_CONFIGURED = """
import json, structlog
from ingestd.logs import configure_logging, event_buffer
configure_logging("info", "json")
log = structlog.get_logger("ingestd.test")
log.warning("route.held", batch_id=7, reason="no rule for 1.2.826.0.1.3680043.8.498.123456 of DOE^JOHN",
            patient_id="SYN0001")
log.debug("route.routed", batch_id=7)
log.info("daemon.started", version="x")
print(json.dumps([[e.event, e.level, e.fields] for e in event_buffer().events(7)]))
"""


def test_the_buffer_keeps_what_the_log_line_says_after_the_redaction() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CONFIGURED], capture_output=True, text=True, timeout=60, check=True, cwd=Path.cwd()
    )
    ((event, level, fields),) = json.loads(done.stdout)  # the debug line is below the level: neither logged nor kept
    logged = json.loads(done.stderr.splitlines()[0])
    assert (event, level) == ("route.held", "warning")
    assert fields == f"patient_id={logged['patient_id']}, reason={logged['reason']}"
    assert PATIENT_ID not in done.stdout and "DOE^JOHN" not in done.stdout and "123456" not in done.stdout
    assert uid_digest("1.2.826.0.1.3680043.8.498.123456") in fields


def test_xnat_links_only_where_no_label_is_shown_as_a_digest(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    journal = Journal(state.config.journal_path)
    try:
        for name in ("SCANNER", "drop"):
            batch_id = state.batch_ids[name]
            route = journal.route(batch_id)
            assert route is not None
            journal.start_delivery(batch_id, time.time())
            uri = f"/data/archive/projects/{route.project}/subjects/{route.subject}/experiments/{route.session}"
            prearchive = f"/prearchive/projects/{route.project}/20261206_120000000/{route.session}"
            with journal.transaction() as tx:
                tx.execute(
                    "UPDATE deliveries SET archive_uri = ?, prearchive_url = ? WHERE batch_id = ?",
                    (uri, prearchive, batch_id),
                )
    finally:
        journal.close()
    with serving(config) as url:
        session = _login(url)
        deidentified = session.get(f"{url}/ui/studies/{state.batch_ids['SCANNER']}", timeout=10).text
        raw = session.get(f"{url}/ui/studies/{state.batch_ids['drop']}", timeout=10).text
    assert re.search(r'<a href="http://127\.0\.0\.1:9/data/archive/projects/PROJ_A/[^"]+\?format=html"', deidentified)
    assert 'href="http://127.0.0.1:9/app/template/XDATScreen_prearchives.vm"' in deidentified
    assert "http://127.0.0.1:9" not in raw  # its labels carry the Patient ID: no link, the URI with digests
    assert "/data/archive/projects/RAW/subjects/sha256:" in raw
    for value in _phi(state):
        assert value not in raw + deidentified, value


def test_identifiers_of_an_unknown_batch_are_a_404_and_not_logged_as_shown(state: SpooledState) -> None:
    config = _with_ui(state.config, token_file=_token_file(state.root))
    app = UiApp(config, _health)
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), _health, ui=app)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        session = _login(url)
        signed = app.sessions.check(session.cookies[COOKIE], lambda _user: TOKEN)
        assert signed is not None
        path = "/ui/studies/99999/identifiers"
        with capture_logs() as logged:
            missing = session.post(f"{url}{path}", data={"csrf": app.sessions.form_token(signed, path)}, timeout=10)
    finally:
        server.stop()
    assert missing.status_code == 404
    assert [event["event"] for event in logged] == []
