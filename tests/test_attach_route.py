"""Routing attachment sets (`ingestd.pipeline.attach.SetRouter`): a real journal, spool, rules and quarantine.

Which study a set's files go with, split per study or per session, waiting for a study not routed yet, held and
moved on by itself when its study is held and then routed, files no entry takes kept in quarantine.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pydicom
import pytest

from ingestd.config import parse_config
from ingestd.header import read_file_header
from ingestd.journal import Journal, Source, StudyState
from ingestd.journal.attachments import attachments_out, set_files, store_file
from ingestd.pipeline.attach import SetRouter, closest_study
from ingestd.pipeline.route import Router
from ingestd.rules import RuleSet, load_rules
from ingestd.spool import Quarantine, Spool
from ingestd.states import BatchKind, HoldCode
from tests.dicom import encode, make_study

RULES = """\
rules:
  - name: mr
    when: {drop_folder: DROP}
    route: {server: main, project: PROJ, subject: '{path[0]}', session: '{path[1]}', archive: true}
    attach:
      - {match: "*/*/qBOLD/**", resource: qBOLD}
      - {match: "**/*.PAR", resource: PARREC}
"""


class Setting:
    """A state directory with a spool, a journal, the study router and the set router over `RULES`."""

    def __init__(self, tmp_path: Path, rules: str = RULES) -> None:
        self.drop = str(tmp_path / "drop")
        (tmp_path / "r.yaml").write_text(rules.replace("DROP", self.drop))
        self.config = parse_config(
            f"state_dir: {tmp_path / 'state'}\n"
            "xnat: {servers: {main: {url: 'http://127.0.0.1:9', credentials: {env_username: U, env_password: P}}}}\n"
            "attachments: {recheck_seconds: 0.01}\n",
            str(tmp_path / "ingestd.yaml"),
        )
        self.config.state_dir.mkdir()
        self.journal = Journal(self.config.journal_path)
        self.spool = Spool(self.config.spool_dir, self.journal)
        self.rules = load_rules([tmp_path / "r.yaml"])
        self.quarantine = Quarantine(self.config.quarantine_dir, self.journal)
        self.router = Router(self.journal, self.rules, self.config.state_dir)
        self.router.recover()
        self.sets = SetRouter(self.journal, self.rules, self.config, self.quarantine)
        (self.config.state_dir / "attachments").mkdir(parents=True, exist_ok=True)
        self.counter = 0

    def source(self, detail: str) -> Source:
        return Source("folder", self.drop, detail, detail.split("/", 1)[0])

    def dicom(self, folder: str, study: list[pydicom.Dataset] | None = None) -> list[pydicom.Dataset]:
        study = study or make_study(series=1, per_series=2)
        for index, ds in enumerate(study):
            data = encode(ds)
            self.spool.store(data[:0], data, read_file_header(data), self.source(f"{folder}/IM{index}.dcm"))
        return study

    def file(self, relative: str, data: bytes = b"results") -> None:
        self.counter += 1
        spool_path = f"attachments/{self.counter:08x}"
        (self.config.state_dir / spool_path).write_bytes(data)
        store_file(
            self.journal,
            self.source(relative),
            relative,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            md5=hashlib.md5(data, usedforsecurity=False).hexdigest(),
            spool_path=spool_path,
            now=time.time(),
        )

    def complete_all(self) -> None:
        for batch in self.journal.batches((StudyState.RECEIVING,)):
            assert self.journal.complete_batch(batch.id, batch.last_received, time.time())

    def sets_by_state(self) -> dict[int, tuple[str, str | None]]:
        return {
            batch.id: (batch.state, batch.hold_code)
            for batch in self.journal.batches()
            if batch.kind == BatchKind.FILES
        }

    def placed(self, batch_id: int) -> set[tuple[str, str]]:
        return {(out.resource, out.name) for out in attachments_out(self.journal, batch_id)}


@pytest.fixture
def setting(tmp_path: Path) -> Setting:
    return Setting(tmp_path)


def test_a_set_follows_its_study_once_routed_and_files_no_entry_takes_go_to_quarantine(setting: Setting) -> None:
    setting.dicom("sub01/ses01/dicom")
    setting.file("sub01/ses01/qBOLD/maps/r2.nii.gz")
    setting.file("sub01/ses01/raw/scan_7.PAR")
    setting.file("sub01/ses01/notes/DOE_JOHN.txt")
    setting.complete_all()
    assert setting.sets.check() == 0  # the study is complete, not routed: the set waits
    (files_set,) = setting.sets_by_state()
    assert setting.sets_by_state()[files_set] == (StudyState.COMPLETE, None)
    setting.router.check()
    setting.sets.check()
    assert setting.sets_by_state()[files_set] == (StudyState.ROUTED, None)
    assert setting.placed(files_set) == {("qBOLD", "maps/r2.nii.gz"), ("PARREC", "scan_7.PAR")}
    route = setting.journal.route(files_set)
    assert route is not None and (route.project, route.subject, route.session) == ("PROJ", "sub01", "ses01")
    (kept,) = setting.journal.quarantined()
    assert "no attach: entry of rule 'mr'" in kept.reason and "DOE" not in kept.path
    assert len(set_files(setting.journal, files_set)) == 2


def test_files_without_dicom_become_one_set_per_session(setting: Setting) -> None:
    """The how-to tree `<subject>/<session>/qBOLD/...` of one subject with two sessions, no DICOM."""
    setting.file("sub01/ses01/qBOLD/a.nii")
    setting.file("sub01/ses02/qBOLD/a.nii")
    setting.file("sub01/ses02/qBOLD/b.nii")
    setting.complete_all()
    setting.sets.check()  # split
    setting.sets.check()  # each routed
    routes = {setting.journal.route(batch_id) for batch_id in setting.sets_by_state()}
    assert {(r.subject, r.session, r.instances) for r in routes if r is not None} == {
        ("sub01", "ses01", 1),
        ("sub01", "ses02", 2),
    }
    assert all(state == StudyState.ROUTED for state, _code in setting.sets_by_state().values())


def test_a_set_whose_study_is_held_waits_held_and_moves_on_once_the_study_is_routed(tmp_path: Path) -> None:
    rules = RULES.replace("{path[1]}", "{path[1]}_{PatientWeight}")  # a label the study cannot make: held
    setting = Setting(tmp_path, rules)
    study = setting.dicom("sub01/ses01/dicom")
    setting.file("sub01/ses01/qBOLD/a.nii")
    setting.complete_all()
    setting.router.check()
    assert [b.state for b in setting.journal.batches() if b.kind == BatchKind.DICOM] == [StudyState.HELD]
    setting.sets.check()
    (files_set,) = setting.sets_by_state()
    assert setting.sets_by_state()[files_set] == (StudyState.HELD, HoldCode.STUDY_HELD)
    # the rule is fixed and the study retried (as `ingestd retry` does), then routed: the set follows by itself
    setting.router.rules = setting.sets.rules = load_rules_text(tmp_path, RULES.replace("DROP", setting.drop))
    (held_study,) = [b for b in setting.journal.batches() if b.kind == BatchKind.DICOM]
    setting.journal.retry_batch(held_study.id, time.time())
    setting.router.check()
    time.sleep(0.02)
    setting.sets.check()  # the re-check: back to complete
    setting.sets.check()  # routed
    assert setting.sets_by_state()[files_set] == (StudyState.ROUTED, None)
    assert study  # the study's instances were spooled from the same upload


def load_rules_text(tmp_path: Path, text: str) -> RuleSet:
    (tmp_path / "fixed.yaml").write_text(text)
    return load_rules([tmp_path / "fixed.yaml"])


def test_files_go_with_the_study_in_the_deepest_shared_folder_and_an_even_tie_is_held(setting: Setting) -> None:
    setting.dicom("sub01/ses01/dicom")
    setting.dicom("sub01/ses02/dicom")
    setting.file("sub01/ses01/qBOLD/a.nii")
    setting.file("sub01/ses02/qBOLD/b.nii")
    setting.file("sub01/overview.PAR")  # as close to both sessions
    setting.complete_all()
    setting.router.check()
    for _ in range(3):
        setting.sets.check()
    states = sorted(setting.sets_by_state().values(), key=str)
    assert states == sorted(
        [(StudyState.HELD, HoldCode.ATTACH_AMBIGUOUS), (StudyState.ROUTED, None), (StudyState.ROUTED, None)], key=str
    )
    sessions = {
        route.session for batch_id in setting.sets_by_state() if (route := setting.journal.route(batch_id)) is not None
    }
    assert sessions == {"ses01", "ses02"}


def test_closest_study() -> None:
    studies = {"A": {("s", "one", "dicom")}, "B": {("s", "two", "dicom")}}
    assert closest_study("s/one/qBOLD/x", studies) == "A"
    assert closest_study("s/two/x", studies) == "B"
    assert closest_study("s/x", studies) is None
    assert closest_study("x", {"A": {("a",)}}) == "A"
