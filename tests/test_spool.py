"""The spool's start-up recovery: leftovers removed, orphans adopted, nothing acknowledged lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ingestd.header import read_file_header
from ingestd.journal import Journal, Source
from ingestd.spool import Quarantine, Spool
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
    assert "could not be adopted" in item["reason"]
    sidecar = next(quarantine.root.glob("*.reason.json"))
    assert "could not be adopted" in json.loads(sidecar.read_text())["reason"]
    assert spool.recover(quarantine) == {"temp_files_removed": 0, "instances_adopted": 0}
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
