"""The read model: counts on a read-only connection of its own, never waiting for the journal's writer."""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

from ingestd.journal import Journal, JournalVersionError, Source
from ingestd.states import StudyState
from ingestd.status import JournalStatus, status_line
from tests.spooled import KEY, spooled_state

SCANNER = Source("dicom", "SCANNER", "INGESTD@127.0.0.1")


def _journal_with_batches(path: Path) -> Journal:
    journal = Journal(path)
    with journal.transaction() as tx:
        for number in (1, 2, 3):
            tx.receiving_batch(f"1.2.{number}", SCANNER, 0.0)
            tx.add_receipt(number, f"1.2.{number}.1", "stored", SCANNER, 100, 0.0)
    batch = journal.batches()[0]
    assert journal.complete_batch(batch.id, batch.last_received, 1.0)
    assert journal.hold_batch(batch.id, "unrouted", "unrouted: no rule matched", 2.0)
    return journal


def test_the_status_line_counts_batches_by_state(tmp_path: Path) -> None:
    journal = _journal_with_batches(tmp_path / "journal.sqlite")
    status = JournalStatus(journal.path)
    assert status.state_counts() == {StudyState.RECEIVING: 2, StudyState.HELD: 1}
    assert status_line(status.state_counts()) == "serving; studies: 1 held, 2 receiving"
    assert status_line({}) == "serving; studies: no studies"
    status.close()
    journal.close()


def test_the_totals_are_one_snapshot_and_count_receipts_after_a_mark(tmp_path: Path) -> None:
    journal = _journal_with_batches(tmp_path / "journal.sqlite")
    status = JournalStatus(journal.path)
    totals = status.totals()
    assert totals.receipts == (("dicom", "SCANNER", "stored", 3, 300),)
    assert totals.receipts_upto == 3
    assert dict(totals.states) == {StudyState.RECEIVING: 2, StudyState.HELD: 1}
    assert totals.held_reasons == (("unrouted", 1),) and totals.quarantine == ()
    assert status.totals(receipts_after=3).receipts == ()
    status.close()
    journal.close()


def test_a_reader_answers_while_the_writer_holds_its_transaction(tmp_path: Path) -> None:
    """WAL: the counts are read beside an open write transaction, neither waiting for the other."""
    journal = _journal_with_batches(tmp_path / "journal.sqlite")
    status = JournalStatus(journal.path)
    answered: list[dict[str, int]] = []
    with journal.transaction() as tx:
        tx.receiving_batch("1.2.9", SCANNER, 5.0)  # not committed yet: the reader sees the committed state
        reader = threading.Thread(target=lambda: answered.append(status.state_counts()))
        reader.start()
        reader.join(5)
        assert not reader.is_alive()
    assert answered == [{StudyState.RECEIVING: 2, StudyState.HELD: 1}]
    assert status.state_counts()[StudyState.RECEIVING] == 3
    status.close()
    journal.close()


def test_the_read_model_refuses_a_journal_of_another_schema(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    Journal(path).close()
    with closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        db.commit()
    with pytest.raises(JournalVersionError, match="start the daemon"):
        JournalStatus(path)


def test_the_read_models_rows_are_the_journals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`status` reads batches (with modalities), routes and deliveries with queries of its own, for speed: the same
    rows as the journal's methods."""
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    state = spooled_state(tmp_path)
    journal = Journal(state.config.journal_path)
    routed = min(journal.routes())
    journal.start_delivery(routed, 5.0)
    status = JournalStatus(journal.path)
    summaries = status.batch_summaries()
    assert [summary.row for summary in summaries] == journal.batches()
    assert {summary.row.id: summary.modalities for summary in summaries} == {
        state.batch_ids["SCANNER"]: ("MR",),
        state.batch_ids["OTHER"]: ("CT",),
        state.batch_ids["drop"]: ("MR",),
        state.batch_ids["import"]: ("MR",),
    }
    assert status.routes() == journal.routes() and len(status.routes()) == 2
    assert status.deliveries() == journal.deliveries() and set(status.deliveries()) == {routed}
    status.close()
    journal.close()
