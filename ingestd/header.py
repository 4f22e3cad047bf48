"""Read the few header values the journal needs, without decoding the rest of an instance.

Pure functions over bytes: no file or socket is touched here.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset, read_partial
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from ingestd import __version__
from ingestd.errors import InvalidInstanceError

__all__ = ["InstanceHeader", "file_meta_prefix", "is_valid_uid", "read_file_header", "read_stream_header"]

# A UID as a path component must be digits and dots only, at most 64 characters (PS3.5 §9.1).
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

# Everything the journal needs lies at or before (0020,0011) Series Number: stop parsing there.
_LAST_TAG = Tag(0x0020, 0x0011)
_TAGS: list[BaseTag | int] = [
    Tag(0x0002, 0x0010),
    Tag(0x0008, 0x0016),
    Tag(0x0008, 0x0018),
    Tag(0x0008, 0x0060),
    Tag(0x0020, 0x000D),
    Tag(0x0020, 0x000E),
    _LAST_TAG,
]
_IMPLEMENTATION_VERSION = f"INGESTD_{__version__}"[:16]


def is_valid_uid(value: object) -> bool:
    """Say whether `value` is a syntactically valid UID (safe to use as a file or folder name)."""
    if not isinstance(value, str):
        return False
    return bool(0 < len(value) <= 64 and _UID.match(value))


@dataclass(frozen=True, slots=True)
class InstanceHeader:
    """The identifying header values of one instance, validated."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str
    series_number: int | None


def _stop_after_last(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > _LAST_TAG


def _text(ds: Dataset, keyword: str) -> str:
    value: Any = ds.get(keyword, "")
    return str(value).strip().strip("\x00") if value is not None else ""


def _header_from(ds: Dataset, transfer_syntax: str) -> InstanceHeader:
    values = {
        "StudyInstanceUID": _text(ds, "StudyInstanceUID"),
        "SeriesInstanceUID": _text(ds, "SeriesInstanceUID"),
        "SOPInstanceUID": _text(ds, "SOPInstanceUID"),
        "SOPClassUID": _text(ds, "SOPClassUID"),
    }
    missing = [keyword for keyword, value in values.items() if not value]
    if missing:
        raise InvalidInstanceError(f"the instance has no {', '.join(missing)}")
    bad = [keyword for keyword, value in values.items() if not is_valid_uid(value)]
    if bad:
        raise InvalidInstanceError(f"malformed {', '.join(bad)} (a UID is up to 64 digits and dots)")
    try:
        series_number: int | None = (
            int(ds.get("SeriesNumber")) if ds.get("SeriesNumber") not in (None, "") else None
        )
    except (TypeError, ValueError):
        series_number = None
    modality = _text(ds, "Modality")[:16]
    return InstanceHeader(
        study_uid=values["StudyInstanceUID"],
        series_uid=values["SeriesInstanceUID"],
        sop_uid=values["SOPInstanceUID"],
        sop_class_uid=values["SOPClassUID"],
        transfer_syntax=transfer_syntax,
        modality=modality if modality.isprintable() else "",
        series_number=series_number,
    )


def read_stream_header(dataset: bytes, transfer_syntax: str) -> InstanceHeader:
    """Read the header of an encoded dataset (no file meta), as a C-STORE delivers it."""
    data = dataset
    try:
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(dataset, 1 << 20)
        ds = read_dataset(
            BytesIO(data),
            is_implicit_VR=transfer_syntax == ImplicitVRLittleEndian,
            is_little_endian=transfer_syntax != ExplicitVRBigEndian,
            stop_when=_stop_after_last,
            specific_tags=_TAGS,
        )
        return _header_from(ds, transfer_syntax)
    except InvalidInstanceError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed data
        raise InvalidInstanceError(f"cannot parse the data set: {type(exc).__name__}") from None


def read_file_header(data: bytes) -> InstanceHeader:
    """Read the header of a DICOM file's bytes, with or without preamble and file meta."""
    has_magic = data[128:132] == b"DICM" or data[:4] == b"DICM"
    try:
        ds = read_partial(BytesIO(data), stop_when=_stop_after_last, force=not has_magic, specific_tags=_TAGS)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed data
        if not has_magic:
            raise InvalidInstanceError("not a DICOM file") from None
        raise InvalidInstanceError(f"corrupt DICOM file: {type(exc).__name__}") from None
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not syntax:
        syntax = ImplicitVRLittleEndian if ds.is_implicit_VR else "1.2.840.10008.1.2.1"
    try:
        return _header_from(ds, syntax)
    except InvalidInstanceError as exc:
        if not has_magic:
            raise InvalidInstanceError("not a DICOM file") from None
        raise InvalidInstanceError(f"unusable DICOM file: {exc}") from None


def file_meta_prefix(sop_class_uid: str, sop_uid: str, transfer_syntax: str, source_aet: str = "") -> bytes:
    """Encode a preamble, the DICM prefix and a file meta group for a dataset received over the network."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    if source_aet:
        meta.SourceApplicationEntityTitle = source_aet
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()
