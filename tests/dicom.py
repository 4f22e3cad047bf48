"""Builders for tiny synthetic DICOM instances (no real patient data is ever committed)."""

from __future__ import annotations

import tarfile
import zipfile
from copy import deepcopy
from io import BytesIO
from pathlib import Path
from typing import Literal

from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

# pynetdicom.sop_class builds its names at import time (invisible to mypy); the tests take UIDs from here.
VERIFICATION = UID("1.2.840.10008.1.1")

TarMode = Literal["w", "w:gz", "w:bz2", "w:xz"]


def make_instance(
    study_uid: str | None = None,
    series_uid: str | None = None,
    *,
    sop_class: str = MRImageStorage,
    number: int = 1,
    rows: int = 16,
    fill: int = 0,
) -> Dataset:
    """A small valid image instance with file meta, Explicit VR Little Endian."""
    ds = Dataset()
    sop_uid = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "Synthetic^Test"
    ds.PatientID = "SYN0001"
    ds.StudyDate = "20260101"
    ds.Modality = "MR" if sop_class == MRImageStorage else "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = rows
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes([(fill + number) % 256]) * (rows * rows * 2)
    return ds


def make_study(series: int = 2, per_series: int = 3, *, sop_class: str = MRImageStorage) -> list[Dataset]:
    """Instances of one study: `series` series of `per_series` instances each."""
    study_uid = generate_uid()
    out: list[Dataset] = []
    for _ in range(series):
        series_uid = generate_uid()
        out.extend(make_instance(study_uid, series_uid, sop_class=sop_class, number=i + 1) for i in range(per_series))
    return out


def pydicom_file(name: str) -> Path:
    """The path of one of pydicom's test files."""
    found = get_testdata_file(name)
    assert isinstance(found, str), f"pydicom has no test file {name}"
    return Path(found)


def write_instances(datasets: list[Dataset], folder: Path, *, suffix: str = ".dcm") -> list[Path]:
    """Write each dataset as a Part 10 file into `folder`; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        path = folder / f"IM{index:04d}{suffix}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def encode(ds: Dataset) -> bytes:
    """The dataset as the bytes of a Part 10 file (preamble, DICM, file meta, data set)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encode_raw(ds: Dataset, *, implicit: bool = False) -> bytes:
    """The bare data set, without preamble or file meta, Explicit (or Implicit) VR Little Endian."""
    copy = deepcopy(ds)
    copy.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    data = encode(copy)
    # (0002,0000) File Meta Information Group Length: the meta ends that many bytes after it.
    return data[144 + int.from_bytes(data[140:144], "little") :]


__all__ = [
    "CTImageStorage",
    "MRImageStorage",
    "encode",
    "encode_raw",
    "make_instance",
    "make_study",
    "write_instances",
]


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A deflated zip of `members` (name -> bytes), in memory."""
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], mode: TarMode) -> bytes:
    """A tar of `members` (name -> bytes) in `mode` (`w`, `w:gz`, `w:bz2`), in memory."""
    buffer = BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, BytesIO(data))
    return buffer.getvalue()
