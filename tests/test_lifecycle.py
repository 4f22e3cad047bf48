"""Running as a lab service: a bounded graceful stop on SIGTERM, and a watchdog that a wedged worker silences.

- A worker whose check makes no progress for `wedged_worker_seconds` stops the WATCHDOG=1 pings (a real unix
  datagram socket stands in for systemd's), is logged as `daemon.worker_wedged`, and the daemon exits with
  status 1 within the stop deadline, abandoning the wedged thread.
- SIGTERM in the middle of a storescu transfer to `ingestd run`: the process exits 0 within
  `stop_timeout_seconds`, and every instance storescu saw acknowledged is in the journal and the spool.
- SIGTERM while XNAT takes longer than the deadline to answer an import: the process exits 0 in time, the
  journal still says `importing`, and after a restart XNAT is found to hold every instance (by SOP Instance UID)
  and the study is archived, not imported again: one experiment.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import threading
import time
import zipfile
from contextlib import closing
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from structlog.testing import capture_logs

from ingestd.config import Credentials, XnatServer, parse_config
from ingestd.daemon import Daemon
from ingestd.pipeline.assemble import Assembler
from ingestd.pipeline.deliver import wedge_limit
from ingestd.testing.xnat import FakeXnat
from ingestd.xnat import XnatClient
from tests.dicom import encode, make_instance, make_study, write_instances
from tests.procs import (
    DaemonProcess,
    Storescu,
    free_port,
    tail,
    wait_until,
    write_daemon_config,
    write_xnat_daemon_config,
)

_SLACK = 1.5  # seconds beyond the stop deadline for the process to be reaped and the test to notice


class _Listening:
    """Reads the notify socket in a thread, noting when each message arrived (time.monotonic())."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.messages: list[tuple[float, str]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def pings(self) -> list[float]:
        return [at for at, message in list(self.messages) if message.startswith("WATCHDOG=1")]

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)


