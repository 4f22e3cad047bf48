"""Files and archives written slowly into a drop folder: taken whole, byte for byte, never cut short.

A real watcher (watchdog, worker thread), a real spool and journal. Each writer pauses longer than
`settle_seconds` at chosen points: it writes a piece, then waits until the watcher has looked at the file,
found it settled but not whole, and said so (`drop.file_incomplete`), before it writes the next. Nothing waits
for a fixed time.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from ingestd.config import Archives, DropFolder
from ingestd.journal import Journal
from ingestd.logs import path_digest
from ingestd.receive.watcher import DropFolderWatcher
from ingestd.spool import Quarantine, Spool
from tests.dicom import encode, make_instance, make_study, tar_bytes, zip_bytes
from tests.procs import journal_rows, wait_until

SETTLE = 0.2


class Drop:
    """A drop folder with its watchers, spool, journal and quarantine, and the log events captured."""

    def __init__(self, tmp: Path, logged: list[MutableMapping[str, Any]]) -> None:
        self.tmp = tmp
        self.folder = tmp / "drop"
        self.folder.mkdir()
        self.journal = Journal(tmp / "journal.sqlite")
        self.spool = Spool(tmp / "spool", self.journal)
        self.quarantine = Quarantine(tmp / "quarantine", self.journal)
        self.logged = logged
        self.watchers: list[DropFolderWatcher] = []

    def watch(self, **settings: Any) -> DropFolderWatcher:
        folder = DropFolder(**{"path": self.folder, "settle_seconds": SETTLE, **settings})
        watcher = DropFolderWatcher(folder, Archives(), self.spool, self.quarantine)
        self.watchers.append(watcher)
        watcher.start()
        return watcher

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return journal_rows(self.journal.path, sql)

    def spooled_bytes(self) -> dict[str, bytes]:
        """Source detail -> the bytes of the spooled file."""
        rows = self.rows("SELECT source_detail, spool_path FROM instances")
        return {detail: (self.spool.root / spool_path).read_bytes() for detail, spool_path in rows}

    def quarantined(self) -> dict[str, str]:
        return {row.path: row.reason for row in self.journal.quarantined()}

    def events(self, name: str, file: str) -> list[MutableMapping[str, Any]]:
        digest = path_digest(file)
        return [event for event in list(self.logged) if event["event"] == name and event.get("file") == digest]

    def close(self) -> None:
        for watcher in self.watchers:
            watcher.stop(timeout=10)
        self.journal.close()


@pytest.fixture
def drop(tmp_path: Path) -> Iterator[Drop]:
    with capture_logs() as logged:
        state = Drop(tmp_path, logged)
        try:
            yield state
        finally:
            state.close()


def _seen_incomplete(drop: Drop, name: str, times: int) -> Callable[[], bool]:
    """A condition: the watcher has reported `name` incomplete at least `times` times."""
    return lambda: len(drop.events("drop.file_incomplete", name)) >= times


def write_slowly(drop: Drop, path: Path, data: bytes, cuts: list[int]) -> None:
    """Write `data` to `path` through one open file, pausing at each cut until the watcher has found the file
    settled and incomplete; check there that the user's file is intact and nothing of it was taken."""
    name = path.relative_to(drop.folder).as_posix()
    with path.open("wb") as out:
        start = 0
        for number, cut in enumerate([*cuts, len(data)], start=1):
            out.write(data[start:cut])
            out.flush()
            start = cut
            if cut == len(data):
                break
            wait_until(
                _seen_incomplete(drop, name, number),
                20,
                message=f"the watcher to find {name} incomplete at byte {cut}",
            )
            assert path.read_bytes() == data[:cut]  # the user's file, as written so far
            assert drop.rows("SELECT count(*) FROM instances") == [(0,)]
            assert drop.quarantined() == {}


def _cuts_through_a_dicom_file(data: bytes) -> dict[str, int]:
    pixels = data.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, at an element boundary
    return {
        "in the preamble": 64,
        "in DICM": 130,
        "in the file meta": 150,
        "between file meta and data set": data.index(b"\x08\x00", 144),
        "before the UIDs (at an element boundary)": data.index(b"\x08\x00\x16\x00"),
        "before Pixel Data (at an element boundary)": pixels,
        "in the Pixel Data header": pixels + 6,
        "inside Pixel Data": pixels + 12 + 1000,
        "one byte short": len(data) - 1,
    }


def test_a_dicom_file_written_slowly_is_taken_whole_and_byte_identical(drop: Drop) -> None:
    ds = make_instance(rows=128)  # 33 kB, as in the report: an 892-byte prefix was taken for the file
    data = encode(ds)
    cuts = _cuts_through_a_dicom_file(data)
    drop.watch()
    path = drop.folder / "slow.dcm"
    write_slowly(drop, path, data, sorted(set(cuts.values())))
    wait_until(lambda: not path.exists(), 20, message="the whole file to be taken")
    assert drop.spooled_bytes() == {"slow.dcm": data}
    assert drop.quarantined() == {}
    [taken] = drop.events("drop.file_taken", "slow.dcm")
    assert taken["spool"] == "stored"
    reasons = [event["reason"] for event in drop.events("drop.file_incomplete", "slow.dcm")]
    assert len(reasons) == len(set(cuts.values()))
    assert "incomplete DICOM file: it ends before its Pixel Data" in reasons


@pytest.mark.parametrize(
    "where", ["before Pixel Data (at an element boundary)", "inside Pixel Data", "in the file meta"]
)
def test_a_dicom_file_paused_once_is_taken_whole(drop: Drop, where: str) -> None:
    data = encode(make_instance(rows=128))
    drop.watch(after="move", done_folder=drop.tmp / "done")
    path = drop.folder / "sub" / "IM0001"
    path.parent.mkdir()
    write_slowly(drop, path, data, [_cuts_through_a_dicom_file(data)[where]])
    done = drop.tmp / "done" / "sub" / "IM0001"
    wait_until(done.exists, 20, message="the file to be taken")
    assert done.read_bytes() == data  # the user's file, moved whole
    assert drop.spooled_bytes() == {"sub/IM0001": data}


