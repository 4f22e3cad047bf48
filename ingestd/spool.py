"""The spool: every instance written durably to disk, then recorded in the journal.

An instance is written to a temp file on the spool's file system, fsync'd, linked into
`spool/<StudyInstanceUID>/<batch>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`, its directory fsync'd, and
only then is its journal row committed. Paths are built from validated UIDs only. Nothing here decides
anything about studies.

An instance received over the network may be written as it arrives (`PartFile`): into a `.part` file in the
spool's temp folder, its data set hashed (SHA-256) on the way; the file is then fsync'd and linked into place
like any other, and the journal keeps its data set's digest. An instance stored from memory (a small one) is not
hashed unless a copy of it arrives: hashing every one would cost ~10 % of the CPU an instance takes.

A copy of an instance already stored is a no-op when its data set is the same: the same SHA-256 digest. A
journal row without a digest (a small instance, or one journaled before digests were kept) has its spooled file
hashed, read a piece at a time, and the digest recorded; nothing is ever compared by holding both copies in
memory. When they differ, the new copy is
delivered and the earlier one is never destroyed: while its batch is still receiving, it is kept aside in
`superseded/<StudyInstanceUID>/<batch>/<SeriesInstanceUID>/<SOPInstanceUID>.<nanoseconds>.dcm` (a hard link made
before the new copy takes its place), recorded with a `superseded` receipt and listed by `ingestd status`; once
its batch has moved on, the new copy opens the study's next batch and both are delivered in turn. A copy of an
instance whose batch a person released (`ingestd release`) is never a duplicate, whatever its digest: the study sent
again is a new batch, noted "re-sent after batch N was released" (`spool.resent_after_release`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from ingestd import quarantined
from ingestd.dicomfile import data_set_offset
from ingestd.durable import (
    file_digest,
    fsync_dir,
    fsync_tree,
    link_then_unlink,
    make_dirs_durably,
    move_durably,
    remove_quietly,
    write_all,
    write_durably,
)
from ingestd.errors import InvalidInstanceError, SpoolError, SpoolFullError
from ingestd.fsmodes import restrict_tree
from ingestd.header import InstanceHeader, is_valid_uid, read_file_header
from ingestd.journal import InstanceRow, Journal, Source, Tx
from ingestd.journal.resends import clean_abandoned_resends, note_resent_after_release
from ingestd.logs import hide_member_names
from ingestd.states import StudyState

__all__ = [
    "PartFile",
    "Quarantine",
    "Spool",
    "StoreOutcome",
    "file_digest",
    "fsync_dir",
    "make_dirs_durably",
    "move_durably",
    "write_durably",
]

log = structlog.get_logger("ingestd.spool")

_TMP = ".tmp"
_PART = ".part"
_SPACE_CHECK_EVERY = 64 * 1024 * 1024  # a part file being written checks the free-space floor this often
# Extensions kept on a quarantined item's name (any other part of the name may be a patient's name).
_KEPT_EXTENSIONS = (".tar.gz", ".tar.bz2", ".tar.xz", ".dcm", ".dicom", ".ima", ".zip", ".tar", ".tgz", ".txt", ".pdf")


@dataclass(frozen=True, slots=True)
class _Facts:
    """What the journal records about one instance being stored."""

    header: InstanceHeader
    source: Source
    size: int
    data_offset: int  # where the data set starts in the file, after preamble and file meta
    now: float
    digest: str | None  # SHA-256 of the data set (the file from `data_offset` on), hex; None: not computed
    body: bytes | memoryview | None = None  # the data set, when it is in memory (its digest is computed if needed)


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    """What storing one instance did: `stored`, `duplicate` (identical bytes, a no-op) or `replaced`."""

    outcome: str
    header: InstanceHeader
    batch_id: int
    spool_path: str
    size: int


class PartFile:
    """An instance written into the spool's temp folder as it arrives: preamble and file meta, then its data set
    a piece at a time, hashed on the way. `Spool.commit_part` makes it durable and puts it in place; `discard`
    removes it. The file is 0640 whatever the umask.
    """

    def __init__(self, spool: Spool, prefix: bytes) -> None:
        self.spool = spool
        self.path = spool.tmp / f"{secrets.token_hex(12)}{_PART}"
        self.data_offset = len(prefix)
        self.size = 0
        self._digest = hashlib.sha256()
        self._space_checked = 0
        self._fd: int | None = None
        with self._discarded_on_failure():
            spool.check_space(len(prefix))
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            os.fchmod(self._fd, 0o640)
            write_all(self._fd, prefix)
        self.size = len(prefix)

    @contextlib.contextmanager
    def _discarded_on_failure(self) -> Iterator[None]:
        """Whatever fails inside removes the part file; an OSError becomes the spool's error for the peer."""
        try:
            yield
        except OSError as exc:
            self.discard()
            raise _spool_error(exc) from None
        except BaseException:
            self.discard()
            raise

    def write(self, data: bytes | memoryview) -> None:
        """Append the next bytes of the data set. Raises SpoolFullError (below the floor, or the disk full) or
        SpoolError; the part file is removed then."""
        if self._fd is None:
            raise SpoolError("the instance's part file was discarded")
        with self._discarded_on_failure():
            write_all(self._fd, data)
            self._digest.update(data)
            self.size += len(data)
            if self.size - self._space_checked >= _SPACE_CHECK_EVERY:
                self._space_checked = self.size
                self.spool.check_space()

    @property
    def data_size(self) -> int:
        return self.size - self.data_offset

    def hexdigest(self) -> str:
        """The SHA-256 of the data set written so far."""
        return self._digest.hexdigest()

    @contextlib.contextmanager
    def data_set(self) -> Iterator[memoryview]:
        """The data set written so far, mapped read-only: reading it pages in only what is read."""
        if self._fd is None:
            raise SpoolError("the instance's part file was discarded")
        mapped = mmap.mmap(self._fd, self.size, prot=mmap.PROT_READ)
        whole = memoryview(mapped)
        view = whole[self.data_offset :]
        try:
            yield view
        finally:
            view.release()
            whole.release()
            with contextlib.suppress(BufferError):  # a view still held elsewhere: unmapped once it is dropped
                mapped.close()

    def sync(self) -> None:
        """fsync and close the file (it is complete)."""
        fd, self._fd = self._fd, None
        if fd is None:
            raise SpoolError("the instance's part file was discarded")
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """Close and remove the part file (nothing of it is kept)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            self.path.unlink()


def _spool_error(exc: OSError) -> SpoolError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFullError("spool file system is full; refusing new instances")
    return SpoolError(f"cannot write to the spool ({exc.strerror or exc})")


class Spool:
    """Durable storage of instances under `root`, recorded in `journal`."""

    def __init__(self, root: Path, journal: Journal, *, min_free_bytes: int = 0) -> None:
        self.root = root
        self.superseded = root.parent / "superseded"  # on the same file system: kept aside by a hard link
        self.tmp = root / _TMP
        self.journal = journal
        self.min_free_bytes = min_free_bytes
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        self.tmp.mkdir(parents=True, exist_ok=True)

    # -- storing -----------------------------------------------------------------------------------

    def check_space(self, incoming: int = 0) -> None:
        """Refuse (SpoolFullError) when storing `incoming` more bytes would go below the free-space floor."""
        stat = os.statvfs(self.root)
        free = stat.f_bavail * stat.f_frsize
        if free - incoming < self.min_free_bytes:
            raise SpoolFullError(
                f"spool file system has {free // 2**20} MiB free, below the floor of "
                f"{self.min_free_bytes // 2**20} MiB (spool.min_free_mb); refusing new instances until space is freed"
            )

    def store(self, prefix: bytes, body: bytes | memoryview, header: InstanceHeader, source: Source) -> StoreOutcome:
        """Store one instance: `prefix` (preamble and file meta) followed by `body` (the data set as received).

        Returns only once the file and its journal row are durable. Raises SpoolFullError below the
        free-space floor and SpoolError on any I/O failure; in both cases nothing was recorded.
        """
        size = len(prefix) + len(body)
        self.check_space(size)
        tmp = self.tmp / f"{secrets.token_hex(12)}{_PART}"
        try:
            write_durably(tmp, (prefix, body))
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _spool_error(exc) from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return self._commit_guarded(tmp, _Facts(header, source, size, len(prefix), time.time(), None, body))

    def open_part(self, prefix: bytes) -> PartFile:
        """A part file for an instance whose data set will be written as it arrives, starting with `prefix`."""
        return PartFile(self, prefix)

    def commit_part(self, part: PartFile, header: InstanceHeader, source: Source) -> StoreOutcome:
        """Store the instance written to `part` (whole, checked): fsync it, put it in place, journal it.

        As `store`: durable when it returns; SpoolFullError or SpoolError, and the part file is removed.
        """
        try:
            part.sync()
        except OSError as exc:
            part.discard()
            raise _spool_error(exc) from None
        except BaseException:
            part.discard()
            raise
        facts = _Facts(header, source, part.size, part.data_offset, time.time(), part.hexdigest())
        return self._commit_guarded(part.path, facts)

    def _commit_guarded(self, tmp: Path, facts: _Facts) -> StoreOutcome:
        """`_commit`, with the temp file removed and the error translated when it fails."""
        try:
            return self._commit(tmp, facts)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _spool_error(exc) from None
        except sqlite3.Error as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise SpoolError(f"cannot record the instance in the journal ({exc})") from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _commit(self, tmp: Path, facts: _Facts) -> StoreOutcome:
        """Rename the durable temp file into place, then commit its journal row.

        The common case (an instance not seen before) renames and fsyncs the directory outside the
        journal's write lock, so concurrent associations and receiver processes hold it only for the
        commit itself. A copy of an instance already stored takes the slow path, wholly in a transaction.
        """
        header = facts.header
        if self.journal.find_instance(header.study_uid, header.sop_uid) is not None:
            return self._commit_again(tmp, facts)
        number = self.journal.next_batch_number(header.study_uid)
        try:
            relative = self._place(tmp, header, number, exclusive=True)
        except FileExistsError:  # another copy of the same instance got there first, just now
            return self._commit_again(tmp, facts)
        with self.journal.transaction() as tx:
            existing = self.journal.find_instance(header.study_uid, header.sop_uid)
            batch_id, actual = tx.receiving_batch(header.study_uid, facts.source, facts.now)
            if actual != number:  # the batch completed meanwhile: the instance opens the next one
                relative = self._place(self.root / relative, header, actual)
            return self._record_new(tx, batch_id, relative, facts, replaces=existing is not None)

    def _commit_again(self, tmp: Path, facts: _Facts) -> StoreOutcome:
        """Store a copy of an instance already in the spool: a no-op if identical, else a replacement that keeps
        the earlier copy aside."""
        header = facts.header
        if facts.digest is None and facts.body is not None:
            facts = replace(facts, digest=hashlib.sha256(facts.body).hexdigest())
        with self.journal.transaction() as tx:
            existing = self.journal.find_instance(header.study_uid, header.sop_uid)
            if (
                existing is None
                and (self.root / self._relative(header, self.journal.next_batch_number(header.study_uid))).exists()
            ):
                # Placed by a concurrent store of the same instance that has not committed yet: this one fails
                # (the sender tries again) rather than guess which copy is the earlier.
                raise SpoolError("another copy of this instance is being stored at this moment; send it again")
            released = existing is not None and existing.batch_state == StudyState.RELEASED
            if existing is not None and not released and self._same_data(existing, facts.digest):
                tmp.unlink()
                tx.add_receipt(existing.batch_id, header.sop_uid, "duplicate", facts.source, facts.size, facts.now)
                return StoreOutcome("duplicate", header, existing.batch_id, existing.spool_path, facts.size)
            if existing is not None and existing.batch_state == StudyState.RECEIVING:
                final = self.root / existing.spool_path
                kept = self._keep_aside(existing.spool_path)
                os.replace(tmp, final)
                fsync_dir(final.parent)
                tx.add_superseded(existing.id, kept, facts.now)
                log.warning("spool.copy_superseded", batch_id=existing.batch_id, source_kind=facts.source.kind)
                return self._record_replacement(tx, existing, facts)
            # the earlier copy's batch has moved on (a released one too: a copy received again is not a duplicate
            # but a new delivery, noted once on its batch): this copy goes with the study's next batch
            batch_id, number = tx.receiving_batch(header.study_uid, facts.source, facts.now)
            relative = self._place(tmp, header, number)
            outcome = self._record_new(tx, batch_id, relative, facts, replaces=existing is not None and not released)
            noted = released and existing is not None and note_resent_after_release(tx, batch_id, existing.batch_id)
        if noted and existing is not None:
            log.info("spool.resent_after_release", batch_id=batch_id, released_batch_id=existing.batch_id)
        return outcome

    def _record_new(self, tx: Tx, batch_id: int, relative: str, facts: _Facts, *, replaces: bool) -> StoreOutcome:
        """Journal an instance placed at `relative` in batch `batch_id`, in transaction `tx`."""
        header, source, size, now = facts.header, facts.source, facts.size, facts.now
        tx.insert_instance(batch_id, header, size, facts.data_offset, source, now, relative, facts.digest)
        outcome = "replaced" if replaces else "stored"
        tx.add_receipt(batch_id, header.sop_uid, outcome, source, size, now)
        return StoreOutcome(outcome, header, batch_id, relative, size)

    @staticmethod
    def _record_replacement(tx: Tx, existing: InstanceRow, facts: _Facts) -> StoreOutcome:
        """Journal new data for an instance whose file was replaced in place, in transaction `tx`."""
        header, source, size, now = facts.header, facts.source, facts.size, facts.now
        tx.update_instance(existing.id, header, size, facts.data_offset, source, now, facts.digest)
        tx.add_receipt(existing.batch_id, header.sop_uid, "replaced", source, size, now)
        return StoreOutcome("replaced", header, existing.batch_id, existing.spool_path, size)

    @staticmethod
    def _relative(header: InstanceHeader, batch: int) -> str:
        return f"{header.study_uid}/{batch}/{header.series_uid}/{header.sop_uid}.dcm"

    def _place(self, current: Path, header: InstanceHeader, batch: int, *, exclusive: bool = False) -> str:
        """Move `current` to the instance's spool path in `batch`, durably; return the relative path.

        `exclusive`: raise FileExistsError rather than replace a file already there (a hard link, then the temp
        name is removed: a crash in between leaves only a temp file, which recovery removes).
        """
        relative = self._relative(header, batch)
        final = self.root / relative
        self._ensure_dir(final.parent)
        move = link_then_unlink if exclusive else os.replace
        try:
            move(current, final)
        except FileNotFoundError:  # the folder was removed behind the cache's back (a cleaned-up study)
            with self._dirs_lock:
                self._known_dirs.clear()
            self._ensure_dir(final.parent)
            move(current, final)
        fsync_dir(final.parent)
        return relative

    def _keep_aside(self, relative: str) -> str:
        """Hard-link the spooled copy at `relative` into the superseded folder, durably; return its path relative
        to the state directory. The spool's copy itself is replaced afterwards, by the caller."""
        name = relative.removesuffix(".dcm") + f".{time.time_ns()}.dcm"
        target = self.superseded / name
        make_dirs_durably(target.parent)
        os.link(self.root / relative, target)
        fsync_dir(target.parent)
        return f"{self.superseded.name}/{name}"

    def _same_data(self, existing: InstanceRow, digest: str | None) -> bool:
        """Whether the spooled copy of `existing` is still there with the data set whose digest is `digest`.

        A row without a digest has its file hashed (read a piece at a time), and the digest
        recorded (inside the caller's transaction). A copy no longer in the spool (delivered and cleaned up) is
        not the same: the new one is stored and delivered again, as before digests were kept.
        """
        path = self.root / existing.spool_path
        if digest is None:
            return False
        try:
            if existing.data_sha256 is None:
                known = file_digest(path, existing.data_offset)
                self.journal.set_instance_digest(existing.id, known)
                return known == digest
            return path.is_file() and existing.data_sha256 == digest
        except OSError:
            return False

    def _ensure_dir(self, directory: Path) -> None:
        """Create `directory` below the root if needed, making each new entry durable."""
        if directory in self._known_dirs:
            return
        with self._dirs_lock:
            missing = []
            current = directory
            while current != self.root and not current.is_dir():
                missing.append(current)
                current = current.parent
            for new in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    new.mkdir()
                fsync_dir(new.parent)
            self._known_dirs.add(directory)

    # -- recovery ----------------------------------------------------------------------------------

    def recover(self, quarantine: Quarantine) -> dict[str, int]:
        """Reconcile the spool with the journal after a start or a crash.

        Removes leftover temp files (never acknowledged) and the links of an `ingestd resend` killed before its
        commit (`clean_abandoned_resends`: a marked batch folder), and adopts the other spooled files the journal
        has no row for (the process died between the rename and the commit).
        """
        removed = 0
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
                removed += 1
        clean_abandoned_resends(self.journal, self.root)  # a killed `ingestd resend`'s links: never a half batch
        known = self.journal.spool_paths()
        adopted = 0
        source = Source("recovered", "spool")
        for path in sorted(self.root.glob("*/*/*/*.dcm")):
            relative = path.relative_to(self.root).as_posix()
            if relative in known:
                continue
            study_uid, number, series_uid, name = relative.split("/")
            try:
                if not (is_valid_uid(study_uid) and is_valid_uid(series_uid) and is_valid_uid(name[:-4])):
                    raise InvalidInstanceError("its path is not made of UIDs")
                header, size, offset = _read_spooled(path)
                if header.study_uid != study_uid or not number.isdigit():
                    raise InvalidInstanceError("its header does not match its place in the spool")
                digest = file_digest(path, offset)
            except (OSError, InvalidInstanceError) as exc:
                quarantine.put_file(path, f"spool file could not be adopted: {exc}", source)
                continue
            now = time.time()
            with self.journal.transaction() as tx:
                batch_id = tx.batch_for(study_uid, int(number), source, now)
                tx.insert_instance(batch_id, header, size, offset, source, now, relative, digest)
                tx.add_receipt(batch_id, header.sop_uid, "adopted", source, size, now)
            adopted += 1
        log.info("spool.recovered", temp_files_removed=removed, instances_adopted=adopted)
        return {"temp_files_removed": removed, "instances_adopted": adopted}


