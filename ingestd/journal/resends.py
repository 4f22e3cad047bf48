"""What a person takes back or does again, in the journal: a release taken back (`ingestd unrelease`), a released
study received again (a new batch with a note), and a delivered study sent again (`ingestd resend`).

A resend is a new batch of the study, `complete`, whose instances are hard links of the delivered batch's spooled
copies (kept by `delivery.keep_after_delivery`) at `spool/<study>/<new batch>/<series>/<instance>.dcm`. It is made
holding the journal's write lock, so that no receiver opens the same batch number meanwhile, in this order:

1. the batch folder and a marker in it (`.resend-pending`), durably;
2. the hard links, their folders made durable;
3. one transaction: the batch row, its instance rows and their `resent` receipts; commit;
4. the marker removed.

Killed before 3 commits, the journal has no new batch and the spool a marked folder of links no row names: the spool's
recovery (`clean_abandoned_resends`, run by `Spool.recover` before it adopts anything) removes them, instead of
adopting them into a half batch; a resend run again first finds the marked folder and removes them itself. Killed
after, the batch is whole and recovery removes only the marker. Nothing a sender was told is stored is ever in such a
folder without its row: a receiver acknowledges only committed rows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from ingestd.durable import fsync_dir, make_dirs_durably, write_durably
from ingestd.errors import IngestdError
from ingestd.journal.store import RELEASED_PREFIX, Journal, Tx
from ingestd.logs import uid_digest
from ingestd.states import BatchKind, StudyState, check_batch_transition

__all__ = [
    "PENDING_MARKER",
    "RELEASED_PREFIX",
    "RESENT_SOURCE",
    "SET_RESEND_REFUSED",
    "ResendRefusedError",
    "Resent",
    "UnreleaseRefusedError",
    "clean_abandoned_resends",
    "note_resent_after_release",
    "resend_batch",
    "unrelease_batch",
]

log = structlog.get_logger("ingestd.spool")

PENDING_MARKER = ".resend-pending"
RESENT_SOURCE = ("resend", "person")  # the (source_kind, source) of a resent instance's receipt
COPIES_GONE = (
    "send the study again from the scanner or with `ingestd import`; set delivery.keep_after_delivery: true to keep "
    "copies for `ingestd resend` (retention.delivered_days says how long)"
)

# Why an attachment set is not re-sent: its files go to XNAT's resources from the drop folder or `ingestd import`.
SET_RESEND_REFUSED = (
    "an attachment set (non-DICOM files) is not re-sent by `ingestd resend`, which re-sends DICOM studies: drop its"
    " files into the drop folder again, or `ingestd import` them (a file ingestd delivered already from the same"
    " place with the same content is taken as a duplicate and not sent again)"
)


class UnreleaseRefusedError(IngestdError):
    """A released batch cannot be put back: its files are gone."""


class ResendRefusedError(IngestdError):
    """A delivered batch cannot be sent again: its copies are gone, or its study is receiving now."""


@dataclass(frozen=True, slots=True)
class Resent:
    """The new batch a resend made."""

    batch_id: int
    number: int  # the study's batch number
    instances: int
    rule: str


# -- release taken back ------------------------------------------------------------------------------------------


def unrelease_batch(journal: Journal, batch_id: int, now: float) -> bool:
    """Put a released batch back to `held`, with the code and the reason it had before it was released, so that
    `ingestd retry` works on it. False if it is not released; UnreleaseRefusedError if retention removed its files."""
    check_batch_transition(batch_id, StudyState.RELEASED, StudyState.HELD)
    with journal.transaction() as tx:
        row = tx.execute("SELECT state, purged_at FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None or row["state"] != StudyState.RELEASED:
            return False
        if row["purged_at"] is not None:
            raise UnreleaseRefusedError(
                f"batch {batch_id}: its files were removed by retention (retention.released_days), so there is "
                "nothing to retry: send the study again from the scanner or with `ingestd import`"
            )
        tx.execute(
            "UPDATE batches SET state = ?, state_changed = ?, failures = 0, retry_at = 0,"
            " reason = CASE WHEN substr(reason, 1, ?) = ? THEN substr(reason, ?) ELSE reason END WHERE id = ?",
            (StudyState.HELD, now, len(RELEASED_PREFIX), RELEASED_PREFIX, len(RELEASED_PREFIX) + 1, batch_id),
        )
        return True


def note_resent_after_release(tx: Tx, batch_id: int, released_batch_id: int) -> bool:
    """Note on a new batch that it holds a copy of an instance of released batch `released_batch_id` (inside the
    spool's transaction). Only the first such instance writes it: True then."""
    cursor = tx.execute(
        "UPDATE batches SET note = ? WHERE id = ? AND note IS NULL",
        (f"re-sent after batch {released_batch_id} was released", batch_id),
    )
    return cursor.rowcount == 1


# -- a delivered batch sent again --------------------------------------------------------------------------------


def _relative(study_uid: str, number: int, series_uid: str, sop_uid: str) -> str:
    return f"{study_uid}/{number}/{series_uid}/{sop_uid}.dcm"


def resend_batch(
    journal: Journal,
    spool_root: Path,
    batch_id: int,
    rule: str,
    now: float,
    *,
    checkpoint: Callable[[str], None] = lambda _point: None,
) -> Resent:
    """Make a new `complete` batch of a delivered batch's study from its spooled copies, routed by `rule`.

    Raises ResendRefusedError, saying what to do, when the batch is not delivered, a copy is gone, or a batch of the
    study is still receiving. `checkpoint` is called with `marked`, `linked`, `journaled` (before the commit) and
    `committed`: the crash tests stop the process there.
    """
    made: list[Path] = []
    with journal.transaction() as tx:
        source = tx.execute("SELECT id, study_uid, state, kind FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if source is not None and source["kind"] == BatchKind.FILES:
            raise ResendRefusedError(f"batch {batch_id}: {SET_RESEND_REFUSED}")
        if source is None or source["state"] != StudyState.DELIVERED:
            raise ResendRefusedError(f"batch {batch_id} is not delivered: only a delivered batch can be re-sent")
        rows = [dict(row) for row in tx.execute("SELECT * FROM instances WHERE batch_id = ? ORDER BY id", (batch_id,))]
        missing = sum(1 for row in rows if not (spool_root / str(row["spool_path"])).is_file())
        if not rows or missing:
            raise ResendRefusedError(
                f"batch {batch_id}: {missing} of its {len(rows)} spooled copies are gone (removed after delivery): "
                + COPIES_GONE
            )
        study_uid = str(source["study_uid"])
        receiving = tx.execute(
            "SELECT id FROM batches WHERE study_uid = ? AND state = ?", (study_uid, StudyState.RECEIVING)
        ).fetchone()
        if receiving is not None:
            raise ResendRefusedError(
                f"batch {receiving['id']} of this study is still receiving: wait until it is complete"
                " (`ingestd status`), then resend"
            )
        newest = tx.execute("SELECT max(batch) FROM batches WHERE study_uid = ?", (study_uid,)).fetchone()
        number = int(newest[0]) + 1
        folder = spool_root / study_uid / str(number)
        try:
            _link_copies(spool_root, folder, rows, number, made, checkpoint)
            new_id = _journal_resend(tx, batch_id, rows, number, rule, now)
            checkpoint("journaled")
        except OSError as exc:  # a copy removed meanwhile (retention), a full or read-only file system
            _remove_links(folder, made)
            gone = f": {COPIES_GONE}" if isinstance(exc, FileNotFoundError) else ""
            raise ResendRefusedError(
                f"batch {batch_id}: cannot link its spooled copies into a new batch ({exc.strerror}){gone}"
            ) from None
        except BaseException:
            _remove_links(folder, made)
            raise
    checkpoint("committed")
    with contextlib.suppress(OSError):
        (folder / PENDING_MARKER).unlink()
        fsync_dir(folder)
    return Resent(new_id, number, len(rows), rule)


def _link_copies(
    spool_root: Path,
    folder: Path,
    rows: list[dict[str, object]],
    number: int,
    made: list[Path],
    checkpoint: Callable[[str], None],
) -> None:
    """The marker, then a hard link of every spooled copy in the new batch's folder, durably."""
    make_dirs_durably(folder)
    marker = folder / PENDING_MARKER
    if marker.exists():
        # Left by a resend killed before its commit: the batch is not in the journal, so no file here was ever
        # acknowledged to anyone (the caller holds the write lock); its links go, whichever batch they were of.
        for leftover in folder.glob("*/*.dcm"):
            leftover.unlink()
    else:
        write_durably(marker, (b"",))
        fsync_dir(folder)
    made.append(marker)
    checkpoint("marked")
    series_folders: set[Path] = set()
    for row in rows:
        original = spool_root / str(row["spool_path"])
        target = spool_root / _relative(str(row["study_uid"]), number, str(row["series_uid"]), str(row["sop_uid"]))
        if target.parent not in series_folders:
            target.parent.mkdir(exist_ok=True)
            series_folders.add(target.parent)
        os.link(original, target)
        made.append(target)
    for series in series_folders:
        fsync_dir(series)
    fsync_dir(folder)
    checkpoint("linked")


def _journal_resend(tx: Tx, source_id: int, rows: list[dict[str, object]], number: int, rule: str, now: float) -> int:
    """The new batch, its instances and their receipts, inside the caller's transaction; the new batch's id."""
    cursor = tx.execute(
        "INSERT INTO batches (study_uid, batch, state, source_kind, source, first_received, last_received,"
        " state_changed, note, forced_rule) SELECT study_uid, ?, ?, source_kind, source, ?, ?, ?, ?, ?"
        " FROM batches WHERE id = ?",
        (number, StudyState.COMPLETE, now, now, now, f"re-sent by a person from batch {source_id}", rule, source_id),
    )
    new_id = int(cursor.lastrowid or 0)
    kind, name = RESENT_SOURCE
    for row in rows:
        relative = _relative(str(row["study_uid"]), number, str(row["series_uid"]), str(row["sop_uid"]))
        tx.execute(
            "INSERT INTO instances (batch_id, study_uid, series_uid, sop_uid, sop_class_uid, transfer_syntax,"
            " modality, series_number, size, data_offset, source_kind, source, source_detail, received_at,"
            " spool_path, data_sha256) SELECT ?, study_uid, series_uid, sop_uid, sop_class_uid, transfer_syntax,"
            " modality, series_number, size, data_offset, source_kind, source, source_detail, received_at, ?,"
            " data_sha256 FROM instances WHERE id = ?",
            (new_id, relative, row["id"]),
        )
        tx.execute(
            "INSERT INTO receipts (batch_id, sop_uid, outcome, source_kind, source, size, at)"
            " VALUES (?, ?, 'resent', ?, ?, ?, ?)",
            (new_id, row["sop_uid"], kind, name, row["size"], now),
        )
    return new_id


def _remove_links(folder: Path, made: list[Path]) -> None:
    """Undo an interrupted resend: its links (never journaled), its marker last, and the folders left empty."""
    for path in reversed(made):
        with contextlib.suppress(OSError):
            path.unlink()
    _remove_empty(folder)


def clean_abandoned_resends(journal: Journal, spool_root: Path) -> int:
    """Remove what a resend killed before its commit left (`Spool.recover`, before adopting anything): in each
    folder with a marker, every file no journal row names (never acknowledged to anyone), then the marker. Returns
    how many files were removed.

    It looks holding the journal's write lock, which a resend holds from before it marks its folder until its rows
    are committed: a resend running now (`ingestd import` recovering while a person resends) is never mistaken for
    an abandoned one.
    """
    markers = sorted(spool_root.glob(f"*/*/{PENDING_MARKER}"))
    if not markers:
        return 0
    removed = 0
    with journal.transaction() as tx:
        for marker in markers:
            folder = marker.parent
            prefix = f"{folder.relative_to(spool_root).as_posix()}/"
            known = {
                str(row[0])
                for row in tx.execute(
                    "SELECT spool_path FROM instances WHERE substr(spool_path, 1, ?) = ?", (len(prefix), prefix)
                )
            }
            here = 0
            for path in sorted(folder.glob("*/*.dcm")):
                if path.relative_to(spool_root).as_posix() not in known:
                    path.unlink(missing_ok=True)
                    here += 1
            marker.unlink(missing_ok=True)
            _remove_empty(folder)
            if here:
                study = uid_digest(folder.parent.name)
                log.warning("spool.resend_abandoned", study=study, batch=folder.name, files=here)
            removed += here
    return removed


def _remove_empty(folder: Path) -> None:
    """Remove the batch folder's empty series folders and then itself if empty, durably."""
    with contextlib.suppress(OSError):
        for series in folder.iterdir():
            with contextlib.suppress(OSError):
                series.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()
    with contextlib.suppress(OSError):
        fsync_dir(folder if folder.exists() else folder.parent)
