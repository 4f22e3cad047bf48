"""De-identify one instance file with its Pixel Data left on disk: memory stays flat on any instance size.

`open_instance` parses an instance as `pydicom.dcmread` would, except that each top-level pixel element
((7FE0,0010) Pixel Data, (7FE0,0008) Float and (7FE0,0009) Double Float Pixel Data) is not read: it becomes a
pydicom *buffered* value, a read-only window onto the file (for encapsulated Pixel Data, from the first item to
the sequence delimiter, found by walking the items as pydicom does, or by its byte scan when the items do not
parse). Elements after Pixel Data are read as usual and go through the profile like any other; Data Set
Trailing Padding is dropped by the engine. `screen` and `anonymize` see that data set, and `write_instance`
encodes the result with pydicom's own writer straight into the output file, which copies each window in
chunks. The header and a copy buffer are all that is held, whatever the size of Pixel Data.

The output is the file `dcmwrite` produces from the fully read instance, byte for byte
(tests/test_deid_stream.py), for every transfer syntax the profile keeps (it keeps the source's): implicit,
explicit, big endian, encapsulated, and Deflated Explicit VR Little Endian. A deflated data set is inflated
once into a scratch file next to the output (disk, not memory) and the output is deflated as it is written.
Odd-length pixel values get the zero pad byte pydicom adds. Where this reading would differ from pydicom's
(a pixel value cut short by the end of the file, which pydicom would pass on truncated), the instance is
refused as unreadable instead.
"""

from __future__ import annotations

import io
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom.errors
from pydicom.charset import convert_encodings
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.filebase import DicomIO
from pydicom.filereader import (
    _read_command_set_elements,
    _read_file_meta_info,
    data_element_generator,
    read_dataset,
    read_partial,
    read_preamble,
)
from pydicom.filewriter import dcmwrite, write_dataset, write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ingestd.deid.engine import DeidError
from ingestd.deid.seekable import SeekableReader
from ingestd.states import HoldCode

__all__ = ["PIXEL_TAGS", "Instance", "open_instance", "write_instance"]

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"})
_CHUNK = 1 << 20
_UNREADABLE = (pydicom.errors.InvalidDicomError, ValueError, EOFError, zlib.error, struct.error)


