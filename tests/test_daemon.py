"""`ingestd run` as a real process: listener, receiver processes, drop folder, assembler, status, stop."""

from __future__ import annotations

import socket
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import MRImageStorage
from pynetdicom import AE

from ingestd.testing.xnat import FakeXnat
from tests.dicom import make_study, write_instances
from tests.procs import (
    SCANNER_RULES,
    DaemonProcess,
    Storescu,
    free_port,
    ingestd_status,
    process_group,
    run_ingestd,
    wait_until,
    write_daemon_config,
    write_xnat_daemon_config,
)

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.slow]


def _first_study(config: Path) -> dict[str, Any]:
    """The first study `ingestd status --json` lists."""
    studies = ingestd_status(config)["studies"]
    assert isinstance(studies, list) and studies
    first: dict[str, Any] = studies[0]
    return first


def test_daemon_end_to_end(tmp_path: Path) -> None:
    """Scanner and drop folder feed one daemon; studies complete when quiet; SIGTERM stops everything."""
    drop = tmp_path / "drop"
    drop.mkdir()
    port = free_port()
    config = write_daemon_config(
        tmp_path / "ingestd.yaml",
        tmp_path / "state",
        port,
        processes=2,
        extra=(f"drop_folders: [{{path: {drop}, settle_seconds: 0.3}}]\n"),
    )
    config.write_text(config.read_text().replace("study_idle_seconds: 3600", "study_idle_seconds: 2"))
    scanned = make_study(series=2, per_series=15)
    dropped = make_study(series=1, per_series=5)
    files = write_instances(scanned, tmp_path / "scan")
    staging = write_instances(dropped, tmp_path / "staging")
    with zipfile.ZipFile(tmp_path / "upload.zip", "w") as archive:
        for path in staging:
            archive.write(path, f"study/{path.name}")
    (drop / "notes.txt").write_text("not an image")

    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        receivers = daemon.wait_logged("receive.receiver_process")
        assert receivers["state"] == "started"
        (tmp_path / "upload.zip").rename(drop / "upload.zip")
        with Storescu(port, files) as storescu:
            assert storescu.wait() == 0, storescu.output()

        def both_complete() -> list[dict[str, object]] | None:
            studies = ingestd_status(config)["studies"]
            assert isinstance(studies, list)
            states = {s["study"]: s for s in studies}
            done = all(
                states.get(ds.StudyInstanceUID, {}).get("state") == "complete" for ds in (scanned[0], dropped[0])
            )
            return studies if done else None

        studies = wait_until(both_complete, 60, interval=0.3, message="both studies to complete")
        by_uid = {s["study"]: s for s in studies}
        assert by_uid[scanned[0].StudyInstanceUID]["instances"] == 30
        assert by_uid[scanned[0].StudyInstanceUID]["series"] == 2
        assert by_uid[scanned[0].StudyInstanceUID]["source"] == "STORESCU"
        assert by_uid[dropped[0].StudyInstanceUID]["instances"] == 5
        assert by_uid[dropped[0].StudyInstanceUID]["source_kind"] == "folder"
        quarantine = ingestd_status(config)["quarantine"]
        assert isinstance(quarantine, list) and len(quarantine) == 1
        assert "not a DICOM file" in quarantine[0]["reason"]
        assert not (drop / "upload.zip").exists()

        text = run_ingestd("status", "--config", str(config), check=True).stdout
        assert "2 studies (batches)" in text
        assert "1 quarantined item" in text
        assert "not a DICOM file" in text

        assert daemon.terminate() == 0
        assert not process_group(daemon.pid)
        assert daemon.logged("daemon.stopped")


