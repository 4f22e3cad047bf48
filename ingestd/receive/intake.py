"""Taking one file or archive from disk into the spool: what the drop-folder watcher and `ingestd import` share.

A file is one instance. An archive (zip, tar) is checked whole against the `archives` limits before any member is
read, then read member by member, in memory (`ingestd.receive.archives`). Each good instance is handed to the
caller's `store` as it is read; the bad members (not DICOM, corrupt, nested archives) are only noted, and once
every good one is stored they are read again and handed to `reject_member` with their reason, so that a refusal
by the spool midway leaves nothing half-kept. A source that is not taken at all (not DICOM, too large, a hostile
or unreadable archive) raises SourceRejected with the reason: the caller moves it to quarantine (the watcher) or
copies it there (`ingestd import`, which never touches the user's files). A source that is not whole yet (a file
or archive cut short: still being written?) raises SourceIncomplete, a kind of SourceRejected: the watcher waits
for it to be completed, `ingestd import` keeps it in quarantine like any other.

The file is opened once, without following a symbolic link and without blocking (a named pipe would block an
open), and must be the regular file the caller chose: everything is read from that one open file.

A file or archive member that is not DICOM goes to the caller's `attach` instead, when the `attachable` predicate
(the rules' `attach:` globs) accepts its `relative` path (`path_parts`): its bytes when they are in memory (an
archive member, a small file), else the open file to be read to its end (a large file, never read whole into
memory: one with no `DICM` at 128 over a few MB is not tried as DICOM at all). An archive whose own path is
attachable is attached whole, never opened. The `archives` limits hold for attached files as for instances.

Sources are named by their path within the folder, as `source_name` escapes it: a name that is not UTF-8 (a
Linux file name is any bytes) has its stray bytes written as `\\xNN`, so that the journal, the quarantine
sidecar and `ingestd status` can hold and show it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from ingestd.attachspool import Readable
from ingestd.config import Archives
from ingestd.dicomfile import IncompleteInstanceError, PreparedInstance, prepare_instance
from ingestd.errors import InvalidInstanceError, UnsafeArchiveError
from ingestd.receive.archives import (
    ArchiveKind,
    IncompleteArchiveError,
    archive_kind,
    check_archive,
    is_archive_name,
    read_members,
)
from ingestd.walk import DEFAULT_MAX_DEPTH, walk

__all__ = [
    "NO_RULE_ATTACHES",
    "Attach",
    "Attachable",
    "NotTheFileError",
    "RejectMember",
    "SourceFile",
    "SourceIncomplete",
    "SourceRejected",
    "Sources",
    "Store",
    "Taken",
    "find_sources",
    "is_ignored",
    "path_parts",
    "read_source",
    "source_name",
    "take_source",
    "upload_of",
]

_MB = 1024 * 1024
_PARTIAL_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".filepart")
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
_STREAM_OVER = 4 * _MB  # an attachable file over this with no `DICM` at 128 is copied as it is read, not tried
NO_RULE_ATTACHES = "no rule's attach: takes its path"

Store = Callable[[PreparedInstance, str], object]
"""Called with each good instance and its source detail (`a/b.dcm`, or `a/b.zip!c/d.dcm` for a member)."""

RejectMember = Callable[[str, str, bytes, str], object]
"""Called with a bad archive member's source detail, its base name, its bytes and the reason it is not taken."""

Attachable = Callable[[str], bool]
"""Whether a rule in force attaches a file that is not DICOM at this `relative` path (`path_parts`)."""

Attach = Callable[[str, "bytes | Readable"], object]
"""Called with the source detail of a file or member to attach and its content: its bytes, or the open file (read
it to its end, and nothing else: it is positioned at its start, and reading past the `archives` limit raises
SourceRejected)."""


def _never(_relative: str) -> bool:
    return False


def path_parts(detail: str) -> str:
    """The path of a dropped file inside its drop folder, archives opened: `a/b.zip!c/d.dcm` -> `a/c/d.dcm`.

    What the rules' `path` conditions, `{path[N]}` and `attach[].match` see (`relative`)."""
    if "!" not in detail:
        return detail
    archive, member = detail.split("!", 1)
    return str(PurePosixPath(PurePosixPath(archive).parent, member))