def _at_pixel_data(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    return int(tag) in PIXEL_TAGS


class _CutShortError(EOFError):
    """The file ends inside a pixel element: the instance was cut short (a transfer broken off, a full disk)."""


class _Window(SeekableReader):
    """Bytes [start, start + length) of an open file, read with pread, plus one zero byte when length is odd
    (the pad pydicom's writer adds to an odd value, counted here so the length it writes includes it)."""

    def __init__(self, fd: int, start: int, length: int) -> None:
        super().__init__(length + (length % 2))
        self._fd = fd
        self._start = start
        self._length = length

    def read(self, size: int | None = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        if end <= self._pos:
            return b""
        data = b""
        if self._pos < self._length:
            want = min(end, self._length) - self._pos
            data = os.pread(self._fd, want, self._start + self._pos)
            if len(data) != want:
                raise _CutShortError("the file ended inside a pixel element")
        if end > self._length:
            data += b"\x00"
        self._pos = end
        return data


@dataclass
class Instance:
    """A parsed instance whose pixel elements are windows onto `fd` (open until the `open_instance` block ends)."""

    dataset: FileDataset
    fd: int
    deflated: bool


def _unpack(little: bool) -> tuple[struct.Struct, struct.Struct, struct.Struct]:
    endian = "<" if little else ">"
    return struct.Struct(f"{endian}HH"), struct.Struct(f"{endian}H"), struct.Struct(f"{endian}L")


def _encapsulated_end(fd: int, start: int, size: int, little: bool) -> int:
    """Where the sequence delimiter of the encapsulated value starting at `start` is: by its items, as
    pydicom's `_try_read_encapsulated_pixel_data`, else by scanning for the delimiter's bytes as it then does."""
    tags, _short, long = _unpack(little)
    pos = start
    while pos + 8 <= size:
        group, element = tags.unpack(os.pread(fd, 4, pos))
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            return pos
        if tag != _ITEM:
            break
        pos += 8 + long.unpack(os.pread(fd, 4, pos + 4))[0]
    else:
        if pos + 4 <= size and tags.unpack(os.pread(fd, 4, pos)) == (0xFFFE, 0xE0DD):
            return pos
    marker = tags.pack(0xFFFE, 0xE0DD)
    pos = start
    while pos < size:
        chunk = os.pread(fd, _CHUNK, pos)
        found = chunk.find(marker)
        if found != -1:
            return pos + found
        if len(chunk) < _CHUNK:
            break
        pos += len(chunk) - 3
    raise _CutShortError("End of file reached before the Pixel Data's sequence delimiter")


def _pixel_element(ds: Dataset, fd: int, pos: int, size: int, implicit: bool, little: bool) -> int:
    """Put the pixel element starting at `pos` into `ds` as a window onto `fd`; return where it ends."""
    tags, _short, long = _unpack(little)
    head = os.pread(fd, 12, pos)
    if len(head) < 8:
        raise _CutShortError("the file ended inside a pixel element's header")
    group, element = tags.unpack(head[:4])
    vr: str | None = None
    if implicit:
        length, start = long.unpack(head[4:8])[0], pos + 8
    elif head[4:6] in _LONG_VRS and len(head) == 12:
        vr, length, start = head[4:6].decode(), long.unpack(head[8:12])[0], pos + 12
    else:
        raise ValueError("a pixel element has a VR that cannot hold pixel data")
    if length == 0xFFFFFFFF:
        value_end = _encapsulated_end(fd, start, size, little)
        end = value_end + 8
    else:
        value_end = end = start + length
    if end > size:
        raise _CutShortError("the file ended inside a pixel element")
    tag = BaseTag(group << 16 | element)
    ds[tag] = RawDataElement(tag, vr, length, b"", start, implicit, little)
    elem: DataElement = ds[tag]  # converted as pydicom converts any raw element: VR resolved, UN replaced
    window = _Window(fd, start, value_end - start)
    if elem.VR == "UN":  # removed by the engine anyway; a UN element cannot hold a buffer
        elem.value = window.read()
    else:
        elem.value = window
    return end


def _read_rest(ds: FileDataset, fp: BinaryIO, implicit: bool, little: bool) -> None:
    """Read from `fp` (at a pixel element or the end) to the end: pixel elements as windows, others as pydicom
    reads them (a cut element ends the data set, as pydicom's reader then warns and stops)."""
    fd = fp.fileno()
    size = os.fstat(fd).st_size
    encoding = convert_encodings(ds._character_set)
    while (pos := fp.tell()) < size:
        if _tag_at(fd, pos, little) in PIXEL_TAGS:
            fp.seek(_pixel_element(ds, fd, pos, size, implicit, little))
            continue
        try:
            for elem in data_element_generator(fp, implicit, little, stop_when=_at_pixel_data, encoding=encoding):
                ds[elem.tag] = elem
        except EOFError:
            break
        if fp.tell() == pos:  # nothing parsed and not a pixel element: the rest cannot be read
            break


def _tag_at(fd: int, pos: int, little: bool) -> BaseTag:
    data = os.pread(fd, 4, pos)
    if len(data) < 4:
        return BaseTag(0)
    group, element = _unpack(little)[0].unpack(data)
    return BaseTag(group << 16 | element)


def _encoding(ds: FileDataset) -> tuple[bool, bool]:
    """The encoding pydicom's reader used for the data set (its implicit-VR heuristic may override the syntax)."""
    for elem in ds._dict.values():
        if isinstance(elem, RawDataElement):
            return elem.is_implicit_VR, elem.is_little_endian
    implicit, little = ds.is_implicit_VR, ds.is_little_endian
    return bool(implicit), bool(little)


def _inflate(fp: BinaryIO, target: Path) -> None:
    """Inflate the rest of `fp` (a raw deflate stream) into `target`, chunk by chunk."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    with target.open("xb") as out:
        while chunk := fp.read(_CHUNK):
            out.write(inflater.decompress(chunk))
            if inflater.eof:
                break
        out.write(inflater.flush())
    if not inflater.eof:
        raise zlib.error("the deflated data set is cut short")


def _parse(fp: BinaryIO, path: Path, inflated: Path, stack: ExitStack) -> Instance:
    preamble = read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        fp.seek(0)
        ds = read_partial(fp, stop_when=_at_pixel_data)
        implicit, little = _encoding(ds)
        _read_rest(ds, fp, implicit, little)
        return Instance(ds, fp.fileno(), deflated=False)
    _read_command_set_elements(fp)  # as read_partial does, before it inflates the rest
    _inflate(fp, inflated)
    body = stack.enter_context(inflated.open("rb"))
    inflated.unlink()  # the open file stays readable; nothing is left behind whatever happens next
    dataset = read_dataset(body, False, True, stop_when=_at_pixel_data)
    ds = FileDataset(str(path), dataset, preamble, meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    implicit, little = _encoding(ds)
    _read_rest(ds, body, implicit, little)
    return Instance(ds, body.fileno(), deflated=True)


@contextmanager
def open_instance(path: Path, scratch: Path) -> Iterator[Instance]:
    """Parse the instance at `path`, pixel elements left on disk (readable until the block ends). A deflated
    data set is inflated into a file in the folder `scratch`, removed before the block starts.

    Raises DeidError(HoldCode.UNREADABLE) when the file cannot be parsed, OSError when it cannot be read.
    """
    inflated = scratch / f".inflate-{os.getpid()}-{time.monotonic_ns()}"
    with ExitStack() as stack:
        stack.callback(_remove, inflated)
        fp = stack.enter_context(path.open("rb"))
        try:
            instance = _parse(fp, path, inflated, stack)
        except _CutShortError:
            raise DeidError(
                HoldCode.UNREADABLE,
                "a spooled instance cannot be parsed: the file ends inside its Pixel Data (it was cut short); "
                "have it sent again",
            ) from None
        except _UNREADABLE as exc:
            raise DeidError(
                HoldCode.UNREADABLE, f"a spooled instance cannot be parsed ({type(exc).__name__})"
            ) from None
        yield instance


def _remove(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()


class _Deflating:
    """A write-only stream that deflates what it is given into `sink`, as pydicom deflates a data set."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self._compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        self._taken = 0
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._taken += len(data)
        out = self._compressor.compress(data)
        self.written += len(out)
        self._sink.write(out)
        return len(data)

    def tell(self) -> int:
        return self._taken

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        raise io.UnsupportedOperation("a deflating stream cannot seek")

    def finish(self) -> int:
        out = self._compressor.flush()
        self.written += len(out)
        self._sink.write(out)
        return self.written


def _write_deflated(out: Dataset, sink: BinaryIO) -> None:
    """`dcmwrite(sink, out, enforce_file_format=True)` for Deflated Explicit VR Little Endian, with the data
    set deflated as it is encoded instead of encoded whole into memory first."""
    meta = deepcopy(out.file_meta)
    for meta_keyword, keyword in (
        ("MediaStorageSOPClassUID", "SOPClassUID"),
        ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
    ):
        value = out.get(keyword)
        if meta.get(meta_keyword) is None or (value and value != meta.get(meta_keyword)):
            setattr(meta, meta_keyword, value)
    fp = DicomIO(sink)
    fp.is_implicit_VR, fp.is_little_endian = False, True
    preamble = getattr(out, "preamble", None)
    if preamble is not None and len(preamble) != 128:
        raise ValueError("the preamble must be 128 bytes long")
    fp.write(preamble or b"\x00" * 128)
    fp.write(b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    if "PixelData" in out:
        out["PixelData"].is_undefined_length = False
    deflating = _Deflating(sink)
    body = DicomIO(deflating)
    body.is_implicit_VR, body.is_little_endian = False, True
    write_dataset(body, out)
    if deflating.finish() % 2:
        sink.write(b"\x00")


_TAG_TEXT = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")


def _encode_reason(exc: Exception) -> str:
    """What pydicom's writer refused, by the tags its message names (never a value) and the exception's type."""
    tags = sorted({int(group + element, 16) for group, element in _TAG_TEXT.findall(str(exc))})
    named = ", ".join(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword_for_tag(tag) or 'unknown'}" for tag in tags)
    if isinstance(exc, AttributeError) and tags and all(tag >> 16 == 0x0002 for tag in tags):
        return (
            f"the de-identified instance cannot be encoded: its file meta would lack {named}, which come from "
            "the SOP Class and Instance UIDs the spooled instance does not have (AttributeError)"
        )
    where = f" at {named}" if named else ""
    return f"the de-identified instance cannot be encoded: pydicom's writer failed{where} ({type(exc).__name__})"


def write_instance(out: Dataset, target: Path) -> int:
    """Encode `out` (pixel elements may be windows) into a new file `target`, fsync'd; return its size.

    Raises DeidError(HoldCode.ENCODE) when pydicom cannot encode the data set, OSError when the file cannot be written;
    the partial file is removed either way.
    """
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        with os.fdopen(fd, "wb", buffering=_CHUNK) as sink:
            try:
                if out.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
                    _write_deflated(out, sink)
                else:
                    dcmwrite(sink, out, enforce_file_format=True)
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - an encoding failure holds the study, whatever pydicom raised
                raise DeidError(HoldCode.ENCODE, _encode_reason(exc)) from None
            sink.flush()
            os.fsync(sink.fileno())
            return sink.tell()
    except BaseException:
        with suppress(FileNotFoundError):
            target.unlink()
        raise
