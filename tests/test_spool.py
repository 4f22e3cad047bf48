"""The spool: durable stores, copies of an instance (duplicate, superseded), start-up recovery, quarantine."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ingestd.config import load_config
from ingestd.header import read_file_header
from ingestd.journal import Journal, Source
from ingestd.journal.resends import PENDING_MARKER
from ingestd.spool import Quarantine, Spool
from ingestd.status import status_data
from tests.dicom import make_instance, write_instances


def test_recover_removes_temp_files_and_adopts_orphans(tmp_path: Path) -> None:
    """A temp file is removed; a renamed file whose journal row never committed is adopted."""
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    quarantine = Quarantine(tmp_path / "quarantine", journal)
    (spool.tmp / "abc.part").write_bytes(b"half")
    ds = make_instance()
    (file,) = write_instances([ds], tmp_path / "src")
    header = read_file_header(file.read_bytes())
    orphan = spool.root / header.study_uid / "1" / header.series_uid / f"{header.sop_uid}.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(file.read_bytes())
    bogus = spool.root / "1.2.3" / "1" / "1.2.3.4" / "1.2.3.4.5.dcm"
    bogus.parent.mkdir(parents=True)
    bogus.write_bytes(b"not dicom")

    result = spool.recover(quarantine)

    assert result == {"temp_files_removed": 1, "instances_adopted": 1}
    assert not list(spool.tmp.iterdir())
    assert journal.spool_paths() == {orphan.relative_to(spool.root).as_posix()}
    (item,) = journal.quarantined()
    assert "could not be adopted" in item.reason
    sidecar = next(quarantine.root.glob("*.reason.json"))
    assert "could not be adopted" in json.loads(sidecar.read_text())["reason"]
    assert spool.recover(quarantine) == {"temp_files_removed": 0, "instances_adopted": 0}
    journal.close()


def test_recover_removes_the_links_of_a_resend_killed_before_its_commit(tmp_path: Path) -> None:
    """A batch folder with the resend marker: its files without a journal row are removed, never adopted (a half
    batch); a journaled file beside them stays; the marker goes."""
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    quarantine = Quarantine(tmp_path / "quarantine", journal)
    first, second = make_instance(), make_instance()
    second.StudyInstanceUID, second.SeriesInstanceUID = first.StudyInstanceUID, first.SeriesInstanceUID
    files = write_instances([first, second], tmp_path / "src")
    data = files[0].read_bytes()
    kept = spool.store(data[:0], data, read_file_header(data), Source("folder", "/drop", "a.dcm"))
    header = read_file_header(files[1].read_bytes())
    folder = spool.root / header.study_uid / "1"
    (folder / PENDING_MARKER).write_bytes(b"")
    link = folder / header.series_uid / f"{header.sop_uid}.dcm"
    os.link(files[1], link)

    assert spool.recover(quarantine) == {"temp_files_removed": 0, "instances_adopted": 0}
    assert not link.exists() and not (folder / PENDING_MARKER).exists()
    assert journal.spool_paths() == {kept.spool_path} and (spool.root / kept.spool_path).is_file()
    journal.close()


def test_store_then_reopen(tmp_path: Path) -> None:
    """What store() returned for is there after the journal is closed and reopened."""
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    ds = make_instance()
    (file,) = write_instances([ds], tmp_path / "src")
    data = file.read_bytes()
    header = read_file_header(data)
    outcome = spool.store(data[:200], data[200:], header, Source("folder", "/drop", "a.dcm"))
    journal.close()
    reopened = Journal(tmp_path / "journal.sqlite")
    assert reopened.spool_paths() == {outcome.spool_path}
    assert (spool.root / outcome.spool_path).read_bytes() == data
    reopened.close()


def test_store_after_the_study_folder_was_removed(tmp_path: Path) -> None:
    """A spool folder removed behind the spool's back (a cleaned-up study) is created again."""
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    first, second = make_instance(), make_instance()
    second.StudyInstanceUID = first.StudyInstanceUID
    second.SeriesInstanceUID = first.SeriesInstanceUID
    files = write_instances([first, second], tmp_path / "src")
    source = Source("folder", "/drop", "a.dcm")
    data = files[0].read_bytes()
    outcome = spool.store(data[:0], data, read_file_header(data), source)
    shutil.rmtree(spool.root / outcome.spool_path.split("/")[0])
    data = files[1].read_bytes()
    again = spool.store(data[:0], data, read_file_header(data), source)
    assert (spool.root / again.spool_path).read_bytes() == data
    journal.close()


def test_a_different_copy_of_an_instance_never_destroys_the_first(tmp_path: Path) -> None:
    """The same SOP Instance UID with other content while its batch receives: the new copy goes on, the first is
    kept aside with a `superseded` receipt and listed by `ingestd status`; an identical copy is a no-op."""
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    first = make_instance()
    second = make_instance(first.StudyInstanceUID, first.SeriesInstanceUID)
    second.SOPInstanceUID = first.SOPInstanceUID
    second.PatientComments = "corrected by the technologist"
    one, two = (file.read_bytes() for file in write_instances([first, second], tmp_path / "src"))
    source = Source("folder", "/drop", "a.dcm")
    stored = spool.store(one[:0], one, read_file_header(one), source)
    assert spool.store(one[:0], one, read_file_header(one), source).outcome == "duplicate"
    replaced = spool.store(two[:0], two, read_file_header(two), Source("dicom", "SCANNER", "INGESTD@127.0.0.1"))
    assert (replaced.outcome, replaced.spool_path) == ("replaced", stored.spool_path)
    assert (spool.root / stored.spool_path).read_bytes() == two  # the latest is the one delivered
    (kept,) = journal.superseded()
    assert (tmp_path / kept.path).read_bytes() == one  # the first copy, whole
    assert (kept.source_kind, kept.size) == ("folder", len(one))
    outcomes = [row[0] for row in journal._db.execute("SELECT outcome FROM receipts ORDER BY id")]
    assert outcomes == ["stored", "duplicate", "superseded", "replaced"]
    journal.close()
    config = tmp_path / "ingestd.yaml"
    config.write_text(f"state_dir: {tmp_path}\n")
    data = status_data(load_config(config), running=False)
    (listed,) = data["superseded"]
    assert listed["batch_id"] == kept.batch_id and first.SOPInstanceUID not in json.dumps(data)


def test_a_failed_move_into_quarantine_leaves_nothing_there(tmp_path: Path) -> None:
    """The sidecar is written first; when the move then fails, it goes, and no journal row claims the item."""
    journal = Journal(tmp_path / "journal.sqlite")
    quarantine = Quarantine(tmp_path / "quarantine", journal)
    with pytest.raises(FileNotFoundError):
        quarantine.put_file(tmp_path / "vanished.dcm", "not DICOM", Source("folder", "/drop", "vanished.dcm"))
    assert list(quarantine.root.iterdir()) == [] and journal.quarantined() == []
    journal.close()