def test_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    """Two daemons never share a spool: the second exits with a clear message."""
    port = free_port()
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port)
    with DaemonProcess(config, tmp_path / "first.log") as first:
        first.wait_ready(port)
        second = run_ingestd("run", "--config", str(config))
        assert second.returncode == 1
        assert "another ingestd is already running" in second.stderr
        assert first.terminate() == 0


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """A taken port ends the daemon with a message naming the port, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port)
        result = run_ingestd("run", "--config", str(config))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_concurrent_associations_spread_over_receiver_processes(tmp_path: Path) -> None:
    """With two processes, a second association opened while the first is busy goes to the other process."""
    port = free_port()
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port, processes=2)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        daemon.wait_logged("receive.receiver_process")
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage)
        first = ae.associate("127.0.0.1", port, ae_title="INGESTD")
        wait_until(lambda: len(daemon.logged("receive.association_accepted")) >= 1, 10, message="the first association")
        second = ae.associate("127.0.0.1", port, ae_title="INGESTD")
        assert first.is_established and second.is_established
        for assoc in (first, second):
            assert assoc.send_c_store(make_study(1, 1)[0]).Status == 0
            assoc.release()
        established = daemon.logged("receive.association_accepted")
        assert len({record["pid"] for record in established}) == 2
        assert daemon.terminate() == 0


def test_daemon_routes_and_deidentifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete study is routed by the rules file the configuration names and de-identified into the outbox;
    neither the log nor `ingestd status` shows the planted patient data."""
    monkeypatch.setenv("INGESTD_TEST_KEY", "t" * 40)
    rules = tmp_path / "lab.rules.yaml"
    rules.write_text(
        "profiles:\n"
        "  research: {key: {env: INGESTD_TEST_KEY}, options: [clean-descriptors]}\n"
        "rules:\n"
        "  - name: scanner\n"
        "    when: {calling_aet: STORESCU}\n"
        "    route: {server: main, project: PROJ, subject: '{PatientID:hash8}', session: '{subject}_MR'}\n"
        "    anonymize: research\n"
    )
    port = free_port()
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port, extra="rules: [lab.rules.yaml]\n")
    config.write_text(config.read_text().replace("study_idle_seconds: 3600", "study_idle_seconds: 1"))
    study = make_study(series=2, per_series=3)
    for ds in study:
        ds.PatientName = "Canaryname^Planted"
        ds.PatientID = "CANARYID42"
        ds.SeriesDescription = "T2 CANARYID42"
    files = write_instances(study, tmp_path / "scan")

    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        with Storescu(port, files) as storescu:
            assert storescu.wait() == 0, storescu.output()

        def routed() -> dict[str, object] | None:
            studies = ingestd_status(config)["studies"]
            assert isinstance(studies, list)
            return studies[0] if studies and studies[0]["state"] == "routed" else None

        entry = wait_until(routed, 60, interval=0.3, message="the study to be routed")
        route = entry["route"]
        assert isinstance(route, dict)
        assert (route["rule"], route["project"], route["profile"]) == ("scanner", "PROJ", "research")
        assert str(entry["study"]).startswith("2.25.")
        outbox = sorted((tmp_path / "state" / "outbox").rglob("*.dcm"))
        assert len(outbox) == 6
        for path in outbox:
            assert b"CANARY" not in path.read_bytes()
        text = run_ingestd("status", "--config", str(config), check=True).stdout
        row = next(line for line in text.splitlines() if " routed " in line)
        assert "scanner" in row and "PROJ/" in text  # the rule on the batch's row, the labels on it or under it
        assert study[0].StudyInstanceUID not in text
        assert daemon.terminate() == 0
    log = (tmp_path / "daemon.log").read_text()
    assert "CANARY" not in log and "Canaryname" not in log
    assert not any(uid in log for ds in study for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))


def _xnat_config(tmp_path: Path, port: int, url: str, *, archive: bool = True) -> Path:
    return write_xnat_daemon_config(
        tmp_path, port, url, rules=SCANNER_RULES.replace("archive: true", f"archive: {str(archive).lower()}")
    )


def _numbered_study() -> list[Any]:
    study = make_study(series=2, per_series=3)
    for ds in study:
        ds.SeriesNumber = 1 if ds.SeriesInstanceUID == study[0].SeriesInstanceUID else 2
    return study


def _delivery_step(config: Path) -> str | None:
    studies = ingestd_status(config)["studies"]
    assert isinstance(studies, list)
    if not studies or studies[0]["delivery"] is None:
        return None
    return str(studies[0]["delivery"]["step"])


def test_daemon_delivers_to_xnat(tmp_path: Path, xnat: FakeXnat) -> None:
    """storescu -> spool -> complete -> routed and de-identified -> zip -> XNAT import -> archive -> verified."""
    port = free_port()
    config = _xnat_config(tmp_path, port, xnat.url)
    files = write_instances(_numbered_study(), tmp_path / "scan")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        with Storescu(port, files) as storescu:
            assert storescu.wait() == 0, storescu.output()
        wait_until(lambda: _first_study(config)["state"] == "delivered", 60, interval=0.3)
        assert daemon.terminate() == 0
    (experiment,) = xnat.experiments("PROJ")
    assert len(experiment.scans) == 2 and sum(len(s.files) for s in experiment.scans.values()) == 6
    assert "pw-for-tests" not in (tmp_path / "daemon.log").read_text()


