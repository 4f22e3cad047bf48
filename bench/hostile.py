"""Benchmark a legitimate C-ECHO's latency while hostile connections hold the DICOM port.

Starts an ingestd daemon (any build: `--ingestd` names its executable, so an older checkout can be measured
"before"), measures C-ECHO latencies with nothing else connected, then opens `--hostile` connections that are
silent or trickle an A-ASSOCIATE-RQ a byte at a time and keeps that many open (a closed one is opened again,
as an attacker would), and measures C-ECHO latencies again for `--seconds`. Each C-ECHO is one association
attempt with `--echo-timeout`; a refused or timed-out attempt counts as failed. Prints latency percentiles,
failures and the daemon's peak thread count and RSS (from /proc). Everything runs on 127.0.0.1.

    .venv/bin/python bench/hostile.py --kind trickle --hostile 200
    .venv/bin/python bench/hostile.py --ingestd /path/to/old/.venv/bin/ingestd --kind trickle
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pynetdicom import AE

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _item(kind: int, value: bytes) -> bytes:
    return bytes((kind, 0)) + len(value).to_bytes(2, "big") + value


def associate_rq() -> bytes:
    """A valid A-ASSOCIATE-RQ proposing Verification, Explicit VR Little Endian."""
    context = bytes((1, 0, 0, 0)) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2.1")
    user = _item(0x51, (16384).to_bytes(4, "big")) + _item(0x52, b"1.2.826.0.1.3680043.9.7433.1")
    body = (
        b"\x00\x01\x00\x00"
        + b"INGESTD".ljust(16)
        + b"HOSTILE".ljust(16)
        + bytes(32)
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + _item(0x20, context)
        + _item(0x50, user)
    )
    return b"\x01\x00" + len(body).to_bytes(4, "big") + body


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Hostile:
    """`count` connections kept open, each silent or trickling an A-ASSOCIATE-RQ one byte every `interval` s."""

    def __init__(self, port: int, count: int, kind: str, source: str, interval: float = 1.0) -> None:
        self.port, self.count, self.kind, self.source, self.interval = port, count, kind, source, interval
        self.payload = associate_rq()
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _open(self) -> socket.socket | None:
        try:
            sock = socket.create_connection((HOST, self.port), timeout=2, source_address=(self.source, 0))
        except OSError:
            return None
        sock.setblocking(False)
        return sock

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        sent: dict[socket.socket, int] = {}
        try:
            while not self._stop.is_set():
                while len(sent) < self.count and not self._stop.is_set():
                    sock = self._open()
                    if sock is None:
                        break
                    sent[sock] = 0
                    selector.register(sock, selectors.EVENT_READ)
                    self.reopened += 1
                for key, _ in selector.select(0):  # readable: closed by the other end (or an abort)
                    sock = key.fileobj  # type: ignore[assignment]
                    with contextlib.suppress(BlockingIOError):
                        try:
                            if sock.recv(4096):
                                continue
                        except OSError:
                            pass
                        selector.unregister(sock)
                        sock.close()
                        sent.pop(sock, None)
                if self.kind == "trickle":
                    for sock, at in list(sent.items()):
                        if at < len(self.payload):
                            with contextlib.suppress(OSError):
                                sent[sock] = at + sock.send(self.payload[at : at + 1])
                self._stop.wait(self.interval)
        finally:
            for sock in sent:
                sock.close()
            selector.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def echo(port: int, timeout: float) -> float | None:
    """Seconds for one association + C-ECHO + release, or None if it failed."""
    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    start = time.monotonic()
    assoc = ae.associate(HOST, port, ae_title="INGESTD")
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        ok = bool(status) and status.Status == 0
    finally:
        assoc.release()
    return time.monotonic() - start if ok else None


def measure(port: int, pid: int, seconds: float, timeout: float, limit: int) -> dict[str, float]:
    latencies: list[float] = []
    failed = 0
    threads = rss = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(latencies) + failed < limit:
        took = echo(port, timeout)
        if took is None:
            failed += 1
            time.sleep(0.2)
        else:
            latencies.append(took)
        threads = max(threads, proc_status(pid, "Threads"))
        rss = max(rss, proc_status(pid, "VmRSS"))
    result: dict[str, float] = {"ok": len(latencies), "failed": failed, "threads": threads, "rss_mb": rss / 1024}
    if latencies:
        ordered = sorted(latencies)
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            result[name] = ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000
        result["max"] = ordered[-1] * 1000
        result["mean"] = statistics.fmean(latencies) * 1000
    return result


def _line(label: str, r: dict[str, float]) -> str:
    lat = (
        f"p50 {r['p50']:7.1f} ms  p90 {r['p90']:7.1f} ms  p99 {r['p99']:7.1f} ms  max {r['max']:7.1f} ms"
        if r["ok"]
        else "no C-ECHO succeeded"
    )
    counts = f"ok {r['ok']:4.0f}  failed {r['failed']:4.0f}"
    return f"{label:<24} {counts}  {lat}  threads {r['threads']:4.0f}  RSS {r['rss_mb']:.0f} MB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(sys.executable).with_name("ingestd")
    parser.add_argument("--ingestd", type=Path, default=default, help="the ingestd executable (default: %(default)s)")
    parser.add_argument("--kind", choices=("silent", "trickle"), default="trickle")
    parser.add_argument("--hostile", type=int, default=200, help="hostile connections kept open")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to measure under attack")
    parser.add_argument("--echoes", type=int, default=200, help="at most this many C-ECHOs per phase")
    parser.add_argument("--echo-timeout", type=float, default=10.0)
    parser.add_argument(
        "--hostile-from",
        default="127.0.0.2",
        help="loopback address the hostile connections come from (the C-ECHOs come from 127.0.0.1)",
    )
    parser.add_argument(
        "--listener-extra", default="", help="keys added to the listener section, e.g. 'max_connections: 400'"
    )
    args = parser.parse_args()
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

    folder = Path(tempfile.mkdtemp(prefix="ingestd-hostile-"))
    port = free_port()
    config = folder / "ingestd.yaml"
    config.write_text(
        f"state_dir: {folder / 'state'}\n"
        f"listener: {{host: {HOST}, port: {port}, ae_title: INGESTD"
        + (f", {args.listener_extra}" if args.listener_extra else "")
        + "}\n"
        "spool: {min_free_mb: 10}\n"
        "logging: {level: warning, format: json}\n"
        "metrics: {enabled: false}\n",
        encoding="utf-8",
    )
    log = (folder / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [str(args.ingestd), "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=folder
    )
    try:
        deadline = time.monotonic() + 60
        while echo(port, 2) is None:
            if daemon.poll() is not None or time.monotonic() > deadline:
                print((folder / "daemon.log").read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"ingestd: {args.ingestd}  hostile: {args.hostile} {args.kind} from {args.hostile_from}")
        print(f"listener: {args.listener_extra or 'defaults'}")
        print(_line("quiet", measure(port, daemon.pid, 10, args.echo_timeout, 50)))
        hostile = Hostile(port, args.hostile, args.kind, args.hostile_from)
        hostile.start()
        try:
            time.sleep(2)  # let them connect
            under = measure(port, daemon.pid, args.seconds, args.echo_timeout, args.echoes)
        finally:
            hostile.stop()
        print(_line(f"under {args.hostile} {args.kind}", under))
        print(f"hostile connections opened in all (reopened after ingestd closed them): {hostile.reopened}")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(90)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
