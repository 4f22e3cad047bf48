"""Attachment sets in the journal: non-DICOM files of one upload, on their way to a session's XNAT resources.

An attachment set is a batch of kind `files` (`states.BatchKind`) in the same `batches` table as the studies' batches,
through the same states and transitions (`receiving -> complete -> routed -> delivered`, `held`, `released`), so that
`ingestd status`, `retry`, `release` and retention treat both alike. Its files are rows of `attached_files` (each one
a durable copy under `attachments/` in the state directory); once routed, `attachments_out` says where each goes
(level, scan, resource label, name inside the resource) and whether XNAT was seen holding it (name, size, MD5).

An upload is where files arrived together: the top-level entry below a drop folder (`sub01`, `scan.zip`), or the
argument of one `ingestd import` (`Source.upload`). A set's `study_uid` column holds `files:` and a digest of its
upload, never a path: the set is told apart from studies by `kind`, and its files go with the study whose instances
came in the same upload.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ingestd.journal.rows import BatchRow, RouteRecord, Source
from ingestd.journal.store import Journal, Tx
from ingestd.states import BatchKind, Step, StudyState, check_batch_transition, check_step_transition

__all__ = [
    "SET_PREFIX",
    "AttachedFile",
    "AttachmentOut",
    "FileStored",
    "OutgoingFile",
    "SessionBatch",
    "attachments_out",
    "finish_set",
    "held_sets",
    "known_attachment_paths",
    "remove_files",
    "route_set",
    "session_batches",
    "set_files",
    "set_key",
    "set_recheck",
    "set_verified",
    "split_set",
    "start_set_delivery",
    "store_file",
    "upload_batches",
    "upload_instances",
]

SET_PREFIX = "files:"  # the `study_uid` of an attachment set starts so; no Study Instance UID does (digits and dots)


def set_key(source: Source) -> str:
    """The `study_uid` column of the attachment sets of `source`'s upload: `files:` and 32 hex characters."""
    text = f"{source.kind}\0{source.name}\0{source.upload or ''}"
    return SET_PREFIX + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class AttachedFile:
    """One file of an attachment set, as the journal keeps it."""

    id: int
    batch_id: int
    relative: str  # its path below the drop folder or import root, archives opened (what `attach.match` globs see)
    source_kind: str
    source: str
    source_detail: str  # as for instances: `a/b.pdf`, or `a/x.zip!b/c.pdf` for an archive member
    upload: str
    size: int
    sha256: str
    md5: str  # what XNAT's file listing gives as `digest` (checksums on, the default)
    spool_path: str  # relative to the state directory: `attachments/<random>`
    received_at: float


@dataclass(frozen=True, slots=True)
class OutgoingFile:
    """Where one file of a routed set goes: decided by the router (`ingestd.pipeline.attach`)."""

    file_id: int
    level: str  # `session`, `scan` or `subject`
    scan: str  # the scan ID at level `scan`, else ""
    resource: str  # the resource label
    name: str  # its path inside the resource ('/'-separated)
    size: int
    md5: str


@dataclass(frozen=True, slots=True)
class AttachmentOut:
    """One outgoing file of a routed set, with its spooled copy and whether XNAT was seen holding it."""

    id: int
    batch_id: int
    file_id: int
    level: str
    scan: str
    resource: str
    name: str
    size: int
    md5: str
    spool_path: str
    verified_at: float | None


@dataclass(frozen=True, slots=True)
class FileStored:
    """What storing one file did: `stored`, `duplicate` (the same content at the same path of the same upload, in a
    set not released: nothing kept) or `replaced` (other content at the same path of the set still receiving: the
    earlier copy's spool file, `removed`, is the caller's to delete once this returns)."""

    outcome: str
    batch_id: int
    removed: str | None = None


