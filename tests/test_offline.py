"""`ingestd explain` and `ingestd anonymize` as a user runs them: real files, the real command, its output."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.dicom import encode, make_study, write_instances
from tests.procs import run_ingestd

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