def _read_spooled(path: Path) -> tuple[InstanceHeader, int, int]:
    """The header, size and data set offset of a spooled file, read through a read-only mapping (only the pages
    of its file meta and header are read, whatever its size)."""
    with path.open("rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size == 0:
            raise InvalidInstanceError("an empty file")
        with mmap.mmap(stream.fileno(), size, prot=mmap.PROT_READ) as mapped:
            return read_file_header(mapped), size, data_set_offset(mapped)


class Quarantine:
    """Where bad input is kept aside, each item with a sidecar stating the reason."""

    def __init__(self, root: Path, journal: Journal) -> None:
        self.root = root
        self.journal = journal
        self.root.mkdir(parents=True, exist_ok=True)

    def _target(self, name: str) -> Path:
        """A new name in quarantine: time, random, and the original's extension only.

        The original name may hold a patient's name (`DOE^JOHN.dcm`) and quarantine names are shown in logs
        and `ingestd status`; the sidecar keeps the original path for whoever may read the state directory.
        """
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        extension = next((kept for kept in _KEPT_EXTENSIONS if name.lower().endswith(kept)), "")
        return self.root / f"{stamp}-{secrets.token_hex(4)}{extension}"

    def _write_reason(self, target: Path, reason: str, source: Source) -> None:
        """Write the sidecar first, so that an item never sits in quarantine without its reason."""
        sidecar = target.with_name(target.name + ".reason.json")
        text = json.dumps(
            {
                "reason": reason,
                "source_kind": source.kind,
                "source": source.name,
                "detail": source.detail,
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
        write_durably(sidecar, (text.encode(),))

    def _record(self, target: Path, reason: str, source: Source, sha256: str | None = None) -> Path:
        fsync_dir(self.root)
        self.journal.add_quarantine(target.name, reason, source, time.time(), sha256)
        log.warning(
            "spool.quarantined",
            item=target.name,
            reason=hide_member_names(reason),
            source_kind=source.kind,
            source=source.name,
        )
        return target

    def put_file(self, path: Path, reason: str, source: Source) -> Path:
        """Move the file (or folder) at `path` into quarantine with `reason`. If the move fails, nothing of it is
        left in quarantine (neither the sidecar nor a copy, while the original is still where it was) and the
        OSError goes to the caller, who leaves the item in place."""
        target = self._target(path.name)
        self._write_reason(target, reason, source)
        try:
            move_durably(path, target)
            # A dropped file keeps the dropper's mode (0644) through the rename; another user's is replaced by our copy.
            restrict_tree(target, own=True)
        except OSError:
            if path.exists() or path.is_symlink():  # still in place: no half-kept copy beside it
                remove_quietly(target)
                remove_quietly(target.with_name(f".{target.name}.ingestd-copy"))
            target.with_name(target.name + ".reason.json").unlink(missing_ok=True)
            raise
        return self._record(target, reason, source)

    def put_bytes(self, name: str, data: bytes, reason: str, source: Source) -> Path:
        """Keep `data` (an archive member, say) in quarantine under `name` with `reason`."""
        target = self._target(name)
        self._write_reason(target, reason, source)
        write_durably(target, (data,))
        return self._record(target, reason, source, quarantined.content_digest(data))

    def put_copy(self, path: Path, reason: str, source: Source, *, sha256: str | None = None) -> Path:
        """Keep a copy of the file at `path` in quarantine with `reason`; the file itself is left as it is.
        `sha256`: its content's digest, when the caller has it already."""
        target = self._target(path.name)
        self._write_reason(target, reason, source)
        shutil.copyfile(path, target)
        fsync_tree(target)
        return self._record(target, reason, source, sha256 or quarantined.content_digest(target))

    def kept_before(self, source: Source, sha256: str) -> Path | None:
        """The item kept earlier from `source` with content `sha256`, if it is still here (`ingestd import` run again
        on the same files keeps each bad file once)."""
        name = quarantined.kept_before(self.journal, self.root, source, sha256)
        return None if name is None else self.root / name
