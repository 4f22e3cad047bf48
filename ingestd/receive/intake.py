"""Taking one file or archive from disk into the spool: what the drop-folder watcher and `ingestd import` share.

A file is one instance. An archive (zip, tar) is checked whole against the `archives` limits before any member is
read, then read member by member, in memory (`ingestd.receive.archives`). Each good instance is handed to the
caller's `store` as it is read; the bad members (not DICOM, corrupt, nested archives) are only noted, and once
every good one is stored they are read again and handed to `reject_member` with their reason, so that a refusal
by the spool midway leaves nothing half-kept. A source that is not taken at all (not DICOM, too large, a hostile
or unreadable archive) raises SourceRejected with the reason: the caller moves it to quarantine (the watcher) or
copies it there (`ingestd import`, which never touches the user's files).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ingestd.config import Archives
from ingestd.dicomfile import PreparedInstance, prepare_instance
from ingestd.errors import InvalidInstanceError, UnsafeArchiveError
from ingestd.receive.archives import ArchiveKind, archive_kind, check_archive, is_archive_name, read_members

__all__ = ["RejectMember", "SourceRejected", "Store", "Taken", "is_ignored", "take_source"]

_MB = 1024 * 1024
_PARTIAL_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".filepart")

Store = Callable[[PreparedInstance, str], object]
"""Called with each good instance and its source detail (`a/b.dcm`, or `a/b.zip!c/d.dcm` for a member)."""

RejectMember = Callable[[str, str, bytes, str], object]
"""Called with a bad archive member's source detail, its base name, its bytes and the reason it is not taken."""


class SourceRejected(Exception):  # noqa: N818 - an outcome (the source goes to quarantine), not a failure
    """The whole file or archive is not taken; `reason` says why, for the quarantine sidecar."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Taken:
    """What taking one source did."""

    archive: ArchiveKind | None  # None: a single file
    instances: int  # handed to `store`
    rejected: int  # archive members handed to `reject_member`


def is_ignored(relative: PurePosixPath | Path) -> bool:
    """Say whether a path (relative to the folder scanned) is hidden or looks partial, so is left alone."""
    for part in relative.parts:
        if part.startswith("."):
            return True
    return relative.name.lower().endswith(_PARTIAL_SUFFIXES)


def _nothing() -> None:
    return None


def take_source(
    path: Path,
    relative: str,
    limits: Archives,
    *,
    size: int,
    store: Store,
    reject_member: RejectMember,
    check: Callable[[], object] = _nothing,
) -> Taken:
    """Hand every instance of the file or archive at `path` to `store`, and its bad members to `reject_member`.

    `relative` is the path the sources are named by, `size` the file's size as seen when it was chosen. `check`
    runs once the bytes of a file, or the list of an archive's members, have been read (the watcher checks there
    that the file did not change meanwhile). Raises SourceRejected; whatever `store`, `reject_member` and `check`
    raise goes through.
    """
    with path.open("rb") as stream:
        head = stream.read(512)
    kind = archive_kind(path.name, head)
    if kind is None:
        store(_read_file(path, limits, size, check), relative)
        return Taken(None, 1, 0)
    bad: dict[str, str] = {}
    taken = 0
    try:
        check_archive(path, kind, limits)
        check()
        for name, data in read_members(path, kind, limits):
            prepared, reason = _member_instance(name, data)
            if prepared is None:
                bad[name] = reason
                continue
            store(prepared, f"{relative}!{name}")
            taken += 1
        if bad:
            for name, data in read_members(path, kind, limits, names=bad):
                reject_member(f"{relative}!{name}", PurePosixPath(name).name, data, bad[name])
    except UnsafeArchiveError as exc:
        raise SourceRejected(str(exc)) from None
    return Taken(kind, taken, len(bad))


def _read_file(path: Path, limits: Archives, size: int, check: Callable[[], object]) -> PreparedInstance:
    if size > limits.max_member_mb * _MB:
        raise SourceRejected(
            f"file is {size // _MB} MB, over archives.max_member_mb ({limits.max_member_mb}), "
            "the largest instance ingestd takes"
        )
    data = path.read_bytes()
    check()
    try:
        return prepare_instance(data)
    except InvalidInstanceError as exc:
        raise SourceRejected(str(exc)) from None


def _member_instance(name: str, data: bytes) -> tuple[PreparedInstance | None, str]:
    """An archive member prepared for the spool, or the reason it is not taken."""
    if is_archive_name(name) or archive_kind(name, data[:512]) is not None:
        return None, "nested archive"
    try:
        return prepare_instance(data), ""
    except InvalidInstanceError as exc:
        return None, str(exc)
