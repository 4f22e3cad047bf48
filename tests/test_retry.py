"""`ingestd retry` always has a way forward: each dead end walked as a lab admin walks it, and the journal's part.

With a real daemon and the XNAT stand-in: a rule naming a project XNAT lacks, fixed and retried; two studies on one
session label, the template changed and retried; a credentials file that cannot be read, then a wrong password,
then the right one, each taken up on SIGHUP; a study waiting an hour between attempts and a server paused for an
hour, both pushed with `retry --now`. In one process: a study part of which XNAT may hold already keeps its route
(and `retry` says what to remove before `--reroute-sent`); `--keep-route`; and re-routing drops exactly the route's
rows and files, a crash half-way recovered by the next `retry`. Deliveries are checked by SOP Instance UID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from ingestd.cli import main
from ingestd.config import Credentials
from ingestd.journal import Journal
from ingestd.journal.retries import (
    RetryOutcome,
    daemon_rules,
    push_now,
    record_daemon_rules,
    retry_held,
    sent_evidence,
)
from ingestd.logs import uid_digest
from ingestd.pipeline.servers import XnatServers
from ingestd.states import StudyState
from ingestd.testing.xnat import FakeXnat
from ingestd.xnat import XnatLoginError, load_credentials
from tests.dicom import make_study, write_instances
from tests.lab import PASSWORD, Lab, end_state, lab_xnat, set_secrets, study, xnat_holdings
from tests.procs import DaemonProcess, journal_rows, run_ingestd, wait_until

# -- a daemon fed through a drop folder ----------------------------------------------------------------------------

RULES = """
profiles:
  research: {key: {env: INGESTD_TEST_KEY}}
rules:
  - name: scanner
    when: {drop_folder: drop}
    route: {server: main, project: PROJECT, subject: '{PatientID:hash8}', session: 'SESSION', archive: true}
    anonymize: research
"""


def rules(project: str = "PROJ", session: str = "{subject}_MR") -> str:
    return RULES.replace("PROJECT", project).replace("SESSION", session)


def daemon_config(tmp_path: Path, xnat: FakeXnat, *, credentials: str = "", server: str = "") -> Path:
    """A daemon without a DICOM listener, fed by the drop folder `drop`, delivering to `xnat` with `rules()`."""
    (tmp_path / "drop").mkdir()
    (tmp_path / "lab.rules.yaml").write_text(rules())
    config = tmp_path / "ingestd.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "listener: {enabled: false}\n"
        f"drop_folders: [{{path: {tmp_path / 'drop'}, settle_seconds: 0.3}}]\n"
        "study_idle_seconds: 1\n"
        "spool: {min_free_mb: 0}\n"
        "logging: {level: info, format: json}\n"
        "metrics: {enabled: false}\n"
        "rules: [lab.rules.yaml]\n"
        "batch_failures: {max_attempts: 3, initial_seconds: 0.2, max_seconds: 0.5}\n"
        "xnat:\n"
        "  servers:\n"
        "    main:\n"
        f"      url: {xnat.url}\n"
        "      credentials: "
        + (credentials or "{env_username: XNAT_TEST_USER, env_password: XNAT_TEST_PASSWORD}")
        + "\n"
        "      poll_interval_seconds: 0.1\n"
        "      build_wait_seconds: 0.3\n"
        "      ready_timeout_seconds: 30\n" + (server or "      retry: {initial_seconds: 0.2, max_seconds: 1}\n")
    )
    return config


def drop(tmp_path: Path, datasets: list[Dataset], name: str) -> None:
    """Put a study into the drop folder at once (written beside it, then moved in)."""
    staged = tmp_path / "staging" / name
    write_instances(datasets, staged)
    shutil.move(staged, tmp_path / "drop" / name)


def batches(tmp_path: Path) -> dict[str, tuple[int, str, str | None, str | None]]:
    """Study Instance UID -> (batch id, state, hold code, reason), read from the journal as an outsider."""
    journal = tmp_path / "state" / "journal.sqlite"
    if not journal.exists():
        return {}
    rows = journal_rows(journal, "SELECT study_uid, id, state, hold_code, reason FROM batches")
    return {row[0]: (row[1], row[2], row[3], row[4]) for row in rows}


def in_state(tmp_path: Path, uid: str, state: str) -> tuple[int, str, str | None, str | None] | None:
    found = batches(tmp_path).get(uid)
    return found if found is not None and found[1] == state else None


def outgoing_uids(tmp_path: Path, batch_id: int) -> list[str]:
    rows = journal_rows(tmp_path / "state" / "journal.sqlite", "SELECT batch_id, sop_uid FROM outgoing")
    return sorted(row[1] for row in rows if row[0] == batch_id)


def route_of(tmp_path: Path, batch_id: int) -> tuple[str, str, str]:
    """(project, session, rules_version) of a batch's route."""
    rows = journal_rows(
        tmp_path / "state" / "journal.sqlite", "SELECT batch_id, project, session, rules_version FROM routes"
    )
    ((project, session, version),) = [row[1:] for row in rows if row[0] == batch_id]
    return project, session, version


