"""Synthetic instances ingestd makes itself: the demo's study and check-xnat's write test (MR), and large
multi-frame instances for the memory benchmarks and tests (Enhanced CT, written to disk a piece at a time)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["ENHANCED_CT", "mr_instance", "write_multiframe"]

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
_CHUNK = 8 * 1024 * 1024


def mr_instance(study_uid: str, series_uid: str, *, size: int, pixel_data: bytes, **attributes: Any) -> Dataset:
    """A minimal MR Image Storage instance (explicit VR little endian) with a new SOP Instance UID: `size` x `size`
    16-bit monochrome pixels (`pixel_data`), plus any other attributes by keyword."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = "MR"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixel_data
    return ds


def write_multiframe(
    path: Path,
    frames: int,
    *,
    rows: int = 512,
    columns: int = 512,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    seed: int = 0,
) -> int:
    """Write a multi-frame Enhanced CT instance of `frames` frames of `rows` x `columns` 16-bit pixels (12 stored) to
    `path` (Explicit VR Little Endian) without ever holding it whole: pydicom writes the header, then the Pixel Data
    element is appended a few MiB at a time (noise from `seed`, each piece stamped with its number, so that two
    seeds never give the same bytes). Returns the file's size. No patient data: the names are made up."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyDate, ds.ContentTime = "20260101", "120000"
    ds.Modality = "CT"
    ds.Manufacturer = "ingestd synthetic"
    ds.PatientName, ds.PatientID = "SYNTHETIC^LARGE", "SYN-LARGE"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    length = frames * rows * columns * 2
    if length >= 0xFFFFFFFF:
        raise ValueError("Pixel Data of 4 GiB or more cannot have an explicit length")
    dcmwrite(path, ds, enforce_file_format=True)
    noise = bytearray(random.Random(seed).randbytes(_CHUNK))
    noise[1::2] = noise[1::2].translate(bytes(b & 0x0F for b in range(256)))  # 12 bits stored
    with path.open("ab") as out:
        out.write(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))
        written, piece = 0, 0
        while written < length:
            noise[0:8] = (piece * 1_000_003 + seed).to_bytes(8, "little")
            count = min(_CHUNK, length - written)
            out.write(memoryview(noise)[:count])
            written += count
            piece += 1
    return path.stat().st_size
