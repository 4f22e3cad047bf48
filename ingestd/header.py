"""Read the few header values the journal needs, without decoding the rest of an instance.

Pure functions over bytes: no file or socket is touched here.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_partial
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
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
    return bool(tag > _LAST_TAG)


def _text(ds: Dataset, keyword: str) -> str:
    value: Any = ds.get(keyword, "")
    return str(value).strip().strip("\x00") if value is not None else ""


def _header_from(ds: Dataset, transfer_syntax: str) -> InstanceHeader:
    return _validated(
        {
            "StudyInstanceUID": _text(ds, "StudyInstanceUID"),
            "SeriesInstanceUID": _text(ds, "SeriesInstanceUID"),
            "SOPInstanceUID": _text(ds, "SOPInstanceUID"),
            "SOPClassUID": _text(ds, "SOPClassUID"),
        },
        _text(ds, "Modality"),
        _text(ds, "SeriesNumber"),
        transfer_syntax,
    )


def _validated(uids: dict[str, str], modality: str, series_number: str, transfer_syntax: str) -> InstanceHeader:
    missing = [keyword for keyword, value in uids.items() if not value]
    if missing:
        raise InvalidInstanceError(f"the instance has no {', '.join(missing)}")
    bad = [keyword for keyword, value in uids.items() if not is_valid_uid(value)]
    if bad:
        raise InvalidInstanceError(f"malformed {', '.join(bad)} (a UID is up to 64 digits and dots)")
    try:
        number: int | None = int(series_number) if series_number else None
    except ValueError:
        number = None
    modality = modality[:16]
    return InstanceHeader(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        transfer_syntax=transfer_syntax,
        modality=modality if modality.isprintable() else "",
        series_number=number,
    )


# -- the fast path: walk the encoded elements directly ---------------------------------------------

_WANTED = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080060: "Modality",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200011: "SeriesNumber",
}
_LAST = 0x00200011
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _NeedsPydicomError(Exception):
    """The fast walker met something it leaves to pydicom."""


def _element(data: bytes | memoryview, pos: int, implicit: bool) -> tuple[int, int, int]:
    """Decode the element header at `pos`: (tag, value length, value offset)."""
    if pos + 8 > len(data):
        raise _NeedsPydicomError
    group = data[pos] | data[pos + 1] << 8
    tag = group << 16 | data[pos + 2] | data[pos + 3] << 8
    if implicit or group == 0xFFFE:
        return tag, int.from_bytes(data[pos + 4 : pos + 8], "little"), pos + 8
    vr = bytes(data[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise _NeedsPydicomError
        return tag, int.from_bytes(data[pos + 8 : pos + 12], "little"), pos + 12
    if not vr.isalpha():
        raise _NeedsPydicomError
    return tag, data[pos + 6] | data[pos + 7] << 8, pos + 8


def _skip_undefined(data: bytes | memoryview, pos: int, implicit: bool, depth: int = 0) -> int:
    """Skip the items of a sequence of undefined length; return the offset after its delimiter."""
    if depth > 16:
        raise _NeedsPydicomError
    while True:
        tag, length, pos = _element(data, pos, implicit)
        if tag == _SEQUENCE_END:
            return pos
        if tag == _ITEM_END:
            continue
        if tag != _ITEM:
            if length == _UNDEFINED:
                pos = _skip_undefined(data, pos, implicit, depth + 1)
            else:
                pos += length
            continue
        if length != _UNDEFINED:
            pos += length
            continue
        # an item of undefined length: walk its elements until the item delimiter
        while True:
            tag, length, pos = _element(data, pos, implicit)
            if tag == _ITEM_END:
                break
            pos = _skip_undefined(data, pos, implicit, depth + 1) if length == _UNDEFINED else pos + length


def _walk(data: bytes | memoryview, implicit: bool) -> dict[str, str]:
    values: dict[str, str] = {}
    pos = 0
    end = len(data)
    while pos < end:
        tag, length, pos = _element(data, pos, implicit)
        if tag > _LAST:
            break
        if length == _UNDEFINED:
            pos = _skip_undefined(data, pos, implicit)
            continue
        keyword = _WANTED.get(tag)
        if keyword is not None:
            raw = bytes(data[pos : pos + length])
            try:
                values[keyword] = raw.decode("ascii").strip(" \x00")
            except UnicodeDecodeError:
                raise _NeedsPydicomError from None
        pos += length
    return values


def _fast_header(data: bytes | memoryview, transfer_syntax: str) -> InstanceHeader:
    if transfer_syntax in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):
        raise _NeedsPydicomError
    values = _walk(data, implicit=transfer_syntax == ImplicitVRLittleEndian)
    uids = {keyword: values.get(keyword, "") for keyword in _UID_KEYWORDS}
    return _validated(uids, values.get("Modality", ""), values.get("SeriesNumber", ""), transfer_syntax)


_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def read_stream_header(dataset: bytes | memoryview, transfer_syntax: str) -> InstanceHeader:
    """Read the header of an encoded dataset (no file meta), as a C-STORE delivers it."""
    try:
        return _fast_header(dataset, transfer_syntax)
    except _NeedsPydicomError:
        pass
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
    if data[:4] == b"DICM":  # the DICM prefix without its preamble
        data = b"\x00" * 128 + data
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


def _meta_element(tag: int, vr: bytes, value: bytes) -> bytes:
    pad = b"\x00" if vr == b"UI" else b" "
    if len(value) % 2:
        value += pad
    head = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little") + vr
    if vr == b"OB":
        return head + b"\x00\x00" + len(value).to_bytes(4, "little") + value
    return head + len(value).to_bytes(2, "little") + value


_META_VERSION = _meta_element(0x00020001, b"OB", b"\x00\x01")
_META_IMPLEMENTATION = _meta_element(0x00020012, b"UI", PYDICOM_IMPLEMENTATION_UID.encode()) + _meta_element(
    0x00020013, b"SH", _IMPLEMENTATION_VERSION.encode()
)


def file_meta_prefix(sop_class_uid: str, sop_uid: str, transfer_syntax: str, source_aet: str = "") -> bytes:
    """Encode a preamble, the DICM prefix and a file meta group for a dataset received over the network.

    The group is encoded by hand (Explicit VR Little Endian, PS3.10 §7.1): on the C-STORE path this is
    thirty times cheaper than building a pydicom FileMetaDataset, and the inputs are validated UIDs.
    """
    body = b"".join(
        (
            _META_VERSION,
            _meta_element(0x00020002, b"UI", sop_class_uid.encode("ascii")),
            _meta_element(0x00020003, b"UI", sop_uid.encode("ascii")),
            _meta_element(0x00020010, b"UI", transfer_syntax.encode("ascii")),
            _META_IMPLEMENTATION,
            _meta_element(0x00020016, b"AE", source_aet.encode("ascii", "replace")) if source_aet else b"",
        )
    )
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + len(body).to_bytes(4, "little")
    return b"\x00" * 128 + b"DICM" + group_length + body
