"""`ingestd demo`: the whole path in one command, on this machine, in about 10 seconds.

Starts the XNAT stand-in (`ingestd.testing.xnat`) and the daemon with a generated configuration and rules
in a temporary folder, sends a generated MR study (with a made-up patient name and ID) by C-STORE, and prints
what arrived in "XNAT": the labels, scans and files, and a few header values of one instance before and after
de-identification (the same instance: found by the SOP Instance UID it was given). Nothing leaves 127.0.0.1.

With `--keep FOLDER` what it leaves runs as it is: `FOLDER/ingestd.yaml` (listener 127.0.0.1:11112, XNAT at
http://127.0.0.1:8080) with its secrets in files of mode 0600 beside it (`xnat.credentials`, `demo.key`), no
environment variable needed; the demo prints the commands that start the stand-in and the daemon on it.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from ingestd.config import Config, load_config
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
    key: {file: @KEY@}
    options: [retain-longitudinal-modified-dates, retain-patient-characteristics, clean-descriptors]
    attributes:
      - {tag: PatientName, action: replace, value: "{subject}"}
      - {tag: PatientID, action: replace, value: "{subject}"}
rules:
  - name: demo-scanner
    when: {calling_aet: DEMO_SCANNER, Modality: MR}
    route: {server: main, project: DEMO, subject: "S{PatientID:hash6}", session: "{subject}_{Modality}", archive: true}
    drop_series:
      - {SeriesDescription: {matches: "(?i)localizer"}}
    anonymize: demo
"""

_CONFIG = """\
# Written by `ingestd demo`. For a real lab: change xnat.servers.main (url, credentials) and the rules.
state_dir: {state}
listener: {{host: 127.0.0.1, port: {port}, ae_title: INGESTD, processes: 1}}
spool: {{min_free_mb: 100}}
study_idle_seconds: 2
rules: [demo.rules.yaml]
xnat:
  servers:
    main:
      url: {url}
      credentials: {{file: {credentials}}}  # one line, username:password; mode 0600
      poll_interval_seconds: 0.2
logging: {{level: {level}, format: console}}
{metrics}"""

# What `--keep FOLDER` leaves: the stand-in's and the listener's usual ports (the demo itself runs on free ones).
_KEPT_XNAT_PORT, _KEPT_LISTENER_PORT = 8080, 11112
_IDLE_BUILD_SECONDS, _REBUILD_REPEAT_SECONDS = 1.0, 0.5  # the stand-in builds a quiet prearchive session at once

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


def _secret(path: Path, make: Callable[[], str]) -> str:
    """The secret in `path` (mode 0600), written by `make` if the file is not there yet (a demo run again)."""
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(make() + "\n")
    path.chmod(0o600)
    return path.read_text().strip()


def _write_config(path: Path, folder: Path, *, url: str, port: int, level: str, metrics: str = "") -> None:
    credentials = folder / "xnat.credentials"
    text = _CONFIG.format(
        state=folder / "state", port=port, url=url, credentials=credentials, level=level, metrics=metrics
    )
    path.write_text(text)


def _write_files(folder: Path, url: str) -> tuple[Path, Config]:
    """Write the rules and the configuration kept (the usual ports, the stand-in on 8080); return its path, and the
    configuration of this run (free ports, the stand-in at `url`, no metrics endpoint)."""
    (folder / "demo.rules.yaml").write_text(_RULES.replace("@KEY@", str(folder / "demo.key")))
    config_path = folder / "ingestd.yaml"
    kept_url = f"http://127.0.0.1:{_KEPT_XNAT_PORT}"
    _write_config(config_path, folder, url=kept_url, port=_KEPT_LISTENER_PORT, level="info")
    run_path = folder / "demo-run.yaml"
    _write_config(run_path, folder, url=url, port=0, level="warning", metrics="metrics: {enabled: false}\n")
    try:
        return config_path, load_config(run_path)
    finally:
        run_path.unlink()


@contextmanager
def _stand_in(folder: Path) -> Iterator[FakeXnat]:
    """The demo's XNAT stand-in (project DEMO, its user's password in `folder`/xnat.credentials) and the demo's
    de-identification key, both 0600 files kept for a run again in the same folder."""
    _secret(folder / "demo.key", lambda: secrets.token_hex(32))
    _, password = _secret(folder / "xnat.credentials", lambda: f"demo:{secrets.token_urlsafe(12)}").split(":", 1)
    with FakeXnat(
        version="1.8.10", idle_build_seconds=_IDLE_BUILD_SECONDS, rebuild_repeat_seconds=_REBUILD_REPEAT_SECONDS
    ) as xnat:
        xnat.add_user("demo", password)
        xnat.add_project("DEMO", members=["demo"])
        yield xnat


