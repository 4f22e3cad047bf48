"""Read the few header values the journal needs, without decoding the rest of an instance.

Pure functions over bytes: no file or socket is touched here.
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass
from io import BytesIO
from struct import Struct
from typing import Any, BinaryIO, cast

from pydicom._uid_dict import UID_dictionary
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_dataset, read_partial
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import VR

from ingestd import __version__
from ingestd.errors import IncompleteDataSetError, InvalidInstanceError

__all__ = [
    "IMAGE_STORAGE_CLASSES",
    "InstanceHeader",
    "LeftToPydicomError",
    "binary_stream",
    "file_meta_prefix",
    "is_valid_uid",
    "read_file_header",
    "read_stream_header",
    "read_whole_stream",
    "require_pixel_data",
    "stream_has_pixel_data",
]

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


# Up to this size a buffer pydicom reads is copied into a BytesIO (the fastest to read); a larger one (a data set
# streamed to a part file and mapped, say) is read in place, so that reading never holds a copy of it.
_COPY_AT_MOST = 16 * 1024 * 1024


class _BufferReader(io.RawIOBase):
    """A seekable binary stream over a buffer (bytes, memoryview, mmap), reading from it without copying it whole."""

    def __init__(self, data: bytes | memoryview | Any) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0
        self.name = (
            "<buffer>"  # pydicom's FileDataset reads `name` (a BytesIO's is absent and it copes; this one's is not)
        )

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        start = min(self._pos, len(self._view))
        count = min(len(target), len(self._view) - start)
        with memoryview(target).cast("B") as out:
            out[:count] = self._view[start : start + count]
        self._pos = start + count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset  # past the end, as BytesIO allows: reads there return nothing
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._view.release()
        super().close()


def binary_stream(data: bytes | memoryview | Any) -> BinaryIO:
    """A seekable binary stream over `data` for pydicom to read: a copy when small, the buffer itself when large."""
    if len(data) <= _COPY_AT_MOST:
        return BytesIO(data)
    return cast(BinaryIO, io.BufferedReader(_BufferReader(data)))


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
        with binary_stream(data) as stream:
            ds = read_dataset(
                stream,
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


# -- the whole data set: is it all there? ------------------------------------------------------------
#
# pydicom reads a data set cut short without complaint (the last value is just shorter than its length). Before
# a C-STORE is answered, its data set is walked to its end: every element's value, every item and every value
# of undefined length (a sequence, encapsulated pixel data) must end within the data, and the elements of the
# top level must end exactly at its end (up to 7 zero bytes of padding, as `dicomfile.check_data_set` allows).
# Values are skipped by their length, never copied; only the few header values are read. A cut leaves a
# prefix of a whole data set, which the walk follows exactly as it would the whole one until it runs out of
# data, so a cut anywhere but between two top-level elements (or in zero bytes right after one) is always
# found; a cut between two elements of an image before its pixel data is found by the missing Pixel Data (one
# between two elements of a non-image, an SR say, leaves a smaller whole data set: nothing shows it). What
# pydicom reads more leniently than this walk (an explicit VR element with an unknown VR, encapsulated pixel
# data that is not a run of items, an item or sequence delimiter where no item is open, nesting deeper than
# 32) is left to pydicom (`LeftToPydicomError`).

_HEADER_STRUCTS = {
    True: (Struct("<HH2sH"), Struct("<HHL"), Struct("<L")),
    False: (Struct(">HH2sH"), Struct(">HHL"), Struct(">L")),
}
_KNOWN_VRS = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2)
_SEQUENCE_END = 0xFFFEE0DD
# Pixel Data, Float and Double Float Pixel Data, or a Pixel Data Provider URL in their stead (JPIP)
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009, 0x00287FE0})
_LOOKED_AT = _PIXEL_TAGS | _WANTED.keys()
_MAX_DEPTH = 32
_MAX_INFLATED = 64 * 1024 * 1024  # a deflated data set inflating to more is left to pydicom's check (it streams)

IMAGE_STORAGE_CLASSES = frozenset(
    {uid for uid, entry in UID_dictionary.items() if "Image Storage" in entry[0]}
    | {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.30"}  # Segmentation, Parametric Map Storage
)
"""SOP classes whose instances carry pixel data: every "... Image Storage" class, Segmentation and Parametric Map."""


class LeftToPydicomError(Exception):
    """The data set uses an encoding `read_whole_stream` leaves to pydicom's reading."""


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    """Walks an encoded data set (Little or Big Endian) by its lengths; raises IncompleteDataSetError."""

    def __init__(self, data: bytes | memoryview, little: bool) -> None:
        self.data = data
        self.end = len(data)
        self.little = little
        self.explicit, self.implicit, self.u32 = _HEADER_STRUCTS[little]

    def header(self, pos: int, implicit: bool, owner: int) -> tuple[int, int, int]:
        """(tag, value length, value offset) of the element at `pos`."""
        end = self.end
        if end - pos < 8:
            raise self.cut(owner)
        if implicit:
            group, element, length = self.implicit.unpack_from(self.data, pos)
            return group << 16 | element, length, pos + 8
        group, element, vr, length = self.explicit.unpack_from(self.data, pos)
        tag = group << 16 | element
        if group == 0xFFFE:  # items and delimiters have no VR, in any transfer syntax
            return tag, self.u32.unpack_from(self.data, pos + 4)[0], pos + 8
        if vr in _LONG_VRS:
            if end - pos < 12:
                raise self.cut(owner or tag)
            return tag, self.u32.unpack_from(self.data, pos + 8)[0], pos + 12
        if vr in _KNOWN_VRS:
            return tag, length, pos + 8
        raise LeftToPydicomError  # pydicom reads it as implicit VR, or as an unknown VR with a 2-byte length

    def cut(self, owner: int) -> IncompleteDataSetError:
        where = f"inside {_tag_text(owner)}" if owner else "inside an element's tag and length"
        return IncompleteDataSetError(f"the data set is cut short {where}")

    def top_level(self, implicit: bool) -> tuple[dict[int, bytes], bool]:
        """Walk the data set; return the raw values of the wanted header elements and whether pixel data is there."""
        data, end, little = self.data, self.end, self.little
        unpack, u32 = self.explicit.unpack_from, self.u32.unpack_from
        wanted: dict[int, bytes] = {}
        pixels = False
        pos = 0
        while pos < end:
            if implicit or end - pos < 12:
                if end - pos < 8 and little and not any(data[pos:end]):
                    break  # trailing zero padding: seen, harmless
                tag, length, pos = self.header(pos, implicit, 0)
            else:  # the common case inline: an Explicit VR element with a standard VR
                group, element, vr, length = unpack(data, pos)
                tag = group << 16 | element
                if group == 0xFFFE or vr not in _KNOWN_VRS:
                    tag, length, pos = self.header(pos, implicit, 0)
                elif vr in _LONG_VRS:
                    length = u32(data, pos + 8)[0]
                    pos += 12
                else:
                    pos += 8
            if length == _UNDEFINED or tag >= 0xFFFE0000:
                pixels = pixels or tag in _PIXEL_TAGS
                pos = self.undefined_length(tag, pos, implicit)
                continue
            value_end = pos + length
            if value_end > end:
                raise IncompleteDataSetError(
                    f"the data set is cut short: {_tag_text(tag)} declares {length} bytes, {end - pos} remain"
                )
            if tag in _LOOKED_AT:
                if tag in _PIXEL_TAGS:
                    pixels = True
                else:
                    wanted[tag] = bytes(data[pos:value_end])
            pos = value_end
        return wanted, pixels

    def undefined_length(self, tag: int, pos: int, implicit: bool) -> int:
        """Walk a top-level value of undefined length; return the offset after it."""
        if tag >> 16 == 0xFFFE:
            if tag == _ITEM_END:
                raise IncompleteDataSetError("an item delimiter outside any item: the data set does not parse")
            raise LeftToPydicomError  # an item or a sequence delimiter where no sequence is open
        return self.items(pos, implicit, 1, tag)

    def items(self, pos: int, implicit: bool, depth: int, owner: int) -> int:
        """Walk the items of a value of undefined length to its sequence delimiter; return the offset after it."""
        if depth > _MAX_DEPTH:
            raise LeftToPydicomError
        data, end, unpack = self.data, self.end, self.implicit.unpack_from
        while True:
            if end - pos < 8:
                raise self.cut(owner)
            group, element, length = unpack(data, pos)
            tag = group << 16 | element
            pos += 8
            if tag == _SEQUENCE_END:
                return pos
            if tag != _ITEM:
                raise LeftToPydicomError  # not a run of items: pydicom searches for the delimiter instead
            if length == _UNDEFINED:
                pos = self.item(pos, implicit or self.looks_implicit(pos), depth + 1, owner)
                continue
            pos += length
            if pos > end:
                raise self.cut(owner)

    def item(self, pos: int, implicit: bool, depth: int, owner: int) -> int:
        """Walk the elements of an item of undefined length to its item delimiter; return the offset after it."""
        end = self.end
        while True:
            tag, length, pos = self.header(pos, implicit, owner)
            if tag == _ITEM_END:
                return pos
            if tag >> 16 == 0xFFFE:
                raise LeftToPydicomError
            if length == _UNDEFINED:
                pos = self.items(pos, implicit, depth + 1, owner)
                continue
            pos += length
            if pos > end:
                raise self.cut(owner)

    def looks_implicit(self, pos: int) -> bool:
        """Whether an item in an Explicit VR data set is encoded in Implicit VR (PS3.5 §6.2.2), as pydicom judges."""
        if self.end - pos < 6:
            return False
        first, second = self.data[pos + 4], self.data[pos + 5]
        return not (0x40 < first < 0x5B and 0x40 < second < 0x5B)


