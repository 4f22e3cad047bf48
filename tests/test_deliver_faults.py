"""Delivery under faults, checked by identity: nothing acknowledged is lost, nothing is in XNAT twice.

Against the XNAT stand-in over real HTTP. Each test ends with `end_state`: every acknowledged instance of a
delivered batch is in XNAT exactly once, by its outgoing SOP Instance UID, in the session and place its rule names;
every instance of a held batch is still in the spool.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestd.cli import main
from ingestd.metrics import REGISTRY
from ingestd.states import Step, StudyState
from ingestd.testing.xnat import FakeXnat
from tests.lab import Lab, end_state, lab_xnat, set_secrets, study


@pytest.fixture
def xnat(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeXnat]:
    set_secrets(monkeypatch)
    with lab_xnat() as server:
        yield server


def _failures(stage: str, kind: str) -> float:
    return REGISTRY.get_sample_value("ingestd_stage_failures_total", {"stage": stage, "kind": kind}) or 0.0


# -- an upload cut half-way: XNAT keeps what it read ---------------------------------------------------------------


@pytest.mark.parametrize("archive", [False, True], ids=["prearchive", "archive"])
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_reset_mid_upload_sends_what_xnat_lacks(tmp_path: Path, xnat: FakeXnat, archive: bool, fraction: float) -> None:
    """XNAT stores the entries it read before the reset; the retry must not take that partial session as whole."""
    lab = Lab(tmp_path, xnat, archive=archive)
    lab.receive(study(series=3, per_series=8))
    size = (lab.state / str(lab.advance_to(Step.IMPORT).zip_path)).stat().st_size
    xnat.reset_next("POST", "/data/services/import", after_bytes=int(size * fraction))
    lab.deliver()
    assert lab.states() == [StudyState.DELIVERED]
    assert end_state(lab.state, xnat) == {"in XNAT": 24}
    statuses = [status for method, path, status in xnat.requests_log if "services/import" in path]
    assert statuses == [0, 200]  # one resend, of what XNAT lacked


def test_uploads_cut_every_time_end_at_the_attempt_cap(tmp_path: Path, xnat: FakeXnat) -> None:
    """A proxy that resets every upload part-way: each round sends what XNAT still lacks, and the rounds stop at the
    server's attempt cap with the batch held, its spool intact (a loop that looks like progress is not progress)."""
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=2, per_series=6))
    xnat.reset_next("POST", "/data/services/import", times=1000, after_bytes=3000)
    lab.deliver()
    batch, delivery = lab.batch_and_delivery()
    assert batch.state == StudyState.HELD and batch.hold_code == "xnat-unreachable"
    assert lab.imports() == lab.config.xnat.servers["main"].retry.max_attempts
    assert end_state(lab.state, xnat) == {"held, in the spool": 12}
    assert delivery.step == Step.IMPORTING


