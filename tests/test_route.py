"""The router against a real spool and journal: complete batches are routed, de-identified into the outbox, or held."""

from __future__ import annotations

import sqlite3
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from ingestd.header import read_file_header
from ingestd.journal import Journal, Source, StudyState
from ingestd.pipeline.route import Router, path_parts
from ingestd.rules import load_rules
from ingestd.spool import Spool
from tests.dicom import encode, make_instance, make_study

KEY = "k" * 40

RULES = """
profiles:
  research:
    key: {env: INGESTD_TEST_KEY}
    options: [retain-longitudinal-modified-dates, clean-descriptors]
    attributes:
      - {tag: PatientName, action: replace, value: "{subject}"}
rules:
  - name: research
    when:
      Modality: MR
      calling_aet: {equals: SCANNER}
    route:
      server: main
      project: PROJ_A
      subject: "{PatientID:hash8}"
      session: "{subject}_{StudyInstanceUID:hash6}"
      archive: true
    drop_series:
      - {SeriesDescription: {matches: "(?i)localizer"}}
    anonymize: research
  - name: phantom
    when:
      PatientID: {equals: PHANTOM}
    route: {server: main, project: QA, subject: phantom, session: "qa_{StudyDate}"}
"""


class Setup:
    def __init__(self, tmp_path: Path, rules_text: str = RULES) -> None:
        self.state = tmp_path / "state"
        self.state.mkdir()
        self.journal = Journal(self.state / "journal.sqlite")
        self.spool = Spool(self.state / "spool", self.journal)
        rules_file = tmp_path / "test.rules.yaml"
        rules_file.write_text(rules_text)
        self.router = Router(self.journal, load_rules([rules_file]), self.state)
        self.router.recover()

    def store(self, datasets: list[pydicom.Dataset], source: Source) -> None:
        for ds in datasets:
            data = encode(ds)
            self.spool.store(data[:0], data, read_file_header(data), source)

    def complete_all(self) -> None:
        for batch in self.journal.batches((StudyState.RECEIVING,)):
            assert self.journal.complete_batch(batch.id, batch.last_received, time.time())

    def rows(self, sql: str) -> list[tuple[object, ...]]:
        db = sqlite3.connect(self.state / "journal.sqlite")
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    return Setup(tmp_path)


SCANNER = Source("dicom", "SCANNER", "INGESTD@127.0.0.1")


def test_routed_study_is_deidentified_into_the_outbox(setup: Setup) -> None:
    study = make_study(series=2, per_series=3)
    for ds in study:
        ds.StudyDate = "20260315"
        ds.SeriesDescription = "T1 SYN0001"
    setup.store(study, SCANNER)
    setup.complete_all()
    assert setup.router.check() == 1

    (batch,) = setup.journal.batches()
    assert batch.state == StudyState.ROUTED
    route = setup.journal.routes()[batch.id]
    assert (route.rule, route.project, route.archive, route.profile) == (
        "research",
        "PROJ_A",
        1,
        "research",
    )
    assert len(route.subject) == 8 and len(route.session) == 15
    assert route.session.startswith(route.subject + "_")
    assert route.rules_version == setup.router.rules.version

    outgoing = setup.journal.outgoing(batch.id)
    assert len(outgoing) == 6
    originals = {ds.SOPInstanceUID for ds in study} | {ds.StudyInstanceUID, *(ds.SeriesInstanceUID for ds in study)}
    for item in outgoing:
        path = setup.state / item.path
        assert path.is_file() and path.stat().st_size == item.size
        assert not any(uid in item.path for uid in originals)
        out = pydicom.dcmread(path)
        assert out.SOPInstanceUID == item.sop_uid and out.StudyInstanceUID == route.study_uid
        assert out.PatientIdentityRemoved == "YES"
        assert str(out.PatientName) == route.subject
        assert out.SeriesDescription == "T1"  # clean-descriptors removed the patient ID from it
        data = path.read_bytes()
        assert b"SYN0001" not in data and b"Synthetic" not in data
    assert not list((setup.state / "outbox").glob(".tmp-*"))


def test_dropped_series_are_counted(setup: Setup) -> None:
    study_uid = generate_uid()
    localizer, t1 = generate_uid(), generate_uid()
    datasets = [make_instance(study_uid, localizer, number=i) for i in range(1, 4)]
    datasets += [make_instance(study_uid, t1, number=i) for i in range(1, 3)]
    for ds in datasets:
        ds.SeriesDescription = "Localizer" if ds.SeriesInstanceUID == localizer else "T1"
    setup.store(datasets, SCANNER)
    setup.complete_all()
    setup.router.check()
    (batch,) = setup.journal.batches()
    assert batch.state == StudyState.ROUTED
    assert setup.journal.routes()[batch.id].dropped_instances == 3
    assert len(setup.journal.outgoing(batch.id)) == 2
    assert setup.rows("SELECT instances, reason FROM dropped_series")[0][0] == 3


