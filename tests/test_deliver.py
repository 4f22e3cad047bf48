"""Delivery against the XNAT stand-in (real HTTP on 127.0.0.1): package, import, wait, archive, verify — once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ingestd.cli import main
from ingestd.journal.servers import server_states
from ingestd.states import StudyState
from ingestd.testing.xnat import FakeXnat
from tests.lab import Lab, lab_xnat, set_secrets, study
from tests.procs import wait_until


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_secrets(monkeypatch)


@pytest.fixture
def xnat(secrets_env: None) -> Iterator[FakeXnat]:
    with lab_xnat() as server:
        yield server


def test_study_is_archived_verified_and_cleaned_up(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=2, per_series=3))
    lab.deliver()
    batch, delivery = lab.batch_and_delivery()
    assert batch.state == StudyState.DELIVERED
    assert delivery.step == "done" and str(delivery.archive_uri).startswith("/data/archive/projects/PROJ/")
    (experiment,) = xnat.experiments("PROJ")
    assert len(experiment.scans) == 2 and sum(len(scan.files) for scan in experiment.scans.values()) == 6
    route = lab.journal.routes()[batch.id]
    assert (experiment.subject, experiment.label, experiment.study_uid) == (
        route.subject,
        route.session,
        route.study_uid,
    )
    assert not xnat.prearchive_rows("PROJ")
    assert not list((lab.state / "spool").rglob("*.dcm")) and not list((lab.state / "outbox").rglob("*.dcm"))
    assert not list((lab.state / "packages").iterdir())
    assert lab.imports() == 1


def test_rule_without_archive_leaves_it_ready_in_the_prearchive(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat, archive=False)
    lab.receive(study(series=1, per_series=2))
    lab.deliver()
    batch, delivery = lab.batch_and_delivery()
    assert batch.state == StudyState.DELIVERED
    (row,) = xnat.prearchive_rows("PROJ")
    assert row["status"] == "READY" and f"/data{row['url']}" == f"/data{delivery.prearchive_url}"
    assert not xnat.experiments("PROJ")


def test_older_xnat_is_asked_to_build_a_session_left_receiving(tmp_path: Path, xnat: FakeXnat) -> None:
    """XNAT up to 1.8.9 ignores dest for DICOM-zip and builds only after minutes of idleness."""
    with lab_xnat("1.8.9", idle_build_seconds=3600, rebuild_repeat_seconds=3600) as old:
        lab = Lab(tmp_path, old)
        lab.receive(study(series=1, per_series=2))
        lab.deliver()
        assert any("action=build" in path for method, path, _ in old.requests_log if method == "POST")
        assert len(old.experiments("PROJ")) == 1


def test_unknown_project_is_held_not_sent_to_unassigned(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat, project="NOSUCH")
    lab.receive(study(series=1, per_series=1))
    lab.deliver()
    batch, _ = lab.batch()
    assert batch.state == StudyState.HELD
    assert "has no project NOSUCH" in str(batch.reason)
    assert lab.imports() == 0 and not xnat.prearchive_rows()


def test_read_only_project_is_held(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat, project="READONLY")
    lab.receive(study(series=1, per_series=1))
    lab.deliver()
    batch, _ = lab.batch()
    assert "cannot write to project READONLY" in str(batch.reason)
    assert lab.imports() == 0


def test_outage_is_retried_with_backoff(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=1, per_series=2))
    xnat.fail_next("POST", "/data/services/import", status=503, times=2)
    lab.deliver()
    batch, _ = lab.batch()
    assert batch.state == StudyState.DELIVERED
    assert lab.imports() == 3 and len(xnat.experiments("PROJ")) == 1


def test_import_that_xnat_did_but_the_client_never_heard_of_is_adopted(tmp_path: Path, xnat: FakeXnat) -> None:
    """A proxy 504 after XNAT stored the upload: the retry finds the session instead of importing again."""
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=2, per_series=2))
    xnat.fail_next("POST", "/data/services/import", status=504, after_processing=True)
    lab.deliver()
    batch, _ = lab.batch()
    assert batch.state == StudyState.DELIVERED
    assert lab.imports() == 1
    assert len(xnat.experiments("PROJ")) == 1 and not xnat.prearchive_rows()


def test_archive_that_xnat_did_but_the_client_never_heard_of_is_verified(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=1, per_series=3))
    xnat.fail_next("POST", "/data/services/archive", status=504, after_processing=True)
    lab.deliver()
    batch, _ = lab.batch()
    assert batch.state == StudyState.DELIVERED
    archives = [path for method, path, _ in xnat.requests_log if method == "POST" and "services/archive" in path]
    assert len(archives) == 1 and len(xnat.experiments("PROJ")) == 1


def test_expired_session_logs_in_again(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=1, per_series=1))
    lab.deliverer.check()  # package
    lab.deliverer.check()  # preflight: logged in
    xnat.expire_sessions()
    lab.deliver()
    batch, _ = lab.batch()
    assert batch.state == StudyState.DELIVERED


def test_late_series_are_appended_to_the_same_session(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat)
    first = study(series=2, per_series=2)
    lab.receive(first)
    lab.deliver()
    lab.receive(study(series=1, per_series=2, study_uid=first[0].StudyInstanceUID, first=3))
    lab.deliver()
    assert [b.state for b in sorted(lab.journal.batches(), key=lambda b: b.id)] == [StudyState.DELIVERED] * 2
    (experiment,) = xnat.experiments("PROJ")
    assert len(experiment.scans) == 3


def test_session_label_of_another_study_is_held_before_sending(tmp_path: Path, xnat: FakeXnat) -> None:
    """XNAT would merge another study into an archived session of the same label (overwrite=append): held first."""
    lab = Lab(tmp_path, xnat)
    first = study(series=1, per_series=1)
    lab.receive(first)
    lab.deliver()
    other = study(series=1, per_series=1)  # another study of the same patient: same subject and session label
    lab.receive(other)
    lab.deliver()
    batch, _ = lab.batch(1)
    assert batch.state == StudyState.HELD
    assert "already has" in str(batch.reason) and "for another study" in str(batch.reason)
    assert lab.imports() == 1
    (experiment,) = xnat.experiments("PROJ")
    assert experiment.study_uid == lab.journal.routes()[1].study_uid


def test_conflict_on_archive_holds_with_xnats_message(tmp_path: Path, xnat: FakeXnat) -> None:
    """XNAT refuses the archive (its 500 "FAILED: ..." is a permanent refusal, not an outage): held with it."""
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=1, per_series=2))
    xnat.fail_next(
        "POST", "/data/services/archive", status=500, body="FAILED: Unable to archive S: Operation Failed: Nope."
    )
    lab.deliver()
    batch, _ = lab.batch()
    assert batch.state == StudyState.HELD
    assert "FAILED: Unable to archive S: Operation Failed: Nope." in str(batch.reason)


def test_credentials_never_reach_the_journal(tmp_path: Path, xnat: FakeXnat, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XNAT_TEST_PASSWORD", "wrong-password-123")
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=1, per_series=1))
    wait_until(lambda: lab.deliverer.check() is not None and lab.deliverer.breaker.paused(), 10, interval=0.02)
    (state,) = server_states(lab.journal)
    assert state.paused and "refused the login" in state.reason
    assert b"wrong-password-123" not in (lab.state / "journal.sqlite").read_bytes()


def test_held_study_is_retried_after_the_cause_is_fixed(tmp_path: Path, xnat: FakeXnat) -> None:
    """Held for a missing project; the project is created; `ingestd retry --held` delivers it."""
    lab = Lab(tmp_path, xnat, project="LATER")
    lab.receive(study(series=1, per_series=2))
    lab.deliver()
    batch, _ = lab.batch()
    assert batch.state == StudyState.HELD
    xnat.add_project("LATER", members=["ingestd"])
    config = tmp_path / "ingestd.yaml"
    config.write_text(f"state_dir: {lab.state}\n")
    assert main(["retry", "--config", str(config), "--held"]) == 0
    lab.deliver()
    batch, delivery = lab.batch_and_delivery()
    assert batch.state == StudyState.DELIVERED
    assert len(xnat.experiments("LATER")) == 1 and delivery.attempts == 0


def test_released_study_is_left_alone(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat, project="NOSUCH")
    lab.receive(study(series=1, per_series=1))
    lab.deliver()
    batch, _ = lab.batch()
    config = tmp_path / "ingestd.yaml"
    config.write_text(f"state_dir: {lab.state}\n")
    assert main(["release", "--config", str(config), str(batch.id)]) == 0
    assert main(["release", "--config", str(config), str(batch.id)]) == 1
    batch, _ = lab.batch()
    assert batch.state == StudyState.RELEASED
    assert str(batch.reason).startswith("released by a person: deliver: XNAT main has no project NOSUCH")
    assert list((lab.state / "spool").rglob("*.dcm"))  # nothing deleted


@pytest.mark.usefixtures("secrets_env")
def test_xnat_down_at_start_then_back(tmp_path: Path) -> None:
    """Nothing listens on XNAT's port at first: connection errors are retried until it comes up."""
    with FakeXnat() as probe:  # pick a free port, then free it again
        port = int(probe.url.rsplit(":", 1)[1])
        lab = Lab(tmp_path, probe)
    lab.receive(study(series=1, per_series=2))
    wait_until(lambda: lab.deliverer.check() is not None and lab.delivery().attempts, 10, interval=0.05)
    _, delivery = lab.batch_and_delivery()
    assert delivery.attempts >= 1 and "unreachable" in str(delivery.last_error)
    with FakeXnat(port=port) as xnat:
        xnat.add_user("ingestd", "s3cret-pw")
        xnat.add_project("PROJ", members=["ingestd"])
        lab.xnat = xnat
        lab.deliver()
        batch, _ = lab.batch()
        assert batch.state == StudyState.DELIVERED
        assert len(xnat.experiments("PROJ")) == 1