def test_partial_upload_archived_by_xnat_itself_is_completed(tmp_path: Path, xnat: FakeXnat) -> None:
    """An auto-archive project: XNAT builds and archives the half it kept; the rest is sent and merged into it."""
    xnat.add_project("AUTO", members=["ingestd"], prearchive_code=4)
    lab = Lab(tmp_path, xnat, project="AUTO")
    lab.receive(study(series=2, per_series=12))
    size = (lab.state / str(lab.advance_to(Step.IMPORT).zip_path)).stat().st_size
    xnat.reset_next("POST", "/data/services/import", after_bytes=size // 2)
    lab.advance_to(Step.IMPORTING)  # the import is cut
    xnat.build_now()  # XNAT's idle builder builds the partial session and auto-archives it
    assert xnat.experiments("AUTO") and not xnat.prearchive_rows("AUTO")
    lab.deliver()
    assert lab.states() == [StudyState.DELIVERED]
    assert end_state(lab.state, xnat, "AUTO") == {"in XNAT": 24}
    assert len(xnat.experiments("AUTO")) == 1


# -- a late batch: its study is already in XNAT, and counts would lie --------------------------------------------


@pytest.mark.parametrize("archive", [False, True], ids=["prearchive", "archive"])
@pytest.mark.parametrize("fault", ["503", "reset", "processed-then-504"])
def test_late_batch_with_a_failed_import_is_delivered_whole(
    tmp_path: Path, xnat: FakeXnat, archive: bool, fault: str
) -> None:
    lab = Lab(tmp_path, xnat, archive=archive)
    first = study(series=2, per_series=6)
    lab.receive(first)
    lab.deliver()
    lab.receive(study(series=1, per_series=3, study_uid=first[0].StudyInstanceUID, first=3))
    if fault == "503":
        xnat.fail_next("POST", "/data/services/import", status=503)
    elif fault == "reset":
        xnat.reset_next("POST", "/data/services/import", after_bytes=10)
    else:
        xnat.fail_next("POST", "/data/services/import", status=504, after_processing=True)
    lab.deliver()
    assert lab.states() == [StudyState.DELIVERED] * 2
    assert end_state(lab.state, xnat) == {"in XNAT": 15}
    assert len(xnat.experiments("PROJ")) == (1 if archive else 0)
    assert len(xnat.prearchive_rows("PROJ")) == (0 if archive else 1)


def test_late_batch_interrupted_after_importing_is_committed(tmp_path: Path, xnat: FakeXnat) -> None:
    """A crash right after `importing` is committed for a late batch: at restart it looks, finds nothing of its own
    (the first batch's files do not count), and sends its instances."""
    lab = Lab(tmp_path, xnat)
    first = study(series=2, per_series=6)
    lab.receive(first)
    lab.deliver()
    lab.receive(study(series=1, per_series=3, study_uid=first[0].StudyInstanceUID, first=3))
    late = lab.batch(1)[0].id
    lab.journal.start_delivery(late, 0)
    for step in (Step.PREFLIGHT, Step.IMPORT, Step.IMPORTING):  # as far as the crash let it go
        lab.journal.update_delivery(late, step=step)
    lab.restart()
    lab.deliver()  # the zip was never written: verify finds the three missing and packages them
    assert lab.states() == [StudyState.DELIVERED] * 2
    assert end_state(lab.state, xnat) == {"in XNAT": 15}


# -- XNAT answers, and still does not keep everything ------------------------------------------------------------


def test_files_xnat_keeps_dropping_hold_the_batch_then_retry_delivers(tmp_path: Path, xnat: FakeXnat) -> None:
    """A site script rejects some files (200, nothing stored): sent again `max_resends` times, then held with the
    reason, spool intact; once XNAT takes them, `ingestd retry --held` sends just those and delivers."""
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=2, per_series=4))
    rejected = {item.sop_uid for item in lab.journal.outgoing(lab.batch()[0].id)[1::3]}
    xnat.drop_entries(lambda sop_uid, _series_uid, _description: sop_uid in rejected, stage="anonymization")
    lab.deliver()
    batch, delivery = lab.batch_and_delivery()
    assert batch.state == StudyState.HELD and batch.hold_code == "incomplete"
    assert f"does not hold {len(rejected)} of the 8 instances" in str(batch.reason)
    assert delivery.shortfalls == lab.config.delivery.max_resends
    assert lab.imports() == 1 + lab.config.delivery.max_resends
    assert end_state(lab.state, xnat) == {"held, in the spool": 8}
    xnat.drop_entries(None)
    config = tmp_path / "ingestd.yaml"
    config.write_text(f"state_dir: {lab.state}\n")
    assert main(["retry", "--config", str(config), "--held"]) == 0
    assert lab.delivery().step == Step.VERIFY
    lab.deliver()
    assert lab.states() == [StudyState.DELIVERED]
    assert end_state(lab.state, xnat) == {"in XNAT": 8}


# -- one bad batch never stops the others ------------------------------------------------------------------------


