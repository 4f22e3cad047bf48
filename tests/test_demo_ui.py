"""`ingestd demo --ui`: the walk-through the issue's "done when" describes, done as a lab admin would, over HTTP:
open the page, log in, watch the MR study arrive, find the held CT study, fix its rule in the file, press Retry,
see it archived; Ctrl-C stops everything with status 0. No patient value on any page seen."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from tests.procs import free_port, journal_rows, wait_until
from tests.test_ui_actions import _forms

PATIENT = ("DEMO^PATIENT^ANNE", "DEMO^PATIENT", "MRN-0042-DEMO", "19700101", "ACC-DEMO")


class _Output:
    """The demo's standard output, read as it comes (a thread of its own)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert process.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(str(line))

    def close(self) -> None:
        self._thread.join(timeout=10)

    def text(self) -> str:
        return "".join(self.lines)

    def wait(self, needle: str, timeout: float = 90) -> str:
        return wait_until(lambda: self.text() if needle in self.text() else None, timeout, message=needle)


@pytest.mark.slow
def test_the_demo_walks_a_held_study_to_the_archive_through_the_page(tmp_path: Path) -> None:
    folder, port = tmp_path / "demo", free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ingestd", "demo", "--ui", "--port", str(port), "--keep", str(folder)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    output = _Output(process)
    pages: list[str] = []
    try:
        base = f"http://127.0.0.1:{port}"
        output.wait(f"the web page: {base}/ui/")
        assert (folder / "ui.token").stat().st_mode & 0o777 == 0o600
        session = requests.Session()
        token = (folder / "ui.token").read_text().strip()
        assert session.post(f"{base}/ui/login", data={"token": token}, timeout=10).status_code == 200
        pages.append(session.get(f"{base}/ui/", timeout=10).text)

        text = output.wait("to fix it:")
        assert "the same 10 SOP Instance UIDs ingestd sent" in text  # the MR study, checked by identity
        batch_id = int(re.findall(r"/ui/studies/(\d+)\)", text)[-1])
        page = session.get(f"{base}/ui/studies/{batch_id}", timeout=10).text
        pages.append(page)
        assert "unrouted" in page and "What to do" in page

        rules = folder / "demo.rules.yaml"
        rules.write_text(rules.read_text().replace("Modality: MR", "Modality: {in: [MR, CT]}"))
        path = f"/ui/studies/{batch_id}/retry"
        answer = session.post(f"{base}{path}", data={"csrf": _forms(page)[path]}, allow_redirects=False, timeout=30)
        assert answer.status_code == 303

        text = output.wait("the CT study is archived:", 120)
        assert re.search(r"XNAT holds DEMO/S\w+_CT: 4 instances, the same 4 SOP Instance UIDs", text), text
        journal = folder / "state" / "journal.sqlite"
        assert journal_rows(journal, "SELECT count(*) FROM batches WHERE state = 'delivered'") == [(2,)]
        pages.append(session.get(f"{base}/ui/studies/{batch_id}", timeout=10).text)
        pages.append(session.get(f"{base}/ui/studies", timeout=10).text)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, output.text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        output.close()
        assert process.stdout is not None
        process.stdout.close()
    assert "Traceback" not in output.text()
    html = "\n".join(pages)
    for value in PATIENT:
        assert value not in html, value
