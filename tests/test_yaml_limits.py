"""Configuration input is bounded: an alias bomb, a recursive alias, deep nesting, a huge file or an unreadable
value is a `file:line` error with exit 2 (check-config, check-rules, run), read in little memory; a reload of
such a file, or any error while reloading, leaves the running configuration and rules in force."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from ingestd.config import MAX_ALIAS_NODES, MAX_YAML_BYTES, parse_config
from ingestd.errors import ConfigError
from ingestd.rules import load_rules
from tests.dicom import make_study, write_instances
from tests.procs import DaemonProcess, Storescu, echo_ok, free_port, journal_rows, wait_until, write_daemon_config

LAUGHS = 9  # nine aliases of nine aliases...: 9**9 (387 million) values once expanded


def alias_bomb(indent: str = "") -> str:
    """A "billion laughs": 9 levels of 9 aliases, one per line. The alias that crosses the limit is on the fifth
    line, a4: a1 to a3 reach 90 + 819 + 7380 nodes through their aliases, a4's first alias 7381 more."""
    lines = [f'{indent}a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{indent}a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * LAUGHS)}]" for i in range(1, LAUGHS)]
    return "\n".join(lines) + "\n"


# Runs the ingestd command in a child whose address space is capped at 2 GiB (a regression ends in a
# MemoryError there, not in a machine out of memory), and reports the child's peak RSS on its last line.
MEASURED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from ingestd.cli import main
try:
    status = main(sys.argv[1:])
finally:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec, so it would count the forking test process's
    # peak (pytest after the large-instance tests); VmHWM is this process's own address space's peak.
    with open("/proc/self/status") as status_file:
        hwm = next(line.split()[1] for line in status_file if line.startswith("VmHWM:"))
    print(f"maxrss_kb={hwm}", file=sys.stderr)
sys.exit(status)
"""


def _measured(*args: str) -> tuple[int, str, int]:
    """Run `ingestd ARGS` in a child; return its exit status, its stderr without the last line, its peak RSS."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURED, *args], capture_output=True, text=True, timeout=60, check=False
    )
    *lines, last = result.stderr.splitlines()
    assert last.startswith("maxrss_kb="), result.stderr
    return result.returncode, "\n".join(lines), int(last.removeprefix("maxrss_kb="))


def test_alias_bomb_in_check_config_is_a_located_error_in_little_memory(tmp_path: Path) -> None:
    config = tmp_path / "ingestd.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nbomb:\n" + alias_bomb("  "))
    status, err, maxrss_kb = _measured("check-config", str(config))
    assert status == 2
    assert err == (
        f"{config}:7: aliases expand to more than {MAX_ALIAS_NODES} nodes (a YAML alias bomb?): write the repeated "
        "blocks out, or use fewer aliases"
    )
    assert maxrss_kb < 150 * 1024, maxrss_kb  # the interpreter and ingestd's imports take about 65 MB


def test_alias_bomb_in_check_rules_is_a_located_error_in_little_memory(tmp_path: Path) -> None:
    rules = tmp_path / "lab.rules.yaml"
    rules.write_text("rules: []\nprofiles:\n  bomb:\n" + alias_bomb("    "))
    status, err, maxrss_kb = _measured("check-rules", str(rules))
    assert status == 2
    assert err.startswith(f"{rules}:8: aliases expand to more than {MAX_ALIAS_NODES} nodes"), err
    assert "Traceback" not in err
    assert maxrss_kb < 150 * 1024, maxrss_kb


def test_run_refuses_an_alias_bomb_in_config_or_rules(tmp_path: Path) -> None:
    """`ingestd run` exits 2 with the located error, whether the bomb is in the configuration or in its rules."""
    port = free_port()
    config = write_daemon_config(tmp_path / "bomb.yaml", tmp_path / "state", port, extra="bomb:\n" + alias_bomb("  "))
    status, err, maxrss_kb = _measured("run", "--config", str(config))
    assert (status, maxrss_kb < 150 * 1024) == (2, True), (err, maxrss_kb)
    assert f"{config}:" in err and "aliases expand to more than" in err and "Traceback" not in err

    (tmp_path / "lab.rules.yaml").write_text("rules: []\nbomb:\n" + alias_bomb("  "))
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port, extra="rules: [lab.rules.yaml]\n")
    status, err, maxrss_kb = _measured("run", "--config", str(config))
    assert (status, maxrss_kb < 150 * 1024) == (2, True), (err, maxrss_kb)
    assert f"{tmp_path / 'lab.rules.yaml'}:7: aliases expand to more than" in err, err
    assert not echo_ok(port, timeout=1)  # it never started to listen


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("state_dir: /x\na: &a [*a]\n", "f.yaml:2: the alias *a is inside its own anchor"),
        ("state_dir: /x\na: &a {b: *a}\n", "f.yaml:2: the alias *a is inside its own anchor"),
        ("state_dir: /x\nx: " + "[" * 70 + "]" * 70 + "\n", "f.yaml:2: nested more than 64 levels deep"),
        # 20 levels, aliased 4 times at depth 50: the expanded document is 70 deep
        (
            "state_dir: /x\na: &a " + "[" * 20 + "]" * 20 + "\nb: " + "[" * 49 + "*a" + "]" * 49 + "\n",
            "f.yaml:3: nested more than 64 levels deep (aliases expanded)",
        ),
        ("state_dir: /x\nx: [" + "0, " * 100_001 + "]\n", "f.yaml:2: more than 100000 values"),
        ("state_dir: " + "1" * 5000 + "\n", "f.yaml:1: cannot read this value: Exceeds the limit (4300 digits)"),
        ("state_dir: /x\nwhen: 2001-13-45\n", "f.yaml:2: cannot read this value: month must be in 1..12"),
        ("state_dir: /x\n" + "#" * MAX_YAML_BYTES + "\n", "f.yaml: the configuration is larger than 1024 KiB"),
    ],
)
def test_documents_past_the_limits_are_located_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yaml")
    assert caught.value.problems[0].startswith(expected), caught.value.problems


