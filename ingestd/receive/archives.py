"""Read `.zip` and `.tar` (plain, gzip, bzip2, xz) archives dropped into a folder, safely.

An archive is checked as a whole before anything is read out of it: every member's name, type and
declared size, the member count, the total size and the expansion ratio, against the `archives` limits.
A hostile or absurd archive raises UnsafeArchiveError naming the problem, and nothing of it is used.
Members are then read one at a time, each into memory on its own, with the limits enforced again on the
bytes actually produced. Nothing is ever extracted to disk. Everything reads one open file, never a path
again: what is checked is what is read.

An archive is whole only when its end is there: a zip's end of central directory record, a tar's
end-of-archive marker (a zero block) and, for a compressed tar, the end of its compressed stream.
An archive that stops short of that (still being written, or cut short for good) raises
IncompleteArchiveError, a kind of UnsafeArchiveError: the drop-folder watcher waits for more bytes.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Container, Iterator
from dataclasses import dataclass
from typing import IO, Literal, Protocol, Self

from ingestd.config import Archives
from ingestd.errors import UnsafeArchiveError

__all__ = [
    "ArchiveKind",
    "IncompleteArchiveError",
    "Member",
    "archive_kind",
    "check_archive",
    "is_archive_name",
    "read_members",
]

ArchiveKind = Literal["zip", "tar"]

_MB = 1024 * 1024
_CHUNK = 1024 * 1024
_ZIP_SUFFIXES = (".zip",)
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# What reading a damaged archive raises, by layer: zipfile, tarfile, gzip/zlib, bz2/lzma, and the OS.
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError, ValueError, NotImplementedError)
_ZIP_STARTS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; the end record of an empty zip
_ZIP_END = b"PK\x05\x06"
_ZIP_END_SIZE = 22
# Compressed tars, by their first bytes: what decompresses them (raising EOFError when the stream is cut short).
_TAR_COMPRESSIONS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)
# What tarfile says when the data runs out (the file ends) in a member's data or before a header.
_TAR_RAN_OUT = ("unexpected end of data", "empty file", "truncated header")
_TAR_HEADER_RAN_OUT = ("EmptyHeaderError", "TruncatedHeaderError")


class IncompleteArchiveError(UnsafeArchiveError):
    """The archive stops short of its end: still being written, or cut short. More bytes could complete it."""


@dataclass(frozen=True, slots=True)
class Member:
    """A regular file in an archive: its name as stored and its declared uncompressed size."""

    name: str
    size: int


def is_archive_name(name: str) -> bool:
    """Say whether a file name ends like an archive ingestd reads."""
    lower = name.lower()
    return lower.endswith(_ZIP_SUFFIXES + _TAR_SUFFIXES)


def archive_kind(name: str, head: bytes = b"") -> ArchiveKind | None:
    """The kind of archive a file is, by its name, else by its first bytes; None for anything else.

    `head` should be the file's first 512 bytes. A DICOM file (DICM at 128) is never taken for an archive,
    whatever its preamble holds.
    """
    lower = name.lower()
    if lower.endswith(_ZIP_SUFFIXES):
        return "zip"
    if lower.endswith(_TAR_SUFFIXES):
        return "tar"
    if head[128:132] == b"DICM":
        return None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")) or head[257:262] == b"ustar":
        return "tar"
    return None


def _escapes(name: str) -> bool:
    """Say whether a member name would land outside the folder it is extracted into."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    return ".." in name.replace("\\", "/").split("/")


class _Budget:
    """Running totals of an archive's members, refusing as soon as one limit is passed."""

    def __init__(self, label: str, limits: Archives, compressed_size: int) -> None:
        self.label = label
        self.limits = limits
        self.compressed_size = max(compressed_size, 1)
        self.members = 0
        self.total = 0

    def check_name(self, name: str) -> None:
        if _escapes(name):
            raise UnsafeArchiveError(f"{self.label}: member {name!r} has a path escaping the folder")

    def add_member(self, name: str, size: int) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise UnsafeArchiveError(
                f"{self.label}: more than {self.limits.max_members} members (archives.max_members)"
            )
        self.check_member_size(name, size)
        self.total += size
        self.check_expansion(self.total)

    def check_member_size(self, name: str, size: int) -> None:
        if size > self.limits.max_member_mb * _MB:
            raise UnsafeArchiveError(
                f"{self.label}: member {name!r} is {size // _MB} MB uncompressed, over "
                f"archives.max_member_mb ({self.limits.max_member_mb})"
            )

    def check_expansion(self, uncompressed: int) -> None:
        if uncompressed > self.limits.max_total_mb * _MB:
            raise UnsafeArchiveError(
                f"{self.label}: expands to more than {self.limits.max_total_mb} MB (archives.max_total_mb)"
            )
        ratio = uncompressed / self.compressed_size
        if ratio > self.limits.max_ratio:
            raise UnsafeArchiveError(
                f"{self.label}: expands {ratio:.0f} times its compressed size, over "
                f"archives.max_ratio ({self.limits.max_ratio:g})"
            )


