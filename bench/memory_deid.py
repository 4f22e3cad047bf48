"""Peak memory of de-identifying and packaging one large multi-frame instance, as the daemon does it.

For each size (default 0.5, 1 and 2 GB of Pixel Data), writes a synthetic multi-frame CT instance to disk by
streaming (the header with pydicom, then Pixel Data in 8 MiB chunks: never whole in memory), then in a fresh
Python process per run does what the router and the deliverer do with it: `ingestd.pipeline.route.deidentify_file`
into an outbox folder (fsync'd), then `ingestd.pipeline.package.write_package` into a zip. The child reports its peak
resident memory (VmHWM from /proc/self/status) after each step; the parent also samples the child's VmRSS
every 50 ms. With `--check`, the parent then verifies (streaming, by SHA-256) that the outbox file parses and
its Pixel Data equals the input's, and that the zip entry equals the outbox file.

Runs against any ingestd tree: `--python` and `--tree` choose the interpreter and the ingestd checkout the
child imports (the child adapts to `deidentify_file`'s signature before and after streaming: it returned the
encoded bytes at eb8ec09, it writes the file since). `--compare` runs "before" (/work/main/.venv/bin/python on
/work/main, the unmodified eb8ec09 code) and "after" (this interpreter on this tree) for every size.

    .venv/bin/python bench/memory_deid.py --compare                       # 0.5, 1, 2 GB, before and after
    .venv/bin/python bench/memory_deid.py --sizes-mb 1100 --check --json -  # what the test runs

See bench/README.md for the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

REPO = Path(__file__).resolve().parent.parent
ROOT_UID = "1.2.826.0.1.3680043.10.543.78"  # synthetic UIDs for the generated instances
FRAME = 512 * 512 * 2  # one 512 x 512 16-bit frame
CHUNK = 8 << 20

# The child: de-identify into an outbox, then zip, as the router and the deliverer do. Prints one JSON line.
CHILD = r"""
import inspect, json, os, sys, time
from pathlib import Path

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return -1.0

source, work = Path(sys.argv[1]), Path(sys.argv[2])
import ingestd
from ingestd.deid.engine import Labels
from ingestd.deid.profile import Profile
from ingestd.journal import Outgoing
from ingestd.pipeline.package import write_package
from ingestd.pipeline.route import deidentify_file
result = {"ingestd": os.path.dirname(ingestd.__file__), "hwm_after_import_mb": hwm()}
profile, labels = Profile(name="basic", key=bytes(range(32))), Labels(project="P", subject="S", session="E")
outbox = work / "outbox" / "1"
outbox.mkdir(parents=True)
started = time.monotonic()
if len(inspect.signature(deidentify_file).parameters) == 3:  # eb8ec09: the encoded file in memory
    from ingestd.spool import write_durably
    out, encoded = deidentify_file(source, profile, labels)
    series, sop = str(out.SeriesInstanceUID), str(out.SOPInstanceUID)
    (outbox / series).mkdir()
    size = write_durably(outbox / series / f"{sop}.dcm", [encoded])
    del out, encoded
else:  # streamed: written into the folder, then moved into its series folder as the router does
    written = deidentify_file(source, profile, labels, outbox)
    series, sop, size = written.series_uid, written.sop_uid, written.size
    (outbox / series).mkdir()
    (outbox / f"{sop}.dcm").rename(outbox / series / f"{sop}.dcm")
