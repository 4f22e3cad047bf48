"""The web page's password login (`ui.password_file`) and HTTP Basic (`ui.http_basic`), over real HTTP against a
real MetricsServer (and at the WSGI level where the peer's address matters) on a real spooled state directory.

A hash is scrypt with a salt of its own; `ingestd ui-password` writes an entry (0600, replaced by a rename, the
password never printed); a right password logs in as its user, a wrong one or an unknown user is refused (403) and
counted with the throttle; a changed password ends that user's sessions only. With Basic every /ui request needs
the header (401 with the challenge otherwise), forms carry tokens bound to the user, and Basic is refused (403,
never a 401) from another machine or through a proxy that did not say https. Nothing secret is logged.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from structlog.testing import capture_logs

from ingestd.cli import main
from ingestd.config import parse_config
from ingestd.errors import ConfigError
from ingestd.states import StudyState
from ingestd.ui import UiApp
from ingestd.ui.auth import MAX_WRONG_PER_MINUTE
from ingestd.ui.passwords import hash_password, read_passwords, verify_password, write_password
from ingestd.ui.session import COOKIE
from tests.spooled import KEY, SpooledState, spooled_state
from tests.test_ui import _health, _with_ui, serving
from tests.test_ui_actions import _journal_state

ALICE, BOB = "alice-password-0123", "bob-password-456789"
_CSRF = re.compile(
    r'<form method="post" action="([^"]+)" class="action">\s*<input type="hidden" name="csrf" value="([0-9a-f]+)">'
)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SpooledState:
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    return spooled_state(tmp_path)


def _password_file(root: Path, users: dict[str, str], mode: int = 0o600) -> Path:
    """A password file with cheap hashes (N = 2^10: the tests log in many times; the format is the same)."""
    path = root / "ui.passwords"
    path.write_text("".join(f"{user}:{hash_password(pw, n=2**10)}\n" for user, pw in users.items()), "utf-8")
    path.chmod(mode)
    return path


def _login(url: str, user: str, password: str) -> requests.Session:
    session = requests.Session()
    answer = session.post(
        f"{url}/ui/login", data={"user": user, "password": password}, allow_redirects=False, timeout=10
    )
    assert answer.status_code == 303, answer.text
    return session


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _call(app: UiApp, path: str, remote: str = "127.0.0.1", **headers: str) -> tuple[str, dict[str, str], bytes]:
    """One request straight into the WSGI application (the peer's address is the test's to choose)."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "REMOTE_ADDR": remote,
        "HTTP_HOST": "127.0.0.1:9471",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        **{f"HTTP_{name.upper()}": value for name, value in headers.items()},
    }
    answer: dict[str, Any] = {}

    def start_response(status: str, sent: list[tuple[str, str]]) -> None:
        answer.update(status=status, headers=dict(sent))

    body = b"".join(app(environ, start_response))
    return answer["status"], answer["headers"], body


# -- hashes and the command -----------------------------------------------------------------------------------


def test_a_hash_is_scrypt_with_a_salt_of_its_own() -> None:
    first, second = hash_password(ALICE), hash_password(ALICE)
    scheme, n, r, p, salt, digest = first.split("$")
    assert (scheme, n, r, p) == ("scrypt", "32768", "8", "1")
    assert len(salt) == 22 and len(digest) == 43  # 16 and 32 bytes, base64url without padding
    assert first != second  # another salt
    assert verify_password(ALICE, first) and verify_password(ALICE, second)
    assert not verify_password(ALICE + "x", first)
    assert not verify_password(ALICE, None)  # no such user: a hash is computed all the same, and refused
    with pytest.raises(ValueError, match="out of range"):
        verify_password(ALICE, first.replace("$32768$", "$33000$"))


def _config(root: Path, ui: str) -> Path:
    path = root / "ingestd.yaml"
    path.write_text(f"state_dir: {root / 'state'}\nui: {ui}\n", encoding="utf-8")
    return path


