"""`ingestd import`'s progress file (ingestd/importprogress.py) and the overview that shows it.

The file says counts and a phase, never a path or a file name; it is replaced atomically, at most every
PROGRESS_SECONDS; it goes when the import ends however it ends; an import killed outright leaves one that the reader
ignores and removes (its flock is gone). A real `ingestd import` next to a real daemon shows on the overview's
fragment with growing counts, and is gone from it once it ends.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import pytest
import requests
from structlog.testing import capture_logs

from ingestd.importprogress import IMPORTS_DIR, ImportProgress, Recorded, running_imports
from ingestd.progress import Counts, Lines
from ingestd.testing.xnat import FakeXnat
from tests.dicom import make_study, write_instances
from tests.procs import DaemonProcess, run_ingestd, wait_until
from tests.spooled import KEY, PATIENT_FOLDER, PATIENT_ID, spooled_state
from tests.test_import import write_config

RULES = """
profiles:
  research: {key: {env: INGESTD_TEST_KEY}}
rules:
  - name: bulk-mr
    when: {Modality: MR}
    route: {server: main, project: PROJ, subject: '{PatientID:hash8}', session: '{subject}_{StudyInstanceUID:hash8}',
            archive: true}
    anonymize: research
"""

# A child that records progress and then waits to be killed (what a real import does, minus the work).
_CHILD = """
import sys, time
from pathlib import Path
from ingestd.importprogress import ImportProgress
from ingestd.progress import Counts
record = ImportProgress(Path(sys.argv[1]))
record.start(Counts(files=7, scanned=3))
print("started", flush=True)
time.sleep(600)
"""


def _files(state: Path) -> list[str]:
    folder = state / IMPORTS_DIR
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def test_the_file_holds_counts_and_phase_only_and_is_written_at_most_every_interval(tmp_path: Path) -> None:
    record = ImportProgress(tmp_path, interval=0.5)
    counts = Counts(files=10)
    record.start(counts)
    path = tmp_path / IMPORTS_DIR / f"{os.getpid()}.json"
    first = json.loads(path.read_text())
    assert set(first) == {"pid", "started", "updated", "phase", "counts"}
    assert first["phase"] == "scanning" and first["counts"]["files"] == 10
    assert all(isinstance(value, int) for value in first["counts"].values())
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    counts.scanned = 4
    record.update(counts)  # too soon: not written
    assert json.loads(path.read_text())["counts"]["scanned"] == 0
    counts.delivering = True
    record.update(counts)  # a new phase: written at once
    assert json.loads(path.read_text())["phase"] == "delivering"
    counts.delivered = 1
    time.sleep(0.6)
    record.update(counts)
    assert json.loads(path.read_text())["counts"]["delivered"] == 1
    [running] = running_imports(tmp_path)
    assert (running.pid, running.phase, running.counts["scanned"]) == (os.getpid(), "delivering", 4)
    record.remove()
    assert _files(tmp_path) == []
    assert running_imports(tmp_path) == []
    record.update(counts)  # after the end: nothing written again
    assert _files(tmp_path) == []


def test_the_file_goes_when_the_import_fails_or_is_interrupted(tmp_path: Path) -> None:
    for error in (KeyboardInterrupt(), OSError("disk gone")):
        counts = Counts(files=3)
        progress = Recorded(Lines(io.StringIO()), tmp_path, counts)
        with pytest.raises(type(error)), progress:
            progress.show(counts)
            assert len(running_imports(tmp_path)) == 1
            raise error
        assert _files(tmp_path) == []


def test_an_import_that_cannot_record_its_progress_goes_on_and_says_so(tmp_path: Path) -> None:
    (tmp_path / IMPORTS_DIR).write_text("not a folder")
    counts = Counts(files=3)
    with capture_logs() as logged, Recorded(Lines(io.StringIO()), tmp_path, counts) as progress:
        progress.show(counts)
    assert [event["event"] for event in logged] == ["import.progress_unrecorded"]
    assert str(tmp_path) not in str(logged)
    assert running_imports(tmp_path) == []


def test_a_killed_import_leaves_a_file_the_reader_ignores_and_removes(tmp_path: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "started"
            [running] = running_imports(tmp_path)
            assert (running.pid, running.counts["scanned"], running.counts["files"]) == (child.pid, 3, 7)
            assert _files(tmp_path) == [f"{child.pid}.json", f"{child.pid}.lock"]
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
    assert _files(tmp_path) == [f"{child.pid}.json", f"{child.pid}.lock"]  # kill -9: nothing removed it
    assert running_imports(tmp_path) == []  # its lock is free: ignored...
    assert _files(tmp_path) == []  # ...and removed


def test_ingestd_status_lists_an_import_under_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    state = spooled_state(tmp_path)
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(state.config.state_dir)], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline().strip() == "started"
            text = run_ingestd("status", "--config", str(state.config_file), check=True).stdout
            shown = run_ingestd("status", "--config", str(state.config_file), "--json", check=True).stdout
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
    assert f"import under way (pid {child.pid}, " in text
    assert "scanning): files 3/7 scanned, 0 instances spooled" in text
    [running] = json.loads(shown)["health"]["imports"]
    assert (running["pid"], running["phase"], running["counts"]["files"]) == (child.pid, "scanning", 7)
    text = run_ingestd("status", "--config", str(state.config_file), check=True).stdout
    assert "import under way" not in text  # killed: ignored, and its file removed
    assert _files(state.config.state_dir) == []


def test_a_file_whose_pid_is_alive_but_whose_lock_is_free_is_not_an_import(tmp_path: Path) -> None:
    """After a restart the pid may be another process's: the lock decides, not the pid."""
    folder = tmp_path / IMPORTS_DIR
    folder.mkdir()
    record = {"pid": os.getpid(), "started": time.time(), "updated": time.time(), "phase": "scanning", "counts": {}}
    (folder / f"{os.getpid()}.json").write_text(json.dumps(record))
    (folder / f"{os.getpid()}.lock").write_bytes(b"")
    assert running_imports(tmp_path) == []
    assert _files(tmp_path) == []
    (folder / "123.json").write_text("{not json")  # garbage, and no lock: removed too
    (folder / "notes.json").write_text("{}")  # not a pid: left alone, not shown
    assert running_imports(tmp_path) == []
    assert _files(tmp_path) == ["notes.json"]