def _three_studies(lab: Lab, *, route: bool = True) -> None:
    """Three studies of three patients (so three subjects and session labels), spooled, complete, and routed."""
    for patient in ("ONE", "TWO", "THREE"):
        datasets = study(series=1, per_series=2)
        for ds in datasets:
            ds.PatientID = patient
        lab.store(datasets)
    lab.complete()
    if route:
        lab.router.check()


def test_missing_outbox_file_holds_only_its_batch(tmp_path: Path, xnat: FakeXnat) -> None:
    lab = Lab(tmp_path, xnat)
    _three_studies(lab)
    poisoned = lab.batch(1)[0].id
    before = _failures("package", "FileNotFoundError")
    for path in (lab.state / "outbox" / str(poisoned)).rglob("*.dcm"):
        path.unlink()
    lab.deliver()
    assert lab.states() == [StudyState.DELIVERED, StudyState.HELD, StudyState.DELIVERED]
    batch, delivery = lab.batch_and_delivery(1)
    assert batch.hold_code == "package-failed" and "FileNotFoundError" in str(batch.reason)
    assert delivery.faults == lab.config.batch_failures.max_attempts
    assert _failures("package", "FileNotFoundError") - before == lab.config.batch_failures.max_attempts
    assert end_state(lab.state, xnat) == {"in XNAT": 4, "held, in the spool": 2}


def test_corrupt_spool_file_holds_only_its_batch(tmp_path: Path, xnat: FakeXnat) -> None:
    """pydicom cannot read a spooled file of the second study: only that study is retried, then held."""
    lab = Lab(tmp_path, xnat)
    _three_studies(lab, route=False)
    victim = lab.journal.batch_instances(lab.batch(1)[0].id)[0]
    (lab.state / "spool" / victim.spool_path).write_bytes(b"not DICOM at all" * 8)
    before = _failures("route", "DeidError")
    while lab.journal.batches((StudyState.COMPLETE,)):
        lab.router.check()
    lab.deliver()
    assert lab.states() == [StudyState.DELIVERED, StudyState.HELD, StudyState.DELIVERED]
    batch, _ = lab.batch(1)
    assert batch.hold_code == "route-failed" and "route: failed 3 times" in str(batch.reason)
    assert "cannot be parsed (InvalidDicomError)" in str(batch.reason)  # read as de-identification reads it
    assert _failures("route", "DeidError") - before == 3
    assert end_state(lab.state, xnat) == {"in XNAT": 4, "held, in the spool": 2}


def test_reply_cut_short_holds_only_its_batch(tmp_path: Path, xnat: FakeXnat) -> None:
    """XNAT's JSON for one batch's experiment arrives cut short, every time: that batch is retried, then held."""
    lab = Lab(tmp_path, xnat)
    _three_studies(lab)
    route = lab.journal.routes()[lab.batch(1)[0].id]
    path = f"/data/projects/PROJ/subjects/{route.subject}/experiments/{route.session}"
    xnat.truncate_next("GET", path, times=1000, keep_bytes=20)
    lab.deliver()
    assert lab.states() == [StudyState.DELIVERED, StudyState.HELD, StudyState.DELIVERED]
    batch, _ = lab.batch(1)
    assert batch.hold_code == "xnat-unreachable" and "not JSON" in str(batch.reason)
    assert end_state(lab.state, xnat) == {"in XNAT": 4, "held, in the spool": 2}


@pytest.mark.parametrize("call", ["/data/services/import", "/data/services/archive"])
def test_a_uri_list_cut_short_is_retried_not_taken_for_a_place(tmp_path: Path, xnat: FakeXnat, call: str) -> None:
    """An import or archive answer cut by a proxy ("/data/prearchive/projects" without its line end) is not where
    XNAT filed the study: the step is looked at again, and the study delivered once."""
    lab = Lab(tmp_path, xnat)
    lab.receive(study(series=1, per_series=3))
    xnat.truncate_next("POST", call, keep_bytes=25)
    lab.deliver()
    assert lab.states() == [StudyState.DELIVERED]
    assert end_state(lab.state, xnat) == {"in XNAT": 3}
    assert lab.imports() == 1 and len(xnat.experiments("PROJ")) == 1
