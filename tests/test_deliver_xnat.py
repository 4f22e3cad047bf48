"""Delivery against XNAT as its source behaves, version by version (1.8.8, 1.8.9, 1.8.10+, behind a context path):
the pre-flight, imports a proxy cut off while XNAT goes on, refused logins (the server pauses, never a lockout),
alias tokens that expire, guests, locked rows, admins' listings, labels used by another subject, extra resources.

Each test ends with `end_state` where instances were sent: by SOP Instance UID, never by counts. The behaviours
of the stand-in are cited to xnat-web in ingestd/testing/xnat/ and docs/xnat.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from ingestd.journal.servers import server_states
from ingestd.states import Step, StudyState
from ingestd.testing.xnat import FakeXnat
from tests.lab import PASSWORD, Lab, end_state, lab_xnat, set_secrets, study


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    set_secrets(monkeypatch)


@pytest.fixture
def xnat() -> Iterator[FakeXnat]:
    with lab_xnat() as server:
        yield server


def _logins(xnat: FakeXnat) -> int:
    return sum(1 for method, path, _ in xnat.requests_log if method == "GET" and path.startswith("/data/JSESSION"))


# -- versions and context paths --------------------------------------------------------------------------------


@pytest.mark.parametrize("archive", [False, True], ids=["prearchive", "archive"])
@pytest.mark.parametrize(
    ("version", "context_path"),
    [("1.8.8", ""), ("1.8.9", ""), ("1.8.9.2", ""), ("1.8.10", ""), ("1.8.11", ""), ("1.8.10", "/xnat")],
)
def test_delivers_on_every_version(tmp_path: Path, version: str, context_path: str, archive: bool) -> None:
    """From 1.8.9 the pre-flight's project listing answers 500 without `dataType`: ingestd sends it on every
    version; behind /xnat the answers' /data paths carry no context path, the archive's Location does."""
    with lab_xnat(version, context_path=context_path) as xnat:
        lab = Lab(tmp_path, xnat, archive=archive)
        lab.receive(study(series=2, per_series=3))
        lab.deliver()
        assert lab.states() == [StudyState.DELIVERED]
        assert end_state(lab.state, xnat) == {"in XNAT": 6}
        listings = [path for method, path, _ in xnat.requests_log if "/data/projects?" in path]
        assert listings and all("dataType=xnat%3AsubjectData" in path for path in listings)


def test_pre_flight_falls_back_when_the_listing_fails(tmp_path: Path, xnat: FakeXnat) -> None:
    """Should the writable-projects listing still fail (a 5xx), the project is looked up on its own."""
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=1, per_series=2))
    xnat.fail_next("GET", "/data/projects?", status=500, times=1)
    lab.deliver()
    assert lab.states() == [StudyState.DELIVERED]
    assert end_state(lab.state, xnat) == {"in XNAT": 2}


# -- an import a proxy cut off while XNAT went on ------------------------------------------------------------------


@pytest.mark.parametrize("archive", [False, True], ids=["prearchive", "archive"])
@pytest.mark.parametrize("version", ["1.8.9", "1.8.10"])
def test_import_going_on_after_a_proxy_timeout_is_never_judged_early(
    tmp_path: Path, archive: bool, version: str
) -> None:
    """nginx answers 504 while XNAT still stores the upload's entries one by one: the session stays RECEIVING and
    its lastmod moves; ingestd builds it only once lastmod settles, then sends what is still missing, if anything."""
    with lab_xnat(version, lastmod_refresh_seconds=0.1) as xnat:
        lab = Lab(tmp_path, xnat, archive=archive)
        lab.receive(study(series=2, per_series=10))
        xnat.proxy_timeout_next(after_seconds=0.2, import_seconds=3.0)
        lab.deliver(timeout=60)
        assert lab.states() == [StudyState.DELIVERED]
        assert end_state(lab.state, xnat) == {"in XNAT": 20}
        assert xnat.faults_pending() == 0
        experiments = xnat.experiments("PROJ")
        assert len(experiments) == (1 if archive else 0)


# -- refused logins: the server pauses, no batch is charged, the account is never locked ---------------------------


def test_wrong_password_pauses_the_server_and_never_locks_the_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with lab_xnat(max_failed_logins=5) as xnat:
        monkeypatch.setenv("XNAT_TEST_PASSWORD", "not-the-password")
        lab = Lab(tmp_path, xnat, server_extra="      login_pause: {initial_seconds: 0.3, max_seconds: 5}\n")
        lab.receive(study(series=1, per_series=2))
        second = study(series=1, per_series=2)
        for ds in second:
            ds.PatientID = "DELIVER2"  # another subject, so another session label
        lab.receive(second)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            lab.deliverer.check()
            time.sleep(0.02)
        # 2 s of checks with two batches: 0 s, 0.3 s, 0.9 s (then 2.1 s): three failed logins, under the lockout
        assert 1 <= xnat.failed_logins("ingestd") <= 3 and not xnat.is_locked("ingestd")
        assert lab.states() == [StudyState.ROUTED, StudyState.ROUTED]  # waiting, not held
        assert all(
            (delivery := lab.journal.delivery(b.id)) is None or delivery.attempts == 0 for b in lab.journal.batches()
        )
        (state,) = server_states(lab.journal)
        assert state.paused and "refused the login (401)" in state.reason
        assert lab.deliverer.breaker.paused() == ["main"]
        # The admin fixes the password and reloads: deliveries resume at once.
        monkeypatch.setenv("XNAT_TEST_PASSWORD", PASSWORD)
        lab.deliverer.reconfigure(lab.config)
        lab.deliver()
        assert lab.states() == [StudyState.DELIVERED, StudyState.DELIVERED]
        assert end_state(lab.state, xnat) == {"in XNAT": 4}
        assert not server_states(lab.journal)[0].paused


def test_a_restart_tries_a_paused_server_once_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with lab_xnat() as xnat:
        monkeypatch.setenv("XNAT_TEST_PASSWORD", "not-the-password")
        lab = Lab(tmp_path, xnat)
        lab.receive(study(series=1, per_series=1))
        lab.deliverer.check()
        assert lab.deliverer.breaker.paused() == ["main"]
        monkeypatch.setenv("XNAT_TEST_PASSWORD", PASSWORD)
        lab.restart()
        lab.deliver()
        assert lab.states() == [StudyState.DELIVERED]


@pytest.mark.parametrize(
    ("break_it", "words"),
    [
        (lambda x: x.expire_password("ingestd"), "password has expired"),
        (lambda x: x.disable_user("ingestd", inactivity=True), "disabled"),
        (lambda x: x.disable_user("ingestd"), "refused the login (401)"),
    ],
    ids=["expired-password", "inactive", "disabled"],
)
def test_an_account_xnat_refuses_pauses_the_server_with_what_to_do(
    tmp_path: Path, xnat: FakeXnat, break_it: Callable[[FakeXnat], object], words: str
) -> None:
    """Expired password: 302 to XDATScreen_UpdateUser.vm; inactive: 302 to InactiveAccount.vm; disabled by an
    admin: 401 (XnatExpiredPasswordFilter, XnatDatabaseAuthenticationProvider). Never taken for success."""
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=1, per_series=2))
    break_it(xnat)
    for _ in range(5):
        lab.deliverer.check()
    (state,) = server_states(lab.journal)
    assert state.paused and words in state.reason, state.reason
    assert lab.states() == [StudyState.ROUTED]
    assert not xnat.prearchive_rows() and not xnat.experiments()


def test_unexpected_redirect_holds_naming_where_it_pointed(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=1, per_series=1))
    xnat.fail_next("GET", "/data/prearchive/projects/PROJ", status=302, times=2, html=False)
    xnat.fail_next("POST", "/data/services/import", status=302, times=1, html=False)
    lab.deliver()
    batch, _ = lab.batch()
    assert batch.state == StudyState.HELD and batch.hold_code == "xnat-redirect", batch.reason


# -- alias tokens ----------------------------------------------------------------------------------------------


def test_an_alias_token_in_a_credentials_file_is_renewed_before_it_expires(tmp_path: Path) -> None:
    """Tokens live 2 days (aliasTokenTimeout) and are then swept: ingestd issues a new one in time, writes it to
    the 0600 credentials file, and goes on delivering after the old one is gone."""
    with lab_xnat(token_lifetime_seconds=3600) as xnat:
        alias, secret = xnat.issue_token("ingestd")
        path = tmp_path / "xnat.credentials"
        path.write_text(f"{alias}:{secret}\n")
        path.chmod(0o600)
        lab = Lab(
            tmp_path,
            xnat,
            credentials=f"{{file: {path}}}",
            server_extra="      token_renew_seconds: 7200\n",  # an hour left is less: renew at once
        )
        lab.receive(study(series=1, per_series=2))
        lab.deliver()
        new_alias, new_secret = path.read_text().strip().split(":")
        assert new_alias != alias and (path.stat().st_mode & 0o777) == 0o600
        xnat.expire_tokens("ingestd")  # the sweep: the old token is gone (and so would the new be, re-issued below)
        new_alias, new_secret = xnat.issue_token("ingestd")
        path.write_text(f"{new_alias}:{new_secret}\n")
        later = study(series=1, per_series=2)
        for ds in later:
            ds.PatientID = "DELIVER2"
        lab.receive(later)
        lab.deliver()
        assert lab.states() == [StudyState.DELIVERED, StudyState.DELIVERED]
        assert end_state(lab.state, xnat) == {"in XNAT": 4}
        assert secret not in (lab.state / "journal.sqlite").read_text(errors="replace")


def test_an_expired_alias_token_pauses_the_server(tmp_path: Path) -> None:
    with lab_xnat() as xnat:
        alias, secret = xnat.issue_token("ingestd")
        path = tmp_path / "xnat.credentials"
        path.write_text(f"{alias}:{secret}\n")
        path.chmod(0o600)
        xnat.expire_tokens("ingestd")
        lab = Lab(tmp_path, xnat, credentials=f"{{file: {path}}}")
        lab.receive(study(series=1, per_series=1))
        lab.deliverer.check()
        (state,) = server_states(lab.journal)
        assert state.paused and "refused the login" in state.reason
        assert lab.states() == [StudyState.ROUTED]


# -- guests, locks, admins, labels, resources, permanent failures -------------------------------------------------


@pytest.mark.parametrize("archive", [False, True], ids=["prearchive", "archive"])
def test_site_open_to_guests_never_files_as_the_guest(tmp_path: Path, archive: bool) -> None:
    """requireLogin=false: an expired session is served as the guest (403 on what it may not see, an empty project
    list, imports into Unassigned): ingestd logs in again and sends its credentials with every import."""
    with lab_xnat(require_login=False) as xnat:
        lab = Lab(tmp_path, xnat, archive=archive)
        lab.receive(study(series=1, per_series=3))
        for _ in range(200):
            if not lab.journal.batches((StudyState.ROUTED,)):
                break
            xnat.expire_sessions()  # every step finds its session gone
            lab.deliverer.check()
            time.sleep(0.02)
        assert lab.states() == [StudyState.DELIVERED]
        assert end_state(lab.state, xnat) == {"in XNAT": 3}
        assert not xnat.prearchive_rows("Unassigned")


def test_build_on_a_locked_session_waits(tmp_path: Path) -> None:
    """1.8.9 builds only after minutes idle; ingestd asks, and XNAT answers 409 "session document locked" while
    another operation holds the row (PrearcSessionResource.postActionBuild:333-339): wait, then ask again."""
    with lab_xnat("1.8.9", idle_build_seconds=3600, rebuild_repeat_seconds=3600) as xnat:
        lab = Lab(tmp_path, xnat)
        lab.receive(study(series=1, per_series=2))
        xnat.fail_next("POST", "/data/prearchive/projects/PROJ/", status=409, body="session document locked", times=2)
        lab.deliver()
        assert lab.states() == [StudyState.DELIVERED]
        assert end_state(lab.state, xnat) == {"in XNAT": 2}
        statuses = [s for m, p, s in xnat.requests_log if m == "POST" and "/data/prearchive/projects/PROJ/" in p]
        assert statuses[:2] == [409, 409] and statuses[2] == 200


def test_a_locked_session_answers_409_to_a_build(tmp_path: Path) -> None:
    """The stand-in's lock (LockAndSync's `_` status) and the client together: build() says False, not an error."""
    with lab_xnat("1.8.9", idle_build_seconds=3600, rebuild_repeat_seconds=3600) as xnat:
        lab = Lab(tmp_path, xnat)
        lab.receive(study(series=1, per_series=1))
        lab.advance_to(Step.WAIT)
        (row,) = xnat.prearchive_rows("PROJ")
        xnat.hold_row_lock("PROJ", row["timestamp"], row["folderName"], 0.5)
        client = lab.deliverer._client("main", lab.config.xnat.servers["main"])
        assert client.build(row["url"]) is False
        time.sleep(0.6)
        assert client.build(row["url"]) is True


def test_an_admin_never_adopts_an_unassigned_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site admin's listing of PROJ also shows every Unassigned row (PrearcSessionListResource): one of the same
    study and label in Unassigned (a misrouted earlier send) is not ours, even holding files of the same names."""
    with lab_xnat() as xnat:
        xnat.add_user("ingestd-admin", PASSWORD, admin=True)
        monkeypatch.setenv("XNAT_TEST_USER", "ingestd-admin")
        lab = Lab(tmp_path, xnat, archive=False)
        lab.receive(study(series=1, per_series=2))
        delivery = lab.advance_to(Step.IMPORT)
        route = lab.journal.routes()[lab.batch()[0].id]
        stray = requests.post(
            f"{xnat.url}/data/services/import",
            params={
                "import-handler": "DICOM-zip",
                "PROJECT_ID": "NOSUCH",
                "SUBJECT_ID": route.subject,
                "EXPT_LABEL": route.session,
            },
            data=(lab.state / str(delivery.zip_path)).read_bytes(),
            headers={"Content-Type": "application/zip"},
            auth=("ingestd-admin", PASSWORD),
            timeout=30,
        )
        assert stray.status_code == 200 and "/Unassigned/" in stray.text
        xnat.build_now()
        xnat.reset_next("POST", "/data/services/import")  # our own import is cut: verify must look, not adopt
        lab.deliver()
        assert lab.states() == [StudyState.DELIVERED]
        assert end_state(lab.state, xnat) == {"in XNAT": 2}
        assert len(xnat.prearchive_rows("Unassigned")) == 1


