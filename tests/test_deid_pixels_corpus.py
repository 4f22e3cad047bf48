"""Cleaning every image file bundled with pydicom and pydicom-data (files no one here wrote: every transfer
syntax, colour model, bit depth and frame count pydicom tests with), each marked Burned In Annotation YES, by a
region that blacks out its top left 2 x 2 pixels: each is cleaned exactly there, or held with a pixel-data
reason; nothing else."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset

from ingestd.deid.engine import DeidError, Labels
from ingestd.deid.profile import Profile, Rectangle, Region, RegionTest
from ingestd.patterns import compile_regex
from ingestd.pipeline.route import deidentify_file

REGION = Region("corner", (RegionTest("Rows", pattern=compile_regex(".")),), (Rectangle(0, 0, 2, 2),))
PROFILE = Profile(name="corpus", key=b"pixel corpus key, tests only, 32", burned_in="clean", regions=(REGION,))
# Held, each for its reason: what the installed decoders cannot read, and what pydicom's own test files break.
EXPECTED_HOLDS = {
    "JPEG-lossy.dcm": "GDCM does not support 'JPEG Extended' for samples with 12-bit precision",
    "JPGExtended.dcm": "GDCM does not support 'JPEG Extended' for samples with 12-bit precision",
    "JPEG2000-embedded-sequence-delimiter.dcm": "Error decoding the J2K data: failed to read the header",
    "MR_truncated.dcm": "cannot reshape array",
    "badVR.dcm": "NumberOfFrames is not a number",
    "liver.dcm": "Bits Allocated 1 is not cleaned",
    "liver_1frame.dcm": "Bits Allocated 1 is not cleaned",
    "liver_expb.dcm": "Bits Allocated 1 is not cleaned",
    "liver_expb_1frame.dcm": "Bits Allocated 1 is not cleaned",
}


def _images() -> list[Path]:
    found = []
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():  # values are converted when read: all of it under the filter
                warnings.simplefilter("ignore")
                ds = dcmread(path, stop_before_pixels=True)
                meta = getattr(ds, "file_meta", None)
                image = bool(meta is not None and "TransferSyntaxUID" in meta and ds.get("Rows"))
                if image and ds.get("SOPInstanceUID"):
                    found.append(path)
        except Exception:  # noqa: BLE001, S112 - what pydicom cannot read is not an image here
            continue
    return found


def _array(ds: Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = ds.pixel_array
    return arr if int(ds.get("NumberOfFrames") or 1) > 1 else arr[None, ...]


@pytest.mark.parametrize("path", _images(), ids=lambda path: path.name)
def test_each_file_is_cleaned_at_the_corner_or_held_with_its_reason(tmp_path: Path, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path)
    if "PixelData" not in ds:
        pytest.skip("pydicom reads no Pixel Data in it (a file cut short: tests/test_deid_pixels.py)")
    ds.BurnedInAnnotation = "YES"
    source = tmp_path / "source.dcm"
    try:
        ds.save_as(source, enforce_file_format=True)
    except Exception:  # noqa: BLE001 - a file pydicom cannot write back is outside this test
        pytest.skip("pydicom cannot write this file back")
    out = tmp_path / "out"
    out.mkdir()
    try:
        with warnings.catch_warnings():  # pydicom warns about the deliberately odd files; not our concern here
            warnings.simplefilter("ignore")
            written = deidentify_file(source, PROFILE, Labels(), out)
    except DeidError as exc:
        if exc.code == "engine" and "no valid Study, Series or SOP Instance UID" in exc.reason:
            pytest.skip("not an instance the router would take")  # pydicom's files with bad UIDs
        assert path.name in EXPECTED_HOLDS, exc.reason
        assert exc.code == "pixel-data"
        assert EXPECTED_HOLDS[path.name] in exc.reason
        return
    assert path.name not in EXPECTED_HOLDS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cleaned = dcmread(out / f"{written.sop_uid}.dcm")
        before, after = _array(dcmread(source)), _array(cleaned)
    assert before.shape == after.shape
    inside = np.zeros(after.shape, dtype=bool)
    inside[:, 0:2, 0:2, ...] = True
    corner = after[inside]
    assert (corner == corner.flat[0]).all()  # one value, displayed black
    assert (after[~inside] == before[~inside]).all()
    assert cleaned.BurnedInAnnotation == "NO"
    assert "113101" in [item.CodeValue for item in cleaned.DeidentificationMethodCodeSequence]
    shutil.rmtree(out)
