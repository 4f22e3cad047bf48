"""Benchmark the daemon's memory while it receives large multi-frame instances by C-STORE.

Starts `ingestd run` (a real daemon, its own process group), writes multi-frame Enhanced CT instances of the
given sizes to disk a few MiB at a time (never whole in memory: `ingestd.synthetic.write_multiframe`), sends
each with DCMTK `storescu` (TCP_NODELAY=1), and samples the resident memory of the daemon and of every
process in its group (receiver processes) from /proc every 50 ms. Reports, per size, the peak of the summed
RSS while sending and its rise over the idle daemon; then the same for one instance sent again (a duplicate)
and for several instances sent at once on concurrent associations. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from receive import BenchError, echo_ok, free_port, kill_group, tool_env

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CALLING_AET = "BENCHSCU"
FRAME_BYTES = 512 * 512 * 2  # one 512 x 512 16-bit frame
GIB = 1024**3
MIB = 1024**2
READY_TIMEOUT = 60.0
SEND_TIMEOUT = 1800.0
ROUTE_TIMEOUT = 1800.0
# --route: every study is de-identified (a profile with no options: Table E.1-1's basic profile) and packaged.
ROUTE_RULES = """\
profiles:
  bench:
    key: {env: INGESTD_BENCH_KEY}
rules:
  - name: everything
    when: {}
    route:
      server: main
      project: BENCH
      subject: "{PatientID:hash8}"
      session: "{subject}_{StudyDate:hash6}"
    anonymize: bench
"""


# -- memory sampling ------------------------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (VmRSS: anonymous, file-backed and shared pages it has mapped)."""
    with suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def vm_hwm_kib(pid: int) -> int:
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Sampler:
    """Samples the summed RSS of a process group every `interval` seconds in a thread; `window` gives the peak
    (summed and per process) between its start and end."""

    def __init__(self, pgid: int, interval: float) -> None:
        self.pgid = pgid
        self.interval = interval
        self.samples = 0
        self._peak = 0
        self._peak_per_process: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            per_process = {pid: rss_bytes(pid) for pid in group_members(self.pgid)}
            total = sum(per_process.values())
            with self._lock:
                self.samples += 1
                self._peak = max(self._peak, total)
                for pid, rss in per_process.items():
                    self._peak_per_process[pid] = max(self._peak_per_process.get(pid, 0), rss)
            self._stop.wait(self.interval)

    def reset(self) -> None:
        with self._lock:
            self._peak = 0
            self._peak_per_process = {}

    def peak(self) -> tuple[int, dict[int, int]]:
        with self._lock:
            return self._peak, dict(self._peak_per_process)

    @contextmanager
    def window(self) -> Iterator[dict[str, Any]]:
        """Yield a dict filled at the end with `peak_mib` and `per_process_mib` of the window."""
        result: dict[str, Any] = {}
        time.sleep(2 * self.interval)  # a sample or two of the state before
        self.reset()
        try:
            yield result
        finally:
            time.sleep(2 * self.interval)
            peak, per_process = self.peak()
            result["peak_mib"] = round(peak / MIB, 1)
            result["per_process_mib"] = {str(pid): round(rss / MIB, 1) for pid, rss in sorted(per_process.items())}


def idle_rss(pgid: int, seconds: float = 1.0) -> float:
    """The daemon group's summed RSS at rest (the largest of a few samples), in MiB."""
    highest = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        highest = max(highest, sum(rss_bytes(pid) for pid in group_members(pgid)))
        time.sleep(0.05)
    return round(highest / MIB, 1)


# -- the daemon -----------------------------------------------------------------------------------


