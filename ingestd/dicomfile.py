"""DICOM files as bytes: split a file into what the spool stores (file meta, data set, header).

Pure functions over bytes, for files that arrive through a drop folder: Part 10 files, files with the
DICM prefix but no preamble, and bare data sets without file meta. They also catch what pydicom reads
without complaint: a file cut short, inside an element or cleanly between two.

A file is whole when every element's length ends within it, the identifying UIDs are there and, for a
SOP class that holds an image (pydicom's UID registry names it "... Image Storage ...", plus Segmentation
Storage and Parametric Map Storage), Pixel Data (or Float or Double Float Pixel Data) is there. What could
still become whole if more bytes were appended (a file being written, a copy that paused) raises
IncompleteInstanceError; what no further bytes can mend raises InvalidInstanceError. Top-level elements come
in ascending tag order, so a missing element whose tag lies beyond the last one read may simply be still
to come, while one whose tag lies before it never will.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from pydicom.filereader import data_element_generator
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from ingestd.errors import InvalidInstanceError
from ingestd.header import IMAGE_STORAGE_CLASSES, InstanceHeader, binary_stream, file_meta_prefix, read_file_header

__all__ = [
    "IncompleteInstanceError",
    "PreparedInstance",
    "check_data_set",
    "data_set_offset",
    "needs_pixel_data",
    "prepare_instance",
]

_MB = 1024 * 1024
_PREFIX = 132  # the preamble and `DICM`
# Top-level tags whether a file is whole depends on: the identifying UIDs, then the pixel data elements.
_REQUIRED = {
    0x00080016: "SOP Class UID",
    0x00080018: "SOP Instance UID",
    0x0020000D: "Study Instance UID",
    0x0020000E: "Series Instance UID",
}
# Float, Double Float, Pixel Data, or a Pixel Data Provider URL in their stead (JPIP): as C-STORE's check counts them
_PIXEL_DATA = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010, 0x00287FE0})
_NOTED = frozenset(_REQUIRED) | _PIXEL_DATA


class IncompleteInstanceError(InvalidInstanceError):
    """The bytes are the beginning of a DICOM file, not a whole one: more bytes could still complete it.

    A file still being written, or one cut short for good: only time tells them apart.
    """


def needs_pixel_data(sop_class_uid: str) -> bool:
    """Say whether instances of a SOP class hold an image: Pixel Data, Float or Double Float Pixel Data (the same
    classes C-STORE's check holds to, `ingestd.header.IMAGE_STORAGE_CLASSES`)."""
    return sop_class_uid in IMAGE_STORAGE_CLASSES


@dataclass(frozen=True, slots=True)
class _Walked:
    """What walking a data set's top-level elements saw: the last tag, and which of `_NOTED` are there."""

    last_tag: int
    noted: frozenset[int]


@dataclass(frozen=True, slots=True)
class PreparedInstance:
    """A dropped DICOM file split for the spool: preamble and file meta, the data set, its header."""

    prefix: bytes
    body: memoryview
    header: InstanceHeader


def _truncated() -> IncompleteInstanceError:
    return IncompleteInstanceError("corrupt DICOM file: truncated")


def _file_meta_end(data: bytes | mmap.mmap) -> tuple[int, dict[bytes, str]]:
    """Walk the file meta group after `DICM` at 128: where the data set starts, and the meta's UIDs.

    The UIDs are keyed by element number: b"\x02\x00" Media Storage SOP Class, b"\x10\x00" Transfer Syntax.
    """
    pos = 132
    uids: dict[bytes, str] = {}
    while data[pos : pos + 2] == b"\x02\x00":
        if pos + 8 > len(data):
            raise _truncated()
        vr = data[pos + 4 : pos + 6]
        if not vr.isalpha():  # implicit VR file meta (non-conformant, but seen): 4-byte length
            length, start = int.from_bytes(data[pos + 4 : pos + 8], "little"), pos + 8
        elif vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT"):
            length, start = int.from_bytes(data[pos + 8 : pos + 12], "little"), pos + 12
        else:
            length, start = int.from_bytes(data[pos + 6 : pos + 8], "little"), pos + 8
        if length == 0xFFFFFFFF:
            raise InvalidInstanceError("corrupt DICOM file: undefined length in the file meta")
        if start + length > len(data):
            raise _truncated()
        if data[pos + 2 : pos + 4] in (b"\x02\x00", b"\x10\x00"):
            uids[data[pos + 2 : pos + 4]] = data[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    if pos >= len(data):
        raise _truncated()
    return pos, uids


def _check_deflated(body: memoryview) -> None:
    """Inflate a deflated data set in bounded steps, keeping nothing, to see that the stream is whole."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(body, _MB)
        while inflater.unconsumed_tail and not inflater.eof:
            inflater.decompress(inflater.unconsumed_tail, _MB)
    except zlib.error:
        raise InvalidInstanceError("corrupt DICOM file: the deflated data set cannot be inflated") from None
    if not inflater.eof:
        raise _truncated()


def check_data_set(body: memoryview, transfer_syntax: str) -> None:
    """Check that a data set's elements, as pydicom reads them, all end within the data.

    pydicom reads a file cut short without complaint (the last value is just shorter than its length),
    so each element's declared length is held against the bytes there. Large values are skipped, not
    read. Raises IncompleteInstanceError "corrupt DICOM file: truncated", or InvalidInstanceError with
    another reason.
    """
    _walk_data_set(body, transfer_syntax)


def _walk_data_set(body: memoryview, transfer_syntax: str) -> _Walked | None:
    """`check_data_set`, returning what the walk saw (None for a deflated data set, which is not walked).

    A deflated data set is whole when its deflate stream ends: the writer finished it.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        _check_deflated(body)
        return None
    size = len(body)
    with binary_stream(body) as stream:
        return _walk_elements(stream, size, body, transfer_syntax)


def _walk_elements(stream: BinaryIO, size: int, body: memoryview, transfer_syntax: str) -> _Walked:
    end = 0
    last_tag = 0
    noted: set[int] = set()
    try:
        for element in data_element_generator(
            stream,
            is_implicit_VR=transfer_syntax == ImplicitVRLittleEndian,
            is_little_endian=transfer_syntax != ExplicitVRBigEndian,
            defer_size=4096,
        ):
            end = stream.tell()
            value: Any = element.value
            length = getattr(element, "length", 0)
            short = isinstance(value, bytes) and length != 0xFFFFFFFF and len(value) < length
            if end > size or short:
                raise _truncated()
            tag = int(element.tag)
            last_tag = max(last_tag, tag)  # zero-filled space reads as elements (0000,0000): they do not count
            if tag in _NOTED:
                noted.add(tag)
    except InvalidInstanceError:
        raise
    except (EOFError, OSError, struct.error):  # a value, sequence or length field with no end
        raise _truncated() from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on malformed data
        if stream.tell() >= size:  # it failed on the last value, read short: cut short, not malformed
            raise _truncated() from None  # (a Specific Character Set cut short warns; an error where warnings are)
        raise InvalidInstanceError(f"corrupt DICOM file: {type(exc).__name__}") from None
    if 0 < size - end < 8:  # the file ends inside an element's tag and length, or in trailing zeros (harmless)
        padding = transfer_syntax != ExplicitVRBigEndian and not any(body[end:])
        if not padding:
            raise _truncated()
    if size - end >= 8:
        raise InvalidInstanceError("corrupt DICOM file: stray item delimiter in the data set")
    return _Walked(last_tag, frozenset(noted))


def _check_required(walked: _Walked | None) -> None:
    """Raise IncompleteInstanceError if an identifying UID is missing but could still come after the end."""
    if walked is None:
        return
    to_come = [name for tag, name in _REQUIRED.items() if tag not in walked.noted and tag > walked.last_tag]
    if to_come:
        raise IncompleteInstanceError(f"incomplete DICOM file: it ends before its {', '.join(to_come)}")


def _check_pixel_data(walked: _Walked | None, sop_class_uid: str) -> None:
    """Raise if an instance of an image SOP class has no pixel data: incomplete if it may still come."""
    if walked is None or walked.noted & _PIXEL_DATA or not needs_pixel_data(sop_class_uid):
        return
    if walked.last_tag < max(_PIXEL_DATA):
        raise IncompleteInstanceError("incomplete DICOM file: it ends before its Pixel Data")
    raise InvalidInstanceError("corrupt DICOM file: an image without Pixel Data")


def _read_header(data: bytes) -> InstanceHeader:
    try:
        return read_file_header(data)
    except InvalidInstanceError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a pydicom warning about a cut UID, raised as an error
        raise InvalidInstanceError(f"corrupt DICOM file: {type(exc).__name__}") from None


def _bare_syntax(data: bytes) -> str:
    """The transfer syntax a data set without file meta is in, judged from its first element."""
    if not (data[4:6].isalpha() and data[4:6].isupper()):
        return ImplicitVRLittleEndian
    if data[0] == 0 and data[1] != 0:  # group 0008 written high byte first
        return ExplicitVRBigEndian
    return ExplicitVRLittleEndian


def prepare_instance(data: bytes) -> PreparedInstance:
    """Split a dropped file into what the spool stores; raise InvalidInstanceError with the reason.

    Takes a Part 10 file (kept as it is), a file meta without the 128-byte preamble (a preamble is
    added), or a bare data set without file meta (a file meta is built for it). Only a whole file is
    taken: what could still grow into one raises IncompleteInstanceError (see the module's docstring).
    """
    try:
        return _prepare(data)
    except IncompleteInstanceError:
        raise
    except InvalidInstanceError as exc:
        if len(data) < _PREFIX and _may_grow_into_dicom(data):
            raise IncompleteInstanceError(str(exc)) from None
        raise


_TIFF = (b"II*\x00", b"MM\x00*")  # a dual-personality file's preamble
_BARE_STARTS = (b"\x08\x00", b"\x00\x08")  # group 0008, little and big endian


def _may_grow_into_dicom(data: bytes) -> bool:
    """Say whether bytes too short to be a DICOM file could be the start of one: nothing yet, a preamble as
    writers fill it (zeros, a TIFF header) and the beginning of `DICM`, the `DICM` prefix, or the first
    bytes of a bare data set."""
    if len(data) > 128:  # a preamble whole: what follows must be the beginning of DICM
        return b"DICM".startswith(data[128:])
    if not data.strip(b"\x00"):
        return True
    return any(start.startswith(data[:4]) or data.startswith(start) for start in (*_TIFF, *_BARE_STARTS, b"DICM"))


def _prepare(data: bytes) -> PreparedInstance:
    if data[:4] == b"DICM" and data[128:132] != b"DICM":
        data = bytes(128) + data
    view = memoryview(data)
    if data[128:132] == b"DICM":
        offset, uids = _file_meta_end(data)
        if uids.get(b"\x02\x00") == MediaStorageDirectoryStorage:
            raise InvalidInstanceError("DICOMDIR: an index of a disc or folder, not an instance")
        walked = _walk_data_set(view[offset:], uids.get(b"\x10\x00") or ExplicitVRLittleEndian)
        try:
            header = _read_header(data)
        except InvalidInstanceError:
            _check_required(walked)
            raise
        _check_pixel_data(walked, header.sop_class_uid)
        return PreparedInstance(data[:offset], view[offset:], header)
    syntax = _bare_syntax(data)
    try:
        header = _read_header(data)
    except InvalidInstanceError:
        if data[:2] in (b"\x08\x00", b"\x00\x08"):  # starts like a data set (group 0008): cut short?
            _check_required(_walk_data_set(view, syntax))
        raise
    if header.transfer_syntax == ImplicitVRLittleEndian:
        syntax = ImplicitVRLittleEndian
    header = replace(header, transfer_syntax=syntax)
    _check_pixel_data(_walk_data_set(view, syntax), header.sop_class_uid)
    prefix = file_meta_prefix(header.sop_class_uid, header.sop_uid, syntax)
    return PreparedInstance(prefix, view, header)


def data_set_offset(data: bytes | mmap.mmap) -> int:
    """Where the data set starts in a Part 10 file (after preamble and file meta); 0 without them."""
    if data[128:132] != b"DICM":
        return 0
    return _file_meta_end(data)[0]
