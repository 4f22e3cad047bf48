"""Synthetic MR instances ingestd makes itself: the demo's study and check-xnat's write test."""

from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

__all__ = ["mr_instance"]


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