class Daemon:
    def __init__(self, workdir: Path, repo: Path, python: str, *, route: bool = False) -> None:
        self.route = route  # also assemble, route (de-identify into the outbox) and package each instance
        self.workdir = workdir
        self.repo = repo
        self.python = python
        self.port = free_port()
        self.state_dir = workdir / "state"
        self.config_path = workdir / "ingestd.yaml"
        self.log_path = workdir / "ingestd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        config = {
            "state_dir": str(self.state_dir),
            "listener": {"host": HOST, "port": self.port, "ae_title": "INGESTD"},
            "study_idle_seconds": 3600,  # nothing is assembled or routed during the run: receiving only
            "spool": {"min_free_mb": 100},
            "logging": {"level": "info", "format": "json"},
            "metrics": {"enabled": False},
        }
        extra_env = {}
        if self.route:
            rules = self.workdir / "bench.rules.yaml"
            rules.write_text(ROUTE_RULES, encoding="utf-8")
            config["study_idle_seconds"] = 2
            config["rules"] = [str(rules)]
            # Nothing listens there: the deliverer packages the study, then retries its pre-flight; the benchmark
            # measures receiving, de-identifying and zipping, not an upload.
            config["xnat"] = {
                "servers": {
                    "main": {
                        "url": f"http://{HOST}:9",
                        "credentials": {"env_username": "INGESTD_BENCH_USER", "env_password": "INGESTD_BENCH_PASS"},
                    }
                }
            }
            extra_env = {
                "INGESTD_BENCH_KEY": os.urandom(24).hex(),
                "INGESTD_BENCH_USER": "bench",
                "INGESTD_BENCH_PASS": "bench",
            }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        path = os.environ.get("PYTHONPATH")
        env = tool_env({"PYTHONPATH": f"{self.repo}{os.pathsep}{path}" if path else str(self.repo), **extra_env})
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.python, "-m", "ingestd", "run", "--config", str(self.config_path)],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"ingestd exited with {self.proc.returncode} while starting; see {self.log_path}")
            if echo_ok(self.port, "INGESTD"):
                return
            time.sleep(0.2)
        raise BenchError(f"ingestd did not answer C-ECHO within {READY_TIMEOUT:.0f} s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_packaged(self, count: int) -> str:
        """Wait until the last `count` batches are routed and zipped (or held); say how each ended."""
        deadline = time.monotonic() + ROUTE_TIMEOUT
        while True:
            db = sqlite3.connect(f"file:{self.state_dir / 'journal.sqlite'}?mode=ro", uri=True, timeout=30)
            try:
                rows = db.execute(
                    "SELECT b.state, d.step FROM batches b LEFT JOIN deliveries d ON d.batch_id = b.id "
                    "ORDER BY b.id DESC LIMIT ?",
                    (count,),
                ).fetchall()
            finally:
                db.close()
            ended = [
                state if state == "held" else f"{state}:{step}"
                for state, step in rows
                if state == "held" or (state == "routed" and step not in (None, "package"))
            ]
            if len(ended) == count:
                return ";".join(ended)
            if time.monotonic() > deadline:
                return "not routed in time: " + ";".join(f"{state}:{step}" for state, step in rows)
            time.sleep(0.5)

    def receipts(self, sop_uid: str) -> list[str]:
        db = sqlite3.connect(f"file:{self.state_dir / 'journal.sqlite'}?mode=ro", uri=True, timeout=30)
        try:
            return [
                row[0] for row in db.execute("SELECT outcome FROM receipts WHERE sop_uid = ? ORDER BY id", (sop_uid,))
            ]
        finally:
            db.close()

    def spooled(self, sop_uid: str) -> list[Path]:
        return list((self.state_dir / "spool").glob(f"*/*/*/{sop_uid}.dcm"))

    def vm_hwm_mib(self) -> dict[str, float]:
        return {str(pid): round(vm_hwm_kib(pid) / 1024, 1) for pid in sorted(group_members(self.pid))}

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return kill_group(self.proc)


# -- instances and sending ------------------------------------------------------------------------


@dataclass
class Instance:
    path: Path
    sop_uid: str
    size: int


def make_instance(folder: Path, gib: float, seed: int) -> Instance:
    sys.path.insert(0, str(REPO))
    from ingestd.synthetic import write_multiframe  # noqa: PLC0415 - the benchmark's own tree, not the daemon's

    frames = max(1, round(gib * GIB / FRAME_BYTES))
    sop_uid = f"2.25.{int.from_bytes(os.urandom(12), 'big')}"
    path = folder / f"large-{seed}.dcm"
    size = write_multiframe(path, frames, sop_uid=sop_uid, seed=seed)
    return Instance(path, sop_uid, size)


def storescu(port: int, files: list[Path], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            ["storescu", "-to", "60", "-ta", "60", "-td", "900", "-aet", CALLING_AET, "-aec", "INGESTD", HOST,
             str(port), *map(str, files)],
            env=tool_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


@dataclass
class Run:
    what: str
    instances: int
    gib_each: float
    bytes_sent: int
    seconds: float
    peak_mib: float
    idle_mib: float
    rise_mib: float
    outcomes: list[str] = field(default_factory=list)
    error: str | None = None
    per_process_mib: dict[str, float] = field(default_factory=dict)


def send(daemon: Daemon, sampler: Sampler, instances: list[Instance], what: str, logs: Path) -> Run:
    """Send `instances` at once (one storescu, so one association, each) and measure the daemon's memory."""
    idle = idle_rss(daemon.pid)
    procs = []
    with sampler.window() as window:
        started = time.monotonic()
        procs = [
            storescu(daemon.port, [one.path], logs / f"storescu-{what}-{i}.log") for i, one in enumerate(instances)
        ]
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=SEND_TIMEOUT))
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                codes.append(proc.wait())
        seconds = time.monotonic() - started
        routed = daemon.wait_packaged(len(instances)) if daemon.route and not any(codes) else None
    outcomes = [",".join(daemon.receipts(one.sop_uid)) for one in instances]
    if routed is not None:
        outcomes.append(routed)
    error = None
    if any(codes):
        error = f"storescu exited with {codes}"
    elif not all(daemon.spooled(one.sop_uid) for one in instances):
        error = "not every instance is in the spool"
    run = Run(
        what=what,
        instances=len(instances),
        gib_each=round(instances[0].size / GIB, 2),
        bytes_sent=sum(one.size for one in instances),
        seconds=round(seconds, 2),
        peak_mib=window["peak_mib"],
        idle_mib=idle,
        rise_mib=round(window["peak_mib"] - idle, 1),
        outcomes=outcomes,
        error=error,
        per_process_mib=window["per_process_mib"],
    )
    mb_s = run.bytes_sent / 1e6 / seconds if seconds else 0.0
    status = f"ERROR {error}" if error else f"{mb_s:.0f} MB/s"
    print(
        f"  {what:<24} peak {run.peak_mib:8.1f} MiB  (idle {idle:6.1f}, rise {run.rise_mib:8.1f})  {status}", flush=True
    )
    return run


