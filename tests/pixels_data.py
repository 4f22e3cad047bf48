"""Synthetic images with "text" burned in at known places, for the pixel cleaning tests (tests/test_deid_pixels*).

`image` makes an ultrasound, secondary capture or other instance whose frames are a smooth gradient with bright
blocks of "text" drawn inside the rectangles `TEXT` (and a bright mark outside them that must survive); `encode`
writes it in a transfer syntax: uncompressed as made or converted by DCMTK's dcmconv, RLE Lossless and JPEG 2000
(lossless or lossy) by pydicom's encoders, JPEG Baseline by DCMTK's dcmcjpeg (a real external encoder, as a
scanner's would be).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from ingestd.deid.profile import Profile, Rectangle, Region, RegionTest

__all__ = ["KEY", "MARK", "TEXT", "encode", "image", "profile", "region"]

KEY = b"pixel tests key, 32 bytes long!!"
# Where the "text" is (x, y, width, height), and a mark outside every rectangle that must come out unchanged.
TEXT = (Rectangle(4, 2, 40, 10), Rectangle(60, 50, 20, 8))
MARK = (30, 40)  # (x, y)


def _frames(frames: int, rows: int, columns: int, samples: int, bits: int) -> np.ndarray:
    top = (1 << min(bits, 8)) - 1 if bits == 8 else (1 << bits) - 1
    y, x = np.mgrid[0:rows, 0:columns]
    base = ((x * 2 + y) % (top // 2)).astype(np.uint16 if bits > 8 else np.uint8)
    shape = (frames, rows, columns, samples) if samples > 1 else (frames, rows, columns)
    arr = np.zeros(shape, dtype=base.dtype)
    for index in range(frames):
        plane = (base + index * 3) % (top // 2)
        arr[index] = plane[..., None] if samples > 1 else plane
    for box in TEXT:  # bright "glyphs": every other column of the rectangle, as letters would be
        arr[:, box.y : box.y + box.height, box.x : box.x + box.width : 2, ...] = top
    arr[:, MARK[1], MARK[0], ...] = top
    return arr


def image(
    kind: str = "US", *, frames: int = 1, colour: bool = True, rows: int = 64, columns: int = 96, bits: int = 8
) -> Dataset:
    """An uncompressed instance: `kind` US (Ultrasound, multi-frame when frames > 1), SC or OT (Secondary
    Capture with that modality); RGB when `colour`, else MONOCHROME2 (8 or 16 bits)."""
    sop_class = SecondaryCaptureImageStorage
    if kind == "US":
        sop_class = UltrasoundMultiFrameImageStorage if frames > 1 else UltrasoundImageStorage
    samples = 3 if colour else 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Pixel^Tester", "PX0001", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260102", "101010", "ACC-PX-1", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = kind
    ds.ConversionType = "WSD" if kind != "US" else None
    if kind == "US":
        del ds.ConversionType
    ds.Manufacturer, ds.ManufacturerModelName = "Acme Imaging", "Sono 9"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if kind == "US" else ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063
        ds.FrameTime = 33.3
    if kind == "US":
        ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "YES"
    ds.PixelData = _frames(frames, rows, columns, samples, bits).tobytes()
    return ds


_DCMCONV = {"implicit": "+ti", "big-endian": "+tb", "deflated": "+td"}  # DCMTK's dcmconv, uncompressed


def encode(ds: Dataset, syntax: str, folder: Path) -> Path:
    """Write `ds` in transfer syntax `syntax` (native, implicit, big-endian, deflated, rle, jpeg, j2k, j2k-lossy)
    into `folder`; return the path."""
    path = folder / f"{syntax}-{ds.SOPInstanceUID}.dcm"
    if syntax == "native":
        ds.save_as(path, enforce_file_format=True)
    elif syntax == "rle":
        ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
        ds.save_as(path, enforce_file_format=True)
    elif syntax in ("j2k", "j2k-lossy"):
        if syntax == "j2k":
            ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        else:
            ds.compress(JPEG2000, j2k_psnr=[45.0], generate_instance_uid=False)
            ds.LossyImageCompression = "01"
        ds.save_as(path, enforce_file_format=True)
    elif syntax in _DCMCONV:
        native = folder / f"native-for-{syntax}-{ds.SOPInstanceUID}.dcm"
        ds.save_as(native, enforce_file_format=True)
        subprocess.run(["dcmconv", _DCMCONV[syntax], str(native), str(path)], check=True, capture_output=True)
        native.unlink()
    elif syntax == "jpeg":
        native = folder / f"native-for-jpeg-{ds.SOPInstanceUID}.dcm"
        ds.save_as(native, enforce_file_format=True)
        subprocess.run(["dcmcjpeg", "--encode-baseline", str(native), str(path)], check=True, capture_output=True)
        native.unlink()
        assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    else:
        raise ValueError(syntax)
    return path


def region(name: str = "acme-sono9", **when: str) -> Region:
    tests = tuple(RegionTest(keyword, frozenset({value})) for keyword, value in when.items())
    return Region(name=name, when=tests or (RegionTest("Manufacturer", frozenset({"Acme Imaging"})),), rectangles=TEXT)


def profile(*regions: Region, burned_in: str = "clean", max_decoded_bytes: int = 1 << 30) -> Profile:
    return Profile(
        name="pixels",
        key=KEY,
        burned_in=burned_in,  # type: ignore[arg-type]
        regions=regions,
        max_decoded_bytes=max_decoded_bytes,
    )