def upload_of(detail: str) -> str:
    """The upload of a file dropped into a drop folder: the top-level entry below the folder it came in.

    `sub01/ses/x.pdf` -> `sub01`, `scan.zip!a/b.pdf` -> `scan.zip`, `x.pdf` -> `x.pdf`."""
    return detail.split("!", 1)[0].split("/", 1)[0]


class SourceRejected(Exception):  # noqa: N818 - an outcome (the source goes to quarantine), not a failure
    """The whole file or archive is not taken; `reason` says why, for the quarantine sidecar."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SourceIncomplete(SourceRejected):
    """The file or archive stops short of its end: more bytes could still complete it (it may be being written)."""


class NotTheFileError(OSError):
    """The path no longer names the regular file that was chosen: replaced, or not a regular file at all."""


@dataclass(frozen=True, slots=True)
class Taken:
    """What taking one source did."""

    archive: ArchiveKind | None  # None: a single file (or an archive attached whole)
    instances: int  # handed to `store`
    rejected: int  # archive members handed to `reject_member`
    attached: int = 0  # files or members handed to `attach`


def is_ignored(relative: PurePosixPath | Path) -> bool:
    """Say whether a path (relative to the folder scanned) is hidden or looks partial, so is left alone."""
    for part in relative.parts:
        if part.startswith("."):
            return True
    return relative.name.lower().endswith(_PARTIAL_SUFFIXES)


def source_name(name: str) -> str:
    """A file or member name as sources, logs and the quarantine record it: valid UTF-8 whatever the name's bytes.

    Python holds the bytes of a name that are not UTF-8 as lone surrogates, which SQLite cannot store; they are
    written as `\\xNN` instead (`os.fsencode(name).decode("utf-8", "backslashreplace")`). A UTF-8 name is kept.
    """
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no byte stands for
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A file to take: where it is, the folder it counts as dropped into, and its path within that folder."""

    path: Path
    root: Path
    relative: str
    size: int
    upload: str = "."  # `ingestd import`'s upload: `.` for a folder given, the file's name for a file given alone


@dataclass
class Sources:
    """What `find_sources` found: the files to take, how many entries it passed over, what it could not read."""

    files: list[SourceFile] = field(default_factory=list)
    passed_over: int = 0  # hidden, partial, links, devices
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path within the folder given, reason)


def find_sources(paths: Sequence[Path]) -> Sources:
    """Every regular file under `paths` (folders walked in name order), what was passed over, what was unreadable.

    The one walk of files at hand: `ingestd import` (and its `--dry-run`), `explain` and `anonymize` all read what
    it finds. Hidden and partial files and folders (`.name`, `*.part`, ...) and links inside a folder are passed
    over, as a drop folder does. A path given is made absolute without resolving links, so that the rules'
    `drop_folder` sees the name it was given by; a file given on its own counts as dropped into its folder.
    """
    found = Sources()
    for given in paths:
        root = Path(os.path.abspath(given))  # noqa: PTH100 - absolute without resolving links
        if not root.is_dir():
            found.files.append(SourceFile(root, root.parent, root.name, root.stat().st_size, root.name))
            continue

        def unreadable(error: OSError, root: Path = root) -> None:
            where = Path(str(error.filename))
            relative = where.relative_to(root).as_posix() if where.is_relative_to(root) else where.name
            found.unreadable.append((relative, f"cannot be read: {error.strerror or error}"))

        def too_deep(folder: Path, depth: int, root: Path = root) -> None:
            relative = folder.relative_to(root).as_posix()
            reason = f"a folder {depth} levels down, deeper than {DEFAULT_MAX_DEPTH}: not searched"
            found.unreadable.append((relative, reason))

        for here, subdirectories, names in walk(root, onerror=unreadable, too_deep=too_deep):
            kinds = {name: _kind(here / name, root, unreadable) for name in sorted(subdirectories)}
            subdirectories[:] = [name for name, kind in kinds.items() if kind == "take"]  # os.walk goes into these
            found.passed_over += sum(kind == "pass" for kind in kinds.values())
            for name in sorted(names):
                kind = _kind(here / name, root, unreadable)
                if kind == "take":
                    relative = (here / name).relative_to(root).as_posix()
                    found.files.append(SourceFile(here / name, root, relative, (here / name).lstat().st_size))
                found.passed_over += kind == "pass"
    return found