def _receiving_set(tx: Tx, source: Source, now: float) -> int:
    """The id of the upload's attachment set still receiving, opening the next one if there is none."""
    key = set_key(source)
    row = tx.execute(
        "SELECT id, batch, state FROM batches WHERE study_uid = ? ORDER BY batch DESC LIMIT 1", (key,)
    ).fetchone()
    if row is not None and row["state"] == StudyState.RECEIVING:
        return int(row["id"])
    number = 1 if row is None else int(row["batch"]) + 1
    cursor = tx.execute(
        "INSERT INTO batches (study_uid, batch, state, source_kind, source, first_received, last_received,"
        " state_changed, kind, upload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (key, number, StudyState.RECEIVING, source.kind, source.name, now, now, now, BatchKind.FILES, source.upload),
    )
    return int(cursor.lastrowid or 0)


def store_file(
    journal: Journal, source: Source, relative: str, *, size: int, sha256: str, md5: str, spool_path: str, now: float
) -> FileStored:
    """Journal a file spooled at `spool_path` (durable already) as part of its upload's attachment set.

    In one transaction: a copy with the same content at the same path, in a set of this upload that is not
    released, is a `duplicate` (the caller removes its new spool file); other content at a path of the set still
    receiving replaces that row (`replaced`); otherwise the file joins the set still receiving, or opens one."""
    key = set_key(source)
    with journal.transaction() as tx:
        same = tx.execute(
            "SELECT f.batch_id FROM attached_files f JOIN batches b ON b.id = f.batch_id WHERE b.study_uid = ?"
            " AND f.relative = ? AND f.sha256 = ? AND b.state != ? ORDER BY b.batch DESC LIMIT 1",
            (key, relative, sha256, StudyState.RELEASED),
        ).fetchone()
        if same is not None:
            return FileStored("duplicate", int(same[0]))
        batch_id = _receiving_set(tx, source, now)
        earlier = tx.execute(
            "SELECT id, spool_path FROM attached_files WHERE batch_id = ? AND relative = ?", (batch_id, relative)
        ).fetchone()
        if earlier is not None:
            tx.execute("DELETE FROM attached_files WHERE id = ?", (earlier["id"],))
        tx.execute(
            "INSERT INTO attached_files (batch_id, relative, source_kind, source, source_detail, upload, size, sha256,"
            " md5, spool_path, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (batch_id, relative, source.kind, source.name, source.detail, source.upload or "", size, sha256, md5,
             spool_path, now),
        )  # fmt: skip
        tx.execute("UPDATE batches SET last_received = ? WHERE id = ?", (now, batch_id))
    if earlier is not None:
        return FileStored("replaced", batch_id, str(earlier["spool_path"]))
    return FileStored("stored", batch_id)


def set_files(journal: Journal, batch_id: int) -> list[AttachedFile]:
    """The files of an attachment set, by path."""
    rows = journal.query(
        "SELECT id, batch_id, relative, source_kind, source, source_detail, upload, size, sha256, md5, spool_path,"
        " received_at FROM attached_files WHERE batch_id = ? ORDER BY relative",
        (batch_id,),
    )
    return [AttachedFile(*row) for row in rows]


def known_attachment_paths(journal: Journal) -> set[str]:
    """Every spool path of a journaled file (recovery removes the other files under `attachments/`)."""
    return {str(row[0]) for row in journal.query("SELECT spool_path FROM attached_files")}


def upload_batches(journal: Journal, source_kind: str, source: str, upload: str) -> list[tuple[int, str, str]]:
    """The studies' batches with instances from this upload: (batch id, Study Instance UID, state), oldest first."""
    rows = journal.query(
        "SELECT b.id, b.study_uid, b.state FROM batches b WHERE b.kind = ? AND b.id IN (SELECT DISTINCT batch_id"
        " FROM instances WHERE source_kind = ? AND source = ? AND upload = ?) ORDER BY b.id",
        (BatchKind.DICOM, source_kind, source, upload),
    )
    return [(int(row[0]), str(row[1]), str(row[2])) for row in rows]


