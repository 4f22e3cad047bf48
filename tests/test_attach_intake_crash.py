"""Attachments survive kill -9 at any point of their way in, and a large one is never held in memory whole.

A process of its own runs the real watcher over a real drop folder and state directory, with recovery first as
the daemon does at start, and kills itself (SIGKILL) at a chosen point: while a copy is written, once it is
renamed into place but not journaled, once it is journaled but the drop file not yet removed. After a run to the
end, every file is in the journal exactly once, with its bytes, and `attachments/` holds nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.attaching import digests, kept_files, spool_files

ROOT = Path(__file__).resolve().parent.parent

TAKER = r"""
import json, os, resource, signal, sys
from pathlib import Path

import ingestd.attachspool as attachspool
from ingestd.config import Archives, DropFolder
from ingestd.journal import Journal
from ingestd.receive.watcher import DropFolderWatcher
from ingestd.rules.attach import attachable
from ingestd.spool import Quarantine, Spool
from tests.attaching import attach_rules

state, drop, point = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rules = attach_rules(state.parent, "*/*/qBOLD/**", "*/*/*.REC")
journal = Journal(state / "journal.sqlite")
spool, quarantine = Spool(state / "spool", journal), Quarantine(state / "quarantine", journal)
attachments = attachspool.AttachmentSpool(state, journal)
attachments.recover()
spool.recover(quarantine)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "copying":  # a piece or two into the second file's copy
    written, calls = attachspool._written, []

    def _written(fd, piece, *, sync=False):
        calls.append(1)
        if len(calls) == 5:
            die()
        written(fd, piece, sync=sync)

    attachspool._written = _written
elif point == "copied":  # renamed into place, not journaled
    attachspool.store_file = lambda *args, **kwargs: die()
elif point == "journaled":  # journaled, the drop file not removed
    store_file = attachspool.store_file

    def _journaled(*args, **kwargs):
        store_file(*args, **kwargs)
        die()

    attachspool.store_file = _journaled

watcher = DropFolderWatcher(
    DropFolder(path=drop, settle_seconds=0), Archives(), spool, quarantine,
    attachable=lambda relative: attachable(rules, relative), attachments=attachments,
)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(6):
    watcher.scan_once()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
journal.close()
print(json.dumps({"rss_growth_kb": after - before}))
"""


def take(state: Path, drop: Path, point: str = "none") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", TAKER, str(state), str(drop), point],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def files(drop: Path) -> dict[str, bytes]:
    made = {
        "sub01/ses01/qBOLD/a.nii": os.urandom(3 * 1024 * 1024),  # four pieces: a kill mid-copy has a part file
        "sub01/ses01/qBOLD/b.nii": os.urandom(3 * 1024 * 1024),
        "sub01/ses01/scan.REC": os.urandom(1000),
    }
    for relative, data in made.items():
        (drop / relative).parent.mkdir(parents=True, exist_ok=True)
        (drop / relative).write_bytes(data)
    return made


@pytest.mark.parametrize("point", ["copying", "copied", "journaled"])
def test_kill_9_on_the_way_in_then_restart_keeps_every_file_exactly_once(tmp_path: Path, point: str) -> None:
    state, drop = tmp_path / "state", tmp_path / "drop"
    state.mkdir()
    drop.mkdir()
    made = files(drop)
    killed = take(state, drop, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert any(drop.rglob("*.nii"))  # what was not journaled is still in the drop folder
    left = spool_files(state)
    if point == "copying":
        assert any(path.startswith("attachments/.tmp/") for path in left)
    if point == "copied":
        assert left - {row.spool_path for row in kept_files(state / "journal.sqlite").values()}  # an orphan

    finished = take(state, drop)
    assert finished.returncode == 0, finished.stderr
    assert not any(path.is_file() for path in drop.rglob("*"))
    kept = kept_files(state / "journal.sqlite")
    assert set(kept) == set(made)  # each once: `relative` is unique within the set, and there is one set
    assert len({row.batch_id for row in kept.values()}) == 1
    for relative, data in made.items():
        assert (kept[relative].sha256, kept[relative].md5) == digests(data)
        assert (state / kept[relative].spool_path).read_bytes() == data
    assert spool_files(state) == {row.spool_path for row in kept.values()}  # no orphan, no temp file


def test_a_200_mb_file_is_attached_without_holding_it_in_memory(tmp_path: Path) -> None:
    state, drop = tmp_path / "state", tmp_path / "drop"
    state.mkdir()
    (drop / "sub01/ses01").mkdir(parents=True)
    size = 200 * 1024 * 1024
    head, tail = b"PHILIPS REC export, not DICOM\n" * 10, os.urandom(4096)
    with (drop / "sub01/ses01/scan.REC").open("wb") as out:  # sparse in the middle
        out.write(head)
        out.seek(size - len(tail))
        out.write(tail)
    expected = hashlib.sha256(head)
    zeros = bytes(1024 * 1024)
    remaining = size - len(head) - len(tail)
    while remaining:
        piece = zeros[: min(remaining, len(zeros))]
        expected.update(piece)
        remaining -= len(piece)
    expected.update(tail)

    finished = take(state, drop)
    assert finished.returncode == 0, finished.stderr
    growth = json.loads(finished.stdout.strip().splitlines()[-1])["rss_growth_kb"]
    assert growth < 40 * 1024, f"peak RSS grew by {growth} kB while attaching a {size // 2**20} MB file"
    [row] = kept_files(state / "journal.sqlite").values()
    assert (row.relative, row.size, row.sha256) == ("sub01/ses01/scan.REC", size, expected.hexdigest())
    assert (state / row.spool_path).stat().st_size == size
    assert not (drop / "sub01/ses01/scan.REC").exists()
