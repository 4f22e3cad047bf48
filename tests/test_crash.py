"""Crash safety: kill -9 the daemon in the middle of a storescu transfer, restart it, lose nothing acknowledged.

The daemon runs as a real subprocess (`python -m ingestd run`) and DCMTK's storescu sends a study to it.
storescu sends one instance at a time and waits for each response, so when the daemon is killed the
instances it acknowledged are a prefix of the study, and at most the one instance after them can have
been stored without its acknowledgement getting through. After a restart (start-up recovery) every
acknowledged instance must be in the journal and the spool with its bytes intact, and no temp file may
remain. Sending the whole study again must then leave every instance in the journal exactly once.

Most cases run the daemon as configured by default, one process. Two run it with a receiver process beside
its main process (listener.processes: 2): a crash kills its whole process group, so that the process
serving storescu's association dies whichever it is; the other kills the main process only, and its
receiver must then stop by itself before the restart recovers.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.dicom import make_instance, write_instances
from tests.procs import (
    DaemonProcess,
    Storescu,
    free_port,
    ingestd_status,
    process_group,
    tail,
    wait_until,
    write_daemon_config,
)

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow, pytest.mark.usefixtures("dcmtk")]

SERIES = 4
PER_SERIES = 40
INSTANCES = SERIES * PER_SERIES


@dataclass(frozen=True, slots=True)
class Original:
    """One instance of the generated study as a file: its path, SOP Instance UID and data set bytes."""

    path: Path
    study_uid: str
    series_uid: str
    sop_uid: str
    data_set: bytes


@dataclass(frozen=True, slots=True)
class KillPoint:
    """When to kill the daemon, once `acknowledged` instances were acknowledged.

    `ack`: at once. `temp`: as soon as a temp file shows in the spool (the next instance is being
    written). `renamed`: as soon as the next instance's spool file shows (renamed into place, its
    journal row perhaps not yet committed). `random`: a random number of acknowledgements (at least
    one), then a random delay within about the time one store takes.

    With `processes` 2 the daemon has a receiver process, killed with it (a crash of the service), except
    with `group` false: then only the main process is killed and the receiver must stop by itself.
    """

    name: str
    mode: Literal["ack", "temp", "renamed", "random"]
    acknowledged: int = 1
    group: bool = True  # kill the daemon's whole process group (its receivers too), or its main process only
    processes: int = 1  # listener.processes

    def __str__(self) -> str:
        return self.name


KILL_POINTS = [
    KillPoint("after-first-ack", "ack", 1),
    KillPoint("after-25pct-acks", "ack", INSTANCES // 4),
    KillPoint("after-60pct-acks", "ack", INSTANCES * 6 // 10),
    KillPoint("temp-file-written", "temp", INSTANCES * 4 // 10),
    KillPoint("spool-file-renamed", "renamed", INSTANCES * 3 // 4),
    KillPoint("random", "random"),
    KillPoint("two-processes", "ack", INSTANCES // 3, processes=2),
    KillPoint("main-process-only", "ack", INSTANCES // 4, group=False, processes=2),
]


def _data_set(data: bytes) -> bytes:
    """The bytes after the preamble and file meta of a Part 10 file (explicit VR little endian meta)."""
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00" and data[136:138] == b"UL"
    return data[144 + int.from_bytes(data[140:144], "little") :]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Original]:
    """A study of 4 series x 40 instances, 64x64 and 128x128 16-bit, each with its own pixel fill."""
    study_uid = generate_uid()
    datasets = []
    for series in range(SERIES):
        series_uid = generate_uid()
        for index in range(PER_SERIES):
            ds = make_instance(
                study_uid, series_uid, number=index + 1, rows=64 if series % 2 == 0 else 128, fill=series * 53
            )
            ds.SeriesNumber = series + 1
            datasets.append(ds)
    paths = write_instances(datasets, tmp_path_factory.mktemp("study"))
    return [
        Original(path, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, _data_set(path.read_bytes()))
        for path, ds in zip(paths, datasets, strict=True)
    ]


@pytest.fixture
def seed() -> int:
    """The seed of the random kill moment; set INGESTD_CRASH_SEED to replay a failure."""
    return int(os.environ.get("INGESTD_CRASH_SEED") or random.SystemRandom().randrange(2**32))


def _journal(state_dir: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(f"file:{state_dir / 'journal.sqlite'}?mode=ro", uri=True))


def _instances(state_dir: Path) -> list[tuple[str, str, int]]:
    with _journal(state_dir) as db:
        return db.execute("SELECT sop_uid, spool_path, data_offset FROM instances ORDER BY id").fetchall()


def _receipts(state_dir: Path) -> list[tuple[str, str]]:
    with _journal(state_dir) as db:
        return db.execute("SELECT sop_uid, outcome FROM receipts ORDER BY id").fetchall()


def _quarantined(state_dir: Path) -> list[tuple[str, str]]:
    with _journal(state_dir) as db:
        return db.execute("SELECT path, reason FROM quarantine").fetchall()


def _temp_files(state_dir: Path) -> list[str]:
    tmp = state_dir / "spool" / ".tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


def _spool_files(state_dir: Path) -> set[str]:
    spool = state_dir / "spool"
    return {p.relative_to(spool).as_posix() for p in spool.glob("*/*/*/*.dcm")}


def _serving(daemon: DaemonProcess, port: int) -> list[str]:
    """Which of the daemon's processes hold an established connection on `port` (Linux /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            inodes.add(f"socket:[{fields[9]}]")
    serving = []
    for pid in process_group(daemon.pid):
        try:
            if any(str(fd.readlink()) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir()):
                serving.append("main" if pid == daemon.pid else f"receiver {pid}")
        except OSError:  # gone meanwhile
            continue
    return serving


