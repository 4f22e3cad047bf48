"""`ingestd demo --ui`: the web page's walk-through, for a lab admin, on this machine.

Starts the XNAT stand-in and the daemon (as `ingestd run` runs it: SIGHUP reloads its rules, Ctrl-C stops it) with
the web page on `http://127.0.0.1:PORT/ui/` and a login token in a 0600 file, then sends two studies as the demo
scanner: an MR study the demo rule takes (it arrives, is de-identified and archived), and a CT study no rule takes
(it is held `unrouted`). It says how to fix the rule for CT; the person edits the rules file, presses Retry on the
held study's page (which reloads the rules, as `ingestd retry` does) and watches it archived. The demo then checks
by SOP Instance UID that XNAT holds what ingestd sent, says so, and runs until Ctrl-C.

On a terminal it waits for Enter before sending, so that the page can be opened first; otherwise it sends at once.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from ingestd.config import load_config
from ingestd.daemon import Daemon
from ingestd.demo import (
    _PATIENT,
    _RULES,
    _secret,
    _stand_in,
    _study,
    _write_config,
)
from ingestd.journal import Journal
from ingestd.logs import configure_logging
from ingestd.states import StudyState
from ingestd.synthetic import mr_instance
from ingestd.testing.xnat import FakeXnat

__all__ = ["DEFAULT_UI_PORT", "run_demo_ui"]

DEFAULT_UI_PORT = 9471  # the metrics endpoint's usual port
_WAIT_SECONDS = 120.0

_FIX = "Modality: {in: [MR, CT]}"


def _ct_study() -> list[Dataset]:
    """A small CT study of the demo patient: the demo rule takes MR only, so it is held until the rule is fixed."""
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for index in range(4):
        ds = mr_instance(study_uid, series_uid, size=32, pixel_data=bytes(range(256)) * 8, SeriesNumber=1)
        ds.SOPClassUID, ds.Modality, ds.InstanceNumber = CTImageStorage, "CT", index + 1
        ds.SeriesDescription, ds.StudyDescription = "HEAD W/O", "RESEARCH^DEMO"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = _PATIENT
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20261121", "090000", "ACC-DEMO-8"
        out.append(ds)
    return out


def _send(port: int, study: list[Dataset]) -> bool:
    ae = AE(ae_title="DEMO_SCANNER")
    for sop_class in (MRImageStorage, CTImageStorage):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="INGESTD")
    if not assoc.is_established:
        return False
    try:
        return all(assoc.send_c_store(ds).Status == 0 for ds in study)
    finally:
        assoc.release()


class _Scenario:
    """What the demo does beside the daemon: send, watch, explain, verify (in a thread of its own)."""

    def __init__(self, daemon: Daemon, xnat: FakeXnat, folder: Path, say: Callable[[str], None]) -> None:
        self.daemon, self.xnat, self.folder, self.say = daemon, xnat, folder, say
        self.failed = False

    def _journal(self) -> Journal:
        return Journal(self.daemon.config.journal_path, read_only=True)

    def _batch_of(self, study_uid: str) -> tuple[int, str] | None:
        journal = self._journal()
        try:
            found = [(batch.id, batch.state) for batch in journal.batches() if batch.study_uid == study_uid]
        finally:
            journal.close()
        return max(found) if found else None

    def _until(self, what: str, check: Callable[[], bool], timeout: float = _WAIT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if self.daemon.stopping.is_set():
                raise InterruptedError
            if time.monotonic() > deadline:
                raise TimeoutError(f"the demo did not see {what} within {timeout:.0f} s")
            time.sleep(0.2)

    def _state_is(self, study_uid: str, *states: str) -> Callable[[], bool]:
        def check() -> bool:
            batch = self._batch_of(study_uid)
            return batch is not None and batch[1] in states

        return check

    def _verify(self, study_uid: str) -> str:
        """What XNAT holds of the study's batch, checked by SOP Instance UID against what ingestd sent."""
        batch = self._batch_of(study_uid)
        assert batch is not None  # noqa: S101 - delivered above
        journal = self._journal()
        try:
            sent = {row.sop_uid for row in journal.outgoing(batch[0])}
            route = journal.route(batch[0])
        finally:
            journal.close()
        assert route is not None  # noqa: S101 - a delivered batch has its route
        session = route.label("session")
        held = {
            str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
            for data in self.xnat.archived_files("DEMO", session).values()
        }
        same = "the same" if held == sent else "NOT the same"
        return f"XNAT holds DEMO/{session}: {len(held)} instances, {same} {len(sent)} SOP Instance UIDs ingestd sent"

    def run(self, wait_for_enter: bool) -> None:
        try:
            self._run(wait_for_enter)
        except InterruptedError:
            return
        except Exception as exc:  # noqa: BLE001 - the demo says what went wrong and stops
            self.failed = True
            self.say(f"the demo failed: {exc}")
            os.kill(os.getpid(), signal.SIGTERM)

    def _run(self, wait_for_enter: bool) -> None:
        daemon, say = self.daemon, self.say
        self._until("the daemon start", lambda: daemon.metrics_port is not None and daemon.listener is not None)
        assert daemon.listener is not None  # noqa: S101 - checked above
        url = f"http://127.0.0.1:{daemon.metrics_port}/ui/"
        token_file = self.folder / "ui.token"
        say(f"the web page: {url}\n  log in with the token in {token_file} (mode 0600; `cat {token_file}`)")
        if wait_for_enter:
            say("open the page, log in, then press Enter here to send the studies")
            sys.stdin.readline()
        mr, ct = _study(), _ct_study()
        say(f"sending an MR study ({len(mr)} instances, 3 series) as DEMO_SCANNER: the demo rule takes it")
        if not _send(daemon.listener.port, mr):
            raise RuntimeError("the MR study was refused")
        self._until("the MR study delivered", self._state_is(str(mr[0].StudyInstanceUID), StudyState.DELIVERED))
        say(f"  ... delivered: {self._verify(str(mr[0].StudyInstanceUID))}")
        say(f"sending a CT study ({len(ct)} instances) as DEMO_SCANNER: no rule takes CT")
        if not _send(daemon.listener.port, ct):
            raise RuntimeError("the CT study was refused")
        ct_uid = str(ct[0].StudyInstanceUID)
        self._until("the CT study held", self._state_is(ct_uid, StudyState.HELD))
        batch = self._batch_of(ct_uid)
        assert batch is not None  # noqa: S101 - held above
        rules = self.folder / "demo.rules.yaml"
        say(
            f"  ... held: no rule matches (Studies > held, or {url}studies/{batch[0]}).\n"
            f"to fix it: in {rules} change `Modality: MR` to `{_FIX}`, save, and press Retry on the study's page"
            " (it reloads the rules, as `ingestd retry` does)"
        )
        self._until("the CT study delivered after a retry", self._state_is(ct_uid, StudyState.DELIVERED), 24 * 3600)
        say(f"  ... the CT study is archived: {self._verify(ct_uid)}")
        say("the demo is done; the page stays up until Ctrl-C")


