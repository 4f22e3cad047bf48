"""`ingestd import`: a folder tree and an archive taken through spool, rules, de-identification and the XNAT stand-in.

The command runs as a user runs it, in a process of its own (stdout not a terminal unless a test gives it one), with
the stand-in on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, MRImageStorage

from ingestd.bulk import find_sources
from ingestd.journal import Journal, Source
from ingestd.progress import Counts
from ingestd.quarantined import content_digest
from ingestd.spool import Quarantine
from ingestd.states import StudyState
from ingestd.testing.xnat import FakeXnat
from tests.dicom import encode, make_study, write_instances
from tests.procs import DaemonProcess, journal_rows, run_ingestd, wait_until

RULES = """
profiles:
  research: {key: {env: INGESTD_TEST_KEY}}
rules:
  - name: bulk-mr
    when: {drop_folder: tree, Modality: MR}
    route: {server: main, project: PROJ, subject: '{path[0]}', session: '{path[0]}_{path[1]}', archive: true}
    anonymize: research
"""

SUBJECTS = ("subj01", "subj02", "subj03")


def write_config(tmp_path: Path, url: str, *, rules: str = RULES, extra: str = "") -> Path:
    """A daemon's configuration for `ingestd import` into the stand-in at `url` (`extra`: more top-level lines)."""
    (tmp_path / "import.rules.yaml").write_text(rules)
    config = tmp_path / "ingestd.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "listener: {enabled: false}\n"
        "spool: {min_free_mb: 0}\n"
        "logging: {level: info, format: json}\n"
        "rules: [import.rules.yaml]\n"
        "xnat:\n"
        "  servers:\n"
        "    main:\n"
        f"      url: {url}\n"
        "      credentials: {env_username: XNAT_TEST_USER, env_password: XNAT_TEST_PASSWORD}\n"
        "      poll_interval_seconds: 0.1\n"
        "      build_wait_seconds: 0.3\n"
        "      ready_timeout_seconds: 30\n"
        "      retry: {initial_seconds: 0.1, max_seconds: 0.5, max_attempts: 10}\n" + extra
    )
    return config


def subject_study(subject: str, *, sop_class: str = MRImageStorage) -> list[pydicom.Dataset]:
    """Two series of two instances, with distinct SeriesNumbers (XNAT files scans by them)."""
    study = make_study(series=2, per_series=2, sop_class=sop_class)
    first_series = study[0].SeriesInstanceUID
    for ds in study:
        ds.SeriesNumber = 1 if ds.SeriesInstanceUID == first_series else 2
        ds.PatientID = f"ID-{subject}"
        ds.PatientName = f"Importer^{subject}"
    return study


def make_tree(root: Path) -> dict[str, list[pydicom.Dataset]]:
    """`tree/<subject>/MR1/<series>/IM*.dcm` for two subjects, a zip holding the third, a text file, a hidden file."""
    studies = {subject: subject_study(subject) for subject in SUBJECTS}
    tree = root / "tree"
    for subject in SUBJECTS[:2]:
        study = studies[subject]
        write_instances(study[:2], tree / subject / "MR1" / "series1")
        write_instances(study[2:], tree / subject / "MR1" / "series2")
    with zipfile.ZipFile(tree / "subj03.zip", "w") as archive:
        for index, ds in enumerate(studies["subj03"]):
            archive.writestr(f"subj03/MR1/s{index // 2 + 1}/IM{index}.dcm", encode(ds))
    (tree / "notes.txt").write_text("acquisition notes, not an image\n")
    (tree / ".DS_Store").write_bytes(b"\0" * 64)
    return studies


