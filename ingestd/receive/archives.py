"""Read `.zip` and `.tar` (plain, gzip, bzip2, xz) archives dropped into a folder, safely.

An archive is checked as a whole before anything is read out of it: every member's name, type and
declared size, the member count, the total size and the expansion ratio, against the `archives` limits.
A hostile or absurd archive raises UnsafeArchiveError naming the problem, and nothing of it is used.
Members are then read one at a time, each into memory on its own, with the limits enforced again on the
bytes actually produced. Nothing is ever extracted to disk.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from ingestd.config import Archives
from ingestd.errors import UnsafeArchiveError

__all__ = ["ArchiveKind", "Member", "archive_kind", "check_archive", "is_archive_name", "read_members"]

ArchiveKind = Literal["zip", "tar"]

_MB = 1024 * 1024
_CHUNK = 1024 * 1024
_ZIP_SUFFIXES = (".zip",)
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# What reading a damaged archive raises, by layer: zipfile, tarfile, gzip/zlib, bz2/lzma, and the OS.
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError, ValueError, NotImplementedError)


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


def check_archive(path: Path, kind: ArchiveKind, limits: Archives) -> list[Member]:
    """Check every member's metadata against `limits`, keeping no member's data; return the regular files.

    A compressed tar is decompressed once to reach its headers (data skipped, stopping at the first limit).

    Raises UnsafeArchiveError, naming the problem, for a hostile, absurd, encrypted or unreadable archive.
    """
    label = f"{kind} archive"
    try:
        size = path.stat().st_size
        if kind == "zip":
            return _check_zip(path, _Budget(label, limits, size))
        return _check_tar(path, _Budget(label, limits, size))
    except UnsafeArchiveError:
        raise
    except _READ_ERRORS as exc:
        raise UnsafeArchiveError(f"{label} cannot be read: {_describe(exc)}") from None


def _zip_member_type(info: zipfile.ZipInfo) -> str | None:
    """The kind of a zip entry that is neither a regular file nor a folder (from its Unix mode), or None."""
    mode = info.external_attr >> 16
    if not stat.S_IFMT(mode) or stat.S_ISREG(mode) or stat.S_ISDIR(mode):  # no type bits: a plain file
        return None
    return "symbolic link" if stat.S_ISLNK(mode) else "special file"


def _zip_declared_entries(path: Path) -> int | None:
    """The entry count in a zip's end-of-central-directory record (zip64 too), or None if not found."""
    with path.open("rb") as stream:
        size = stream.seek(0, os.SEEK_END)
        stream.seek(max(0, size - (0xFFFF + 22)))  # the record is 22 bytes and a comment of up to 64 KiB
        tail = stream.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + 22 > len(tail):
            return None
        entries = int.from_bytes(tail[at + 10 : at + 12], "little")
        locator = at - 20
        if entries != 0xFFFF or locator < 0 or tail[locator : locator + 4] != b"PK\x06\x07":
            return entries
        stream.seek(int.from_bytes(tail[locator + 8 : locator + 16], "little"))
        record = stream.read(56)
    if record[:4] != b"PK\x06\x06" or len(record) < 40:
        return None
    return int.from_bytes(record[32:40], "little")


def _check_member_count(count: int, budget: _Budget) -> None:
    if count > budget.limits.max_members:
        raise UnsafeArchiveError(
            f"{budget.label}: {count} members, more than {budget.limits.max_members} (archives.max_members)"
        )


def _check_zip(path: Path, budget: _Budget) -> list[Member]:
    # The count from the end record first: a central directory of millions of entries is never parsed.
    declared = _zip_declared_entries(path)
    if declared is not None:
        _check_member_count(declared, budget)
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
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


def _check_tar(path: Path, budget: _Budget) -> list[Member]:
    members = []
    # Stream mode: headers are read in order, data skipped by reading through it, nothing kept.
    with tarfile.open(path, "r|*") as archive:
        for info in archive:
            member = _check_tar_member(info, budget)
            if member is not None:
                members.append(member)
    return members


# -- reading -----------------------------------------------------------------------------------------


def read_members(
    path: Path, kind: ArchiveKind, limits: Archives, names: Container[str] | None = None
) -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) for each regular file of a checked archive, one at a time, in archive order.

    Only members whose name is in `names` when it is given. The limits are enforced again on the bytes
    actually read; UnsafeArchiveError is raised if they are passed or the archive turns out unreadable.
    """
    label = f"{kind} archive"
    try:
        budget = _Budget(label, limits, path.stat().st_size)
        if kind == "zip":
            yield from _read_zip(path, budget, names)
        else:
            yield from _read_tar(path, budget, names)
    except UnsafeArchiveError:
        raise
    except _READ_ERRORS as exc:
        raise UnsafeArchiveError(f"{label} cannot be read: {_describe(exc)}") from None


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


def _read_zip(path: Path, budget: _Budget, names: Container[str] | None) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir() or (names is not None and info.filename not in names):
                continue
            budget.check_name(info.filename)
            budget.add_member(info.filename, info.file_size)
            with archive.open(info) as stream:
                data = _read_limited(stream, info.filename, info.file_size, budget)
            yield info.filename, data


def _read_tar(path: Path, budget: _Budget, names: Container[str] | None) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, "r|*") as archive:
        for info in archive:
            if _check_tar_member(info, budget) is None:
                continue
            if names is not None and info.name not in names:
                continue
            stream = archive.extractfile(info)
            if stream is None:
                raise UnsafeArchiveError(f"{budget.label}: member {info.name!r} has no data")
            with stream:
                data = _read_limited(stream, info.name, info.size, budget)
            if len(data) != info.size:
                raise UnsafeArchiveError(f"{budget.label} cannot be read: member {info.name!r} is cut short")
            yield info.name, data


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
