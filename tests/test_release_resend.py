"""Release is reversible, a released study sent again is a new batch, and a delivered study can be re-sent.

The journal-level tests use a real journal and spool (and, for delivery, the lab and the XNAT stand-in); the walks at
the end do what the admin does, with a real daemon, DCMTK's storescu and the `ingestd` command.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from structlog.testing import capture_logs

from ingestd.admin.resend import run_resend, run_unrelease
from ingestd.cli import main
from ingestd.header import read_file_header
from ingestd.journal import Journal, Source
from ingestd.journal.resends import (
    PENDING_MARKER,
    ResendRefusedError,
    UnreleaseRefusedError,
    clean_abandoned_resends,
    resend_batch,
    unrelease_batch,
)
from ingestd.logs import uid_digest
from ingestd.spool import Quarantine, Spool
from ingestd.states import HoldCode, StudyState
from ingestd.testing.xnat import FakeXnat
from tests.dicom import encode, make_study, write_instances
from tests.lab import SCANNER, Lab, end_state, lab_xnat, set_secrets, study, xnat_holdings
from tests.procs import (
    SCANNER_RULES,
    DaemonProcess,
    Storescu,
    free_port,
    journal_rows,
    run_ingestd,
    wait_until,
    write_xnat_daemon_config,
)

OTHER_RULE = """
  - name: other
    when: {calling_aet: NOBODY}
    route: {server: main, project: OTHER, subject: '{PatientID:hash8}', session: '{subject}_MR', archive: true}
    anonymize: research
