"""Rules cannot freeze the daemon, and neither can a stuck worker: real daemon processes.

The backtracking pattern of issue 13 meets its hostile value in a real daemon and the study is routed at once
while C-ECHO answers. Then a worker is made to hang on purpose (a launcher script replaces the assembler's
check before running `ingestd run`): in Python code (the wedged-worker check finds it, the daemon stops) and
holding the GIL in C code (Python's own `re` on that pattern: only the GIL-free deadline can end the process);
SIGTERM ends the process within stop_timeout_seconds either way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.dicom import make_study, write_instances
from tests.procs import DaemonProcess, Storescu, echo_ok, free_port, ingestd_status, wait_until, write_daemon_config

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.slow]

HOSTILE = "a" * 40 + "!"
RULES = """\
rules:
  - name: backtracking
    when: {SeriesDescription: {matches: "^(a+)+$"}}
    route: {server: main, project: PROJ, subject: S1, session: hostile}
  - name: everything
    when: {}
    route: {server: main, project: PROJ, subject: S2, session: other}
"""


def _healthz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


def test_a_backtracking_pattern_and_its_hostile_value_are_routed_at_once(tmp_path: Path) -> None:
    """Issue 13, observation 3: `^(a+)+$` against 40 'a's and a '!' froze the router holding the GIL. On RE2
    the study is routed (by the next rule) within the usual second, C-ECHO and /healthz answer throughout, and
    a value the pattern matches is routed by it."""
    (tmp_path / "lab.rules.yaml").write_text(RULES)
    port = free_port()
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port, extra="rules: [lab.rules.yaml]\n")
    config.write_text(config.read_text().replace("study_idle_seconds: 3600", "study_idle_seconds: 1"))
    hostile, matching = make_study(series=1, per_series=2), make_study(series=1, per_series=2)
    for ds in hostile:
        ds.SeriesDescription = HOSTILE
    for ds in matching:
        ds.SeriesDescription = "a" * 40
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        metrics = int(daemon.wait_logged("metrics.started")["port"])
        for name, study in (("hostile", hostile), ("matching", matching)):
            with Storescu(port, write_instances(study, tmp_path / name)) as storescu:
                assert storescu.wait() == 0, storescu.output()

        def routed() -> dict[str, str] | None:
            assert echo_ok(port, timeout=5), "C-ECHO went unanswered while the rules ran"
            assert _healthz(metrics)["live"] is True
            studies = ingestd_status(config)["studies"]
            if len(studies) == 2 and all(study["state"] == "routed" for study in studies):
                return {study["study"]: study["route"]["rule"] for study in studies}
            return None

        rules = wait_until(routed, 30, interval=0.3, message="both studies to be routed")
        assert rules == {hostile[0].StudyInstanceUID: "everything", matching[0].StudyInstanceUID: "backtracking"}
        assert daemon.terminate() == 0


# Replaces the assembler's check, once a trigger file exists, with a hang of the kind INGESTD_TEST_HANG says:
# "python" spins in Python code without ever calling beat(); "gil" runs Python's backtracking `re` on the
# pattern of issue 13, which holds the GIL in C for longer than anyone will wait.
LAUNCHER = """\
import os, re, sys
from pathlib import Path

from ingestd.pipeline.assemble import Assembler

trigger = Path(os.environ["INGESTD_TEST_HANG_FILE"])
kind = os.environ["INGESTD_TEST_HANG"]
original = Assembler.check


def hanging_check(self, now=None):
    if trigger.exists():
        Path(str(trigger) + ".entered").write_text(kind)
        if kind == "gil":
            re.search(r"^(a+)+$", "a" * 64 + "!")
        while True:
            pass
    return original(self, now)


Assembler.check = hanging_check

