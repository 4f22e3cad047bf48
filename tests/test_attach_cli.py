"""The commands on attachments: `explain` and `import --dry-run` say which files go where; `ingestd import` takes a
resource-only tree (the how-to pattern `<subject>/<session>/qBOLD/...`) to an existing session; `explain --config`
shows a spooled set; `check-rules` refuses unreviewed files on a de-identifying rule."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ingestd.testing.xnat import FakeXnat
from tests.dicom import make_study, write_instances
from tests.procs import journal_rows, run_ingestd

RULES = """\
profiles:
  research: {key: {env: INGESTD_TEST_KEY}}
rules:
  - name: results
    when: {drop_folder: TREE}
    route: {server: main, project: PROJ, subject: '{path[0]}', session: '{path[1]}', archive: true}
    attach:
      - {match: "*/*/qBOLD/**", resource: qBOLD}
      - {match: "**/*.PAR", resource: PARREC, level: scan, scan: "{path[2]}"}
"""


def _config(tmp_path: Path, url: str, tree: Path) -> Path:
    (tmp_path / "lab.rules.yaml").write_text(RULES.replace("TREE", str(tree)))
    config = tmp_path / "ingestd.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "listener: {enabled: false}\n"
        "spool: {min_free_mb: 0}\n"
        "logging: {level: info, format: json}\n"
        "rules: [lab.rules.yaml]\n"
        "xnat:\n"
        "  servers:\n"
        "    main:\n"
        f"      url: {url}\n"
        "      credentials: {env_username: XNAT_TEST_USER, env_password: XNAT_TEST_PASSWORD}\n"
        "      poll_interval_seconds: 0.1\n"
        "      build_wait_seconds: 0.3\n"
        "      retry: {initial_seconds: 0.1, max_seconds: 0.5, max_attempts: 10}\n"
    )
    return config


def _results(tree: Path, subject: str, session: str) -> dict[str, bytes]:
    files = {
        f"{subject}/{session}/qBOLD/OEF.nii": b"oef" * 1000,
        f"{subject}/{session}/qBOLD/fit/R2.txt": b"r2\n" * 50,
    }
    for relative, data in files.items():
        (tree / relative).parent.mkdir(parents=True, exist_ok=True)
        (tree / relative).write_bytes(data)
    return files


def test_explain_shows_where_each_file_would_go(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_instances(make_study(series=1, per_series=2), tree / "sub01" / "ses01" / "dicom")
    _results(tree, "sub01", "ses01")
    (tree / "sub01/ses01/7/scan_7.PAR").parent.mkdir(parents=True)
    (tree / "sub01/ses01/7/scan_7.PAR").write_text("# PAR\n")
    (tmp_path / "r.yaml").write_text(RULES.replace("TREE", str(tree)).replace("\nprofiles:\n", "\n"))
    result = run_ingestd("explain", "--rules", str(tmp_path / "r.yaml"), str(tree), env=_env())
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "2 files with study sha256:" in out and "would attach to main PROJ/sub01/ses01, resource qBOLD" in out
    assert "would attach to main PROJ/sub01/ses01, scan 7 resource PARREC" in out
    assert "sub01/ses01/qBOLD/fit/R2.txt -> fit/R2.txt" in out
    assert "sub01/ses01/7/scan_7.PAR -> scan_7.PAR" in out


def _env() -> dict[str, str]:
    import os  # noqa: PLC0415

    return {**os.environ, "INGESTD_TEST_KEY": "t" * 40}


def test_dry_run_lists_the_files_a_resource_only_tree_would_attach(tmp_path: Path, xnat: FakeXnat) -> None:
    tree = tmp_path / "tree"
    _results(tree, "sub01", "ses01")
    _results(tree, "sub01", "ses02")
    (tree / "sub01" / "notes.txt").write_text("x")
    config = _config(tmp_path, xnat.url, tree)
    result = run_ingestd("import", "--dry-run", "--config", str(config), str(tree))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("2 files without DICOM: rule results would attach to main PROJ/sub01/") == 2, out
    assert "4 files to attach" in out and "OEF.nii" not in out  # paths only with --show-paths
    shown = run_ingestd("import", "--dry-run", "--show-paths", "--config", str(config), str(tree)).stdout
    assert "sub01/ses02/qBOLD/OEF.nii -> OEF.nii" in shown
    assert not (tmp_path / "state").exists() and xnat.requests_log == []


def test_import_attaches_a_resource_only_tree_to_the_existing_session(tmp_path: Path, xnat: FakeXnat) -> None:
    """The scripts this replaces: a DICOM session imported first, then its results tree on its own."""
    scans, results = tmp_path / "scans", tmp_path / "results"
    study = make_study(series=1, per_series=2)
    for ds in study:
        ds.SeriesNumber = 7
    write_instances(study, scans / "sub01" / "ses01" / "dicom")
    config = _config(tmp_path, xnat.url, scans)
    first = run_ingestd("import", "--config", str(config), str(scans), env=_env())
    assert first.returncode == 0, first.stdout + first.stderr
    (tmp_path / "lab.rules.yaml").write_text(RULES.replace("TREE", str(results)))
    files = _results(results, "sub01", "ses01")
    second = run_ingestd("import", "--config", str(config), str(results), env=_env())
    assert second.returncode == 0, second.stdout + second.stderr
    state = xnat.resource_state("PROJ", "qBOLD", session="ses01")
    assert state is not None
    assert {name: digest for name, (_size, digest) in state.catalog.items()} == {
        relative.split("/qBOLD/", 1)[1]: hashlib.md5(data, usedforsecurity=False).hexdigest()
        for relative, data in files.items()
    }
    [(set_id,)] = journal_rows(tmp_path / "state" / "journal.sqlite", "SELECT id FROM batches WHERE kind = 'files'")
    shown = run_ingestd("explain", "--config", str(config), str(set_id), env=_env())
    assert shown.returncode == 0, shown.stderr
    assert "routed by rule results to main PROJ/sub01/ses01 (archive)" in shown.stdout
    assert "sub01/ses01/qBOLD/fit/R2.txt -> resource qBOLD: fit/R2.txt (verified in XNAT)" in shown.stdout


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("    anonymize: research\n", "cannot de-identify"),
        ("    attach_unreviewed_files: true\n", "used only by a rule that attaches files"),
    ],
)
def test_check_rules_refuses_unreviewed_files_on_a_de_identifying_rule(
    tmp_path: Path, extra: str, expected: str
) -> None:
    rules = RULES.replace("TREE", "/data/drop")
    if "attach_unreviewed" in extra:
        rules = rules.split("    attach:\n")[0] + extra
    else:
        rules += extra
    (tmp_path / "r.yaml").write_text(rules)
    result = run_ingestd("check-rules", str(tmp_path / "r.yaml"), env=_env())
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
