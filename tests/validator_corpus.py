"""The corpus of tests/test_deid_validator.py, built in the test run from files on this machine (no network).

Sources, each named by where it comes from (the names are the allow-list's and the failures' vocabulary):
  pydicom:<file>        pydicom's own test files (`pydicom.data.get_testdata_files()`)
  pydicom-data:<file>   the pydicom-data package's, which pydicom finds as an external data source
  deid-data:<dir/file>  the deid-data package's DICOM files (its two zipped ultrasound cines are left out: 100 MB)
  dcmtk:<file>><how>    DCMTK conversions of a representative subset (`CONVERSIONS`) into other transfer syntaxes

Only instances pydicom reads (not a DICOMDIR, with a SOP Instance UID and a transfer syntax) and the daemon's
reader opens (`ingestd.deid.stream.open_instance`) are kept; the others are counted by reason.

`deidentify` is the write path of the daemon and `ingestd anonymize`, `ingestd.pipeline.route.deidentify_file`
(`open_instance`, `screen`, `anonymize`, `write_instance`); an instance `screen` holds (burned-in text, structured
reports) is de-identified anyway by the same calls after `screen`, and counted, as tests/test_deid_corpus.py does.
"""

from __future__ import annotations

import importlib.resources
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom.data
from pydicom import dcmread
from pydicom.data import get_testdata_files

from ingestd.deid.engine import DeidError, Labels, anonymize, screen
from ingestd.deid.profile import Profile
from ingestd.deid.stream import open_instance, write_instance
from ingestd.pipeline.route import deidentify_file

__all__ = [
    "CONVERSIONS",
    "OPTION_SETS",
    "Deidentified",
    "Source",
    "dcmtk_conversions",
    "deidentify",
    "packaged_sources",
    "reencode",
    "tools_missing",
    "usable",
]

# The option sets every instance is de-identified with (E.3 option names, ingestd.deid.table.SUPPORTED_OPTIONS).
OPTION_SETS: dict[str, frozenset[str]] = {
    "basic": frozenset(),
    "uids+full-dates": frozenset({"retain-uids", "retain-longitudinal-full-dates"}),
    "characteristics+device+institution": frozenset(
        {"retain-patient-characteristics", "retain-device-identity", "retain-institution-identity"}
    ),
    "descriptors+structured+graphics": frozenset({"clean-descriptors", "clean-structured-content", "clean-graphics"}),
}

# DCMTK command lines (Debian's dcmtk: no JPEG 2000 encoder) -> the source names they convert.
_IMAGES = ("pydicom:CT_small.dcm", "pydicom:MR_small.dcm", "pydicom-data:SC_rgb.dcm", "pydicom-data:emri_small.dcm")
CONVERSIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "implicit": (("dcmconv", "+ti"), (*_IMAGES, "pydicom:rtstruct.dcm")),
    "big-endian": (("dcmconv", "+tb"), (*_IMAGES, "pydicom:rtstruct.dcm")),
    "deflated": (("dcmconv", "+td"), (*_IMAGES, "pydicom:rtstruct.dcm")),
    "explicit": (("dcmconv", "+te"), ("pydicom:MR_small_implicit.dcm", "pydicom-data:US1_UNCI.dcm")),
    "rle": (("dcmcrle",), _IMAGES),
    "jpeg-lossless-sv1": (("dcmcjpeg",), _IMAGES),
    "jpeg-baseline": (("dcmcjpeg", "+eb"), ("pydicom-data:SC_rgb.dcm", "pydicom-data:US1_UNCR.dcm")),
    "jpeg-extended": (("dcmcjpeg", "+ee"), ("pydicom:CT_small.dcm",)),
    "jpeg-ls-lossless": (("dcmcjpls",), _IMAGES),
    "jpeg-ls-near-lossless": (("dcmcjpls", "+en"), ("pydicom-data:emri_small.dcm", "pydicom-data:SC_rgb.dcm")),
    "jpeg-decoded": (("dcmdjpeg",), ("pydicom-data:JPGLosslessP14SV1_1s_1f_8b.dcm", "pydicom:SC_rgb_jpeg_dcmtk.dcm")),
    "rle-decoded": (("dcmdrle",), ("pydicom:MR_small_RLE.dcm",)),
    "jpeg-ls-decoded": (("dcmdjpls",), ("pydicom:MR_small_jpeg_ls_lossless.dcm",)),
}


@dataclass(frozen=True)
class Source:
    name: str  # "pydicom:CT_small.dcm", "dcmtk:CT_small.dcm>rle", ...
    path: Path


