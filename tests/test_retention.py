"""Retention: what ingestd is done with leaves the state directory after its days, and nothing else ever does.

The journals here are real SQLite journals with real files behind them; a batch's state is written as the stages
would leave it. Time is the tests' own: every plan and pass is given its `now`.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.admin.purge import run_purge
from ingestd.config import Config, parse_config
from ingestd.journal import Journal, Source
from ingestd.metrics import JournalCollector
from ingestd.pipeline.build import build_pipeline
from ingestd.retention import files, preview, purge, purged_quarantine, retention_summary, store
from ingestd.retention.plan import DAY, BatchPaths, batch_removal, safe_relative
from ingestd.retention.run import execute, make_plan, removals
from ingestd.states import StudyState
from ingestd.status import status_data
from tests.procs import DaemonProcess, free_port, journal_rows, run_ingestd, wait_until, write_daemon_config

T0 = 1_700_000_000.0  # when everything in these journals happened
STATES = tuple(StudyState)
SCANNER = Source("dicom", "SCANNER", "")


@dataclass(frozen=True)
class Spec:
    """A batch to build: its state and when it entered it, and what it has on disk."""

    state: str
    changed: float = T0
    instances: int = 2
    routed: bool = True
    zipped: bool = True
    superseded: int = 1
    receipts: int = 3


def _config(state: Path, retention: str = "", extra: str = "") -> Config:
    return parse_config(f"state_dir: {state}\n" + (f"retention: {retention}\n" if retention else "") + extra)


def _write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def build(state: Path, specs: list[Spec], quarantined: tuple[float, ...] = ()) -> Journal:
    """A state directory with a journal holding `specs` (batch i+1 is specs[i]) and quarantined items dated
    `quarantined`, every file they name written."""
    for folder in ("spool/.tmp", "quarantine", "outbox", "packages"):
        (state / folder).mkdir(parents=True, exist_ok=True)
    journal = Journal(state / "journal.sqlite")
    with journal.transaction() as tx:
        for index, spec in enumerate(specs, start=1):
            study = f"1.2.3.{index}"
            tx.execute(
                "INSERT INTO batches (id, study_uid, batch, state, source_kind, source, first_received, last_received,"
                " state_changed) VALUES (?, ?, 1, ?, 'dicom', 'SCANNER', ?, ?, ?)",
                (index, study, spec.state, spec.changed - 10, spec.changed - 5, spec.changed),
            )
            for number in range(spec.instances):
                relative = f"{study}/1/{study}.9/{study}.9.{number}.dcm"
                _write(state / "spool" / relative, 100)
                cursor = tx.execute(
                    "INSERT INTO instances (batch_id, study_uid, series_uid, sop_uid, sop_class_uid, transfer_syntax,"
                    " modality, size, data_offset, source_kind, source, source_detail, received_at, spool_path)"
                    " VALUES (?, ?, ?, ?, '1.2', '1.2.840.10008.1.2.1', 'MR', 100, 132, 'dicom', 'SCANNER', '', ?, ?)",
                    (index, study, f"{study}.9", f"{study}.9.{number}", spec.changed - 5, relative),
                )
                instance_id = cursor.lastrowid
                if spec.routed:
                    outgoing = f"outbox/{index}/2.25.{index}/2.25.{index}.{number}.dcm"
                    _write(state / outgoing, 90)
                    tx.execute(
                        "INSERT INTO outgoing (batch_id, instance_id, series_uid, sop_uid, path, size)"
                        " VALUES (?, ?, ?, ?, ?, 90)",
                        (index, instance_id, f"2.25.{index}", f"2.25.{index}.{number}", outgoing),
                    )
                if number < spec.superseded:
                    kept = f"superseded/{study}/1/{study}.9/{study}.9.{number}.123.dcm"
                    _write(state / kept, 80)
                    tx.execute(
                        "INSERT INTO superseded (batch_id, instance_id, sop_uid, path, size, source_kind, source,"
                        " source_detail, received_at, at) VALUES (?, ?, ?, ?, 80, 'dicom', 'SCANNER', '', ?, ?)",
                        (index, instance_id, f"{study}.9.{number}", kept, spec.changed - 6, spec.changed - 5),
                    )
            for number in range(spec.receipts):
                tx.add_receipt(index, f"{study}.9.{number}", "stored", SCANNER, 100, spec.changed - 5)
            if spec.routed:
                tx.execute(
                    "INSERT INTO routes (batch_id, rule, rules_version, server, project, subject, session, archive,"
                    " study_uid, instances, dropped_instances, decided_at)"
                    " VALUES (?, 'r', 'v', 'main', 'P', 'S', 'E', 1, ?, ?, 0, ?)",
                    (index, f"2.25.{index}", spec.instances, spec.changed - 4),
                )
            if spec.zipped:
                _write(state / "packages" / f"{index}.zip", 500)
                tx.execute(
                    "INSERT INTO deliveries (batch_id, step, next_attempt_at, started_at, step_started_at, zip_path)"
                    " VALUES (?, 'import', 0, 0, 0, ?)",
                    (index, f"packages/{index}.zip"),
                )
        for number, at in enumerate(quarantined):
            name = f"20231114T000000-{number:08x}.dcm"
            _write(state / "quarantine" / name, 60)
            _write(state / "quarantine" / f"{name}.reason.json", 40)
            tx.execute(
                "INSERT INTO quarantine (path, reason, source_kind, source, at)"
                " VALUES (?, 'not DICOM', 'folder', 'd', ?)",
                (name, at),
            )
    return journal


def _batch_files(state: Path, batch_id: int) -> list[Path]:
    """Every file of batch `batch_id` the builder wrote (spool, outbox, package, superseded); a folder removed while
    it is read (by a daemon's pass) is passed over."""
    study = f"1.2.3.{batch_id}"
    found = []
    for folder, _dirs, names in os.walk(state):  # os.walk ignores folders that vanish under it
        for name in names:
            path = Path(folder) / name
            if (
                f"/{study}/" in path.as_posix()
                or path.is_relative_to(state / "outbox" / str(batch_id))
                or path == state / "packages" / f"{batch_id}.zip"
            ):
                found.append(path)
    return sorted(found)


def _snapshot(state: Path) -> dict[str, tuple[int, int]]:
    """Every entry of the state directory with its size and modification time (ns); but the journal's WAL files,
    which SQLite makes for any reader of a WAL journal (its content is compared by `_dump`)."""
    return {
        path.relative_to(state).as_posix(): (path.lstat().st_size, path.lstat().st_mtime_ns)
        for path in sorted(state.rglob("*"))
        if path.name not in ("journal.sqlite-wal", "journal.sqlite-shm")
    }


def _one(journal: Path, sql: str, *parameters: object) -> object:
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        row = db.execute(sql, parameters).fetchone()
        return None if row is None else row[0]


def _dump(journal: Path) -> list[str]:
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        return list(db.iterdump())


# -- each kind, exactly after its days --------------------------------------------------------------------------

RETENTION = "{delivered_days: 2, released_days: 5, quarantine_days: 3, receipts_days: 10}"


@pytest.mark.parametrize(
    ("kind", "days", "spec"),
    [
        ("delivered", 2, Spec(StudyState.DELIVERED)),
        ("released", 5, Spec(StudyState.RELEASED)),
    ],
)
def test_a_batch_s_files_go_exactly_after_its_days(tmp_path: Path, kind: str, days: float, spec: Spec) -> None:
    state = tmp_path / "state"
    journal = build(state, [spec])
    config = _config(state, RETENTION)
    before = _batch_files(state, 1)
    assert len(before) == 2 + 2 + 1 + 1  # spool, outbox, package, superseded

    early = T0 + days * DAY - 0.001
    assert preview(config, early).purged[kind] == (0, 0)
    assert purge(config, journal, early).purged[kind] == (0, 0)
    assert all(path.exists() for path in before)

    due = T0 + days * DAY
    expected = (1, 2 * 100 + 2 * 90 + 500 + 80)
    assert preview(config, due).purged[kind] == expected
    outcome = purge(config, journal, due)
    assert outcome.purged[kind] == expected
    assert outcome.items[kind] == ["#1"]
    assert [path for path in before if path.exists()] == []
    assert journal_rows(journal.path, "SELECT purged_at FROM batches") == [(due,)]
    assert journal_rows(journal.path, "SELECT count(*) FROM superseded") == [(0,)]
    # the record stays: the batch, its route, its instances (and, until receipts_days, its receipts)
    assert journal_rows(journal.path, "SELECT count(*) FROM instances") == [(2,)]
    assert journal_rows(journal.path, "SELECT count(*) FROM routes") == [(1,)]
    assert journal_rows(journal.path, "SELECT count(*) FROM receipts") == [(3,)]
    # the folders it left empty are gone; the roots stay
    assert sorted(p.name for p in (state / "spool").iterdir()) == [".tmp"] or not any((state / "spool").iterdir())
    assert not any((state / "superseded").iterdir())
    assert not (state / "outbox" / "1").exists()
    # once purged, a batch is not named again
    assert purge(config, journal, due + DAY).purged[kind] == (0, 0)
    journal.close()


def test_quarantined_items_go_exactly_after_their_days_and_their_rows_stay(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = build(state, [], quarantined=(T0, T0 + 1))
    config = _config(state, RETENTION)
    early = T0 + 3 * DAY - 0.001
    assert purge(config, journal, early).purged["quarantine"] == (0, 0)
    assert len(list((state / "quarantine").iterdir())) == 4

    outcome = purge(config, journal, T0 + 3 * DAY)
    assert outcome.purged["quarantine"] == (1, 100)
    assert sorted(p.name for p in (state / "quarantine").iterdir()) == [
        "20231114T000000-00000001.dcm",
        "20231114T000000-00000001.dcm.reason.json",
    ]
    assert purged_quarantine(journal.path) == {"20231114T000000-00000000.dcm": T0 + 3 * DAY}
    assert journal_rows(journal.path, "SELECT count(*) FROM quarantine") == [(2,)]
    journal.close()


def test_a_quarantined_folder_goes_whole_and_a_link_is_removed_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = build(state, [], quarantined=(T0, T0))
    folder, link = (
        state / "quarantine" / "20231114T000000-00000000.dcm",
        state / "quarantine" / "20231114T000000-00000001.dcm",
    )
    folder.unlink()
    _write(folder / "a" / "b.dcm", 30)
    outside = tmp_path / "elsewhere.dcm"
    _write(outside, 500)
    link.unlink()
    link.symlink_to(outside)
    outcome = purge(_config(state, RETENTION), journal, T0 + 3 * DAY)
    assert outcome.purged["quarantine"][0] == 2
    assert not folder.exists() and not link.is_symlink()
    assert outside.read_bytes() == b"x" * 500
    assert list((state / "quarantine").iterdir()) == []
    journal.close()


def test_receipts_and_outgoing_rows_of_delivered_batches_go_exactly_after_their_days(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = build(state, [Spec(StudyState.DELIVERED), Spec(StudyState.RELEASED), Spec(StudyState.HELD)])
    config = _config(state, RETENTION)
    assert purge(config, journal, T0 + 10 * DAY - 0.001).purged["receipts"] == (0, 0)
    assert preview(config, T0 + 10 * DAY).purged["receipts"] == (3, 0)
    outcome = purge(config, journal, T0 + 10 * DAY)
    assert outcome.purged["receipts"] == (3, 0)
    assert outcome.purged["outgoing"] == (2, 0)
    assert journal_rows(journal.path, "SELECT DISTINCT batch_id FROM receipts ORDER BY 1") == [(2,), (3,)]
    assert journal_rows(journal.path, "SELECT DISTINCT batch_id FROM outgoing ORDER BY 1") == [(2,), (3,)]
    assert journal_rows(journal.path, "SELECT count(*) FROM batches") == [(3,)]
    assert journal_rows(journal.path, "SELECT count(*) FROM deliveries") == [(3,)]
    journal.close()


def _received(state: Path) -> dict[tuple[str, ...], float]:
    """What a new daemon's metrics would say was received (a collector's first scrape, as after a restart)."""
    collector = JournalCollector(state / "journal.sqlite", state)
    return {
        (sample.name, *sample.labels.values()): sample.value
        for metric in collector.collect()
        if metric.name in ("ingestd_instances_received", "ingestd_received_bytes")
        for sample in metric.samples
    }


def test_the_received_totals_do_not_go_down_when_receipts_go(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = build(state, [Spec(StudyState.HELD), Spec(StudyState.DELIVERED)])  # the newest receipts: batch 2's
    before = _received(state)
    assert before[("ingestd_instances_received_total", "dicom", "SCANNER", "stored")] == 6
    assert preview(_config(state, RETENTION), T0 + 10 * DAY).purged["receipts"] == (2, 0)
    outcome = purge(_config(state, RETENTION), journal, T0 + 10 * DAY)
    assert outcome.purged["receipts"] == (2, 0)  # the newest receipt of all stays, so ids are never reused
    assert journal_rows(journal.path, "SELECT count(*) FROM receipts") == [(4,)]
    assert _received(state) == before
    assert purge(_config(state, RETENTION), journal, T0 + 11 * DAY).purged["receipts"] == (0, 0)
    assert _received(state) == before
    journal.close()


def test_none_keeps_for_ever(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = build(state, [Spec(StudyState.DELIVERED), Spec(StudyState.RELEASED)], quarantined=(T0,))
    config = _config(state, "{delivered_days: null, released_days: null, quarantine_days: null, receipts_days: null}")
    outcome = purge(config, journal, T0 + 10_000 * DAY)
    assert outcome.purged == dict.fromkeys(outcome.purged, (0, 0))
    assert len(_batch_files(state, 1)) == len(_batch_files(state, 2)) == 6
    journal.close()


# -- nothing else, ever -----------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.lists(
        st.builds(
            Spec,
            state=st.sampled_from(STATES),
            changed=st.floats(T0 - 20 * DAY, T0, allow_nan=False),
            instances=st.integers(0, 2),
            routed=st.booleans(),
            zipped=st.booleans(),
            superseded=st.integers(0, 1),
            receipts=st.integers(0, 2),
        ),
        min_size=1,
        max_size=6,
    ),
    days=st.tuples(*(st.one_of(st.none(), st.floats(0, 15)) for _ in range(4))),
)
def test_nothing_of_a_batch_not_due_is_ever_removed(specs: list[Spec], days: tuple[float | None, ...]) -> None:
    delivered, released, quarantine, receipts = (f"{d}" if d is not None else "null" for d in days)
    retention = (
        f"{{delivered_days: {delivered}, released_days: {released}, quarantine_days: {quarantine},"
        f" receipts_days: {receipts}}}"
    )
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "state"
        journal = build(state, specs, quarantined=(T0 - 5 * DAY,))
        config = _config(state, retention)
        before = {index: _batch_files(state, index) for index in range(1, len(specs) + 1)}
        rows_before = {
            index: _one(journal.path, "SELECT count(*) FROM receipts WHERE batch_id = ?", index) for index in before
        }
        newest = _one(journal.path, "SELECT batch_id FROM receipts ORDER BY id DESC LIMIT 1")
        purge(config, journal, T0)
        for index, spec in enumerate(specs, start=1):
            limit = {StudyState.DELIVERED: days[0], StudyState.RELEASED: days[1]}.get(StudyState(spec.state))
            due = limit is not None and spec.changed + limit * DAY <= T0
            left = [path for path in before[index] if path.exists()]
            assert left == ([] if due else before[index]), (spec, days)
            purged = _one(journal.path, "SELECT purged_at FROM batches WHERE id = ?", index)
            assert (purged is not None) == due
            rows = _one(journal.path, "SELECT count(*) FROM receipts WHERE batch_id = ?", index)
            rows_due = spec.state == StudyState.DELIVERED and days[3] is not None and spec.changed + days[3] * DAY <= T0
            kept = 1 if index == newest else 0  # the newest receipt of all stays
            assert rows == (kept if rows_due else rows_before[index])
        journal.close()


def test_a_path_another_batch_still_refers_to_stays(tmp_path: Path) -> None:
    """A (hypothetical) later batch whose outgoing file lies in a purged batch's outbox folder keeps it."""
    state = tmp_path / "state"
    journal = build(state, [Spec(StudyState.DELIVERED), Spec(StudyState.HELD, instances=0, zipped=False)])
    shared = "outbox/1/2.25.1/2.25.1.0.dcm"
    with journal.transaction() as tx:
        tx.execute(
            "INSERT INTO outgoing (batch_id, instance_id, series_uid, sop_uid, path, size)"
            " VALUES (2, 1, '2.25.9', '2.25.9.1', ?, 90)",
            (shared,),
        )
    purge(_config(state, RETENTION), journal, T0 + 2 * DAY)
    assert (state / shared).exists()
    assert not (state / "outbox/1/2.25.1/2.25.1.1.dcm").exists()
    assert not (state / "packages/1.zip").exists()
    journal.close()


def test_a_journal_path_outside_the_state_directory_s_folders_is_never_followed() -> None:
    assert safe_relative("spool/1.2/1/1.3/1.4.dcm") == "spool/1.2/1/1.3/1.4.dcm"
    for bad in ("/etc/passwd", "spool/../journal.sqlite", "journal.sqlite", "spool", "spool/.tmp/x", "quarantine/x"):
        assert safe_relative(bad) is None
    removal = batch_removal(7, "released", BatchPaths(("spool/../../etc/x",), (), ("superseded/a/b.dcm",), "/x"), set())
    assert removal.files == ("packages/.tmp-7.zip", "packages/7.zip", "superseded/a/b.dcm")
    assert removal.trees == ("outbox/7",)


# -- faults and races -------------------------------------------------------------------------------------------


def test_a_crash_between_the_files_and_the_rows_is_finished_by_the_next_pass(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = build(state, [Spec(StudyState.RELEASED), Spec(StudyState.RELEASED)], quarantined=(T0 + 4 * DAY,))
    config = _config(state, RETENTION)
    now = T0 + 5 * DAY
    with store.read_only(journal.path) as db:
        plan = make_plan(db, config.retention, now)
        removal = next(removals(db, plan))[1]
    # what a pass does before it commits, and then the process dies: files gone, rows saying they are there
    files.remove(state, removal)
    for name in ("spool", "superseded"):
        assert (state / name).exists()
    journal.close()
    journal = Journal(state / "journal.sqlite")
    assert journal_rows(journal.path, "SELECT count(*) FROM batches WHERE purged_at IS NULL") == [(2,)]

    outcome = purge(config, journal, now + 1)
    assert outcome.failures == []
    assert outcome.purged["released"][0] == 2
    assert journal_rows(journal.path, "SELECT count(*) FROM batches WHERE purged_at IS NULL") == [(0,)]
    assert _batch_files(state, 1) == _batch_files(state, 2) == []

    # the same for a quarantined item
    with store.read_only(journal.path) as db:
        plan = make_plan(db, _config(state, "{quarantine_days: 0}").retention, now)
    files.remove_quarantine(config.quarantine_dir, plan.quarantine[0].path)
    assert purge(config, journal, T0 + 7 * DAY).purged["quarantine"] == (1, 0)
    assert journal_rows(journal.path, "SELECT count(*) FROM quarantine WHERE purged_at IS NULL") == [(0,)]
    journal.close()


KILLED_PASS = """
import os, sys
from pathlib import Path
from ingestd.config import parse_config
from ingestd.journal import Journal
from ingestd.retention import files, purge

real_remove = files.remove

def remove_then_die(state_dir, removal):  # the files are gone; the transaction marking them never commits
    real_remove(state_dir, removal)
    os._exit(9)

files.remove = remove_then_die
state = Path(sys.argv[1])
config = parse_config(f"state_dir: {state}\\nretention: {{released_days: 5}}\\n")
purge(config, Journal(state / "journal.sqlite"), float(sys.argv[2]))
"""


def test_a_process_killed_between_the_files_and_the_rows_leaves_a_journal_the_next_pass_finishes(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    build(state, [Spec(StudyState.RELEASED), Spec(StudyState.RELEASED)]).close()
    now = T0 + 5 * DAY
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_PASS, str(state), str(now)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert killed.returncode == 9, killed.stderr
    assert _batch_files(state, 1) == []  # removed by the killed pass
    assert len(_batch_files(state, 2)) == 6  # never reached
    assert journal_rows(state / "journal.sqlite", "SELECT count(*) FROM batches WHERE purged_at IS NULL") == [(2,)]

    journal = Journal(state / "journal.sqlite")
    outcome = purge(_config(state, RETENTION), journal, now + 1)
    assert outcome.failures == []
    assert outcome.items["released"] == ["#1", "#2"]
    assert journal_rows(journal.path, "SELECT count(*) FROM batches WHERE purged_at IS NULL") == [(0,)]
    assert _batch_files(state, 2) == []
    journal.close()


def test_a_batch_that_changed_after_the_plan_keeps_everything(tmp_path: Path) -> None:
    """A release taken back (the batch held again) between the plan and the pass: nothing of it goes."""
    state = tmp_path / "state"
    journal = build(state, [Spec(StudyState.RELEASED)])
    config = _config(state, RETENTION)
    with store.read_only(journal.path) as db:
        plan = make_plan(db, config.retention, T0 + 5 * DAY)
    assert len(plan.batches) == 1
    with journal.transaction() as tx:
        tx.execute("UPDATE batches SET state = ?, state_changed = ? WHERE id = 1", (StudyState.HELD, T0 + 5 * DAY))
    outcome = execute(plan, config, journal)
    assert outcome.purged["released"] == (0, 0)
    assert len(_batch_files(state, 1)) == 6
    journal.close()


def test_a_file_that_cannot_be_removed_leaves_its_batch_unmarked_and_the_others_go(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = build(state, [Spec(StudyState.RELEASED), Spec(StudyState.RELEASED)])
    with journal.transaction() as tx:  # a path the file system refuses (a name over 255 bytes): lstat fails
        tx.execute(
            "INSERT INTO superseded (batch_id, instance_id, sop_uid, path, size, source_kind, source, source_detail,"
            " received_at, at) VALUES (1, 1, '1.2', ?, 1, 'dicom', 'S', '', 0, 0)",
            ("superseded/" + "9" * 300,),
        )
    outcome = purge(_config(state, RETENTION), journal, T0 + 5 * DAY)
    assert [(f.kind, f.item) for f in outcome.failures] == [("released", "#1")]
    assert outcome.items["released"] == ["#2"]
    assert journal_rows(journal.path, "SELECT id FROM batches WHERE purged_at IS NULL") == [(1,)]
    with journal.transaction() as tx:
        tx.execute("DELETE FROM superseded WHERE length(path) > 255")
    assert purge(_config(state, RETENTION), journal, T0 + 6 * DAY).items["released"] == ["#1"]
    journal.close()


# -- dry run, status, the command -------------------------------------------------------------------------------


def test_a_dry_run_and_status_write_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    build(state, [Spec(StudyState.DELIVERED), Spec(StudyState.RELEASED), Spec(StudyState.HELD)], (T0,)).close()
    config_file = tmp_path / "ingestd.yaml"
    config_file.write_text(
        f"state_dir: {state}\nretention: {{delivered_days: 0, released_days: 0, quarantine_days: 0}}\n"
    )
    files_before, journal_before = _snapshot(state), _dump(state / "journal.sqlite")

    result = run_ingestd("purge", "--config", str(config_file), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "would remove" in result.stdout
    assert "1 delivered batch, 960 B: #1" in result.stdout
    assert "1 released batch, 960 B: #2" in result.stdout
    assert "1 quarantined item, 100 B: 20231114T000000-00000000.dcm" in result.stdout
    assert "1.2.3." not in result.stdout  # no UID
    data = retention_summary(parse_config(config_file.read_text()))
    assert data["would_purge"]["delivered"] == [1, None]  # counted; `purge --dry-run` measures
    assert data["last_run"] is None
    status = status_data(parse_config(config_file.read_text()), running=False)
    assert status["retention"]["would_purge"]["quarantine"] == [1, None]

    assert _snapshot(state) == files_before
    assert _dump(state / "journal.sqlite") == journal_before


def test_purge_removes_when_no_daemon_runs_and_status_shows_the_last_run(tmp_path: Path) -> None:
    state = tmp_path / "state"
    build(state, [Spec(StudyState.RELEASED, changed=T0), Spec(StudyState.HELD)]).close()
    config_file = tmp_path / "ingestd.yaml"
    config_file.write_text(f"state_dir: {state}\nretention: {{released_days: 1}}\n")
    result = run_ingestd("purge", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    assert re.search(r"removed .*\n  0 delivered batches, 0 B\n  1 released batch, 960 B: #1\n", result.stdout)
    assert _batch_files(state, 1) == []
    assert len(_batch_files(state, 2)) == 6
    summary = retention_summary(parse_config(config_file.read_text()))
    assert summary["last_run"] is not None
    assert summary["last_purged"]["released"] == [1, 960]
    assert summary["would_purge"]["released"] == [0, None]


def test_purge_without_a_journal_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path / "state")
    assert run_purge(config, dry_run=False, running=False) == 0
    assert "no journal" in capsys.readouterr().out


# -- the daemon's worker ----------------------------------------------------------------------------------------


def test_the_worker_runs_at_start_and_is_stopped_with_the_pipeline(tmp_path: Path) -> None:
    state = tmp_path / "state"
    journal = build(state, [Spec(StudyState.DELIVERED, changed=0.0)])
    config = _config(state, "{delivered_days: 1, check_interval_seconds: 3600}")
    pipeline = build_pipeline(journal, config, None, interval=0.05)
    assert pipeline.retention is not None
    assert build_pipeline(journal, config, None, assemble=False).retention is None
    pipeline.start()
    try:
        wait_until(
            lambda: journal_rows(journal.path, "SELECT purged_at FROM batches")[0][0] is not None,
            timeout=20,
            message="the worker's first pass",
        )
        assert _batch_files(state, 1) == []
        assert pipeline.retention in pipeline.running
    finally:
        pipeline.stop(10)
    assert not pipeline.retention.alive()
    journal.close()


def _metric(port: int, name: str, kind: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf'^{name}\{{kind="{kind}"\}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_running_daemon_purges_every_interval_and_the_metrics_move(tmp_path: Path) -> None:
    state = tmp_path / "state"
    build(state, [Spec(StudyState.RELEASED, changed=T0)], quarantined=(T0,)).close()
    drop = tmp_path / "drop"
    drop.mkdir()
    config_file = write_daemon_config(
        tmp_path / "ingestd.yaml",
        state,
        free_port(),
        extra=(
            f"drop_folders: [{{path: {drop}, settle_seconds: 0.2}}]\n"
            "retention: {released_days: 1, quarantine_days: 0, check_interval_seconds: 1}\n"
        ),
    )
    with DaemonProcess(config_file, tmp_path / "daemon.log") as daemon:
        port = int(daemon.wait_logged("metrics.started")["port"])
        first = daemon.wait_logged("retention.purged")
        assert (first["released_batches"], first["quarantine_items"]) == (1, 1)
        assert first["bytes"] == 960 + 100
        assert _batch_files(state, 1) == []
        assert _metric(port, "ingestd_retention_purged_total", "released") == 1
        assert _metric(port, "ingestd_retention_purged_bytes_total", "quarantine") == 100

        # the daemon is there: `purge` leaves it to the daemon, `--dry-run` still shows
        refused = run_ingestd("purge", "--config", str(config_file))
        assert refused.returncode == 1
        assert "removes these itself every 1 s" in refused.stderr
        shown = run_ingestd("purge", "--config", str(config_file), "--dry-run")
        assert shown.returncode == 0
        assert "a daemon runs" in shown.stdout

        # something quarantined now goes at the next pass
        (drop / "notes.txt").write_text("not DICOM")
        wait_until(
            lambda: _metric(port, "ingestd_retention_purged_total", "quarantine") >= 2,
            timeout=30,
            message="the next pass to remove the new quarantined item",
        )
        assert not any(p.name.endswith(".txt") for p in (state / "quarantine").iterdir())
        status = json.loads(run_ingestd("status", "--config", str(config_file), "--json").stdout)
        assert status["retention"]["last_run"] is not None
        assert status["retention"]["check_interval_seconds"] == 1
    assert journal_rows(state / "journal.sqlite", "SELECT count(*) FROM quarantine WHERE purged_at IS NULL") == [(0,)]
