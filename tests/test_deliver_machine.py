"""A Hypothesis state machine over sends, late batches, faults on every XNAT call and crashes at any request.

Rules: send a new study, send a late batch of a study sent before, inject one fault on one kind of XNAT call (503
before doing the work, a 504 after doing it, a reset mid-upload that XNAT half-reads, a reply cut short), arrange
a crash at the n-th XNAT request of the next run (the process dies there: nothing after it is committed, whatever
XNAT did), and run the deliverer. A crash is the journal's view of kill -9: the next run starts from a new journal
connection, router and deliverer, as a restarted daemon does.

At the end the faults stop, every held batch is retried once, and the deliverer runs to completion. Then the
promise must hold by identity (`tests.lab.end_state`): every acknowledged instance in XNAT exactly once, in its
session and place, and nothing held.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ingestd.states import StudyState
from ingestd.testing.xnat import FakeXnat
from ingestd.xnat import XnatClient
from tests.lab import Lab, end_state, lab_xnat, set_secrets, study


class Crash(BaseException):
    """The process dies here (a BaseException: no step's error handling may catch it)."""


# (method, path prefix) of every kind of request the deliverer makes
CALLS = [
    ("GET", "/data/projects"),  # pre-flight, and the experiment
    ("POST", "/data/services/import"),
    ("GET", "/data/prearchive/projects/PROJ"),  # listing, one session, its scans and files
    ("POST", "/data/services/archive"),
    ("GET", "/data/experiments/"),  # archive catalogs
]
FAULTS = ["503", "done-then-504", "reset", "cut-short"]


class DeliveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="ingestd-machine-"))
        self.context = lab_xnat()  # kept: the stand-in stops when its context is closed
        self.server = self.context.__enter__()
        self.lab: Lab | None = None
        self.studies: list[tuple[str, str, int]] = []  # (Study Instance UID, Patient ID, next series number)
        self.crash_at: int | None = None

    @initialize(archive=st.booleans(), series=st.integers(1, 2), per_series=st.integers(1, 4))
    def start(self, archive: bool, series: int, per_series: int) -> None:
        self.lab = Lab(self.tmp, self.server, archive=archive)
        self.send_study(series, per_series)

    @property
    def xnat(self) -> FakeXnat:
        return self.server

    def teardown(self) -> None:
        try:
            if self.lab is not None:
                self.finish()
        finally:
            if self.lab is not None:
                self.lab.journal.close()
            self.context.__exit__(None, None, None)
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the rules -----------------------------------------------------------------------------------------------

    @rule(series=st.integers(1, 2), per_series=st.integers(1, 4))
    def send_study(self, series: int, per_series: int) -> None:
        assert self.lab is not None
        patient = f"P{len(self.studies)}"
        datasets = study(series=series, per_series=per_series)
        for ds in datasets:
            ds.PatientID = patient
        self.lab.receive(datasets)
        self.studies.append((datasets[0].StudyInstanceUID, patient, series + 1))

    @precondition(lambda self: bool(self.studies))
    @rule(which=st.integers(0, 100), per_series=st.integers(1, 3))
    def send_late_batch(self, which: int, per_series: int) -> None:
        assert self.lab is not None
        index = which % len(self.studies)
        study_uid, patient, number = self.studies[index]
        datasets = study(series=1, per_series=per_series, study_uid=study_uid, first=number)
        for ds in datasets:
            ds.PatientID = patient
        self.lab.receive(datasets)
        self.studies[index] = (study_uid, patient, number + 1)

    @rule(call=st.sampled_from(CALLS), fault=st.sampled_from(FAULTS))
    def fault(self, call: tuple[str, str], fault: str) -> None:
        method, path = call
        if fault == "503":
            self.xnat.fail_next(method, path, status=503)
        elif fault == "done-then-504":
            self.xnat.fail_next(method, path, status=504, after_processing=True)
        elif fault == "reset":
            self.xnat.reset_next(method, path, after_bytes=700)
        else:
            self.xnat.truncate_next(method, path, keep_bytes=25)

    @rule(n=st.integers(1, 30))
    def crash_during_next_run(self, n: int) -> None:
        self.crash_at = n

    @rule()
    def run(self) -> None:
        """Run the deliverer until nothing is due (or the crash comes)."""
        assert self.lab is not None
        lab = self.lab
        if self.crash_at is not None:
            self._arm_crash(self.crash_at)
            self.crash_at = None
        try:
            for _ in range(200):
                if not lab.deliverer.check() and not lab.journal.batches((StudyState.ROUTED,)):
                    break
                time.sleep(0.01)
        except Crash:
            event("crashed mid-delivery")
            lab.restart()

    def _arm_crash(self, n: int) -> None:
        assert self.lab is not None
        server = self.lab.config.xnat.servers["main"]
        requests_left = [n]

        lab = self.lab

        def progress() -> None:
            lab.deliverer.beat()
            requests_left[0] -= 1
            if requests_left[0] == 0:
                raise Crash

        old = self.lab.deliverer.servers.clients.pop("main", None)  # the test's own crash point
        if old is not None:
            old.close()
        self.lab.deliverer.servers.clients["main"] = XnatClient("main", server, progress=progress)

    @invariant()
    def nothing_acknowledged_is_gone(self) -> None:
        """At every point: an instance is in the spool until its batch is delivered (verified in XNAT)."""
        if self.lab is None:
            return
        for batch in self.lab.journal.batches():
            if batch.state == StudyState.DELIVERED:
                continue
            for instance in self.lab.journal.batch_instances(batch.id):
                assert (self.lab.state / "spool" / instance.spool_path).is_file()

    # -- the end -------------------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Faults off, held batches retried once, deliver to the end; then the promise, by identity."""
        assert self.lab is not None
        lab = self.lab
        self.xnat.clear_faults()
        lab.restart()
        for batch in lab.journal.batches((StudyState.HELD,)):
            event(f"held before the retry: {batch.hold_code}")
            lab.journal.retry_batch(batch.id, time.time())
        lab.deliver(timeout=60)
        held = [(b.id, b.hold_code, b.reason) for b in lab.journal.batches((StudyState.HELD,))]
        assert held == [], held
        outcome = end_state(lab.state, self.xnat)
        event(f"instances delivered: {'some' if outcome['in XNAT'] else 'none'}")
        event(f"batches: {min(len(lab.journal.batches()), 4)}+")


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    set_secrets(monkeypatch)


DeliveryMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("INGESTD_MACHINE_EXAMPLES", "12")),  # CI: 12; the trials: hundreds
    stateful_step_count=14,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TestDeliveryMachine = DeliveryMachine.TestCase
