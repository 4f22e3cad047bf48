"""Memory is bounded by configuration, not by what peers send: C-STORE data sets are streamed to a part file.

A data set larger than the data phase's buffer is written to `spool/.tmp/*.part` as it arrives and hashed on the
way; the daemon's memory does not grow with an instance's size (RSS sampled from /proc while a real daemon
receives a 1 GiB+ instance from DCMTK's storescu), nor when the instance is sent again (the copy is told a
duplicate by its digest). An instance over `listener.max_instance_mb` gets 0xA700 while the association goes on;
an association cut mid-instance leaves no part file; a journal from before digests is migrated and its rows
hashed when needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from structlog.testing import capture_logs

from ingestd.config import Config, parse_config
from ingestd.dicomfile import data_set_offset, prepare_instance
from ingestd.errors import ConfigError
from ingestd.header import read_file_header
from ingestd.journal import SCHEMA_VERSION, Journal, Source
from ingestd.receive import dataphase
from ingestd.spool import PartFile, Quarantine, Spool, file_digest
from ingestd.synthetic import write_multiframe
from tests.conftest import Receiver, make_config, running_receiver
from tests.dicom import encode_raw, make_instance
from tests.hostile import RawPeer, p_data, pdv, store_command
from tests.procs import DaemonProcess, Storescu, free_port, journal_rows, wait_until, write_daemon_config

V3_SCHEMA = Path(__file__).parent / "data" / "journal-schema-v3.sql"
FRAME = 512 * 512 * 2
MIB = 1024 * 1024
OUT_OF_RESOURCES = 0xA700


# -- RSS of a daemon's process group, sampled from /proc ----------------------------------------------------------


def _group_rss(pgid: int) -> int:
    """The summed resident set (VmRSS, bytes) of the live processes of process group `pgid`."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) != pgid or state in ("Z", "X"):
                continue
            total += int((entry / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total


class _PeakRss:
    """Samples a process group's RSS every 50 ms in a thread while the block runs; `peak` is the highest sum."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _group_rss(self.pgid))
            self.samples += 1
            self._stop.wait(0.05)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _idle_rss(pgid: int) -> int:
    return max(_group_rss(pgid) for _ in range(5))


# -- a real daemon receiving a 1 GiB+ instance -----------------------------------------------------------------

# The most the daemon's memory may rise while it receives (or receives again) an instance of any size: the data
# phase's 4 MiB buffer, a part file's mapped header pages, Python's allocations, with ample room. Receiving the
# instance into memory, as ingestd did before, rises by its size (1 GiB here), twice that to compare a copy.
RISE_BOUND = 64 * MIB


@pytest.fixture(scope="module")
def large_daemon(tmp_path_factory: pytest.TempPathFactory, dcmtk: None) -> Iterator[tuple[DaemonProcess, int, Path]]:
    tmp = tmp_path_factory.mktemp("large")
    port = free_port()
    config = write_daemon_config(tmp / "ingestd.yaml", tmp / "state", port)
    with DaemonProcess(config, tmp / "daemon.log") as daemon:
        daemon.wait_ready(port)
        yield daemon, port, tmp
        assert daemon.terminate() == 0


def _send(daemon: DaemonProcess, port: int, path: Path) -> tuple[int, int]:
    """Send `path` with storescu; return (idle RSS before, peak RSS while sending and storing)."""
    idle = _idle_rss(daemon.pid)
    with _PeakRss(daemon.pid) as sampled, Storescu(port, [path], timeout=120) as scu:
        assert scu.wait(timeout=120) == 0, scu.output()
        assert scu.acknowledged == [path]
    assert sampled.samples > 10
    return idle, sampled.peak


@pytest.mark.timeout(180)
def test_a_large_instance_is_received_in_bounded_memory_and_its_copy_is_a_duplicate_by_digest(
    large_daemon: tuple[DaemonProcess, int, Path],
) -> None:
    daemon, port, tmp = large_daemon
    journal = tmp / "state" / "journal.sqlite"
    path = tmp / "large.dcm"
    size = write_multiframe(path, 2100, seed=7)  # 1.1 GB, written a piece at a time
    assert size > 1_100_000_000
    try:
        with path.open("rb") as stream:
            head = stream.read(4096)
        sop_uid = read_file_header(head).sop_uid

        idle, peak = _send(daemon, port, path)
        assert peak - idle < RISE_BOUND, f"RSS rose by {(peak - idle) / MIB:.0f} MiB receiving {size / MIB:.0f} MiB"
        ((spool_path, data_sha256, data_offset),) = journal_rows(
            journal, "SELECT spool_path, data_sha256, data_offset FROM instances"
        )
        stored = tmp / "state" / "spool" / spool_path
        sent = file_digest(path, data_set_offset(head))  # the data set as sent, hashed a piece at a time
        assert data_sha256 == sent == file_digest(stored, data_offset)
        assert not list((tmp / "state" / "spool" / ".tmp").iterdir())

        idle, peak = _send(daemon, port, path)  # the same instance again: compared by digest, never read back
        assert peak - idle < RISE_BOUND, f"RSS rose by {(peak - idle) / MIB:.0f} MiB receiving a copy"
        assert journal_rows(journal, "SELECT sop_uid, outcome FROM receipts ORDER BY id") == [
            (sop_uid, "stored"),
            (sop_uid, "duplicate"),
        ]
        assert not list((tmp / "state" / "spool" / ".tmp").iterdir())
        assert not daemon.logged("receive.store_failed")
    finally:
        path.unlink(missing_ok=True)
        for spooled in (tmp / "state" / "spool").rglob("*.dcm"):
            spooled.unlink()


# -- in-process listeners: the part file's life -------------------------------------------------------------------


@pytest.fixture
def small_spill(monkeypatch: pytest.MonkeyPatch) -> int:
    """A 64 KiB data phase buffer: any instance beyond it goes through a part file."""
    monkeypatch.setattr(dataphase, "_SPILL", 64 * 1024)
    return 64 * 1024


def _store_pdus(message_id: int, ds: Dataset, data: bytes, piece: int = 256 * 1024) -> list[bytes]:
    """A C-STORE as P-DATA PDUs: the command, then the data set in fragments of `piece` bytes, one PDU each."""
    pdus = [p_data(pdv(1, 0x03, store_command(message_id, ds.SOPClassUID, ds.SOPInstanceUID)))]
    for start in range(0, len(data), piece):
        last = start + piece >= len(data)
        pdus.append(p_data(pdv(1, 0x02 if last else 0x00, data[start : start + piece])))
    return pdus


def _config(tmp_path: Path, *, max_instance_mb: int) -> Config:
    return parse_config(
        f"state_dir: {tmp_path / 'state'}\n"
        f"listener: {{host: 127.0.0.1, port: 0, ae_title: INGESTD, max_instance_mb: {max_instance_mb}}}\n"
        "spool: {min_free_mb: 0}\n"
    )


def _tmp_files(receiver: Receiver) -> list[Path]:
    return list((receiver.config.spool_dir / ".tmp").iterdir())


def test_an_instance_over_max_instance_mb_is_refused_and_the_association_goes_on(
    tmp_path: Path, small_spill: int
) -> None:
    """Over the limit in memory (3 MiB) and past a part file (5 MiB, with the buffer at 64 KiB): 0xA700, nothing
    stored, no part file left, one clear log line without PHI; the next instance on the association is stored."""
    config = _config(tmp_path, max_instance_mb=2)
    big_one, big_two, small = (
        make_instance(rows=1300, fill=1),  # 3.4 MB
        make_instance(rows=1700, fill=2),  # 5.8 MB
        make_instance(rows=64, fill=3),
    )
    with capture_logs() as logged, running_receiver(config) as receiver:
        peer = RawPeer(receiver.port)
        for message_id, ds in enumerate((big_one, big_two), start=1):
            for pdu in _store_pdus(message_id, ds, encode_raw(ds)):
                peer.send(pdu)
            assert peer.status_of_response() == (0x8001, OUT_OF_RESOURCES)
            assert not _tmp_files(receiver)
        for pdu in _store_pdus(3, small, encode_raw(small)):
            peer.send(pdu)
        assert peer.status_of_response() == (0x8001, 0x0000)
        peer.release()
        rows = journal_rows(receiver.config.journal_path, "SELECT sop_uid FROM instances")
        assert rows == [(small.SOPInstanceUID,)]
        assert len(list(receiver.config.spool_dir.rglob("*.dcm"))) == 1
        assert not _tmp_files(receiver)
    refused = [entry for entry in logged if entry["event"] == "receive.store_refused"]
    assert [(entry["status"], entry["log_level"], entry["max_instance_mb"]) for entry in refused] == [
        ("0xA700", "warning", 2),
        ("0xA700", "warning", 2),
    ]
    assert "listener.max_instance_mb (2 MiB)" in refused[0]["reason"]
    text = json.dumps(logged, default=str)
    for ds in (big_one, big_two):
        for value in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, str(ds.PatientName)):
            assert value not in text


def test_the_rest_of_a_refused_instance_is_discarded_as_it_arrives(tmp_path: Path, small_spill: int) -> None:
    """The listener answers 0xA700 only at the message's end, but stops keeping its bytes at once: the part file
    is gone while the peer is still sending."""
    config = _config(tmp_path, max_instance_mb=1)
    ds = make_instance(rows=1700, fill=4)
    pdus = _store_pdus(1, ds, encode_raw(ds))
    with running_receiver(config) as receiver:
        peer = RawPeer(receiver.port)
        for pdu in pdus[:3]:  # the command and 512 KiB: a part file is being written
            peer.send(pdu)
        wait_until(lambda: _tmp_files(receiver), timeout=10, message="a part file")
        for pdu in pdus[3:-1]:  # past 1 MiB: refused, the part file removed, the rest read and dropped
            peer.send(pdu)
        wait_until(lambda: not _tmp_files(receiver), timeout=10, message="the part file to go")
        peer.send(pdus[-1])
        assert peer.status_of_response() == (0x8001, OUT_OF_RESOURCES)
        peer.release()
        assert journal_rows(receiver.config.journal_path, "SELECT count(*) FROM instances") == [(0,)]


@pytest.mark.parametrize("how", ["closed", "aborted", "listener stopped"])
def test_an_association_cut_mid_instance_leaves_no_part_file(tmp_path: Path, small_spill: int, how: str) -> None:
    ds = make_instance(rows=700, fill=5)  # 1 MB: a part file after 64 KiB
    pdus = _store_pdus(1, ds, encode_raw(ds))
    with running_receiver(make_config(tmp_path)) as receiver:
        peer = RawPeer(receiver.port)
        for pdu in pdus[:-1]:
            peer.send(pdu)
        wait_until(lambda: _tmp_files(receiver), timeout=10, message="a part file")
        if how == "closed":
            peer.sock.close()
        elif how == "aborted":
            peer.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        else:
            receiver.listener.stop(grace_seconds=0.5)
        wait_until(lambda: receiver.listener.association_count() == 0, timeout=10)
        wait_until(lambda: not _tmp_files(receiver), timeout=10, message="the part file to go")
        assert journal_rows(receiver.config.journal_path, "SELECT count(*) FROM instances") == [(0,)]
        assert not list(receiver.config.spool_dir.rglob("*.dcm"))
        peer.sock.close()


def test_streamed_copies_are_told_apart_by_digest(tmp_path: Path, small_spill: int) -> None:
    """Through part files: the same bytes again are a duplicate; other bytes under the same UIDs replace the copy
    (the earlier one kept aside); the spooled file is the data set as sent, its digest in the journal."""
    ds = make_instance(rows=400, fill=6)
    changed = make_instance(rows=400, fill=7)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(changed, keyword, getattr(ds, keyword))
    first, second = encode_raw(ds), encode_raw(changed)
    assert first != second and len(first) > 4 * small_spill
    with running_receiver(make_config(tmp_path)) as receiver:
        peer = RawPeer(receiver.port)
        for message_id, data in enumerate((first, first, second), start=1):
            for pdu in _store_pdus(message_id, ds, data, piece=50_000):
                peer.send(pdu)
            assert peer.status_of_response() == (0x8001, 0x0000)
        peer.release()
        outcomes = [
            row[0] for row in journal_rows(receiver.config.journal_path, "SELECT outcome FROM receipts ORDER BY id")
        ]
        assert outcomes == ["stored", "duplicate", "superseded", "replaced"]
        ((spool_path, digest),) = journal_rows(
            receiver.config.journal_path, "SELECT spool_path, data_sha256 FROM instances"
        )
        assert (receiver.config.spool_dir / spool_path).read_bytes().endswith(second)
        assert digest == hashlib.sha256(second).hexdigest()
        (kept,) = (receiver.config.state_dir / "superseded").rglob("*.dcm")
        assert kept.read_bytes().endswith(first)
        assert not _tmp_files(receiver)


def test_a_streamed_instance_that_is_cut_short_or_not_the_requests_is_refused(tmp_path: Path, small_spill: int) -> None:
    """The checks on the part file are those on a data set in memory: cut short 0xC211, other UIDs 0xA900."""
    ds = make_instance(rows=400, fill=8)
    data = encode_raw(ds)
    with running_receiver(make_config(tmp_path)) as receiver:
        peer = RawPeer(receiver.port)
        for pdu in _store_pdus(1, ds, data[:-100]):
            peer.send(pdu)
        assert peer.status_of_response() == (0x8001, 0xC211)
        other = make_instance(rows=400, fill=8)
        for pdu in _store_pdus(2, other, data):
            peer.send(pdu)
        assert peer.status_of_response() == (0x8001, 0xA900)
        for pdu in _store_pdus(3, ds, data):
            peer.send(pdu)
        assert peer.status_of_response() == (0x8001, 0x0000)
        peer.release()
        assert journal_rows(receiver.config.journal_path, "SELECT sop_uid FROM instances") == [(ds.SOPInstanceUID,)]
        assert not _tmp_files(receiver)


def test_a_full_spool_refuses_a_streamed_instance_and_the_association_goes_on(
    tmp_path: Path, small_spill: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The free-space floor is checked as a part file grows: below it, 0xA700 and the part file removed."""
    ds = make_instance(rows=400, fill=9)
    with running_receiver(make_config(tmp_path)) as receiver:
        monkeypatch.setattr(receiver.spool, "min_free_bytes", 2**62)
        peer = RawPeer(receiver.port)
        for pdu in _store_pdus(1, ds, encode_raw(ds)):
            peer.send(pdu)
        assert peer.status_of_response() == (0x8001, OUT_OF_RESOURCES)
        monkeypatch.setattr(receiver.spool, "min_free_bytes", 0)
        for pdu in _store_pdus(2, ds, encode_raw(ds)):
            peer.send(pdu)
        assert peer.status_of_response() == (0x8001, 0x0000)
        peer.release()
        assert not _tmp_files(receiver)


# -- the part file and the journal's digests ------------------------------------------------------------------


def test_a_part_file_is_0640_whatever_the_umask(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    previous = os.umask(0o000)
    try:
        part = PartFile(spool, b"\x00" * 132)
        assert part.path.suffix == ".part" and part.path.parent == spool.tmp
        assert part.path.stat().st_mode & 0o777 == 0o640
        part.write(b"abc")
        assert part.hexdigest() == hashlib.sha256(b"abc").hexdigest()
        part.discard()
        assert not part.path.exists()
    finally:
        os.umask(previous)
        journal.close()


def test_recovery_removes_a_stale_part_file(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    part = PartFile(spool, b"\x00" * 132)
    part.write(b"half an instance")  # the process died here
    assert spool.recover(Quarantine(tmp_path / "quarantine", journal))["temp_files_removed"] == 1
    assert not list(spool.tmp.iterdir())
    journal.close()


def _v3_journal_with_one_instance(tmp_path: Path) -> tuple[Path, Spool, bytes, bytes]:
    """A journal at schema 3 (no digests) holding one spooled instance, as an ingestd before digests left it."""
    ds = make_instance(rows=32, fill=10)
    body = encode_raw(ds)
    prefix = b"\x00" * 128 + b"DICM"
    path = tmp_path / "journal.sqlite"
    relative = f"{ds.StudyInstanceUID}/1/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
    spooled = tmp_path / "spool" / relative
    spooled.parent.mkdir(parents=True)
    spooled.write_bytes(prefix + body)
    with closing(sqlite3.connect(path)) as db:
        db.executescript(V3_SCHEMA.read_text())
        db.execute("INSERT INTO meta VALUES ('schema_version', '3')")
        db.execute(
            "INSERT INTO batches (id, study_uid, batch, state, source_kind, source, first_received, last_received,"
            " state_changed) VALUES (1, ?, 1, 'receiving', 'dicom', 'S', 0, 0, 0)",
            (ds.StudyInstanceUID,),
        )
        db.execute(
            "INSERT INTO instances (batch_id, study_uid, series_uid, sop_uid, sop_class_uid, transfer_syntax, modality,"
            " size, data_offset, source_kind, source, source_detail, received_at, spool_path)"
            " VALUES (1, ?, ?, ?, ?, ?, 'MR', ?, ?, 'dicom', 'S', '', 0, ?)",
            (
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                ds.SOPInstanceUID,
                MRImageStorage,
                ExplicitVRLittleEndian,
                len(prefix) + len(body),
                len(prefix),
                relative,
            ),
        )
        db.commit()
    journal = Journal(path)
    return path, Spool(tmp_path / "spool", journal), prefix, body


def test_a_journal_from_before_digests_is_migrated_and_its_rows_hashed_when_a_copy_arrives(tmp_path: Path) -> None:
    path, spool, prefix, body = _v3_journal_with_one_instance(tmp_path)
    journal = spool.journal
    assert journal.schema_version() == SCHEMA_VERSION == 6
    assert journal_rows(path, "SELECT data_sha256 FROM instances") == [(None,)]
    header = read_file_header(prefix + body)
    source = Source("dicom", "S", "INGESTD@127.0.0.1")
    assert spool.store(prefix, body, header, source).outcome == "duplicate"  # the file hashed, piece by piece
    assert journal_rows(path, "SELECT data_sha256 FROM instances") == [(hashlib.sha256(body).hexdigest(),)]
    changed = bytearray(body)
    changed[-1] ^= 0xFF
    assert spool.store(prefix, bytes(changed), header, source).outcome == "replaced"
    assert journal_rows(path, "SELECT data_sha256 FROM instances") == [(hashlib.sha256(changed).hexdigest(),)]
    journal.close()
    Journal(path).close()  # opening it again changes nothing


def test_a_row_without_digest_whose_file_is_gone_is_not_a_duplicate(tmp_path: Path) -> None:
    """As before digests: a copy whose spooled file was removed (delivered, cleaned up) is stored again."""
    path, spool, prefix, body = _v3_journal_with_one_instance(tmp_path)
    with spool.journal.transaction() as db:
        db.execute("UPDATE batches SET state = 'delivered'")
    for spooled in spool.root.rglob("*.dcm"):
        spooled.unlink()
    outcome = spool.store(prefix, body, read_file_header(prefix + body), Source("dicom", "S"))
    assert outcome.outcome == "replaced"  # in the study's next batch, delivered again
    assert journal_rows(path, "SELECT batch FROM batches ORDER BY batch") == [(1,), (2,)]
    spool.journal.close()


def test_recovery_adopts_a_spooled_file_with_its_digest(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    ds = make_instance(rows=32, fill=11)
    body = encode_raw(ds)
    data = b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\x00" + body
    place = spool.root / ds.StudyInstanceUID / "1" / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    place.parent.mkdir(parents=True)
    place.write_bytes(data)
    assert spool.recover(Quarantine(tmp_path / "quarantine", journal))["instances_adopted"] == 1
    ((size, offset, digest),) = journal_rows(journal.path, "SELECT size, data_offset, data_sha256 FROM instances")
    assert (size, offset, digest) == (len(data), len(data) - len(body), hashlib.sha256(body).hexdigest())
    journal.close()


def test_the_schema_3_fixture_is_the_schema_before_digests() -> None:
    """tests/data/journal-schema-v3.sql is the schema of 3: instances without data_sha256."""
    text = V3_SCHEMA.read_text()
    assert "CREATE TABLE IF NOT EXISTS instances" in text and "data_sha256" not in text
    assert "hold_code" in text  # what schema 3 added


def test_max_instance_mb_defaults_to_4_gib_and_must_be_positive(tmp_path: Path) -> None:
    assert make_config(tmp_path).listener.max_instance_mb == 4096
    assert _config(tmp_path, max_instance_mb=1).listener.max_instance_mb == 1
    with pytest.raises(ConfigError, match="max_instance_mb"):
        _config(tmp_path, max_instance_mb=0)


def test_a_small_instance_is_hashed_only_when_a_copy_arrives(tmp_path: Path) -> None:
    """Stored from memory, an instance is not hashed (it would cost throughput); its copy is compared by digest,
    the spooled file hashed then, and both digests are kept from then on."""
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    ds = make_instance(rows=16, fill=12)
    body = encode_raw(ds)
    prefix = b"\x00" * 128 + b"DICM"
    header = read_file_header(prefix + body)
    source = Source("dicom", "S")
    assert spool.store(prefix, body, header, source).outcome == "stored"
    assert journal_rows(journal.path, "SELECT data_sha256 FROM instances") == [(None,)]
    assert spool.store(prefix, body, header, source).outcome == "duplicate"
    assert journal_rows(journal.path, "SELECT data_sha256 FROM instances") == [(hashlib.sha256(body).hexdigest(),)]
    assert spool.store(prefix, body + b"\x00\x00", header, source).outcome == "replaced"
    digest = hashlib.sha256(body + b"\x00\x00").hexdigest()
    assert journal_rows(journal.path, "SELECT data_sha256 FROM instances") == [(digest,)]
    journal.close()


def test_a_dropped_file_larger_than_the_copy_limit_is_read_in_place(tmp_path: Path) -> None:
    """Above 16 MiB pydicom reads a buffer in place (no BytesIO copy): the header and the walk still work."""
    path = tmp_path / "large.dcm"
    write_multiframe(path, 40, seed=13)  # 21 MB
    prepared = prepare_instance(path.read_bytes())
    assert prepared.header.modality == "CT" and len(prepared.body) > 16 * MIB