def test_a_file_left_incomplete_goes_to_quarantine_after_the_bound(drop: Drop) -> None:
    data = encode(make_instance(rows=128))
    prefix = data[: data.index(b"\xe0\x7f\x10\x00")]  # a copy that stalled for good before Pixel Data
    drop.watch(incomplete_seconds=1.0)
    (drop.folder / "stalled.dcm").write_bytes(prefix)
    wait_until(drop.quarantined, 20, message="the stalled file to be quarantined")
    [(item, reason)] = drop.quarantined().items()
    assert reason == (
        "incomplete DICOM file: it ends before its Pixel Data "
        "(unchanged and incomplete for 1 s: drop_folders[].incomplete_seconds)"
    )
    assert (drop.quarantine.root / item).read_bytes() == prefix
    assert not (drop.folder / "stalled.dcm").exists()
    assert drop.rows("SELECT count(*) FROM instances") == [(0,)]
    assert len(drop.events("drop.file_incomplete", "stalled.dcm")) == 1
    [quarantined] = drop.events("drop.file_quarantined", "stalled.dcm")
    assert quarantined["item"] == item


def test_the_bound_counts_from_the_last_change(drop: Drop) -> None:
    """A writer that pauses, each time for less than `incomplete_seconds`, is waited for however long it takes."""
    data = encode(make_instance(rows=128))
    cuts = _cuts_through_a_dicom_file(data)
    drop.watch(incomplete_seconds=1.5)
    path = drop.folder / "paused.dcm"
    with path.open("wb") as out:
        for number, cut in enumerate(sorted(set(cuts.values()))[:4], start=1):
            out.write(data[out.tell() : cut])
            out.flush()
            wait_until(
                _seen_incomplete(drop, "paused.dcm", number),
                20,
                message="the watcher to find the file incomplete",
            )
        out.write(data[out.tell() :])
    wait_until(lambda: not path.exists(), 20, message="the file to be taken")
    assert drop.spooled_bytes() == {"paused.dcm": data}
    assert drop.quarantined() == {}


def _members(count: int = 3) -> dict[str, bytes]:
    return {f"study/IM{index}.dcm": encode(ds) for index, ds in enumerate(make_study(series=1, per_series=count))}


def test_a_zip_written_slowly_by_zipfile_is_taken_only_once_whole(drop: Drop) -> None:
    members = _members()
    drop.watch()
    path = drop.folder / "upload.zip"
    with path.open("wb") as out, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for number, (name, data) in enumerate(members.items(), start=1):
            archive.writestr(name, data)
            out.flush()
            wait_until(
                _seen_incomplete(drop, "upload.zip", number),
                20,
                message="the watcher to find the zip incomplete",
            )
            assert path.exists()
            assert drop.rows("SELECT count(*) FROM instances") == [(0,)]
    wait_until(lambda: not path.exists(), 20, message="the whole zip to be taken")
    assert drop.spooled_bytes() == {f"upload.zip!{name}": data for name, data in members.items()}
    reasons = {event["reason"] for event in drop.events("drop.file_incomplete", "upload.zip")}
    assert reasons == {"zip archive is cut short: it has no end of central directory yet"}
    assert drop.quarantined() == {}


def _marker_end(members: dict[str, bytes]) -> int:
    """Where a plain tar of `members` becomes whole: after its end-of-archive marker (the rest is padding)."""
    return sum(512 + (len(data) + 511) // 512 * 512 for data in members.values()) + 512


ARCHIVES: dict[str, tuple[Callable[[dict[str, bytes]], bytes], Callable[[dict[str, bytes], bytes], int]]] = {
    "copy.zip": (zip_bytes, lambda _members, data: len(data)),
    "copy.tar": (lambda members: tar_bytes(members, "w"), lambda members, _data: _marker_end(members)),
    "copy.tar.gz": (lambda members: tar_bytes(members, "w:gz"), lambda _members, data: len(data)),
}


@pytest.mark.parametrize("name", ARCHIVES)
def test_an_archive_copied_slowly_is_taken_only_once_whole(drop: Drop, name: str) -> None:
    """A copy that stalls inside the first member, after it, inside the last member, and one byte short."""
    members = _members()
    build, whole_at = ARCHIVES[name]
    data = build(members)
    end = whole_at(members, data)
    first = data.find(members["study/IM0.dcm"][:64])  # stored only in a plain tar
    cuts = sorted({end // 5, end // 2, end - 40, end - 1} | ({first + 600} if first > 0 else set()))
    drop.watch()
    path = drop.folder / name
    write_slowly(drop, path, data, cuts)
    wait_until(lambda: not path.exists(), 20, message=f"the whole {name} to be taken")
    assert drop.spooled_bytes() == {f"{name}!{member}": value for member, value in members.items()}
    assert drop.quarantined() == {}


def test_an_archive_left_cut_short_goes_to_quarantine_after_the_bound(drop: Drop) -> None:
    members = _members()
    data = tar_bytes(members, "w:gz")
    drop.watch(incomplete_seconds=0.5)
    (drop.folder / "cut.tgz").write_bytes(data[: len(data) // 2])
    wait_until(drop.quarantined, 20, message="the archive to be quarantined")
    [reason] = drop.quarantined().values()
    assert reason.startswith("tar archive is cut short: its compressed stream stops before its end (unchanged")
    assert drop.rows("SELECT count(*) FROM instances") == [(0,)]
