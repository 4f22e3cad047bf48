"""The README and docs/*.md as a newcomer reads them on a fresh clone: every link and every repository path they
name exists, and the commands they give work as written."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage

from tests.dicom import make_study, write_instances
from tests.procs import (
    DaemonProcess,
    echo_ok,
    free_port,
    journal_rows,
    run_ingestd,
    wait_until,
    write_daemon_config,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_TOP = (*(path.name for path in ROOT.iterdir() if path.is_dir() and not path.name.startswith(".")), ".ci")
_SKIPPED = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__"}


def _repository_files() -> set[str]:
    """Every file and folder of the checkout (relative, POSIX), without caches, the venv and .git."""
    found: set[str] = set()
    stack = [ROOT]
    while stack:
        folder = stack.pop()
        for path in folder.iterdir():
            if path.name in _SKIPPED or path.name.endswith(".egg-info"):
                continue
            found.add(path.relative_to(ROOT).as_posix())
            if path.is_dir() and not path.is_symlink():
                stack.append(path)
    return found


FILES = _repository_files()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in doc.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(doc: Path) -> None:
    """`[text](target)`: a file or folder of the repository (relative to the document), and the heading named by
    `#anchor` exists. Links to the web are not followed (CI has no network)."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists() or not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, f"{doc.name}: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.relative_to(ROOT).as_posix())
def test_every_repository_path_named_exists(doc: Path) -> None:
    """A path in backticks that starts at a top-level folder (`rules/ingestd.example.yaml`, `bench/hostile.py`), or a
    file name of the repository's kinds (`pipeline/deliver.py`, `test_crash.py`), names something in the checkout
    (`rules/verdict.py` may be ingestd/rules/verdict.py). Placeholders (`<batch>`, `{path}`, `*.part`,
    `FOLDER/...`) are skipped."""
    text = doc.read_text(encoding="utf-8")
    named = set(re.findall(rf"`((?:{'|'.join(map(re.escape, _TOP))})/[^`\s]*)`", text))
    named |= set(re.findall(r"`([\w-][\w./-]*\.(?:py|md|yaml|json|service|toml|cfg))`", text))
    missing = []
    for name in sorted(named):
        if re.search(r"[<>{}*…]", name) or re.match(r"[A-Z_]+/", name):  # `FOLDER/ingestd.yaml`: a placeholder
            continue
        path = name.rstrip("/")
        if path not in FILES and not any(file.endswith(f"/{path}") for file in FILES):
            missing.append(name)
    assert not missing, f"{doc.name} names paths that are not in the repository: {missing}"


# -- the README's commands, as written ------------------------------------------------------------------------------


