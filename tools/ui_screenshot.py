"""Write docs/ui-overview.png: the web page's overview, as README's "The web page" shows it.

Starts the XNAT stand-in and `ingestd run` (a subprocess, on free ports under a temporary folder) and sends it
three synthetic studies as a scanner: an MR study the rule takes (de-identified and archived), a CT study no rule
takes (held `unrouted`) and one more MR study, still arriving when the picture is taken. Then Debian's headless
Chromium (Playwright, as the browser tests drive it: tests/browser.py) logs in and saves the overview, 1200 px wide.
Nothing in it identifies a patient: the page shows none, and the studies are made up.

Usage (from the checkout, with the test extra installed): ``.venv/bin/python tools/ui_screenshot.py [--output PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from ingestd.synthetic import mr_instance
from ingestd.testing.xnat import FakeXnat

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.browser import launch  # noqa: E402 - the browser the tests launch, from this checkout

IDLE_SECONDS = 8  # a study is complete this long after its last instance: the third one is still arriving

RULES = """\
profiles:
  research:
    key: {file: @KEY@}
rules:
  - name: mr-research
    when: {calling_aet: SCANNER, Modality: MR}
    route: {server: main, project: PROJ, subject: "S{PatientID:hash6}", session: "{subject}_{Modality}", archive: true}
    anonymize: research
"""

CONFIG = """\
state_dir: {folder}/state
listener: {{host: 127.0.0.1, port: {listener}, ae_title: INGESTD, processes: 1}}
spool: {{min_free_mb: 10}}
study_idle_seconds: {idle}
rules: [screenshot.rules.yaml]
xnat:
  servers:
    main:
      url: {url}
      credentials: {{file: {folder}/xnat.credentials}}
      poll_interval_seconds: 0.2
logging: {{level: info, format: json}}
metrics: {{host: 127.0.0.1, port: {metrics}}}
ui: {{token_file: {folder}/ui.token}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _secret(path: Path, value: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(value + "\n")


def _study(modality: str, patient: str, series: int, per_series: int) -> list[Dataset]:
    study_uid = generate_uid()
    out = []
    for number in range(1, series + 1):
        series_uid = generate_uid()
        for index in range(per_series):
            ds = mr_instance(study_uid, series_uid, size=32, pixel_data=bytes(range(256)) * 8, SeriesNumber=number)
            ds.Modality, ds.InstanceNumber = modality, index + 1
            if modality == "CT":
                ds.SOPClassUID = CTImageStorage
            ds.PatientName, ds.PatientID = f"SCREENSHOT^{patient}", f"SHOT-{patient}"
            ds.StudyDate, ds.StudyTime = "20261206", "090000"
            out.append(ds)
    return out


def _send(port: int, study: list[Dataset]) -> None:
    ae = AE(ae_title="SCANNER")
    for sop_class in (MRImageStorage, CTImageStorage):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="INGESTD")
    if not assoc.is_established:
        raise RuntimeError("the daemon refused the association")
    try:
        if not all(assoc.send_c_store(ds).Status == 0 for ds in study):
            raise RuntimeError("the daemon refused an instance")
    finally:
        assoc.release()


def _states(journal: Path) -> dict[str, str]:
    if not journal.exists():
        return {}
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
        return {str(uid): str(state) for uid, state in db.execute("SELECT study_uid, state FROM batches")}


def _until(what: str, check: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(0.2)


def _port_of(log: Path, event: str) -> int:
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if f'"event": "{event}"' in line:
            return int(json.loads(line)["port"])
    raise LookupError(event)


def take(output: Path, folder: Path) -> None:
    """Run the scenario in `folder` and write the overview's picture to `output`."""
    password, token = secrets.token_urlsafe(12), secrets.token_hex(24)
    _secret(folder / "xnat.credentials", f"ingestd:{password}")
    _secret(folder / "ui.token", token)
    _secret(folder / "research.key", secrets.token_hex(32))
    (folder / "screenshot.rules.yaml").write_text(RULES.replace("@KEY@", str(folder / "research.key")))
    listener = _free_port()
    log = folder / "daemon.log"
    with FakeXnat(version="1.8.10", idle_build_seconds=1.0, rebuild_repeat_seconds=0.5) as xnat:
        xnat.add_user("ingestd", password)
        xnat.add_project("PROJ", members=["ingestd"])
        config = folder / "ingestd.yaml"
        config.write_text(CONFIG.format(folder=folder, listener=listener, idle=IDLE_SECONDS, url=xnat.url, metrics=0))
        with log.open("wb") as out:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "ingestd", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=folder,
                start_new_session=True,
            )
        try:
            _until("the daemon's start", lambda: '"event": "daemon.started"' in log.read_text(errors="replace"))
            base = f"http://127.0.0.1:{_port_of(log, 'metrics.started')}"
            journal = folder / "state" / "journal.sqlite"
            mr, ct, late = _study("MR", "A", 3, 4), _study("CT", "B", 1, 5), _study("MR", "C", 2, 3)
            _send(listener, mr)
            _send(listener, ct)
            mr_uid, ct_uid = str(mr[0].StudyInstanceUID), str(ct[0].StudyInstanceUID)
            _until("the MR study's delivery", lambda: _states(journal).get(mr_uid) == "delivered")
            _until("the CT study's hold", lambda: _states(journal).get(ct_uid) == "held")
            _send(listener, late)
            with launch() as browser:
                page = browser.new_page(viewport={"width": 1200, "height": 800}, locale="en-GB")
                page.goto(f"{base}/ui/login")
                page.get_by_label("Token").fill(token)
                page.get_by_role("button", name="Log in").click()
                page.wait_for_url(f"{base}/ui/")
                if _states(journal).get(str(late[0].StudyInstanceUID)) != "receiving":
                    raise RuntimeError("the third study was no longer arriving: raise IDLE_SECONDS")
                page.screenshot(path=str(output), full_page=True)
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "ui-overview.png")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ingestd-ui-") as folder:
        take(args.output.absolute(), Path(folder))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