def test_the_watchdog_pings_stop_when_a_worker_is_wedged(
    tmp_path: Path, notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The assembler's check blocks (as on a hung disk): pings flow until it counts as wedged, then none; the
    daemon logs where the thread is stuck, stops gracefully, abandons the wedged thread and returns 1."""
    sock, path = notify_socket
    sock.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    wedge, entered, release = threading.Event(), threading.Event(), threading.Event()
    entered_at: list[float] = []
    check = Assembler.check

    def blocking_check(self: Assembler, now: float | None = None) -> int:
        if wedge.is_set() and not release.is_set():
            entered_at.append(time.monotonic())
            entered.set()
            release.wait(60)
        return check(self, now)

    monkeypatch.setattr(Assembler, "check", blocking_check)
    detected_at: list[float] = []
    find_wedged = Daemon._wedged

    def noting_wedged(self: Daemon) -> list[str]:
        found = find_wedged(self)
        if found and not detected_at:
            detected_at.append(time.monotonic())
        return found

    monkeypatch.setattr(Daemon, "_wedged", noting_wedged)
    config = parse_config(
        f"state_dir: {tmp_path / 'state'}\n"
        "listener: {enabled: false}\n"
        "spool: {min_free_mb: 0}\n"
        "metrics: {port: 0}\n"
        "wedged_worker_seconds: 1\n"
        "stop_timeout_seconds: 3\n"
    )
    daemon = Daemon(config)
    listening = _Listening(sock)

    def wedge_after_two_pings() -> None:
        wait_until(lambda: len(listening.pings()) >= 2, 20, message="two watchdog pings")
        wedge.set()

    helper = threading.Thread(target=wedge_after_two_pings, daemon=True)
    helper.start()
    try:
        with capture_logs() as logged:
            status = daemon.run()  # in this thread: it installs the signal handlers
        returned_at = time.monotonic()
    finally:
        release.set()
        helper.join(5)
        listening.close()
    assert status == 1
    assert entered.is_set() and detected_at, "the assembler never wedged, or the daemon never noticed"
    wedged = [record for record in logged if record["event"] == "daemon.worker_wedged"]
    assert wedged and wedged[0]["worker"] == "assembler" and wedged[0]["seconds"] >= 1.0
    assert any("blocking_check" in frame for frame in wedged[0]["stack"]), wedged[0]["stack"]
    # Pings before the wedge was noticed; not one after (they come every 0.2 s, so one would have shown).
    pings = listening.pings()
    assert len(pings) >= 2 and pings[0] < entered_at[0]
    assert max(pings) < detected_at[0] + 0.1, (max(pings) - detected_at[0], listening.messages)
    assert listening.messages[-1][1] == "STOPPING=1\nSTATUS=stopping"
    # The graceful stop gave up on the wedged thread at the deadline, and only on it.
    assert returned_at - detected_at[0] <= config.stop_timeout_seconds + 0.5
    assert daemon.abandoned == ["assembler"]
    assert next(r for r in logged if r["event"] == "daemon.stop_abandoned")["services"] == ["assembler"]
    assert daemon.journal is not None  # left open under the abandoned thread; a stop after it ended closes it
    wait_until(lambda: not daemon._assembler or not daemon._assembler.alive(), 10, message="the assembler to end")
    daemon.stop(timeout=5)
    assert daemon.journal is None and daemon.abandoned == []


def test_the_deliverers_wedge_limit_outlasts_its_longest_xnat_wait(tmp_path: Path) -> None:
    """An archive request may wait archive_timeout_seconds for XNAT's answer without a sign of life: the
    deliverer counts as wedged only well after that, whatever wedged_worker_seconds says."""
    base = (
        f"state_dir: {tmp_path}\nwedged_worker_seconds: 60\nxnat:\n  servers:\n    main:\n"
        "      url: https://xnat.example.org\n      credentials: {env_username: U, env_password: P}\n"
    )
    assert wedge_limit(parse_config(base)) == 10 + 900 + 120  # connect + archive timeouts + margin
    slower = base + "      archive_timeout_seconds: 3600\n"
    assert wedge_limit(parse_config(slower)) == 10 + 3600 + 120
    assert wedge_limit(parse_config(f"state_dir: {tmp_path}\nwedged_worker_seconds: 60\n")) == 60


def test_an_upload_reports_progress_block_by_block(tmp_path: Path, xnat: FakeXnat) -> None:
    """A long upload is not a wedge: the client reports progress on every 1 MiB block it sends."""
    study_uid, series_uid = generate_uid(), generate_uid()
    package = tmp_path / "study.zip"
    with zipfile.ZipFile(package, "w") as archive:
        for number in range(1, 7):  # 6 x 512 KiB of pixels
            ds = make_instance(study_uid, series_uid, number=number, rows=512)
            archive.writestr(f"{series_uid}/{ds.SOPInstanceUID}.dcm", encode(ds))
    server = XnatServer(
        url=xnat.url, credentials=Credentials(env_username="XNAT_TEST_USER", env_password="XNAT_TEST_PASSWORD")
    )
    beats: list[float] = []
    client = XnatClient("main", server, progress=lambda: beats.append(time.monotonic()))
    try:
        assert len(client.import_zip(package, "PROJ", "SUBJ", "SESS_MR")) == 1
    finally:
        client.close()
    blocks = package.stat().st_size // 2**20
    assert blocks >= 3 and len(beats) >= blocks + 2  # the request and its login, then every block read


# -- SIGTERM to `ingestd run` ------------------------------------------------------------------------------


def _journal(state_dir: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(f"file:{state_dir / 'journal.sqlite'}?mode=ro", uri=True))


def _sigterm_and_wait(daemon: DaemonProcess, deadline: float) -> tuple[int, float]:
    """SIGTERM the daemon; return its exit status and how many seconds it took to exit (fails past the slack)."""
    assert daemon.process is not None
    sent = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    try:
        code = daemon.process.wait(timeout=deadline + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ingestd still runs {deadline + 30} s after SIGTERM\n{daemon.log_tail()}")
    took = time.monotonic() - sent
    daemon.wait_group_gone(10)  # its receiver processes too
    return code, took


@pytest.mark.usefixtures("dcmtk")
@pytest.mark.slow
def test_sigterm_during_a_transfer_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    """storescu sends 1000 instances; SIGTERM after the first 50 acknowledgements. The daemon stops taking
    associations, lets the open one go on for its grace period (a third of the deadline), then aborts it (on
    a machine fast enough to finish within that second, storescu finishes instead), and exits 0 in time."""
    deadline = 3.0
    study_uid = generate_uid()
    datasets = []
    for series in range(10):
        series_uid = generate_uid()
        for number in range(1, 101):
            ds = make_instance(study_uid, series_uid, number=number, rows=128, fill=series * 31)
            ds.SeriesNumber = series + 1
            datasets.append(ds)
    files = write_instances(datasets, tmp_path / "study")
    sop_of = {path: ds.SOPInstanceUID for path, ds in zip(files, datasets, strict=True)}
    state_dir = tmp_path / "state"
    port = free_port()
    config = write_daemon_config(
        tmp_path / "ingestd.yaml", state_dir, port, extra=f"stop_timeout_seconds: {deadline}\n"
    )
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        daemon.wait_logged("daemon.started")  # the receiver processes are up too
        with Storescu(port, files) as storescu:
            storescu.wait_acknowledged(50)
            code, took = _sigterm_and_wait(daemon, deadline)
            storescu.wait(timeout=30)
            acknowledged, sent = list(storescu.acknowledged), list(storescu.sent)
        context = (
            f"exit {code} after {took:.2f} s; storescu sent {len(sent)}, acknowledged {len(acknowledged)}\n"
            f"--- storescu:\n{storescu.output(10)}\n--- ingestd:\n{tail(tmp_path / 'daemon.log', 30)}"
        )
        assert code == 0, context
        assert took <= deadline + _SLACK, context
        assert daemon.logged("daemon.stopped") and not daemon.logged("daemon.stop_abandoned"), context

    assert acknowledged == files[: len(acknowledged)] and len(sent) <= len(acknowledged) + 1, context
    with _journal(state_dir) as db:
        rows = dict(db.execute("SELECT sop_uid, spool_path FROM instances").fetchall())
        quarantined = db.execute("SELECT path, reason FROM quarantine").fetchall()
    missing = [path.name for path in acknowledged if sop_of[path] not in rows]
    assert not missing, f"acknowledged but not in the journal: {missing}\n{context}"
    assert set(rows) <= {sop_of[path] for path in sent}, context
    spool = state_dir / "spool"
    on_disk = {p.relative_to(spool).as_posix() for p in spool.glob("*/*/*/*.dcm")}
    assert set(rows.values()) == on_disk, f"the journal and the spool disagree\n{context}"
    for path in acknowledged:
        stored = pydicom.dcmread(spool / rows[sop_of[path]])
        assert stored.SOPInstanceUID == sop_of[path]
        assert stored.PixelData == pydicom.dcmread(path).PixelData
    temp = spool / ".tmp"
    assert not (temp.is_dir() and any(temp.iterdir())), f"temp files left in the spool\n{context}"
    assert not quarantined, context
    print(
        f"\nSIGTERM after {len(acknowledged)} of {len(files)} acknowledged "
        f"({'transfer finished in the grace period' if len(acknowledged) == len(files) else 'association aborted'}); "
        f"exit {code} in {took:.2f} s (deadline {deadline} s)"
    )


def _xnat_config(tmp_path: Path, port: int, url: str, deadline: float) -> Path:
    return write_xnat_daemon_config(tmp_path, port, url, extra=f"stop_timeout_seconds: {deadline}\n")


def _delivery(state_dir: Path) -> dict[str, Any] | None:
    with _journal(state_dir) as db:
        db.row_factory = sqlite3.Row
        row = db.execute(
            "SELECT d.step, b.state FROM deliveries d JOIN batches b ON b.id = d.batch_id ORDER BY d.batch_id"
        ).fetchone()
    return dict(row) if row is not None else None


@pytest.mark.usefixtures("dcmtk")
@pytest.mark.slow
def test_sigterm_during_a_slow_import_exits_in_time_and_delivers_once(tmp_path: Path, xnat: FakeXnat) -> None:
    """XNAT stores the upload but answers it only after 60 s; SIGTERM meanwhile. The daemon abandons the
    import at the deadline and exits 0; restarted, it finds the session in the prearchive and adopts it."""
    deadline = 4.0
    state_dir = tmp_path / "state"
    port = free_port()
    config = _xnat_config(tmp_path, port, xnat.url, deadline)
    study = make_study(series=2, per_series=3)
    for ds in study:  # XNAT files scans by series number
        ds.SeriesNumber = 1 if ds.SeriesInstanceUID == study[0].SeriesInstanceUID else 2
    files = write_instances(study, tmp_path / "scan")
    xnat.fail_next("POST", "/data/services/import", status=504, after_processing=True, delay=60)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        with Storescu(port, files) as storescu:
            assert storescu.wait() == 0, storescu.output()

        def importing() -> bool:
            delivery = _delivery(state_dir)
            return bool(xnat.prearchive_rows("PROJ")) and delivery is not None and delivery["step"] == "importing"

        wait_until(importing, 60, interval=0.1, message="XNAT to hold the upload it has not answered yet")
        code, took = _sigterm_and_wait(daemon, deadline)
        context = f"exit {code} after {took:.2f} s\n{daemon.log_tail(30)}"
        assert code == 0, context
        assert took <= deadline + _SLACK, context
        abandoned = daemon.logged("deliver.step_abandoned")
        assert abandoned and abandoned[0]["step"] == "import", context
        assert daemon.logged("daemon.stop_abandoned")[0]["services"] == ["deliverer"], context
        assert _delivery(state_dir) == {"step": "importing", "state": "routed"}

        daemon.start()
        daemon.wait_ready(port)
        wait_until(
            lambda: (_delivery(state_dir) or {}).get("state") == "delivered", 60, interval=0.2, message="delivery"
        )
        verified = daemon.logged("deliver.verified")
        imported = daemon.logged("deliver.imported")
        assert daemon.terminate(timeout=deadline + _SLACK) == 0
    assert verified and (verified[0]["in_prearchive"], verified[0]["missing"]) == (len(files), 0) and not imported
    (experiment,) = xnat.experiments("PROJ")
    assert sum(len(scan.files) for scan in experiment.scans.values()) == len(files)
    assert not xnat.prearchive_rows()
    print(f"\nSIGTERM with an import in flight: exit {code} in {took:.2f} s (deadline {deadline} s)")
