"""Benchmark delivery to XNAT: package a study as a `stored` or a `deflated` zip, then upload it.

Generates a synthetic study (gen_study.py) laid out as a routed batch's outgoing instances, then for every
repetition and compression: times `write_package`, a plain streaming POST of the zip to a local HTTP sink that
discards the body (client and loopback cost only), and `XnatClient.import_zip` into the in-process XNAT stand-in
(`FakeXnat`, which also parses and stores every entry). Then measures the peak resident memory of a subprocess
that packages a large set of 1 MB files, for each compression and input size. Prints a table and optionally
writes the raw numbers as JSON. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import requests
from gen_study import _instance, generate
from pydicom import dcmread
from pydicom.uid import CTImageStorage, MRImageStorage, generate_uid

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this working tree's ingestd

from ingestd.config import Credentials, XnatServer  # noqa: E402
from ingestd.journal import Outgoing  # noqa: E402
from ingestd.pipeline.package import Compression, write_package  # noqa: E402
from ingestd.testing.xnat import FakeXnat  # noqa: E402
from ingestd.xnat import XnatClient, XnatError  # noqa: E402

COMPRESSIONS: tuple[Compression, ...] = ("stored", "deflated")
# "deflated-1": write_package's deflated with every entry at zlib level 1, what its `compresslevel=1` means to do
# (on Python 3.11 `ZipFile.open(ZipInfo, "w")` ignores the ZipFile's compresslevel: the entries get zlib's default,
# level 6). A benchmark-only variant, to show what that setting would cost; ingestd has no such option.
VARIANTS = (*COMPRESSIONS, "deflated-1")
HOST = "127.0.0.1"
USER = "bench"
PASSWORD = "bench-password-not-a-secret"  # noqa: S105 - the stand-in's made-up account
PROJECT, SUBJECT, SESSION = "BENCH", "BENCH01", "BENCH01_MR1"
BIG_FILE_BYTES = 1_000_000  # pixel bytes per file of the memory test (500 x 1000 x 16 bit)
SMOOTH_NOISE = 4.0  # standard deviation of the noise on the smooth images, in pixel values (12 bits stored)
UPLOAD_TIMEOUT = 3600.0


class BenchError(Exception):
    """A run that did not complete correctly: its time is not a number."""


# -- the study ----------------------------------------------------------------------------------------


def smooth_pixels(rng: np.random.Generator, rows: int, cols: int, index: int) -> bytes:
    """A 12-bit image in 16 bits: a smooth gradient inside an ellipse ("body"), zero outside, plus noise.

    Deflate (level 1, as `write_package` uses) shrinks these about 2-2.5x, like real CT and MR; random
    12-bit pixels shrink only by the always-zero top 4 bits (about 1.15x).
    """
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y /= rows
    x /= cols
    phase = index * 0.05
    body = ((x - 0.5) / 0.42) ** 2 + ((y - 0.5) / 0.36) ** 2 < 1.0
    wave = np.sin(2 * np.pi * (x * 1.3 + phase)) * np.cos(2 * np.pi * (y * 0.9 - phase))
    image = np.where(body, 900 + 600 * wave + 800 * y, 0.0)
    image += rng.normal(0.0, SMOOTH_NOISE, size=image.shape)
    return np.clip(image, 0, 4095).astype(np.uint16).tobytes()


def generate_smooth(out: Path, mr: int, ct: int, seed: int = 0) -> list[Path]:
    """gen_study.generate with smooth pixels instead of random ones (same headers, sizes and file names)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    paths = []
    for kind, count, rows, series in (
        (MRImageStorage, mr, 256, generate_uid()),
        (CTImageStorage, ct, 512, generate_uid()),
    ):
        for i in range(count):
            pixels = smooth_pixels(rng, rows, rows, i)
            ds = _instance(kind, study, series, number=i + 1, rows=rows, pixels=pixels)
            path = out / f"{'MR' if kind == MRImageStorage else 'CT'}{i:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def outgoing_items(state_dir: Path, files: Sequence[Path]) -> list[Outgoing]:
    """The files as a routed batch's outgoing instances: their UIDs, paths relative to the state dir."""
    items = []
    for number, path in enumerate(files, 1):
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
        relative = str(path.relative_to(state_dir))
        items.append(Outgoing(number, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), relative, path.stat().st_size))
    return items


