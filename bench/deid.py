"""Benchmark header de-identification: ingestd's engine against dicognito and dicom-anonymizer.

Builds a 500-instance CT study from pydicom's CT_small.dcm (same header, same 128x128 pixels, new UIDs per
instance), then for every repetition and tool reads each file, de-identifies it and writes it to an empty folder,
timing the whole study. Also times the de-identification of CT_small.dcm alone, in memory. Prints a table and
optionally writes the raw numbers as JSON. See bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this working tree's ingestd, like receive.py runs it

import ingestd  # noqa: E402
from ingestd.deid.engine import Labels, anonymize  # noqa: E402
from ingestd.deid.profile import Profile  # noqa: E402

TOOLS = ("ingestd", "dicognito", "dicom-anonymizer", "read-write")  # the last: no de-identification, a baseline
ROOT = "1.2.826.0.1.3680043.10.543.77"  # synthetic UIDs for the generated study
KEY = bytes(range(32))  # a fixed benchmark key; never a real project's

# A tool: given one data set read from disk, return the data set to write (in place or new).
Anonymize = Callable[[Dataset], Dataset]


def make_ingestd() -> Anonymize:
    profile = Profile(name="basic", key=KEY)
    labels = Labels()
    return lambda ds: anonymize(ds, profile, labels)


def make_dicognito() -> Anonymize:
    from dicognito.anonymizer import Anonymizer  # noqa: PLC0415 - peers are optional, imported when measured

    anonymizer = Anonymizer(seed="ingestd-bench")  # one anonymizer per study keeps its UIDs consistent

    def run(ds: Dataset) -> Dataset:
        anonymizer.anonymize(ds)
        return ds

    return run


def make_dicom_anonymizer() -> Anonymize:
    from dicomanonymizer.simpledicomanonymizer import anonymize_dataset, initialize_actions  # noqa: PLC0415

    rules = functools.partial(initialize_actions, "dicomfields_2026c")  # the current table, not its 2023 default

    def run(ds: Dataset) -> Dataset:
        anonymize_dataset(ds, base_rules_gen=rules, delete_private_tags=True)
        return ds

    return run


def make_read_write() -> Anonymize:
    return lambda ds: ds


FACTORIES: dict[str, Callable[[], Anonymize]] = {
    "ingestd": make_ingestd,
    "dicognito": make_dicognito,
    "dicom-anonymizer": make_dicom_anonymizer,
    "read-write": make_read_write,
}
IN_PLACE = frozenset({"dicognito", "dicom-anonymizer"})  # these modify their input; ingestd returns a new one


def generate(out: Path, count: int) -> list[Path]:
    """`count` copies of CT_small.dcm as one series of one study, each with its own SOP Instance UID."""
    template = dcmread(get_testdata_file("CT_small.dcm"))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, count + 1):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID = f"{ROOT}.1"
        ds.SeriesInstanceUID = f"{ROOT}.2"
        ds.FrameOfReferenceUID = f"{ROOT}.3"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ROOT}.4.{number}"
        ds.InstanceNumber = number
        path = out / f"CT{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass
class Run:
    tool: str
    repeat: int
    instances: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def ms_per_instance(self) -> float:
        return self.seconds * 1000 / self.instances


def run_study(tool: str, paths: list[Path], out: Path, repeat: int) -> Run:
    """Read, de-identify and write every file of the study with a fresh tool instance; the wall time."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    process = FACTORIES[tool]()
    start = time.perf_counter()
    for index, path in enumerate(paths):
        result = process(dcmread(path))
        dcmwrite(out / f"{index:05d}.dcm", result, enforce_file_format=True)
    seconds = time.perf_counter() - start
    written = len(list(out.iterdir()))
    if written != len(paths):
        raise RuntimeError(f"{tool}: wrote {written} of {len(paths)} files")
    return Run(tool, repeat, len(paths), seconds)


