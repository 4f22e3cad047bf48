"""The states and steps of a batch are declared as data, and the journal holds every change to them.

Also: a journal written by the previous schema is migrated in place when the daemon opens it.
"""

from __future__ import annotations

import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from ingestd.header import InstanceHeader
from ingestd.journal import SCHEMA_VERSION, Journal, JournalVersionError, Outgoing, RouteRecord, Source
from ingestd.pipeline.attachsteps import SET_STEPS
from ingestd.pipeline.deliver import STEPS
from ingestd.states import (
    BATCH_TRANSITIONS,
    FAILED_HOLD,
    RETRY_STEP,
    STEP_TRANSITIONS,
    Stage,
    Step,
    StudyState,
    UndeclaredTransitionError,
    check_batch_transition,
    check_step_transition,
)

SCANNER = Source("dicom", "SCANNER", "INGESTD@127.0.0.1")
V2_SCHEMA = Path(__file__).parent / "data" / "journal-schema-v2.sql"


def test_every_state_and_step_is_in_its_table_and_every_target_is_known() -> None:
    assert set(BATCH_TRANSITIONS) == set(StudyState)
    assert set(STEP_TRANSITIONS) == set(Step)
    assert set(RETRY_STEP) == set(Step)
    for targets in [*BATCH_TRANSITIONS.values(), *STEP_TRANSITIONS.values()]:
        assert targets <= set(StudyState) | set(Step)


def test_every_step_but_done_has_its_handler_in_the_delivery_dispatch() -> None:
    """A study's steps (`STEPS`) and an attachment set's (`SET_STEPS`): each step in exactly one of them."""
    assert not set(STEPS) & set(SET_STEPS)
    assert set(STEPS) | set(SET_STEPS) == set(Step) - {Step.DONE}


def test_every_hold_code_is_spelt_only_in_states() -> None:
    """The rules, the de-identification and the XNAT client raise `HoldCode` members (mypy checks the types of
    `Held.code`, `DeidError.code` and `XnatError.code`): no module spells a hold code as a string literal."""
    package = Path(__file__).parent.parent / "ingestd"
    pattern = re.compile(r'(?:\bcode: str = |\bcode=|DeidError\(\s*|hold_batch\([^)]*?)"([a-z-]+)"')
    spelt = {
        f"{path.relative_to(package)}: {code}"
        for path in package.rglob("*.py")
        if "testing" not in path.parts and path.name != "states.py"
        for code in pattern.findall(path.read_text(encoding="utf-8"))
    }
    assert not spelt, f"hold codes spelt outside states.py (use states.HoldCode): {sorted(spelt)}"
    assert "code=HoldCode." in (package / "rules" / "match.py").read_text(encoding="utf-8")  # the pattern's shape
    assert set(FAILED_HOLD) == set(Stage)


def test_every_step_can_reach_done_and_done_is_final() -> None:
    """No step is a dead end: from each one some declared path leads to `done`."""
    reaches = {Step.DONE}
    while True:
        more = {step for step, targets in STEP_TRANSITIONS.items() if targets & reaches} - reaches
        if not more:
            break
        reaches |= more
    assert reaches == set(Step)
    assert STEP_TRANSITIONS[Step.DONE] == frozenset()


def test_undeclared_transitions_fail_loudly() -> None:
    with pytest.raises(UndeclaredTransitionError):
        check_batch_transition(1, StudyState.DELIVERED, StudyState.ROUTED)
    with pytest.raises(UndeclaredTransitionError):
        check_step_transition(1, Step.IMPORTING, Step.IMPORT)  # never send again before looking
    with pytest.raises(UndeclaredTransitionError):
        check_step_transition(1, Step.PACKAGE, Step.DONE)
    check_step_transition(1, Step.WAIT, Step.WAIT)  # re-scheduling a step is not a transition


def test_a_release_can_be_taken_back_and_nothing_else_leaves_released() -> None:
    """`ingestd unrelease`: released -> held (then `retry` as for any held batch); delivered stays final."""
    assert BATCH_TRANSITIONS[StudyState.RELEASED] == frozenset({StudyState.HELD})
    assert BATCH_TRANSITIONS[StudyState.DELIVERED] == frozenset()
    check_batch_transition(1, StudyState.RELEASED, StudyState.HELD)
    with pytest.raises(UndeclaredTransitionError):
        check_batch_transition(1, StudyState.RELEASED, StudyState.COMPLETE)