# -- the HTTP sink --------------------------------------------------------------------------------------


class _Sink(BaseHTTPRequestHandler):
    """Reads a POST body in 1 MiB pieces, discards it, answers 200 with an empty body."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        remaining = int(self.headers.get("Content-Length") or -1)
        if remaining < 0:
            self.send_error(411)
            return
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                return
            remaining -= len(chunk)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def http_sink() -> Iterator[str]:
    """A local HTTP server that swallows uploads; yields its URL."""
    server = ThreadingHTTPServer((HOST, 0), _Sink)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://{HOST}:{server.server_address[1]}/upload"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def upload_to_sink(session: requests.Session, url: str, zip_path: Path) -> float:
    """Stream the zip in one POST, as XnatClient.import_zip does (requests with an open file); seconds."""
    with zip_path.open("rb") as body:
        started = time.perf_counter()
        response = session.post(url, data=body, headers={"Content-Type": "application/zip"}, timeout=UPLOAD_TIMEOUT)
        seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise BenchError(f"the sink answered {response.status_code}")
    return seconds


# -- the XNAT stand-in ----------------------------------------------------------------------------------


def upload_to_stand_in(zip_path: Path, credentials: Path, entries: int) -> float:
    """Import the zip into a fresh FakeXnat 1.8.10 with XnatClient (logged in beforehand); seconds.

    A fresh stand-in per upload: it keeps every file in memory, and each upload is then a first import.
    Afterwards (not timed) checks that the prearchive session is READY and holds every entry.
    """
    with FakeXnat(version="1.8.10") as xnat:
        xnat.add_user(USER, PASSWORD)
        xnat.add_project(PROJECT, members=[USER])
        server = XnatServer(
            url=xnat.url, credentials=Credentials(file=credentials), read_timeout_seconds=UPLOAD_TIMEOUT
        )
        client = XnatClient("stand-in", server)
        try:
            client.login()
            started = time.perf_counter()
            uris = client.import_zip(zip_path, PROJECT, SUBJECT, SESSION)
            seconds = time.perf_counter() - started
            if len(uris) != 1:
                raise BenchError(f"the stand-in answered {len(uris)} URIs: {uris}")
            row = client.prearchive_session(uris[0])
            if row is None or row.status != "READY":
                raise BenchError(f"the prearchive session is {row.status if row else 'missing'}, not READY")
            stored = _prearchive_files(client, uris[0])
            if stored != entries:
                raise BenchError(f"the stand-in holds {stored} of {entries} files")
        finally:
            client.close()
    return seconds


def _result(response: requests.Response) -> list[dict[str, str]]:
    return list(response.json().get("ResultSet", {}).get("Result", []))


def _prearchive_files(client: XnatClient, uri: str) -> int:
    scans = client.request("GET", f"{uri}/scans", "list scans", params={"format": "json"})
    total = 0
    for scan in _result(scans):
        resources = client.request("GET", f"{uri}/scans/{scan['ID']}/resources", "list", params={"format": "json"})
        total += sum(int(r.get("file_count") or 0) for r in _result(resources))
    return total


# -- study runs -----------------------------------------------------------------------------------------


@dataclass
class Run:
    compression: str
    repeat: int
    input_bytes: int
    package_s: float | None = None
    zip_bytes: int | None = None
    sink_s: float | None = None
    stand_in_s: float | None = None
    error: str | None = None

    @property
    def package_mb_per_s(self) -> float | None:
        return self.input_bytes / 1e6 / self.package_s if self.package_s else None

    @property
    def total_s(self) -> float | None:
        """Package plus upload into the stand-in."""
        return self.package_s + self.stand_in_s if self.package_s is not None and self.stand_in_s is not None else None

    @property
    def total_sink_s(self) -> float | None:
        """Package plus upload to the sink (no server work)."""
        return self.package_s + self.sink_s if self.package_s is not None and self.sink_s is not None else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(package_mb_per_s=self.package_mb_per_s, total_s=self.total_s, total_sink_s=self.total_sink_s)
        return data


@dataclass(frozen=True)
class Study:
    state_dir: Path
    items: tuple[Outgoing, ...]
    input_bytes: int
    credentials: Path
    sink_url: str
    session: requests.Session


class _Level1ZipInfo(zipfile.ZipInfo):
    """A ZipInfo whose entry is deflated at level 1 (what ZipFile(compresslevel=1) gives entries it names itself)."""

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._compresslevel = 1


def package(variant: str, items: Sequence[Outgoing], state_dir: Path, target: Path) -> int:
    """write_package with the variant's compression; the zip's size."""
    level1 = variant == "deflated-1"
    compression: Compression = "deflated" if level1 else variant  # type: ignore[assignment]
    with mock.patch.object(zipfile, "ZipInfo", _Level1ZipInfo) if level1 else nullcontext():
        return write_package(items, state_dir, target, compression).size


def run_once(variant: str, repeat: int, study: Study) -> Run:
    run = Run(variant, repeat, study.input_bytes)
    target = study.state_dir / "packages" / f"{variant}-{repeat}.zip"
    target.parent.mkdir(exist_ok=True)
    os.sync()  # no dirty pages of the previous run written back during this one's fsync
    try:
        started = time.perf_counter()
        zip_bytes = package(variant, study.items, study.state_dir, target)
        run.package_s = time.perf_counter() - started
        run.zip_bytes = zip_bytes
        run.sink_s = upload_to_sink(study.session, study.sink_url, target)
        run.stand_in_s = upload_to_stand_in(target, study.credentials, len(study.items))
    except (BenchError, XnatError, requests.RequestException) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        target.unlink(missing_ok=True)
    return run


# -- memory runs ----------------------------------------------------------------------------------------


@dataclass
class MemoryRun:
    compression: str
    files: int
    input_bytes: int
    baseline_kib: int | None = None  # the child's RSS after its imports, before packaging
    peak_kib: int | None = None  # the child's peak RSS (VmHWM at its end)
    seconds: float | None = None
    zip_bytes: int | None = None
    error: str | None = None


def write_big_set(root: Path, count: int, pixels: str) -> list[Outgoing]:
    """`count` files of a minimal DICOM header (preamble, DICM, a Pixel Data element) and 1 MB of pixels."""
    folder = root / "outbox" / "big"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    header = bytes(128) + b"DICM" + b"\xe0\x7f\x10\x00OW\x00\x00" + BIG_FILE_BYTES.to_bytes(4, "little")
    pool = [smooth_pixels(rng, 500, 1000, i * 7) for i in range(8)] if pixels == "smooth" else []
    items = []
    series = generate_uid()
    for number in range(count):
        payload = pool[number % len(pool)] if pool else rng.bytes(BIG_FILE_BYTES)
        path = folder / f"{number:06d}.dcm"
        path.write_bytes(header + payload)
        relative = str(path.relative_to(root))
        items.append(Outgoing(number + 1, series, generate_uid(), relative, len(header) + len(payload)))
    return items


# The memory test's subprocess: imports only ingestd.pipeline.package (and what it needs), packages the manifest's
# files and prints, as JSON, its resident memory before packaging (interpreter + imports) and the time taken.
CHILD = """
import json, sys, time
from pathlib import Path
from ingestd.journal import Outgoing
from ingestd.pipeline.package import write_package

