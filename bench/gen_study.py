"""Generate a synthetic mixed MR/CT study for benchmarks (no real patient data)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


def _instance(sop_class: str, study: str, series: str, *, number: int, rows: int, pixels: bytes) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientName = "Bench^Synthetic"
    ds.PatientID = "BENCH001"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "BENCH"
    ds.Modality = "MR" if sop_class == MRImageStorage else "CT"
    ds.SeriesNumber = 1 if sop_class == MRImageStorage else 2
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = rows
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels
    return ds


def generate(out: Path, mr: int, ct: int, seed: int = 0) -> list[Path]:
    """Write `mr` MR instances of 256x256 and `ct` CT instances of 512x512 into `out`."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    paths = []
    for kind, count, rows, series in (
        (MRImageStorage, mr, 256, generate_uid()),
        (CTImageStorage, ct, 512, generate_uid()),
    ):
        for i in range(count):
            pixels = rng.integers(0, 4096, size=rows * rows, dtype=np.uint16).tobytes()
            ds = _instance(kind, study, series, number=i + 1, rows=rows, pixels=pixels)
            path = out / f"{'MR' if kind == MRImageStorage else 'CT'}{i:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--mr", type=int, default=500)
    parser.add_argument("--ct", type=int, default=300)
    args = parser.parse_args()
    generate(args.out, args.mr, args.ct)


if __name__ == "__main__":
    main()