def split_set(journal: Journal, batch_id: int, groups: list[list[int]], now: float) -> list[int]:
    """Move each group of a complete set's files (by file id) after the first into a new complete set of the same
    upload, in one transaction; return the new sets' ids. The first group stays in `batch_id`."""
    created: list[int] = []
    with journal.transaction() as tx:
        row = tx.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None or row["state"] != StudyState.COMPLETE:
            return []
        for group in groups[1:]:
            number = tx.execute("SELECT max(batch) FROM batches WHERE study_uid = ?", (row["study_uid"],)).fetchone()
            cursor = tx.execute(
                "INSERT INTO batches (study_uid, batch, state, source_kind, source, first_received, last_received,"
                " state_changed, kind, upload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row["study_uid"], int(number[0]) + 1, StudyState.COMPLETE, row["source_kind"], row["source"],
                 row["first_received"], row["last_received"], now, BatchKind.FILES, row["upload"]),
            )  # fmt: skip
            new = int(cursor.lastrowid or 0)
            tx.executemany(
                "UPDATE attached_files SET batch_id = ? WHERE id = ? AND batch_id = ?",
                [(new, file_id, batch_id) for file_id in group],
            )
            created.append(new)
    return created


def remove_files(journal: Journal, file_ids: list[int]) -> None:
    """Forget files of a set that is not routed (kept in quarantine by the caller, with their reason)."""
    with journal.transaction() as tx:
        tx.executemany("DELETE FROM attached_files WHERE id = ?", [(file_id,) for file_id in file_ids])


def route_set(journal: Journal, batch_id: int, route: RouteRecord, outgoing: list[OutgoingFile], now: float) -> bool:
    """Record a complete set's route and where each of its files goes, and move it to `routed`, in one transaction."""
    check_batch_transition(batch_id, StudyState.COMPLETE, StudyState.ROUTED)
    with journal.transaction() as tx:
        cursor = tx.execute(
            "UPDATE batches SET state = ?, state_changed = ?, reason = NULL, hold_code = NULL, failures = 0,"
            " retry_at = 0 WHERE id = ? AND state = ? AND kind = ?",
            (StudyState.ROUTED, now, batch_id, StudyState.COMPLETE, BatchKind.FILES),
        )
        if cursor.rowcount != 1:
            return False
        tx.execute(
            "INSERT INTO routes (batch_id, rule, rules_version, server, project, subject, session, archive, profile,"
            " study_uid, instances, dropped_instances, decided_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
            (batch_id, route.rule, route.rules_version, route.server, route.project, route.subject, route.session,
             int(route.archive), route.profile, route.study_uid, len(outgoing), now),
        )  # fmt: skip
        tx.executemany(
            "INSERT INTO attachments_out (batch_id, file_id, level, scan, resource, name, size, md5)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(batch_id, o.file_id, o.level, o.scan, o.resource, o.name, o.size, o.md5) for o in outgoing],
        )
    return True


def attachments_out(journal: Journal, batch_id: int) -> list[AttachmentOut]:
    """Where each file of a routed set goes, grouped by target resource, then by name."""
    rows = journal.query(
        "SELECT o.id, o.batch_id, o.file_id, o.level, o.scan, o.resource, o.name, o.size, o.md5, f.spool_path,"
        " o.verified_at FROM attachments_out o JOIN attached_files f ON f.id = o.file_id WHERE o.batch_id = ?"
        " ORDER BY o.level, o.scan, o.resource, o.name",
        (batch_id,),
    )
    return [AttachmentOut(*row) for row in rows]


def set_verified(journal: Journal, batch_id: int, found: dict[int, bool], now: float) -> None:
    """Record, for each outgoing file (by `attachments_out.id`), whether XNAT's listing showed it with its size and
    digest, as seen in one look."""
    with journal.transaction() as tx:
        tx.executemany(
            "UPDATE attachments_out SET verified_at = ? WHERE batch_id = ? AND id = ?",
            [(now if seen else None, batch_id, out_id) for out_id, seen in found.items()],
        )


def start_set_delivery(journal: Journal, batch_id: int, now: float) -> None:
    """The delivery row of a routed set: it starts by locating its session."""
    with journal.transaction() as tx:
        tx.execute(
            "INSERT OR IGNORE INTO deliveries (batch_id, step, next_attempt_at, started_at, step_started_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (batch_id, Step.LOCATE, now, now, now),
        )