def _write_config(tmp_path: Path, url: str) -> Path:
    """tests.test_import's daemon, with these rules (any MR) and the page open to loopback."""
    return write_config(
        tmp_path, url, rules=RULES, extra="metrics: {host: 127.0.0.1, port: 0}\nui: {public_read: true}\n"
    )


def _make_tree(root: Path, studies: int, per_series: int) -> Path:
    """`tree/<a patient's name>/<study n>/IM*.dcm`: several studies in a folder named after the patient."""
    tree = root / "tree"
    for number in range(studies):
        write_instances(make_study(series=2, per_series=per_series), tree / PATIENT_FOLDER / f"study{number}")
    return tree


_ROW = re.compile(
    r'<tr class="import" data-pid="(\d+)">.*?<td>(scanning|delivering)</td>\s*<td class="scanned">(\d+)/(\d+)</td>'
    r'<td class="spooled">(\d+)</td>.*?<td class="studies">(\d+)</td><td class="delivered">(\d+)</td>',
    re.DOTALL,
)


@pytest.mark.slow
def test_a_real_import_shows_on_the_daemons_overview_with_growing_counts_then_goes(
    tmp_path: Path, xnat: FakeXnat
) -> None:
    config = _write_config(tmp_path, xnat.url)
    tree = _make_tree(tmp_path, studies=8, per_series=40)
    state = tmp_path / "state"
    seen: list[tuple[str, ...]] = []
    fragments: list[str] = []
    files: list[str] = []
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        base = f"http://127.0.0.1:{int(daemon.wait_logged('metrics.started')['port'])}"
        started = time.monotonic()
        with subprocess.Popen(
            [sys.executable, "-m", "ingestd", "import", "--config", str(config), str(tree)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        ) as importing:
            while importing.poll() is None and time.monotonic() - started < 120:
                fragment = requests.get(f"{base}/ui/fragments/overview", timeout=10).text
                for match in _ROW.finditer(fragment):
                    fragments.append(fragment)
                    if not seen or seen[-1] != match.groups():
                        seen.append(match.groups())
                for path in (state / IMPORTS_DIR).glob("*.json"):
                    with contextlib.suppress(FileNotFoundError):  # the import replaced or removed it meanwhile
                        files.append(path.read_text())
                time.sleep(0.2)
            out, err = importing.communicate(timeout=60)
        assert importing.returncode == 0, out + err + daemon.log_tail()
        elapsed = time.monotonic() - started
        after = requests.get(f"{base}/ui/fragments/overview", timeout=10).text
        page = requests.get(f"{base}/ui/", timeout=10).text
        assert daemon.terminate() == 0
    print(f"import of 640 files, 8 studies took {elapsed:.1f} s; {len(seen)} distinct snapshots: {seen}")
    assert len(seen) >= 2, seen  # the counts grew while the page watched
    assert {groups[0] for groups in seen} == {str(importing.pid)}
    progress = [tuple(int(value) for value in (groups[2], groups[4], groups[5], groups[6])) for groups in seen]
    assert all(min(b - a for a, b in zip(earlier, later, strict=True)) >= 0 for earlier, later in pairwise(progress))
    assert progress[-1] > progress[0]
    assert {groups[3] for groups in seen} == {"640"}
    assert 'data-pid="' not in after and "No <code>ingestd import</code> under way." in after
    assert "No <code>ingestd import</code> under way." in page
    assert _files(state) == []  # removed by the import itself
    shown = "\n".join(fragments + files)
    for value in (PATIENT_FOLDER, PATIENT_ID, "Synthetic", str(tree), "study0", "IM0000"):
        assert value not in shown, value


@pytest.mark.slow
def test_a_real_import_killed_outright_is_ignored_and_its_file_removed(tmp_path: Path, xnat: FakeXnat) -> None:
    config = _write_config(tmp_path, xnat.url)
    tree = _make_tree(tmp_path, studies=4, per_series=40)
    state = tmp_path / "state"
    with subprocess.Popen(
        [sys.executable, "-m", "ingestd", "import", "--config", str(config), str(tree)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    ) as importing:
        try:
            wait_until(lambda: running_imports(state), 60, interval=0.05, message="the import's progress file")
        finally:
            importing.send_signal(signal.SIGKILL)
            importing.wait(timeout=30)
    assert f"{importing.pid}.json" in _files(state)
    assert running_imports(state) == []
    assert _files(state) == []