from ingestd.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
"""


class HangingDaemon(DaemonProcess):
    """`ingestd run` through the launcher above."""

    def __init__(self, config_path: Path, log_path: Path, launcher: Path) -> None:
        super().__init__(config_path, log_path)
        self.program = (str(launcher),)


def _hanging_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, settings: str
) -> tuple[HangingDaemon, int, Path]:
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    trigger = tmp_path / "hang"
    monkeypatch.setenv("INGESTD_TEST_HANG", kind)
    monkeypatch.setenv("INGESTD_TEST_HANG_FILE", str(trigger))
    port = free_port()
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port, extra=settings)
    return HangingDaemon(config, tmp_path / "daemon.log", launcher), port, trigger


def _hang(daemon: HangingDaemon, trigger: Path) -> None:
    trigger.write_text("now")
    wait_until(lambda: Path(f"{trigger}.entered").exists(), 20, message="the assembler to hang")


def _exit_within(daemon: HangingDaemon, seconds: float) -> tuple[int, float]:
    """Wait for the daemon to exit; return its status and how long that took."""
    assert daemon.process is not None
    started = time.monotonic()
    try:
        status = daemon.process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {seconds} s later:\n{daemon.log_tail()}") from None
    return status, time.monotonic() - started


def test_a_worker_stuck_in_python_is_found_wedged_and_the_daemon_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check that spins in Python without beat(): the main loop still runs (the GIL changes hands), so
    C-ECHO is answered, the wedge is logged with where the thread is, and the daemon stops by itself, status 1,
    leaving the stuck thread behind at the stop deadline."""
    daemon, port, trigger = _hanging_daemon(
        tmp_path, monkeypatch, "python", "wedged_worker_seconds: 2\nstop_timeout_seconds: 3\n"
    )
    with daemon:
        daemon.wait_ready(port)
        _hang(daemon, trigger)
        assert echo_ok(port, timeout=5), "C-ECHO went unanswered while a worker spun in Python"
        wedged = daemon.wait_logged("daemon.worker_wedged", timeout=20)
        assert wedged["worker"] == "assembler" and wedged["limit_seconds"] == 2
        assert any("hanging_check" in frame for frame in wedged["stack"]), wedged["stack"]
        status, _ = _exit_within(daemon, 3 + 10)
        assert status == 1
        assert daemon.logged("daemon.stop_abandoned")[0]["services"] == ["assembler"]


def test_sigterm_while_a_worker_is_stuck_in_python_ends_the_process_in_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long before the wedge limit, SIGTERM stops the daemon within stop_timeout_seconds: the stuck thread
    is abandoned (the journal resumes its work at the next start)."""
    daemon, port, trigger = _hanging_daemon(
        tmp_path, monkeypatch, "python", "wedged_worker_seconds: 300\nstop_timeout_seconds: 3\n"
    )
    with daemon:
        daemon.wait_ready(port)
        _hang(daemon, trigger)
        os.kill(daemon.pid, signal.SIGTERM)
        status, seconds = _exit_within(daemon, 30)
        assert status == 0 and seconds < 3 + 1.5, (status, seconds, daemon.log_tail())
        assert daemon.logged("daemon.stop_abandoned")[0]["services"] == ["assembler"]


def test_a_thread_holding_the_gil_cannot_outlast_sigterm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's `re` backtracking in a worker holds the GIL: the main thread cannot run, so neither the
    wedged-worker check nor the SIGTERM handler can. The deadline kept by faulthandler's C thread ends the
    process within stop_timeout_seconds of SIGTERM, with every thread's stack on stderr, and status 1."""
    daemon, port, trigger = _hanging_daemon(
        tmp_path, monkeypatch, "gil", "wedged_worker_seconds: 300\nstop_timeout_seconds: 3\n"
    )
    with daemon:
        daemon.wait_ready(port)
        _hang(daemon, trigger)
        os.kill(daemon.pid, signal.SIGTERM)
        status, seconds = _exit_within(daemon, 30)
        assert status == 1 and seconds < 3 + 1.5, (status, seconds, daemon.log_tail())
    log = daemon.log_path.read_text()
    dump = log[log.index("Timeout (0:00:03)!") :]
    assert "Thread 0x" in dump and "(most recent call first)" in dump
    assert "in hanging_check" in dump and "re/__init__.py" in dump, dump  # the culprit, caught in the act
    assert "in _serve" in dump or "in wait" in dump, dump  # the main thread, waiting for the GIL
    assert not daemon.logged("daemon.signal")  # the handler never ran: only the deadline could end it
