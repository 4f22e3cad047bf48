"""The drop-folder watcher keeps the files a rule's `attach:` takes: durable, journaled once, before the drop goes.

Real watcher (`scan_once`, settle 0), real files, real journal and attachment spool; the predicate is the rules'
own (`ingestd.rules.attach.attachable`) over a rule with `attach:` globs.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from structlog.testing import capture_logs

from ingestd.attachspool import AttachmentSpool
from ingestd.config import Archives, DropFolder
from ingestd.journal import Journal
from ingestd.logs import path_digest
from ingestd.receive.intake import NO_RULE_ATTACHES, path_parts, upload_of
from ingestd.receive.watcher import DropFolderWatcher
from ingestd.rules.attach import attachable
from ingestd.spool import Quarantine, Spool
from ingestd.states import BatchKind, StudyState
from tests.attaching import attach_rules, digests, instance_uploads, kept_files, spool_files
from tests.dicom import encode, make_study
from tests.procs import journal_rows

GLOBS = ("*/*/qBOLD/**", "*/*/*.PAR", "*/*/*.REC", "**/*.pdf", "**/results.zip", "**/physio/*.log")
NOT_ATTACHED = f", and {NO_RULE_ATTACHES}"


@dataclass
class Env:
    tmp: Path
    state: Path
    drop: Path
    journal: Journal
    spool: Spool
    quarantine: Quarantine
    attachments: AttachmentSpool
    watchers: list[DropFolderWatcher] = field(default_factory=list)

    def watcher(self, *, limits: Archives | None = None, retry_seconds: float = 0.0) -> DropFolderWatcher:
        rules = attach_rules(self.tmp, *GLOBS)
        watcher = DropFolderWatcher(
            DropFolder(path=self.drop, settle_seconds=0),
            limits or Archives(),
            self.spool,
            self.quarantine,
            retry_seconds=retry_seconds,
            attachable=lambda relative: attachable(rules, relative),
            attachments=self.attachments,
        )
        self.watchers.append(watcher)
        return watcher

    def take(self, watcher: DropFolderWatcher | None = None) -> None:
        """A pass for the files, then one per folder level they left empty (removed a level at a time)."""
        watcher = watcher or self.watcher()
        for _pass in range(6):
            watcher.scan_once()

    def kept(self) -> dict[str, Any]:
        return kept_files(self.journal.path)

    def quarantined(self) -> dict[str, str]:
        """Source detail -> reason of every quarantined item."""
        rows = journal_rows(self.journal.path, "SELECT source_detail, reason FROM quarantine")
        return {str(detail): str(reason) for detail, reason in rows}

    def drop_is_empty(self) -> bool:
        return not any(self.drop.iterdir())


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    state = tmp_path / "state"
    state.mkdir()
    journal = Journal(state / "journal.sqlite")
    drop = tmp_path / "drop"
    drop.mkdir()
    spool, quarantine = Spool(state / "spool", journal), Quarantine(state / "quarantine", journal)
    made = Env(tmp_path, state, drop, journal, spool, quarantine, AttachmentSpool(state, journal))
    try:
        yield made
    finally:
        for watcher in made.watchers:
            watcher.stop()
        journal.close()


def write(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def session_tree(root: Path) -> tuple[list[pydicom.Dataset], dict[str, bytes]]:
    """`sub01/ses01/` with three DICOM files, qBOLD results (one in a subfolder), a PAR/REC pair, a stray note."""
    study = make_study(series=1, per_series=3)
    for index, ds in enumerate(study):
        write(root / f"sub01/ses01/IM{index}.dcm", encode(ds))
    files = {
        "sub01/ses01/qBOLD/OEF.nii.gz": os.urandom(300_000),
        "sub01/ses01/qBOLD/fits/R2prime.txt": b"R2' fit residuals\n" * 100,
        "sub01/ses01/scan.PAR": b"# === DATA DESCRIPTION FILE ===\n" * 50,
        "sub01/ses01/scan.REC": os.urandom(5 * 1024 * 1024),  # over the size tried as DICOM in memory
    }
    for relative, data in files.items():
        write(root / relative, data)
    write(root / "sub01/ses01/notes.txt", b"not for XNAT\n")
    return study, files


def test_a_session_folder_keeps_its_instances_and_attaches_its_results(env: Env) -> None:
    study, files = session_tree(env.drop)
    with capture_logs() as logs:
        env.take()
    assert env.drop_is_empty()
    # Every instance, with its upload: the top-level folder.
    assert instance_uploads(env.journal.path) == {str(ds.SOPInstanceUID): "sub01" for ds in study}
    kept = env.kept()
    assert set(kept) == set(files)
    for relative, data in files.items():
        row = kept[relative]
        assert (row.sha256, row.md5) == digests(data)
        assert row.size == len(data)
        assert row.upload == "sub01" and row.source_detail == relative
        assert row.kind == BatchKind.FILES and row.state == StudyState.RECEIVING
        assert (env.state / row.spool_path).read_bytes() == data
    assert len({row.batch_id for row in kept.values()}) == 1  # one set for the upload
    assert spool_files(env.state) == {row.spool_path for row in kept.values()}  # nothing in .tmp, nothing else
    assert env.quarantined() == {"sub01/ses01/notes.txt": "not a DICOM file" + NOT_ATTACHED}
    # Logs name files by digests only, with nouns for events.
    attached = [entry for entry in logs if entry["event"] == "drop.file_attached"]
    assert sorted(entry["file"] for entry in attached) == sorted(path_digest(relative) for relative in files)
    text = repr(logs)
    assert "qBOLD" not in text and "scan.PAR" not in text and "notes.txt" not in text


def test_upload_and_relative_of_a_detail() -> None:
    assert upload_of("sub01/ses/x.pdf") == "sub01"
    assert upload_of("scan.zip!a/b.pdf") == "scan.zip"
    assert upload_of("x.pdf") == "x.pdf"
    assert upload_of("up/scan.zip!a/b.pdf") == "up"
    assert path_parts("scan.zip!a/b.pdf") == "a/b.pdf"
    assert path_parts("up/s.zip!ses/qBOLD/x") == "up/ses/qBOLD/x"


def test_a_zip_with_instances_attachments_and_strays(env: Env) -> None:
    study = make_study(series=1, per_series=2)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("../../escapes.txt", b"never opened")  # attached whole: never read as an archive
    members = {
        "sub01/ses01/IM0.dcm": encode(study[0]),
        "sub01/ses01/IM1.dcm": encode(study[1]),
        "sub01/ses01/qBOLD/map.txt": b"a map\n" * 10,
        "sub01/ses01/protocol.pdf": b"%PDF-1.4 protocol\n",
        "sub01/ses01/qBOLD/results.zip": inner.getvalue(),
        "sub01/ses01/notes.txt": b"stray\n",
        "sub01/ses01/nested.zip": inner.getvalue(),
    }
    with zipfile.ZipFile(env.drop / "upload.zip", "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    env.take()
    assert env.drop_is_empty()
    assert instance_uploads(env.journal.path) == {str(ds.SOPInstanceUID): "upload.zip" for ds in study}
    kept = env.kept()
    expected = ("sub01/ses01/qBOLD/map.txt", "sub01/ses01/protocol.pdf", "sub01/ses01/qBOLD/results.zip")
    assert set(kept) == set(expected)
    for relative in expected:
        assert kept[relative].source_detail == f"upload.zip!{relative}"
        assert kept[relative].upload == "upload.zip"
        assert (kept[relative].sha256, kept[relative].md5) == digests(members[relative])
    assert env.quarantined() == {
        "upload.zip!sub01/ses01/notes.txt": "not a DICOM file" + NOT_ATTACHED,
        "upload.zip!sub01/ses01/nested.zip": "nested archive" + NOT_ATTACHED,
    }


def test_an_archive_whose_path_is_attached_is_kept_whole_never_opened(env: Env) -> None:
    study = make_study(series=1, per_series=1)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as archive:
        for name, data in {"IM0.dcm": encode(study[0]), "../../../etc/evil": b"x"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = write(env.drop / "sub01/ses01/qBOLD/qBOLD.tar.gz", tar.getvalue())
    env.take()
    assert env.drop_is_empty()
    assert instance_uploads(env.journal.path) == {}  # its DICOM member is not read: the archive is one file
    assert env.quarantined() == {}
    [row] = env.kept().values()
    assert row.relative == "sub01/ses01/qBOLD/qBOLD.tar.gz"
    assert (row.sha256, (env.state / row.spool_path).read_bytes()) == (digests(data)[0], data)


def _tar(members: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info in members:
            archive.addfile(info, io.BytesIO(data[info.name]) if info.name in data else None)
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size, link
    return info


HOSTILE: dict[str, tuple[bytes, str]] = {
    "too-many.zip": (_zip({f"s/e/qBOLD/{n}.txt": b"x" for n in range(5)}), "archives.max_members"),
    "bomb.zip": (_zip({"s/e/qBOLD/zeros.txt": bytes(900 * 1024)}), "archives.max_ratio"),
    "big.zip": (_zip({"s/e/qBOLD/big.bin": os.urandom(2 * 1024 * 1024)}), "archives.max_member_mb"),
    "slip.zip": (_zip({"../s/e/qBOLD/x.txt": b"x"}), "escaping the folder"),
    "link.tar": (_tar([_info("s/e/qBOLD/l.txt", tarfile.SYMTYPE, link="/etc/passwd")], {}), "is a symbolic link"),
    "fifo.tar": (_tar([_info("s/e/qBOLD/f.txt", tarfile.FIFOTYPE)], {}), "is a device or pipe"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_archives_of_attachable_members_obey_the_limits(env: Env, name: str) -> None:
    data, reason = HOSTILE[name]
    write(env.drop / name, data)
    env.take(env.watcher(limits=Archives(max_members=3, max_ratio=50, max_member_mb=1)))
    assert env.drop_is_empty()
    assert env.kept() == {}
    assert spool_files(env.state) == set()
    [(detail, why)] = env.quarantined().items()
    assert detail == name
    assert reason in why


def test_a_single_attachable_file_over_the_member_limit_is_quarantined(env: Env) -> None:
    write(env.drop / "sub01/ses01/scan.REC", os.urandom(2 * 1024 * 1024 + 1))
    env.take(env.watcher(limits=Archives(max_member_mb=1)))
    assert env.kept() == {}
    assert list(env.quarantined().values()) == [
        "file is 2 MB, over archives.max_member_mb (1), the largest instance ingestd takes"
    ]


def test_links_and_pipes_at_attachable_paths_are_never_opened(env: Env) -> None:
    outside = write(env.tmp / "secret.txt", b"outside the drop folder")
    (env.drop / "sub01/ses01/qBOLD").mkdir(parents=True)
    (env.drop / "sub01/ses01/qBOLD/link.txt").symlink_to(env.tmp / "secret.txt")
    os.mkfifo(env.drop / "sub01/ses01/qBOLD/pipe.txt")
    env.take()
    assert env.kept() == {} and env.quarantined() == {}
    assert (env.drop / "sub01/ses01/qBOLD/link.txt").is_symlink()  # left alone, as any link
    assert (env.tmp / "secret.txt").read_bytes() == outside


def test_the_same_files_again_are_kept_once_and_other_content_replaces(env: Env) -> None:
    _study, files = session_tree(env.drop)
    env.take()
    first = env.kept()
    session_tree(env.drop)  # other DICOM, other random results: the PAR and the fit are the same bytes
    for relative in ("sub01/ses01/scan.PAR", "sub01/ses01/qBOLD/fits/R2prime.txt"):
        write(env.drop / relative, files[relative])
    env.take()
    assert env.drop_is_empty()
    again = env.kept()
    assert set(again) == set(first)
    for relative in ("sub01/ses01/scan.PAR", "sub01/ses01/qBOLD/fits/R2prime.txt"):
        assert again[relative] == first[relative]  # a duplicate: the same row, the same copy
    for relative in ("sub01/ses01/qBOLD/OEF.nii.gz", "sub01/ses01/scan.REC"):
        assert again[relative].sha256 != first[relative].sha256  # replaced while the set receives
        assert not (env.state / first[relative].spool_path).exists()
    assert spool_files(env.state) == {row.spool_path for row in again.values()}


def test_a_full_attachment_spool_leaves_the_drop_in_place_until_it_has_room(env: Env) -> None:
    study = make_study(series=1, per_series=1)
    archive = write(env.drop / "upload.zip", _zip({"s/e/IM0.dcm": encode(study[0]), "s/e/qBOLD/map.txt": b"map\n"}))
    env.attachments.min_free_bytes = 2**62
    watcher = env.watcher()
    env.take(watcher)
    assert (env.drop / "upload.zip").read_bytes() == archive  # its instance is spooled, its attachment is not
    assert instance_uploads(env.journal.path) == {str(study[0].SOPInstanceUID): "upload.zip"}
    assert env.kept() == {} and spool_files(env.state) == set()
    env.attachments.min_free_bytes = 0
    env.take(watcher)
    assert env.drop_is_empty()
    assert set(env.kept()) == {"s/e/qBOLD/map.txt"}
    assert len(journal_rows(env.journal.path, "SELECT id FROM instances")) == 1


def test_without_an_attachment_spool_nothing_is_attached(env: Env) -> None:
    write(env.drop / "sub01/ses01/scan.PAR", b"# PAR\n")
    watcher = DropFolderWatcher(
        DropFolder(path=env.drop, settle_seconds=0), Archives(), env.spool, env.quarantine, attachable=lambda _: True
    )
    watcher.scan_once()
    assert env.kept() == {}
    assert env.quarantined() == {"sub01/ses01/scan.PAR": "not a DICOM file" + NOT_ATTACHED}


def test_recovery_removes_temp_files_and_copies_the_journal_does_not_know(env: Env) -> None:
    session_tree(env.drop)
    env.take()
    kept = {row.spool_path for row in env.kept().values()}
    write(env.state / "attachments/.tmp/abc.part", b"half a copy")
    write(env.state / "attachments/0123abcd", b"copied, never journaled")
    assert env.attachments.recover() == {"temp_files_removed": 1, "unknown_files_removed": 1}
    assert spool_files(env.state) == kept


def test_a_file_that_changes_while_it_is_copied_is_kept_only_as_it_ends_up(env: Env) -> None:
    original = write(env.drop / "sub01/ses01/scan.REC", os.urandom(6 * 1024 * 1024))  # copied as it is read
    rules = attach_rules(env.tmp, *GLOBS)
    appended: list[str] = []

    def attachable_while_a_writer_appends(relative: str) -> bool:
        if not appended:  # asked once the file was chosen, before it is copied: the writer is not done
            appended.append(relative)
            with (env.drop / relative).open("ab") as out:
                out.write(b"the rest")
        return attachable(rules, relative)

    watcher = DropFolderWatcher(
        DropFolder(path=env.drop, settle_seconds=0),
        Archives(),
        env.spool,
        env.quarantine,
        retry_seconds=0,
        attachable=attachable_while_a_writer_appends,
        attachments=env.attachments,
    )
    watcher.scan_once()
    assert env.kept() == {} and spool_files(env.state) == set()  # the copy of a changing file is not kept
    assert (env.drop / "sub01/ses01/scan.REC").is_file()
    env.take(watcher)
    [row] = env.kept().values()
    assert (row.sha256, row.size) == (digests(original + b"the rest")[0], len(original) + 8)
    assert spool_files(env.state) == {row.spool_path}
    assert env.drop_is_empty()


def test_a_tiny_or_empty_attachable_file_is_attached_at_once(env: Env) -> None:
    """Under 132 bytes any file could begin a DICOM file (a preamble is any 128 bytes): one a rule attaches is
    attached, not left to wait `incomplete_seconds` and then quarantined."""
    files = {"sub01/ses01/qBOLD/done.txt": b"ok\n", "sub01/ses01/qBOLD/empty.txt": b""}
    for relative, data in files.items():
        write(env.drop / relative, data)
    env.take()
    assert env.drop_is_empty() and not env.quarantined()
    assert {relative: row.size for relative, row in env.kept().items()} == {r: len(d) for r, d in files.items()}