def test_the_command_writes_a_private_file_and_replaces_one_line_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    passwords = tmp_path / "ui.passwords"
    config = _config(tmp_path, f"{{password_file: {passwords}}}")

    def command(user: str, typed: str) -> tuple[int, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(typed + "\n"))  # a script's: the first line of stdin
        status = main(["ui-password", "--config", str(config), user])
        out, err = capsys.readouterr()
        return status, out + err

    status, said = command("alice", "first-password-of-alice")
    assert status == 0
    assert said.startswith(f"set the password of alice in {passwords} (mode 0600)\n")
    assert ("is new and belongs to root: chown it" in said) == (os.geteuid() == 0)
    assert passwords.stat().st_mode & 0o777 == 0o600
    passwords.write_text(passwords.read_text() + "# the lab's admins\n", encoding="utf-8")
    assert command("bob", BOB)[0] == 0
    before = passwords.read_text().splitlines()
    inode = passwords.stat().st_ino
    status, said = command("alice", ALICE)
    assert status == 0
    assert "changed the password of alice" in said and "sessions have ended" in said
    after = passwords.read_text().splitlines()
    assert after[1:] == before[1:]  # the comment and bob's line as they were
    assert after[0].startswith("alice:scrypt$32768$8$1$") and after[0] != before[0]
    assert passwords.stat().st_ino != inode  # a new file renamed over the old one: never half written
    assert passwords.stat().st_mode & 0o777 == 0o600
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "ingestd.yaml",
        "ui.passwords",
    ]  # no temporary file left
    users = read_passwords(passwords)
    assert verify_password(ALICE, users["alice"]) and verify_password(BOB, users["bob"])

    # refused, and the file unchanged: a short password, a bad name, a file others may read
    text = passwords.read_text()
    for user, typed, why in (
        ("alice", "short", "12 to 1024 characters"),
        ("al ice", ALICE, "a user name is"),
        ("carol:x", ALICE, "a user name is"),
    ):
        status, said = command(user, typed)
        assert (status, passwords.read_text()) == (1, text)
        assert why in said and typed not in said.replace("a user name", "")
    passwords.chmod(0o640)
    status, said = command("alice", "another-password-0000")
    assert status == 1 and f"chmod 600 {passwords}" in said
    passwords.chmod(0o600)
    assert passwords.read_text() == text
    for typed in ("first-password-of-alice", ALICE, BOB):
        assert typed not in text


def test_the_command_asks_twice_at_a_terminal_and_needs_a_password_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    passwords = tmp_path / "ui.passwords"
    config = _config(tmp_path, f"{{password_file: {passwords}}}")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    typed = iter([ALICE, ALICE + "x", BOB, BOB])
    asked: list[str] = []
    monkeypatch.setattr("sys.stdin", Terminal(""))

    def getpass(prompt: str) -> str:
        asked.append(prompt)
        return next(typed)

    monkeypatch.setattr("getpass.getpass", getpass)
    assert main(["ui-password", "--config", str(config), "alice"]) == 1
    assert "the two passwords differ" in capsys.readouterr().err
    assert not passwords.exists()
    assert main(["ui-password", "--config", str(config), "bob"]) == 0
    assert asked == ["New password: ", "The same again: "] * 2
    assert verify_password(BOB, read_passwords(passwords)["bob"])
    out, err = capsys.readouterr()
    assert BOB not in out + err

    assert main(["ui-password", "--config", str(_config(tmp_path, "{}")), "bob"]) == 1
    assert "names no ui.password_file" in capsys.readouterr().err


def test_a_line_that_is_not_user_and_hash_is_refused_without_showing_it(tmp_path: Path) -> None:
    passwords = _password_file(tmp_path, {"alice": ALICE})
    passwords.write_text(passwords.read_text() + f"bob:{BOB}\n", encoding="utf-8")  # a password where a hash goes
    with pytest.raises(Exception, match="line 2 is not") as refused:
        read_passwords(passwords)
    assert BOB not in str(refused.value)
    with pytest.raises(Exception, match="line 2 is not"):
        write_password(passwords, "carol", "carol-password-00")


