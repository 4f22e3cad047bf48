"""The stand-in's authentication and version behaviour, version by version, as xnat-web's source has it."""

from __future__ import annotations

import time

import pytest
import requests

from ingestd.testing.xnat import FakeXnat
from tests.fake_xnat.conftest import Factory

TIMEOUT = 10
EDIT = {"format": "json", "permissions": "edit"}


def ids(response: requests.Response) -> list[str]:
    return [row["id"] for row in response.json()["ResultSet"]["Result"]]


# -- 1. projects?permissions= ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.8.9", "1.8.10", "1.8.11"])
def test_permissions_without_data_type_is_a_bare_500_from_1_8_9(make_xnat: Factory, version: str) -> None:
    xnat = make_xnat(version=version)
    bare = requests.get(f"{xnat.url}/data/projects", params=EDIT, auth=("alice", "alice-pw"), timeout=TIMEOUT)
    assert bare.status_code == 500
    assert "<h3>The server encountered an unexpected condition" in bare.text
    unknown = requests.get(
        f"{xnat.url}/data/projects",
        params={**EDIT, "dataType": "xnat:nope"},
        auth=("alice", "alice-pw"),
        timeout=TIMEOUT,
    )
    assert unknown.status_code == 500
    for data_type in ("xnat:subjectData", "xnat:mrSessionData"):
        ok = requests.get(
            f"{xnat.url}/data/projects",
            params={**EDIT, "dataType": data_type},
            auth=("alice", "alice-pw"),
            timeout=TIMEOUT,
        )
        assert ok.status_code == 200
        assert ok.json()["ResultSet"]["Result"] == [{"id": "PROJ", "secondary_id": "PROJ"}]


def test_permissions_on_1_8_8_work_without_data_type(make_xnat: Factory) -> None:
    xnat = make_xnat(version="1.8.8")
    for user in ("alice", "carol"):
        response = requests.get(f"{xnat.url}/data/projects", params=EDIT, auth=(user, f"{user}-pw"), timeout=TIMEOUT)
        assert response.status_code == 200
        assert ids(response) == (["PROJ"] if user == "alice" else [])
    admin = requests.get(
        f"{xnat.url}/data/projects", params={**EDIT, "dataType": "xnat:subjectData"}, auth=("admin", "admin-pw"),
        timeout=TIMEOUT,
    )  # fmt: skip
    assert ids(admin) == ["OTHER", "PROJ"]
    read = requests.get(
        f"{xnat.url}/data/projects",
        params={"format": "json", "permissions": "read", "dataType": "xnat:subjectData"},
        auth=("carol", "carol-pw"),
        timeout=TIMEOUT,
    )
    assert ids(read) == ["PROJ"]
    bad = requests.get(
        f"{xnat.url}/data/projects", params={"permissions": "bogus"}, auth=("alice", "alice-pw"), timeout=TIMEOUT
    )
    assert bad.status_code == 500


# -- 2. alias tokens --------------------------------------------------------------------------------------------


def test_tokens_expire_and_the_token_endpoints_answer_as_xnat(make_xnat: Factory) -> None:
    xnat = make_xnat(token_lifetime_seconds=0.5)
    before = time.time()
    token = requests.get(f"{xnat.url}/data/services/tokens/issue", auth=("alice", "alice-pw"), timeout=TIMEOUT).json()
    assert token["xdatUserId"] == "alice" and token["singleUse"] is False and token["expired"] is False
    assert 400 <= token["estimatedExpirationTime"] - before * 1000 <= 1500
    alias, secret = token["alias"], token["secret"]
    auth = ("alice", "alice-pw")
    valid = requests.get(f"{xnat.url}/data/services/tokens/validate/{alias}/{secret}", auth=auth, timeout=TIMEOUT)
    assert valid.json() == {"valid": "alice"}
    wrong = requests.get(f"{xnat.url}/data/services/tokens/validate/{alias}/nope", auth=auth, timeout=TIMEOUT)
    assert wrong.json() == {"valid": None}
    others = requests.get(
        f"{xnat.url}/data/services/tokens/validate/{alias}/{secret}", auth=("bob", "bob-pw"), timeout=TIMEOUT
    )
    assert others.status_code == 403
    # a token login may issue tokens itself (AliasTokenRestlet does not ask how the user logged in)
    chained = requests.get(f"{xnat.url}/data/services/tokens/issue", auth=(alias, secret), timeout=TIMEOUT)
    assert chained.status_code == 200 and chained.json()["xdatUserId"] == "alice"
    time.sleep(0.6)
    assert requests.get(f"{xnat.url}/data/auth", auth=(alias, secret), timeout=TIMEOUT).status_code == 401
    gone = requests.get(f"{xnat.url}/data/services/tokens/validate/{alias}/{secret}", auth=auth, timeout=TIMEOUT)
    assert gone.status_code == 404
    assert f"Can't find an alias token with the alias {alias}" in gone.text