def _inflated(dataset: bytes | memoryview) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(dataset, _MAX_INFLATED + 1)
    except zlib.error:
        raise IncompleteDataSetError("the deflated data set cannot be inflated") from None
    if len(data) > _MAX_INFLATED:
        raise LeftToPydicomError
    if not inflater.eof:
        raise IncompleteDataSetError("the deflated data set is cut short")
    return data


def require_pixel_data(header: InstanceHeader, pixels: bool) -> None:
    """An image without pixel data was cut short (at an element boundary, before its Pixel Data)."""
    if not pixels and header.sop_class_uid in IMAGE_STORAGE_CLASSES:
        raise IncompleteDataSetError("an image without Pixel Data: the data set is cut short")


def read_whole_stream(dataset: bytes | memoryview, transfer_syntax: str) -> InstanceHeader:
    """Check that a data set received by C-STORE is all there, then read its header.

    Raises IncompleteDataSetError when it is cut short or does not parse to its end (an instance of an image
    SOP class without pixel data counts as cut short), InvalidInstanceError when its UIDs are missing or
    malformed, and LeftToPydicomError when it uses an encoding this walk leaves to pydicom (then check it with
    `dicomfile.check_data_set`).
    """
    if not len(dataset):
        raise IncompleteDataSetError("the data set is empty")
    data = _inflated(dataset) if transfer_syntax == DeflatedExplicitVRLittleEndian else dataset
    walker = _Walker(data, little=transfer_syntax != ExplicitVRBigEndian)
    wanted, pixels = walker.top_level(implicit=transfer_syntax == ImplicitVRLittleEndian)
    try:
        values = {
            keyword: wanted[tag].decode("ascii").strip(" \x00") for tag, keyword in _WANTED.items() if tag in wanted
        }
    except UnicodeDecodeError:  # pydicom decodes them in the data set's character set
        header = read_stream_header(dataset, transfer_syntax)
    else:
        uids = {keyword: values.get(keyword, "") for keyword in _UID_KEYWORDS}
        header = _validated(uids, values.get("Modality", ""), values.get("SeriesNumber", ""), transfer_syntax)
    require_pixel_data(header, pixels)
    return header


def stream_has_pixel_data(dataset: bytes | memoryview, transfer_syntax: str) -> bool:
    """Whether pydicom finds pixel data at the top level of a data set (which `check_data_set` found whole).

    A deflated data set is not inflated for this: True.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        return True
    try:
        with binary_stream(dataset) as stream:
            for element in data_element_generator(
                stream,
                is_implicit_VR=transfer_syntax == ImplicitVRLittleEndian,
                is_little_endian=transfer_syntax != ExplicitVRBigEndian,
                defer_size=1024,
            ):
                if element.tag in _PIXEL_TAGS:
                    return True
    except Exception:  # noqa: BLE001 - pydicom raises many types on malformed data
        return False
    return False


def read_file_header(data: bytes | Any) -> InstanceHeader:
    """Read the header of a DICOM file's bytes (or a mapping of the file), with or without preamble and file meta."""
    if data[:4] == b"DICM":  # the DICM prefix without its preamble
        data = b"\x00" * 128 + bytes(data)
    has_magic = data[128:132] == b"DICM" or data[:4] == b"DICM"
    try:
        with binary_stream(data) as stream:
            ds = read_partial(stream, stop_when=_stop_after_last, force=not has_magic, specific_tags=_TAGS)
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
