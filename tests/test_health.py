"""`ingestd health` checks the running daemon without HTTP, by what the daemon recorded as it started: a metrics
endpoint moved or disabled in the configuration since (or from the start) does not make a healthy daemon
unhealthy."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

from ingestd.admin.health import STALE_SECONDS, started_problem
from ingestd.metrics import DaemonRecord
from tests.procs import DaemonProcess, free_port, run_ingestd, wait_until, write_daemon_config


def _health(config: Path) -> subprocess.CompletedProcess[str]:
    return run_ingestd("health", "--config", str(config), "--timeout", "10")


def _edit(config: Path, old: str, new: str) -> None:
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


def test_health_follows_the_running_daemon_when_the_metrics_endpoint_moves(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port)
    _edit(config, "metrics: {port: 0}", f"metrics: {{port: {metrics}}}")
    before = _health(config)
    assert before.returncode == 1
    assert before.stdout == f"unhealthy: no daemon runs on {tmp_path / 'state'}\n"
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        healthy = wait_until(lambda: _health(config).returncode == 0, 60, interval=0.3, message="healthy")
        assert healthy
        out = _health(config).stdout
        assert out.startswith(f"healthy: daemon running (pid {daemon.pid}), journal readable (0 held)"), out
        assert f"C-ECHO answered on port {port}, metrics at http://127.0.0.1:{metrics}" in out

        _edit(config, f"metrics: {{port: {metrics}}}", f"metrics: {{port: {free_port()}}}")  # moved, not restarted
        moved = _health(config)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert f"metrics at http://127.0.0.1:{metrics}" in moved.stdout  # where the daemon serves, not the file

        _edit(config, "metrics: {port:", "metrics: {enabled: false, port:")  # disabled in the file
        disabled = _health(config)
        assert disabled.returncode == 0, disabled.stdout + disabled.stderr
        assert daemon.terminate() == 0
    after = _health(config)
    assert after.returncode == 1
    assert "no daemon runs" in after.stdout


def test_health_with_the_metrics_endpoint_disabled_and_the_listener_moved_in_the_file(tmp_path: Path) -> None:
    port = free_port()
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port)
    _edit(config, "metrics: {port: 0}", "metrics: {enabled: false}")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        wait_until(lambda: _health(config).returncode == 0, 60, interval=0.3, message="healthy")
        _edit(config, f"port: {port}", f"port: {free_port()}")  # the C-ECHO goes where the daemon listens
        result = _health(config)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.endswith(f"C-ECHO answered on port {port}, metrics not served\n")
        assert daemon.terminate() == 0


def test_started_problem_by_record_and_heartbeat() -> None:
    """The pure part of the check, on a clock the test gives."""
    record = DaemonRecord(pid=42, started_at=1000.0, metrics=None, listener=("127.0.0.1", 11112, "INGESTD"))
    assert DaemonRecord.from_json(record.to_json()) == record
    assert DaemonRecord.from_json("{not json") is None
    assert "starting" in (started_problem(None, 42, 1001.0, 1001.0) or "")
    assert "starting" in (started_problem(record, 43, 1001.0, 1001.0) or "")  # an earlier daemon's record
    assert "not beaten yet" in (started_problem(record, 42, 999.0, 1001.0) or "")  # an earlier daemon's beat
    assert started_problem(record, 42, 1001.0, 1001.0 + STALE_SECONDS) is None
    assert "hangs" in (started_problem(record, 42, 1001.0, 1002.0 + STALE_SECONDS) or "")
    stopping = dataclasses.replace(record, stopping_since=1001.5)
    assert "is stopping (for 1 s)" in (started_problem(stopping, 42, 1001.0, 1002.5) or "")
    assert DaemonRecord.from_json(stopping.to_json()) == stopping