# -- checking ----------------------------------------------------------------------------------------


def _size(stream: IO[bytes]) -> int:
    size = stream.seek(0, os.SEEK_END)
    stream.seek(0)
    return size


def check_archive(stream: IO[bytes], kind: ArchiveKind, limits: Archives) -> list[Member]:
    """Check every member's metadata against `limits`, keeping no member's data; return the regular files.

    `stream` is the archive, open for reading (seekable). A compressed tar is decompressed once to reach its
    headers (data skipped, stopping at the first limit) and its end.

    Raises UnsafeArchiveError, naming the problem, for a hostile, absurd, encrypted or unreadable archive, and
    IncompleteArchiveError for one that stops short of its end.
    """
    label = f"{kind} archive"
    try:
        size = _size(stream)
        if kind == "zip":
            return _check_zip(stream, _Budget(label, limits, size))
        return _check_tar(stream, _Budget(label, limits, size))
    except UnsafeArchiveError:
        raise
    except _READ_ERRORS as exc:
        raise _read_error(label, exc) from None


def _zip_member_type(info: zipfile.ZipInfo) -> str | None:
    """The kind of a zip entry that is neither a regular file nor a folder (from its Unix mode), or None."""
    mode = info.external_attr >> 16
    if not stat.S_IFMT(mode) or stat.S_ISREG(mode) or stat.S_ISDIR(mode):  # no type bits: a plain file
        return None
    return "symbolic link" if stat.S_ISLNK(mode) else "special file"


@dataclass(frozen=True, slots=True)
class _ZipEnd:
    """A zip's end-of-central-directory record: the entry count it declares, and whether it ends the file."""

    entries: int
    at_end: bool


def _zip_end(stream: IO[bytes]) -> _ZipEnd | None:
    """The end-of-central-directory record of a zip (zip64 too), or None if there is none."""
    size = stream.seek(0, os.SEEK_END)
    stream.seek(max(0, size - (0xFFFF + _ZIP_END_SIZE)))  # the record is 22 bytes and a comment of up to 64 KiB
    tail = stream.read()
    at = tail.rfind(_ZIP_END)
    if at < 0 or at + _ZIP_END_SIZE > len(tail):
        return None
    at_end = at + _ZIP_END_SIZE + int.from_bytes(tail[at + 20 : at + 22], "little") == len(tail)
    entries = int.from_bytes(tail[at + 10 : at + 12], "little")
    locator = at - 20
    if entries != 0xFFFF or locator < 0 or tail[locator : locator + 4] != b"PK\x06\x07":
        return _ZipEnd(entries, at_end)
    stream.seek(int.from_bytes(tail[locator + 8 : locator + 16], "little"))
    record = stream.read(56)
    if record[:4] != b"PK\x06\x06" or len(record) < 40:
        return None
    return _ZipEnd(int.from_bytes(record[32:40], "little"), at_end)


def _starts_like_zip(stream: IO[bytes]) -> bool:
    """Say whether the file's first bytes are (the beginning of) a zip's first record; an empty file counts."""
    stream.seek(0)
    head = stream.read(4)
    return any(start.startswith(head) for start in _ZIP_STARTS)


def _check_member_count(count: int, budget: _Budget) -> None:
    if count > budget.limits.max_members:
        raise UnsafeArchiveError(
            f"{budget.label}: {count} members, more than {budget.limits.max_members} (archives.max_members)"
        )