def _kind(path: Path, root: Path, unreadable: Callable[[OSError], None]) -> str:
    """`take` a regular file or folder, `pass` over what is hidden, partial or neither, `gone` if it vanished."""
    try:
        mode = path.lstat().st_mode
    except OSError as exc:
        unreadable(exc)
        return "gone"
    if is_ignored(path.relative_to(root)) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "pass"
    return "take"


Found = Callable[[PreparedInstance, str], object]
"""Called with each instance of a source file and its source detail, as `Store`."""

Refused = Callable[[str, str, str, bytes | Path], object]
"""Called with the source detail of a file or member not taken, the reason, its base name, and its bytes (a member)
or its path (a whole file)."""


def read_source(
    file: SourceFile,
    limits: Archives,
    *,
    found: Found,
    refused: Refused,
    unreadable: Callable[[str, str], object],
    attachable: Attachable = _never,
    attached: Attach | None = None,
) -> Taken | None:
    """Read one file found by `find_sources` as a drop folder takes it: every instance to `found` (its file meta
    completed by `prepare_instance`), every file or member that is not DICOM and `attachable` to `attached` (if
    given), every file or archive member not taken to `refused` with the reason, and a file that cannot be read at
    all to `unreadable` (its path within the folder, the reason). Returns what taking it did (None: not taken)."""
    try:
        return take_source(
            file.path,
            file.relative,
            limits,
            size=file.size,
            store=found,
            reject_member=lambda detail, name, data, reason: refused(detail, reason, name, data),
            attachable=attachable,
            attach=attached,
        )
    except SourceRejected as exc:
        refused(source_name(file.relative), exc.reason, file.path.name, file.path)
    except OSError as exc:
        unreadable(file.relative, f"cannot be read: {exc.strerror or exc}")
    return None


def _nothing() -> None:
    return None