def test_unmatched_study_is_held_unrouted(setup: Setup) -> None:
    setup.store(make_study(series=1, per_series=2), Source("dicom", "OTHER", "INGESTD@127.0.0.1"))
    setup.complete_all()
    setup.router.check()
    (batch,) = setup.journal.batches()
    assert batch.state == StudyState.HELD
    assert batch.reason is not None and batch.reason.startswith("unrouted")
    assert not setup.journal.outgoing(batch.id)


def test_rule_without_profile_sends_the_spooled_files(setup: Setup) -> None:
    study = make_study(series=1, per_series=2)
    for ds in study:
        ds.PatientID = "PHANTOM"
    setup.store(study, Source("folder", "/drop", "qa/a.dcm"))
    setup.complete_all()
    setup.router.check()
    (batch,) = setup.journal.batches()
    assert batch.state == StudyState.ROUTED
    route = setup.journal.routes()[batch.id]
    assert (route.project, route.subject, route.profile) == ("QA", "phantom", None)
    assert route.study_uid == study[0].StudyInstanceUID
    assert all(item.path.startswith("spool/") for item in setup.journal.outgoing(batch.id))


def test_burned_in_instance_holds_the_whole_batch(setup: Setup) -> None:
    study_uid = generate_uid()
    datasets = [make_instance(study_uid), make_instance(study_uid, sop_class=SecondaryCaptureImageStorage)]
    datasets[1].Modality = "MR"  # the rule's `when` still matches; the SOP class is what screen() looks at
    setup.store(datasets, SCANNER)
    setup.complete_all()
    setup.router.check()
    (batch,) = setup.journal.batches()
    assert batch.state == StudyState.HELD
    assert batch.reason is not None and batch.reason.startswith("burned-in")
    assert not list((setup.state / "outbox").iterdir())


def test_unshiftable_date_holds_without_leaking_it(setup: Setup) -> None:
    study = make_study(series=1, per_series=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid value it is asked to write
        study[0].AcquisitionDate = "2026XXYY"
        setup.store(study, SCANNER)
    setup.complete_all()
    setup.router.check()
    (batch,) = setup.journal.batches()
    assert batch.state == StudyState.HELD
    assert batch.reason is not None and "2026XXYY" not in batch.reason and "(0008,0022)" in batch.reason


def test_interrupted_outbox_is_redone_identically(setup: Setup) -> None:
    """A crash after the outbox was written but before the route was committed: the next run does it again."""
    setup.store(make_study(series=1, per_series=2), SCANNER)
    setup.complete_all()
    (batch,) = setup.journal.batches()
    instances = setup.journal.batch_instances(batch.id)
    leftover = setup.state / "outbox" / f".tmp-{batch.id}"
    leftover.mkdir(parents=True)
    (leftover / "partial.dcm").write_bytes(b"half")
    (setup.state / "outbox" / str(batch.id)).mkdir()
    setup.router.recover()
    assert not list((setup.state / "outbox").iterdir())
    setup.router.check()
    first = {item.sop_uid: (setup.state / item.path).read_bytes() for item in setup.journal.outgoing(batch.id)}
    assert len(first) == len(instances)
    # The same batch routed again from scratch gives byte-identical outgoing files (deterministic output).
    setup.journal.close()
    db = sqlite3.connect(setup.state / "journal.sqlite")
    with db:
        db.execute("DELETE FROM outgoing")
        db.execute("DELETE FROM routes")
        db.execute("UPDATE batches SET state = 'complete'")
    db.close()
    again = Setup.__new__(Setup)
    again.state = setup.state
    again.journal = Journal(setup.state / "journal.sqlite")
    again.router = Router(again.journal, setup.router.rules, setup.state)
    again.router.recover()
    again.router.check()
    second = {item.sop_uid: (setup.state / item.path).read_bytes() for item in again.journal.outgoing(batch.id)}
    assert second == first
    again.journal.close()


def test_path_parts_open_archives() -> None:
    assert path_parts("subj/sess/series/a.dcm") == "subj/sess/series/a.dcm"
    assert path_parts("upload/subj01.zip!sess01/t1/a.dcm") == "upload/sess01/t1/a.dcm"


def test_a_held_batch_keeps_its_outbox_across_a_restart(setup: Setup) -> None:
    """A batch held in delivery keeps its route and its outgoing files: the router's start-up clean-up leaves them,
    so that `ingestd retry --keep-route` can still package what XNAT lacks (it removed them before)."""
    setup.store(make_study(series=1, per_series=2), SCANNER)
    setup.complete_all()
    assert setup.router.check() == 1
    (batch,) = setup.journal.batches()
    assert setup.journal.hold_batch(batch.id, "xnat-refused", "xnat-refused: test", time.time(), from_state="routed")
    setup.router.recover()
    outgoing = setup.journal.outgoing(batch.id)
    assert outgoing and all((setup.state / item.path).is_file() for item in outgoing)
    assert setup.journal.release_batch(batch.id, time.time())
    setup.router.recover()  # released: kept for `ingestd unrelease`, until retention removes it
    assert all((setup.state / item.path).is_file() for item in outgoing)