def _check_zip(stream: IO[bytes], budget: _Budget) -> list[Member]:
    # A zip is written front to back, its end record last: a zip still being written has none (or, from a
    # stored member, one that is not its own). Its first bytes tell it from a file that is no zip at all.
    end = _zip_end(stream)
    if end is None or not end.at_end:
        if _starts_like_zip(stream):
            raise IncompleteArchiveError(f"{budget.label} is cut short: it has no end of central directory yet")
    else:  # the count from the end record first: a central directory of millions of entries is never parsed
        _check_member_count(end.entries, budget)
    with zipfile.ZipFile(stream) as archive:
        infos = archive.infolist()
    if _starts_like_zip(stream) and infos and min(info.header_offset for info in infos) != 0:
        # Its first record is not one of its members: the end read is that of a zip stored in a zip cut short.
        raise IncompleteArchiveError(f"{budget.label} is cut short: its end record is not its own")
    _check_member_count(len(infos), budget)
    members = []
    for info in infos:
        budget.check_name(info.filename)
        if info.flag_bits & 0x1:
            raise UnsafeArchiveError(f"{budget.label}: member {info.filename!r} is encrypted")
        odd = _zip_member_type(info)
        if odd is not None:
            raise UnsafeArchiveError(f"{budget.label}: member {info.filename!r} is a {odd}")
        if info.compress_type not in _ZIP_METHODS:
            raise UnsafeArchiveError(
                f"{budget.label}: member {info.filename!r} uses compression method {info.compress_type}, "
                "which ingestd cannot read (use deflate)"
            )
        if info.is_dir():
            continue
        budget.add_member(info.filename, info.file_size)
        members.append(Member(info.filename, info.file_size))
    return members


def _tar_member_type(info: tarfile.TarInfo) -> str | None:
    if info.issym():
        return "symbolic link"
    if info.islnk():
        return "hard link"
    if info.ischr() or info.isblk() or info.isfifo():
        return "device or pipe"
    if info.issparse():
        return "sparse file"
    if not (info.isreg() or info.isdir()):
        return "special entry"
    return None


def _check_tar_member(info: tarfile.TarInfo, budget: _Budget) -> Member | None:
    budget.check_name(info.name)
    odd = _tar_member_type(info)
    if odd is not None:
        raise UnsafeArchiveError(f"{budget.label}: member {info.name!r} is a {odd}")
    # The tar stream read so far (headers, padding, data) against the compressed size: the actual ratio.
    budget.check_expansion(info.offset_data + info.size)
    if info.isdir():
        return None
    budget.add_member(info.name, info.size)
    return Member(info.name, info.size)


def _check_tar(stream: IO[bytes], budget: _Budget) -> list[Member]:
    members = []
    for _archive, info in _tar_entries(stream, budget):
        member = _check_tar_member(info, budget)
        if member is not None:
            members.append(member)
    return members


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _Counting:
    """A binary stream read front to back (as tarfile's stream mode reads it), counting the bytes read."""

    def __init__(self, stream: _Readable) -> None:
        self.stream = stream
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data

    def write(self, data: bytes, /) -> int:
        raise OSError("read only")

    def tell(self) -> int:
        return self.count

    def seek(self, position: int, /) -> int:
        raise OSError("not seekable")

    def close(self) -> None:
        return None


def _ending_tarinfo(ends: list[str]) -> type[tarfile.TarInfo]:
    """A TarInfo class that notes in `ends` why reading a header failed: tarfile ends the archive on most."""

    class _TarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, archive: tarfile.TarFile) -> Self:
            try:
                return super().fromtarfile(archive)
            except tarfile.HeaderError as exc:
                ends.append(type(exc).__name__)  # EOFHeaderError: the end-of-archive marker
                raise

    return _TarInfo


@contextlib.contextmanager
def _decompressed(stream: IO[bytes]) -> Iterator[tuple[_Readable, str | None]]:
    """The tar stream inside `stream` (decompressed if it is compressed), and the compression's name.

    gzip, bz2 and lzma raise EOFError when the compressed stream stops before its end (tarfile's own
    decompression just stops reading there).
    """
    stream.seek(0)
    head = stream.read(6)
    stream.seek(0)
    compression = next((name for magic, name in _TAR_COMPRESSIONS if head.startswith(magic)), None)
    if compression is None:
        yield stream, None
    elif compression == "gzip":
        with gzip.GzipFile(fileobj=stream, mode="rb") as unzipped:
            yield unzipped, compression
    elif compression == "bzip2":
        with bz2.BZ2File(stream) as unzipped_bz2:
            yield unzipped_bz2, compression
    else:
        with lzma.LZMAFile(stream) as unzipped_xz:
            yield unzipped_xz, compression


