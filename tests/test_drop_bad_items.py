"""What a hostile drop folder holds, each ending somewhere with its reason: real files, folders, pipes, sockets, links.

Names that are not UTF-8 are taken and journaled; unreadable and too-large files end in quarantine (or, when they
cannot be moved, are left in place with a note in quarantine) after `max_attempts`; pipes, sockets, devices and
symbolic links are logged once each as skipped and never opened, followed or removed. A real watcher, spool and
journal; tests as root read a mode-000 file as another user (a forked process that drops its privileges).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import stat
import tarfile
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from structlog.testing import capture_logs

from ingestd.config import Archives, DropFolder
from ingestd.header import InstanceHeader
from ingestd.journal import Journal, Source
from ingestd.logs import path_digest
from ingestd.receive.intake import NO_RULE_ATTACHES
from ingestd.receive.watcher import DropFolderWatcher
from ingestd.spool import Quarantine, Spool, StoreOutcome
from ingestd.testing.xnat import FakeXnat
from tests.dicom import encode, make_instance, make_study
from tests.procs import journal_rows, wait_until
from tests.test_import import ingestd, write_config

NOBODY = 65534
Events = list[MutableMapping[str, Any]]

NOT_ATTACHED = f", and {NO_RULE_ATTACHES}"  # what a quarantine reason adds when no rule attaches the file


class Drop:
    """A drop folder, its spool, journal and quarantine under `base`, and the watchers a test starts."""

    def __init__(self, base: Path, *, quarantine: Path | None = None, spool: type[Spool] = Spool) -> None:
        self.base = base
        self.folder = base / "drop"
        self.folder.mkdir(exist_ok=True)
        self.journal = Journal(base / "journal.sqlite")
        self.spool = spool(base / "spool", self.journal)
        self.quarantine = Quarantine(quarantine or base / "quarantine", self.journal)
        self.watchers: list[DropFolderWatcher] = []

    def watcher(
        self, *, start: bool = False, limits: Archives | None = None, retry_seconds: float = 0.0, **settings: Any
    ) -> DropFolderWatcher:
        folder = DropFolder(**{"path": self.folder, "settle_seconds": 0, **settings})
        watcher = DropFolderWatcher(
            folder, limits or Archives(), self.spool, self.quarantine, retry_seconds=retry_seconds
        )
        self.watchers.append(watcher)
        if start:
            watcher.start()
        return watcher

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return journal_rows(self.journal.path, sql)

    def spooled(self) -> dict[str, str]:
        """Source detail -> SOP Instance UID."""
        return {detail: uid for uid, detail in self.rows("SELECT sop_uid, source_detail FROM instances")}

    def quarantined(self) -> dict[str, str]:
        return {row.path: row.reason for row in self.journal.quarantined()}

    def sidecar(self, item: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.quarantine.root / f"{item}.reason.json").read_text())
        return data

    def close(self) -> None:
        for watcher in self.watchers:
            watcher.stop(timeout=10)
        self.journal.close()


@pytest.fixture
def drop(tmp_path: Path) -> Iterator[Drop]:
    state = Drop(tmp_path)
    try:
        yield state
    finally:
        state.close()


def events(logged: Events, name: str, file: str | None = None) -> Events:
    return [
        event
        for event in list(logged)
        if event["event"] == name and (file is None or event.get("file") == path_digest(file))
    ]


# -- names that are not UTF-8 ------------------------------------------------------------------------------


def _named(folder: Path, *names: bytes) -> Path:
    """A path below `folder` whose names are these bytes (Python holds bytes that are not UTF-8 as surrogates)."""
    return folder.joinpath(*(os.fsdecode(name) for name in names))


def test_names_that_are_not_utf8_are_taken_and_journaled_escaped(drop: Drop) -> None:
    study = make_study(series=1, per_series=3)
    top, nested, member = (encode(ds) for ds in study)
    _named(drop.folder, b"IM\xff\xfe.dcm").write_bytes(top)
    _named(drop.folder, b"Pat\xe9").mkdir()
    _named(drop.folder, b"Pat\xe9", b"IM1").write_bytes(nested)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w", encoding="utf-8", errors="surrogateescape") as tar:
        info = tarfile.TarInfo(os.fsdecode(b"series/\xe9\xe8.dcm"))
        info.size = len(member)
        tar.addfile(info, io.BytesIO(member))
    _named(drop.folder, b"up\x80load.tar").write_bytes(archive.getvalue())
    _named(drop.folder, b"notes\xff.txt").write_bytes(b"not an image, " * 20)
    assert os.fsencode(drop.folder) + b"/IM\xff\xfe.dcm" in {os.fsencode(path) for path in drop.folder.iterdir()}
    watcher = drop.watcher()
    with capture_logs() as logged:
        assert watcher.scan_once() == 4
    assert drop.spooled() == {
        "IM\\xff\\xfe.dcm": study[0].SOPInstanceUID,
        "Pat\\xe9/IM1": study[1].SOPInstanceUID,
        "up\\x80load.tar!series/\\xe9\\xe8.dcm": study[2].SOPInstanceUID,
    }
    [(item, reason)] = drop.quarantined().items()
    assert reason == "not a DICOM file" + NOT_ATTACHED
    assert drop.sidecar(item)["detail"] == "notes\\xff.txt"
    assert list(drop.folder.iterdir()) == []
    # The logs name each file by the digest of the name the journal holds.
    assert len(events(logged, "drop.file_taken", "IM\\xff\\xfe.dcm")) == 1
    assert len(events(logged, "drop.archive_taken", "up\\x80load.tar")) == 1
    assert not events(logged, "drop.file_failed")


def test_ingestd_import_journals_names_that_are_not_utf8_escaped(tmp_path: Path, xnat: FakeXnat) -> None:
    config = write_config(tmp_path, xnat.url)
    study = make_study(series=1, per_series=2)
    for ds in study:
        ds.SeriesNumber = 1
    folder = tmp_path / "tree" / "subj01" / "MR1"
    folder.mkdir(parents=True)
    for index, ds in enumerate(study):
        _named(folder, b"IM\xff%d.dcm" % index).write_bytes(encode(ds))
    result = ingestd("import", "--config", str(config), str(tmp_path / "tree"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = journal_rows(tmp_path / "state" / "journal.sqlite", "SELECT source, source_detail FROM instances")
    assert sorted(rows) == [
        (str(tmp_path / "tree"), "subj01/MR1/IM\\xff0.dcm"),
        (str(tmp_path / "tree"), "subj01/MR1/IM\\xff1.dcm"),
    ]
    assert len(list(folder.iterdir())) == 2  # the import never touches the user's files


# -- unreadable files ------------------------------------------------------------------------------------


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A folder another user can work in (pytest's own temporary folders are private to root)."""
    base = Path(tempfile.mkdtemp(prefix="ingestd-drop-"))
    try:
        base.chmod(0o755)
        if os.geteuid() == 0:
            os.chown(base, NOBODY, NOBODY)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_unprivileged(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `work` where a mode-000 file cannot be read: here if not root, else in a forked child as nobody.

    Root reads any file whatever its mode, so a test as root cannot see EACCES in its own process.
    """
    if os.geteuid() != 0:
        return work()
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (Python 3.12 and later)
        pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            payload = json.dumps({"result": work()}, default=str)
            code = 0
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
            payload = json.dumps({"error": traceback.format_exc()})
        with contextlib.suppress(BaseException), os.fdopen(write, "w") as out:
            out.write(payload)
        os._exit(code)
    os.close(write)
    with os.fdopen(read) as channel:
        answer = json.loads(channel.read() or '{"error": "no answer"}')
    os.waitpid(pid, 0)
    if "error" in answer:
        if "Operation not permitted" in answer["error"] and "setuid" in answer["error"]:
            pytest.skip("cannot switch to another user here (no CAP_SETUID)")
        pytest.fail(f"the unprivileged watcher failed:\n{answer['error']}")
    result: dict[str, Any] = answer["result"]
    return result


def _unreadable(drop_folder: Path, name: str) -> tuple[Path, bytes]:
    data = encode(make_instance())
    path = drop_folder / name
    path.write_bytes(data)
    path.chmod(0)
    return path, data


def _scan_until(watcher: DropFolderWatcher, done: Callable[[], bool], limit: int = 20) -> int:
    """Run scan passes until `done`; return how many it took."""
    for passes in range(1, limit + 1):
        watcher.scan_once()
        if done():
            return passes
    raise AssertionError(f"not done after {limit} passes")


def test_an_unreadable_file_is_quarantined_after_max_attempts(shared_base: Path) -> None:
    (shared_base / "drop").mkdir(mode=0o755)
    if os.geteuid() == 0:
        os.chown(shared_base / "drop", NOBODY, NOBODY)
    path, data = _unreadable(shared_base / "drop", "locked.dcm")

    def work() -> dict[str, Any]:
        state = Drop(shared_base)
        try:
            with capture_logs() as logged:
                watcher = state.watcher(max_attempts=3)
                _scan_until(watcher, lambda: bool(state.quarantined()))
                for _ in range(3):
                    watcher.scan_once()  # nothing more happens to it
            return {"logged": [dict(event) for event in logged], "quarantined": state.quarantined()}
        finally:
            state.close()

    result = run_unprivileged(work)
    failed = events(result["logged"], "drop.file_failed", "locked.dcm")
    assert [(event["attempt"], event["retry_in"]) for event in failed] == [(1, 0.0), (2, 0.0), (3, None)]
    assert {event["reason"] for event in failed} == {"cannot be read: Permission denied"}
    [(item, reason)] = result["quarantined"].items()
    assert reason == "cannot be read: Permission denied (failed 3 times: drop_folders[].max_attempts)"
    assert len(events(result["logged"], "drop.file_quarantined", "locked.dcm")) == 1
    assert not path.exists()
    kept = shared_base / "quarantine" / item
    assert stat.S_IMODE(kept.stat().st_mode) == 0  # moved as it was, not read
    assert kept.read_bytes() == data  # (read here as root)


def test_an_unreadable_file_that_cannot_be_moved_is_left_in_place_with_a_note(shared_base: Path) -> None:
    """Quarantine on another file system: moving means copying, copying means reading, which is refused."""
    if not Path("/dev/shm").is_dir() or Path("/dev/shm").stat().st_dev == shared_base.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) to put the quarantine on")
    other = Path(tempfile.mkdtemp(prefix="ingestd-quarantine-", dir="/dev/shm"))
    try:
        other.chmod(0o755)
        if os.geteuid() == 0:
            os.chown(other, NOBODY, NOBODY)
        (shared_base / "drop").mkdir(mode=0o755)
        if os.geteuid() == 0:
            os.chown(shared_base / "drop", NOBODY, NOBODY)
        path, data = _unreadable(shared_base / "drop", "locked.dcm")

        def work() -> dict[str, Any]:
            state = Drop(shared_base, quarantine=other)
            try:
                with capture_logs() as logged:
                    watcher = state.watcher(max_attempts=2)
                    _scan_until(watcher, lambda: bool(state.quarantined()))
                    for _ in range(3):
                        watcher.scan_once()  # left alone: not tried again while it does not change
                return {"logged": [dict(event) for event in logged], "quarantined": state.quarantined()}
            finally:
                state.close()

        result = run_unprivileged(work)
        assert path.read_bytes() == data  # still where the user put it, untouched
        assert stat.S_IMODE(path.stat().st_mode) == 0
        assert len(events(result["logged"], "drop.file_failed", "locked.dcm")) == 2
        [left] = events(result["logged"], "drop.file_left", "locked.dcm")
        [(item, reason)] = result["quarantined"].items()
        assert left["item"] == item and left["reason"] == reason
        assert reason.startswith(
            "cannot be read: Permission denied (failed 2 times: drop_folders[].max_attempts); left in the drop "
            "folder, as it cannot be moved to quarantine"
        )
        assert reason in (other / item).read_text()
        assert json.loads((other / f"{item}.reason.json").read_text())["detail"] == "locked.dcm"
    finally:
        shutil.rmtree(other, ignore_errors=True)


# -- too large, and failures that persist -----------------------------------------------------------------


def test_a_file_over_the_size_limit_is_quarantined_with_its_reason(drop: Drop) -> None:
    (drop.folder / "huge.dcm").write_bytes(encode(make_instance()) + bytes(3 * 2**20))
    watcher = drop.watcher(limits=Archives(max_member_mb=1))
    assert watcher.scan_once() == 1
    [reason] = drop.quarantined().values()
    assert reason == "file is 3 MB, over archives.max_member_mb (1), the largest instance ingestd takes"
    assert not (drop.folder / "huge.dcm").exists()


def test_a_persistent_io_error_is_bounded_then_left_in_place_and_taken_again_once_changed(drop: Drop) -> None:
    """The quarantine folder replaced by a file: every move into it fails (ENOTDIR), even as root."""
    path = drop.folder / "huge.dcm"
    path.write_bytes(encode(make_instance()) + bytes(3 * 2**20))
    quarantine = drop.quarantine.root
    shutil.rmtree(quarantine)
    quarantine.write_bytes(b"in the way")
    watcher = drop.watcher(limits=Archives(max_member_mb=1), max_attempts=3)
    with capture_logs() as logged:
        assert _scan_until(watcher, lambda: bool(events(logged, "drop.file_left"))) == 3
        for _ in range(3):
            assert watcher.scan_once() == 0
    failed = events(logged, "drop.file_failed", "huge.dcm")
    assert [event["attempt"] for event in failed] == [1, 2, 3]
    assert failed[0]["reason"] == (
        "cannot be moved to quarantine (file is 3 MB, over archives.max_member_mb (1), the largest instance "
        "ingestd takes): Not a directory"
    )
    [left] = events(logged, "drop.file_left")
    assert left["item"] == ""  # no note either: the quarantine is what fails
    assert "failed 3 times: drop_folders[].max_attempts" in left["reason"]
    assert path.exists()

    quarantine.unlink()
    quarantine.mkdir()
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # it changed: tried afresh
    assert watcher.scan_once() == 1
    assert list(drop.quarantined().values()) == [
        "file is 3 MB, over archives.max_member_mb (1), the largest instance ingestd takes"
    ]
    assert not path.exists()


# -- what is not a regular file ------------------------------------------------------------------------------


def test_pipes_sockets_devices_and_links_are_skipped_once_each_and_never_touched(drop: Drop, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    secret, hidden_study = encode(make_instance()), encode(make_instance())
    (outside / "secret.dcm").write_bytes(secret)
    (outside / "folder" / "IM.dcm").write_bytes(hidden_study)
    inside, sentinel = make_instance(), make_instance()
    (drop.folder / "target.dcm").write_bytes(encode(inside))
    (drop.folder / "real").mkdir()
    (drop.folder / "real" / "IM.dcm").write_bytes(encode(make_instance()))
    (drop.folder / "sub").mkdir()

    items = {
        "pipe": "named pipe",
        "sub/socket": "socket",
        "link-inside.dcm": "symbolic link",
        "link-outside.dcm": "symbolic link",
        "link-folder-outside": "symbolic link",
        "sub/link-folder-inside": "symbolic link",
        "dangling.dcm": "symbolic link",
    }
    os.mkfifo(drop.folder / "pipe")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(drop.folder / "sub" / "socket"))
    (drop.folder / "link-inside.dcm").symlink_to(drop.folder / "target.dcm")
    (drop.folder / "link-outside.dcm").symlink_to(outside / "secret.dcm")
    (drop.folder / "link-folder-outside").symlink_to(outside / "folder", target_is_directory=True)
    (drop.folder / "sub" / "link-folder-inside").symlink_to(drop.folder / "real", target_is_directory=True)
    (drop.folder / "dangling.dcm").symlink_to(drop.folder / "nowhere.dcm")
    with contextlib.suppress(PermissionError):  # a device file needs CAP_MKNOD
        os.mknod(drop.folder / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        items["null"] = "character device"
    modes = {name: (drop.folder / name).lstat() for name in items}
    try:
        with capture_logs() as logged:
            drop.watcher(start=True, settle_seconds=0.2)
            # A file that appears after the start, among them: once it is taken, the others had their turn.
            (drop.folder / "sentinel.dcm").write_bytes(encode(sentinel))
            wait_until(lambda: not (drop.folder / "sentinel.dcm").exists(), 20, message="the sentinel to be taken")
            for _ in range(3):
                drop.watchers[0].scan_once()  # more scans of the whole folder: nothing is logged twice
        for name, kind in items.items():
            skipped = events(logged, "drop.item_skipped", name)
            assert [event["kind"] for event in skipped] == [kind], name
            after = (drop.folder / name).lstat()
            assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
                modes[name].st_ino,
                modes[name].st_mode,
                modes[name].st_mtime_ns,
            ), name
        assert len(events(logged, "drop.item_skipped")) == len(items)
        assert (outside / "secret.dcm").read_bytes() == secret
        assert (outside / "folder" / "IM.dcm").read_bytes() == hidden_study
        spooled = drop.spooled()
        assert set(spooled) == {"sentinel.dcm", "target.dcm", "real/IM.dcm"}
        assert spooled["target.dcm"] == inside.SOPInstanceUID
        assert drop.quarantined() == {}
        assert not events(logged, "drop.file_failed") and not events(logged, "drop.watcher_error")
    finally:
        listener.close()


# -- a file that changes while it is taken ---------------------------------------------------------------------


class ResumingWriterSpool(Spool):
    """A real spool; while it stores the first instance of `path`, the writer of `path` appends to it."""

    path: Path | None = None
    more = b""

    def store(self, prefix: bytes, body: bytes | memoryview, header: InstanceHeader, source: Source) -> StoreOutcome:
        outcome = super().store(prefix, body, header, source)
        if self.path is not None and self.more:
            with self.path.open("ab") as out:
                out.write(self.more)
            self.more = b""
        return outcome


def _with_padding(ds: Dataset) -> bytes:
    padded = pydicom.dcmread(io.BytesIO(encode(ds)))
    padded.DataSetTrailingPadding = bytes(8)
    return encode(padded)


def test_a_file_that_changes_while_it_is_taken_is_left_and_taken_again(tmp_path: Path) -> None:
    state = Drop(tmp_path, spool=ResumingWriterSpool)
    try:
        ds = make_instance()
        first, final = encode(ds), _with_padding(ds)
        assert final.startswith(first)
        path = state.folder / "IM.dcm"
        path.write_bytes(first)
        spool = state.spool
        assert isinstance(spool, ResumingWriterSpool)
        spool.path, spool.more = path, final[len(first) :]
        watcher = state.watcher()
        with capture_logs() as logged:
            assert watcher.scan_once() == 0  # stored, but the file changed before it was removed: left
            assert path.read_bytes() == final
            _scan_until(watcher, lambda: not path.exists())
        retry = events(logged, "drop.file_retry", "IM.dcm")
        assert [event["reason"] for event in retry] == ["the file changed while it was being read"]
        assert sorted(row[0] for row in state.rows("SELECT outcome FROM receipts")) == [
            "replaced",
            "stored",
            "superseded",
        ]
        [(spool_path,)] = state.rows("SELECT spool_path FROM instances")
        assert (state.spool.root / spool_path).read_bytes() == final
        [(kept,)] = state.rows("SELECT path FROM superseded")  # the first read is kept aside, not destroyed
        assert (state.spool.root.parent / kept).read_bytes() == first
    finally:
        state.close()