def test_rule_without_archive_leaves_a_ready_prearchive_session(tmp_path: Path, xnat: FakeXnat) -> None:
    port = free_port()
    config = _xnat_config(tmp_path, port, xnat.url, archive=False)
    files = write_instances(_numbered_study(), tmp_path / "scan")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        with Storescu(port, files) as storescu:
            assert storescu.wait() == 0, storescu.output()
        wait_until(lambda: _first_study(config)["state"] == "delivered", 60, interval=0.3)
        assert daemon.terminate() == 0
    (row,) = xnat.prearchive_rows("PROJ")
    assert row["status"] == "READY" and not xnat.experiments("PROJ")


def _kill9_then_deliver(
    tmp_path: Path, config: Path, port: int, dying_moment: Callable[[], object]
) -> list[dict[str, Any]]:
    """Send a study, kill -9 the daemon once `dying_moment()` holds, restart it, wait until the study is delivered.

    Returns the `deliver.verified` log records of the restarted daemon (what it found XNAT holds, each look).
    """
    files = write_instances(_numbered_study(), tmp_path / "scan")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        with Storescu(port, files) as storescu:
            assert storescu.wait() == 0, storescu.output()
        wait_until(dying_moment, 60, interval=0.2, message="the moment to kill the daemon")
        assert daemon.kill9() == -9
        daemon.start()
        daemon.wait_ready(port)
        wait_until(lambda: _first_study(config)["state"] == "delivered", 60, interval=0.3)
        records = daemon.logged("deliver.verified")
        assert daemon.terminate() == 0
    return records


def test_kill9_during_import_delivers_exactly_once(tmp_path: Path, xnat: FakeXnat) -> None:
    """The daemon dies while XNAT is still answering an import it has already stored: after the restart it looks,
    finds every instance in the prearchive session by identity, and never imports a second time."""
    port = free_port()
    config = _xnat_config(tmp_path, port, xnat.url)
    xnat.fail_next("POST", "/data/services/import", status=504, after_processing=True, delay=30)
    records = _kill9_then_deliver(
        tmp_path, config, port, lambda: xnat.prearchive_rows("PROJ") and _delivery_step(config) == "importing"
    )
    assert records and (records[0]["in_prearchive"], records[0]["missing"]) == (6, 0)
    # The only import is the one the first daemon died waiting for (the stand-in logs a request when it has
    # answered it, and that answer never reached anyone): the restarted daemon imported nothing.
    imports = [path for method, path, _ in xnat.requests_log if method == "POST" and "services/import" in path]
    assert imports == []
    assert len(xnat.experiments("PROJ")) == 1 and not xnat.prearchive_rows()


def test_kill9_during_archive_delivers_exactly_once(tmp_path: Path, xnat: FakeXnat) -> None:
    """XNAT has archived the session but the daemon dies before hearing so: the restart finds the experiment."""
    port = free_port()
    config = _xnat_config(tmp_path, port, xnat.url)
    xnat.fail_next("POST", "/data/services/archive", status=504, after_processing=True, delay=30)
    _kill9_then_deliver(
        tmp_path, config, port, lambda: xnat.experiments("PROJ") and _delivery_step(config) == "archiving"
    )
    archives = [path for method, path, _ in xnat.requests_log if method == "POST" and "services/archive" in path]
    assert archives == []  # the one archive request never got its answer; none was sent after the restart
    assert len(xnat.experiments("PROJ")) == 1


def test_kill9_during_the_build_wait_on_older_xnat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """XNAT 1.8.9 leaves the session RECEIVING; the daemon dies while waiting, resumes, asks for the build."""
    monkeypatch.setenv("INGESTD_TEST_KEY", "t" * 40)
    monkeypatch.setenv("XNAT_TEST_USER", "ingestd")
    monkeypatch.setenv("XNAT_TEST_PASSWORD", "pw-for-tests")
    with FakeXnat(version="1.8.9", idle_build_seconds=3600, rebuild_repeat_seconds=3600) as old:
        old.add_user("ingestd", "pw-for-tests")
        old.add_project("PROJ", members=["ingestd"])
        port = free_port()
        config = _xnat_config(tmp_path, port, old.url)
        config.write_text(
            config.read_text().replace(
                "      poll_interval_seconds: 0.2\n", "      poll_interval_seconds: 0.2\n      build_wait_seconds: 3\n"
            )
        )
        _kill9_then_deliver(tmp_path, config, port, lambda: _delivery_step(config) == "wait")
        imports = [p for m, p, _ in old.requests_log if m == "POST" and "services/import" in p]
        assert len(imports) == 1
        assert any("action=build" in p for m, p, _ in old.requests_log if m == "POST")
        assert len(old.experiments("PROJ")) == 1 and not old.prearchive_rows()


