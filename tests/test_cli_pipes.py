"""Output into a pipe whose reader went away (`ingestd status | head -1`) ends the command quietly.

Real processes writing into real pipes: one whose read end is closed before the command starts (every write
fails with EPIPE, whatever the output's size), and the shell pipeline the admin types, `| head -1`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestd.cli import EXIT_PIPE_CLOSED
from tests.dicom import write_instances
from tests.spooled import KEY, SpooledState, spooled_state

ENV = os.environ | {"INGESTD_TEST_KEY": KEY}


@pytest.fixture(scope="module")
def spooled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SpooledState]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INGESTD_TEST_KEY", KEY)
        yield spooled_state(tmp_path_factory.mktemp("pipes"))


def _into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m ingestd ARGS` with its standard output a pipe nobody reads any more."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "ingestd", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env=ENV,
            check=False,
        )
    finally:
        os.close(write)


def _commands(state: SpooledState) -> list[list[str]]:
    config = str(state.config_file)
    files = state.root / "files"
    if not files.exists():
        write_instances(state.studies["OTHER"], files)
    return [
        ["status", "--config", config],
        ["status", "--config", config, "--wide"],
        ["status", "--config", config, "--json"],
        ["explain", "--config", config, str(state.batch_ids["SCANNER"])],
        ["explain", "--rules", str(state.root / "lab.rules.yaml"), str(files)],
        ["check-rules", str(state.root / "lab.rules.yaml")],
        ["--help"],
        ["status", "--help"],
    ]


def test_every_command_into_a_closed_pipe_ends_quietly(spooled: SpooledState) -> None:
    for command in _commands(spooled):
        result = _into_closed_pipe(*command)
        # argparse's --help swallows the failed write itself and exits 0; every other command: a closed pipe's status
        expected = 0 if "--help" in command else EXIT_PIPE_CLOSED
        assert result.returncode == expected, (command, result.returncode, result.stderr)
        assert result.stderr == "", (command, result.stderr)  # no traceback, no "Exception ignored"


def test_status_and_explain_piped_into_head(spooled: SpooledState) -> None:
    """As the admin types it: the first line arrives, then nothing on stderr, whatever the timing."""
    assert shutil.which("head") is not None
    python = f"{sys.executable} -m ingestd"
    config = str(spooled.config_file)
    for command in (f"status --config {config} --wide", f"explain --config {config} --all 1 2 3 4"):
        result = subprocess.run(  # noqa: S602 - the pipeline as the admin types it; every word is the test's own
            f"set -o pipefail; {python} {command} | head -1",
            shell=True,
            executable="/bin/bash",
            capture_output=True,
            text=True,
            timeout=120,
            env=ENV,
            check=False,
        )
        assert result.returncode in (0, EXIT_PIPE_CLOSED), result.stderr  # 0: all written before head left
        assert result.stderr == "" and len(result.stdout.splitlines()) == 1
        assert "Traceback" not in result.stderr


def test_a_closed_pipe_in_process_returns_the_status_without_a_traceback(
    spooled: SpooledState, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`main` itself, for the code path: a write that fails with EPIPE."""
    from ingestd import cli  # noqa: PLC0415

    class Closed:
        def write(self, _text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            raise ValueError("no file descriptor")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert cli.main(["status", "--config", str(spooled.config_file)]) == EXIT_PIPE_CLOSED
    assert "Traceback" not in capsys.readouterr().err


def test_output_read_to_the_end_exits_0(spooled: SpooledState, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ingestd", "status", "--config", str(spooled.config_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        check=False,
    )
    assert result.returncode == 0 and "4 studies (batches)" in result.stdout
