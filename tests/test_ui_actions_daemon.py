"""Retry pressed on the web page of a real daemon (`ingestd run`) with the XNAT stand-in: a study held because its
rule names a project XNAT lacks; the admin fixes the rules file and presses Retry; the daemon reloads its rules
(it signals itself, as `ingestd retry` signals it) and the study is routed again and archived in the right project.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from ingestd.testing.xnat import FakeXnat
from tests.dicom import make_study
from tests.procs import DaemonProcess, wait_until
from tests.test_retry import daemon_config, drop, in_state, rules
from tests.test_ui_actions import _forms

TOKEN = "daemon-token-0123456789abcdef"


@dataclass
class HeldOnPage:
    """A real daemon with the page (token login), holding a dropped MR study `xnat-refused` (its rule names a project
    XNAT lacks); `session` is logged in."""

    config: Path
    daemon: DaemonProcess
    base: str
    batch_id: int
    uid: str
    session: requests.Session

    def retry_form(self) -> tuple[str, str]:
        """The study page's Retry action and its form token."""
        page = self.session.get(f"{self.base}/ui/studies/{self.batch_id}", timeout=10).text
        path = f"/ui/studies/{self.batch_id}/retry"
        return path, _forms(page)[path]


@contextmanager
def held_on_page(tmp_path: Path, xnat: FakeXnat) -> Iterator[HeldOnPage]:
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
        session = requests.Session()
        assert session.post(f"{base}/ui/login", data={"token": TOKEN}, timeout=10).status_code == 200
        yield HeldOnPage(config, daemon, base, batch_id, uid, session)
        assert daemon.terminate() == 0
    log = (tmp_path / "daemon.log").read_text(encoding="utf-8")
    assert TOKEN not in log and uid not in log


def test_retry_on_the_page_delivers_a_fixed_study(tmp_path: Path, xnat: FakeXnat) -> None:
    with held_on_page(tmp_path, xnat) as held:
        (tmp_path / "lab.rules.yaml").write_text(rules(project="PROJ"))
        page = held.session.get(f"{held.base}/ui/studies/{held.batch_id}", timeout=10).text
        assert "xnat-refused" in page and "What to do" in page
        path, csrf = held.retry_form()
        started = time.monotonic()
        answer = held.session.post(f"{held.base}{path}", data={"csrf": csrf}, allow_redirects=False, timeout=30)
        assert answer.status_code == 303
        assert time.monotonic() - started < 10  # the HTTP thread does not wait out the reload

        def said() -> str | None:
            shown = held.session.get(f"{held.base}/ui/studies/{held.batch_id}", timeout=10).text
            return shown if "re-routed with rule set" in shown else None

        shown = wait_until(said, 60, interval=0.3, message="the retry's outcome on the page")
        assert "reloaded its configuration, rules and credentials" in shown
        wait_until(lambda: in_state(tmp_path, held.uid, "delivered"), 60, message="delivered")
    log = (tmp_path / "daemon.log").read_text(encoding="utf-8")
    assert '"event": "ui.action"' in log and '"event": "daemon.reload"' in log


def test_the_page_acts_with_the_rules_files_a_reload_named(tmp_path: Path, xnat: FakeXnat) -> None:
    """The page reads the configuration a reload applied, not the one the daemon started with: a reload that names
    other rules files (`rules:` in ingestd.yaml) and another XNAT server; Retry routes with the new files, and the
    overview lists the new server."""
    with held_on_page(tmp_path, xnat) as held:
        # The admin writes the fixed rules into a new file and names it instead; the old file stays wrong.
        (tmp_path / "fixed.rules.yaml").write_text(rules(project="PROJ"))
        text = held.config.read_text().replace("rules: [lab.rules.yaml]", "rules: [fixed.rules.yaml]")
        credentials = "{env_username: XNAT_TEST_USER, env_password: XNAT_TEST_PASSWORD}"
        backup = f"    backup:\n      url: {xnat.url}/backup\n      credentials: {credentials}\n"
        held.config.write_text(text.replace("  servers:\n", "  servers:\n" + backup))
        path, csrf = held.retry_form()
        answer = held.session.post(f"{held.base}{path}", data={"csrf": csrf}, allow_redirects=False, timeout=30)
        assert answer.status_code == 303
        wait_until(
            lambda: in_state(tmp_path, held.uid, "delivered"), 60, message=f"delivered\n{held.daemon.log_tail()}"
        )
        assert [experiment.project for experiment in xnat.experiments("PROJ")] == ["PROJ"]
        assert f"{xnat.url}/backup" in held.session.get(f"{held.base}/ui/", timeout=10).text  # reloaded by the retry
