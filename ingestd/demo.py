"""`ingestd demo`: the whole path in one command, on this machine, in under a minute.

Starts the XNAT stand-in (`ingestd.testing.xnat`) and the daemon with a generated configuration and rules
in a temporary folder, sends a generated MR study (with a made-up patient name and ID) by C-STORE, and prints
what arrived in "XNAT": the labels, scans and files, and a few header values before and after
de-identification. Nothing leaves 127.0.0.1. The configuration it wrote is printed at the end: pointing it at
a real XNAT means changing `xnat.servers.main` (url and credentials) and the rules.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from ingestd.config import load_config
from ingestd.daemon import Daemon
from ingestd.journal import Journal
from ingestd.logs import configure_logging
from ingestd.states import StudyState
from ingestd.synthetic import mr_instance
from ingestd.testing.xnat import FakeXnat

__all__ = ["run_demo"]

_RULES = """\
# Written by `ingestd demo`. The language is described in docs/rules.md.
profiles:
  demo:
    key: {env: INGESTD_DEMO_KEY}
    options: [retain-longitudinal-modified-dates, retain-patient-characteristics, clean-descriptors]
    attributes:
      - {tag: PatientName, action: replace, value: "{subject}"}
      - {tag: PatientID, action: replace, value: "{subject}"}
rules:
  - name: demo-scanner
    when: {calling_aet: DEMO_SCANNER, Modality: MR}
    route: {server: main, project: DEMO, subject: "S{PatientID:hash6}", session: "{subject}_MR", archive: true}
    drop_series:
      - {SeriesDescription: {matches: "(?i)localizer"}}
    anonymize: demo
"""

_CONFIG = """\
# Written by `ingestd demo`. For a real lab: change xnat.servers.main (url, credentials) and the rules.
state_dir: {state}
listener: {{host: 127.0.0.1, port: 0, ae_title: INGESTD, processes: 1}}
spool: {{min_free_mb: 100}}
study_idle_seconds: 2
rules: [demo.rules.yaml]
xnat:
  servers:
    main:
      url: {url}
      credentials: {{env_username: INGESTD_DEMO_XNAT_USER, env_password: INGESTD_DEMO_XNAT_PASSWORD}}
      poll_interval_seconds: 0.2
logging: {{level: warning, format: console}}
"""

_PATIENT = ("DEMO^PATIENT^ANNE", "MRN-0042-DEMO", "19700101")


def _study() -> list[Dataset]:
    study_uid = generate_uid()
    out = []
    for number, description in enumerate(("Localizer", "T1 MPRAGE MRN-0042-DEMO", "T2 FLAIR"), start=1):
        series_uid = generate_uid()
        for index in range(5):
            ds = mr_instance(
                study_uid,
                series_uid,
                size=32,
                pixel_data=bytes(range(256)) * 8,
                SeriesNumber=number,
                InstanceNumber=index + 1,
                SeriesDescription=description,
            )
            ds.PatientName, ds.PatientID, ds.PatientBirthDate = _PATIENT
            ds.PatientSex, ds.PatientAge = "F", "056Y"
            ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20261120", "101500", "ACC-DEMO-7"
            ds.InstitutionName, ds.ReferringPhysicianName = "Demo Imaging Centre", "WHO^DOCTOR"
            ds.StudyDescription = "RESEARCH^DEMO"
            out.append(ds)
    return out


def _wait(what: str, check: Callable[[], bool], timeout: float, say: Callable[[str], None]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the demo study did not get {what} within {timeout:.0f} s")
        time.sleep(0.2)
    say(f"  ... {what}")


def run_demo(workdir: Path | None = None, say: Callable[[str], None] = print) -> int:
    """Run the demo; return 0 when the study arrived de-identified and archived in the stand-in."""
    folder = workdir or Path(tempfile.mkdtemp(prefix="ingestd-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["INGESTD_DEMO_KEY"] = secrets.token_hex(32)
    os.environ["INGESTD_DEMO_XNAT_USER"] = "demo"
    os.environ["INGESTD_DEMO_XNAT_PASSWORD"] = password = secrets.token_urlsafe(12)
    with FakeXnat(version="1.8.10", idle_build_seconds=1, rebuild_repeat_seconds=0.5) as xnat:
        xnat.add_user("demo", password)
        xnat.add_project("DEMO", members=["demo"])
        (folder / "demo.rules.yaml").write_text(_RULES)
        config_path = folder / "ingestd.yaml"
        config_path.write_text(_CONFIG.format(state=folder / "state", url=xnat.url))
        config = load_config(config_path)
        configure_logging(config.logging.level, config.logging.format)
        say(f"XNAT stand-in at {xnat.url} (project DEMO); ingestd state in {folder / 'state'}")
        daemon = Daemon(config)
        daemon.start()
        try:
            assert daemon.listener is not None  # noqa: S101 - the demo configuration enables it
            port = daemon.listener.port
            study = _study()
            say(f"sending {len(study)} MR instances (3 series) to INGESTD@127.0.0.1:{port} as DEMO_SCANNER")
            ae = AE(ae_title="DEMO_SCANNER")
            ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", port, ae_title="INGESTD")
            statuses = [assoc.send_c_store(ds).Status for ds in study]
            assoc.release()
            if any(status != 0 for status in statuses):
                say("some instances were refused")
                return 1
            journal = Journal(config.journal_path, read_only=True)
            try:

                def states() -> set[str]:
                    return {batch.state for batch in journal.batches()}

                _wait("received and complete (2 s quiet)", lambda: StudyState.RECEIVING not in states(), 30, say)
                _wait("delivered to XNAT and verified", lambda: states() <= {StudyState.DELIVERED}, 60, say)
            finally:
                journal.close()
        finally:
            daemon.stop()
        _report(xnat, study, say)
        kept = "" if workdir is not None else " (removed at the end: `ingestd demo --keep FOLDER` keeps them)"
        say(f"\nconfiguration: {config_path}\nrules:         {folder / 'demo.rules.yaml'}{kept}")
        say("to use a real XNAT: set xnat.servers.main.url and its credentials, and write your own rules")
    if workdir is None:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _report(xnat: FakeXnat, study: list[Dataset], say: Callable[[str], None]) -> None:
    (experiment,) = xnat.experiments("DEMO")
    say(f"\nXNAT now holds project DEMO / subject {experiment.subject} / session {experiment.label}:")
    for scan in sorted(experiment.scans.values(), key=lambda s: s.id):
        say(f"  scan {scan.id:>3}  {scan.type or '(no description)':<24} {len(scan.files)} files")
    say("  (the Localizer series was dropped by the rule's drop_series)")
    original = study[5]  # an instance of the T1 series
    files = xnat.archived_files("DEMO", experiment.label)
    stored = pydicom.dcmread(io.BytesIO(next(iter(files.values())))) if files else None
    say("\n  attribute              sent                         in XNAT")
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "StudyDate",
        "InstitutionName",
        "SeriesDescription",
        "StudyInstanceUID",
        "PatientIdentityRemoved",
    ):
        before = str(original.get(keyword, "(absent)"))
        after = "-" if stored is None else str(stored.get(keyword, "(removed)"))
        say(f"  {keyword:<22} {before[:28]:<28} {after[:40]}")
