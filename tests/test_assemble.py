"""Assembly: completion policy (pure) and the journal transition it drives."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from ingestd.header import InstanceHeader
from ingestd.journal import Journal, Source
from ingestd.pipeline.assemble import Assembler, CompletionPolicy, is_complete
from ingestd.spool import Spool

POLICY = CompletionPolicy(idle_seconds=60, max_wait_seconds=600)


def test_quiet_study_is_complete() -> None:
    """Quiet for the idle time completes; a recent instance keeps it open; max wait forces it."""
    assert not is_complete(0, 100, 150, POLICY)
    assert is_complete(0, 100, 160, POLICY)
    assert is_complete(0, 599, 600, POLICY)


@given(
    first=st.floats(0, 1e6),
    gap=st.floats(0, 1e4),
    now=st.floats(0, 2e6),
    later=st.floats(0, 1e4),
)
def test_completion_is_monotonic_in_time(first: float, gap: float, now: float, later: float) -> None:
    """Once complete, a batch stays complete as time passes without new instances."""
    last = first + gap
    if is_complete(first, last, now, POLICY):
        assert is_complete(first, last, now + later, POLICY)


def _header(study: str, sop: str) -> InstanceHeader:
    return InstanceHeader(study, "1.2.3", sop, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1", "MR", 1)


def test_late_instance_opens_a_new_batch(tmp_path: Path) -> None:
    """An instance for a completed study opens batch 2 of the same study."""
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    source = Source("dicom", "MR1")
    spool.store(b"", b"first", _header("1.2.9", "1.2.9.1"), source)
    assembler = Assembler(journal, CompletionPolicy(idle_seconds=0.0, max_wait_seconds=10))
    assert assembler.check() == 1
    spool.store(b"", b"late", _header("1.2.9", "1.2.9.2"), source)
    batches = [(b.batch, b.state, b.instances) for b in journal.batches()]
    assert sorted(batches) == [(1, "complete", 1), (2, "receiving", 1)]
    journal.close()


def test_completion_loses_the_race_to_a_new_instance(tmp_path: Path) -> None:
    """A batch fed after it was read is not completed on stale times."""
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    source = Source("dicom", "MR1")
    spool.store(b"", b"a", _header("1.2.9", "1.2.9.1"), source)
    (batch,) = journal.batches()
    spool.store(b"", b"b", _header("1.2.9", "1.2.9.2"), source)
    assert not journal.complete_batch(batch.id, batch.last_received, batch.last_received + 1000)
    journal.close()