def packaged_sources() -> list[Source]:
    """pydicom's, pydicom-data's and deid-data's files, by name."""
    own = Path(pydicom.data.__file__).parent
    sources = []
    for name in sorted(get_testdata_files()):
        path = Path(name)
        origin = "pydicom" if path.is_relative_to(own) else "pydicom-data"
        sources.append(Source(f"{origin}:{path.name}", path))
    deid_data = Path(str(importlib.resources.files("deid_data") / "data"))
    sources += [Source(f"deid-data:{path.relative_to(deid_data)}", path) for path in sorted(deid_data.rglob("*.dcm"))]
    return sources


def dcmtk_conversions(sources: list[Source], folder: Path) -> tuple[list[Source], list[str]]:
    """Each of CONVERSIONS run on its sources into `folder`; returns the converted files and, for the ones DCMTK
    refused, "<source> > <conversion>: <DCMTK's first error line>"."""
    by_name = {source.name: source for source in sources}
    converted: list[Source] = []
    failed: list[str] = []
    for conversion, (command, names) in CONVERSIONS.items():
        for name in names:
            if name not in by_name:
                failed.append(f"{name} > {conversion}: not in the corpus")
                continue
            target = folder / f"{len(converted) + len(failed):03d}-{conversion}.dcm"
            result = subprocess.run(
                [*command, str(by_name[name].path), str(target)],
                capture_output=True,
                text=True,
                errors="replace",
                check=False,
                timeout=120,
            )
            if result.returncode != 0 or not target.is_file():
                first = next((line for line in result.stderr.splitlines() if line.startswith("E:")), "")
                failed.append(f"{name} > {conversion}: exit {result.returncode} {first}".rstrip())
                continue
            converted.append(Source(f"dcmtk:{name.partition(':')[2]}>{conversion}", target))
    return converted, failed


def usable(source: Source, scratch: Path) -> str | None:
    """Why the instance is left out of the corpus, or None when pydicom and the daemon's reader both read it."""
    try:
        with warnings.catch_warnings():  # pydicom warns about the deliberately odd files; not our concern here
            warnings.simplefilter("ignore")
            ds = dcmread(source.path)
    except Exception:  # noqa: BLE001 - whatever pydicom cannot read is outside this test
        return "unreadable by pydicom"
    meta = getattr(ds, "file_meta", None)
    if "DirectoryRecordSequence" in ds:
        return "DICOMDIR"
    if "SOPInstanceUID" not in ds or meta is None or "TransferSyntaxUID" not in meta:
        return "no SOP Instance UID or no transfer syntax"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_instance(source.path, scratch):
                pass
    except DeidError:
        return "refused by the daemon's reader (unreadable)"
    return None


def reencode(source: Path, target: Path) -> bool:
    """`source` as DCMTK reads and writes it in its own transfer syntax (`dcmconv +t=`), not de-identified: the
    baseline of an input dciodvfy cannot read to the end (an odd-length element, say) whose re-encoding it reads.
    False when DCMTK cannot read it either."""
    result = subprocess.run(["dcmconv", "+t=", str(source), str(target)], capture_output=True, check=False, timeout=120)
    return result.returncode == 0 and target.is_file()


@dataclass(frozen=True)
class Deidentified:
    path: Path | None  # None when the engine held the instance
    held_by_screen: str | None  # the hold code `screen` gives (the instance is de-identified anyway)
    held: str | None  # the engine's hold code when `anonymize` or `write_instance` refused it


def deidentify(source: Path, options: frozenset[str], folder: Path, scratch: Path) -> Deidentified:
    """`source` de-identified with the basic profile and `options` into the empty folder `folder` by the daemon's
    `deidentify_file`. When `screen` holds it, the hold is recorded and the instance de-identified anyway, by the
    same calls `deidentify_file` makes after `screen` (`anonymize`, `write_instance`)."""
    profile = Profile(name="validator", key=b"validator key, tests only, 32 b", options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            written = deidentify_file(source, profile, Labels(), folder)
            return Deidentified(folder / f"{written.sop_uid}.dcm", None, None)
        except DeidError as exc:
            held = str(exc.code)
        with open_instance(source, scratch) as instance:
            try:
                screen(instance.dataset, profile)
            except DeidError:
                pass
            else:
                return Deidentified(None, None, held)  # held after screen: by the engine or the writer
            try:
                target = folder / "screened.dcm"
                write_instance(anonymize(instance.dataset, profile, Labels()), target)
            except DeidError as exc:
                return Deidentified(None, held, str(exc.code))
    return Deidentified(target, held, None)


def tools_missing() -> list[str]:
    """The DCMTK and dicom3tools programs this corpus needs that are not on PATH."""
    needed = {"dciodvfy"} | {command[0] for command, _names in CONVERSIONS.values()}
    return sorted(tool for tool in needed if shutil.which(tool) is None)