def run_demo(workdir: Path | None = None, say: Callable[[str], None] = print) -> int:
    """Run the demo; return 0 when the study arrived de-identified and archived in the stand-in."""
    folder = (workdir or Path(tempfile.mkdtemp(prefix="ingestd-demo-"))).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    with _stand_in(folder) as xnat:
        config_path, config = _write_files(folder, xnat.url)
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
                shown = study[5]  # an instance of the T1 series, and the UID de-identification gave it
                new_uid = _new_sop_uid(journal, str(shown.SOPInstanceUID))
            finally:
                journal.close()
        finally:
            daemon.stop()
        _report(xnat, shown, new_uid, say)
        kept = "" if workdir is not None else " (removed at the end: `ingestd demo --keep FOLDER` keeps them)"
        say(f"\nconfiguration: {config_path}\nrules:         {folder / 'demo.rules.yaml'}{kept}")
        say("to use a real XNAT: set xnat.servers.main.url and its credentials, and write your own rules")
    if workdir is None:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        _next_steps(folder, config_path, say)
    return 0


def _ingestd() -> str:
    """How to run this ingestd again: the script this process runs as, or the interpreter with `-m ingestd`."""
    script = Path(sys.argv[0])
    return str(script.absolute()) if script.name == "ingestd" else f"{sys.executable} -m ingestd"


def _next_steps(folder: Path, config_path: Path, say: Callable[[str], None]) -> None:
    """What to run to use what `--keep` left: this run's stand-in is gone; the configuration expects one on 8080."""
    options = f"--idle-build-seconds {_IDLE_BUILD_SECONDS:g} --rebuild-repeat-seconds {_REBUILD_REPEAT_SECONDS:g}"
    say(
        f"\nnext steps: {config_path} runs as it is (secrets in {folder / 'xnat.credentials'} and"
        f" {folder / 'demo.key'}, mode 0600). This run's XNAT stand-in is gone; start one, then the daemon:\n"
        f"  {sys.executable} -m ingestd.testing.xnat --port {_KEPT_XNAT_PORT}"
        f' --member "$(cat {folder / "xnat.credentials"})" --project DEMO {options}\n'
        f"  {_ingestd()} run --config {config_path}\n"
        "and send an MR study as the demo scanner (the demo rule takes what DEMO_SCANNER sends):\n"
        f"  TCP_NODELAY=1 /usr/bin/dcmsend -v -aet DEMO_SCANNER -aec INGESTD +sd +r 127.0.0.1 {_KEPT_LISTENER_PORT}"
        " /path/to/study/\n"
        f"  {_ingestd()} status --config {config_path}"
    )


def _new_sop_uid(journal: Journal, sop_uid: str) -> str | None:
    """The SOP Instance UID the instance sent as `sop_uid` left with (de-identification gives it a new one)."""
    for batch in journal.batches():
        ids = {instance.id for instance in journal.batch_instances(batch.id) if instance.sop_uid == sop_uid}
        for outgoing in journal.outgoing(batch.id) if ids else ():
            if outgoing.instance_id in ids:
                return outgoing.sop_uid
    return None


def _report(xnat: FakeXnat, original: Dataset, new_uid: str | None, say: Callable[[str], None]) -> None:
    """The session XNAT holds, and header values of `original` as sent and as XNAT holds it (by its new UID)."""
    (experiment,) = xnat.experiments("DEMO")
    say(f"\nXNAT now holds project DEMO / subject {experiment.subject} / session {experiment.label}:")
    for scan in sorted(experiment.scans.values(), key=lambda s: s.id):
        say(f"  scan {scan.id:>3}  {scan.type or '(no description)':<24} {len(scan.files)} files")
    say("  (the Localizer series was dropped by the rule's drop_series)")
    stored = None
    for data in xnat.archived_files("DEMO", experiment.label).values():
        found = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        if new_uid is not None and found.SOPInstanceUID == new_uid:
            stored = found
    say(f"\n  one instance (of the {original.SeriesDescription.split(' MRN')[0]} series) as sent and as XNAT holds it:")
    say("  attribute              sent                         in XNAT")
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "StudyDate",
        "InstitutionName",
        "SeriesDescription",
        "InstanceNumber",
        "StudyInstanceUID",
        "SOPInstanceUID",
        "PatientIdentityRemoved",
    ):
        before = str(original.get(keyword, "(absent)"))
        after = "-" if stored is None else str(stored.get(keyword, "(removed)"))
        say(f"  {keyword:<22} {before[:28]:<28} {after[:40]}")
