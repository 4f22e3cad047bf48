"""Time and peak memory to clean burned-in text from one large ultrasound cine, as the daemon does it.

Writes a synthetic multi-frame ultrasound instance (default 300 frames of 800 x 600 RGB, 432 MB decoded) in each
transfer syntax asked for (uncompressed; JPEG Baseline by DCMTK's dcmcjpeg, as a scanner sends it; RLE Lossless),
then in a fresh Python process per run calls `ingestd.pipeline.route.deidentify_file` with a profile whose region
matches it (two rectangles: a banner across the top and a box in a corner). The child reports the wall time of
the call and its peak resident memory (VmHWM from /proc/self/status) before and after it; the parent checks that
the output's first and last frames are black inside the rectangles.

    .venv/bin/python bench/pixels.py                                   # native and jpeg, 300 frames
    .venv/bin/python bench/pixels.py --frames 60 --syntaxes native rle --compress rle --json -

See bench/README.md for the numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, UltrasoundMultiFrameImageStorage, generate_uid

REPO = Path(__file__).resolve().parent.parent
BANNER = (0, 0, 800, 40)  # x, y, width, height
CORNER = (600, 540, 200, 60)

CHILD = r"""
import json, sys, time
from pathlib import Path

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return -1.0

source, out = Path(sys.argv[1]), Path(sys.argv[2])
from ingestd.deid.engine import Labels
from ingestd.deid.profile import Profile, Rectangle, Region, RegionTest
from ingestd.pipeline.route import deidentify_file
region = Region("bench", (RegionTest("Modality", frozenset({"US"})),),
                (Rectangle(*json.loads(sys.argv[3])), Rectangle(*json.loads(sys.argv[4]))))
profile = Profile(name="bench", key=b"bench key, 32 bytes, not secret", burned_in="clean", regions=(region,),
                  max_decoded_bytes=4 << 30, compress=sys.argv[5])
before = hwm()
started = time.perf_counter()
written = deidentify_file(source, profile, Labels(), out)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "hwm_before_mb": before, "hwm_after_mb": hwm(), "sop_uid": written.sop_uid,
                  "size": written.size}))
"""


def _instance(frames: int, rows: int, columns: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.StudyDate, ds.Modality = "Bench^Pixels", "BENCH1", "20260101", "US"
    ds.Manufacturer, ds.ManufacturerModelName = "Acme Imaging", "Sono 9"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.FrameIncrementPointer, ds.FrameTime = 0x00181063, 33.3
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.BurnedInAnnotation = "YES"
    y, x = np.mgrid[0:rows, 0:columns]
    frame = np.stack([(x // 3) % 200, (y // 3) % 200, (x + y) % 200], axis=-1).astype(np.uint8)
    frame[BANNER[1] : BANNER[1] + BANNER[3] : 3, : BANNER[2] : 2] = 255
    cine = np.broadcast_to(frame, (frames, rows, columns, 3))
    ds.PixelData = cine.tobytes()
    return ds


def _write(ds: Dataset, syntax: str, folder: Path) -> Path:
    native = folder / "native.dcm"
    if not native.exists():
        ds.save_as(native, enforce_file_format=True)
    if syntax == "native":
        return native
    path = folder / f"{syntax}.dcm"
    if syntax == "jpeg":
        subprocess.run(["dcmcjpeg", "--encode-baseline", str(native), str(path)], check=True)
    elif syntax == "rle":
        copy = dcmread(native)
        copy.compress(RLELossless, encoding_plugin="gdcm", generate_instance_uid=False)
        copy.save_as(path, enforce_file_format=True)
    return path


def _run(source: Path, out: Path, compress: str) -> dict[str, Any]:
    out.mkdir()
    args = [sys.executable, "-c", CHILD, str(source), str(out), json.dumps(BANNER), json.dumps(CORNER), compress]
    result = subprocess.run(args, check=True, capture_output=True, text=True, cwd=REPO)
    row: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    cleaned = dcmread(out / f"{row['sop_uid']}.dcm")
    frames = cleaned.pixel_array
    for index in (0, len(frames) - 1):
        for x, y, width, height in (BANNER, CORNER):
            assert (frames[index, y : y + height, x : x + width] == 0).all()
    row["output_syntax"] = cleaned.file_meta.TransferSyntaxUID.name
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--columns", type=int, default=800)
    parser.add_argument("--syntaxes", nargs="+", default=["native", "jpeg"], choices=["native", "jpeg", "rle"])
    parser.add_argument("--compress", choices=["none", "rle"], default="none", help="the profile's pixels.compress")
    parser.add_argument("--json", help="also write the rows as JSON to this file ('-': stdout)")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-pixels-") as temp:
        folder = Path(temp)
        ds = _instance(args.frames, args.rows, args.columns)
        decoded_mb = args.frames * args.rows * args.columns * 3 / (1 << 20)
        for syntax in args.syntaxes:
            started = time.perf_counter()
            source = _write(ds, syntax, folder)
            made = time.perf_counter() - started
            row = {"syntax": syntax, "compress": args.compress, "frames": args.frames}
            row["decoded_mb"] = round(decoded_mb, 1)
            row["source_mb"] = round(source.stat().st_size / (1 << 20), 1)
            row.update(_run(source, folder / f"out-{syntax}", args.compress))
            row["made_seconds"] = round(made, 1)
            rows.append(row)
            print(
                f"{syntax:7} {row['source_mb']:8.1f} MB in -> {row['size'] / (1 << 20):8.1f} MB out "
                f"({row['output_syntax']}): {row['seconds']:6.2f} s, peak RSS {row['hwm_after_mb']:7.1f} MB "
                f"(before the call {row['hwm_before_mb']:.1f} MB; decoded {decoded_mb:.0f} MB)"
            )
    if args.json:
        text = json.dumps(rows, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
