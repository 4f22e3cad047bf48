"""`ingestd explain` and `ingestd anonymize` as a user runs them: real files, the real command, its output."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from ingestd.logs import uid_digest
from tests.dicom import encode, make_study, write_instances
from tests.procs import run_ingestd
from tests.spooled import KEY as SPOOL_KEY
from tests.spooled import SpooledState, spooled_state

KEYS = {"INGESTD_KEY_RESEARCH": "r" * 40, "INGESTD_KEY_PET": "p" * 40}
EXAMPLE = Path(__file__).resolve().parents[1] / "rules" / "example.rules.yaml"


def _ingestd(*args: str) -> subprocess.CompletedProcess[str]:
    return run_ingestd(*args, env=os.environ | KEYS)


@pytest.fixture
def research_study(tmp_path: Path) -> Path:
    study = make_study(series=2, per_series=2)
    for ds in study:
        ds.StudyDescription = "RESEARCH^BRAIN"
        ds.SeriesDescription = "T1 SYN0001"
    folder = tmp_path / "in" / "visit"
    write_instances(study, folder)
    (folder / "notes.txt").write_text("not DICOM")
    return tmp_path / "in"


def test_explain_names_the_rule_the_labels_and_each_change(research_study: Path) -> None:
    result = _ingestd("explain", "--rules", str(EXAMPLE), "--calling-aet", "SCANNER1", str(research_study))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rule 'qa-phantom'" in out and "does not match" in out
    assert "decision: routed by rule 'mr-research'" in out
    assert "project PROJA" in out
    assert "(0010,0010) PatientName" in out and "'Synthetic^Test' -> " in out
    assert "(0008,0018) SOPInstanceUID" in out and "-> '2.25." in out
    assert "skipped" in result.stderr and "notes.txt" in result.stderr


def test_explain_without_a_matching_rule_says_held(research_study: Path) -> None:
    result = _ingestd("explain", "--rules", str(EXAMPLE), str(research_study))
    assert result.returncode == 0, result.stderr
    assert "held (unrouted): no rule matches this study" in result.stdout


def test_anonymize_writes_what_the_daemon_would(research_study: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("anonymize", "--rules", str(EXAMPLE), "--calling-aet", "SCANNER1", str(research_study), str(out))
    result = _ingestd(*args)
    assert result.returncode == 0, result.stderr
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 4
    for path in files:
        assert all(part.startswith("2.25.") for part in path.relative_to(out).with_suffix("").parts)
        data = path.read_bytes()
        assert b"SYN0001" not in data and b"Synthetic" not in data
        ds = pydicom.dcmread(path)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == path.stem
    again = _ingestd(*args[:-1], str(tmp_path / "again"))
    assert again.returncode == 0
    second = sorted((tmp_path / "again").rglob("*.dcm"))
    assert [p.relative_to(tmp_path / "again") for p in second] == [p.relative_to(out) for p in files]
    assert [p.read_bytes() for p in second] == [p.read_bytes() for p in files]


def test_anonymize_refuses_what_would_be_held(research_study: Path, tmp_path: Path) -> None:
    result = _ingestd("anonymize", "--rules", str(EXAMPLE), str(research_study), str(tmp_path / "out"))
    assert result.returncode == 1
    assert "held (unrouted)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_anonymize_with_a_named_rule(research_study: Path, tmp_path: Path) -> None:
    result = _ingestd(
        "anonymize", "--rules", str(EXAMPLE), "--rule", "mr-research", str(research_study), str(tmp_path / "out")
    )
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 4


@pytest.mark.parametrize("name", ["ExplVR_BigEndNoMeta.dcm", "rtstruct.dcm"])
def test_anonymize_reads_a_file_without_preamble_or_file_meta(name: str, tmp_path: Path) -> None:
    """As the daemon's intake takes it: the missing preamble and file meta are built (they used to be skipped)."""
    rules = tmp_path / "any.rules.yaml"
    rules.write_text(
        "profiles:\n  research: {key: {env: INGESTD_KEY_RESEARCH}}\nrules:\n"
        "  - {name: any, when: {}, route: {server: main, project: P, subject: S, session: X}, anonymize: research}\n"
    )
    source = Path(str(get_testdata_file(name)))
    assert source.read_bytes()[128:132] != b"DICM"
    result = _ingestd("anonymize", "--rules", str(rules), str(source), str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    (written,) = (tmp_path / "out").rglob("*.dcm")
    assert pydicom.dcmread(written).PatientIdentityRemoved == "YES"


def test_explain_reads_archives_and_passes_over_hidden_files(research_study: Path, tmp_path: Path) -> None:
    """What `ingestd import` and a drop folder take, and only that."""
    visit = research_study / "visit"
    hidden = make_study(series=1, per_series=1)
    write_instances(hidden, research_study / ".trash")
    zipped = make_study(series=1, per_series=1)
    with zipfile.ZipFile(visit / "more.zip", "w") as archive:
        archive.writestr("IM.dcm", encode(zipped[0]))
    result = _ingestd("explain", "--rules", str(EXAMPLE), str(research_study))
    assert result.returncode == 0, result.stderr
    assert f"study {zipped[0].StudyInstanceUID}:" in result.stdout
    assert str(hidden[0].StudyInstanceUID) not in result.stdout + result.stderr


# -- `ingestd explain --config FILE BATCH`: a study already in the spool ----------------------------------------


@pytest.fixture
def spooled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SpooledState:
    monkeypatch.setenv("INGESTD_TEST_KEY", SPOOL_KEY)
    return spooled_state(tmp_path)


def _explain(state: SpooledState, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"INGESTD_TEST_KEY": SPOOL_KEY}
    return run_ingestd("explain", "--config", str(state.config_file), *args, env=env)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and modification time (but SQLite's -wal and -shm files, which a
    reader of a WAL journal may create: the journal's rows are in journal.sqlite, its WAL is checkpointed)."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.endswith(("-wal", "-shm"))
    }


def test_explain_a_held_batch_by_id_as_the_router_saw_it_and_write_nothing(spooled: SpooledState) -> None:
    before = _snapshot(spooled.config.state_dir)
    batch_id = spooled.batch_ids["OTHER"]
    result = _explain(spooled, str(batch_id))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (
        f"batch {batch_id}: study sha256:" in out
        and "held (unrouted), 3 instance(s) received over DICOM from OTHER" in out
    )
    assert "calling AE OTHER, called AE INGESTD, drop folder -" in out  # the journal's source, as the router reads it
    assert "rule 'research'" in out and "when.calling_aet" in out and "fails" in out
    assert "held (unrouted): no rule matches this study" in out
    assert _snapshot(spooled.config.state_dir) == before  # read-only: journal, spool, outbox untouched


def test_explain_a_batch_by_digest_with_fixed_rules(spooled: SpooledState) -> None:
    """The admin's loop: explain the held study with the fixed rules before `retry`."""
    fixed = spooled.root / "fixed.rules.yaml"
    fixed.write_text(
        (spooled.root / "lab.rules.yaml").read_text()
        + "  - name: ct-other\n    when: {calling_aet: OTHER, Modality: CT}\n"
        "    route: {server: main, project: CT, subject: '{PatientID:hash8}', session: '{subject}_CT'}\n"
        "    anonymize: research\n"
    )
    digest = uid_digest(spooled.studies["OTHER"][0].StudyInstanceUID)
    result = _explain(spooled, "--rules", str(fixed), digest)
    assert result.returncode == 0, result.stderr
    assert "decision: routed by rule 'ct-other'" in result.stdout
    assert "de-identified by profile research" in result.stdout
    assert "(0010,0020) PatientID" in result.stdout  # what the profile does, read from the spooled file


def test_explain_a_dropped_batch_sees_its_drop_folder(spooled: SpooledState) -> None:
    result = _explain(spooled, f"#{spooled.batch_ids['drop']}")
    assert result.returncode == 0, result.stderr
    assert f"drop folder {spooled.root / 'drop'}, 1 dropped file" in result.stdout
    assert "decision: routed by rule 'raw-drop'" in result.stdout
    assert "no de-identification: the instances leave as received" in result.stdout


def test_explain_a_batch_with_a_rule_chosen_by_hand(spooled: SpooledState) -> None:
    import sqlite3  # noqa: PLC0415

    batch_id = spooled.batch_ids["OTHER"]
    with sqlite3.connect(spooled.config.journal_path) as db:  # as `ingestd resend --route raw-drop` records it
        db.execute("UPDATE batches SET forced_rule = 'raw-drop' WHERE id = ?", (batch_id,))
    result = _explain(spooled, str(batch_id))
    assert result.returncode == 0, result.stderr
    assert "rule raw-drop chosen by hand" in result.stdout
    assert "rule raw-drop -> server main, project RAW" in result.stdout


def test_explain_says_what_is_wrong_with_a_reference(spooled: SpooledState) -> None:
    files = run_ingestd("explain", str(spooled.root / "lab.rules.yaml"))  # a path without --rules or --config
    assert files.returncode == 2 and "to explain files give the rules (--rules FILE)" in files.stderr
    unknown = _explain(spooled, "999")
    assert unknown.returncode == 1 and "no batch is '999'" in unknown.stderr
    source = _explain(spooled, "--calling-aet", "X", "1")
    assert source.returncode == 2 and "--calling-aet is for files" in source.stderr
    for path in (spooled.config.state_dir / "spool").rglob("*.dcm"):
        path.unlink()
    gone = _explain(spooled, str(spooled.batch_ids["SCANNER"]))
    assert gone.returncode == 1 and "4 of 4 instance(s) not in the spool: nothing to explain" in gone.stderr
