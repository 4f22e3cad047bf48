"""The XNAT client against the stand-in: login, cookie reuse, re-login, error classification, credentials."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestd.config import Credentials, XnatServer
from ingestd.testing.xnat import FakeXnat
from ingestd.xnat import XnatClient, XnatError, XnatLoginError, load_credentials


@pytest.fixture
def xnat() -> Iterator[FakeXnat]:
    with FakeXnat() as server:
        server.add_user("ingestd", "pw-123456")
        server.add_project("PROJ", members=["ingestd"])
        yield server


def _client(xnat: FakeXnat, tmp_path: Path, secret: str = "ingestd:pw-123456") -> XnatClient:
    path = tmp_path / "xnat.credentials"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    server = XnatServer(url=xnat.url, credentials=Credentials(file=path), read_timeout_seconds=5)
    return XnatClient("main", server)


def test_logs_in_once_and_reuses_the_cookie(xnat: FakeXnat, tmp_path: Path) -> None:
    client = _client(xnat, tmp_path)
    client.check_project("PROJ")
    client.prearchive("PROJ")
    client.close()
    basic = [
        path for method, path, status in xnat.requests_log if path.startswith("/data/JSESSION") and method == "GET"
    ]
    assert len(basic) == 1
    assert ("DELETE", "/data/JSESSION", 200) in xnat.requests_log


def test_expired_session_is_renewed_once(xnat: FakeXnat, tmp_path: Path) -> None:
    client = _client(xnat, tmp_path)
    client.check_project("PROJ")
    xnat.expire_sessions()
    client.prearchive("PROJ")  # 401, log in again, repeat
    logins = [p for m, p, _ in xnat.requests_log if m == "GET" and p.startswith("/data/JSESSION")]
    assert len(logins) == 2


def test_wrong_password_is_a_login_refusal_and_never_shown(xnat: FakeXnat, tmp_path: Path) -> None:
    client = _client(xnat, tmp_path, "ingestd:not-the-password")
    with pytest.raises(XnatLoginError) as caught:
        client.check_project("PROJ")
    assert not caught.value.retryable and "refused the login" in str(caught.value)
    assert caught.value.code == "xnat-login-refused"
    assert "not-the-password" not in str(caught.value) and "not-the-password" not in repr(client.__dict__)


def test_html_with_200_is_an_error(xnat: FakeXnat, tmp_path: Path) -> None:
    client = _client(xnat, tmp_path)
    xnat.html_error_with_200_next("GET", "/data/prearchive/projects/PROJ", message="Something broke")
    with pytest.raises(XnatError) as caught:
        client.prearchive("PROJ")
    assert not caught.value.retryable and "Something broke" in str(caught.value)


@pytest.mark.parametrize(("status", "retryable"), [(503, True), (502, True), (429, True), (400, False), (403, False)])
def test_failures_are_classified_where_they_are_born(
    xnat: FakeXnat, tmp_path: Path, status: int, retryable: bool
) -> None:
    client = _client(xnat, tmp_path)
    client.check_project("PROJ")
    # A 403 is asked again once after a new login (a site open to guests answers an expired session so)
    xnat.fail_next("GET", "/data/prearchive/projects/PROJ", status=status, body="the message", times=2)
    with pytest.raises(XnatError) as caught:
        client.prearchive("PROJ")
    assert caught.value.retryable is retryable and caught.value.status == status
    assert "the message" in str(caught.value)


def test_unreachable_server_is_retryable(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_text("u:p")
    path.chmod(0o600)
    server = XnatServer(url="http://127.0.0.1:9", credentials=Credentials(file=path), connect_timeout_seconds=1)
    with pytest.raises(XnatError) as caught:
        XnatClient("main", server).check_project("PROJ")
    assert caught.value.retryable and "unreachable" in str(caught.value)


def test_netrc_readable_by_others_is_refused(tmp_path: Path) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine xnat.example.org login ingestd password pw-123456\n")
    netrc.chmod(0o644)
    with pytest.raises(XnatError) as caught:
        load_credentials(Credentials(netrc=netrc), "https://xnat.example.org")
    assert f"chmod 600 {netrc}" in str(caught.value)
    netrc.chmod(0o600)
    secret = load_credentials(Credentials(netrc=netrc), "https://xnat.example.org")
    assert secret.username == "ingestd" and "pw-123456" not in repr(secret)


def test_credentials_from_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c"
    path.write_text("not a pair")
    path.chmod(0o600)
    with pytest.raises(XnatError, match="username:password"):
        load_credentials(Credentials(file=path), "https://x")
    monkeypatch.setenv("XU", "alias-uuid")
    monkeypatch.delenv("XP", raising=False)
    with pytest.raises(XnatError, match="XU and XP must be set"):
        load_credentials(Credentials(env_username="XU", env_password="XP"), "https://x")
    monkeypatch.setenv("XP", "token-secret")
    assert load_credentials(Credentials(env_username="XU", env_password="XP"), "https://x").username == "alias-uuid"
    assert os.environ["XP"] not in repr(load_credentials(Credentials(env_username="XU", env_password="XP"), "x"))


def test_alias_token_logs_in(xnat: FakeXnat, tmp_path: Path) -> None:
    alias, secret = xnat.issue_token("ingestd")
    client = _client(xnat, tmp_path, f"{alias}:{secret}")
    client.check_project("PROJ")
