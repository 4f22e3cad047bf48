"""kill -9 of a real daemon at each delivery step, restart, and check by identity: nothing lost, nothing twice.

The daemon is held in a step by XNAT answering slowly there (the stand-in's fault injection: before or after it
did the work), killed with SIGKILL, started again, and left to finish. The end state is checked per SOP Instance
UID (`tests.lab.end_state`): every acknowledged instance in XNAT exactly once, in its session and place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ingestd.testing.xnat import FakeXnat
from tests.dicom import make_study, write_instances
from tests.lab import end_state
from tests.procs import (
    SCANNER_RULES,
    DaemonProcess,
    Storescu,
    free_port,
    journal_rows,
    wait_until,
    write_xnat_daemon_config,
)

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.slow]


@dataclass(frozen=True)
class Point:
    """Where to kill: the step the journal shows, and the slow answer from XNAT that keeps the daemon there."""

    name: str
    step: str
    method: str
    path: str
    fault: dict[str, Any] = field(default_factory=dict)
    late: bool = False  # kill during the delivery of the study's second batch (its first is in XNAT already)
    archive: bool = True

    def __str__(self) -> str:
        return self.name


_SLOW = {"status": 504, "delay": 30}
_DONE_SLOW = {"status": 504, "delay": 30, "after_processing": True}
POINTS = [
    Point("preflight", "preflight", "GET", "/data/projects", {"status": 503, "delay": 30}),
    Point("importing-not-done", "importing", "POST", "/data/services/import", _SLOW),
    Point("importing-done", "importing", "POST", "/data/services/import", _DONE_SLOW),
    Point("archiving-not-done", "archiving", "POST", "/data/services/archive", _SLOW),
    Point("archiving-done", "archiving", "POST", "/data/services/archive", _DONE_SLOW),
    Point("verify-archive", "verify", "GET", "/data/experiments/", {"status": 503, "delay": 30}),
    Point("late-importing-not-done", "importing", "POST", "/data/services/import", _SLOW, late=True),
    Point("late-importing-done", "importing", "POST", "/data/services/import", _DONE_SLOW, late=True),
    Point("late-archiving-done", "archiving", "POST", "/data/services/archive", _DONE_SLOW, late=True),
    Point("prearchive-importing-done", "importing", "POST", "/data/services/import", _DONE_SLOW, archive=False),
    Point("prearchive-late-importing-not-done", "importing", "POST", "/data/services/import", _SLOW, True, False),
]


def _steps(state: Path) -> list[tuple[int, str, str]]:
    return [
        (int(row[0]), str(row[1]), str(row[2] or ""))
        for row in journal_rows(
            state / "journal.sqlite",
            "SELECT b.id, b.state, d.step FROM batches b LEFT JOIN deliveries d ON d.batch_id = b.id ORDER BY b.id",
        )
    ]


def _send(port: int, datasets: list[Any], folder: Path) -> None:
    with Storescu(port, write_instances(datasets, folder)) as storescu:
        assert storescu.wait() == 0, storescu.output()


@pytest.mark.parametrize("point", POINTS, ids=str)
def test_kill9_at_each_delivery_step_loses_nothing(tmp_path: Path, xnat: FakeXnat, point: Point) -> None:
    port = free_port()
    rules = SCANNER_RULES.replace("archive: true", f"archive: {str(point.archive).lower()}")
    config = write_xnat_daemon_config(tmp_path, port, xnat.url, rules=rules)
    state = tmp_path / "state"
    study = make_study(series=2, per_series=4)
    for ds in study:
        ds.SeriesNumber = 1 if ds.SeriesInstanceUID == study[0].SeriesInstanceUID else 2
    late = make_study(series=1, per_series=3)
    for ds in late:
        ds.StudyInstanceUID, ds.SeriesNumber = study[0].StudyInstanceUID, 3
        ds.PatientID, ds.PatientName = study[0].PatientID, study[0].PatientName
    victim = 2 if point.late else 1
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        if point.late:
            _send(port, study, tmp_path / "first")
            wait_until(lambda: _steps(state) == [(1, "delivered", "done")], 60, interval=0.2, message="batch 1")
        xnat.fail_next(point.method, point.path, **point.fault)
        _send(port, late if point.late else study, tmp_path / "sent")
        wait_until(  # in the step, and inside the slow request
            lambda: (victim, "routed", point.step) in _steps(state) and not xnat.faults_pending(),
            60,
            interval=0.05,
            message=f"step {point.step}",
        )
        assert daemon.kill9() == -9
        daemon.start()
        daemon.wait_ready(port)
        wait_until(
            lambda: all(state_ == "delivered" for _id, state_, _step in _steps(state)) and len(_steps(state)) == victim,
            90,
            interval=0.2,
            message="delivery after the restart",
        )
        assert daemon.terminate() == 0
    expected = len(study) + (len(late) if point.late else 0)
    assert end_state(state, xnat) == {"in XNAT": expected}
    assert len(xnat.experiments("PROJ")) == (1 if point.archive else 0)
    assert len(xnat.prearchive_rows("PROJ")) == (0 if point.archive else 1)
