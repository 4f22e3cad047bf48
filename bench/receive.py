"""Benchmark DICOM receiving: ingestd against DCMTK storescp and Orthanc, fed by DCMTK storescu.

Generates a synthetic study, then for every repetition, receiver and association count starts the
receiver on an empty storage folder, sends the whole study with storescu (one process per
association, all at once), checks that every instance arrived, records the time, and stops the
receiver. Prints a table and optionally writes the raw numbers as JSON. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from gen_study import generate

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CALLING_AET = "BENCHSCU"
RECEIVERS = ("ingestd", "storescp", "orthanc")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
SEND_TIMEOUT = 3600.0
# Every receiver announces the same maximum PDU unless told otherwise: DCMTK's and Orthanc's default, inside
# the range all three accept (storescp and Orthanc: 4096..131072; ingestd: 4096..64 MiB).
DEFAULT_MAX_PDU = 16384
# Debian's DCMTK leaves Nagle's algorithm on unless told otherwise, and then crawls at ~20 images/s.
NODELAY_ENV = {"TCP_NODELAY": "1"}
LOG_PROBLEM_WORDS = ("error", "warning", "traceback", "exception", "critical")
DCMTK_PROBLEM = re.compile(r"^[EWF]: ")  # DCMTK tools' error, warning and fatal lines
ORTHANC_PROBLEM = re.compile(r"^[EF]\d{4} ")  # glog lines: E = error, F = fatal (W is Orthanc's info)


class BenchError(Exception):
    """A run that did not complete correctly: its time is not a number."""


# -- small helpers ----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(NODELAY_ENV)
    if extra:
        env.update(extra)
    return env


def kill_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM the group `proc` leads, wait, then SIGKILL it; return the exit code (None if killed)."""
    if proc.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
    # Children that outlived their leader (storescp --fork) go too.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def count_files(root: Path, suffix: str = "", exclude: str | None = None) -> int:
    total = 0
    for path in root.rglob(f"*{suffix}"):
        if exclude is not None and exclude in path.relative_to(root).parts:
            continue
        if path.is_file():
            total += 1
    return total


def log_tail(path: Path, lines: int = 20) -> str:
    return "\n".join(read_lines(path)[-lines:])


def is_problem(line: str) -> bool:
    lowered = line.lower()
    return DCMTK_PROBLEM.match(line) is not None or any(word in lowered for word in LOG_PROBLEM_WORDS)


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []


def echo_ok(port: int, aet: str) -> bool:
    result = subprocess.run(
        ["echoscu", "-q", "-to", "2", "-aet", CALLING_AET, "-aec", aet, HOST, str(port)],
        env=tool_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=30,
    )
    return result.returncode == 0


# -- process memory ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    name: str
    vm_hwm_kib: int


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with suppress(OSError):
            kids.extend(int(p) for p in task.read_text().split())
    return kids


def _status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def process_tree_memory(pid: int) -> list[ProcessMemory]:
    """VmHWM (peak resident set) of `pid` and of every process descended from it."""
    found: list[ProcessMemory] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        status = _status(current)
        if "VmHWM" in status:
            found.append(ProcessMemory(current, status.get("Name", "?"), int(status["VmHWM"].split()[0])))
        pending.extend(_children(current))
    return found


# -- receivers --------------------------------------------------------------------------------------