"""


def _store(spool: Spool, datasets: list[pydicom.Dataset], source: Source = SCANNER) -> list[str]:
    outcomes = []
    for ds in datasets:
        data = encode(ds)
        outcomes.append(spool.store(data[:0], data, read_file_header(data), source).outcome)
    return outcomes


def _held_then_released(journal: Journal, spool: Spool, datasets: list[pydicom.Dataset]) -> int:
    """Store the study, complete it, hold it as the router would (unrouted), and release it; its batch id."""
    _store(spool, datasets)
    (batch,) = journal.batches((StudyState.RECEIVING,))
    assert journal.complete_batch(batch.id, batch.last_received, time.time())
    assert journal.hold_batch(batch.id, HoldCode.UNROUTED, "unrouted: no rule matches this study (1 rule tried)", 1.0)
    assert journal.release_batch(batch.id, time.time())
    return batch.id


# -- a released study sent again -----------------------------------------------------------------------------------


def test_a_released_study_sent_again_is_a_new_batch_with_a_note(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    datasets = make_study(series=2, per_series=2)
    released = _held_then_released(journal, spool, datasets)
    more = make_study(series=1, per_series=1)[0]
    more.StudyInstanceUID = datasets[0].StudyInstanceUID

    with capture_logs() as logged:
        outcomes = _store(spool, [*datasets, more])
        again = _store(spool, datasets[:1])  # the scanner sends one twice: a duplicate in the new batch

    assert outcomes == ["stored"] * 5
    assert again == ["duplicate"]
    new = [b for b in journal.batches() if b.id != released]
    assert len(new) == 1
    assert (new[0].state, new[0].batch, new[0].instances) == (StudyState.RECEIVING, 2, 5)
    assert new[0].note == f"re-sent after batch {released} was released"
    events = [e for e in logged if e["event"] == "spool.resent_after_release"]
    assert [(e["batch_id"], e["released_batch_id"]) for e in events] == [(new[0].id, released)]  # once per batch
    assert journal.batch_state(released) == StudyState.RELEASED  # the released batch is left as it was
    assert len(journal.spool_files(released)) == 4
    journal.close()


def test_two_copies_of_a_released_instance_at_once_open_one_batch(tmp_path: Path) -> None:
    """Two receivers (two journal connections) store the same released instance at the same moment: one opens the
    new batch, the other is its duplicate; the note is written once."""
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    spool = Spool(tmp_path / "spool", journal)
    datasets = make_study(series=1, per_series=3)
    released = _held_then_released(journal, spool, datasets)
    others = [Journal(path) for _ in range(2)]
    spools = [Spool(tmp_path / "spool", other) for other in others]
    barrier = threading.Barrier(2)
    results: list[list[str]] = [[], []]

    def send(index: int) -> None:
        barrier.wait()
        results[index] = _store(spools[index], datasets)

    threads = [threading.Thread(target=send, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results[0] + results[1]) == ["duplicate"] * 3 + ["stored"] * 3
    new = [b for b in journal.batches() if b.id != released]
    assert [(b.batch, b.instances, b.note) for b in new] == [(2, 3, f"re-sent after batch {released} was released")]
    for other in others:
        other.close()
    journal.close()


def test_a_released_batch_whose_files_were_purged_still_opens_a_new_batch(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    datasets = make_study(series=1, per_series=2)
    released = _held_then_released(journal, spool, datasets)
    for relative in journal.spool_files(released):
        (spool.root / relative).unlink()
    assert _store(spool, datasets) == ["stored", "stored"]
    (new,) = [b for b in journal.batches() if b.id != released]
    assert new.note == f"re-sent after batch {released} was released"
    journal.close()


# -- unrelease -------------------------------------------------------------------------------------------------------


def test_unrelease_puts_the_batch_back_with_its_reason_and_retry_works(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    released = _held_then_released(journal, spool, make_study(series=1, per_series=2))
    batch = next(b for b in journal.batches() if b.id == released)
    assert batch.reason == "released by a person: unrouted: no rule matches this study (1 rule tried)"

    assert unrelease_batch(journal, released, time.time())
    batch = next(b for b in journal.batches() if b.id == released)
    assert (batch.state, batch.hold_code) == (StudyState.HELD, HoldCode.UNROUTED)
    assert batch.reason == "unrouted: no rule matches this study (1 rule tried)"
    assert not unrelease_batch(journal, released, time.time())  # held now, not released
    assert journal.retry_batch(released, time.time()) == StudyState.COMPLETE
    journal.close()


def test_unrelease_refuses_a_batch_whose_files_retention_removed(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    spool = Spool(tmp_path / "spool", journal)
    released = _held_then_released(journal, spool, make_study(series=1, per_series=1))
    with journal.transaction() as tx:
        tx.execute("UPDATE batches SET purged_at = ? WHERE id = ?", (time.time(), released))
    with pytest.raises(UnreleaseRefusedError, match=r"removed by retention .* send the study again"):
        unrelease_batch(journal, released, time.time())
    assert journal.batch_state(released) == StudyState.RELEASED
    journal.close()


def test_a_delivery_hold_released_then_unreleased_is_retried_into_xnat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held by the deliverer (no such project), released, the release taken back with `ingestd unrelease`, the
    project made in XNAT, `ingestd retry`: delivered, from the step that held it."""
    set_secrets(monkeypatch)
    with lab_xnat() as xnat:
        lab = Lab(tmp_path, xnat, project="LATER")
        lab.receive(study(series=1, per_series=2))
        lab.deliver()
        batch, _ = lab.batch()
        config = tmp_path / "ingestd.yaml"
        config.write_text(f"state_dir: {lab.state}\n")
        assert main(["release", "--config", str(config), str(batch.id)]) == 0
        assert main(["unrelease", "--config", str(config), str(batch.id)]) == 0
        batch, _ = lab.batch()
        assert (batch.state, batch.hold_code) == (StudyState.HELD, HoldCode.XNAT_REFUSED)
        assert str(batch.reason).startswith("deliver: XNAT main has no project LATER")
        xnat.add_project("LATER", members=["ingestd"])
        assert main(["retry", "--config", str(config), str(batch.id)]) == 0
        lab.deliver()
        assert lab.states() == [StudyState.DELIVERED]
        end_state(lab.state, xnat, "LATER")
        lab.journal.close()


# -- resend, in the lab (journal, spool, router, deliverer and the XNAT stand-in) ------------------------------------

KEEP = "delivery: {keep_after_delivery: true}\n"


@pytest.fixture
def keeping_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """A lab that keeps the spooled copies after delivery, with a second rule `other` (project OTHER) whose `when`
    matches nothing."""
    set_secrets(monkeypatch)
    with lab_xnat() as xnat:
        xnat.add_project("OTHER", members=["ingestd"])
        lab = Lab(tmp_path, xnat, extra=KEEP)
        lab.rules_file.write_text(lab.rules_file.read_text() + OTHER_RULE)
        lab.config = lab.config.model_copy(update={"rules": (lab.rules_file,)})
        lab.restart()
        yield lab
        lab.journal.close()


def _delivered(lab: Lab, datasets: list[pydicom.Dataset]) -> int:
    lab.receive(datasets)
    lab.deliver()
    (batch,) = lab.journal.batches((StudyState.DELIVERED,))
    return batch.id


def _sessions(xnat: FakeXnat, project: str) -> list[str]:
    return [experiment.label for experiment in xnat.experiments(project)]