def test_connection_reset_mid_upload_is_retried(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=2, per_series=3))
    xnat.reset_next("POST", "/data/services/import")
    lab.deliver()
    batch, _ = lab.batch()
    assert batch.state == StudyState.DELIVERED
    assert [status for method, path, status in xnat.requests_log if "services/import" in path] == [0, 200]
    assert len(xnat.experiments("PROJ")) == 1


def test_throttling_and_slow_answers_are_waited_out(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=1, per_series=2))
    xnat.fail_next("GET", "/data/prearchive/projects/PROJ/", status=429, times=3, html=False, body="slow down")
    xnat.fail_next("POST", "/data/services/archive", status=502, delay=0.3)
    lab.deliver()
    batch, _ = lab.batch()
    assert batch.state == StudyState.DELIVERED
    assert len(xnat.experiments("PROJ")) == 1


@pytest.mark.usefixtures("secrets_env")
def test_conflict_found_while_waiting_holds_with_xnats_log(tmp_path: Path) -> None:
    """XNAT builds the waiting session and sets it to CONFLICT (as a failed auto-archive does): the files are there,
    nothing is sent again, and the batch is held with XNAT's own log entry for it."""
    with lab_xnat("1.8.9", idle_build_seconds=3600, rebuild_repeat_seconds=3600) as old:
        lab = Lab(tmp_path, old)
        lab.receive(study(series=1, per_series=2))
        lab.deliverer.check()  # package, preflight, import; then waiting: 1.8.9 leaves the session RECEIVING
        assert lab.delivery().step == "wait"
        (row,) = old.prearchive_rows("PROJ")
        for action in ({"action": "build"}, {"action": "set-status", "status": "CONFLICT"}):
            requests.post(
                f"{old.url}/data/prearchive/projects/PROJ/{row['timestamp']}/{row['folderName']}",
                params=action,
                auth=("ingestd", "s3cret-pw"),
                timeout=10,
            ).raise_for_status()
        lab.deliver()
        batch, _ = lab.batch()
        assert batch.state == StudyState.HELD and batch.hold_code == "xnat-conflict"
        assert "to CONFLICT: " in str(batch.reason) and "no log entry" not in str(batch.reason)
        assert lab.imports() == 1
        config = tmp_path / "ingestd.yaml"
        config.write_text(f"state_dir: {lab.state}\n")
        assert main(["retry", "--config", str(config), "--held"]) == 0  # a person looked: archive it again
        lab.deliver()
        assert lab.states() == [StudyState.DELIVERED] and lab.imports() == 1
        assert len(old.experiments("PROJ")) == 1 and not old.prearchive_rows("PROJ")
