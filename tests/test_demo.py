"""`ingestd demo`: the newcomer's one command works from the installed package, and shows no patient data; what
`--keep FOLDER` leaves runs as it is."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from pynetdicom import AE

from tests.dicom import MRImageStorage, make_study
from tests.procs import DaemonProcess, free_port, journal_rows, run_ingestd, wait_until

KEPT_XNAT_PORT, KEPT_LISTENER_PORT = 8080, 11112  # what the kept configuration names (ingestd/demo.py)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_demo_delivers_a_deidentified_study_and_leaves_a_configuration_that_runs(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "ingestd", "demo", "--keep", str(folder)],
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
    assert "Traceback" not in result.stderr
    # Before and after: one instance, the same one (found by the SOP Instance UID it was given).
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ") and len(line) > 50}
    assert rows["SeriesDescription"] == ["T1", "MPRAGE", "MRN-0042-DEMO", "T1", "MPRAGE"], out
    assert rows["InstanceNumber"][0] == rows["InstanceNumber"][1], out
    assert rows["SOPInstanceUID"][1].startswith("2.25."), out

    # What --keep left: secrets in 0600 files, no environment variable; check-config accepts it as it is.
    config = folder / "ingestd.yaml"
    for secret in ("xnat.credentials", "demo.key"):
        assert (folder / secret).stat().st_mode & 0o777 == 0o600
    assert "env" not in config.read_text() and "env" not in (folder / "demo.rules.yaml").read_text()
    clean = {key: value for key, value in os.environ.items() if not key.startswith(("INGESTD", "XNAT"))}
    checked = run_ingestd("check-config", str(config), env=clean)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = run_ingestd("check-rules", str(folder / "demo.rules.yaml"), env=clean)
    assert rules.returncode == 0, rules.stdout + rules.stderr

    # The next steps it printed: the stand-in, then the daemon on the kept configuration; a study sent as the demo
    # scanner is delivered.
    (stand_in,) = [line.strip() for line in out.splitlines() if "-m ingestd.testing.xnat " in line]
    assert f"--port {KEPT_XNAT_PORT}" in stand_in and f"run --config {config}" in out
    # Tests use only ports they pick free: the kept configuration's usual ports are swapped for free ones, here
    # and in the stand-in's command (nothing else changes), and its metrics endpoint moved likewise.
    xnat_port, listener_port, metrics_port = free_port(), free_port(), free_port()
    stand_in = stand_in.replace(f"--port {KEPT_XNAT_PORT}", f"--port {xnat_port}")
    text = config.read_text()
    assert f"127.0.0.1:{KEPT_XNAT_PORT}" in text and f"port: {KEPT_LISTENER_PORT}," in text, text
    text = text.replace(f"127.0.0.1:{KEPT_XNAT_PORT}", f"127.0.0.1:{xnat_port}")
    text = text.replace(f"port: {KEPT_LISTENER_PORT},", f"port: {listener_port},")
    config.write_text(text + f"metrics: {{port: {metrics_port}}}\n")
    xnat = subprocess.Popen(
        ["bash", "-c", f"exec {stand_in}"],
        env=clean,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: _listening(xnat_port), 30, message="the stand-in")
        with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
            daemon.wait_ready(listener_port)
            ae = AE(ae_title="DEMO_SCANNER")
            ae.add_requested_context(MRImageStorage)
            assoc = ae.associate("127.0.0.1", listener_port, ae_title="INGESTD")
            assert assoc.is_established
            statuses = [assoc.send_c_store(ds).Status for ds in make_study(series=1, per_series=2)]
            assoc.release()
            assert statuses == [0, 0]
            journal = folder / "state" / "journal.sqlite"
            wait_until(
                lambda: journal_rows(journal, "SELECT count(*) FROM batches WHERE state = 'delivered'") == [(2,)],
                60,
                message=f"the study sent to be delivered\n{daemon.log_tail()}",
            )
            assert daemon.terminate() == 0
    finally:
        xnat.send_signal(signal.SIGTERM)
        xnat.wait(timeout=30)
