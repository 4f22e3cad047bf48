"""Cleaning burned-in text by region (ingestd.deid.pixels), through the streamed path the daemon takes
(`deidentify_file`): real files in every transfer syntax a scanner sends (uncompressed, RLE, JPEG Baseline from
DCMTK's dcmcjpeg, JPEG 2000 lossless and lossy), colour and monochrome, single and multi-frame, checked pixel by
pixel against the source decoded by the same decoders; the headers that describe what was done; dciodvfy finds
no new error; and the hold reasons say what applies and name no patient value."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, MRImageStorage, RLELossless

from ingestd.deid.engine import DeidError, Labels, anonymize, screen
from ingestd.deid.profile import Profile, Rectangle, Region, RegionTest
from ingestd.pipeline.route import deidentify_file
from tests import pixels_data as px

# (kind, frames, colour, bits): an ultrasound cine in colour, a monochrome screen save, a 16-bit OT image.
IMAGES = {
    "us-rgb-3f": ("US", 3, True, 8),
    "sc-mono8": ("SC", 1, False, 8),
    "ot-mono16-2f": ("OT", 2, False, 16),
}
SYNTAXES = ("native", "implicit", "big-endian", "deflated", "rle", "jpeg", "j2k", "j2k-lossy")
KEPT = ("native", "implicit", "deflated")  # uncompressed little endian: the output keeps the source's syntax
LOSSY = {"jpeg": "ISO_10918_1", "j2k-lossy": "ISO_15444_1"}
PATIENT_VALUES = ("Pixel", "Tester", "PX0001", "19700101", "ACC-PX-1")


def _clean_path(tmp_path: Path, source: Path, profile: Profile) -> Path:
    """The file the daemon's path writes for `source` (into `tmp_path/out`)."""
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    written = deidentify_file(source, profile, Labels(), out)
    return out / f"{written.sop_uid}.dcm"


def _clean_one(tmp_path: Path, source: Path, profile: Profile) -> Dataset:
    return dcmread(_clean_path(tmp_path, source, profile))


def _inside(shape: tuple[int, ...], boxes: tuple[Rectangle, ...]) -> np.ndarray:
    """A mask over (frames, rows, columns[, samples]) that is True inside any of the rectangles."""
    mask = np.zeros(shape, dtype=bool)
    for box in boxes:
        mask[:, box.y : box.y + box.height, box.x : box.x + box.width, ...] = True
    return mask


def _frames(ds: Dataset) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames") or 1)
    return arr if frames > 1 else arr[None, ...]


