"""The drop-folder watcher against real files, archives, a real spool and a real SQLite journal."""

from __future__ import annotations

import io
import json
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRBigEndian

from ingestd.config import Archives, DropFolder
from ingestd.dicomfile import prepare_instance
from ingestd.journal import Journal
from ingestd.receive.intake import NO_RULE_ATTACHES
from ingestd.receive.observer import _EventHandler
from ingestd.receive.watcher import DropFolderError, DropFolderWatcher
from ingestd.spool import Quarantine, Spool
from tests.dicom import TarMode, encode, encode_raw, make_instance, make_study, pydicom_file, write_instances
from tests.procs import journal_rows, wait_until

SETTLE = 0.2

NOT_ATTACHED = f", and {NO_RULE_ATTACHES}"  # what a quarantine reason adds when no rule attaches the file


@dataclass
class Env:
    tmp: Path
    drop: Path
    journal: Journal
    spool: Spool
    quarantine: Quarantine
    watchers: list[DropFolderWatcher] = field(default_factory=list)

    def watcher(
        self, *, start: bool = True, limits: Archives | None = None, retry_seconds: float = 30.0, **folder: Any
    ) -> DropFolderWatcher:
        settings = {"path": self.drop, "settle_seconds": SETTLE, **folder}
        watcher = DropFolderWatcher(
            DropFolder(**settings), limits or Archives(), self.spool, self.quarantine, retry_seconds=retry_seconds
        )
        self.watchers.append(watcher)
        if start:
            watcher.start()
        return watcher

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        return journal_rows(self.journal.path, sql)

    def spooled(self) -> dict[str, str]:
        """SOP Instance UID -> source detail (the path within the drop folder) of every spooled instance."""
        return dict(self.rows("SELECT sop_uid, source_detail FROM instances"))

    def quarantined(self) -> dict[str, str]:
        """Quarantined item name -> reason."""
        return {row.path: row.reason for row in self.journal.quarantined()}

    def drop_is_empty(self) -> bool:
        return not any(self.drop.iterdir())


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    journal = Journal(tmp_path / "journal.sqlite")
    drop = tmp_path / "drop"
    drop.mkdir()
    state = Env(
        tmp_path, drop, journal, Spool(tmp_path / "spool", journal), Quarantine(tmp_path / "quarantine", journal)
    )
    try:
        yield state
    finally:
        for watcher in state.watchers:
            watcher.stop(timeout=10)
        journal.close()


def uids(datasets: list[pydicom.Dataset]) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in datasets}