def test_late_series_reach_the_same_experiment(tmp_path: Path, xnat: FakeXnat) -> None:
    """A series sent after the study was delivered opens a second batch, appended to the same XNAT session."""
    port = free_port()
    config = _xnat_config(tmp_path, port, xnat.url)
    study = _numbered_study()
    late = make_study(series=1, per_series=2)
    for ds in late:
        ds.StudyInstanceUID = study[0].StudyInstanceUID
        ds.SeriesNumber = 3
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        for batch, files in enumerate((study, late), start=1):
            paths = write_instances(files, tmp_path / f"scan{batch}")
            with Storescu(port, paths) as storescu:
                assert storescu.wait() == 0, storescu.output()

            def delivered(count: int = batch) -> bool:
                studies = ingestd_status(config)["studies"]
                assert isinstance(studies, list)
                return len(studies) == count and all(s["state"] == "delivered" for s in studies)

            wait_until(delivered, 60, interval=0.3, message=f"batch {batch} to be delivered")
        assert daemon.terminate() == 0
    (experiment,) = xnat.experiments("PROJ")
    assert len(experiment.scans) == 3 and sum(len(s.files) for s in experiment.scans.values()) == 8


def test_sighup_reloads_rules_and_keeps_them_when_invalid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study no rule matches is held; the rules are fixed and SIGHUP'd in; retry routes it. A broken rules
    file on the next SIGHUP is refused with its errors, and the rules in force stay."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    monkeypatch.setenv("INGESTD_TEST_KEY", "h" * 40)
    rules = tmp_path / "lab.rules.yaml"
    rule = (
        "profiles:\n  research: {key: {env: INGESTD_TEST_KEY}}\n"
        "rules:\n  - name: scanner\n    when: {calling_aet: CALLER}\n"
        "    route: {server: main, project: PROJ, subject: '{PatientID:hash8}', session: '{subject}_MR'}\n"
        "    anonymize: research\n"
    )
    rules.write_text(rule.replace("CALLER", "SOMEONE_ELSE"))
    port = free_port()
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port, extra="rules: [lab.rules.yaml]\n")
    config.write_text(config.read_text().replace("study_idle_seconds: 3600", "study_idle_seconds: 1"))
    files = write_instances(make_study(series=1, per_series=2), tmp_path / "scan")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        with Storescu(port, files) as storescu:
            assert storescu.wait() == 0, storescu.output()
        wait_until(lambda: _first_study(config)["state"] == "held", 30, interval=0.3)
        health = ingestd_status(config)["health"]
        assert isinstance(health, dict) and health["running"] is True
        assert health["held_by_reason"] == {"unrouted": 1} and health["last_heartbeat_seconds_ago"] is not None
        assert "daemon running, last heartbeat" in run_ingestd("status", "--config", str(config), check=True).stdout

        rules.write_text(rule.replace("CALLER", "STORESCU"))
        os.kill(daemon.pid, signal.SIGHUP)
        applied = wait_until(lambda: [r for r in daemon.logged("daemon.reload") if r["outcome"] == "applied"], 20)
        assert applied[0]["needs_restart"] is None
        assert run_ingestd("retry", "--config", str(config), "--held").returncode == 0
        wait_until(lambda: _first_study(config)["state"] == "routed", 30, interval=0.3)

        rules.write_text(rule.replace("when: {calling_aet: CALLER}", "when: {Modalty: MR}"))
        os.kill(daemon.pid, signal.SIGHUP)
        refused = wait_until(lambda: [r for r in daemon.logged("daemon.reload") if r["outcome"] == "refused"], 20)
        assert any("did you mean 'Modality'" in problem for problem in refused[0]["problems"])
        # What check-config calls an error refuses a reload as it refuses a start: here a key given twice.
        config.write_text(config.read_text() + "study_idle_seconds: 5\n")
        os.kill(daemon.pid, signal.SIGHUP)
        refused = wait_until(lambda: [r for r in daemon.logged("daemon.reload") if r["outcome"] == "refused"][1:], 20)
        assert any("study_idle_seconds: given twice" in problem for problem in refused[0]["problems"]), refused
        route = _first_study(config)["route"]
        assert isinstance(route, dict) and route["rule"] == "scanner"
        assert daemon.terminate() == 0
    stopped = ingestd_status(config)["health"]
    assert isinstance(stopped, dict) and stopped["running"] is False