def server_state(tmp_path: Path) -> dict[str, object]:
    rows = journal_rows(tmp_path / "state" / "journal.sqlite", "SELECT value FROM meta WHERE key = 'xnat_server:main'")
    return json.loads(rows[0][0]) if rows else {}


def retry(config: Path, *args: str) -> str:
    """`ingestd retry --config CONFIG ARGS` as the admin types it; its output (the test fails if it fails)."""
    result = run_ingestd("retry", "--config", str(config), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_rule_naming_a_project_xnat_lacks_is_fixed_and_retried(tmp_path: Path, xnat: FakeXnat) -> None:
    """Held `xnat-refused` (no such project); the admin fixes the rules file and runs `ingestd retry BATCH`: the
    daemon reloads, the study is routed again with the new rules and delivered to the project they name now."""
    config = daemon_config(tmp_path, xnat)
    (tmp_path / "lab.rules.yaml").write_text(rules(project="WRONG"))
    mr = make_study(series=2, per_series=2)
    uid = str(mr[0].StudyInstanceUID)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        drop(tmp_path, mr, "mr")
        batch_id, _, code, reason = wait_until(lambda: in_state(tmp_path, uid, "held"), 60, message="held")
        assert code == "xnat-refused" and "has no project WRONG" in str(reason)
        (tmp_path / "lab.rules.yaml").write_text(rules(project="PROJ"))
        said = retry(config, str(batch_id))
        assert "reloaded its configuration, rules and credentials" in said, said
        assert f"batch {batch_id} ({uid_digest(uid)}#1, held xnat-refused): re-routed with rule set" in said, said
        wait_until(lambda: in_state(tmp_path, uid, "delivered"), 60, message="delivered")
        assert daemon.terminate() == 0
    project, session, version = route_of(tmp_path, batch_id)
    assert project == "PROJ" and f"rule set {version}" in said
    archived, prearchived = xnat_holdings(xnat, "PROJ")
    sent = outgoing_uids(tmp_path, batch_id)
    assert len(sent) == 4 and sorted(archived) == sent and not prearchived
    assert all(archived[sop_uid] == [session] for sop_uid in sent)
    assert uid not in json.dumps(said)  # the study is named by its digest


def test_two_studies_on_one_session_label_the_template_is_changed_and_retried(tmp_path: Path, xnat: FakeXnat) -> None:
    """The second study on a session label is held `label-taken`, and its message says what leads to delivery:
    fix the template, `ingestd retry`. Done so (by the study's digest), it gets a label of its own: both delivered,
    every instance once, no session merged or duplicated."""
    config = daemon_config(tmp_path, xnat)
    first, second = make_study(series=1, per_series=2), make_study(series=1, per_series=3)  # one PatientID
    first_uid, second_uid = str(first[0].StudyInstanceUID), str(second[0].StudyInstanceUID)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        drop(tmp_path, first, "first")
        wait_until(lambda: in_state(tmp_path, first_uid, "delivered"), 60, message="the first delivered")
        drop(tmp_path, second, "second")
        batch_id, _, code, reason = wait_until(lambda: in_state(tmp_path, second_uid, "held"), 60, message="held")
        assert code == "label-taken" and "route.session template" in str(reason) and "ingestd retry" in str(reason)
        (tmp_path / "lab.rules.yaml").write_text(rules(session="{subject}_{StudyInstanceUID:hash6}"))
        said = retry(config, uid_digest(second_uid))
        assert f"batch {batch_id} " in said and "re-routed with rule set" in said, said
        wait_until(lambda: in_state(tmp_path, second_uid, "delivered"), 60, message="the second delivered")
        assert daemon.terminate() == 0
    assert end_state(tmp_path / "state", xnat) == {"in XNAT": 5}  # each instance once, in its route's session
    labels = sorted(experiment.label for experiment in xnat.experiments("PROJ"))
    assert len(labels) == 2 and labels[0] != labels[1]
    assert route_of(tmp_path, batch_id)[1] in labels


def test_credentials_fixed_on_disk_are_taken_up_on_sighup(tmp_path: Path, xnat: FakeXnat) -> None:
    """A credentials file spoilt while the daemon runs (not text: `run` refuses one at start) pauses the server (the
    study waits, nothing is held or charged); a wrong password after SIGHUP keeps it paused; the right one after
    SIGHUP delivers."""
    secret = tmp_path / "xnat.credentials"
    secret.write_text("ingestd:pw-for-tests\n")
    secret.chmod(0o600)
    config = daemon_config(tmp_path, xnat, credentials=f"{{file: {secret}}}")
    mr = make_study(series=1, per_series=2)
    uid = str(mr[0].StudyInstanceUID)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        secret.write_bytes(b"\xff\xfe not text\n")
        drop(tmp_path, mr, "mr")
        wait_until(lambda: server_state(tmp_path).get("paused"), 60, message="the server paused")
        assert "is not text (UTF-8)" in str(server_state(tmp_path)["reason"])
        assert in_state(tmp_path, uid, "routed"), batches(tmp_path)  # waiting, not held
        faults = journal_rows(tmp_path / "state" / "journal.sqlite", "SELECT attempts, faults FROM deliveries")
        assert faults in ([], [(0, 0)])  # paused before its first step, or after it: no batch charged

        secret.write_text("ingestd:not-the-password\n")
        os.kill(daemon.pid, signal.SIGHUP)
        wait_until(lambda: server_state(tmp_path).get("refusals") == 2, 30, message="a second refused login")
        assert "refused the login (401)" in str(server_state(tmp_path)["reason"])

        secret.write_text("ingestd:pw-for-tests\n")
        os.kill(daemon.pid, signal.SIGHUP)
        wait_until(lambda: in_state(tmp_path, uid, "delivered"), 60, message="delivered")
        assert daemon.terminate() == 0
    assert end_state(tmp_path / "state", xnat) == {"in XNAT": 2}
    assert server_state(tmp_path).get("paused") is False


def test_retry_now_pushes_a_study_waiting_an_hour_and_a_server_paused_for_an_hour(
    tmp_path: Path, xnat: FakeXnat
) -> None:
    """XNAT answers one import 503: the next attempt is due in about an hour; `ingestd retry --now` delivers it at
    once. Then the password goes wrong: the server pauses for an hour; fixed, `retry --now` (no SIGHUP) resumes it."""
    secret = tmp_path / "xnat.credentials"
    secret.write_text("ingestd:pw-for-tests\n")
    secret.chmod(0o600)
    hour = (
        "      retry: {initial_seconds: 3600, max_seconds: 3600}\n"
        "      login_pause: {initial_seconds: 3600, max_seconds: 3600}\n"
    )
    config = daemon_config(tmp_path, xnat, credentials=f"{{file: {secret}}}", server=hour)
    xnat.fail_next("POST", "/data/services/import", status=503, html=False, body="maintenance")
    first, second = make_study(series=1, per_series=2), make_study(series=1, per_series=1)
    first_uid, second_uid = str(first[0].StudyInstanceUID), str(second[0].StudyInstanceUID)
    for ds in second:
        ds.PatientID = "OTHER"
    journal = tmp_path / "state" / "journal.sqlite"
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        drop(tmp_path, first, "first")
        wait_until(lambda: journal_rows(journal, "SELECT 1 FROM deliveries WHERE attempts = 1"), 60, message="a 503")
        ((due,),) = journal_rows(journal, "SELECT next_attempt_at FROM deliveries")
        assert due - time.time() > 600  # half an hour at the least (jitter)
        said = retry(config, "--now")
        assert "its next delivery attempt was due in" in said and "due now" in said, said
        wait_until(lambda: in_state(tmp_path, first_uid, "delivered"), 60, message="delivered at once")

        secret.write_text("ingestd:not-the-password\n")
        os.kill(daemon.pid, signal.SIGHUP)  # every client logs out: the next login reads the wrong password
        daemon.wait_logged("daemon.reload")
        drop(tmp_path, second, "second")
        wait_until(lambda: server_state(tmp_path).get("paused"), 60, message="the server paused")
        assert float(str(server_state(tmp_path)["probe_at"])) - time.time() > 600
        secret.write_text("ingestd:pw-for-tests\n")
        assert in_state(tmp_path, second_uid, "routed"), batches(tmp_path)
        said = retry(config, "--now")
        assert "XNAT server main is paused after 1 refused logins" in said, said
        wait_until(lambda: in_state(tmp_path, second_uid, "delivered"), 60, message="resumed at once")
        assert daemon.terminate() == 0
    assert end_state(tmp_path / "state", xnat) == {"in XNAT": 3}


# -- in one process: the sent-already case, --keep-route, and the journal's part -----------------------------------


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    set_secrets(monkeypatch)


def _config(lab: Lab) -> str:
    config = lab.state.parent / "retry.yaml"
    config.write_text(f"state_dir: {lab.state}\nrules: [{lab.rules_file}]\n")
    return str(config)


def _held_after_import(lab: Lab, xnat: FakeXnat) -> int:
    """A batch held after XNAT answered its import (a 400 on the first look at its prearchive session)."""
    xnat.fail_next("GET", "/data/prearchive/projects/PROJ/", status=400, html=False, body="bad request")
    lab.receive(study(series=1, per_series=2))
    lab.deliver()
    batch, delivery = lab.batch_and_delivery()
    assert batch.state == StudyState.HELD and delivery.prearchive_url, (batch, delivery)
    return batch.id


def test_a_study_xnat_may_hold_part_of_keeps_its_route_and_retry_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with lab_xnat() as xnat:
        lab = Lab(tmp_path, xnat)
        batch_id = _held_after_import(lab, xnat)
        route = lab.journal.route(batch_id)
        url = str(lab.delivery().prearchive_url)
        assert main(["retry", "--config", _config(lab), str(batch_id)]) == 0
        said = capsys.readouterr().out
        assert f"kept its route by rule 'research' (rule set {route.rules_version if route else ''})" in said, said
        assert f"prearchive session /data{url}." in said and "delete that prearchive session in XNAT" in said, said
        assert f"then run `ingestd retry --reroute-sent {batch_id}`" in said, said
        assert lab.journal.route(batch_id) == route  # the same route, decided when it was
        lab.deliver()
        assert lab.states() == [StudyState.DELIVERED]
        assert end_state(lab.state, xnat) == {"in XNAT": 2} and lab.imports() == 1


def test_reroute_sent_reroutes_a_study_xnat_may_hold_part_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with lab_xnat() as xnat:
        lab = Lab(tmp_path, xnat)
        batch_id = _held_after_import(lab, xnat)
        assert sent_evidence(lab.journal, batch_id) is not None
        assert main(["retry", "--config", _config(lab), "--reroute-sent", str(batch_id)]) == 0
        assert "re-routed with rule set" in capsys.readouterr().out
        assert lab.journal.batch_state(batch_id) == StudyState.COMPLETE
        assert lab.journal.route(batch_id) is None and lab.journal.delivery(batch_id) is None


def test_keep_route_keeps_the_route_whatever_the_rules_say_now(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Held for a project XNAT lacks; XNAT gets the project; the rules meanwhile name another: `--keep-route`
    delivers where it was routed. Without it, the rules on disk decide (the daemon tests above)."""
    with lab_xnat() as xnat:
        lab = Lab(tmp_path, xnat, project="LATER")
        lab.receive(study(series=1, per_series=2))
        lab.deliver()
        (batch, _), route = lab.batch(), lab.journal.routes()[1]
        assert batch.hold_code == "xnat-refused"
        xnat.add_project("LATER", members=["ingestd"])
        lab.rules_file.write_text(lab.rules_file.read_text().replace("project: LATER", "project: PROJ"))
        assert main(["retry", "--config", _config(lab), "--keep-route", str(batch.id)]) == 0
        assert "kept its route by rule 'research'" in capsys.readouterr().out
        assert lab.journal.route(batch.id) == route
        lab.deliver()
        assert lab.states() == [StudyState.DELIVERED]
        assert end_state(lab.state, xnat, "LATER") == {"in XNAT": 2} and not xnat.experiments("PROJ")


def _route_rows(journal: Journal, batch_id: int) -> dict[str, int]:
    with journal.transaction() as db:
        return {
            table: int(db.execute(f"SELECT count(*) FROM {table} WHERE batch_id = ?", (batch_id,)).fetchone()[0])  # noqa: S608
            for table in ("routes", "outgoing", "dropped_series", "deliveries")
        }


def test_reroute_drops_exactly_the_route_rows_and_files(tmp_path: Path) -> None:
    """Two batches held at the pre-flight; one is re-routed: its route rows, outbox folder and zip go, the other's
    and every spooled original stay; routed again with the fixed rules, it is delivered by SOP Instance UID."""
    with lab_xnat() as xnat:
        lab = Lab(tmp_path, xnat, project="NOSUCH")
        lab.receive(study(series=2, per_series=2))
        other = study(series=1, per_series=1)
        for ds in other:
            ds.PatientID = "OTHER"
        lab.receive(other)
        lab.deliver()
        assert lab.states() == [StudyState.HELD, StudyState.HELD]
        first, second = sorted(b.id for b in lab.journal.batches())
        before = {batch_id: _route_rows(lab.journal, batch_id) for batch_id in (first, second)}
        assert before[first] == {"routes": 1, "outgoing": 4, "dropped_series": 0, "deliveries": 1}
        outbox, package = lab.state / "outbox" / str(first), lab.state / "packages" / f"{first}.zip"
        assert outbox.is_dir() and package.is_file() and sent_evidence(lab.journal, first) is None
        spooled = sorted(p for p in (lab.state / "spool").rglob("*") if p.is_file())

        done = retry_held(lab.journal, lab.state, first, time.time())
        assert done.outcome == RetryOutcome.REROUTED and done.old_route is not None
        assert _route_rows(lab.journal, first) == dict.fromkeys(before[first], 0)
        assert _route_rows(lab.journal, second) == before[second]
        assert not outbox.exists() and not package.exists() and (lab.state / "outbox" / str(second)).is_dir()
        assert sorted(p for p in (lab.state / "spool").rglob("*") if p.is_file()) == spooled
        batch = next(b for b in lab.journal.batches() if b.id == first)
        assert (batch.state, batch.hold_code, batch.reason, batch.failures) == (StudyState.COMPLETE, None, None, 0)
        assert retry_held(lab.journal, lab.state, first, time.time()).outcome == RetryOutcome.NOT_HELD

        lab.rules_file.write_text(lab.rules_file.read_text().replace("project: NOSUCH", "project: PROJ"))
        lab.restart()
        lab.router.check()
        lab.deliver()
        assert [b.state for b in sorted(lab.journal.batches(), key=lambda b: b.id)] == ["delivered", "held"]
        archived, _ = xnat_holdings(xnat, "PROJ")
        assert sorted(archived) == sorted(item.sop_uid for item in lab.journal.outgoing(first))


def test_a_crash_between_the_files_and_the_journal_is_recovered_by_the_next_retry(tmp_path: Path) -> None:
    """The files go first, while the batch is held; a crash before the journal's transaction leaves it held with
    its route and without its outgoing files: `--keep-route` says so, and a plain retry re-routes and delivers."""
    with lab_xnat() as xnat:
        lab = Lab(tmp_path, xnat, project="NOSUCH")
        lab.receive(study(series=1, per_series=2))
        lab.deliver()
        (batch, _) = lab.batch()
        shutil.rmtree(lab.state / "outbox" / str(batch.id))  # what the retry removed before it was killed
        (lab.state / "packages" / f"{batch.id}.zip").unlink()
        assert lab.journal.batch_state(batch.id) == StudyState.HELD and lab.journal.route(batch.id) is not None
        kept = retry_held(lab.journal, lab.state, batch.id, time.time(), keep_route=True)
        assert kept.outcome == RetryOutcome.KEPT_ROUTE and kept.missing_files == 2
        lab.deliver()  # the package step cannot find the files: held again (deliver-failed)
        assert lab.journal.batch_state(batch.id) == StudyState.HELD
        lab.rules_file.write_text(lab.rules_file.read_text().replace("project: NOSUCH", "project: PROJ"))
        lab.restart()
        assert retry_held(lab.journal, lab.state, batch.id, time.time()).outcome == RetryOutcome.REROUTED
        lab.router.check()
        lab.deliver()
        assert lab.states() == [StudyState.DELIVERED]
        assert end_state(lab.state, xnat) == {"in XNAT": 2}


def test_sent_evidence_push_now_and_the_daemons_rules_record(tmp_path: Path) -> None:
    with lab_xnat() as xnat:
        lab = Lab(tmp_path, xnat, project="NOSUCH")
        lab.receive(study(series=1, per_series=1))
        lab.deliver()
        batch_id = lab.batch()[0].id
        assert sent_evidence(lab.journal, batch_id) is None  # held at the pre-flight: nothing sent
        for fields in ({"prearchive_url": "/prearchive/projects/P/1/S"}, {"answered": 1}, {"shortfalls": 1}):
            lab.journal.update_delivery(batch_id, **fields)
            evidence = sent_evidence(lab.journal, batch_id)
            assert evidence is not None and "preflight" in evidence.describe()
            lab.journal.update_delivery(batch_id, prearchive_url=None, answered=0, shortfalls=0)
        lab.journal.update_delivery(batch_id, step="import")
        assert sent_evidence(lab.journal, batch_id) is not None  # a resend's import is reached after sending

        now = time.time()
        assert lab.journal.retry_batch(batch_id, now) == StudyState.ROUTED
        lab.journal.update_delivery(batch_id, next_attempt_at=now + 3600)
        assert lab.journal.record_failure(batch_id, StudyState.ROUTED, now + 600) == 1
        pushed = push_now(lab.journal, None, now)
        assert [(p.batch_id, p.waited, round(p.seconds_left)) for p in pushed] == [
            (batch_id, "delivery", 3600),
            (batch_id, "stage", 600),
        ]
        delivery = lab.journal.delivery(batch_id)
        assert delivery is not None and delivery.next_attempt_at == now
        assert lab.journal.batches()[0].retry_at == 0 and push_now(lab.journal, [batch_id], now) == []

        assert daemon_rules(lab.journal) is None
        first = record_daemon_rules(lab.journal, 123, "started", "v1")
        second = record_daemon_rules(lab.journal, 123, "refused", "v1", ["rules.yaml: bad"])
        assert (first.generation, second.generation) == (1, 2)
        assert daemon_rules(lab.journal) == second


def test_a_reload_logs_every_client_out_and_unreadable_credentials_are_a_refused_login(tmp_path: Path) -> None:
    with lab_xnat() as xnat:
        lab = Lab(tmp_path, xnat)
        servers = XnatServers(lab.journal, lab.config.xnat.servers, lambda: None)
        settings = lab.config.xnat.servers["main"]
        client = servers.client("main", settings)
        client.login()
        servers.reconfigure(lab.config.xnat.servers)  # the same settings: the credentials may have changed
        assert servers.client("main", settings) is not client
    folder = tmp_path / "credentials"
    folder.mkdir(mode=0o700)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\xff\xfe\n")
    garbage.chmod(0o600)
    for path, words in ((folder, "cannot read the credentials file"), (garbage, "is not text")):
        with pytest.raises(XnatLoginError, match=words):
            load_credentials(Credentials(file=path), "http://127.0.0.1")
    assert PASSWORD  # the lab's password, used by the stand-in above


def test_rules_that_do_not_load_change_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`retry` loads the rules as the daemon would: if they do not load, it prints why and leaves every study as
    it was. Asking for nothing, or `--all` without `--now`, is refused with what to type instead."""
    with lab_xnat() as xnat:
        lab = Lab(tmp_path, xnat, project="NOSUCH")
        lab.receive(study(series=1, per_series=1))
        lab.deliver()
        (batch, _), route = lab.batch(), lab.journal.routes()[1]
        config = _config(lab)
        lab.rules_file.write_text(lab.rules_file.read_text().replace("when:", "wehn:"))
        assert main(["retry", "--config", config, "--held"]) == 2
        assert "wehn" in capsys.readouterr().err
        assert lab.journal.batch_state(batch.id) == StudyState.HELD and lab.journal.route(batch.id) == route
        assert main(["retry", "--config", config]) == 1
        assert "name a study" in capsys.readouterr().err
        assert main(["retry", "--config", config, "--all"]) == 1
        assert "--all is for --now" in capsys.readouterr().err
        lab.rules_file.write_text(lab.rules_file.read_text().replace("wehn:", "when:"))
        assert main(["retry", "--config", config, "--now", "#99"]) == 1
        assert "no waiting or held study matches #99" in capsys.readouterr().err


def test_retry_refuses_while_an_import_holds_the_state_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another ingestd that is not a daemon (an `ingestd import`) holds the lock: it would not take up a SIGHUP (and
    might end on one), so `retry` signals nothing and changes nothing."""
    import fcntl  # noqa: PLC0415

    with lab_xnat() as xnat:
        lab = Lab(tmp_path, xnat, project="NOSUCH")
        lab.receive(study(series=1, per_series=1))
        lab.deliver()
        route = lab.journal.routes()[1]
        with (lab.state / "ingestd.lock").open("a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.write(f"{os.getpid()}\n")
            lock.flush()
            assert main(["retry", "--config", _config(lab), "--held"]) == 1
        assert "is not a daemon" in capsys.readouterr().err
        assert lab.journal.batch_state(1) == StudyState.HELD and lab.journal.route(1) == route