def _routed_batch(journal: Journal) -> int:
    """A batch of one instance, routed (its outgoing SOP Instance UID is 1.2.3.4.5)."""
    now = time.time()
    header = InstanceHeader(
        "1.2.3", "1.2.3.4", "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1", "MR", 1
    )
    with journal.transaction() as tx:
        batch_id, _ = tx.receiving_batch("1.2.3", SCANNER, now)
        tx.insert_instance(batch_id, header, 10, 0, SCANNER, now, "1.2.3/1/1.2.3.4/1.2.3.4.5.dcm")
    instance_id = journal.batch_instances(batch_id)[0].id
    assert journal.complete_batch(batch_id, now, now)
    route = RouteRecord("r", "v", "main", "P", "S", "E", True, None, "1.2.3", ())
    outgoing = [Outgoing(instance_id, "1.2.3.4", "1.2.3.4.5", "spool/x.dcm", 10)]
    assert journal.route_batch(batch_id, route, outgoing, now)
    journal.start_delivery(batch_id, now)
    return batch_id


def test_the_journal_refuses_an_undeclared_step_and_an_unverified_delivery(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    batch_id = _routed_batch(journal)
    with pytest.raises(UndeclaredTransitionError):
        journal.update_delivery(batch_id, step=Step.ARCHIVE)  # package -> archive
    with pytest.raises(UndeclaredTransitionError):
        journal.hold_batch(batch_id, "x", "x", time.time(), from_state=StudyState.DELIVERED)
    for step in (Step.PREFLIGHT, Step.IMPORT, Step.IMPORTING, Step.VERIFY):
        journal.update_delivery(batch_id, step=step)
    with pytest.raises(AssertionError, match="not verified"):
        journal.finish_delivery(batch_id, time.time())
    journal.set_verified(batch_id, {"1.2.3.4.5": "prearchive"}, time.time())
    with pytest.raises(AssertionError, match="not verified"):  # the route archives: the prearchive is not enough
        journal.finish_delivery(batch_id, time.time())
    journal.set_verified(batch_id, {"1.2.3.4.5": "archive"}, time.time())
    assert journal.finish_delivery(batch_id, time.time())
    assert journal.batch_state(batch_id) == StudyState.DELIVERED
    journal.close()


def test_retry_resumes_from_the_step_that_can_make_progress(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    batch_id = _routed_batch(journal)
    for step in (Step.PREFLIGHT, Step.IMPORT, Step.IMPORTING, Step.WAIT):
        journal.update_delivery(batch_id, step=step, attempts=3, faults=2)
    assert journal.hold_batch(batch_id, "not-ready", "deliver: still RECEIVING", time.time(), from_state="routed")
    held = next(b for b in journal.batches() if b.id == batch_id)
    assert (held.state, held.hold_code) == (StudyState.HELD, "not-ready")
    assert journal.retry_batch(batch_id, time.time()) == StudyState.ROUTED
    delivery = journal.delivery(batch_id)
    assert delivery is not None
    assert (delivery.step, delivery.attempts, delivery.faults) == (Step.VERIFY, 0, 0)
    assert delivery.retried_at is not None
    journal.close()


def test_a_journal_of_the_previous_schema_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with closing(sqlite3.connect(path)) as db:
        db.executescript(V2_SCHEMA.read_text())
        db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
        for batch_id, state, reason in [
            (1, "held", "deliver: XNAT main has no project P"),
            (2, "routed", None),
            (3, "held", "unrouted: no rule matched"),
        ]:
            db.execute(
                "INSERT INTO batches (id, study_uid, batch, state, source_kind, source, first_received,"
                " last_received, state_changed, reason) VALUES (?, ?, 1, ?, 'dicom', 'S', 0, 0, 0, ?)",
                (batch_id, f"1.2.{batch_id}", state, reason),
            )
        db.execute(
            "INSERT INTO deliveries (batch_id, step, next_attempt_at, started_at, step_started_at)"
            " VALUES (2, 'importing', 0, 0, 0)"
        )
        db.commit()
    journal = Journal(path)
    assert journal.schema_version() == SCHEMA_VERSION
    codes = {b.id: b.hold_code for b in journal.batches()}
    assert codes == {1: "deliver", 2: None, 3: "unrouted"}
    delivery = journal.delivery(2)
    assert delivery is not None and delivery.step == Step.VERIFY  # adopted by counts before: looked at again
    assert delivery.shortfalls == 0 and delivery.faults == 0
    journal.close()
    Journal(path).close()  # opening it again changes nothing


def test_a_reader_refuses_a_journal_it_cannot_read_and_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    with closing(sqlite3.connect(path)) as db:
        db.executescript(V2_SCHEMA.read_text())
        db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
        db.commit()
    with pytest.raises(JournalVersionError, match="start the daemon"):
        Journal(path, read_only=True)
    Journal(path).close()  # a writer migrates it
    Journal(path, read_only=True).close()