def _open_regular(path: Path, identity: tuple[int, int] | None) -> IO[bytes]:
    """Open the regular file at `path` for reading, never waiting on a pipe.

    `identity` is the (device, inode) the caller saw there (with `lstat`), if any: then a symbolic link is not
    followed either. Without it (`ingestd import`, whose user named the files) a link is followed. Raises
    NotTheFileError, or the OSError of the open (PermissionError, FileNotFoundError, ...).
    """
    try:
        fd = os.open(path, _OPEN_FLAGS | (os.O_NOFOLLOW if identity is not None else 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotTheFileError(errno.ELOOP, "a symbolic link, not a file", str(path)) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotTheFileError(errno.EINVAL, "not a regular file", str(path))
        if identity is not None and (info.st_dev, info.st_ino) != identity:
            raise NotTheFileError(errno.ESTALE, "replaced by another file", str(path))
        os.set_blocking(fd, True)
        return open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def take_source(
    path: Path,
    relative: str,
    limits: Archives,
    *,
    size: int,
    store: Store,
    reject_member: RejectMember,
    check: Callable[[], object] = _nothing,
    identity: tuple[int, int] | None = None,
    attachable: Attachable = _never,
    attach: Attach | None = None,
) -> Taken:
    """Hand every instance of the file or archive at `path` to `store`, what is not DICOM but `attachable` to
    `attach` (if given), and its bad members to `reject_member`.

    `relative` is the path the sources are named by (escaped here by `source_name`), `size` the file's size as
    seen when it was chosen, `identity` its (device, inode) then, if known. `check` runs once the bytes of a
    file, or the list of an archive's members, have been read (the watcher checks there that the file did not
    change meanwhile; a file copied as an attachment as it is read is checked by `attach`'s caller). Raises
    SourceIncomplete, SourceRejected, NotTheFileError or the OSError of reading; whatever `store`, `attach`,
    `reject_member` and `check` raise goes through.
    """
    detail = source_name(relative)
    wanted = _never if attach is None else attachable
    with _open_regular(path, identity) as stream:
        head = stream.read(512)
        kind = archive_kind(path.name, head)
        if kind is None or wanted(path_parts(detail)):
            return _take_file(stream, head, detail, limits, size, check, store, wanted, attach)
        bad: dict[str, str] = {}
        taken = attached = 0
        try:
            check_archive(stream, kind, limits)
            check()
            for name, data in read_members(stream, kind, limits):
                member = f"{detail}!{source_name(name)}"
                prepared, reason = _member_instance(name, data)
                if prepared is not None:
                    store(prepared, member)
                    taken += 1
                elif attach is not None and wanted(path_parts(member)):
                    attach(member, data)
                    attached += 1
                else:
                    bad[name] = f"{reason}, and {NO_RULE_ATTACHES}"
            if bad:
                for name, data in read_members(stream, kind, limits, names=bad):
                    reject_member(f"{detail}!{source_name(name)}", PurePosixPath(name).name, data, bad[name])
        except IncompleteArchiveError as exc:
            raise SourceIncomplete(str(exc)) from None
        except UnsafeArchiveError as exc:
            raise SourceRejected(str(exc)) from None
    return Taken(kind, taken, len(bad), attached)


def _too_large(size: int | None, limits: Archives) -> SourceRejected:
    what = "file is" if size is None else f"file is {size // _MB} MB,"
    return SourceRejected(
        f"{what} over archives.max_member_mb ({limits.max_member_mb}), the largest instance ingestd takes"
    )


class _Bounded:
    """A file read to its end for an attachment, refusing (SourceRejected) past `archives.max_member_mb`: it may
    have grown since it was chosen."""

    def __init__(self, stream: IO[bytes], limits: Archives) -> None:
        self.stream = stream
        self.limits = limits
        self.read_so_far = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self.stream.read(size)
        self.read_so_far += len(data)
        if self.read_so_far > self.limits.max_member_mb * _MB:
            raise _too_large(None, self.limits)
        return data


def _take_file(
    stream: IO[bytes],
    head: bytes,
    detail: str,
    limits: Archives,
    size: int,
    check: Callable[[], object],
    store: Store,
    attachable: Attachable,
    attach: Attach | None,
) -> Taken:
    """Take a single file: an instance, else an attachment if `attachable`, else rejected (SourceRejected)."""
    if size > limits.max_member_mb * _MB:
        raise _too_large(size, limits)
    attached = attach is not None and attachable(path_parts(detail))
    stream.seek(0)
    if attach is not None and attached and (archive_kind(detail, head) or _not_dicom_over(head, size)):
        attach(detail, _Bounded(stream, limits))  # an archive attached whole, or a large file: never read whole
        return Taken(None, 0, 0, 1)
    data = stream.read(limits.max_member_mb * _MB + 1)
    check()
    if len(data) > limits.max_member_mb * _MB:  # it grew since it was chosen (without a check to notice)
        raise _too_large(None, limits)
    try:
        prepared = prepare_instance(data)
    except IncompleteInstanceError as exc:
        if attach is not None and attached and data[128:132] != b"DICM":
            # Shorter than a DICOM preamble (an empty marker, a one-line note): it could begin a DICOM file only in
            # theory, and a rule attaches its path: attached, not left to wait for bytes that never come.
            attach(detail, data)
            return Taken(None, 0, 0, 1)
        raise SourceIncomplete(str(exc)) from None
    except InvalidInstanceError as exc:
        if attach is None or not attached:
            raise SourceRejected(f"{exc}, and {NO_RULE_ATTACHES}") from None
        attach(detail, data)
        return Taken(None, 0, 0, 1)
    store(prepared, detail)
    return Taken(None, 1, 0)


def _not_dicom_over(head: bytes, size: int) -> bool:
    """Whether a file is too large to try as DICOM in memory when it does not even start like one."""
    return size > _STREAM_OVER and head[128:132] != b"DICM"


def _member_instance(name: str, data: bytes) -> tuple[PreparedInstance | None, str]:
    """An archive member prepared for the spool, or the reason it is not taken."""
    if is_archive_name(name) or archive_kind(name, data[:512]) is not None:
        return None, "nested archive"
    try:
        return prepare_instance(data), ""
    except InvalidInstanceError as exc:
        return None, str(exc)