def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0

spec = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
items = [Outgoing(**item) for item in spec["items"]]
baseline = kib("VmRSS")
started = time.perf_counter()
package = write_package(items, Path(spec["state_dir"]), Path(spec["target"]), spec["compression"])
seconds = time.perf_counter() - started
print(json.dumps({"baseline_kib": baseline, "hwm_kib": kib("VmHWM"), "seconds": seconds, "zip": package.size}))
"""


def memory_once(root: Path, items: Sequence[Outgoing], compression: Compression) -> MemoryRun:
    run = MemoryRun(compression, len(items), sum(item.size for item in items))
    target = root / "packages" / f"big-{compression}-{len(items)}.zip"
    target.parent.mkdir(exist_ok=True)
    manifest = root / "manifest.json"
    spec = {"state_dir": str(root), "target": str(target), "compression": compression}
    manifest.write_text(json.dumps({**spec, "items": [asdict(item) for item in items]}), encoding="utf-8")
    output = root / "child.out"
    os.sync()
    try:
        with output.open("wb") as out:
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            # Not ru_maxrss: Linux carries the forking parent's peak RSS over into the child's across exec.
            command = [sys.executable, "-c", CHILD, str(manifest)]
            done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
        text = output.read_text(encoding="utf-8", errors="replace")
        if done.returncode != 0:
            raise BenchError(f"the packaging subprocess exited with {done.returncode}: {text[-500:]}")
        result = json.loads(text.strip().splitlines()[-1])
        run.baseline_kib = int(result["baseline_kib"])
        run.peak_kib = int(result["hwm_kib"])
        run.seconds = float(result["seconds"])
        run.zip_bytes = int(result["zip"])
    except (BenchError, ValueError, OSError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        target.unlink(missing_ok=True)
        manifest.unlink(missing_ok=True)
    return run


# -- report ---------------------------------------------------------------------------------------------

Spread = tuple[float, float, float]  # median, min, max


def _spread(values: Sequence[float | None]) -> Spread | None:
    numbers = [v for v in values if v is not None]
    return (statistics.median(numbers), min(numbers), max(numbers)) if numbers else None


def _fmt(spread: Spread | None, digits: int = 2) -> str:
    if spread is None:
        return "-"
    median, low, high = spread
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


COLUMNS = (
    ("package s", "package_s", 2),
    ("package MB/s", "package_mb_per_s", 0),
    ("zip MB", "zip_mb", 1),
    ("input / zip", "ratio", 2),
    ("upload to sink s", "sink_s", 2),
    ("upload to stand-in s", "stand_in_s", 2),
    ("total s (package + stand-in)", "total_s", 2),
    ("total s (package + sink)", "total_sink_s", 2),
)


def summarize(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for compression in dict.fromkeys(r.compression for r in runs):
        good = [r for r in runs if r.compression == compression and r.error is None]
        failed = sum(1 for r in runs if r.compression == compression and r.error is not None)
        values = {
            "package_s": [r.package_s for r in good],
            "package_mb_per_s": [r.package_mb_per_s for r in good],
            "zip_mb": [r.zip_bytes / 1e6 if r.zip_bytes else None for r in good],
            "ratio": [r.input_bytes / r.zip_bytes if r.zip_bytes else None for r in good],
            "sink_s": [r.sink_s for r in good],
            "stand_in_s": [r.stand_in_s for r in good],
            "total_s": [r.total_s for r in good],
            "total_sink_s": [r.total_sink_s for r in good],
        }
        summary[compression] = {"ok": len(good), "failed": failed} | {k: _spread(v) for k, v in values.items()}
    return summary


def projections(summary: dict[str, dict[str, Any]], links_mbit: Sequence[float]) -> dict[str, dict[str, float]]:
    """Median package time plus the median zip's transfer time on a link of each speed (computed, not measured)."""
    result: dict[str, dict[str, float]] = {}
    for link in links_mbit:
        row = {}
        for compression, values in summary.items():
            if values["package_s"] and values["zip_mb"]:
                row[compression] = values["package_s"][0] + values["zip_mb"][0] * 8 / link
        result[f"{link:g} Mbit/s"] = row
    return result