def fenced_commands(doc: Path = ROOT / "README.md") -> list[str]:
    """Every command line of the ```sh blocks, in order, without its trailing comment."""
    commands, inside = [], False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```sh" and not inside
            continue
        if inside and line.strip():
            commands.append(re.sub(r"\s+# .*$", "", line).strip())
    return commands


# README commands no test runs as written, and why (a new command must be run below or listed here).
NOT_RUN_HERE = {
    "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/ingestd demo": "test_demo.py runs the demo; "
    ".ci/run installs with pip",
    "bash .ci/run": "it is CI",
    "ingestd import --config /etc/ingestd/": "a lab's paths; test_import.py imports trees",
    "sudo ": "the systemd install needs root; .ci/run verifies the unit",
    "systemctl ": "needs systemd running the unit",
    "journalctl ": "needs systemd running the unit",
    "curl ": "needs the installed service; test_observability.py checks /healthz",
}
SENDS = ("TCP_NODELAY=1 /usr/bin/dcmsend ", "TCP_NODELAY=1 /usr/bin/echoscu ")  # run against a daemon below


def _venv_ingestd() -> Path:
    ingestd = ROOT / ".venv" / "bin" / "ingestd"
    if not ingestd.exists():
        if os.environ.get("CI"):
            pytest.fail(".ci/run installs ingestd into .venv: the README's commands use .venv/bin/ingestd")
        pytest.skip("no .venv/bin/ingestd in this checkout (the README's commands use it)")
    return ingestd


def _fresh_clone(tmp_path: Path) -> Path:
    """A folder laid out as a clone's for the README's commands: rules/ and the checkout's .venv."""
    _venv_ingestd()
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "rules", clone / "rules")
    (clone / ".venv").symlink_to(ROOT / ".venv")
    return clone


def test_every_readme_command_is_run_by_a_test_or_says_why_not() -> None:
    commands = fenced_commands()
    assert any(command.startswith(".venv/bin/ingestd check-config") for command in commands)
    unclassified = [command for command in commands if _kind(command) is None]
    assert not unclassified, (
        f"README commands neither run by tests/test_readme.py nor listed in NOT_RUN_HERE: {unclassified}"
    )


def _kind(command: str) -> str | None:
    """Which test runs a README command: "send", "run", "check" or "prepare" (a folder the others need); "not here"
    (NOT_RUN_HERE); None: none."""
    if command.startswith(SENDS):
        return "send"
    if any(command.startswith(prefix) for prefix in NOT_RUN_HERE):
        return "not here"
    if command == "mkdir -p ingestd-drop":
        return "prepare"
    if command.startswith(".venv/bin/ingestd run "):
        return "run"
    if re.fullmatch(r"(\w+=(\$\([^)]*\)|\S+) )*\.venv/bin/ingestd (?!run ).*", command):
        return "check"
    return None


def test_the_readme_commands_work_as_written(tmp_path: Path) -> None:
    """`--help`, check-config on the example configuration, check-rules on the example rules, and what they need
    prepared, in the README's order: exit 0, no traceback."""
    clone = _fresh_clone(tmp_path)
    runnable = [command for command in fenced_commands() if _kind(command) in ("check", "prepare")]
    assert sum(_kind(command) == "check" for command in runnable) >= 3, runnable
    for command in runnable:
        result = subprocess.run(
            ["bash", "-c", command], cwd=clone, capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
        assert "Traceback" not in result.stderr, f"{command}\n{result.stderr}"


@pytest.mark.usefixtures("dcmtk")
def test_the_readme_run_command_starts_the_daemon_and_sigterm_stops_it(tmp_path: Path) -> None:
    """`.venv/bin/ingestd run --config rules/ingestd.example.yaml` in a fresh clone, after the README's preparations:
    the daemon answers C-ECHO and exits 0 on SIGTERM. Tests use only ports they pick free: the example's listener
    (11112) and metrics (9471) ports are swapped for free ones in the clone's copy, nothing else."""
    clone = _fresh_clone(tmp_path)
    (run,) = [command for command in fenced_commands() if _kind(command) == "run"]
    for prepare in (command for command in fenced_commands() if _kind(command) == "prepare"):
        subprocess.run(["bash", "-c", prepare], cwd=clone, check=True)
    example = clone / "rules" / "ingestd.example.yaml"
    listener, metrics = free_port(), free_port()
    text = example.read_text()
    assert text.count("  port: 11112\n") == 1 and text.count("  port: 9471\n") == 1, "the example's ports moved"
    example.write_text(
        text.replace("  port: 11112\n", f"  port: {listener}\n").replace("  port: 9471\n", f"  port: {metrics}\n")
    )
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(["bash", "-c", f"exec {run}"], cwd=clone, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: echo_ok(listener, timeout=2) or daemon.poll() is not None, 60, message="the daemon")
            assert daemon.poll() is None, log.read_text()
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0, log.read_text()
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    assert (clone / "ingestd-state" / "journal.sqlite").is_file()


def _mixed_folder(folder: Path) -> set[str]:
    """MR and CT instances in eight transfer syntaxes (converted by DCMTK), in subfolders; their SOP Instance UIDs."""
    conversions: list[list[str]] = [
        [],
        ["dcmconv", "+ti"],  # Implicit VR Little Endian
        ["dcmconv", "+tb"],  # Explicit VR Big Endian
        ["dcmconv", "+td"],  # Deflated Explicit VR Little Endian
        ["dcmcjpeg"],  # JPEG Lossless, first-order prediction (SV1)
        ["dcmcjpeg", "+ee"],  # JPEG Extended (12 bit, lossy)
        ["dcmcjpls"],  # JPEG-LS Lossless
        ["dcmcrle"],  # RLE Lossless
    ]
    study = make_study(series=2, per_series=4) + make_study(series=1, per_series=8, sop_class=CTImageStorage)
    plain = write_instances(study, folder.parent / "plain")
    sent = set()
    for index, path in enumerate(plain):
        target = folder / f"series{index // 4}" / f"IM{index:03d}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        conversion = conversions[index % len(conversions)]
        if conversion:
            subprocess.run([*conversion, str(path), str(target)], check=True, capture_output=True)
        else:
            shutil.copyfile(path, target)
        sent.add(str(pydicom.dcmread(target, stop_before_pixels=True).SOPInstanceUID))  # lossy JPEG: a new UID
    return sent


@pytest.mark.usefixtures("dcmtk")
def test_the_readme_send_command_sends_a_folder_of_mixed_transfer_syntaxes(tmp_path: Path) -> None:
    """The README's `dcmsend` line, as written (port and folder put in), sends every instance of a folder holding
    uncompressed, deflated and compressed (JPEG, JPEG-LS, RLE) instances of two SOP classes in one run."""
    folder = tmp_path / "study"
    sop_uids = _mixed_folder(folder)
    port = free_port()
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port)
    send, echo = (next(c for c in fenced_commands() if c.startswith(prefix)) for prefix in SENDS)
    assert "127.0.0.1 11112 /path/to/study/" in send and echo.endswith("127.0.0.1 11112"), (send, echo)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        for command in (
            echo.replace(" 11112", f" {port}"),
            send.replace(" 11112 /path/to/study/", f" {port} {folder}/"),
        ):
            env = {key: value for key, value in os.environ.items() if key != "TCP_NODELAY"}  # the command sets it
            result = subprocess.run(
                ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120, check=False
            )
            assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}\n{daemon.log_tail()}"
        # dcmsend exits 0 whatever the store statuses: its summary (-v) says how many were stored
        assert re.search(rf"with status SUCCESS\s*: {len(sop_uids)}\n", result.stdout + result.stderr), result.stderr
        rows = journal_rows(tmp_path / "state" / "journal.sqlite", "SELECT sop_uid, transfer_syntax FROM instances")
        assert daemon.terminate() == 0
    assert {sop for sop, _syntax in rows} == sop_uids
    # dcmsend sends a lossy JPEG as it is (it decompresses only lossless ones, where the receiver picks uncompressed)
    assert "1.2.840.10008.1.2.4.51" in {syntax for _sop, syntax in rows}, rows


def test_the_demo_help_and_the_readme_give_the_same_duration() -> None:
    """Measured: 8.6 s and 9.7 s on two shared cores (issue 15: the help said 1 min, the README 10 s)."""
    shown = run_ingestd("demo", "--help", check=True).stdout
    (seconds,) = re.findall(r"\(~(\d+) s\)", " ".join(shown.split()))
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert f"in about {seconds} seconds" in readme and f"(about {seconds} s)" in readme