result["deid_seconds"] = round(time.monotonic() - started, 2)
result["hwm_after_deid_mb"] = hwm()
item = Outgoing(1, series, sop, f"outbox/1/{series}/{sop}.dcm", size)
started = time.monotonic()
package = write_package([item], work, work / "1.zip")
result["zip_seconds"] = round(time.monotonic() - started, 2)
result["hwm_after_zip_mb"] = hwm()
result.update(outbox_file=str(outbox / series / f"{sop}.dcm"), zip=str(package.path), entry=f"{series}/{sop}.dcm")
print(json.dumps(result))
"""


def generate(path: Path, pixel_bytes: int) -> int:
    """Write a multi-frame CT instance with `pixel_bytes` (rounded down to whole frames) of Pixel Data."""
    frames = max(1, pixel_bytes // FRAME)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{ROOT_UID}.{frames}.3"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{ROOT_UID}.{frames}.1", f"{ROOT_UID}.{frames}.2"
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "Bench^Large", "BENCH0001", "ACC0001"
    ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20260101", "CT", 1, 1
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = 512
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    length = frames * FRAME
    with path.open("wb") as out:
        pydicom.dcmwrite(out, ds, enforce_file_format=True)
        out.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length))
        block = bytearray(os.urandom(CHUNK))
        left = length
        while left:
            n = min(left, CHUNK)
            block[:8] = left.to_bytes(8, "little")  # every chunk differs a little: no accidental dedup
            out.write(memoryview(block)[:n])
            left -= n
    return length


def pixel_digest(path: Path) -> tuple[str, int]:
    """SHA-256 and length of the (native, defined-length) Pixel Data value of a Part 10 file, streamed."""
    with path.open("rb") as fp:
        pydicom.dcmread(fp, stop_before_pixels=True)
        tag, vr, _reserved, length = struct.unpack("<L2sHL", fp.read(12))
        if tag != 0x00107FE0 or vr not in (b"OB", b"OW"):
            raise ValueError("no native Pixel Data where expected")
        return _digest(fp, length), length


def _digest(fp: BinaryIO, length: int | None = None) -> str:
    digest = hashlib.sha256()
    left = length
    while left is None or left > 0:
        chunk = fp.read(CHUNK if left is None else min(CHUNK, left))
        if not chunk:
            break
        digest.update(chunk)
        if left is not None:
            left -= len(chunk)
    return digest.hexdigest()


def _sample(pid: int, peak: list[float], done: threading.Event) -> None:
    while not done.wait(0.05):
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        peak[0] = max(peak[0], int(line.split()[1]) / 1024)
        except OSError:
            return


def run_child(python: str, tree: Path, source: Path, work: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("PYTHONHOME", None)
    started = time.monotonic()
    proc = subprocess.Popen(
        [python, "-c", CHILD, str(source), str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tree,
    )
    peak, done = [0.0], threading.Event()
    sampler = threading.Thread(target=_sample, args=(proc.pid, peak, done), daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    result: dict[str, Any] = {"seconds": round(time.monotonic() - started, 2), "sampled_rss_mb": round(peak[0], 1)}
    if proc.returncode != 0:
        result.update(ok=False, returncode=proc.returncode, error=err.strip().splitlines()[-1:] or ["killed"])
        return result
    result.update(json.loads(out.strip().splitlines()[-1]), ok=True)
    result["peak_rss_mb"] = round(result["hwm_after_zip_mb"], 1)
    return result


def check(result: dict[str, Any], source: Path) -> None:
    """Outbox file parses, its Pixel Data equals the input's; the zip entry equals the outbox file."""
    outbox = Path(result["outbox_file"])
    written = pydicom.dcmread(outbox, stop_before_pixels=True)
    result["parses"] = "PatientName" in written and str(written.PatientName) != "Bench^Large"
    result["pixel_data_equal"] = pixel_digest(outbox) == pixel_digest(source)
    with zipfile.ZipFile(result["zip"]) as archive, archive.open(result["entry"]) as entry:
        in_zip = _digest(entry)
    with outbox.open("rb") as fp:
        result["zip_entry_equal"] = in_zip == _digest(fp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", default="500,1000,2000", help="Pixel Data sizes in MB (10^6 bytes)")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the ingestd run (default: this)")
    parser.add_argument("--tree", type=Path, default=REPO, help="ingestd checkout the child imports")
    parser.add_argument("--compare", action="store_true", help="before (/work/main, eb8ec09) and after (--tree)")
    parser.add_argument("--before-python", default="/work/main/.venv/bin/python")
    parser.add_argument("--before-tree", type=Path, default=Path("/work/main"))
    parser.add_argument("--check", action="store_true", help="verify outputs (Pixel Data, zip entry) by SHA-256")
    parser.add_argument("--work", type=Path, help="folder for the instances and outputs, each removed after its run")
    parser.add_argument("--json", help="write the runs as JSON to this file ('-': stdout, last line)")
    args = parser.parse_args(argv)

    variants = [("after", args.python, args.tree)]
    if args.compare:
        variants.insert(0, ("before", args.before_python, args.before_tree))
    work = args.work or Path(tempfile.mkdtemp(prefix="ingestd-memory-deid-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    try:
        for size_mb in (int(s) for s in args.sizes_mb.split(",")):
            source = work / f"in-{size_mb}.dcm"
            pixel_bytes = generate(source, size_mb * 1_000_000)
            for name, python, tree in variants:
                run_dir = work / f"run-{size_mb}-{name}"
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir()
                result = run_child(python, tree, source, run_dir)
                result.update(variant=name, size_mb=size_mb, pixel_bytes=pixel_bytes, file_bytes=source.stat().st_size)
                if args.check and result["ok"]:
                    check(result, source)
                runs.append(result)
                print(_line(result), file=sys.stderr if args.json == "-" else sys.stdout, flush=True)
                shutil.rmtree(run_dir, ignore_errors=True)
            source.unlink()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report = {"python": sys.version.split()[0], "pydicom": pydicom.__version__, "runs": runs}
    if args.json == "-":
        print(json.dumps(report))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if all(run["ok"] for run in runs) else 1


def _line(run: dict[str, Any]) -> str:
    head = f"{run['size_mb']:>6} MB  {run['variant']:<6}"
    if not run["ok"]:
        return f"{head} failed ({run.get('returncode')}): {' '.join(run.get('error', []))}"
    checked = ""
    if "pixel_data_equal" in run:
        checked = f"  pixel data equal {run['pixel_data_equal']}, zip entry equal {run['zip_entry_equal']}"
    return (
        f"{head} peak RSS: after import {run['hwm_after_import_mb']:.0f} MB, after de-identification "
        f"{run['hwm_after_deid_mb']:.0f} MB, after zip {run['hwm_after_zip_mb']:.0f} MB "
        f"(sampled {run['sampled_rss_mb']:.0f} MB); de-identify {run['deid_seconds']} s, zip {run['zip_seconds']} s"
        f"{checked}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