def drop_spooled(daemon: Daemon, instances: list[Instance]) -> None:
    """Free the disk: the benchmark's instances are not needed once measured (nothing reads them in the run)."""
    for one in instances:
        for path in daemon.spooled(one.sop_uid):
            path.unlink(missing_ok=True)
    if daemon.route:
        for folder in ("outbox", "packages"):
            for path in (daemon.state_dir / folder).rglob("*"):
                if path.is_file():
                    path.unlink(missing_ok=True)


def measure(
    daemon: Daemon, sampler: Sampler, args: argparse.Namespace, data: Path, logs: Path, runs: list[Run]
) -> None:
    """Each size alone, then one instance twice, then several at once; each instance removed once measured."""
    seed = 1
    for gib in _floats(args.sizes):
        one = make_instance(data, gib, seed)
        seed += 1
        runs.append(send(daemon, sampler, [one], f"{gib:g} GiB", logs))
        drop_spooled(daemon, [one])
        one.path.unlink()
    if args.resend > 0:
        one = make_instance(data, args.resend, seed)
        seed += 1
        runs.append(send(daemon, sampler, [one], f"{args.resend:g} GiB first", logs))
        runs.append(send(daemon, sampler, [one], f"{args.resend:g} GiB again", logs))
        drop_spooled(daemon, [one])
        one.path.unlink()
    if args.concurrent > 0:
        many = [make_instance(data, args.concurrent_gib, seed + i) for i in range(args.concurrent)]
        runs.append(send(daemon, sampler, many, f"{args.concurrent} x {args.concurrent_gib:g} GiB at once", logs))
        drop_spooled(daemon, many)
        for one in many:
            one.path.unlink()