def _tar_entries(stream: IO[bytes], budget: _Budget) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Yield each entry of a tar in order, then check that it is whole: its end-of-archive marker, and the end
    of its compressed stream. Raises IncompleteArchiveError where the file ends first."""
    ends: list[str] = []
    try:
        with _decompressed(stream) as (plain, compression):
            counted = _Counting(plain)
            # Stream mode: headers are read in order, data skipped by reading through it, nothing kept.
            with tarfile.open(fileobj=counted, mode="r|", tarinfo=_ending_tarinfo(ends)) as archive:
                yield from ((archive, info) for info in archive)
            _check_tar_end(ends[-1] if ends else "", compression, budget)
            if compression is not None:  # read on to the end of the compressed stream: it says it is whole
                while counted.read(_CHUNK):
                    budget.check_expansion(counted.count)
    except _READ_ERRORS as exc:
        raise _read_error(budget.label, exc) from None


def _check_tar_end(last: str, compression: str | None, budget: _Budget) -> None:
    """Raise unless the header read last was the end-of-archive marker (tarfile ends on any bad header)."""
    if last == "EOFHeaderError":
        return
    if last not in _TAR_HEADER_RAN_OUT:
        raise UnsafeArchiveError(f"{budget.label} cannot be read: a damaged header after its last member")
    if compression is None:  # the file ends where a header should be
        raise IncompleteArchiveError(f"{budget.label} is cut short: it has no end-of-archive marker yet")
    # the compressed stream ended as it should, but what it holds stops short: no more bytes will come
    raise UnsafeArchiveError(f"{budget.label} cannot be read: the tar in it has no end-of-archive marker")


# -- reading -----------------------------------------------------------------------------------------


def read_members(
    stream: IO[bytes], kind: ArchiveKind, limits: Archives, names: Container[str] | None = None
) -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) for each regular file of a checked archive, one at a time, in archive order.

    Only members whose name is in `names` when it is given. The limits are enforced again on the bytes
    actually read; UnsafeArchiveError is raised if they are passed or the archive turns out unreadable
    (IncompleteArchiveError if it turns out cut short).
    """
    label = f"{kind} archive"
    try:
        budget = _Budget(label, limits, _size(stream))
        if kind == "zip":
            yield from _read_zip(stream, budget, names)
        else:
            yield from _read_tar(stream, budget, names)
    except UnsafeArchiveError:
        raise
    except _READ_ERRORS as exc:
        raise _read_error(label, exc) from None


def _read_limited(stream: IO[bytes], name: str, declared: int, budget: _Budget) -> bytes:
    """Read one member, refusing it as soon as it runs past its declared size (already within budget)."""
    chunks = []
    count = 0
    while chunk := stream.read(_CHUNK):
        count += len(chunk)
        if count > declared:
            raise UnsafeArchiveError(f"{budget.label}: member {name!r} is larger than its header says")
        chunks.append(chunk)
    return b"".join(chunks)


def _read_zip(stream: IO[bytes], budget: _Budget, names: Container[str] | None) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(stream) as archive:
        for info in archive.infolist():
            if info.is_dir() or (names is not None and info.filename not in names):
                continue
            budget.check_name(info.filename)
            budget.add_member(info.filename, info.file_size)
            with archive.open(info) as member:
                data = _read_limited(member, info.filename, info.file_size, budget)
            yield info.filename, data


def _read_tar(stream: IO[bytes], budget: _Budget, names: Container[str] | None) -> Iterator[tuple[str, bytes]]:
    for archive, info in _tar_entries(stream, budget):
        if _check_tar_member(info, budget) is None:
            continue
        if names is not None and info.name not in names:
            continue
        member = archive.extractfile(info)
        if member is None:
            raise UnsafeArchiveError(f"{budget.label}: member {info.name!r} has no data")
        with member:
            data = _read_limited(member, info.name, info.size, budget)
        if len(data) != info.size:
            raise IncompleteArchiveError(f"{budget.label} is cut short: member {info.name!r} is cut short")
        yield info.name, data


def _read_error(label: str, exc: BaseException) -> UnsafeArchiveError:
    """The error to raise for what reading an archive raised: IncompleteArchiveError where its bytes ran out."""
    if isinstance(exc, EOFError):  # a compressed stream stops before its end
        return IncompleteArchiveError(f"{label} is cut short: its compressed stream stops before its end")
    if isinstance(exc, tarfile.ReadError) and str(exc) in _TAR_RAN_OUT:
        return IncompleteArchiveError(f"{label} is cut short: {exc}")
    return UnsafeArchiveError(f"{label} cannot be read: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