def run_demo_ui(workdir: Path | None = None, port: int = DEFAULT_UI_PORT, say: Callable[[str], None] = print) -> int:
    """Run the web page's demo until SIGINT or SIGTERM; 0 when it ran (and stopped) cleanly."""
    folder = (workdir or Path(tempfile.mkdtemp(prefix="ingestd-demo-ui-"))).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    _secret(folder / "ui.token", lambda: secrets.token_hex(24))
    with _stand_in(folder) as xnat:
        (folder / "demo.rules.yaml").write_text(_RULES.replace("@KEY@", str(folder / "demo.key")))
        config_path = folder / "ingestd.yaml"
        ui = f"metrics: {{host: 127.0.0.1, port: {port}}}\nui: {{token_file: {folder / 'ui.token'}}}\n"
        _write_config(config_path, folder, url=xnat.url, port=0, level="warning", metrics=ui)
        config = load_config(config_path)
        configure_logging(config.logging.level, config.logging.format)
        say(f"XNAT stand-in at {xnat.url} (project DEMO); ingestd's state, configuration and rules in {folder}")
        daemon = Daemon(config, config_path)
        scenario = _Scenario(daemon, xnat, folder, say)
        thread = threading.Thread(target=scenario.run, args=(sys.stdin.isatty(),), name="demo-scenario", daemon=True)
        thread.start()
        status = daemon.run()  # until Ctrl-C (or the scenario's SIGTERM when it failed)
        thread.join(timeout=5)
    if workdir is None:
        shutil.rmtree(folder, ignore_errors=True)
    return 1 if scenario.failed else status