class Receiver:
    """A DICOM receiver started in its own process group on an empty folder for one run."""

    name = "receiver"
    ae_title = "RECEIVER"
    tracks_memory = True

    def __init__(self, run_dir: Path, log_path: Path) -> None:
        self.run_dir = run_dir
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write configuration and create folders under run_dir."""

    def received(self) -> int:
        """How many instances the receiver stored (called after stop())."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return tool_env()

    def start(self) -> None:
        self.run_dir.mkdir(parents=True)
        self.prepare()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.run_dir,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise BenchError(f"{self.name} exited with {code} while starting:\n{log_tail(self.log_path)}")
            if echo_ok(self.port, self.ae_title):
                return
            time.sleep(0.2)
        raise BenchError(f"{self.name} did not answer C-ECHO within {READY_TIMEOUT:.0f} s")

    def log_problems(self) -> list[str]:
        """Lines of the receiver's log that mention an error, a warning or a traceback."""
        return [line for line in read_lines(self.log_path) if is_problem(line)]

    def memory(self) -> list[ProcessMemory]:
        if self.proc is None or not self.tracks_memory:
            return []
        return process_tree_memory(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            self.exit_code = kill_group(self.proc)


class Ingestd(Receiver):
    name = "ingestd"
    ae_title = "INGESTD"

    def __init__(self, run_dir: Path, log_path: Path, max_pdu: int, listener_extra: dict[str, Any]) -> None:
        super().__init__(run_dir, log_path)
        self.max_pdu = max_pdu
        self.listener_extra = listener_extra
        self.state_dir = run_dir / "state"
        self.config_path = run_dir / "ingestd.yaml"

    def prepare(self) -> None:
        listener: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "ae_title": self.ae_title,
            "max_pdu_size": self.max_pdu,
        }
        listener.update(self.listener_extra)
        config = {
            "state_dir": str(self.state_dir),
            "listener": listener,
            "study_idle_seconds": 3600,
            "spool": {"min_free_mb": 100},
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    def env(self) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH")
        return tool_env({"PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)})

    def command(self) -> list[str]:
        return [sys.executable, "-m", "ingestd", "run", "--config", str(self.config_path)]

    def received(self) -> int:
        return count_files(self.state_dir / "spool", ".dcm", exclude=".tmp")

    def log_problems(self) -> list[str]:
        """JSON lines at warning level or above, and anything that is not a JSON line (a traceback).

        `daemon.rules_missing` is expected: the benchmark only receives, so it configures no rules.
        """
        problems = []
        for line in read_lines(self.log_path):
            try:
                event = json.loads(line)
            except ValueError:
                problems.append(line)
                continue
            expected = isinstance(event, dict) and (
                event.get("level") in ("debug", "info") or event.get("event") == "daemon.rules_missing"
            )
            if not expected:
                problems.append(line)
        return problems


class StoreScp(Receiver):
    name = "storescp"
    ae_title = "STORESCP"
    tracks_memory = False  # --fork: each association's child has exited by the time we could look

    def __init__(self, run_dir: Path, log_path: Path, max_pdu: int) -> None:
        super().__init__(run_dir, log_path)
        self.out = run_dir / "out"
        self.max_pdu = max_pdu

    def prepare(self) -> None:
        self.out.mkdir()

    def command(self) -> list[str]:
        pdu = ["-pdu", str(self.max_pdu)]
        return ["storescp", "--fork", "-aet", self.ae_title, *pdu, "-od", str(self.out), str(self.port)]

    def received(self) -> int:
        return count_files(self.out)


class Orthanc(Receiver):
    name = "orthanc"
    ae_title = "ORTHANC"

    def __init__(self, run_dir: Path, log_path: Path, max_pdu: int) -> None:
        super().__init__(run_dir, log_path)
        self.storage = run_dir / "storage"
        self.index = run_dir / "index"
        self.config_path = run_dir / "orthanc.json"
        self.max_pdu = max_pdu

    def prepare(self) -> None:
        config: dict[str, Any] = {
            "Name": "bench",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.index),
            "StorageCompression": False,
            "SyncStorageArea": True,
            "Plugins": [],
            "LuaScripts": [],
            # No HTTP at all: Orthanc 1.10 cannot bind it to one address, and the benchmark needs none.
            "HttpServerEnabled": False,
            "HttpPort": free_port(),
            "RemoteAccessAllowed": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            # Orthanc has no DICOM bind address option: the port is used only through 127.0.0.1.
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {},
            "SaveJobs": False,
            "MaximumPduLength": self.max_pdu,
        }
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    def command(self) -> list[str]:
        return ["Orthanc", str(self.config_path)]

    def log_problems(self) -> list[str]:
        return [line for line in read_lines(self.log_path) if ORTHANC_PROBLEM.match(line)]

    def received(self) -> int:
        """Instances in Orthanc's SQLite index (read once Orthanc has stopped and released it)."""
        uri = f"file:{self.index / 'index'}?mode=ro"
        try:
            with sqlite3.connect(uri, uri=True) as db:
                # ResourceType: 1 patient, 2 study, 3 series, 4 instance (Orthanc's ServerEnumerations.h).
                (count,) = db.execute("SELECT COUNT(*) FROM Resources WHERE resourceType = 4").fetchone()
        except sqlite3.Error as exc:
            raise BenchError(f"cannot read Orthanc's index: {exc}") from exc
        return int(count)


# -- sending ----------------------------------------------------------------------------------------


def split(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """Deal the files round-robin so that every association gets the same mix of MR and CT."""
    return [list(files[i::parts]) for i in range(parts) if files[i::parts]]


def send(files: Sequence[Path], associations: int, *, port: int, aet: str, log_prefix: Path) -> float:
    """Send `files` over `associations` concurrent storescu processes; return the wall time in seconds."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        start = time.perf_counter()
        for number, chunk in enumerate(split(files, associations)):
            log_path = log_prefix.with_name(f"{log_prefix.name}-storescu{number}.log")
            with log_path.open("wb") as log:
                command = ["storescu", "-aet", CALLING_AET, "-aec", aet, HOST, str(port), *map(str, chunk)]
                procs.append(
                    (
                        subprocess.Popen(
                            command,
                            env=tool_env(),
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        ),
                        log_path,
                    )
                )
        for proc, _ in procs:
            proc.wait(timeout=SEND_TIMEOUT)
        elapsed = time.perf_counter() - start
    finally:
        for proc, _ in procs:
            kill_group(proc, timeout=5)
    failed = [(proc.returncode, path) for proc, path in procs if proc.returncode != 0]
    if failed:
        code, path = failed[0]
        what = f"{len(failed)} of {len(procs)} failed"
        raise BenchError(f"storescu exited with {code} ({what}):\n{log_tail(path)}")
    return elapsed


# -- one run ----------------------------------------------------------------------------------------


@dataclass
class Run:
    receiver: str
    associations: int
    repeat: int
    instances: int
    bytes: int
    max_pdu: int
    seconds: float | None = None
    received: int | None = None
    memory: list[ProcessMemory] = field(default_factory=list)
    exit_code: int | None = None
    log_problems: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def images_per_s(self) -> float | None:
        return None if self.seconds is None else self.instances / self.seconds

    @property
    def mb_per_s(self) -> float | None:
        return None if self.seconds is None else self.bytes / 1e6 / self.seconds

    @property
    def peak_rss_kib(self) -> int:
        return sum(m.vm_hwm_kib for m in self.memory)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(images_per_s=self.images_per_s, mb_per_s=self.mb_per_s, peak_rss_kib=self.peak_rss_kib)
        return data


@dataclass(frozen=True)
class Settings:
    files: tuple[Path, ...]
    total_bytes: int
    workdir: Path
    log_dir: Path
    listener_extra: dict[str, Any]
    max_pdu: dict[str, int]  # receiver -> the maximum PDU it announces


def _check_received(name: str, run: Run) -> None:
    if run.received != run.instances:
        raise BenchError(f"{name} stored {run.received} of {run.instances} instances")


def make_receiver(name: str, settings: Settings, run_dir: Path, log_path: Path) -> Receiver:
    if name == "ingestd":
        return Ingestd(run_dir, log_path, settings.max_pdu[name], settings.listener_extra)
    if name == "storescp":
        return StoreScp(run_dir, log_path, settings.max_pdu[name])
    if name == "orthanc":
        return Orthanc(run_dir, log_path, settings.max_pdu[name])
    raise ValueError(name)


def run_once(name: str, associations: int, repeat: int, settings: Settings) -> Run:
    tag = f"{name}-a{associations}-r{repeat}"
    run = Run(name, associations, repeat, len(settings.files), settings.total_bytes, settings.max_pdu[name])
    run_dir = settings.workdir / "runs" / tag
    receiver = make_receiver(name, settings, run_dir, settings.log_dir / f"{tag}.log")
    os.sync()  # start every run with no dirty pages of the previous one waiting to be written back
    try:
        receiver.start()
        seconds = send(
            settings.files,
            associations,
            port=receiver.port,
            aet=receiver.ae_title,
            log_prefix=settings.log_dir / tag,
        )
        run.memory = receiver.memory()
        receiver.stop()
        run.exit_code = receiver.exit_code
        run.received = receiver.received()
        _check_received(name, run)
        run.seconds = seconds
    except BenchError as exc:
        run.error = str(exc)
    finally:
        receiver.stop()
        run.log_problems = receiver.log_problems()
        shutil.rmtree(run_dir, ignore_errors=True)
    return run


# -- report -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    receiver: str
    associations: int
    max_pdu: int
    ok: int
    failed: int
    images_per_s: tuple[float, float, float] | None  # median, min, max
    mb_per_s: tuple[float, float, float] | None
    peak_rss_mib: tuple[float, float, float] | None


def _spread(values: list[float]) -> tuple[float, float, float] | None:
    return (statistics.median(values), min(values), max(values)) if values else None


def summarize(
    runs: list[Run], receivers: Sequence[str], associations: Sequence[int], max_pdu: dict[str, int]
) -> list[Summary]:
    summaries = []
    for name in receivers:
        for assoc in associations:
            group = [r for r in runs if r.receiver == name and r.associations == assoc]
            good = [r for r in group if r.error is None]
            rss = [r.peak_rss_kib / 1024 for r in good if r.memory]
            summaries.append(
                Summary(
                    name,
                    assoc,
                    max_pdu[name],
                    len(good),
                    len(group) - len(good),
                    _spread([r.images_per_s for r in good if r.images_per_s is not None]),
                    _spread([r.mb_per_s for r in good if r.mb_per_s is not None]),
                    _spread(rss),
                )
            )
    return summaries


def ratios(summaries: list[Summary]) -> dict[str, float]:
    """ingestd's median images/s over each baseline's, per association count."""
    medians = {(s.receiver, s.associations): s.images_per_s[0] for s in summaries if s.images_per_s}
    result = {}
    for (name, assoc), value in medians.items():
        if name == "ingestd":
            continue
        ours = medians.get(("ingestd", assoc))
        if ours is not None:
            result[f"ingestd/{name} @{assoc}"] = ours / value
    return result


def _fmt(spread: tuple[float, float, float] | None, digits: int = 1) -> str:
    if spread is None:
        return "-"
    median, low, high = spread
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def print_table(summaries: list[Summary], runs: list[Run]) -> None:
    header = f"{'receiver':<10} {'max PDU':>8} {'assoc':>5} {'runs':>6}  {'images/s median (min-max)':<28}"
    header += f"{'MB/s median (min-max)':<26}{'peak RSS MiB median (min-max)'}"
    print(header)
    print("-" * len(header))
    for s in summaries:
        runs_text = f"{s.ok}" + (f"+{s.failed}!" if s.failed else "")
        print(
            f"{s.receiver:<10} {s.max_pdu:>8} {s.associations:>5} {runs_text:>6}  {_fmt(s.images_per_s):<28}"
            f"{_fmt(s.mb_per_s):<26}{_fmt(s.peak_rss_mib)}"
        )
    print()
    for key, value in ratios(summaries).items():
        print(f"{key:<28} {value:.2f}x (median images/s)")
    ingestd_runs = [r for r in runs if r.receiver == "ingestd" and r.memory]
    if ingestd_runs:
        last = ingestd_runs[-1]
        per_process = ", ".join(f"{m.name}[{m.pid}] {m.vm_hwm_kib / 1024:.1f} MiB" for m in last.memory)
        print(f"ingestd processes (last run): {per_process}")


def print_problems(runs: list[Run]) -> None:
    for run in runs:
        where = f"{run.receiver} @{run.associations} repeat {run.repeat}"
        if run.error:
            print(f"ERROR {where}: {run.error}")
        if run.exit_code not in (0, None) and run.receiver != "storescp":
            print(f"note  {where}: exited with {run.exit_code} on SIGTERM")
        if run.log_problems:
            first = run.log_problems[0][:300]
            print(f"log   {where}: {len(run.log_problems)} problem line(s), first: {first}")


def write_json(
    path: Path, args: argparse.Namespace, settings: Settings, runs: list[Run], summaries: list[Summary]
) -> None:
    data = {
        "command": sys.argv,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version},
        "study": {
            "mr": args.mr,
            "ct": args.ct,
            "instances": len(settings.files),
            "bytes": settings.total_bytes,
        },
        "listener_extra": settings.listener_extra,
        "max_pdu": settings.max_pdu,
        "summaries": [asdict(s) for s in summaries],
        "ratios": ratios(summaries),
        "runs": [r.as_dict() for r in runs],
    }
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


# -- main -------------------------------------------------------------------------------------------


def _csv(kind: type, choices: Sequence[Any] | None = None) -> Any:
    def parse(text: str) -> list[Any]:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
        if not values or (choices is not None and any(v not in choices for v in values)):
            expected = choices or kind.__name__
            raise argparse.ArgumentTypeError(f"expected a comma-separated list from {expected}")
        return values

    return parse


def _listener_extra(text: str) -> dict[str, Any]:
    value = yaml.safe_load(text) if text else {}
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a YAML mapping, e.g. '{max_pdu_size: 65536}'")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mr", type=int, default=500, help="MR instances, 256x256x16 bit (default 500)")
    parser.add_argument("--ct", type=int, default=300, help="CT instances, 512x512x16 bit (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per receiver and association count")
    parser.add_argument("--receivers", type=_csv(str, RECEIVERS), default=list(RECEIVERS))
    parser.add_argument(
        "--associations",
        type=_csv(int),
        default=[1, 4],
        help="concurrent storescu associations, comma-separated (default 1,4)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder for the study, the receivers' storage and the logs (kept afterwards; "
        "default: a temporary folder under /tmp, removed afterwards)",
    )
    parser.add_argument(
        "--ingestd-config-extra",
        type=_listener_extra,
        default={},
        help="YAML mapping merged into ingestd's listener section, e.g. '{max_pdu_size: 65536}'",
    )
    parser.add_argument(
        "--max-pdu",
        type=int,
        default=DEFAULT_MAX_PDU,
        help=f"maximum receive PDU every receiver announces (default {DEFAULT_MAX_PDU}; storescp and Orthanc "
        "accept 4096..131072)",
    )
    parser.add_argument(
        "--ingestd-max-pdu",
        type=int,
        default=None,
        help="ingestd's maximum receive PDU instead of --max-pdu (e.g. 4194304, its own default)",
    )
    parser.add_argument(
        "--baseline-max-pdu",
        type=int,
        default=None,
        help="storescp's and Orthanc's maximum receive PDU instead of --max-pdu",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every run and the summary here")
    return parser.parse_args(argv)


def check_tools(receivers: Sequence[str]) -> None:
    needed = ["storescu", "echoscu"]
    needed += [{"storescp": "storescp", "orthanc": "Orthanc"}[r] for r in receivers if r != "ingestd"]
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (apt-get install dcmtk orthanc)")


@contextmanager
def workdir(path: Path | None) -> Iterator[tuple[Path, bool]]:
    """The benchmark's folder, and whether it is kept afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve(), True
        return
    temp = Path(tempfile.mkdtemp(prefix="ingestd-bench-", dir="/tmp"))
    try:
        yield temp, False
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _pdu_text(max_pdu: dict[str, int], receivers: Sequence[str]) -> str:
    used = {name: max_pdu[name] for name in receivers}
    same = " (the same for every receiver)" if len(set(used.values())) == 1 else " (NOT the same for every receiver)"
    return ", ".join(f"{name} {value}" for name, value in used.items()) + same


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def max_pdus(args: argparse.Namespace) -> dict[str, int]:
    """The maximum PDU each receiver announces: --max-pdu for all, unless a receiver's own option says otherwise
    (for ingestd also a `max_pdu_size` in --ingestd-config-extra, which is merged last)."""
    baseline = args.baseline_max_pdu or args.max_pdu
    ingestd = args.ingestd_config_extra.get("max_pdu_size", args.ingestd_max_pdu or args.max_pdu)
    return {"ingestd": int(ingestd), "storescp": baseline, "orthanc": baseline}


def benchmark(args: argparse.Namespace, root: Path) -> tuple[Settings, list[Run]]:
    study = root / "study"
    log_dir = root / "logs"
    log_dir.mkdir(exist_ok=True)
    print(f"generating {args.mr} MR + {args.ct} CT instances in {study} ...", flush=True)
    files = tuple(generate(study, args.mr, args.ct))
    settings = Settings(
        files,
        sum(p.stat().st_size for p in files),
        root,
        log_dir,
        args.ingestd_config_extra,
        max_pdus(args),
    )
    size = settings.total_bytes / 1e6
    print(f"study: {len(files)} instances, {size:.1f} MB; logs in {log_dir}", flush=True)
    print(f"maximum PDU: {_pdu_text(settings.max_pdu, args.receivers)}", flush=True)
    runs: list[Run] = []
    try:
        for repeat in range(1, args.repeats + 1):
            for name in args.receivers:
                for assoc in args.associations:
                    run = run_once(name, assoc, repeat, settings)
                    runs.append(run)
                    error = (run.error or "").splitlines()[:1]
                    shown = f"{run.images_per_s:.1f} images/s" if run.error is None else f"ERROR {error[0]}"
                    print(f"  repeat {repeat} {name:<9} @{assoc}: {shown}", flush=True)
    finally:
        shutil.rmtree(study, ignore_errors=True)
    return settings, runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools(args.receivers)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    with workdir(args.workdir) as (root, kept):
        settings, runs = benchmark(args, root)
        summaries = summarize(runs, args.receivers, args.associations, settings.max_pdu)
        print()
        print(f"maximum PDU: {_pdu_text(settings.max_pdu, args.receivers)}")
        print_table(summaries, runs)
        print_problems(runs)
        if args.json is not None:
            write_json(args.json, args, settings, runs, summaries)
        if kept:
            print(f"logs kept in {settings.log_dir}")
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every process it started has been stopped", file=sys.stderr)
        sys.exit(130)