def make_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def make_tar(path: Path, members: dict[str, bytes], mode: TarMode = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def truncated(ds: pydicom.Dataset) -> bytes:
    return encode(ds)[:-100]  # cut inside the pixel data


# -- single files, folders, archives -----------------------------------------------------------------


def test_single_files_with_and_without_extension_preamble_or_meta(env: Env) -> None:
    """Part 10 with and without extension, without preamble, and bare data sets (explicit, implicit)."""
    study = make_study(series=1, per_series=5)
    files = {
        "IM0001.dcm": encode(study[0]),
        "IM0002": encode(study[1]),
        "no_preamble": encode(study[2])[128:],
        "bare_explicit.dcm": encode_raw(study[3]),
        "bare_implicit": encode_raw(study[4], implicit=True),
    }
    for name, data in files.items():
        (env.drop / name).write_bytes(data)
    env.watcher()
    wait_until(lambda: len(env.spooled()) == 5 and env.drop_is_empty(), message="five files taken")
    assert env.spooled() == {
        str(study[0].SOPInstanceUID): "IM0001.dcm",
        str(study[1].SOPInstanceUID): "IM0002",
        str(study[2].SOPInstanceUID): "no_preamble",
        str(study[3].SOPInstanceUID): "bare_explicit.dcm",
        str(study[4].SOPInstanceUID): "bare_implicit",
    }
    assert env.quarantined() == {}
    # Every spooled file is a Part 10 file whose data set is the bytes that were dropped.
    for spool_path, offset, sop_uid in env.rows("SELECT spool_path, data_offset, sop_uid FROM instances"):
        stored = (env.spool.root / spool_path).read_bytes()
        assert stored[128:132] == b"DICM"
        dataset = pydicom.dcmread(io.BytesIO(stored))
        assert dataset.SOPInstanceUID == sop_uid == dataset.file_meta.MediaStorageSOPInstanceUID
        original = next(ds for ds in study if ds.SOPInstanceUID == sop_uid)
        assert stored[offset:] in (encode_raw(original), encode_raw(original, implicit=True))


def test_nested_folders_are_taken_file_by_file_and_emptied_folders_removed(env: Env) -> None:
    study = make_study(series=2, per_series=3)
    write_instances(study[:3], env.drop / "patient" / "study" / "series1")
    write_instances(study[3:], env.drop / "patient" / "study" / "series2")
    env.watcher()
    wait_until(lambda: set(env.spooled()) == uids(study), message="all instances spooled")
    wait_until(env.drop_is_empty, message="emptied sub-folders removed")
    assert env.drop.is_dir()
    assert env.spooled()[str(study[0].SOPInstanceUID)] == "patient/study/series1/IM0000.dcm"


def test_zip_archive(env: Env) -> None:
    study = make_study(series=2, per_series=2)
    members = {f"study/s{i // 2}/IM{i}.dcm": encode(ds) for i, ds in enumerate(study)}
    members["study/"] = b""  # a folder entry is skipped
    env.watcher()
    make_zip(env.drop / "upload.tmp", members).rename(env.drop / "study.zip")
    wait_until(lambda: len(env.spooled()) == 4 and env.drop_is_empty(), message="zip taken and removed")
    assert env.spooled()[str(study[0].SOPInstanceUID)] == "study.zip!study/s0/IM0.dcm"
    assert env.quarantined() == {}


@pytest.mark.parametrize(("name", "mode"), [("study.tar.gz", "w:gz"), ("study.tgz", "w:gz"), ("study.tar", "w")])
def test_tar_archives(env: Env, name: str, mode: TarMode) -> None:
    study = make_study(series=1, per_series=3)
    env.watcher()
    make_tar(env.tmp / name, {f"dir/IM{i}.dcm": encode(ds) for i, ds in enumerate(study)}, mode).rename(env.drop / name)
    wait_until(lambda: set(env.spooled()) == uids(study) and env.drop_is_empty(), message=f"{name} taken")
    assert env.spooled()[str(study[0].SOPInstanceUID)] == f"{name}!dir/IM0.dcm"


def test_archive_without_archive_extension_is_recognised(env: Env) -> None:
    study = make_study(series=1, per_series=2)
    make_zip(env.drop / "download", {f"IM{i}.dcm": encode(ds) for i, ds in enumerate(study)})
    watcher = env.watcher(start=False, settle_seconds=0)
    assert watcher.scan_once() == 1
    assert set(env.spooled()) == uids(study)


# -- settling, hidden and partial files, start-up scan ------------------------------------------------


def test_file_written_slowly_is_taken_only_once_settled(env: Env) -> None:
    ds = make_instance(rows=64)
    data = encode(ds)
    env.watcher(settle_seconds=1.0)
    path = env.drop / "slow.dcm"
    step = len(data) // 7 + 1
    with path.open("wb") as out:
        for start in range(0, len(data), step):
            out.write(data[start : start + step])
            out.flush()
            time.sleep(0.3)  # the scenario: a slow copy writing a chunk every 0.3 s (not synchronisation)
            assert path.exists()
            assert env.spooled() == {}
            assert env.quarantined() == {}
    closed = time.monotonic()
    wait_until(lambda: not path.exists(), message="the settled file to be taken")
    assert time.monotonic() - closed >= 0.6  # last write 0.3 s before closing, plus settle 1.0 s
    assert env.spooled() == {str(ds.SOPInstanceUID): "slow.dcm"}
    assert env.quarantined() == {}


def test_hidden_and_partial_files_are_ignored_until_renamed(env: Env) -> None:
    study = make_study(series=1, per_series=6)
    ignored = {
        ".hidden.dcm": study[0],
        "IM1.dcm.part": study[1],
        "IM2.tmp": study[2],
        "IM3.crdownload": study[3],
        ".upload/IM4.dcm": study[4],
    }
    for name, ds in ignored.items():
        (env.drop / name).parent.mkdir(exist_ok=True)
        (env.drop / name).write_bytes(encode(ds))
    env.watcher()
    (env.drop / "sentinel.dcm").write_bytes(encode(study[5]))
    # The sentinel settles after the ignored files would have: once it is taken, they had their chance.
    wait_until(lambda: not (env.drop / "sentinel.dcm").exists(), message="the sentinel file to be taken")
    assert set(env.spooled()) == {str(study[5].SOPInstanceUID)}
    assert all((env.drop / name).exists() for name in ignored)

    (env.drop / ".hidden.dcm").rename(env.drop / "hidden.dcm")
    (env.drop / "IM1.dcm.part").rename(env.drop / "IM1.dcm")
    (env.drop / "IM2.tmp").rename(env.drop / "IM2")
    (env.drop / "IM3.crdownload").rename(env.drop / "IM3.dcm")
    (env.drop / ".upload").rename(env.drop / "upload")
    wait_until(lambda: set(env.spooled()) == uids(study), message="renamed files taken")
    wait_until(env.drop_is_empty, message="drop folder emptied")
    assert env.spooled()[str(study[4].SOPInstanceUID)] == "upload/IM4.dcm"


def test_files_present_before_start_are_taken(env: Env) -> None:
    study = make_study(series=1, per_series=3)
    write_instances(study[:2], env.drop)
    make_zip(env.drop / "more.zip", {"IM.dcm": encode(study[2])})
    env.watcher()
    wait_until(lambda: set(env.spooled()) == uids(study) and env.drop_is_empty(), message="start-up scan")


def test_scan_once_takes_settled_files_synchronously(env: Env) -> None:
    study = make_study(series=1, per_series=2)
    write_instances(study, env.drop / "sub")
    watcher = env.watcher(start=False, settle_seconds=0)
    assert watcher.scan_once() == 2
    assert set(env.spooled()) == uids(study)
    assert watcher.scan_once() == 0  # removes the emptied sub-folder; nothing more to take
    assert env.drop_is_empty()


def test_polling_observer(env: Env) -> None:
    study = make_study(series=1, per_series=3)
    env.watcher(polling=True, poll_interval_seconds=0.2)
    write_instances(study[:2], env.drop / "a")
    make_tar(env.drop / "b.tar.gz", {"IM.dcm": encode(study[2])})
    wait_until(lambda: set(env.spooled()) == uids(study) and env.drop_is_empty(), message="polled files taken")


def test_after_move_keeps_files_in_done_folder(env: Env) -> None:
    done = env.tmp / "done"
    (done).mkdir()
    (done / "IM0000.dcm").write_bytes(b"an earlier file of the same name")
    study = make_study(series=1, per_series=3)
    top = write_instances(study[:1], env.drop)
    nested = write_instances(study[1:], env.drop / "sub")
    originals = {path.relative_to(env.drop).as_posix(): path.read_bytes() for path in [*top, *nested]}
    env.watcher(after="move", done_folder=done)
    wait_until(lambda: set(env.spooled()) == uids(study) and env.drop_is_empty(), message="files moved")
    assert (done / "IM0000.dcm").read_bytes() == b"an earlier file of the same name"
    assert (done / "IM0000-1.dcm").read_bytes() == originals["IM0000.dcm"]
    assert (done / "sub" / "IM0000.dcm").read_bytes() == originals["sub/IM0000.dcm"]
    assert (done / "sub" / "IM0001.dcm").read_bytes() == originals["sub/IM0001.dcm"]


def test_the_same_file_taken_again_is_a_duplicate(env: Env) -> None:
    """Re-taking a file after a crash between spooling and deleting it stores nothing twice."""
    ds = make_instance()
    data = encode(ds)
    watcher = env.watcher(start=False, settle_seconds=0)
    (env.drop / "IM.dcm").write_bytes(data)
    assert watcher.scan_once() == 1
    (env.drop / "IM.dcm").write_bytes(data)
    assert watcher.scan_once() == 1
    assert env.rows("SELECT count(*) FROM instances") == [(1,)]
    assert sorted(row[0] for row in env.rows("SELECT outcome FROM receipts")) == ["duplicate", "stored"]


# -- quarantine ---------------------------------------------------------------------------------------


def _sidecar(env: Env, item: str) -> dict[str, Any]:
    sidecar = env.quarantine.root / f"{item}.reason.json"
    data: dict[str, Any] = json.loads(sidecar.read_text())
    return data


def test_non_dicom_file_is_quarantined_with_its_reason(env: Env) -> None:
    (env.drop / "notes.txt").write_text("scan protocol notes, not an image\n" * 20)
    env.watcher()
    wait_until(lambda: env.quarantined() and env.drop_is_empty(), message="the file to be quarantined")
    [(item, reason)] = env.quarantined().items()
    assert reason == "not a DICOM file" + NOT_ATTACHED
    assert item.endswith(".txt") and "notes" not in item  # the original name may be a patient's: only in the sidecar
    assert (env.quarantine.root / item).read_text().startswith("scan protocol notes")
    assert _sidecar(env, item)["reason"] == "not a DICOM file" + NOT_ATTACHED
    assert _sidecar(env, item)["detail"] == "notes.txt"
    assert env.rows("SELECT source_kind, source FROM quarantine") == [("folder", str(env.drop))]
    assert env.spooled() == {}


def test_truncated_dicom_file_is_quarantined_once_it_stays_incomplete(env: Env) -> None:
    """A file cut short may still be being written: it waits `incomplete_seconds`, unchanged, then is quarantined."""
    (env.drop / "IM.dcm").write_bytes(truncated(make_instance()))
    env.watcher(incomplete_seconds=0.5)
    wait_until(env.quarantined, message="the file to be quarantined")
    assert list(env.quarantined().values()) == [
        "corrupt DICOM file: truncated (unchanged and incomplete for 0.5 s: drop_folders[].incomplete_seconds)"
    ]
    assert env.spooled() == {}


def _encrypted_zip(path: Path) -> Path:
    """A zip whose member claims to be encrypted (zipfile cannot write one; the flag is what is checked)."""
    data = bytearray(make_zip(path, {"IM.dcm": encode(make_instance())}).read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature) + flags_at
        data[at] |= 0x01
    path.write_bytes(bytes(data))
    return path


def _tar_with_symlink(path: Path) -> Path:
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("link.dcm")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        archive.addfile(info)
    return path


def _good(count: int = 2) -> dict[str, bytes]:
    return {f"IM{i}.dcm": encode(ds) for i, ds in enumerate(make_study(series=1, per_series=count))}


HOSTILE: list[tuple[str, Callable[[Path], Path], Archives, str]] = [
    (
        "dotdot.zip",
        lambda p: make_zip(p, {**_good(), "../escape.dcm": encode(make_instance())}),
        Archives(),
        "escaping",
    ),
    ("absolute.zip", lambda p: make_zip(p, {**_good(), "/abs.dcm": encode(make_instance())}), Archives(), "escaping"),
    ("dotdot.tar", lambda p: make_tar(p, {**_good(), "a/../../x.dcm": b"x"}, "w"), Archives(), "escaping"),
    ("absolute.tgz", lambda p: make_tar(p, {**_good(), "/etc/x.dcm": b"x"}), Archives(), "escaping"),
    ("link.tar", _tar_with_symlink, Archives(), "symbolic link"),
    ("encrypted.zip", _encrypted_zip, Archives(), "encrypted"),
    ("many.zip", lambda p: make_zip(p, _good(3)), Archives(max_members=2), "archives.max_members"),
    ("big.zip", lambda p: make_zip(p, {"big.dcm": bytes(2 * 2**20)}), Archives(max_member_mb=1), "max_member_mb"),
    ("bomb.zip", lambda p: make_zip(p, {"zeros.dcm": bytes(8 * 2**20)}), Archives(), "archives.max_ratio"),
    ("bomb.tar.gz", lambda p: make_tar(p, {"zeros.dcm": bytes(8 * 2**20)}), Archives(), "archives.max_ratio"),
    (
        "total.zip",
        lambda p: make_zip(p, {"a.dcm": bytes(700_000), "b.dcm": bytes(700_000)}, zipfile.ZIP_STORED),
        Archives(max_total_mb=1),
        "archives.max_total_mb",
    ),
    ("garbage.zip", lambda p: (p.write_bytes(b"not a zip at all" * 10), p)[1], Archives(), "cannot be read"),
    ("garbage.tar", lambda p: (p.write_bytes(b"not a tar at all" * 40), p)[1], Archives(), "cannot be read"),
    (
        "cut.tar.gz",  # cut short, then left unchanged for incomplete_seconds (0 here)
        lambda p: (p.write_bytes(make_tar(p, _good()).read_bytes()[:-200]), p)[1],
        Archives(),
        "is cut short",
    ),
]


@pytest.mark.parametrize(("name", "build", "limits", "reason"), HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_or_unreadable_archive_is_quarantined_whole(
    env: Env, name: str, build: Callable[[Path], Path], limits: Archives, reason: str
) -> None:
    build(env.drop / name)
    watcher = env.watcher(start=False, settle_seconds=0, limits=limits, incomplete_seconds=0)
    assert watcher.scan_once() == 1
    [(item, why)] = env.quarantined().items()
    assert reason in why
    assert _sidecar(env, item)["detail"] == name
    assert (env.quarantine.root / item).is_file()
    assert _sidecar(env, item)["reason"] == why
    assert env.spooled() == {}
    assert env.drop_is_empty()


def test_zip_with_escaping_entry_is_quarantined_by_the_running_watcher(env: Env) -> None:
    make_zip(env.tmp / "evil.zip", {**_good(), "../evil.dcm": encode(make_instance())}).rename(env.drop / "evil.zip")
    env.watcher()
    wait_until(lambda: env.quarantined() and env.drop_is_empty(), message="the archive to be quarantined")
    [(item, reason)] = env.quarantined().items()
    assert item.endswith(".zip") and _sidecar(env, item)["detail"] == "evil.zip"
    assert "'../evil.dcm' has a path escaping the folder" in reason
    assert env.rows("SELECT count(*) FROM instances") == [(0,)]


def test_zip_with_bad_members_among_good_ones(env: Env) -> None:
    study = make_study(series=1, per_series=3)
    members = {f"good/IM{i}.dcm": encode(ds) for i, ds in enumerate(study)}
    members["docs/notes.txt"] = b"not an image"
    members["cut.dcm"] = truncated(make_instance())
    members["inner.zip"] = make_zip(env.tmp / "inner.zip", {"IM.dcm": encode(make_instance())}).read_bytes()
    make_zip(env.tmp / "mixed.zip", members).rename(env.drop / "mixed.zip")
    env.watcher()
    wait_until(lambda: len(env.quarantined()) == 3 and env.drop_is_empty(), message="archive taken")
    assert set(env.spooled()) == uids(study)
    reasons = {_sidecar(env, item)["detail"]: reason for item, reason in env.quarantined().items()}
    assert reasons == {
        "mixed.zip!docs/notes.txt": "not a DICOM file" + NOT_ATTACHED,
        "mixed.zip!cut.dcm": "corrupt DICOM file: truncated" + NOT_ATTACHED,
        "mixed.zip!inner.zip": "nested archive" + NOT_ATTACHED,
    }


# -- refusals and failures ----------------------------------------------------------------------------


def test_spool_refusal_leaves_the_file_to_retry(env: Env) -> None:
    ds = make_instance()
    (env.drop / "IM.dcm").write_bytes(encode(ds))
    env.spool.min_free_bytes = 2**62  # the spool refuses: below its free-space floor
    watcher = env.watcher(start=False, settle_seconds=0, retry_seconds=0)
    assert watcher.scan_once() == 0
    assert (env.drop / "IM.dcm").exists()
    assert env.quarantined() == {}
    env.spool.min_free_bytes = 0
    assert watcher.scan_once() == 1
    assert env.spooled() == {str(ds.SOPInstanceUID): "IM.dcm"}
    assert env.drop_is_empty()


def test_spool_refusal_leaves_an_archive_whole(env: Env) -> None:
    study = make_study(series=1, per_series=2)
    make_zip(env.drop / "a.zip", {**{f"IM{i}.dcm": encode(ds) for i, ds in enumerate(study)}, "x.txt": b"x"})
    env.spool.min_free_bytes = 2**62
    watcher = env.watcher(start=False, settle_seconds=0, retry_seconds=0)
    assert watcher.scan_once() == 0
    assert (env.drop / "a.zip").exists()
    assert env.quarantined() == {}  # bad members are kept only once the good ones are all spooled
    env.spool.min_free_bytes = 0
    assert watcher.scan_once() == 1
    assert set(env.spooled()) == uids(study)
    assert list(env.quarantined().values()) == ["not a DICOM file" + NOT_ATTACHED]


def test_vanishing_files_do_not_stop_the_watcher(env: Env) -> None:
    env.watcher()
    for number in range(5):
        path = env.drop / f"gone{number}.dcm"
        path.write_bytes(encode(make_instance()))
        path.unlink()
    ds = make_instance()
    (env.drop / "IM.dcm").write_bytes(encode(ds))
    wait_until(lambda: env.spooled() == {str(ds.SOPInstanceUID): "IM.dcm"}, message="the file to be taken")


def test_event_handler_never_raises() -> None:
    class Broken:
        event_type = "created"
        is_directory = False

        @property
        def src_path(self) -> str:
            raise OSError("unreadable event")

    _EventHandler(None).on_any_event(Broken())  # type: ignore[arg-type]  # no queue and no real event, on purpose


def test_missing_drop_folder_is_reported(env: Env) -> None:
    watcher = env.watcher(start=False, path=env.tmp / "not-there")
    with pytest.raises(DropFolderError, match="does not exist"):
        watcher.start()


def test_prepare_instance_splits_meta_from_data_set() -> None:
    ds = make_instance()
    data = encode(ds)
    prepared = prepare_instance(data)
    assert prepared.prefix + bytes(prepared.body) == data
    assert bytes(prepared.body) == encode_raw(ds)
    assert prepared.header.sop_uid == ds.SOPInstanceUID


def test_prepare_instance_keeps_the_byte_order_of_a_bare_big_endian_data_set() -> None:
    data = pydicom_file("ExplVR_BigEndNoMeta.dcm").read_bytes()
    prepared = prepare_instance(data)
    assert prepared.header.transfer_syntax == ExplicitVRBigEndian
    assert bytes(prepared.body) == data
    stored = pydicom.dcmread(io.BytesIO(prepared.prefix + data))
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    assert stored.SOPInstanceUID == prepared.header.sop_uid


def test_dicomdir_is_quarantined_with_a_plain_reason(env: Env) -> None:
    (env.drop / "DICOMDIR").write_bytes(pydicom_file("DICOMDIR").read_bytes())
    watcher = env.watcher(start=False, settle_seconds=0)
    assert watcher.scan_once() == 1
    reason = "DICOMDIR: an index of a disc or folder, not an instance"
    assert list(env.quarantined().values()) == [reason + NOT_ATTACHED]