def _runs_text(values: dict[str, Any]) -> str:
    return f"{values['ok']}" + (f" + {values['failed']} failed" if values["failed"] else "")


def print_report(
    study_info: dict[str, Any],
    summary: dict[str, dict[str, Any]],
    runs: Sequence[Run],
    memory: Sequence[MemoryRun],
    links_mbit: Sequence[float],
) -> None:
    ratios = ", ".join(f"{name} {values['ratio'][0]:.2f}x" for name, values in summary.items() if values["ratio"])
    print(
        f"study: {study_info['instances']} instances, {study_info['bytes'] / 1e6:.1f} MB, {study_info['pixels']} "
        f"pixels; input bytes / zip bytes: {ratios}"
    )
    print()
    names = list(summary)
    print(f"{'median (min-max)':<30}" + "".join(f"{name:<24}" for name in names))
    print(f"{'runs':<30}" + "".join(f"{_runs_text(summary[name]):<24}" for name in names))
    for title, key, digits in COLUMNS:
        print(f"{title:<30}" + "".join(f"{_fmt(summary[name][key], digits):<24}" for name in names))
    print("(median (min-max) over the repetitions; 1 MB = 10^6 bytes; MB/s of input DICOM bytes)")
    print()
    for link, row in projections(summary, links_mbit).items():
        shown = ", ".join(f"{c} {s:.1f} s" for c, s in row.items())
        print(f"computed, package + zip over a {link} link (no server work): {shown}")
    if memory:
        print()
        print(f"{'memory test':<12}{'input GB':>9}{'files':>7}{'peak RSS MiB':>14}{'RSS before MiB':>16}", end="")
        print(f"{'seconds':>9}{'zip GB':>8}")
        for m in memory:
            if m.error:
                print(f"{m.compression:<12}{m.input_bytes / 1e9:>9.2f}{m.files:>7}  ERROR {m.error}")
                continue
            peak = (m.peak_kib or 0) / 1024
            base = (m.baseline_kib or 0) / 1024
            print(
                f"{m.compression:<12}{m.input_bytes / 1e9:>9.2f}{m.files:>7}{peak:>14.1f}{base:>16.1f}"
                f"{m.seconds or 0:>9.1f}{(m.zip_bytes or 0) / 1e9:>8.2f}"
            )
        print("(peak RSS: the packaging subprocess's VmHWM; RSS before: after its imports, before packaging)")
    for run in runs:
        if run.error:
            print(f"ERROR {run.compression} repeat {run.repeat}: {run.error}")