# -- main -----------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.5,1,2", help="GiB of each instance sent alone (default 0.5,1,2)")
    parser.add_argument("--resend", type=float, default=1.0, help="GiB of the instance sent twice (0: none)")
    parser.add_argument("--concurrent", type=int, default=4, help="instances sent at once (0: none)")
    parser.add_argument("--concurrent-gib", type=float, default=1.0, help="GiB of each concurrent instance")
    parser.add_argument("--interval", type=float, default=0.05, help="RSS sampling interval, seconds")
    parser.add_argument("--ingestd-repo", type=Path, default=REPO, help="the tree the daemon runs (PYTHONPATH)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter the daemon runs with")
    parser.add_argument("--workdir", type=Path, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, help="write the runs as JSON")
    parser.add_argument(
        "--route", action="store_true", help="also de-identify and zip each instance (rules with anonymize)"
    )
    args = parser.parse_args(argv)

    for tool in ("storescu", "echoscu"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: apt-get install dcmtk")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ingestd-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logs, data = workdir / "logs", workdir / "data"
    logs.mkdir(exist_ok=True)
    data.mkdir(exist_ok=True)
    repo = args.ingestd_repo.resolve()
    commit = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(f"ingestd tree {repo} ({commit or '?'}); work folder {workdir}", flush=True)

    daemon = Daemon(workdir, repo, args.python, route=args.route)
    runs: list[Run] = []
    interrupted = False

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        daemon.start()
        sampler = Sampler(daemon.pid, args.interval).start()
        try:
            measure(daemon, sampler, args, data, logs, runs)
        finally:
            sampler.stop()
            hwm = daemon.vm_hwm_mib()
    except KeyboardInterrupt:
        interrupted = True
        hwm = {}
    finally:
        code = daemon.stop()
        for leftover in data.glob("*.dcm"):
            leftover.unlink()

    print()
    print(f"{'run':<26}{'GiB':>6}{'s':>8}{'MB/s':>8}{'idle MiB':>10}{'peak MiB':>10}{'rise MiB':>10}  outcome")
    print("-" * 96)
    for run in runs:
        mb_s = run.bytes_sent / 1e6 / run.seconds if run.seconds else 0.0
        outcome = run.error or ";".join(run.outcomes)
        print(
            f"{run.what:<26}{run.bytes_sent / GIB:>6.2f}{run.seconds:>8.1f}{mb_s:>8.0f}"
            f"{run.idle_mib:>10.1f}{run.peak_mib:>10.1f}{run.rise_mib:>10.1f}  {outcome}"
        )
    print(f"\nVmHWM per process of the daemon's group at the end (MiB): {hwm}")
    print(f"daemon exit status: {code}; log {daemon.log_path}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "tree": str(repo),
                    "commit": commit,
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "cpus": os.cpu_count(),
                    "interval_seconds": args.interval,
                    "runs": [asdict(run) for run in runs],
                    "vm_hwm_mib": hwm,
                },
                indent=2,
            )
        )
    failed = interrupted or any(run.error for run in runs)
    if args.workdir is None and not failed:
        shutil.rmtree(workdir, ignore_errors=True)
    elif failed:
        print(f"kept the work folder for its logs: {workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
