"""systemd's notify protocol: READY=1 once serving, WATCHDOG=1 while alive, STOPPING=1 on the way out."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ingestd.notify import SystemdNotifier
from tests.procs import DaemonProcess, free_port, wait_until, write_daemon_config


def _received(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            return messages


def test_notifier_sends_to_a_path_and_to_an_abstract_socket(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.enabled and notifier.watchdog_seconds == 4.0
    assert notifier.ready("serving")
    assert notifier.watchdog()
    assert _received(sock) == ["READY=1\nSTATUS=serving", "WATCHDOG=1"]
    name = f"ingestd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        assert SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert abstract.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_without_systemd_nothing_is_sent() -> None:
    notifier = SystemdNotifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert not notifier.enabled and notifier.watchdog_seconds is None
    assert not notifier.ready("serving")


def test_daemon_notifies_systemd(
    tmp_path: Path, notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # 0.4 s: pings every 0.2 s
    port = free_port()
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        seen: list[str] = []

        def two_watchdog_pings() -> bool:
            seen.extend(_received(sock))
            return sum(m.startswith("WATCHDOG=1") for m in seen) >= 2

        wait_until(two_watchdog_pings, 20)
        assert seen[0].startswith("READY=1\nSTATUS=serving")
        assert any("STATUS=serving; studies:" in message for message in seen[1:])
        assert daemon.terminate() == 0
    assert "STOPPING=1\nSTATUS=stopping" in _received(sock)


def test_a_dead_worker_stops_the_daemon_with_status_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent half-alive state: a worker thread that ended makes run() stop everything and return 1."""
    from ingestd.config import parse_config  # noqa: PLC0415
    from ingestd.daemon import Daemon  # noqa: PLC0415
    from ingestd.pipeline.assemble import Assembler  # noqa: PLC0415

    monkeypatch.setattr(Assembler, "_run", lambda self: None)  # the assembler's thread ends at once
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    config = parse_config(
        f"state_dir: {tmp_path / 'state'}\nlistener: {{host: 127.0.0.1, port: 0, processes: 1}}\n"
        "spool: {min_free_mb: 0}\n"
    )
    daemon = Daemon(config)
    assert daemon.run() == 1
    assert daemon.journal is None  # stopped and closed


def test_health_command(tmp_path: Path) -> None:
    """`ingestd health` (the Docker HEALTHCHECK): unhealthy without a daemon, healthy while one serves."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    port = free_port()
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port)

    def health() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ingestd", "health", "--config", str(config)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    down = health()
    assert down.returncode == 1 and "unhealthy: no daemon runs on" in down.stdout
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        up = health()
        assert up.returncode == 0 and up.stdout.startswith("healthy: daemon running"), up.stdout + up.stderr
        assert daemon.terminate() == 0