def test_aliases_within_the_limit_are_fine(tmp_path: Path) -> None:
    """Sharing blocks is what anchors are for: many aliases of a small block are well within the limit."""
    block = "{" + ", ".join(f"k{i}: v" for i in range(40)) + "}"
    text = f"state_dir: /x\nshared: &shared {block}\n" + "".join(f"use{i}: *shared\n" for i in range(100))
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yaml")
    assert all(": unknown key" in problem for problem in caught.value.problems), caught.value.problems[:3]


def test_oversized_rules_file_and_a_fifo_are_refused_without_reading_them_whole(tmp_path: Path) -> None:
    big = tmp_path / "big.rules.yaml"
    big.write_text("rules: []\n" + "#" * (4 * MAX_YAML_BYTES) + "\n")
    with pytest.raises(ConfigError) as caught:
        load_rules([big])
    assert caught.value.problems == [f"{big}: the rules file is larger than 1024 KiB"]
    status, err, _ = _measured("check-config", "/dev/zero")
    assert (status, err) == (2, "/dev/zero: the configuration is larger than 1024 KiB")


def test_a_reload_that_raises_anything_keeps_the_running_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MemoryError (or any error) while the files are read again: refused and logged, nothing applied; an error
    while applying: logged as failed, and the main loop goes on."""
    from ingestd import daemon as daemon_module  # noqa: PLC0415
    from ingestd.daemon import Daemon  # noqa: PLC0415

    path = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", free_port())
    from ingestd.config import load_config  # noqa: PLC0415

    running = Daemon(load_config(path), path)
    before = running.config

    def out_of_memory(_config: object) -> None:
        raise MemoryError

    monkeypatch.setattr(daemon_module, "load_rules_for", out_of_memory)
    with capture_logs() as logged:
        assert running.reload() is False
    assert running.config is before
    assert [(r["event"], r["outcome"], r["reason"]) for r in logged] == [("daemon.reload", "refused", "MemoryError")]

    def broken_reload() -> bool:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(running, "reload", broken_reload)
    with capture_logs() as logged:
        running._reload_safely()
    assert [(r["event"], r["outcome"], r["reason"]) for r in logged] == [
        ("daemon.reload", "failed", "RecursionError: maximum recursion depth exceeded")
    ]


def _vm_hwm_kb(pid: int) -> int:
    """A process's peak RSS so far (VmHWM in /proc/PID/status), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.usefixtures("dcmtk")
@pytest.mark.slow
def test_sighup_with_an_alias_bomb_keeps_the_daemon_and_its_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's promise: a reload error leaves the running rules in force. The daemon stays up, answers
    C-ECHO, receives, routes with the old rules, logs daemon.reload with the located reason, in little memory."""
    monkeypatch.setenv("INGESTD_TEST_KEY", "h" * 40)
    rules = tmp_path / "lab.rules.yaml"
    good = (
        "profiles:\n  research: {key: {env: INGESTD_TEST_KEY}}\n"
        "rules:\n  - name: scanner\n    when: {calling_aet: STORESCU}\n"
        "    route: {server: main, project: PROJ, subject: '{PatientID:hash8}', session: '{subject}_MR'}\n"
        "    anonymize: research\n"
    )
    rules.write_text(good)
    port = free_port()
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port, extra="rules: [lab.rules.yaml]\n")
    config.write_text(config.read_text().replace("study_idle_seconds: 3600", "study_idle_seconds: 1"))
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        rules.write_text(good + "bomb:\n" + alias_bomb("  "))
        os.kill(daemon.pid, signal.SIGHUP)
        refused = daemon.wait_logged("daemon.reload", timeout=30)
        assert refused["outcome"] == "refused" and refused["reason"] == "invalid", refused
        assert refused["problems"] == [
            f"{rules}:13: aliases expand to more than {MAX_ALIAS_NODES} nodes (a YAML alias bomb?): write the "
            "repeated blocks out, or use fewer aliases"
        ]
        assert daemon.running() and echo_ok(port)
        assert _vm_hwm_kb(daemon.pid) < 300 * 1024
        # Still receiving, and the rules in force route the study.
        files = write_instances(make_study(series=1, per_series=2), tmp_path / "scan")
        with Storescu(port, files) as storescu:
            assert storescu.wait() == 0, storescu.output()

        def routed() -> bool:
            rows = journal_rows(config.parent / "state" / "journal.sqlite", "SELECT state FROM batches")
            return rows == [("routed",)]

        wait_until(routed, 30, interval=0.2, message="the study to be routed by the rules in force")
        assert daemon.terminate() == 0