def test_resend_into_the_same_session_holds_every_instance_once(keeping_lab: Lab) -> None:
    lab = keeping_lab
    first = _delivered(lab, study(series=2, per_series=3))
    resent = resend_batch(lab.journal, lab.spool.root, first, "research", time.time())

    batch = next(b for b in lab.journal.batches() if b.id == resent.batch_id)
    assert (batch.state, batch.batch, batch.instances) == (StudyState.COMPLETE, 2, 6)
    assert (batch.note, batch.forced_rule) == (f"re-sent by a person from batch {first}", "research")
    for old, new in zip(lab.journal.spool_files(first), lab.journal.spool_files(resent.batch_id), strict=True):
        assert (lab.spool.root / old).stat().st_ino == (lab.spool.root / new).stat().st_ino  # hard links
        assert new.split("/")[1] == "2"
    receipts = journal_rows(
        lab.state / "journal.sqlite",
        f"SELECT outcome, source_kind FROM receipts WHERE batch_id = {resent.batch_id}",  # noqa: S608 - an int
    )
    assert receipts == [("resent", "resend")] * 6
    assert not any(lab.spool.root.rglob(PENDING_MARKER))

    imports = lab.imports()
    lab.router.check()
    lab.deliver()
    assert lab.states() == [StudyState.DELIVERED, StudyState.DELIVERED]
    assert lab.imports() > imports  # sent again, not adopted
    route = lab.journal.route(first)
    assert route is not None and _sessions(lab.xnat, "PROJ") == [route.session]
    archived, _ = xnat_holdings(lab.xnat)
    assert len(archived) == 6 and all(len(places) == 1 for places in archived.values())
    outgoing = {o.sop_uid for o in lab.journal.outgoing(resent.batch_id)}
    assert outgoing == set(archived)  # de-identified again to the same UIDs: the same instances
    out, err = io.StringIO(), io.StringIO()
    assert run_resend(lab.config, uid_digest(batch.study_uid), None, out, err) == 1
    assert f"the study has 2 delivered batches ({first}, {resent.batch_id}): name one by its batch id" in err.getvalue()


def test_resend_with_another_rule_delivers_into_its_project(keeping_lab: Lab) -> None:
    lab = keeping_lab
    first = _delivered(lab, study(series=1, per_series=3))
    resent = resend_batch(lab.journal, lab.spool.root, first, "other", time.time())
    lab.router.check()
    route = lab.journal.route(resent.batch_id)
    assert route is not None and (route.rule, route.project) == ("other", "OTHER")  # whatever its `when` says
    lab.deliver()
    assert lab.states() == [StudyState.DELIVERED, StudyState.DELIVERED]
    assert len(_sessions(lab.xnat, "OTHER")) == 1
    archived, _ = xnat_holdings(lab.xnat, "OTHER")
    assert set(archived) == {o.sop_uid for o in lab.journal.outgoing(resent.batch_id)}
    assert all(len(places) == 1 for places in archived.values())
    assert len(xnat_holdings(lab.xnat, "PROJ")[0]) == 3  # the first delivery is left as it was


def test_resend_of_a_study_left_in_the_prearchive_adds_nothing_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rule that does not archive: the re-sent study goes into the READY prearchive session that holds it (the
    import finds it by Study Instance UID), one file per instance."""
    set_secrets(monkeypatch)
    with lab_xnat() as xnat:
        lab = Lab(tmp_path, xnat, archive=False, extra=KEEP)
        first = _delivered(lab, study(series=1, per_series=3))
        resend_batch(lab.journal, lab.spool.root, first, "research", time.time())
        lab.router.check()
        lab.deliver()
        assert lab.states() == [StudyState.DELIVERED, StudyState.DELIVERED]
        assert len(xnat.prearchive_rows("PROJ")) == 1
        end_state(lab.state, xnat)
        lab.journal.close()


def test_a_forced_rule_that_does_not_exist_holds_the_batch_unrouted(keeping_lab: Lab) -> None:
    lab = keeping_lab
    first = _delivered(lab, study(series=1, per_series=2))
    resent = resend_batch(lab.journal, lab.spool.root, first, "gone", time.time())
    lab.router.check()
    batch = next(b for b in lab.journal.batches() if b.id == resent.batch_id)
    assert (batch.state, batch.hold_code) == (StudyState.HELD, HoldCode.UNROUTED)
    assert batch.reason is not None and "chose rule 'gone'" in batch.reason and "--route" in batch.reason


def test_resend_refuses_when_the_copies_are_gone_and_says_what_to_do(keeping_lab: Lab) -> None:
    lab = keeping_lab
    first = _delivered(lab, study(series=1, per_series=2))
    (lab.spool.root / lab.journal.spool_files(first)[0]).unlink()  # as retention.delivered_days would
    with pytest.raises(ResendRefusedError, match="keep_after_delivery"):
        resend_batch(lab.journal, lab.spool.root, first, "research", time.time())
    out, err = io.StringIO(), io.StringIO()
    assert run_resend(lab.config, str(first), None, out, err) == 1
    assert "1 of its 2 spooled copies are gone" in err.getvalue()
    assert "`ingestd import`" in err.getvalue()
    assert len(lab.journal.batches()) == 1
    assert run_resend(lab.config, str(first), "reserch", out, err) == 1
    assert "did you mean 'research'?" in err.getvalue()
    assert run_unrelease(lab.config, str(first), out, err) == 1
    assert "no released study matches" in err.getvalue()


_KILL_AT = """
import os, signal, sys, time
from pathlib import Path
from ingestd.journal import Journal
from ingestd.journal.resends import resend_batch