# -- the login form -------------------------------------------------------------------------------------------


def test_a_right_password_logs_in_as_its_user_and_a_wrong_one_is_refused(state: SpooledState) -> None:
    config = _with_ui(state.config, password_file=_password_file(state.root, {"alice": ALICE, "bob": BOB}))
    with serving(config) as (url, _app), capture_logs() as logged:
        form = requests.get(f"{url}/ui/login", timeout=10).text
        assert 'name="user"' in form and 'name="password" type="password"' in form and 'name="token"' not in form
        for user, typed in (("alice", BOB), ("alice", ""), ("ALICE", ALICE), (ALICE, ALICE), ("", "")):
            answer = requests.post(
                f"{url}/ui/login", data={"user": user, "password": typed}, allow_redirects=False, timeout=10
            )
            assert answer.status_code == 403
            assert "Set-Cookie" not in answer.headers
            assert "Wrong user name or password." in answer.text
        session = _login(url, "alice", ALICE)
        assert session.cookies[COOKIE].count(".") == 3  # expires, nonce, user, mac
        assert session.get(f"{url}/ui/", allow_redirects=False, timeout=10).status_code == 200
        assert "Log out" in session.get(f"{url}/ui/studies", timeout=10).text
        assert session.post(f"{url}/ui/logout", allow_redirects=False, timeout=10).status_code == 303
    refused = [(event["reason"], event["user"]) for event in logged if event["event"] == "ui.login_refused"]
    assert refused == [("wrong password", "alice")] * 2 + [("unknown user", None)] * 3
    assert [event["user"] for event in logged if event["event"] in ("ui.login", "ui.logout")] == ["alice", "alice"]
    assert ALICE not in json.dumps(logged, default=str)  # typed as a user name: not logged either


