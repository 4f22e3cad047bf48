"""A folder 1,200 levels deep in a drop folder: the daemon starts, the listener answers, other files are taken.

`os.walk` (Python 3.11) and both of watchdog's observers walk a tree recursively: such a folder raised
RecursionError out of every scan and out of `Daemon.start`. Real daemon processes; the deep trees are made and
removed level by level through folder descriptors (`shutil.rmtree` would recurse too).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ingestd.walk import walk
from tests.dicom import make_study, write_instances
from tests.procs import DaemonProcess, echo_ok, free_port, journal_rows, wait_until, write_daemon_config

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.slow]

LEVELS = 1200


def make_deep(top: Path, levels: int = LEVELS) -> None:
    """`top`/d/d/.../d, `levels` folders below `top` (which is created), with a file at the bottom."""
    top.mkdir()
    current = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=current)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
            os.close(current)
            current = below
        fd = os.open("bottom.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=current)
        os.close(fd)
    finally:
        os.close(current)


def remove_deep(top: Path) -> None:
    """Remove a tree of any depth made of folders with at most one subfolder each (as `make_deep` makes)."""
    if not top.exists():
        return
    chain = [os.open(top, os.O_RDONLY | os.O_DIRECTORY)]
    names: list[str] = []
    try:
        while True:
            subfolders = []
            with os.scandir(chain[-1]) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        subfolders.append(entry.name)
                    else:
                        os.unlink(entry.name, dir_fd=chain[-1])
            if not subfolders:
                break
            names.append(subfolders[0])
            chain.append(os.open(subfolders[0], os.O_RDONLY | os.O_DIRECTORY, dir_fd=chain[-1]))
        while names:
            os.close(chain.pop())
            os.rmdir(names.pop(), dir_fd=chain[-1])
    finally:
        for fd in chain:
            os.close(fd)
    top.rmdir()


@pytest.fixture
def deep(tmp_path: Path) -> Iterator[Path]:
    """Where a test makes its deep tree; removed afterwards, wherever it was moved to below `tmp_path`."""
    yield tmp_path / "deep"
    for candidate in (tmp_path / "deep", tmp_path / "drop" / "deep"):
        with contextlib.suppress(FileNotFoundError):
            remove_deep(candidate)


def _taken(state: Path) -> int:
    return len(journal_rows(state / "journal.sqlite", "SELECT sop_uid FROM instances"))


def _config(tmp_path: Path, port: int, *, polling: bool = False) -> Path:
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    folder = f"{{path: {drop}, settle_seconds: 0.2, polling: {str(polling).lower()}, poll_interval_seconds: 0.5}}"
    return write_daemon_config(tmp_path / "ingestd.yaml", tmp_path / "state", port, extra=f"drop_folders: [{folder}]\n")


def test_walk_is_iterative_and_bounded(deep: Path) -> None:
    make_deep(deep)
    too_deep: list[int] = []
    folders = [
        folder for folder, _subfolders, _files in walk(deep, max_depth=64, too_deep=lambda _f, d: too_deep.append(d))
    ]
    assert len(folders) == 65  # the top and 64 levels below it
    assert too_deep == [65]
    every = [files for _folder, _subfolders, files in walk(deep, max_depth=5000)]
    assert every[-1] == ["bottom.dcm"] and len(every) == LEVELS + 1


def test_deep_folder_present_at_start(tmp_path: Path, deep: Path) -> None:
    """The daemon starts with the tree in its drop folder: listener up, the other files taken, the folder logged."""
    port = free_port()
    config = _config(tmp_path, port)
    make_deep(deep)
    deep.rename(tmp_path / "drop" / "deep")
    write_instances(make_study(series=1, per_series=3), tmp_path / "drop" / "beside")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        assert daemon.logged("daemon.started")
        wait_until(lambda: _taken(tmp_path / "state") == 3, 30, message="the files beside the deep folder")
        logged = daemon.wait_logged("drop.folder_too_deep")
        assert logged["depth"] == 65 and logged["max_depth"] == 64
        assert echo_ok(port)
        assert daemon.terminate() == 0
        assert len(daemon.logged("drop.folder_too_deep")) == 1  # once while it lasts, not once per scan
        assert not daemon.logged("drop.watcher_error")
    assert (tmp_path / "drop" / "deep").is_dir()  # left alone


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_deep_folder_moved_in_at_run_time(tmp_path: Path, deep: Path, polling: bool) -> None:
    """A deep tree moved into a watched folder: files dropped afterwards are still taken, C-ECHO answers."""
    port = free_port()
    config = _config(tmp_path, port, polling=polling)
    make_deep(deep)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        deep.rename(tmp_path / "drop" / "deep")
        daemon.wait_logged("drop.folder_too_deep")
        write_instances(make_study(series=1, per_series=2), tmp_path / "staging")
        for path in sorted((tmp_path / "staging").iterdir()):
            path.rename(tmp_path / "drop" / path.name)
        wait_until(lambda: _taken(tmp_path / "state") == 2, 30, message="files dropped after the deep folder")
        assert echo_ok(port)
        # The observer walks the moved-in tree recursively and dies of it: the watcher says so and scans instead.
        fallback = daemon.wait_logged("drop.watcher_polling_fallback")
        assert fallback["reason"] == "it stopped"
        write_instances(make_study(series=1, per_series=1), tmp_path / "later")
        for path in (tmp_path / "later").iterdir():
            path.rename(tmp_path / "drop" / path.name)
        wait_until(lambda: _taken(tmp_path / "state") == 3, 30, message="a file dropped after the fallback")
        assert daemon.terminate() == 0
        assert not daemon.logged("drop.watcher_error")
        assert len(daemon.logged("drop.folder_too_deep")) == 1
    assert "Traceback" not in daemon.log_path.read_text().replace('"exception": "Traceback', "")  # log lines only