def ingestd(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_ingestd(*args, cwd=cwd, timeout=timeout)


def imports(xnat: FakeXnat) -> int:
    return sum(1 for method, path, _status in xnat.requests_log if method == "POST" and "services/import" in path)


def logged(stderr: str, event: str) -> list[dict[str, Any]]:
    records = []
    for line in stderr.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                records.append(record)
    return records


def tree_snapshot(tree: Path) -> dict[str, bytes]:
    return {path.relative_to(tree).as_posix(): path.read_bytes() for path in sorted(tree.rglob("*")) if path.is_file()}


def test_import_twice_delivers_each_study_once(tmp_path: Path, xnat: FakeXnat) -> None:
    config = write_config(tmp_path, xnat.url)
    studies = make_tree(tmp_path)
    tree = tmp_path / "tree"
    before = tree_snapshot(tree)

    first = ingestd("import", "--config", str(config), str(tree), cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    # Not a terminal: progress comes as whole lines, never redrawn in place.
    assert "\r" not in out
    progress = [line for line in out.splitlines() if line.startswith("import: files ")]
    assert progress, out
    assert progress[-1] == (
        "import: files 10/10 scanned, 12 instances spooled, 1 quarantined, studies 3/3 delivered, 0 held"
    )
    rows = [line.split() for line in out.splitlines() if line.startswith("sha256:")]
    assert len(rows) == 3 and all(row[1] == "delivered" and row[2] == "4" for row in rows), out
    assert {row[3] for row in rows} == {f"PROJ/{subject}/{subject}_MR1" for subject in SUBJECTS}
    assert all(row[4].startswith("/data/archive/projects/PROJ/") for row in rows)
    assert "not a DICOM file" in out and "notes.txt" not in out  # named by a digest unless --show-paths
    assert "1 passed over" in out  # .DS_Store

    experiments = xnat.experiments("PROJ")
    assert sorted(e.label for e in experiments) == [f"{subject}_MR1" for subject in SUBJECTS]
    assert all(sum(len(scan.files) for scan in e.scans.values()) == 4 for e in experiments)
    assert imports(xnat) == 3
    assert tree_snapshot(tree) == before  # nothing moved, deleted or changed
    journal = tmp_path / "state" / "journal.sqlite"
    assert journal_rows(journal, "SELECT DISTINCT upload FROM instances") == [(".",)]  # one upload: the folder
    (sidecar,) = (tmp_path / "state" / "quarantine").glob("*.reason.json")
    assert json.loads(sidecar.read_text())["detail"] == "notes.txt"  # a copy of it, with its reason
    copy = sidecar.with_name(sidecar.name.removesuffix(".reason.json"))
    assert copy.read_bytes() == before["notes.txt"]

    # Logs: the import's events, and no original UID, patient name or file path in any line.
    assert logged(first.stderr, "import.started") and logged(first.stderr, "import.finished")
    finished = logged(first.stderr, "import.finished")[0]
    assert (finished["studies"], finished["delivered"], finished["quarantined"]) == (3, 3, 1)
    uids = {str(ds.StudyInstanceUID) for study in studies.values() for ds in study}
    for text in (first.stdout, first.stderr):
        assert not any(uid in text for uid in uids)
        assert "Importer^" not in text and "MR1/series1" not in text

    second = ingestd("import", "--config", str(config), str(tree), cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "12 already known" in second.stdout and "studies 3/3 delivered" in second.stdout
    # notes.txt is in quarantine already (the same content from the same path): not copied again.
    assert "0 quarantined, 1 already quarantined" in second.stdout
    assert "already quarantined: sha256:" in second.stdout and "not a DICOM file" in second.stdout
    assert len(list((tmp_path / "state" / "quarantine").glob("*.reason.json"))) == 1
    assert logged(second.stderr, "import.file_already_quarantined")[0]["item"] == copy.name
    rows = [line.split() for line in second.stdout.splitlines() if line.startswith("sha256:")]
    assert len(rows) == 3 and all(row[1:3] == ["already", "delivered"] for row in rows), second.stdout
    assert imports(xnat) == 3 and len(xnat.experiments("PROJ")) == 3
    state = tmp_path / "state"
    assert journal_rows(state / "journal.sqlite", "SELECT count(*), min(state), max(state) FROM batches") == [
        (3, "delivered", "delivered")
    ]
    assert tree_snapshot(tree) == before

    # Changed since: another copy, with its reason; the earlier copy stays.
    (tree / "notes.txt").write_text("acquisition notes, corrected\n")
    third = ingestd("import", "--config", str(config), str(tree), cwd=tmp_path)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "1 quarantined, 0 already quarantined" in third.stdout
    assert len(list((tmp_path / "state" / "quarantine").glob("*.reason.json"))) == 2 and copy.is_file()


def test_dry_run_writes_and_sends_nothing(tmp_path: Path, xnat: FakeXnat) -> None:
    config = write_config(tmp_path, xnat.url)
    make_tree(tmp_path)
    (tmp_path / "tree" / "subj02" / "CT").mkdir()
    write_instances(subject_study("subj02", sop_class=CTImageStorage), tmp_path / "tree" / "subj02" / "CT" / "s1")

    result = ingestd(
        "import", "--dry-run", "--show-paths", "--config", str(config), str(tmp_path / "tree"), cwd=tmp_path
    )
    assert result.returncode == 1, result.stdout + result.stderr  # the CT study would be held
    out = result.stdout
    decisions = [line for line in out.splitlines() if line.startswith("sha256:")]
    assert len(decisions) == 4, out
    for subject in SUBJECTS:
        assert any(
            f"rule bulk-mr would deliver to main PROJ/{subject}/{subject}_MR1" in line
            and "de-identified by profile research" in line
            for line in decisions
        ), out
    assert sum("would be held (unrouted)" in line for line in decisions) == 1
    assert "would be quarantined: notes.txt: not a DICOM file" in out
    assert "nothing was written or sent" in out
    assert not (tmp_path / "state").exists()
    assert xnat.requests_log == []


def test_sources_pass_over_hidden_and_partial_files_and_links(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "IM1").write_bytes(b"x")
    (tree / "a" / "IM2.part").write_bytes(b"x")
    (tree / ".hidden").mkdir()
    (tree / ".hidden" / "IM3").write_bytes(b"x")
    (tree / "link").symlink_to(tree / "a" / "IM1")
    (tree / "folder-link").symlink_to(tree / "a")
    single = tmp_path / "single.zip"
    single.write_bytes(b"y")
    found = find_sources([tree, single])
    assert [(file.root, file.relative) for file in found.files] == [(tree, "a/IM1"), (tmp_path, "single.zip")]
    # The upload: `.` for everything under a folder given, its name for a file given alone.
    assert [file.upload for file in found.files] == [".", "single.zip"]
    assert found.passed_over == 4 and found.unreadable == []


def run_on_a_terminal(args: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """Run `python -m ingestd ARGS` with its stdout on a pseudo-terminal; return its status and what it wrote."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "ingestd", *args],
        stdout=secondary,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )
    os.close(secondary)
    output = bytearray()
    with contextlib.suppress(OSError):  # EIO once the child closed its end
        while chunk := os.read(primary, 65536):
            output += chunk
    os.close(primary)
    return process.wait(timeout=timeout), output.decode(errors="replace")


def test_a_held_study_makes_the_import_fail_with_its_reason(tmp_path: Path, xnat: FakeXnat) -> None:
    config = write_config(tmp_path, xnat.url)
    tree = tmp_path / "tree"
    write_instances(subject_study("subj01"), tree / "subj01" / "MR1" / "s1")
    write_instances(subject_study("subj02", sop_class=CTImageStorage), tree / "subj02" / "CT1" / "s1")
    with zipfile.ZipFile(tree / "upload.zip", "w") as archive:  # hostile: a member escaping the folder
        archive.writestr("../Doe^John/IM1.dcm", encode(subject_study("subj03")[0]))

    status, out = run_on_a_terminal(["import", "--config", str(config), str(tree)], tmp_path)
    assert status == 1, out
    # A progress bar, redrawn in place (80 wide: a fresh pseudo-terminal does not say its width).
    assert "\rfiles: 100%" in out and "\rstudies: 100%" in out and "2/2" in out
    rows = [line.split(None, 4) for line in out.splitlines() if line.startswith("sha256:")]
    states = sorted((row[1], row[4] if len(row) > 4 else "") for row in rows)
    assert len(states) == 2, out
    (delivered, delivered_uri), (held, reason) = states
    assert delivered == "delivered" and "/data/archive/projects/PROJ/" in delivered_uri
    assert held == "held" and "unrouted" in reason and "no rule" in reason
    assert "ingestd retry --config" in out
    assert "quarantined: sha256:" in out and "has a path escaping the folder" in out and "Doe^John" not in out
    assert (tree / "upload.zip").is_file()  # quarantined as a copy: the user's file stays
    assert [e.label for e in xnat.experiments("PROJ")] == ["subj01_MR1"]


@pytest.mark.slow
def test_import_while_the_daemon_runs_leaves_routing_and_delivery_to_it(tmp_path: Path, xnat: FakeXnat) -> None:
    config = write_config(tmp_path, xnat.url)
    make_tree(tmp_path)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        result = ingestd("import", "--config", str(config), str(tmp_path / "tree"), cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr + daemon.log_tail()
        assert "a daemon runs: it routes and delivers" in result.stdout
        assert imports(xnat) == 3 and len(xnat.experiments("PROJ")) == 3
        assert len(daemon.logged("deliver.delivered")) == 3  # the daemon delivered them, not the import
        other = tmp_path / "other.rules.yaml"
        other.write_text(RULES.replace("bulk-mr", "other"))
        refused = ingestd(
            "import", "--config", str(config), "--rules", str(other), str(tmp_path / "tree"), cwd=tmp_path
        )
        assert refused.returncode == 2 and "routes by the rules of its configuration" in refused.stderr
        assert daemon.terminate() == 0


@pytest.mark.slow
def test_import_finishes_the_work_itself_when_the_daemon_stops(tmp_path: Path, xnat: FakeXnat) -> None:
    """A daemon without rules routes nothing; once it stops, the waiting import takes the lock and delivers."""
    config = write_config(tmp_path, xnat.url)
    idle = tmp_path / "idle.yaml"
    idle.write_text(f"state_dir: {tmp_path / 'state'}\nlistener: {{enabled: false}}\nlogging: {{format: json}}\n")
    make_tree(tmp_path)
    with DaemonProcess(idle, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        with subprocess.Popen(
            [sys.executable, "-m", "ingestd", "import", "--config", str(config), str(tmp_path / "tree")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        ) as importing:
            state = tmp_path / "state"
            wait_until(
                lambda: (
                    journal_rows(state / "journal.sqlite", "SELECT count(*) FROM batches WHERE state = 'complete'")
                    == [(3,)]
                ),
                30,
                message="the import to spool and complete its three studies",
            )
            assert importing.poll() is None and imports(xnat) == 0  # waiting for a daemon that routes nothing
            assert daemon.terminate() == 0
            out, err = importing.communicate(timeout=60)
    assert importing.returncode == 0, out + err
    assert "a daemon runs" in out and logged(err, "import.daemon_stopped")
    assert imports(xnat) == 3 and len(xnat.experiments("PROJ")) == 3


def test_import_reports_a_batch_xnat_keeps_failing_and_exits_1(tmp_path: Path, xnat: FakeXnat) -> None:
    """XNAT cuts every reply about one study short: that study is retried, then held; the import does not wait for
    ever, delivers the others, reports the held one with its reason, and exits 1."""
    config = write_config(tmp_path, xnat.url)
    tree = tmp_path / "tree"
    for subject in SUBJECTS[:2]:
        write_instances(subject_study(subject), tree / subject / "MR1" / "s1")
    xnat.truncate_next("GET", "/data/projects/PROJ/subjects/subj02/experiments/subj02_MR1", times=10_000, keep_bytes=9)
    result = ingestd("import", "--config", str(config), str(tree), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = sorted(line.split(None, 4)[1:] for line in result.stdout.splitlines() if line.startswith("sha256:"))
    assert [row[0] for row in rows] == ["delivered", "held"], result.stdout
    assert "not JSON" in rows[1][-1] and "gave up after 10 attempts" in rows[1][-1]
    # XNAT did archive it (only the replies about the archived session are cut): unverified, it stays held and
    # spooled until `ingestd retry` can see it there.
    assert sorted(e.label for e in xnat.experiments("PROJ")) == ["subj01_MR1", "subj02_MR1"]
    assert list((tmp_path / "state" / "spool").rglob("*.dcm"))


def test_counts_never_take_a_released_study_for_a_delivered_one() -> None:
    counts = Counts(files=2, scanned=2, spooled=4, studies=3)
    assert not counts.tally([StudyState.DELIVERED, StudyState.RELEASED, StudyState.ROUTED])
    assert counts.tally([StudyState.DELIVERED, StudyState.RELEASED, StudyState.DELIVERED])
    assert (counts.delivered, counts.held, counts.released, counts.finished) == (2, 0, 1, 3)
    assert not counts.succeeded  # a released study was not delivered: the import did not do what it was asked
    assert counts.line().endswith("studies 2/3 delivered, 0 held, 1 released")
    counts.tally([StudyState.DELIVERED] * 3)
    assert counts.succeeded and counts.line().endswith("studies 3/3 delivered, 0 held")


def test_a_study_released_before_the_import_is_reported_released_and_exits_1(tmp_path: Path, xnat: FakeXnat) -> None:
    """A held study a person released (`ingestd release`) is never reported as delivered, and the import fails."""
    config = write_config(tmp_path, xnat.url)
    tree = tmp_path / "tree"
    write_instances(subject_study("subj02", sop_class=CTImageStorage), tree / "subj02" / "CT1" / "s1")
    first = ingestd("import", "--config", str(config), str(tree), cwd=tmp_path)
    assert first.returncode == 1 and "0 delivered, 1 held" in first.stdout, first.stdout + first.stderr
    (study,) = [line.split()[0].split("#")[0] for line in first.stdout.splitlines() if line.startswith("sha256:")]
    released = ingestd("release", "--config", str(config), study, cwd=tmp_path)
    assert released.returncode == 0 and "released" in released.stdout, released.stdout + released.stderr

    again = ingestd("import", "--config", str(config), str(tree), cwd=tmp_path)
    assert again.returncode == 1, again.stdout + again.stderr
    assert ": 1 delivered" not in again.stdout and "studies 0/1 delivered" in again.stdout
    rows = [line.split() for line in again.stdout.splitlines() if line.startswith("sha256:")]
    if any(row[0].endswith("#1") for row in rows):  # the import met the released batch itself
        assert rows == [[f"{study}#1", "already", "released", "4", "-"]], again.stdout
        assert "1 study: 0 delivered, 0 held, 1 released" in again.stdout
        assert "handed over to a person" in again.stdout
        assert logged(again.stderr, "import.finished")[0]["released"] == 1
    else:  # a re-sent released study opens a new batch (issue 15): held again by the same rules, never delivered
        assert [row[:2] for row in rows] == [[f"{study}#2", "held"]], again.stdout
    assert xnat.experiments("PROJ") == []


def test_the_quarantine_finds_an_item_kept_before_by_source_and_content(tmp_path: Path) -> None:
    """What `ingestd import` asks before keeping a bad file or member again: the same content from the same path,
    still in quarantine and not purged."""
    journal = Journal(tmp_path / "journal.sqlite")
    try:
        quarantine = Quarantine(tmp_path / "quarantine", journal)
        member = Source("folder", "/data/tree", "upload.zip!a/notes.txt")
        kept = quarantine.put_bytes("notes.txt", b"not DICOM", "not a DICOM file", member)
        copied = tmp_path / "readme.txt"
        copied.write_bytes(b"also not DICOM")
        beside = Source("folder", "/data/tree", "readme.txt")
        copy = quarantine.put_copy(copied, "not a DICOM file", beside)
        assert quarantine.kept_before(member, content_digest(b"not DICOM")) == kept
        assert quarantine.kept_before(beside, content_digest(copied)) == copy
        assert quarantine.kept_before(member, content_digest(b"changed since")) is None
        assert (
            quarantine.kept_before(Source("folder", "/data/other", member.detail), content_digest(b"not DICOM")) is None
        )
        with journal.transaction() as tx:  # as retention does when it removes an item
            tx.execute("UPDATE quarantine SET purged_at = 1 WHERE path = ?", (copy.name,))
        assert quarantine.kept_before(beside, content_digest(copied)) is None
        kept.unlink()  # removed by hand: kept again next time
        assert quarantine.kept_before(member, content_digest(b"not DICOM")) is None
    finally:
        journal.close()
