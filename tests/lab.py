"""A lab in one process for the delivery tests: journal, spool, router and deliverer, and an XNAT stand-in.

`end_state` is the promise the delivery tests check, by identity: every acknowledged instance of a delivered batch
is in XNAT exactly once (by its outgoing SOP Instance UID), in the session its route names and the place its rule
says; every instance of a held batch is still in the spool; nothing is in XNAT twice.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from ingestd.config import Config, parse_config
from ingestd.header import read_file_header
from ingestd.journal import BatchRow, Delivery, Journal, Source
from ingestd.pipeline.deliver import Deliverer
from ingestd.pipeline.route import Router
from ingestd.rules import load_rules
from ingestd.spool import Spool
from ingestd.states import StudyState
from ingestd.testing.xnat import FakeXnat
from tests.dicom import encode, make_instance

KEY = "d" * 40
PASSWORD = "s3cret-pw"
SCANNER = Source("dicom", "SCANNER", "INGESTD@127.0.0.1")

RULES = """
profiles:
  research: {key: {env: INGESTD_TEST_KEY}}
rules:
  - name: research
    when: {calling_aet: SCANNER}
    route: {server: main, project: PROJ, subject: '{PatientID:hash8}', session: '{subject}_MR', archive: ARCHIVE}
    anonymize: research
"""


def set_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """The profile key and the XNAT credentials the lab's configuration reads from the environment."""
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    monkeypatch.setenv("XNAT_TEST_USER", "ingestd")
    monkeypatch.setenv("XNAT_TEST_PASSWORD", PASSWORD)


@contextmanager
def lab_xnat(version: str = "1.8.10", **options: Any) -> Iterator[FakeXnat]:
    """An XNAT stand-in that builds idle sessions within a second, with user `ingestd` in PROJ (and READONLY)."""
    options = {"idle_build_seconds": 0.3, "rebuild_repeat_seconds": 0.1, **options}
    with FakeXnat(version=version, **options) as server:
        server.add_user("ingestd", PASSWORD)
        server.add_project("PROJ", members=["ingestd"])
        server.add_project("READONLY", collaborators=["ingestd"])
        yield server


def study(series: int = 2, per_series: int = 3, study_uid: str | None = None, first: int = 1) -> list[pydicom.Dataset]:
    """A study whose series have distinct SeriesNumbers (XNAT files scans by SeriesNumber)."""
    study_uid = study_uid or generate_uid()
    out = []
    for number in range(first, first + series):
        series_uid = generate_uid()
        for index in range(per_series):
            ds = make_instance(study_uid, series_uid, number=index + 1)
            ds.SeriesNumber = number
            ds.PatientName = "Deliver^Test"
            ds.PatientID = "DELIVER1"
            out.append(ds)
    return out


class Lab:
    """A state directory with journal, spool, router and deliverer, and an XNAT stand-in to deliver to."""

    def __init__(
        self,
        tmp_path: Path,
        xnat: FakeXnat,
        *,
        archive: bool = True,
        project: str = "PROJ",
        extra: str = "",
        credentials: str = "{env_username: XNAT_TEST_USER, env_password: XNAT_TEST_PASSWORD}",
        server_extra: str = "",
    ) -> None:
        self.xnat = xnat
        self.state = tmp_path / "state"
        self.state.mkdir(exist_ok=True)
        self.rules_file = tmp_path / "lab.rules.yaml"
        self.rules_file.write_text(
            RULES.replace("ARCHIVE", str(archive).lower()).replace("project: PROJ", f"project: {project}")
        )
        self.config: Config = parse_config(
            f"state_dir: {self.state}\n"
            "xnat:\n"
            "  servers:\n"
            "    main:\n"
            f"      url: {xnat.url}\n"
            f"      credentials: {credentials}\n"
            "      poll_interval_seconds: 0.05\n"
            "      build_wait_seconds: 0.3\n"
            "      settle_seconds: 0.2\n"
            "      ready_timeout_seconds: 20\n"
            "      retry: {initial_seconds: 0.05, max_seconds: 0.2, max_attempts: 6}\n"
            + server_extra
            + "batch_failures: {max_attempts: 3, initial_seconds: 0.05, max_seconds: 0.1}\n"
            + extra
        )
        self.journal = Journal(self.state / "journal.sqlite")
        self.spool = Spool(self.state / "spool", self.journal)
        self.restart()

    def restart(self) -> None:
        """What a new process would have: a new journal connection, router and deliverer (a crash's aftermath)."""
        self.journal.close()
        self.journal = Journal(self.state / "journal.sqlite")
        self.spool = Spool(self.state / "spool", self.journal)
        self.router = Router(
            self.journal, load_rules([self.rules_file]), self.state, failures=self.config.batch_failures
        )
        self.router.recover()
        self.deliverer = Deliverer(self.journal, self.config)
        self.deliverer.packages.mkdir(parents=True, exist_ok=True)

    def store(self, datasets: list[pydicom.Dataset]) -> None:
        """Spool the instances (each acknowledged, as a C-STORE success would be)."""
        for ds in datasets:
            data = encode(ds)
            self.spool.store(data[:0], data, read_file_header(data), SCANNER)

    def complete(self) -> None:
        for batch in self.journal.batches((StudyState.RECEIVING,)):
            assert self.journal.complete_batch(batch.id, batch.last_received, time.time())

    def receive(self, datasets: list[pydicom.Dataset]) -> None:
        """Spool the instances, complete their batch and route it."""
        self.store(datasets)
        self.complete()
        self.router.check()

    def deliver(self, timeout: float = 30.0) -> None:
        """Run delivery steps until no batch is routed any more."""
        deadline = time.monotonic() + timeout
        while self.journal.batches((StudyState.ROUTED,)):
            assert time.monotonic() < deadline, self.journal.deliveries()
            self.deliverer.check()
            time.sleep(0.02)

    def advance_to(self, step: str, index: int = 0) -> Delivery:
        """Take one delivery step after the other for one batch until its next step is `step`; its delivery row."""
        batch = sorted(self.journal.batches(), key=lambda b: b.id)[index]
        if self.journal.delivery(batch.id) is None:
            self.journal.start_delivery(batch.id, time.time())
        for _ in range(20):
            delivery = self.journal.delivery(batch.id)
            assert delivery is not None
            if delivery.step == step:
                return delivery
            self.deliverer.step(batch.id, self.journal.routes()[batch.id], delivery)
        raise AssertionError(f"batch {batch.id} did not reach step {step}: {self.journal.delivery(batch.id)}")

    def batch(self, index: int = 0) -> tuple[BatchRow, Delivery | None]:
        """The index-th batch (by id) and its delivery row, None before its delivery started."""
        batch = sorted(self.journal.batches(), key=lambda b: b.id)[index]
        return batch, self.journal.delivery(batch.id)

    def batch_and_delivery(self, index: int = 0) -> tuple[BatchRow, Delivery]:
        """The index-th batch (by id) and its delivery row, which must exist."""
        batch, delivery = self.batch(index)
        assert delivery is not None, f"batch {batch.id} has no delivery row"
        return batch, delivery

    def delivery(self, index: int = 0) -> Delivery:
        return self.batch_and_delivery(index)[1]

    def states(self) -> list[str]:
        return [b.state for b in sorted(self.journal.batches(), key=lambda b: b.id)]

    def imports(self) -> int:
        return sum(
            1 for method, path, _status in self.xnat.requests_log if method == "POST" and "services/import" in path
        )