def write_json(
    path: Path,
    study_info: dict[str, Any],
    summary: dict[str, dict[str, Any]],
    runs: Sequence[Run],
    memory: Sequence[MemoryRun],
    links_mbit: Sequence[float],
) -> None:
    data = {
        "command": sys.argv,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version},
        "study": study_info,
        "summary": summary,
        "projections": projections(summary, links_mbit),
        "runs": [r.as_dict() for r in runs],
        "memory": [asdict(m) for m in memory],
    }
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


# -- main -----------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated numbers, e.g. 0.5,2") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("expected numbers >= 0")
    return values


def _variants(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or any(v not in VARIANTS for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list from {', '.join(VARIANTS)}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mr", type=int, default=500, help="MR instances, 256x256x16 bit (default 500)")
    parser.add_argument("--ct", type=int, default=300, help="CT instances, 512x512x16 bit (default 300)")
    parser.add_argument(
        "--pixels",
        choices=("random", "smooth"),
        default="random",
        help="random: incompressible pixels (gen_study.py); smooth: gradient + noise, deflates about 2x like real "
        "images (default random)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per compression, interleaved (default 3)")
    parser.add_argument(
        "--compressions",
        type=_variants,
        default=list(VARIANTS),
        help="comma-separated, from stored, deflated, deflated-1 (level 1, benchmark only); default all three",
    )
    parser.add_argument(
        "--big-gb",
        type=_floats,
        default=[0.5, 2.0],
        help="input sizes of the memory test in GB, comma-separated; 1 MB files (default 0.5,2; 0 skips it)",
    )
    parser.add_argument(
        "--links",
        type=_floats,
        default=[100.0, 1000.0],
        help="link speeds in Mbit/s for the computed package + transfer times (default 100,1000)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder for the study, the zips and the big set, each removed when its runs end; the folder is kept "
        "(default: a temporary folder under /tmp, removed afterwards)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every run and the summary here")
    return parser.parse_args(argv)


@contextmanager
def workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path.resolve()
        return
    temp = Path(tempfile.mkdtemp(prefix="ingestd-bench-deliver-", dir="/tmp"))
    try:
        yield temp
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def bench_study(args: argparse.Namespace, root: Path) -> tuple[dict[str, Any], list[Run]]:
    state_dir = root / "state"
    outbox = state_dir / "outbox" / "1"
    print(f"generating {args.mr} MR + {args.ct} CT instances ({args.pixels} pixels) in {outbox} ...", flush=True)
    files = (generate_smooth if args.pixels == "smooth" else generate)(outbox, args.mr, args.ct)
    items = tuple(outgoing_items(state_dir, files))
    input_bytes = sum(item.size for item in items)
    credentials = root / "xnat-credentials"
    credentials.touch(mode=0o600)
    credentials.chmod(0o600)
    credentials.write_text(f"{USER}:{PASSWORD}\n", encoding="utf-8")
    runs: list[Run] = []
    with http_sink() as sink_url, requests.Session() as session:
        session.trust_env = False
        study = Study(state_dir, items, input_bytes, credentials, sink_url, session)
        for repeat in range(1, args.repeats + 1):
            # Rotate the order so that no variant always runs first or right after another.
            shift = (repeat - 1) % len(args.compressions)
            for compression in args.compressions[shift:] + args.compressions[:shift]:
                run = run_once(compression, repeat, study)
                runs.append(run)
                if run.error:
                    print(f"  repeat {repeat} {compression:<10}: ERROR {run.error}", flush=True)
                else:
                    print(
                        f"  repeat {repeat} {compression:<10}: package {run.package_s:.2f} s, "
                        f"zip {(run.zip_bytes or 0) / 1e6:.1f} MB, sink {run.sink_s:.2f} s, "
                        f"stand-in {run.stand_in_s:.2f} s",
                        flush=True,
                    )
    shutil.rmtree(state_dir / "outbox", ignore_errors=True)
    info = {
        "instances": len(items),
        "mr": args.mr,
        "ct": args.ct,
        "bytes": input_bytes,
        "pixels": args.pixels,
    }
    return info, runs


def bench_memory(args: argparse.Namespace, root: Path) -> list[MemoryRun]:
    sizes = sorted(gb for gb in args.big_gb if gb > 0)
    if not sizes:
        return []
    big = root / "big"
    counts = [max(1, round(gb * 1e9 / BIG_FILE_BYTES)) for gb in sizes]
    print(f"writing {counts[-1]} files of 1 MB ({args.pixels} pixels) for the memory test ...", flush=True)
    items = write_big_set(big, counts[-1], args.pixels)
    results = []
    try:
        for count in counts:
            for compression in COMPRESSIONS:
                run = memory_once(big, items[:count], compression)
                results.append(run)
                shown = run.error or f"peak RSS {(run.peak_kib or 0) / 1024:.1f} MiB, {run.seconds:.1f} s"
                print(f"  memory {run.input_bytes / 1e9:.2f} GB {compression:<10}: {shown}", flush=True)
    finally:
        shutil.rmtree(big, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with workdir(args.workdir) as root:
        study_info, runs = bench_study(args, root)
        memory = bench_memory(args, root)
    summary = summarize(runs)
    print()
    print_report(study_info, summary, runs, memory, args.links)
    if args.json is not None:
        write_json(args.json, study_info, summary, runs, memory, args.links)
    return 1 if any(r.error for r in runs) or any(m.error for m in memory) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