def finish_set(journal: Journal, batch_id: int, now: float) -> bool:
    """Record that XNAT holds every outgoing file of a routed set: step `done`, state `delivered`.

    Never on less: every `attachments_out` row must have been seen in XNAT's listing (AssertionError otherwise)."""
    check_batch_transition(batch_id, StudyState.ROUTED, StudyState.DELIVERED)
    with journal.transaction() as tx:
        row = tx.execute("SELECT step FROM deliveries WHERE batch_id = ?", (batch_id,)).fetchone()
        if row is not None:
            check_step_transition(batch_id, row[0], Step.DONE)
        unverified = tx.execute(
            "SELECT count(*) FROM attachments_out WHERE batch_id = ? AND verified_at IS NULL", (batch_id,)
        ).fetchone()[0]
        if unverified:
            raise AssertionError(f"batch {batch_id}: {unverified} outgoing files are not verified in XNAT")
        tx.execute("UPDATE deliveries SET step = ?, finished_at = ? WHERE batch_id = ?", (Step.DONE, now, batch_id))
        cursor = tx.execute(
            "UPDATE batches SET state = ?, state_changed = ?, reason = NULL, hold_code = NULL"
            " WHERE id = ? AND state = ?",
            (StudyState.DELIVERED, now, batch_id, StudyState.ROUTED),
        )
        return cursor.rowcount == 1


def upload_instances(journal: Journal, source_kind: str, source: str, upload: str) -> list[tuple[int, str, str]]:
    """Every instance of this upload as (its batch id, its study's UID, its source detail): which study each
    attached file lies closest to."""
    rows = journal.query(
        "SELECT i.batch_id, i.study_uid, i.source_detail FROM instances i"
        " WHERE i.source_kind = ? AND i.source = ? AND i.upload = ?",
        (source_kind, source, upload),
    )
    return [(int(row[0]), str(row[1]), str(row[2])) for row in rows]


@dataclass(frozen=True, slots=True)
class SessionBatch:
    """A study's batch routed to a session, as an attachment set's delivery looks for its session."""

    batch_id: int
    state: str
    prearchive_url: str | None  # where its delivery found our prearchive session, if it did


def session_batches(journal: Journal, server: str, project: str, subject: str, session: str) -> list[SessionBatch]:
    """The studies' batches routed to this session (newest first): is the session in XNAT, or on its way?"""
    rows = journal.query(
        "SELECT b.id, b.state, d.prearchive_url FROM routes r JOIN batches b ON b.id = r.batch_id"
        " LEFT JOIN deliveries d ON d.batch_id = b.id WHERE b.kind = ? AND r.server = ? AND r.project = ?"
        " AND r.subject = ? AND r.session = ? ORDER BY b.id DESC",
        (BatchKind.DICOM, server, project, subject, session),
    )
    return [SessionBatch(int(row[0]), str(row[1]), row[2]) for row in rows]


def set_recheck(journal: Journal, batch_id: int, at: float) -> None:
    """When a held set (`no-session`, `study-held`) looks again whether it can move on."""
    with journal.transaction() as tx:
        tx.execute("UPDATE batches SET retry_at = ? WHERE id = ?", (at, batch_id))


def held_sets(journal: Journal, code: str, now: float) -> list[BatchRow]:
    """The attachment sets held with `code` whose time to look again has come (`set_recheck`), oldest first; a
    cheap read (no counts: they are 0 in the rows), run on every check of the workers that look."""
    rows = journal.query(
        "SELECT id, study_uid, batch, state, source_kind, source, first_received, last_received, state_changed,"
        " reason, hold_code, failures, retry_at, note, forced_rule, purged_at, 0, 0, 0, kind, upload FROM batches"
        " WHERE state = ? AND hold_code = ? AND kind = ? AND retry_at <= ? ORDER BY id",
        (StudyState.HELD, code, BatchKind.FILES, now),
    )
    return [BatchRow(*row) for row in rows]