def test_expire_tokens_and_issuing_for_others(xnat: FakeXnat) -> None:
    alias, secret = xnat.issue_token("bob")
    other_alias, other_secret = xnat.issue_token("alice")
    assert xnat.expire_tokens("bob") == 1
    assert requests.get(f"{xnat.url}/data/auth", auth=(alias, secret), timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{xnat.url}/data/auth", auth=(other_alias, other_secret), timeout=TIMEOUT).status_code == 200
    assert xnat.expire_tokens() == 1
    forbidden = requests.get(
        f"{xnat.url}/data/services/tokens/issue/user/bob", auth=("alice", "alice-pw"), timeout=TIMEOUT
    )
    assert forbidden.status_code == 403
    assert "Non-admin users can only request operations on alias tokens for their own account" in forbidden.text
    own = requests.get(f"{xnat.url}/data/services/tokens/issue/user/alice", auth=("alice", "alice-pw"), timeout=TIMEOUT)
    assert own.status_code == 200
    unknown = requests.get(
        f"{xnat.url}/data/services/tokens/issue/user/nobody", auth=("admin", "admin-pw"), timeout=TIMEOUT
    )
    assert unknown.status_code == 400
    invalidate = requests.get(
        f"{xnat.url}/data/services/tokens/invalidate/{own.json()['alias']}", auth=("alice", "alice-pw"), timeout=TIMEOUT
    )
    assert invalidate.json() == {"result": "OK"}
    # /data/services/auth takes a token too (retrieveAuthMethod: unknown UUID-shaped name -> token provider)
    alias, secret = xnat.issue_token("bob")
    login = requests.post(
        f"{xnat.url}/data/services/auth", data={"username": alias, "password": secret}, timeout=TIMEOUT
    )
    assert login.status_code == 200


# -- 3. lockout ---------------------------------------------------------------------------------------------------


def test_lockout_after_max_failed_logins(make_xnat: Factory) -> None:
    xnat = make_xnat(max_failed_logins=3, lockout_seconds=0.5)
    url = f"{xnat.url}/data/JSESSION"
    assert requests.get(url, auth=("bob", "wrong"), timeout=TIMEOUT).status_code == 401
    assert xnat.failed_logins("bob") == 1
    assert requests.get(url, auth=("bob", "bob-pw"), timeout=TIMEOUT).status_code == 200
    assert xnat.failed_logins("bob") == 0  # a success clears the count
    form = f"{xnat.url}/data/services/auth"
    assert requests.post(form, data={"username": "bob", "password": "x"}, timeout=TIMEOUT).status_code == 401
    bad = requests.get(url, auth=("bob", "wrong"), timeout=TIMEOUT)
    assert "After 3 failed login attempts, your user account will be locked" in bad.text
    assert "WWW-Authenticate" not in bad.headers
    assert requests.get(f"{xnat.url}/", auth=("bob", "wrong"), timeout=TIMEOUT).status_code == 401
    assert xnat.failed_logins("bob") == 3 and xnat.is_locked("bob")
    locked = requests.get(url, auth=("bob", "bob-pw"), timeout=TIMEOUT)
    assert locked.status_code == 401
    assert requests.post(form, data={"username": "bob", "password": "bob-pw"}, timeout=TIMEOUT).status_code == 401
    assert xnat.failed_logins("bob") == 5  # still counting while locked
    alias, secret = xnat.issue_token("bob")
    assert requests.get(f"{xnat.url}/data/auth", auth=(alias, secret), timeout=TIMEOUT).status_code == 401
    time.sleep(0.6)
    assert not xnat.is_locked("bob")
    assert requests.get(url, auth=("bob", "bob-pw"), timeout=TIMEOUT).status_code == 200


def test_a_live_session_of_the_same_user_skips_the_basic_check(xnat: FakeXnat) -> None:
    with requests.Session() as session:
        assert session.get(f"{xnat.url}/data/JSESSION", auth=("alice", "alice-pw"), timeout=TIMEOUT).ok
        same = session.get(f"{xnat.url}/data/auth", auth=("alice", "wrong"), timeout=TIMEOUT)
        assert same.text == "User 'alice' is logged in"
        assert session.get(f"{xnat.url}/data/auth", auth=("bob", "wrong"), timeout=TIMEOUT).status_code == 401
    assert xnat.failed_logins("alice") == 0 and xnat.failed_logins("bob") == 1


# -- 4. expired passwords, disabled / unverified accounts ------------------------------------------------------------


def test_expired_password_answers_302_to_the_change_password_page(xnat: FakeXnat) -> None:
    with requests.Session() as early:
        assert early.get(f"{xnat.url}/data/JSESSION", auth=("alice", "alice-pw"), timeout=TIMEOUT).ok
        early.auth = None
        xnat.expire_password("alice")
        # the session was found not expired once: the filter never checks it again
        assert early.get(f"{xnat.url}/data/projects", timeout=TIMEOUT).status_code == 200
    for path in ("/data/JSESSION", "/data/projects", "/xapi/siteConfig/buildInfo/version"):
        response = requests.get(f"{xnat.url}{path}", auth=("alice", "alice-pw"), allow_redirects=False, timeout=TIMEOUT)
        assert response.status_code == 302
        assert response.headers["Location"] == f"{xnat.url}/app/template/XDATScreen_UpdateUser.vm"
    with requests.Session() as session:
        login = session.post(
            f"{xnat.url}/data/services/auth", data={"username": "alice", "password": "alice-pw"}, timeout=TIMEOUT
        )
        assert login.status_code == 200
        follow = session.get(f"{xnat.url}/data/projects", allow_redirects=False, timeout=TIMEOUT)
        assert follow.status_code == 302
    xnat.set_password("alice", "new-pw")
    assert requests.get(f"{xnat.url}/data/projects", auth=("alice", "new-pw"), timeout=TIMEOUT).status_code == 200


def test_password_expiration_interval(make_xnat: Factory) -> None:
    xnat = make_xnat(password_expiration_seconds=0.3)
    assert requests.get(f"{xnat.url}/data/auth", auth=("bob", "bob-pw"), timeout=TIMEOUT).status_code == 200
    time.sleep(0.4)
    late = requests.get(f"{xnat.url}/data/auth", auth=("bob", "bob-pw"), allow_redirects=False, timeout=TIMEOUT)
    assert late.status_code == 302


def test_disabled_inactive_and_unverified_accounts(xnat: FakeXnat) -> None:
    alias, secret = xnat.issue_token("bob")
    xnat.disable_user("bob")
    assert requests.get(f"{xnat.url}/data/auth", auth=("bob", "bob-pw"), timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{xnat.url}/data/auth", auth=(alias, secret), timeout=TIMEOUT).status_code == 401
    assert xnat.failed_logins("bob") == 1
    xnat.disable_user("bob", inactivity=True)
    inactive = requests.get(f"{xnat.url}/data/auth", auth=("bob", "bob-pw"), allow_redirects=False, timeout=TIMEOUT)
    assert inactive.status_code == 302
    assert inactive.headers["Location"] == f"{xnat.url}/app/template/InactiveAccount.vm"
    assert requests.get(f"{xnat.url}/data/auth", auth=(alias, secret), timeout=TIMEOUT).status_code == 401
    xnat.enable_user("bob")
    xnat.unverify_user("bob")
    assert requests.get(f"{xnat.url}/data/auth", auth=("bob", "bob-pw"), timeout=TIMEOUT).status_code == 401
    xnat.enable_user("bob")
    assert requests.get(f"{xnat.url}/data/auth", auth=("bob", "bob-pw"), timeout=TIMEOUT).status_code == 200


# -- 5. guest mode ------------------------------------------------------------------------------------------------


def test_sites_without_required_login_serve_guests(make_xnat: Factory) -> None:
    xnat = make_xnat(require_login=False)
    with requests.Session() as guest:
        jsession = guest.get(f"{xnat.url}/data/JSESSION", timeout=TIMEOUT)
        assert jsession.status_code == 200 and len(jsession.text) == 32
        assert guest.get(f"{xnat.url}/data/auth", timeout=TIMEOUT).text == "User 'guest' is logged in"
        listing = guest.get(f"{xnat.url}/data/projects", params={"format": "json"}, timeout=TIMEOUT)
        assert listing.status_code == 200 and listing.json()["ResultSet"]["Result"] == []
        assert guest.get(f"{xnat.url}/data/projects/PROJ", timeout=TIMEOUT).status_code == 403
        assert guest.get(f"{xnat.url}/data/prearchive/projects/PROJ", timeout=TIMEOUT).status_code == 403
        assert guest.get(f"{xnat.url}/data/services/tokens/issue", timeout=TIMEOUT).status_code == 403
    dead = requests.get(
        f"{xnat.url}/data/projects/PROJ", cookies={"JSESSIONID": "0" * 32}, allow_redirects=False, timeout=TIMEOUT
    )
    assert dead.status_code == 403
    assert requests.get(f"{xnat.url}/data/projects", auth=("alice", "wrong"), timeout=TIMEOUT).status_code == 401
    alice = requests.get(f"{xnat.url}/data/projects/PROJ", auth=("alice", "alice-pw"), timeout=TIMEOUT)
    assert alice.status_code == 200


# -- 6. context path ------------------------------------------------------------------------------------------------


def test_context_path(make_xnat: Factory) -> None:
    xnat = make_xnat(context_path="/xnat")
    assert xnat.url.endswith("/xnat")
    root = xnat.url[: -len("/xnat")]
    assert requests.get(f"{root}/data/JSESSION", auth=("alice", "alice-pw"), timeout=TIMEOUT).status_code == 404
    with requests.Session() as session:
        response = session.get(f"{xnat.url}/data/JSESSION", auth=("alice", "alice-pw"), timeout=TIMEOUT)
        assert response.status_code == 200
        assert "Path=/xnat;" in response.headers["Set-Cookie"]
        listing = session.get(f"{xnat.url}/data/projects", params={"format": "json"}, timeout=TIMEOUT).json()
        # URIs in bodies stay /data-relative (SecureResource.wrapPartialDataURI never adds the context path)
        assert listing["ResultSet"]["Result"][0]["URI"] == "/data/projects/PROJ"
    home = requests.get(f"{xnat.url}/", allow_redirects=False, timeout=TIMEOUT)
    assert home.headers["Location"] == "/xnat/app/template/Login.vm"
    xnat.expire_password("bob")
    expired = requests.get(f"{xnat.url}/data/auth", auth=("bob", "bob-pw"), allow_redirects=False, timeout=TIMEOUT)
    assert expired.headers["Location"] == f"{xnat.url}/app/template/XDATScreen_UpdateUser.vm"
    assert ("GET", "/xnat/data/JSESSION", 200) in xnat.requests_log


# -- 7. version ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.8.8", "1.8.9", "1.8.10"])
def test_version_comes_from_build_info(make_xnat: Factory, version: str) -> None:
    xnat = make_xnat(version=version)
    assert requests.get(f"{xnat.url}/xapi/siteConfig/buildInfo", timeout=TIMEOUT).json()["version"] == version
    prop = requests.get(f"{xnat.url}/xapi/siteConfig/buildInfo/version", auth=("bob", "bob-pw"), timeout=TIMEOUT)
    assert prop.text == version
    assert requests.get(f"{xnat.url}/data/version", auth=("bob", "bob-pw"), timeout=TIMEOUT).status_code == 404


# -- 8. login endpoints ------------------------------------------------------------------------------------------


def test_jsession_login_and_logout(xnat: FakeXnat) -> None:
    with requests.Session() as session:
        login = session.get(f"{xnat.url}/data/JSESSION", auth=("carol", "carol-pw"), timeout=TIMEOUT)
        assert login.status_code == 200 and session.cookies["JSESSIONID"] == login.text
        session.auth = None
        assert session.delete(f"{xnat.url}/data/JSESSION", timeout=TIMEOUT).status_code == 200
        assert session.get(f"{xnat.url}/data/auth", timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{xnat.url}/data/JSESSION", auth=("carol", "nope"), timeout=TIMEOUT).status_code == 401
    assert xnat.failed_logins("carol") == 1
