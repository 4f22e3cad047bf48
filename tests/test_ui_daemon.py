"""The web page served by a real daemon (`ingestd run`): mounted under /ui/ of its metrics endpoint, locked by the
token file, showing a study dropped from a folder named after its patient without any patient value."""

from __future__ import annotations

from pathlib import Path

import requests

from tests.dicom import make_study, write_instances
from tests.procs import DaemonProcess, free_port, wait_until, write_daemon_config
from tests.spooled import PATIENT_FOLDER, PATIENT_ID

TOKEN = "daemon-token-0123456789abcdef"


def test_the_daemon_serves_the_page_behind_its_token(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    token_file = tmp_path / "ui.token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    config = write_daemon_config(
        tmp_path / "ingestd.yaml",
        tmp_path / "state",
        free_port(),
        extra=f"drop_folders: [{{path: {drop}}}]\nui: {{token_file: {token_file}}}\n",
    )
    study = make_study(series=1, per_series=2)
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        base = f"http://127.0.0.1:{int(daemon.wait_logged('metrics.started')['port'])}"
        assert requests.get(f"{base}/ui/", allow_redirects=False, timeout=10).headers["Location"] == "/ui/login"
        staging = tmp_path / "staging" / PATIENT_FOLDER
        write_instances(study, staging)
        staging.rename(drop / PATIENT_FOLDER)  # whole at once: the watcher takes complete files

        session = requests.Session()
        assert session.post(f"{base}/ui/login", data={"token": TOKEN}, timeout=10).status_code == 200
        overview = session.get(f"{base}/ui/", timeout=10).text
        assert ">ok<" in overview  # the daemon's own health facts
        assert "<td>DropFolderWatcher</td><td>yes</td>" in overview

        def listed() -> str | None:
            page = session.get(f"{base}/ui/studies", timeout=10).text
            return page if "1 of 1 batches." in page else None

        studies = wait_until(listed, 30, interval=0.3, message="the dropped study listed")
        assert "drop:drop" in studies
        assert "receiving" in studies
        pages = [overview, studies, session.get(f"{base}/ui/quarantine", timeout=10).text]
        assert session.post(f"{base}/ui/logout", timeout=10).status_code == 200
        assert session.get(f"{base}/ui/", allow_redirects=False, timeout=10).status_code == 303
    html = "\n".join(pages)
    uids = {str(ds.get(key)) for ds in study for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    for value in (PATIENT_ID, PATIENT_FOLDER, "Synthetic", *uids):
        assert value not in html, value
    log = (tmp_path / "daemon.log").read_text(encoding="utf-8")
    assert '"event": "ui.login"' in log
    assert TOKEN not in log
