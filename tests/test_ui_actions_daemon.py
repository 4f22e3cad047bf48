"""Retry pressed on the web page of a real daemon (`ingestd run`) with the XNAT stand-in: a study held because its
rule names a project XNAT lacks; the admin fixes the rules file and presses Retry; the daemon reloads its rules
(it signals itself, as `ingestd retry` signals it) and the study is routed again and archived in the right project.
"""

from __future__ import annotations

import time
from pathlib import Path

import requests

from ingestd.testing.xnat import FakeXnat
from tests.dicom import make_study
from tests.procs import DaemonProcess, wait_until
from tests.test_retry import daemon_config, drop, in_state, rules
from tests.test_ui_actions import _forms

TOKEN = "daemon-token-0123456789abcdef"


def test_retry_on_the_page_delivers_a_fixed_study(tmp_path: Path, xnat: FakeXnat) -> None:
    config = daemon_config(tmp_path, xnat)
    token_file = tmp_path / "ui.token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    text = config.read_text(encoding="utf-8")
    config.write_text(
        text.replace("metrics: {enabled: false}\n", f"metrics: {{port: 0}}\nui: {{token_file: {token_file}}}\n"),
        encoding="utf-8",
    )
    (tmp_path / "lab.rules.yaml").write_text(rules(project="WRONG"))
    mr = make_study(series=1, per_series=2)
    uid = str(mr[0].StudyInstanceUID)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        base = f"http://127.0.0.1:{int(daemon.wait_logged('metrics.started')['port'])}"
        drop(tmp_path, mr, "mr")
        batch_id, _, code, _reason = wait_until(lambda: in_state(tmp_path, uid, "held"), 60, message="held")
        assert code == "xnat-refused"
        (tmp_path / "lab.rules.yaml").write_text(rules(project="PROJ"))

        session = requests.Session()
        assert session.post(f"{base}/ui/login", data={"token": TOKEN}, timeout=10).status_code == 200
        page = session.get(f"{base}/ui/studies/{batch_id}", timeout=10).text
        assert "xnat-refused" in page and "What to do" in page
        forms = _forms(page)
        path = f"/ui/studies/{batch_id}/retry"
        started = time.monotonic()
        answer = session.post(f"{base}{path}", data={"csrf": forms[path]}, allow_redirects=False, timeout=30)
        assert answer.status_code == 303
        assert time.monotonic() - started < 10  # the HTTP thread does not wait out the reload

        def said() -> str | None:
            shown = session.get(f"{base}/ui/studies/{batch_id}", timeout=10).text
            return shown if "re-routed with rule set" in shown else None

        shown = wait_until(said, 60, interval=0.3, message="the retry's outcome on the page")
        assert "reloaded its configuration, rules and credentials" in shown
        wait_until(lambda: in_state(tmp_path, uid, "delivered"), 60, message="delivered")
        assert daemon.terminate() == 0
    log = (tmp_path / "daemon.log").read_text(encoding="utf-8")
    assert '"event": "ui.action"' in log and '"event": "daemon.reload"' in log
    assert TOKEN not in log and uid not in log


def test_the_page_acts_with_the_rules_files_a_reload_named(tmp_path: Path, xnat: FakeXnat) -> None:
    """The page reads the configuration a reload applied, not the one the daemon started with: a reload that names
    other rules files (`rules:` in ingestd.yaml) and another XNAT server; Retry routes with the new files, and the
    overview lists the new server."""
    config = daemon_config(tmp_path, xnat)
    token_file = tmp_path / "ui.token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    metrics = f"metrics: {{host: 127.0.0.1, port: 0}}\nui: {{token_file: {token_file}}}\n"
    config.write_text(config.read_text().replace("metrics: {enabled: false}\n", metrics), encoding="utf-8")
    (tmp_path / "lab.rules.yaml").write_text(rules(project="WRONG"))
    mr = make_study(series=1, per_series=2)
    uid = str(mr[0].StudyInstanceUID)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        base = f"http://127.0.0.1:{int(daemon.wait_logged('metrics.started')['port'])}"
        drop(tmp_path, mr, "mr")
        batch_id, _, code, _reason = wait_until(lambda: in_state(tmp_path, uid, "held"), 60, message="held")
        assert code == "xnat-refused"
        # The admin writes the fixed rules into a new file and names it instead; the old file stays wrong.
        (tmp_path / "fixed.rules.yaml").write_text(rules(project="PROJ"))
        text = config.read_text().replace("rules: [lab.rules.yaml]", "rules: [fixed.rules.yaml]")
        credentials = "{env_username: XNAT_TEST_USER, env_password: XNAT_TEST_PASSWORD}"
        backup = f"    backup:\n      url: {xnat.url}/backup\n      credentials: {credentials}\n"
        config.write_text(text.replace("  servers:\n", "  servers:\n" + backup))

        session = requests.Session()
        assert session.post(f"{base}/ui/login", data={"token": TOKEN}, timeout=10).status_code == 200
        page = session.get(f"{base}/ui/studies/{batch_id}", timeout=10).text
        path = f"/ui/studies/{batch_id}/retry"
        answer = session.post(f"{base}{path}", data={"csrf": _forms(page)[path]}, allow_redirects=False, timeout=30)
        assert answer.status_code == 303
        wait_until(lambda: in_state(tmp_path, uid, "delivered"), 60, message=f"delivered\n{daemon.log_tail()}")
        assert [experiment.project for experiment in xnat.experiments("PROJ")] == ["PROJ"]
        assert f"{xnat.url}/backup" in session.get(f"{base}/ui/", timeout=10).text  # reloaded by the retry
        assert daemon.terminate() == 0