@dataclass(frozen=True)
class Sent:
    """One acknowledged instance as the journal knows it: its batch, spool file and outgoing SOP Instance UID."""

    batch_id: int
    state: str
    spool_path: str
    outgoing_uid: str | None  # None: the rule dropped its series, or the batch was never routed
    archive: bool | None
    session: str | None


def acknowledged(state_dir: Path) -> list[Sent]:
    """Every instance the spool acknowledged (read straight from the journal file, as an outside observer)."""
    with closing(sqlite3.connect(f"file:{state_dir / 'journal.sqlite'}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "SELECT i.batch_id, b.state, i.spool_path, o.sop_uid, r.archive, r.session FROM instances i"
            " JOIN batches b ON b.id = i.batch_id LEFT JOIN outgoing o ON o.instance_id = i.id"
            " LEFT JOIN routes r ON r.batch_id = i.batch_id ORDER BY i.id"
        ).fetchall()
    return [Sent(r[0], r[1], r[2], r[3], None if r[4] is None else bool(r[4]), r[5]) for r in rows]


def xnat_holdings(xnat: FakeXnat, project: str = "PROJ") -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """SOP Instance UID -> the sessions holding a file of it: (archive labels, prearchive READY-or-not row urls)."""
    archived: dict[str, list[str]] = {}
    for experiment in xnat.experiments(project):
        for scan in experiment.scans.values():
            for sop_uid in scan.files.values():
                archived.setdefault(sop_uid, []).append(experiment.label)
    prearchived: dict[str, list[str]] = {}
    for url, files in xnat.prearchive_files(project).items():
        for sop_uid in files.values():
            prearchived.setdefault(sop_uid, []).append(url)
    return archived, prearchived


def end_state(state_dir: Path, xnat: FakeXnat, project: str = "PROJ") -> Counter[str]:
    """Check the delivery promise by identity; return how many acknowledged instances ended how.

    Delivered batch: each outgoing SOP Instance UID is in XNAT exactly once, in its route's session (the archive
    when the rule archives; else the archive or a READY prearchive session). Held batch: each instance is still
    in the spool. Nothing is in XNAT twice, whatever batch sent it.
    """
    archived, prearchived = xnat_holdings(xnat, project)
    ready = {row["url"] for row in xnat.prearchive_rows(project) if row["status"] == "READY"}
    outcome: Counter[str] = Counter()
    for sent in acknowledged(state_dir):
        if sent.state == StudyState.HELD:
            assert (state_dir / "spool" / sent.spool_path).is_file(), f"held batch {sent.batch_id} lost a spool file"
            outcome["held, in the spool"] += 1
            continue
        assert sent.state == StudyState.DELIVERED, f"batch {sent.batch_id} is {sent.state}, not finished"
        if sent.outgoing_uid is None:
            outcome["dropped by the rule"] += 1
            continue
        labels, urls = archived.get(sent.outgoing_uid, []), prearchived.get(sent.outgoing_uid, [])
        assert len(labels) + len(urls) == 1, f"batch {sent.batch_id}: in XNAT {len(labels) + len(urls)} times"
        if sent.archive:
            assert labels == [sent.session], f"batch {sent.batch_id}: not archived in its session"
        else:
            assert labels == [sent.session] or (urls and urls[0] in ready), f"batch {sent.batch_id}: not READY"
        outcome["in XNAT"] += 1
    assert all(len(places) == 1 for places in archived.values()), "an instance is archived twice"
    return outcome
