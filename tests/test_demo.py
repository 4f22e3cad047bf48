"""`ingestd demo`: the newcomer's one command works from the installed package, and shows no patient data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_delivers_a_deidentified_study(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ingestd", "demo", "--keep", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "delivered to XNAT and verified" in out
    assert "scan   2  T1 MPRAGE" in out and "scan   3  T2 FLAIR" in out and "Localizer series was dropped" in out
    xnat_column = [line[52:] for line in out.splitlines() if line.startswith("  Patient")]
    assert xnat_column and not any("DEMO" in value or "MRN" in value for value in xnat_column)
    assert (tmp_path / "demo" / "ingestd.yaml").is_file()
    assert "Traceback" not in result.stderr