def test_a_flood_of_wrong_passwords_makes_every_login_wait(
    state: SpooledState, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _with_ui(state.config, password_file=_password_file(state.root, {"alice": ALICE}))
    with serving(config) as (url, app), capture_logs() as logged:
        for _ in range(MAX_WRONG_PER_MINUTE):
            wrong = {"user": "alice", "password": "guess-" * 3}
            assert requests.post(f"{url}/ui/login", data=wrong, timeout=10).status_code == 403
        right = {"user": "alice", "password": ALICE}
        answer = requests.post(f"{url}/ui/login", data=right, allow_redirects=False, timeout=10)
        assert answer.status_code == 429
        assert "Set-Cookie" not in answer.headers
        monkeypatch.setattr(app.auth, "wrong", deque(at - 61 for at in app.auth.wrong))  # a minute on
        assert requests.post(f"{url}/ui/login", data=right, allow_redirects=False, timeout=10).status_code == 303
    reasons = [event["reason"] for event in logged if event["event"] == "ui.login_refused"]
    assert reasons == ["wrong password"] * MAX_WRONG_PER_MINUTE + ["too many wrong passwords in the last minute"]


def test_a_changed_password_ends_that_users_sessions_only(state: SpooledState) -> None:
    passwords = _password_file(state.root, {"alice": ALICE, "bob": BOB})
    config = _with_ui(state.config, password_file=passwords)
    with serving(config) as (url, app):
        alice, bob = _login(url, "alice", ALICE), _login(url, "bob", BOB)

        def opens(session: requests.Session) -> bool:
            return session.get(f"{url}/ui/", allow_redirects=False, timeout=10).status_code == 200

        assert opens(alice) and opens(bob)
        kept = alice.cookies[COOKIE]
        expires, nonce, _user, mac = kept.split(".")
        as_bob = base64.urlsafe_b64encode(b"bob").decode().rstrip("=")
        forged = requests.Session()
        forged.cookies.set(COOKIE, f"{expires}.{nonce}.{as_bob}.{mac}")
        assert not opens(forged)  # alice's cookie with bob's name: the MAC is alice's
        write_password(passwords, "alice", "a-new-password-for-alice")
        assert not opens(alice)
        assert opens(bob)
        assert (
            requests.post(
                f"{url}/ui/login", data={"user": "alice", "password": ALICE}, allow_redirects=False, timeout=10
            ).status_code
            == 403
        )
        assert opens(_login(url, "alice", "a-new-password-for-alice"))
        passwords.write_text(passwords.read_text().replace("bob:", "# bob:"), encoding="utf-8")  # bob removed
        assert not opens(bob)
        assert app.sessions.sign(ALICE) != ""  # a token-style cookie (no user) is refused with passwords
        token_style = requests.Session()
        token_style.cookies.set(COOKIE, app.sessions.sign("alice:x"))
        assert not opens(token_style)


def test_the_study_pages_forms_are_bound_to_the_user(state: SpooledState) -> None:
    config = _with_ui(state.config, password_file=_password_file(state.root, {"alice": ALICE, "bob": BOB}))
    held = state.batch_ids["OTHER"]
    path = f"/ui/studies/{held}/release"
    with serving(config) as (url, _app), capture_logs() as logged:
        alice, bob = _login(url, "alice", ALICE), _login(url, "bob", BOB)
        theirs = dict(_CSRF.findall(bob.get(f"{url}/ui/studies/{held}", timeout=10).text))
        answer = alice.post(f"{url}{path}", data={"csrf": theirs[path]}, allow_redirects=False, timeout=10)
        assert answer.status_code == 403
        mine = dict(_CSRF.findall(alice.get(f"{url}/ui/studies/{held}", timeout=10).text))
        answer = alice.post(f"{url}{path}", data={"csrf": mine[path]}, allow_redirects=False, timeout=10)
        assert answer.status_code == 303
    assert _journal_state(state, held) == StudyState.RELEASED
    acted = [(e["event"], e.get("reason"), e["user"]) for e in logged if e["event"].startswith("ui.action")]
    assert acted == [("ui.action_refused", "wrong form token", "alice"), ("ui.action", None, "alice")]


# -- HTTP Basic -----------------------------------------------------------------------------------------------


@pytest.fixture
def basic(state: SpooledState) -> Iterator[tuple[str, UiApp]]:
    passwords = _password_file(state.root, {"alice": ALICE, "bob": BOB})
    with serving(_with_ui(state.config, password_file=passwords, http_basic=True)) as served:
        yield served


def test_basic_asks_every_request_for_a_user_and_password(basic: tuple[str, UiApp]) -> None:
    url, _app = basic
    with capture_logs() as logged:
        for page in ("/ui/", "/ui/studies", "/ui/quarantine", "/ui/static/style.css", "/ui/login", "/ui/nothing"):
            for headers in ({}, _basic("alice", BOB), _basic("carol", ALICE), {"Authorization": "Bearer x"}):
                answer = requests.get(f"{url}{page}", headers=headers, allow_redirects=False, timeout=10)
                assert answer.status_code == 401, (page, headers)
                assert answer.headers["WWW-Authenticate"] == 'Basic realm="ingestd", charset="UTF-8"'
        malformed = requests.get(f"{url}/ui/", headers={"Authorization": "Basic %%%"}, timeout=10)
        assert malformed.status_code == 401
        right = _basic("alice", ALICE)
        for page in ("/ui/", "/ui/studies", "/ui/quarantine", "/ui/static/style.css"):
            assert requests.get(f"{url}{page}", headers=right, timeout=10).status_code == 200, page
        overview = requests.get(f"{url}/ui/", headers=right, timeout=10).text
        assert "Log out" not in overview  # a browser forgets Basic when it closes: no logout to offer
        assert 'href="/ui/login"' not in overview  # nor a login: this is one
        login = requests.get(f"{url}/ui/login", headers=right, allow_redirects=False, timeout=10)
        assert (login.status_code, login.headers["Location"]) == (303, "/ui/")
        assert requests.post(f"{url}/ui/logout", headers=right, timeout=10).status_code == 404
    reasons = [(e["reason"], e["user"]) for e in logged if e["event"] == "ui.login_refused"]
    assert reasons == [("wrong password", "alice"), ("unknown user", None), ("wrong scheme", None)] * 6 + [
        ("malformed credentials", None)
    ]
    logins = [e["user"] for e in logged if e["event"] == "ui.login"]
    assert logins == ["alice"]  # the first right request; later ones are not logged (nor hashed again)
    assert ALICE not in json.dumps(logged, default=str) and BOB not in json.dumps(logged, default=str)


def test_basic_forms_carry_a_token_bound_to_the_user_and_the_site(
    basic: tuple[str, UiApp], state: SpooledState
) -> None:
    url, _app = basic
    held = state.batch_ids["OTHER"]
    path = f"/ui/studies/{held}/release"
    alice, bob = _basic("alice", ALICE), _basic("bob", BOB)
    with capture_logs() as logged:
        mine = dict(_CSRF.findall(requests.get(f"{url}/ui/studies/{held}", headers=alice, timeout=10).text))
        theirs = dict(_CSRF.findall(requests.get(f"{url}/ui/studies/{held}", headers=bob, timeout=10).text))
        assert mine[path] != theirs[path]
        refused = [
            ({}, alice),
            ({"csrf": theirs[path]}, alice),  # another user's
            ({"csrf": mine[f"/ui/studies/{held}/retry"]}, alice),  # another action's
            ({"csrf": mine[path]}, {**alice, "Origin": "http://evil.example"}),
            ({"csrf": mine[path]}, {**alice, "Sec-Fetch-Site": "cross-site"}),
        ]
        for data, headers in refused:
            answer = requests.post(f"{url}{path}", data=data, headers=headers, allow_redirects=False, timeout=10)
            assert answer.status_code == 403, data
        assert _journal_state(state, held) == StudyState.HELD
        answer = requests.post(
            f"{url}{path}", data={"csrf": mine[path]}, headers=alice, allow_redirects=False, timeout=10
        )
        assert answer.status_code == 303
    assert _journal_state(state, held) == StudyState.RELEASED
    reasons = [e["reason"] for e in logged if e["event"] == "ui.action_refused"]
    assert reasons == ["no form token", "wrong form token", "wrong form token", "cross-site", "cross-site"]
    assert {e["user"] for e in logged if e["event"].startswith("ui.action")} == {"alice"}


def test_basic_over_plain_http_from_another_machine_is_refused_without_a_challenge(state: SpooledState) -> None:
    passwords = _password_file(state.root, {"alice": ALICE})
    app = UiApp(_with_ui(state.config, password_file=passwords, http_basic=True), _health)
    right = _basic("alice", ALICE)["Authorization"]
    with capture_logs() as logged:
        for remote, headers in (
            ("192.168.1.20", {}),  # another machine, plain HTTP: no 401, the browser must not send a password
            ("192.168.1.20", {"Authorization": right}),
            ("192.168.1.20", {"Authorization": right, "X_Forwarded_Proto": "https"}),  # said by anyone: not proof
            ("127.0.0.1", {"Authorization": right, "X_Forwarded_Proto": "http"}),  # the proxy says: plain HTTP
            ("127.0.0.1", {"Authorization": right, "X_Forwarded_For": "192.168.1.20"}),  # a proxy that says nothing
        ):
            status, sent, body = _call(app, "/ui/", remote, **headers)
            assert status == "403 Forbidden", (remote, headers)
            assert "WWW-Authenticate" not in sent
            assert b"accepted only over HTTPS" in body
            assert (b"change it" in body) == ("Authorization" in headers)
        for headers in (
            {"Authorization": right},  # a browser on this machine
            {"Authorization": right, "X_Forwarded_Proto": "https", "X_Forwarded_For": "192.168.1.20"},  # the proxy
            {"Authorization": right, "X_Forwarded_Proto": "https, http"},
        ):
            assert _call(app, "/ui/", "127.0.0.1", **headers)[0] == "200 OK", headers
        assert _call(app, "/ui/", "::1", Authorization=right)[0] == "200 OK"
        assert _call(app, "/ui/", "127.0.0.1")[0] == "401 Unauthorized"
    reasons = [e["reason"] for e in logged if e["event"] == "ui.login_refused"]
    assert reasons == ["plain http from another machine"] + ["http basic over plain http"] * 4


def test_basic_with_wrong_guesses_waits_but_lets_a_checked_password_through(state: SpooledState) -> None:
    passwords = _password_file(state.root, {"alice": ALICE, "bob": BOB})
    app = UiApp(_with_ui(state.config, password_file=passwords, http_basic=True), _health)
    assert _call(app, "/ui/", **_basic("alice", ALICE))[0] == "200 OK"
    for _ in range(MAX_WRONG_PER_MINUTE):
        assert _call(app, "/ui/", **_basic("alice", "guess-guess-guess"))[0] == "401 Unauthorized"
    assert _call(app, "/ui/", **_basic("bob", BOB))[0] == "429 Too Many Requests"  # not checked yet: waits
    assert _call(app, "/ui/", **_basic("alice", ALICE))[0] == "200 OK"  # checked before the flood
    write_password(passwords, "alice", "a-new-password-for-alice")
    assert _call(app, "/ui/", **_basic("alice", ALICE))[0] == "429 Too Many Requests"  # that password is gone


# -- configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ui", "said"),
    [
        ("{token_file: /t, password_file: /p}", "ui.password_file: ui.token_file is set too"),
        ("{http_basic: true}", "ui.http_basic: true checks the passwords of ui.password_file: set it"),
        ("{http_basic: true, token_file: /t}", "ui.http_basic: true checks the passwords of ui.password_file"),
        ("{http_basic: true, password_file: /p, public_read: true}", "ui.http_basic: true asks every request"),
    ],
)
def test_contradicting_logins_are_refused_at_load(tmp_path: Path, ui: str, said: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(f"state_dir: {tmp_path}\nui: {ui}\n", "ingestd.yaml")
    assert f"ingestd.yaml:2: {said}" in str(refused.value)  # at the line of the key


def test_public_read_rules_are_unchanged_with_passwords(tmp_path: Path) -> None:
    loaded = parse_config(f"state_dir: {tmp_path}\nui: {{password_file: /p, public_read: true}}\n", "ingestd.yaml")
    assert loaded.ui.public_read and loaded.ui.password_file == Path("/p")
    with pytest.raises(ConfigError, match=re.escape("ui.public_read")):
        parse_config(
            f"state_dir: {tmp_path}\nmetrics: {{host: 0.0.0.0}}\nui: {{password_file: /p, public_read: true}}\n",
            "ingestd.yaml",
        )
    basic = parse_config(
        f"state_dir: {tmp_path}\nmetrics: {{host: 0.0.0.0}}\nui: {{password_file: /p, http_basic: true}}\n",
        "ingestd.yaml",
    )
    assert basic.ui.http_basic


def test_check_config_checks_the_password_file_like_the_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "state").mkdir()
    passwords = _password_file(tmp_path, {"alice": ALICE})
    config = tmp_path / "ingestd.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\nlistener: {{port: 11112}}\nui: {{password_file: {passwords}}}\n", "utf-8"
    )
    assert main(["check-config", str(config)]) == 0
    passwords.chmod(0o644)
    assert main(["check-config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert f"ui.password_file: ui password file {passwords} is readable by others (mode 0644): chmod 600" in err
    assert "scrypt" not in out + err
    passwords.chmod(0o600)
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\nlistener: {{port: 11112}}\nmetrics: {{host: 0.0.0.0}}\n"
        f"ui: {{password_file: {passwords}, http_basic: true}}\n",
        "utf-8",
    )
    assert main(["check-config", str(config)]) == 0
    err = capsys.readouterr().err
    assert "ui.http_basic: metrics.host is 0.0.0.0, but HTTP Basic is refused from other machines" in err
