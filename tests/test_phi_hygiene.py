"""PHI and file modes: what a real daemon leaves on disk and in its logs.

A daemon started under umask 022 on a state directory an earlier run left 0755/0644 makes everything 0750/0640
(quarantined copies of dropped files included); a rule without `anonymize` that puts {PatientID} and
{AccessionNumber} into its labels delivers them to XNAT but logs only keyed digests (and `check-rules` warns);
path and member-name digests are HMACs under a per-installation key; `status` shows archive member names only
with --show-paths; `ingestd anonymize` never prints an original Study Instance UID.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest

from ingestd.digestkey import KEY_FILE, load_digest_key, read_digest_key
from ingestd.logs import path_digest, uid_digest, use_digest_key
from ingestd.testing.xnat import FakeXnat
from tests.dicom import encode, make_study, write_instances
from tests.procs import (
    DaemonProcess,
    Storescu,
    free_port,
    journal_rows,
    run_ingestd,
    wait_until,
    write_xnat_daemon_config,
)
from tests.test_offline import EXAMPLE
from tests.test_offline import _ingestd as offline_ingestd

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.slow]

PATIENT_ID = "MRN4711X"
ACCESSION = "ACC0815Y"
MEMBER = "../DOE^JOHN_MRN123.dcm"  # a member escaping the folder: the whole archive goes to quarantine
RAW_RULES = (
    "rules:\n"
    "  - name: raw\n"
    "    when: {calling_aet: STORESCU}\n"
    "    route: {server: main, project: PROJ, subject: '{PatientID}', session: '{subject}_{AccessionNumber}',"
    " archive: true}\n"
)


def _modes(root: Path) -> dict[str, str]:
    """Every entry below `root` (and `root`) whose mode is not 0750 (folders) or 0640 (files) -> its mode."""
    loose = {}
    for folder, subfolders, files in os.walk(root):
        for name in [".", *subfolders, *files]:
            path = Path(folder) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            wanted = 0o750 if stat.S_ISDIR(info.st_mode) else 0o640
            if name == KEY_FILE:
                wanted = 0o600
            if stat.S_IMODE(info.st_mode) != wanted:
                loose[str(path.relative_to(root))] = oct(stat.S_IMODE(info.st_mode))
    return loose


@pytest.fixture
def umask_022() -> object:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("umask_022")
def test_a_real_run_keeps_modes_and_keeps_identifiers_out_of_its_logs(tmp_path: Path, xnat: FakeXnat) -> None:
    port = free_port()
    drop = tmp_path / "drop"
    drop.mkdir()
    extra = f"drop_folders: [{{path: {drop}, settle_seconds: 0.2}}]\ndelivery: {{keep_after_delivery: true}}\n"
    config = write_xnat_daemon_config(tmp_path, port, xnat.url, rules=RAW_RULES, extra=extra)
    state = tmp_path / "state"
    # What an earlier run under umask 022 left: a 0755 state directory, spool and quarantine, a 0644 file.
    for folder in (state, state / "spool", state / "quarantine"):
        folder.mkdir(mode=0o755)
        folder.chmod(0o755)
    (state / "quarantine" / "old.txt").write_text("left by an earlier run")
    (state / "quarantine" / "old.txt").chmod(0o644)

    study = make_study(series=1, per_series=3)
    for ds in study:
        ds.PatientID, ds.AccessionNumber = PATIENT_ID, ACCESSION
    files = write_instances(study, tmp_path / "scan")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        (tmp_path / "notes.txt").write_text("not an image")  # quarantined as dropped: 0644 until ingestd takes it
        (tmp_path / "notes.txt").chmod(0o644)
        (tmp_path / "notes.txt").rename(drop / "notes.txt")
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr(MEMBER, encode(study[0]))
        (drop / "upload.zip").write_bytes(archive.getvalue())
        with Storescu(port, files) as storescu:
            assert storescu.wait() == 0, storescu.output()
        wait_until(
            lambda: journal_rows(state / "journal.sqlite", "SELECT state FROM batches") == [("delivered",)],
            60,
            interval=0.3,
            message="the study to be delivered",
        )
        wait_until(lambda: len(journal_rows(state / "journal.sqlite", "SELECT * FROM quarantine")) == 2, 30)
        routed = daemon.wait_logged("route.routed")
        delivered = daemon.wait_logged("deliver.delivered")
        assert daemon.terminate() == 0

    # XNAT got the labels as the rule says: the lab chose to send them.
    (experiment,) = xnat.experiments("PROJ")
    assert experiment.label == f"{PATIENT_ID}_{ACCESSION}"

    # The logs never name them: route.routed and deliver.* carry keyed digests.
    text = (tmp_path / "daemon.log").read_text()
    for secret in (PATIENT_ID, ACCESSION, "DOE^JOHN", "MRN123", "notes.txt"):
        assert secret not in text, secret
    key = read_digest_key(state)
    assert key is not None
    use_digest_key(key)
    assert routed["subject"] == delivered["subject"] == path_digest(PATIENT_ID)
    assert routed["session"] == path_digest(f"{PATIENT_ID}_{ACCESSION}")
    assert routed["project"] == "PROJ"  # a literal label is no identifier
    for record in daemon.logged("deliver.imported") + daemon.logged("deliver.archived"):
        assert record["uri"] is None or PATIENT_ID not in record["uri"]
    quarantined = {record["file"] for record in daemon.logged("drop.file_quarantined")}
    assert path_digest("notes.txt") in quarantined  # keyed with the installation's key ...
    assert "sha256:" + hashlib.sha256(b"notes.txt").hexdigest()[:16] not in quarantined  # ... not a bare hash

    # Modes: 0750 folders, 0640 files (journal, -wal/-shm, spool, outbox, packages, quarantine), key 0600.
    assert _modes(state) == {}
    assert any((state / "packages").iterdir()) and any((state / "spool").rglob("*.dcm"))  # kept after delivery
    assert stat.S_IMODE((state / KEY_FILE).stat().st_mode) == 0o600

    # status hides member names unless asked; shows them to whoever may read the state directory when asked.
    hidden = run_ingestd("status", "--config", str(config))
    assert hidden.returncode == 0, hidden.stderr
    assert "DOE^JOHN" not in hidden.stdout and "MRN123" not in hidden.stdout
    assert path_digest(MEMBER) in hidden.stdout  # the same digest the log lines carry
    shown = run_ingestd("status", "--config", str(config), "--show-paths")
    assert "DOE^JOHN_MRN123" in shown.stdout


def test_the_digest_key_is_made_once_atomically_and_kept(tmp_path: Path) -> None:
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_digest_key(tmp_path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 32
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert [path.name for path in tmp_path.iterdir()] == [KEY_FILE]  # no temporary file left behind
    assert load_digest_key(tmp_path) == keys[0] == read_digest_key(tmp_path)
    use_digest_key(keys[0])
    first = path_digest("DOE^JOHN_MRN123/IM0001")
    use_digest_key(load_digest_key(tmp_path))
    assert path_digest("DOE^JOHN_MRN123/IM0001") == first  # stable across loads (and so across restarts)
    use_digest_key(b"\x00" * 32)
    assert path_digest("DOE^JOHN_MRN123/IM0001") != first  # another installation's digests do not match


def test_check_rules_warns_about_raw_identifying_labels(tmp_path: Path) -> None:
    rules = tmp_path / "raw.rules.yaml"
    rules.write_text(RAW_RULES)
    result = run_ingestd("check-rules", str(rules))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2  # {PatientID} in subject, {AccessionNumber} in session ({subject} is the same value)
    assert "{PatientID}" in warnings[0] and "route.subject" in warnings[0]
    assert "{AccessionNumber}" in warnings[1] and "route.session" in warnings[1]
    key = tmp_path / "label.key"
    key.write_text("k" * 40)
    key.chmod(0o600)
    hashed = tmp_path / "hashed.rules.yaml"
    hashed.write_text(
        RAW_RULES.replace("'{PatientID}'", "'{PatientID:hash8}'")
        .replace("_{AccessionNumber}", "")
        .replace("archive: true}", f"archive: true, key: {{file: {key}}}}}")
    )
    result = run_ingestd("check-rules", str(hashed))
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr


def test_anonymize_names_studies_as_status_does(tmp_path: Path) -> None:
    """Written: by the new Study Instance UID (its folder's name); held: by the digest `status` shows."""
    study = make_study(series=1, per_series=2)
    for ds in study:
        ds.StudyDescription = "RESEARCH^BRAIN"
    write_instances(study, tmp_path / "in")
    original = study[0].StudyInstanceUID
    out = tmp_path / "out"
    result = offline_ingestd(
        "anonymize", "--rules", str(EXAMPLE), "--calling-aet", "SCANNER1", str(tmp_path / "in"), str(out)
    )
    assert result.returncode == 0, result.stderr
    (new_study,) = [path.name for path in out.iterdir()]
    assert result.stdout.startswith(f"study {new_study}: rule ")
    assert original not in result.stdout + result.stderr
    held = offline_ingestd("anonymize", "--rules", str(EXAMPLE), str(tmp_path / "in"), str(tmp_path / "none"))
    assert held.returncode != 0
    assert original not in held.stdout + held.stderr
    assert f"study {uid_digest(original)}: held" in held.stderr


QUARANTINE_AS_SERVICE_USER = """
import os, sys
from pathlib import Path
from ingestd.fsmodes import restrict_umask
from ingestd.journal import Journal, Source
from ingestd.spool import Quarantine
import sqlite3, shutil, json  # everything imported before the switch: the interpreter may be in root's home
os.setgid(65534)
os.setuid(65534)  # the service's user; the dropped file stays root's, as a dropper's file is
restrict_umask()
state, dropped = Path(sys.argv[1]), Path(sys.argv[2])
journal = Journal(state / "journal.sqlite")
kept = Quarantine(state / "quarantine", journal).put_file(dropped, "not DICOM", Source("folder", "drop", "x"))
journal.close()
print(kept)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop a file as one user and quarantine it as another")
def test_a_quarantined_file_another_user_dropped_becomes_ours_and_0640(tmp_path: Path) -> None:
    """A file keeps its owner and mode through a rename, and only its owner may chmod it: the service replaces it
    with a 0640 copy of its own, byte for byte, leaving nothing else behind."""
    base = Path(tempfile.mkdtemp(prefix="ingestd-owner-", dir="/tmp"))  # pytest's tmp_path is root's alone (0700)
    try:
        _quarantine_as_another_user(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _quarantine_as_another_user(base: Path) -> None:
    base.chmod(0o755)
    state, drop = base / "state", base / "drop"
    for folder in (state, drop):
        folder.mkdir()
        os.chown(folder, 65534, 65534)
    dropped = drop / "DOE^JOHN.txt"
    dropped.write_bytes(b"not DICOM, from another user" * 100)
    dropped.chmod(0o644)  # root's, 0644: what the service user may read but not chmod
    result = subprocess.run(
        [sys.executable, "-c", QUARANTINE_AS_SERVICE_USER, str(state), str(dropped)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=base,
    )
    assert result.returncode == 0, result.stderr
    kept = Path(result.stdout.strip().splitlines()[-1])  # after the log line
    info = kept.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (65534, 0o640)
    assert kept.read_bytes() == b"not DICOM, from another user" * 100
    assert not dropped.exists()
    assert not [p for p in kept.parent.iterdir() if p.name.endswith(".ingestd-own")]