def checkpoint(point):
    if point == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)

state = Path(sys.argv[1])
resend_batch(Journal(state / "journal.sqlite"), state / "spool", int(sys.argv[2]), "research", time.time(),
             checkpoint=checkpoint)
"""


@pytest.mark.parametrize("point", ["marked", "linked", "journaled", "committed"])
def test_a_resend_killed_at_any_point_leaves_no_batch_or_a_whole_one(keeping_lab: Lab, point: str) -> None:
    lab = keeping_lab
    first = _delivered(lab, study(series=2, per_series=2))
    before = lab.journal.spool_paths()
    killed = subprocess.run([sys.executable, "-c", _KILL_AT, str(lab.state), str(first), point], check=False)
    assert killed.returncode == -signal.SIGKILL

    lab.restart()  # a new process: the daemon starting, its spool recovery first
    recovered = lab.spool.recover(Quarantine(lab.state / "quarantine", lab.journal))
    assert recovered["instances_adopted"] == 0
    assert not any(lab.spool.root.rglob(PENDING_MARKER))
    batches = sorted(lab.journal.batches(), key=lambda b: b.id)
    on_disk = {p.relative_to(lab.spool.root).as_posix() for p in lab.spool.root.rglob("*.dcm")}
    if point == "committed":
        assert [(b.state, b.instances) for b in batches] == [(StudyState.DELIVERED, 4), (StudyState.COMPLETE, 4)]
        assert on_disk == lab.journal.spool_paths() and len(on_disk) == 8
    else:
        assert [b.id for b in batches] == [first]
        assert on_disk == before  # the links are gone, the delivered copies are not
        assert not (lab.spool.root / batches[0].study_uid / "2").exists()
        resent = resend_batch(lab.journal, lab.spool.root, first, "research", time.time())  # the admin runs it again
        assert resent.number == 2 and resent.instances == 4
    lab.router.check()
    lab.deliver()
    end_state(lab.state, lab.xnat)


def test_a_resend_run_again_after_one_was_killed_replaces_its_leftovers(keeping_lab: Lab) -> None:
    """No daemon started in between: the second resend finds the marked folder, removes the first one's links (and
    anything else unjournaled there) and makes the batch whole; a later recovery adopts nothing."""
    lab = keeping_lab
    first = _delivered(lab, study(series=1, per_series=3))
    killed = subprocess.run([sys.executable, "-c", _KILL_AT, str(lab.state), str(first), "linked"], check=False)
    assert killed.returncode == -signal.SIGKILL
    study_uid = lab.journal.batches()[0].study_uid
    stray = lab.spool.root / study_uid / "2" / "1.2.3" / "1.2.3.4.dcm"  # say, of an earlier abandoned resend
    stray.parent.mkdir()
    stray.write_bytes(b"x")
    lab.restart()
    resent = resend_batch(lab.journal, lab.spool.root, first, "research", time.time())
    assert resent.number == 2
    on_disk = {p.relative_to(lab.spool.root).as_posix() for p in (lab.spool.root / study_uid / "2").rglob("*.dcm")}
    assert on_disk == set(lab.journal.spool_files(resent.batch_id)) and len(on_disk) == 3
    assert not any(lab.spool.root.rglob(PENDING_MARKER))
    assert lab.spool.recover(Quarantine(lab.state / "quarantine", lab.journal))["instances_adopted"] == 0


def test_a_recovery_during_a_resend_waits_for_it_and_removes_nothing(keeping_lab: Lab) -> None:
    """`ingestd import` recovering the spool while a person's resend is linking (no daemon runs): the recovery
    takes the journal's write lock first, so it sees the resend's rows and leaves its links alone."""
    lab = keeping_lab
    first = _delivered(lab, study(series=1, per_series=3))
    other = Journal(lab.state / "journal.sqlite")
    removed: list[int] = []
    recovery = threading.Thread(target=lambda: removed.append(clean_abandoned_resends(other, lab.spool.root)))

    def checkpoint(point: str) -> None:
        if point == "linked":
            recovery.start()
            recovery.join(1.0)  # without the lock it would be done by now (on a slow machine: not a false failure)

    resent = resend_batch(lab.journal, lab.spool.root, first, "research", time.time(), checkpoint=checkpoint)
    recovery.join(30)
    other.close()
    assert removed == [0]
    assert all((lab.spool.root / path).is_file() for path in lab.journal.spool_files(resent.batch_id))
    assert len(lab.journal.spool_files(resent.batch_id)) == 3


# -- the walks, as the admin does them: a real daemon, storescu, the `ingestd` command -------------------------------


def _config(tmp_path: Path, port: int, xnat: FakeXnat, extra: str = "") -> Path:
    xnat.add_project("OTHER", members=["ingestd"])
    rules = SCANNER_RULES + OTHER_RULE  # the usual scanner rule, then the one `resend --route other` names
    return write_xnat_daemon_config(tmp_path, port, xnat.url, rules=rules, extra=extra)


def _send(port: int, files: list[Path], calling: str = "STORESCU") -> None:
    with Storescu(port, files, calling_ae_title=calling) as storescu:
        assert storescu.wait() == 0, storescu.output()


def _states(state: Path) -> dict[int, tuple[str, str | None]]:
    rows = journal_rows(state / "journal.sqlite", "SELECT id, state, note FROM batches ORDER BY id")
    return {int(row[0]): (str(row[1]), row[2]) for row in rows}


def _wait_states(state: Path, wanted: dict[int, str], timeout: float = 60) -> None:
    try:
        wait_until(lambda: {k: v[0] for k, v in _states(state).items()} == wanted, timeout)
    except TimeoutError:
        reasons = journal_rows(state / "journal.sqlite", "SELECT id, state, reason FROM batches ORDER BY id")
        raise AssertionError(f"wanted {wanted}, the journal has {reasons}") from None


def _in_xnat_once(xnat: FakeXnat, state: Path, batch_id: int, project: str = "PROJ") -> None:
    archived, prearchived = xnat_holdings(xnat, project)
    sent = journal_rows(state / "journal.sqlite", f"SELECT sop_uid FROM outgoing WHERE batch_id = {batch_id}")  # noqa: S608
    assert sent and all(len(archived.get(uid, [])) == 1 for (uid,) in sent)
    assert not any(uid in prearchived for (uid,) in sent)


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_ingestd(*args, "--config", str(config), env={**os.environ})


@pytest.mark.usefixtures("dcmtk")
def test_walk_release_then_resend_from_the_scanner_then_unrelease_and_retry(tmp_path: Path, xnat: FakeXnat) -> None:
    """Release a held study; the scanner sends it again: a new batch with a note, delivered. Release another,
    take the release back, fix the cause (the rules), reload, retry: delivered."""
    port = free_port()
    config = _config(tmp_path, port, xnat)
    state = tmp_path / "state"
    first, second = make_study(series=1, per_series=3), make_study(series=1, per_series=2)
    for ds in first + second:
        ds.SeriesNumber = 1
    for ds in second:
        ds.PatientID = "SECOND"  # a subject (and session label) of its own
    files = write_instances(first, tmp_path / "first")
    other = write_instances(second, tmp_path / "second")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        _send(port, files, calling="CONSOLE")  # no rule for this AE title: held, unrouted
        _wait_states(state, {1: StudyState.HELD})
        released = _cli(config, "release", "1")
        assert released.returncode == 0, released.stderr
        _send(port, files)  # the scanner sends it again, from the AE title the rules know
        _wait_states(state, {1: StudyState.RELEASED, 2: StudyState.DELIVERED})
        assert _states(state)[2][1] == "re-sent after batch 1 was released"
        (event,) = daemon.logged("spool.resent_after_release")
        assert (event["batch_id"], event["released_batch_id"]) == (2, 1)
        _in_xnat_once(xnat, state, 2)

        _send(port, other, calling="CONSOLE")
        _wait_states(state, {1: StudyState.RELEASED, 2: StudyState.DELIVERED, 3: StudyState.HELD})
        assert _cli(config, "release", uid_digest(second[0].StudyInstanceUID)).returncode == 0
        unreleased = _cli(config, "unrelease", "3")
        assert unreleased.returncode == 0, unreleased.stderr
        assert "batch 3: held again (unrouted: no rule matches" in unreleased.stdout
        assert "ingestd retry 3" in unreleased.stdout
        rules = tmp_path / "lab.rules.yaml"
        rules.write_text(rules.read_text().replace("calling_aet: STORESCU", "calling_aet: {in: [STORESCU, CONSOLE]}"))
        os.kill(daemon.pid, signal.SIGHUP)
        wait_until(lambda: any(e.get("outcome") == "applied" for e in daemon.logged("daemon.reload")), 30)
        retried = _cli(config, "retry", "3")
        assert retried.returncode == 0, retried.stderr
        _wait_states(state, {1: StudyState.RELEASED, 2: StudyState.DELIVERED, 3: StudyState.DELIVERED})
        _in_xnat_once(xnat, state, 3)
        assert daemon.terminate() == 0


def test_walk_release_then_import_again_is_a_new_batch(tmp_path: Path, xnat: FakeXnat) -> None:
    """`ingestd import` of a study, held (no rule for files on disk); released; the rule fixed; imported again: a new
    batch, noted, delivered (and the import says so), not a silent duplicate of the released one."""
    config = _config(tmp_path, free_port(), xnat)
    state = tmp_path / "state"
    datasets = make_study(series=1, per_series=2)
    for ds in datasets:
        ds.SeriesNumber = 1
    folder = tmp_path / "scan"
    write_instances(datasets, folder)
    held = _cli(config, "import", str(folder))
    assert held.returncode == 1, held.stdout + held.stderr
    assert _cli(config, "release", "1").returncode == 0
    rules = tmp_path / "lab.rules.yaml"
    rules.write_text(rules.read_text().replace("when: {calling_aet: STORESCU}", "when: {Modality: MR}"))
    again = _cli(config, "import", str(folder))
    assert again.returncode == 0, again.stdout + again.stderr
    assert _states(state) == {
        1: (StudyState.RELEASED, None),
        2: (StudyState.DELIVERED, "re-sent after batch 1 was released"),
    }
    _in_xnat_once(xnat, state, 2)


@pytest.mark.usefixtures("dcmtk")
def test_walk_resend_a_delivered_study_same_session_other_rule_and_copies_gone(tmp_path: Path, xnat: FakeXnat) -> None:
    port = free_port()
    config = _config(tmp_path, port, xnat, extra=KEEP)
    state = tmp_path / "state"
    datasets = make_study(series=1, per_series=3)
    for ds in datasets:
        ds.SeriesNumber = 1
    files = write_instances(datasets, tmp_path / "scan")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        _send(port, files)
        _wait_states(state, {1: StudyState.DELIVERED})

        again = _cli(config, "resend", uid_digest(datasets[0].StudyInstanceUID))
        assert again.returncode == 0, again.stderr
        assert "3 instances re-sent from batch 1 with rule 'scanner'" in again.stdout
        _wait_states(state, {1: StudyState.DELIVERED, 2: StudyState.DELIVERED})
        assert _states(state)[2][1] == "re-sent by a person from batch 1"
        assert len(xnat.experiments("PROJ")) == 1
        _in_xnat_once(xnat, state, 2)
        archived, _ = xnat_holdings(xnat, "PROJ")
        assert len(archived) == 3

        rerouted = _cli(config, "resend", "1", "--route", "other")
        assert rerouted.returncode == 0, rerouted.stderr
        _wait_states(state, {1: StudyState.DELIVERED, 2: StudyState.DELIVERED, 3: StudyState.DELIVERED})
        assert len(xnat.experiments("OTHER")) == 1
        _in_xnat_once(xnat, state, 3, "OTHER")

        for (relative,) in journal_rows(state / "journal.sqlite", "SELECT spool_path FROM instances"):
            (state / "spool" / relative).unlink()  # retention.delivered_days removed the copies
        gone = _cli(config, "resend", "1")
        assert gone.returncode == 1
        assert "spooled copies are gone" in gone.stderr and "keep_after_delivery" in gone.stderr
        assert "ingestd import" in gone.stderr
        assert len(_states(state)) == 3
        assert daemon.terminate() == 0