def time_single(tool: str, iterations: int) -> dict[str, float]:
    """ms per call on CT_small.dcm in memory (no file I/O); in-place tools get a deep copy, timed separately."""
    template = dcmread(get_testdata_file("CT_small.dcm"))
    process = FACTORIES[tool]()
    samples, copies = [], []
    for _ in range(iterations):
        start = time.perf_counter()
        ds = copy.deepcopy(template) if tool in IN_PLACE else template
        copied = time.perf_counter()
        process(ds)
        done = time.perf_counter()
        copies.append(copied - start)
        samples.append(done - copied)
    return {
        "median_ms": statistics.median(samples) * 1000,
        "min_ms": min(samples) * 1000,
        "max_ms": max(samples) * 1000,
        "deepcopy_median_ms": statistics.median(copies) * 1000,
    }


def summarize(runs: list[Run], tool: str) -> dict[str, float]:
    mine = [run for run in runs if run.tool == tool]
    rates = [run.per_second for run in mine]
    ms = [run.ms_per_instance for run in mine]
    return {
        "instances_per_s_median": statistics.median(rates),
        "instances_per_s_min": min(rates),
        "instances_per_s_max": max(rates),
        "ms_per_instance_median": statistics.median(ms),
        "ms_per_instance_min": min(ms),
        "ms_per_instance_max": max(ms),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=500, help="instances in the study (default 500)")
    parser.add_argument("--repeats", type=int, default=5, help="whole-study runs per tool (default 5)")
    parser.add_argument("--single-iterations", type=int, default=200, help="CT_small.dcm calls per tool")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from {','.join(TOOLS)}")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the study and outputs here")
    parser.add_argument("--json", type=Path, default=None, help="write every run and the summary here")
    args = parser.parse_args(argv)
    args.tools = [tool.strip() for tool in args.tools.split(",") if tool.strip()]
    unknown = set(args.tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools: {', '.join(sorted(unknown))}")
    return args


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "machine": platform.processor() or platform.machine()}
    for package in ("pydicom", "dicognito", "dicom_anonymizer"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    found["ingestd"] = ingestd.__version__
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("ignore")  # peers warn about CT_small's odd values; not what is measured
    root = args.workdir or Path(tempfile.mkdtemp(prefix="ingestd-deid-bench-"))
    try:
        paths = generate(root / "study", args.instances)
        size = sum(path.stat().st_size for path in paths) / len(paths)
        print(f"study: {len(paths)} instances, {size / 1000:.1f} kB each, in {root / 'study'}")
        runs: list[Run] = []
        for repeat in range(1, args.repeats + 1):  # interleaved, so drift on the machine spreads over all tools
            for tool in args.tools:
                run = run_study(tool, paths, root / "out" / tool, repeat)
                runs.append(run)
                print(f"  repeat {repeat} {tool:17s} {run.seconds:7.2f} s  {run.per_second:7.1f} instances/s")
        single = {tool: time_single(tool, args.single_iterations) for tool in args.tools if tool != "read-write"}
        summaries = {tool: summarize(runs, tool) for tool in args.tools}
        print()
        print(f"whole study ({len(paths)} instances: read + de-identify + write), {args.repeats} repeats")
        print(f"{'tool':17s} {'instances/s median (min-max)':>30s} {'ms/instance median (min-max)':>30s}")
        for tool, s in summaries.items():
            rate = f"{s['instances_per_s_median']:.1f} ({s['instances_per_s_min']:.1f}-{s['instances_per_s_max']:.1f})"
            ms = f"{s['ms_per_instance_median']:.2f} ({s['ms_per_instance_min']:.2f}-{s['ms_per_instance_max']:.2f})"
            print(f"{tool:17s} {rate:>30s} {ms:>30s}")
        print()
        print(f"CT_small.dcm in memory, {args.single_iterations} calls (in-place tools on a deep copy, not counted)")
        for tool, s in single.items():
            copied = f"  + deepcopy {s['deepcopy_median_ms']:.2f} ms" if tool in IN_PLACE else ""
            print(f"{tool:17s} {s['median_ms']:.2f} ms median ({s['min_ms']:.2f}-{s['max_ms']:.2f}){copied}")
        if args.json is not None:
            data: dict[str, Any] = {
                "versions": versions(),
                "instances": len(paths),
                "bytes_per_instance": size,
                "runs": [asdict(run) | {"per_second": run.per_second} for run in runs],
                "summary": summaries,
                "ct_small": single,
            }
            args.json.write_text(json.dumps(data, indent=2), encoding="utf-8")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