def test_label_used_under_another_subject_is_held_before_sending(tmp_path: Path, xnat: FakeXnat) -> None:
    """Labels are unique in a project: archiving under a label another subject's experiment holds fails (409
    "Already Exists for another Subject", PrearcSessionArchiver.checkForConflicts); ingestd looks project-wide."""
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = Lab(tmp_path / "first", xnat)
    first.receive(study(series=1, per_series=1))
    first.deliver()
    (experiment,) = xnat.experiments("PROJ")
    other = study(series=1, per_series=1)
    for ds in other:
        ds.PatientID = "SOMEONE-ELSE"
    second = Lab(tmp_path / "second", xnat)
    second.rules_file.write_text(
        second.rules_file.read_text().replace("session: '{subject}_MR'", f"session: '{experiment.label}'")
    )
    second.restart()
    second.receive(other)
    second.deliver()
    batch, _ = second.batch()
    assert batch.state == StudyState.HELD and batch.hold_code == "label-taken", batch.reason
    assert "another" in str(batch.reason)
    assert second.imports() == 0 or sum(1 for _ in xnat.prearchive_rows("PROJ")) == 0


@pytest.mark.parametrize("archive", [False, True], ids=["prearchive", "archive"])
def test_scans_with_more_resources_than_dicom_are_verified_on_dicom(tmp_path: Path, archive: bool) -> None:
    """Real scans carry NIFTI, SNAPSHOTS, BIDS...: verification reads the DICOM catalog, so extra files never
    make up for missing instances."""
    with lab_xnat(extra_scan_resources=("NIFTI", "SNAPSHOTS")) as xnat:
        first = Lab(tmp_path, xnat, archive=True)
        datasets = study(series=2, per_series=4)
        first.receive(datasets[:4] + datasets[4:6])
        first.deliver()
        first.receive(datasets[6:])  # a late batch of the same study
        first.deliver()
        assert first.states() == [StudyState.DELIVERED, StudyState.DELIVERED]
        assert end_state(first.state, xnat) == {"in XNAT": 8}


def test_a_failing_site_anonymisation_script_is_held_not_retried_for_days(tmp_path: Path, xnat: FakeXnat) -> None:
    """The site script failing during import answers 400 "unable to read DICOM object" (GradualDicomImporter's
    catch-all): a person must fix the script; the spool keeps every instance."""
    xnat.set_anon_script("(0010,0010) := bad(", fails=True)
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=1, per_series=2))
    lab.deliver()
    batch, _ = lab.batch()
    assert batch.state == StudyState.HELD and batch.hold_code == "xnat-refused", batch.reason
    assert end_state(lab.state, xnat) == {"held, in the spool": 2}
    assert lab.imports() == 1