def _errors(path: Path) -> set[str]:
    result = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, check=False)
    return {line.strip() for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")}


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("name", list(IMAGES))
def test_cleaned_pixel_by_pixel(tmp_path: Path, name: str, syntax: str) -> None:
    kind, frames, colour, bits = IMAGES[name]
    if syntax == "jpeg" and bits > 8:
        pytest.skip("JPEG Baseline is 8-bit")
    source = px.encode(px.image(kind, frames=frames, colour=colour, bits=bits), syntax, tmp_path)
    original = dcmread(source)
    out = _clean_one(tmp_path, source, px.profile(px.region()))

    before, after = _frames(original), _frames(out)
    assert after.shape == before.shape
    inside = _inside(after.shape, px.TEXT)
    assert (after[inside] == 0).all()  # black, every sample of every frame
    assert (after[~inside] == before[~inside]).all()  # the rest exactly as the source decodes
    mark_x, mark_y = px.MARK
    assert (after[:, mark_y, mark_x, ...] == before[:, mark_y, mark_x, ...]).all()
    assert (before[inside] != 0).any()  # there was text to remove

    assert out.BurnedInAnnotation == "NO"
    assert [item.CodeValue for item in out.DeidentificationMethodCodeSequence] == ["113100", "113101"]
    assert "pixels region acme-sono9" in list(out.DeidentificationMethod)
    kept = original.file_meta.TransferSyntaxUID if syntax in KEPT else ExplicitVRLittleEndian
    assert out.file_meta.TransferSyntaxUID == kept
    assert out.PhotometricInterpretation == ("RGB" if colour else "MONOCHROME2")
    if syntax == "jpeg" and colour:
        assert original.PhotometricInterpretation == "YBR_FULL_422"  # dcmcjpeg's colour: converted to RGB
    assert out.get("PlanarConfiguration") == (0 if colour else None)
    assert (out.BitsAllocated, out.BitsStored, out.HighBit) == (original.BitsAllocated, bits, bits - 1)
    assert int(out.get("NumberOfFrames") or 1) == frames
    if syntax in LOSSY:
        assert out.LossyImageCompression == "01"
        assert out.LossyImageCompressionMethod == LOSSY[syntax]
    else:
        assert out.get("LossyImageCompression") == original.get("LossyImageCompression")
    assert len(out.PixelData) == after.nbytes + after.nbytes % 2


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("name", list(IMAGES))
def test_no_new_validator_errors(tmp_path: Path, name: str, syntax: str) -> None:
    """dciodvfy -new on the cleaned file finds no error that the source or the header-only output lacks."""
    kind, frames, colour, bits = IMAGES[name]
    if syntax == "jpeg" and bits > 8:
        pytest.skip("JPEG Baseline is 8-bit")
    if syntax == "deflated":
        pytest.skip("dciodvfy does not read Deflated Explicit VR Little Endian (not DCMTK's source either)")
    source = px.encode(px.image(kind, frames=frames, colour=colour, bits=bits), syntax, tmp_path)
    cleaned = _clean_path(tmp_path, source, px.profile(px.region()))
    assert _errors(cleaned) - (_errors(source) | _header_only_errors(tmp_path, source)) == set()


@pytest.mark.parametrize("syntax", ["native", "jpeg", "j2k-lossy"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_compress_rle_stores_the_cleaned_frames_rle_lossless(tmp_path: Path, name: str, syntax: str) -> None:
    """`compress: rle`: the same cleaned pixels, stored RLE Lossless; dciodvfy finds no new error."""
    kind, frames, colour, bits = IMAGES[name]
    if syntax == "jpeg" and bits > 8:
        pytest.skip("JPEG Baseline is 8-bit")
    source = px.encode(px.image(kind, frames=frames, colour=colour, bits=bits), syntax, tmp_path)
    plain = _frames(_clean_one(tmp_path, source, px.profile(px.region())))
    profile = dataclasses.replace(px.profile(px.region()), compress="rle")
    path = _clean_path(tmp_path, source, profile)
    out = dcmread(path)
    assert out.file_meta.TransferSyntaxUID == RLELossless
    assert (_frames(out) == plain).all()
    assert out.BurnedInAnnotation == "NO"
    lossy = "01" if syntax in LOSSY else dcmread(source).get("LossyImageCompression")
    assert out.get("LossyImageCompression") == lossy
    assert _errors(path) - (_errors(source) | _header_only_errors(tmp_path, source)) == set()


def _header_only_errors(tmp_path: Path, source: Path) -> set[str]:
    header_only = tmp_path / "header-only.dcm"
    ds = dcmread(source)
    ds.BurnedInAnnotation = "NO"
    anonymize(ds, px.profile(burned_in="trust-header"), Labels()).save_as(header_only, enforce_file_format=True)
    return _errors(header_only)


def test_no_region_holds_with_what_to_add(tmp_path: Path) -> None:
    source = px.encode(px.image("US"), "native", tmp_path)
    profile = px.profile(px.region(Manufacturer="Other Vendor"))
    with pytest.raises(DeidError) as caught:
        _clean_one(tmp_path, source, profile)
    assert caught.value.code == "burned-in"
    reason = caught.value.reason
    assert reason.startswith("no pixels region of profile pixels matches this instance")
    for said in ("SOP class 1.2.840.10008.5.1.4.1.1.6.1", "modality US", "'Acme Imaging'", "'Sono 9'", "64 x 96"):
        assert said in reason
    assert not any(value in reason for value in PATIENT_VALUES)
    assert not list((tmp_path / "out").iterdir())


def test_first_matching_region_applies(tmp_path: Path) -> None:
    other = Region("other", (RegionTest("Manufacturer", frozenset({"Other"})),), (Rectangle(0, 0, 96, 64),))
    everything = Region("whole", (RegionTest("Modality", frozenset({"US"})),), (Rectangle(0, 0, 96, 64),))
    source = px.encode(px.image("US"), "native", tmp_path)
    out = _clean_one(tmp_path, source, px.profile(other, px.region(), everything))
    assert "pixels region acme-sono9" in list(out.DeidentificationMethod)
    assert (_frames(out)[~_inside(_frames(out).shape, px.TEXT)] != 0).any()


def _held(ds: Dataset, profile: Profile) -> DeidError:
    with pytest.raises(DeidError) as caught:
        screen(ds, profile)
    return caught.value


def test_trust_header_reasons_do_not_advise_trust_header() -> None:
    trust = px.profile(burned_in="trust-header")
    said_yes = px.image("US")
    held = _held(said_yes, trust)
    assert held.code == "burned-in"
    assert held.reason.startswith("Burned In Annotation is YES: its pixels need cleaning; add a pixels region")
    assert "trust-header" not in held.reason.replace("(burned_in: clean)", "")
    silent = px.image("SC", colour=False)
    del silent.BurnedInAnnotation
    held = _held(silent, trust)
    assert "does not say Burned In Annotation NO (trust-header believes only NO)" in held.reason
    assert "set burned_in: trust-header" not in held.reason
    for reason in (_held(said_yes, trust).reason, held.reason):
        assert not any(value in reason for value in PATIENT_VALUES)


def test_hold_advises_trust_header_only_when_the_header_says_no() -> None:
    hold = px.profile(burned_in="hold")
    ds = px.image("US")
    ds.BurnedInAnnotation = "NO"
    assert "set burned_in: trust-header to believe it" in _held(ds, hold).reason
    del ds.BurnedInAnnotation
    assert "trust-header" not in _held(ds, hold).reason


def test_trusted_no_leaves_pixels_and_claims_nothing(tmp_path: Path) -> None:
    ds = px.image("US")
    ds.BurnedInAnnotation = "NO"
    source = px.encode(ds, "native", tmp_path)
    out = _clean_one(tmp_path, source, px.profile(burned_in="trust-header"))
    assert out.PixelData == dcmread(source).PixelData
    assert [item.CodeValue for item in out.DeidentificationMethodCodeSequence] == ["113100"]
    assert out.BurnedInAnnotation == "NO"  # the source's own statement, kept


def test_an_mr_image_is_not_touched(tmp_path: Path) -> None:
    ds = px.image("OT", colour=False)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    del ds.BurnedInAnnotation
    source = px.encode(ds, "native", tmp_path)
    out = _clean_one(tmp_path, source, px.profile(px.region(Modality="MR")))
    assert out.PixelData == dcmread(source).PixelData
    assert "BurnedInAnnotation" not in out
    assert [item.CodeValue for item in out.DeidentificationMethodCodeSequence] == ["113100"]


def test_truncated_jpeg_2000_is_held_as_undecodable(tmp_path: Path) -> None:
    ds = px.image("US", frames=1)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    fragment = list(generate_fragments(ds.PixelData))[-1]  # after the (empty) Basic Offset Table item
    ds.PixelData = encapsulate([fragment[: len(fragment) // 3]])
    source = tmp_path / "cut.dcm"
    ds.save_as(source, enforce_file_format=True)
    with pytest.raises(DeidError) as caught:
        _clean_one(tmp_path, source, px.profile(px.region()))
    assert caught.value.code == "pixel-data"
    assert caught.value.reason == (
        "Pixel Data cannot be decoded (JPEG 2000 Image Compression (Lossless Only): "
        "Error decoding the J2K data: failed to decode image)"
    )
    assert "AttributeError" not in caught.value.reason


def test_a_file_cut_short_inside_pixel_data_is_held_as_such(tmp_path: Path) -> None:
    """pydicom-data's JPEG 2000 file whose Pixel Data the file ends inside: held as unreadable, saying so."""
    source = get_testdata_file("emri_small_jpeg_2k_lossless_too_short.dcm")
    assert source is not None
    with pytest.raises(DeidError) as caught:
        _clean_one(tmp_path, Path(source), px.profile(px.region(Modality="MR")))
    assert caught.value.code == "unreadable"
    assert "the file ends inside its Pixel Data (it was cut short)" in caught.value.reason


def test_too_large_to_clean_in_memory_is_held(tmp_path: Path) -> None:
    source = px.encode(px.image("US", frames=3), "native", tmp_path)
    with pytest.raises(DeidError) as caught:
        _clean_one(tmp_path, source, px.profile(px.region(), max_decoded_bytes=50_000))
    assert caught.value.code == "pixel-data"
    assert "above the 0 MiB the profile pixels cleans in memory: raise pixels.max_decoded_mb" in caught.value.reason


def test_a_rectangle_beyond_the_image_holds(tmp_path: Path) -> None:
    wide = Region("wide", (RegionTest("Modality", frozenset({"US"})),), (Rectangle(90, 0, 10, 10),))
    with pytest.raises(DeidError) as caught:
        screen(px.image("US"), px.profile(wide))
    assert "rectangle 0 of pixels region wide reaches beyond this image (64 x 96" in caught.value.reason


def test_encapsulated_documents_cannot_be_cleaned() -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.104.1", "DOC"
    held = _held(ds, px.profile(px.region(Modality="DOC")))
    assert "encapsulated document" in held.reason


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    boxes=st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 30), st.integers(1, 24), st.integers(1, 16)),
        min_size=1,
        max_size=4,
    ),
    signed=st.booleans(),
    monochrome1=st.booleans(),
)
def test_property_only_rectangles_change(
    boxes: list[tuple[int, int, int, int]], signed: bool, monochrome1: bool
) -> None:
    """Any rectangles on a 16-bit image: inside them the value displayed black, outside every value unchanged."""
    ds = px.image("OT", colour=False, bits=12, rows=48, columns=64)
    rng = np.random.default_rng(len(boxes))
    values = rng.integers(-2048 if signed else 0, 2047 if signed else 4095, size=(48, 64), dtype=np.int16)
    ds.PixelRepresentation = int(signed)
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.PixelData = values.astype(np.int16 if signed else np.uint16).tobytes()
    rectangles = tuple(Rectangle(*box) for box in boxes)
    region = Region("r", (RegionTest("Modality", frozenset({"OT"})),), rectangles)
    out = anonymize(ds, px.profile(region), Labels())
    after = np.frombuffer(bytes(out[0x7FE00010].value.read()), dtype=np.int16 if signed else np.uint16)
    after = after.reshape(1, 48, 64)
    inside = _inside(after.shape, rectangles)
    low, high = (-2048, 2047) if signed else (0, 4095)
    assert (after[inside] == (high if monochrome1 else low)).all()
    assert (after[~inside] == values[None, ...][~inside]).all()
