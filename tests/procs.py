"""Helpers for tests that run real processes: the daemon as a subprocess, and DCMTK's echoscu and storescu.

Every DCMTK tool runs with TCP_NODELAY=1: without it Debian's DCMTK crawls at about 19 images a second.
Everything listens and connects on 127.0.0.1 only. Nothing sleeps for a fixed time: waits poll a
condition with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

__all__ = [
    "DCMTK_ENV",
    "HOST",
    "DaemonProcess",
    "Storescu",
    "describe",
    "echo_ok",
    "free_port",
    "ingestd_status",
    "journal_rows",
    "process_group",
    "run_ingestd",
    "tail",
    "wait_until",
    "write_daemon_config",
]

HOST = "127.0.0.1"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05, message: str = "condition"
) -> T:
    """Call `predicate` until it returns something truthy and return that; raise TimeoutError at `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {message}")
        time.sleep(interval)


def journal_rows(journal: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query on a journal, read through a read-only connection of its own."""
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def run_ingestd(
    *args: str, check: bool = False, timeout: float = 60, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m ingestd ARGS` (this checkout's) to completion, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "ingestd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        env=env,
        cwd=cwd,
    )


def ingestd_status(config: Path, *, show_uids: bool = True) -> dict[str, Any]:
    """What `ingestd status --json` says about a configuration's state (the test fails if the command fails)."""
    uids = ["--show-uids"] if show_uids else []
    result = run_ingestd("status", "--config", str(config), "--json", *uids)
    assert result.returncode == 0, f"ingestd status failed ({result.returncode}):\n{result.stderr}"
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a text file ('' if it does not exist)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def echo_ok(port: int, ae_title: str = "INGESTD", timeout: float = 5.0) -> bool:
    """Say whether a C-ECHO to `ae_title` at 127.0.0.1:`port` succeeds (DCMTK's echoscu)."""
    seconds = str(max(1, int(timeout)))
    try:
        result = subprocess.run(
            ["echoscu", "-to", seconds, "-ta", seconds, "-td", seconds, "-aec", ae_title, HOST, str(port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout + 2,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def write_daemon_config(
    path: Path, state_dir: Path, port: int, *, ae_title: str = "INGESTD", processes: int = 1, extra: str = ""
) -> Path:
    """Write a daemon configuration listening on 127.0.0.1:`port` with the spool under `state_dir`."""
    path.write_text(
        f"state_dir: {state_dir}\n"
        f"listener: {{host: {HOST}, port: {port}, ae_title: {ae_title}, processes: {processes}}}\n"
        "study_idle_seconds: 3600\n"
        "spool: {min_free_mb: 10}\n"
        "logging: {level: info, format: json}\n"
        "metrics: {port: 0}\n" + extra,
        encoding="utf-8",
    )
    return path


SCANNER_RULES = (
    "profiles:\n"
    "  research: {key: {env: INGESTD_TEST_KEY}}\n"
    "rules:\n"
    "  - name: scanner\n"
    "    when: {calling_aet: STORESCU}\n"
    "    route: {server: main, project: PROJ, subject: '{PatientID:hash8}', session: '{subject}_MR',"
    " archive: true}\n"
    "    anonymize: research\n"
)


def write_xnat_daemon_config(
    tmp_path: Path, port: int, url: str, *, rules: str = SCANNER_RULES, extra: str = ""
) -> Path:
    """A daemon configuration (as `write_daemon_config`, studies complete after 1 s) with `rules` in
    `lab.rules.yaml` (default: what STORESCU sends goes de-identified to project PROJ and is archived) and the
    XNAT server `main` at `url`, its credentials in XNAT_TEST_USER and XNAT_TEST_PASSWORD (see the `xnat` fixture).
    """
    (tmp_path / "lab.rules.yaml").write_text(rules)
    extra = (
        "rules: [lab.rules.yaml]\n"
        f"{extra}"
        "xnat:\n"
        "  servers:\n"
        "    main:\n"
        f"      url: {url}\n"
        "      credentials: {env_username: XNAT_TEST_USER, env_password: XNAT_TEST_PASSWORD}\n"
        "      poll_interval_seconds: 0.2\n"
        "      retry: {initial_seconds: 0.2, max_seconds: 1}\n"
    )
    config = write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port, extra=extra)
    config.write_text(config.read_text().replace("study_idle_seconds: 3600", "study_idle_seconds: 1"))
    return config


def process_group(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return sorted(members)


def describe(pids: Sequence[int]) -> str:
    """What the processes are doing: their threads' kernel wait channels, and py-spy's dump if installed."""
    out = []
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            threads = [
                f"{task.name}:{(task / 'wchan').read_text()}" for task in sorted(Path(f"/proc/{pid}/task").iterdir())
            ]
        except OSError:
            continue
        out.append(f"pid {pid}: {cmdline.strip()}\n  threads waiting in {', '.join(threads)}")
        if py_spy is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                dump = subprocess.run(
                    [py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=20, check=False
                )
                out.append(dump.stdout + dump.stderr)
    return "\n".join(out)


class DaemonProcess:
    """`python -m ingestd run --config FILE` as a child process, its output appended to `log_path`.

    The daemon runs in a session (and process group) of its own, so that its receiver processes can be
    killed with it and none outlives the test. Use as a context manager: leaving the block kills the whole
    group and reaps the daemon if it still runs.
    """

    # What runs `ingestd`, after the interpreter: a test may run a script that changes something first.
    program: tuple[str, ...] = ("-m", "ingestd")

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the daemon has not been started")
        return self.process.pid

    def start(self) -> DaemonProcess:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the daemon is already running")
        self._close_log()
        self._log = self.log_path.open("ab")
        self._log.write(f"---- starting ingestd with {self.config_path}\n".encode())
        self._log.flush()
        self._log_start = self._log.tell()
        self.process = subprocess.Popen(
            [sys.executable, *self.program, "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.config_path.parent,
            start_new_session=True,
        )
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    def logged(self, event: str) -> list[dict[str, Any]]:
        """The JSON log records of `event` this run of the daemon (and its receivers) wrote, oldest first."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            text = log.read().decode("utf-8", errors="replace")
        found = []
        for line in text.splitlines():
            if f'"{event}"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
        return found

    def _check_running(self) -> None:
        if not self.running():
            code = self.process.returncode if self.process is not None else None
            raise RuntimeError(f"ingestd exited with status {code}:\n{self.log_tail()}")

    def wait_ready(self, port: int, ae_title: str = "INGESTD", timeout: float = 30.0) -> None:
        """Wait until a C-ECHO succeeds; fail at once, with the log's tail, if the daemon exits instead."""

        def ready() -> bool:
            self._check_running()
            return echo_ok(port, ae_title, timeout=2.0)

        try:
            wait_until(ready, timeout, interval=0.1, message=f"ingestd to answer C-ECHO on port {port}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None

    def wait_logged(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until this run logged `event` (say `daemon.started`); return the record."""

        def found() -> dict[str, Any] | None:
            records = self.logged(event)
            if not records:
                self._check_running()
            return records[0] if records else None

        try:
            record = wait_until(found, timeout, interval=0.05, message=f"ingestd to log {event}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None
        assert record is not None
        return record

    def wait_group_gone(self, timeout: float) -> None:
        """Wait until no process of the daemon's group is left (receivers included)."""
        try:
            wait_until(lambda: not process_group(self.pid), timeout, message="the daemon's processes to exit")
        except TimeoutError as exc:
            left = process_group(self.pid)
            raise TimeoutError(f"{exc}: still running {left}\n{describe(left)}\n{self.log_tail()}") from None

    def kill9(self, *, group: bool = True, timeout: float = 30.0) -> int:
        """SIGKILL the daemon, with its whole process group unless `group` is false, and reap it.

        Returns its exit status (-9) once every process of the group is gone: killed, or (with `group`
        false) having stopped by itself when its parent died.
        """
        if self.process is None:
            raise RuntimeError("the daemon has not been started")
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                os.kill(self.process.pid, signal.SIGKILL)
        code = self.process.wait(timeout=10)
        try:
            self.wait_group_gone(timeout)
        finally:
            self._close_log()
        return code

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM the daemon and wait for it and its receivers to stop; SIGKILL them after `timeout` s."""
        if self.process is None:
            raise RuntimeError("the daemon has not been started")
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=timeout)
            self.wait_group_gone(timeout)
        except (subprocess.TimeoutExpired, TimeoutError):
            self.kill9()
            raise TimeoutError(
                f"ingestd did not stop within {timeout} s of SIGTERM; killed it\n{self.log_tail()}"
            ) from None
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            with contextlib.suppress(TimeoutError):
                self.wait_group_gone(10)
        self._close_log()


class Storescu:
    """DCMTK's `storescu -v` sending `files` in order, its log parsed line by line in a thread.

    `sent` lists the files in the order storescu began sending them; `acknowledged` those it received a
    Success response for. Use as a context manager: leaving the block kills and reaps storescu if it runs.
    """

    _SENDING = "Sending file: "
    _SUCCESS = "Received Store Response (Success)"

    def __init__(
        self,
        port: int,
        files: Sequence[Path],
        *,
        ae_title: str = "INGESTD",
        calling_ae_title: str = "STORESCU",
        timeout: int = 20,
    ) -> None:
        self.args = [
            "storescu", "-v", "-to", str(timeout), "-ta", str(timeout), "-td", str(timeout),
            "-aet", calling_ae_title, "-aec", ae_title, HOST, str(port), *(str(f) for f in files),
        ]  # fmt: skip
        self.files = list(files)
        self.lines: list[str] = []
        self.sent: list[Path] = []
        self.acknowledged: list[Path] = []
        self._changed = threading.Condition()
        self._done = False
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> Storescu:
        self.process = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=DCMTK_ENV,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, name="storescu-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        current: Path | None = None
        try:
            for raw in self.process.stdout:
                line = raw.rstrip("\n")
                with self._changed:
                    self.lines.append(line)
                    if self._SENDING in line:
                        current = Path(line.split(self._SENDING, 1)[1].strip())
                        self.sent.append(current)
                    elif self._SUCCESS in line and current is not None:
                        self.acknowledged.append(current)
                        current = None
                    self._changed.notify_all()
        finally:
            with self._changed:
                self._done = True
                self._changed.notify_all()

    def wait_acknowledged(self, count: int, timeout: float = 30.0) -> int:
        """Wait until `count` files were acknowledged (or storescu's output ended); return how many were."""
        with self._changed:
            finished = self._changed.wait_for(lambda: len(self.acknowledged) >= count or self._done, timeout=timeout)
            if not finished:
                raise TimeoutError(f"storescu acknowledged {len(self.acknowledged)} of {count} in {timeout} s")
            return len(self.acknowledged)

    def wait_output(self, text: str, timeout: float = 30.0) -> bool:
        """Wait until storescu printed a line containing `text`; False if its output ended without one."""
        with self._changed:
            self._changed.wait_for(lambda: self._done or any(text in line for line in self.lines), timeout=timeout)
            return any(text in line for line in self.lines)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for storescu to exit and for its output to be read; return its exit status."""
        if self.process is None:
            raise RuntimeError("storescu has not been started")
        code = self.process.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=timeout)
        return code

    def output(self, lines: int = 30) -> str:
        with self._changed:
            return "\n".join(self.lines[-lines:])

    def __enter__(self) -> Storescu:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
