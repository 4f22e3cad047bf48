"""Burned-in text cleaned end to end: a real daemon, a drop folder, the XNAT stand-in.

An ultrasound study (a JPEG Baseline cine from DCMTK's dcmcjpeg and an uncompressed single frame) whose device has
a region is archived, and what XNAT holds is clean: found by the SOP Instance UID ingestd gives each instance,
every pixel inside the rectangles black, every other pixel as the source decodes. A study from a device without a
region is held with the reason that says what to add.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from ingestd.deid.keyed import remap_uid
from ingestd.rules import load_rules
from ingestd.testing.xnat import FakeXnat
from tests import pixels_data as px
from tests.procs import DaemonProcess, free_port, journal_rows, wait_until, write_xnat_daemon_config

pytestmark = [pytest.mark.slow]

RULES = """\
profiles:
  us:
    key: {env: INGESTD_TEST_KEY}
    pixels:
      burned_in: clean
      regions:
        - name: acme-sono9
          when: {Manufacturer: Acme Imaging, ManufacturerModelName: {matches: '^Sono'}, Rows: 64, Columns: 96}
          rectangles:
            - [4, 2, 40, 10]
            - {x: 60, y: 50, width: 20, height: 8}
rules:
  - name: us
    when: {drop_folder: DROP}
    route: {server: main, project: PROJ, subject: '{PatientID:hash8}', session: 'US_{StudyID:hash8}', archive: true}
    anonymize: us
"""


def _batches(config: Path) -> list[tuple[str, str | None, str | None]]:
    journal = config.parent / "state" / "journal.sqlite"
    if not journal.exists():
        return []
    rows = journal_rows(journal, "SELECT state, hold_code, reason FROM batches ORDER BY id")
    return [(str(row[0]), row[1], row[2]) for row in rows]


def _frames(data: bytes) -> tuple[str, np.ndarray]:
    ds = dcmread(io.BytesIO(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = ds.pixel_array
    return str(ds.SOPInstanceUID), arr if int(ds.get("NumberOfFrames") or 1) > 1 else arr[None, ...]


def test_ultrasound_study_archived_clean(tmp_path: Path, xnat: FakeXnat) -> None:
    drop, staging = tmp_path / "drop", tmp_path / "staging"
    drop.mkdir()
    staging.mkdir()
    port = free_port()
    rules = RULES.replace("DROP", str(drop))
    config = write_xnat_daemon_config(
        tmp_path, port, xnat.url, rules=rules, extra=f"drop_folders: [{{path: {drop}, settle_seconds: 0.3}}]\n"
    )
    cine, still = px.image("US", frames=4), px.image("US")
    for ds in (cine, still):
        ds.StudyInstanceUID, ds.StudyID = cine.StudyInstanceUID, "1"
    still.SeriesInstanceUID, still.InstanceNumber = cine.SeriesInstanceUID, 2
    sources = [px.encode(cine, "jpeg", staging), px.encode(still, "native", staging)]
    other = px.image("US")
    other.Manufacturer, other.StudyID = "Other Vendor", "2"
    sources.append(px.encode(other, "native", staging))
    expected = {}
    key = load_rules([tmp_path / "lab.rules.yaml"]).profiles["us"].key
    for path in sources[:2]:
        source = dcmread(path)
        expected[remap_uid(key, str(source.SOPInstanceUID))] = _frames(path.read_bytes())[1]

    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        (staging).rename(drop / "upload")
        wait_until(
            lambda: sorted(state for state, _code, _reason in _batches(config)) == ["delivered", "held"],
            90,
            interval=0.3,
            message="one study delivered, one held",
        )
        assert daemon.terminate() == 0

    held = [(code, reason) for state, code, reason in _batches(config) if state == "held"]
    assert held[0][0] == "burned-in"
    assert "no pixels region of profile us matches this instance" in str(held[0][1])
    assert "Manufacturer 'Other Vendor'" in str(held[0][1])
    assert not any(value in str(held[0][1]) for value in ("Pixel", "Tester", "PX0001", "19700101"))

    (experiment,) = xnat.experiments("PROJ")
    files = xnat.archived_files("PROJ", experiment.label)
    assert len(files) == 2
    found = dict(_frames(data) for data in files.values())
    assert set(found) == set(expected)  # by SOP Instance UID: both instances, and nothing else
    for uid, after in found.items():
        before = expected[uid]
        inside = np.zeros(after.shape, dtype=bool)
        for box in px.TEXT:
            inside[:, box.y : box.y + box.height, box.x : box.x + box.width, ...] = True
        assert (after[inside] == 0).all()
        assert (after[~inside] == before[~inside]).all()
        assert (before[inside] != 0).any()
    for data in files.values():
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        assert ds.BurnedInAnnotation == "NO"
        assert "113101" in [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