def _check_spool(
    state_dir: Path, by_sop: dict[str, Original], must_hold: list[Original], context: str
) -> list[tuple[str, str, int]]:
    """Check the journal against the spool, and that `must_hold` are stored intact; return the rows."""
    spool = state_dir / "spool"
    rows = _instances(state_dir)
    assert not _temp_files(state_dir), f"temp files left in the spool: {_temp_files(state_dir)}\n{context}"
    assert not _quarantined(state_dir), f"something was quarantined: {_quarantined(state_dir)}\n{context}"
    journaled = {path for _sop, path, _offset in rows}
    on_disk = _spool_files(state_dir)
    assert journaled <= on_disk, f"journal rows without a spool file: {sorted(journaled - on_disk)}\n{context}"
    assert on_disk <= journaled, f"spool files without a journal row: {sorted(on_disk - journaled)}\n{context}"
    row_of = {sop: (path, offset) for sop, path, offset in rows}
    missing = [o.path.name for o in must_hold if o.sop_uid not in row_of]
    assert not missing, f"acknowledged instances missing from the journal: {missing}\n{context}"
    for original in must_hold:
        path, offset = row_of[original.sop_uid]
        stored = (spool / path).read_bytes()
        assert stored[offset:] == original.data_set, f"{original.path.name}: spooled bytes differ\n{context}"
        assert _data_set(stored) == original.data_set, f"{original.path.name}: data_offset is wrong\n{context}"
        ds = pydicom.dcmread(spool / path)
        assert ds.SOPInstanceUID == original.sop_uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == original.sop_uid
    unknown = [sop for sop in row_of if sop not in by_sop]
    assert not unknown, f"journal rows for instances never sent: {unknown}\n{context}"
    return rows


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Processes registered here are killed and reaped when the test ends, however it ends."""
    with ExitStack() as processes:
        yield processes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("point", KILL_POINTS, ids=str)
def test_kill9_mid_transfer_loses_no_acknowledged_instance(
    tmp_path: Path, study: list[Original], point: KillPoint, seed: int, stack: ExitStack
) -> None:
    state_dir = tmp_path / "state"
    log_path = tmp_path / "ingestd.log"
    config = tmp_path / "ingestd.yaml"
    files = [o.path for o in study]
    by_sop = {o.sop_uid: o for o in study}
    started = time.monotonic()

    # 1. Run the daemon, send the study, and kill -9 the daemon in the middle of the transfer.
    port = free_port()
    write_daemon_config(config, state_dir, port, processes=point.processes)
    first = stack.enter_context(DaemonProcess(config, log_path))
    first.wait_ready(port)
    first.wait_logged("daemon.started")  # its receiver processes are up too
    scu = stack.enter_context(Storescu(port, files))
    assert scu.wait_output("Association Accepted"), scu.output()
    serving = _serving(first, port)
    target, jitter = point.acknowledged, 0.0
    if point.mode == "random":
        rng = random.Random(seed)
        target = rng.randint(1, INSTANCES - 20)
        scu.wait_acknowledged(1)
        t_first = time.monotonic()
        scu.wait_acknowledged(target)
        per_instance = (time.monotonic() - t_first) / max(1, target - 1)
        jitter = rng.uniform(0, 1.5 * per_instance)
        time.sleep(jitter)
    else:
        scu.wait_acknowledged(target)
    if point.mode == "temp":
        tmp = state_dir / "spool" / ".tmp"
        wait_until(lambda: any(tmp.iterdir()), 10, interval=0, message="a temp file in the spool")
    elif point.mode == "renamed":
        following = study[target]
        spooled = state_dir / "spool" / following.study_uid / "1" / following.series_uid / f"{following.sop_uid}.dcm"
        wait_until(spooled.exists, 10, interval=0, message=f"{spooled.name} in the spool")
    # Receivers left alone stop gracefully: up to 10 s for open associations, then 30 s for stores in flight.
    killed_status = first.kill9(group=point.group, timeout=30 if point.group else 60)
    scu_status = scu.wait()
    killed_at = time.monotonic()
    acknowledged = list(scu.acknowledged)
    sent = list(scu.sent)

    def context() -> str:
        return (
            f"kill point {point} (after {target} acknowledgements + {jitter * 1000:.1f} ms, seed {seed}); "
            f"storescu exit {scu_status}, sent {len(sent)}, acknowledged {len(acknowledged)}, served by {serving}\n"
            f"--- storescu output (tail):\n{scu.output(15)}\n--- ingestd log (tail):\n{tail(log_path, 40)}"
        )

    assert killed_status == -9, context()
    assert target <= len(acknowledged), context()
    if point.group:
        assert scu_status != 0, f"storescu did not notice the daemon dying\n{context()}"
        assert len(acknowledged) < INSTANCES, f"the kill did not land mid-transfer\n{context()}"
    # else: if storescu's association went to a receiver process, that one stops gracefully and may finish it.
    assert sent == files[: len(sent)], f"storescu did not send the files in order\n{context()}"
    assert acknowledged == files[: len(acknowledged)], f"acknowledgements are not a prefix\n{context()}"
    assert len(sent) <= len(acknowledged) + 1, f"storescu had several stores in flight\n{context()}"
    # What the crash left: temp files, and spool files renamed into place without a committed row.
    temp_at_crash = _temp_files(state_dir)
    orphans_at_crash = _spool_files(state_dir) - {path for _sop, path, _offset in _instances(state_dir)}

    # 2. Restart on the same state directory: start-up recovery runs before the listener answers.
    port = free_port()
    write_daemon_config(config, state_dir, port)
    second = stack.enter_context(DaemonProcess(config, log_path))
    second.wait_ready(port)
    second.wait_logged("daemon.started")
    recovered_at = time.monotonic()
    recovery = second.logged("spool.recovered")
    assert len(recovery) == 1, f"expected one spool_recovered event\n{context()}"

    removed, adopted = recovery[0].get("temp_files_removed"), recovery[0].get("instances_adopted")
    assert removed == len(temp_at_crash), f"temp files at crash {temp_at_crash}, removed {removed}\n{context()}"
    assert adopted == len(orphans_at_crash), f"orphans at crash {orphans_at_crash}, adopted {adopted}\n{context()}"

    acked = study[: len(acknowledged)]
    rows = _check_spool(state_dir, by_sop, acked, context())
    # Nothing acknowledged is lost, and nothing beyond the one instance that may have been in flight is there.
    may_hold = {o.sop_uid for o in study[: len(acknowledged) + 1]}
    beyond = [by_sop[sop].path.name for sop, _path, _offset in rows if sop not in may_hold]
    assert not beyond, f"instances stored beyond the one in flight: {beyond}\n{context()}"
    before_resend = {sop for sop, _path, _offset in rows}
    status = ingestd_status(config, show_uids=False)
    assert sum(s["instances"] for s in status["studies"]) == len(rows), f"{status}\n{context()}"

    # 3. Send the whole study again: what was stored is a duplicate, the rest is stored, each once.
    with Storescu(port, files) as resend:
        resend_status = resend.wait(timeout=60)
    assert resend_status == 0, f"resend failed\n{resend.output()}\n{context()}"
    assert resend.acknowledged == files, f"resend: not everything acknowledged\n{resend.output()}\n{context()}"
    resent_at = time.monotonic()

    rows = _check_spool(state_dir, by_sop, study, context())
    counts: dict[str, int] = {}
    for sop, _path, _offset in rows:
        counts[sop] = counts.get(sop, 0) + 1
    assert counts == dict.fromkeys(by_sop, 1), f"not every instance exactly once in the journal\n{context()}"
    receipts = _receipts(state_dir)
    duplicates = [sop for sop, outcome in receipts if outcome == "duplicate"]
    assert sorted(duplicates) == sorted(before_resend), f"duplicates are not what was stored\n{context()}"
    firsts = [sop for sop, outcome in receipts if outcome in ("stored", "adopted")]
    assert sorted(firsts) == sorted(by_sop), f"receipts: {sorted(set(o for _s, o in receipts))}\n{context()}"
    assert not [r for r in receipts if r[1] not in ("stored", "adopted", "duplicate")], context()
    status = ingestd_status(config, show_uids=False)
    assert [s["instances"] for s in status["studies"]] == [INSTANCES], f"{status}\n{context()}"
    assert status["quarantine"] == [], context()

    # 4. Stop gracefully; the journal and the spool still agree and no temp file is left.
    assert second.terminate() == 0, f"ingestd did not stop cleanly\n{context()}"
    _check_spool(state_dir, by_sop, study, context())
    status = ingestd_status(config, show_uids=False)
    assert [s["instances"] for s in status["studies"]] == [INSTANCES], f"{status}\n{context()}"

    log_text = log_path.read_text(encoding="utf-8", errors="replace")
    errors = [line for line in log_text.splitlines() if '"level": "error"' in line or '"level": "critical"' in line]
    assert not errors and "Traceback" not in log_text, f"ingestd logged errors: {errors}\n{context()}"
    adopted_receipts = [sop for sop, outcome in receipts if outcome == "adopted"]
    assert len(adopted_receipts) == len(orphans_at_crash), context()
    print(
        f"\n{point}: killed {'all processes' if point.group else 'the main process'} after "
        f"{len(acknowledged)}/{INSTANCES} acknowledged (target {target}, storescu's association on {serving}, "
        f"jitter {jitter * 1000:.1f} ms, seed {seed}); sent {len(sent)}; temp files at crash "
        f"{len(temp_at_crash)}, orphan spool files at crash {len(orphans_at_crash)}; recovery removed {removed}, "
        f"adopted {adopted}; "
        f"journal after restart {len(before_resend)}; crash phase {killed_at - started:.2f} s, "
        f"restart {recovered_at - killed_at:.2f} s, resend {resent_at - recovered_at:.2f} s, "
        f"total {time.monotonic() - started:.2f} s"
    )
