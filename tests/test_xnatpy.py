"""A real XNAT client, xnatpy, against the stand-in: connect, import to the prearchive, list, archive."""

from __future__ import annotations

import zipfile
from pathlib import Path

import requests
import xnat

from ingestd.testing.xnat import FakeXnat
from tests.dicom import encode, make_study


def test_xnatpy_imports_lists_and_archives(tmp_path: Path) -> None:
    study = make_study(series=1, per_series=3)
    upload = tmp_path / "study.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for index, ds in enumerate(study):
            archive.writestr(f"{index}.dcm", encode(ds))
    with FakeXnat(version="1.8.10") as server:
        server.add_user("alice", "pw-xnatpy")
        server.add_project("PROJ", owners=["alice"])
        with xnat.connect(server.url, user="alice", password="pw-xnatpy", loglevel="ERROR") as session:
            imported = session.services.import_(
                str(upload), project="PROJ", subject="S1", experiment="E1", destination="/prearchive"
            )
            assert type(imported).__name__ == "PrearchiveSession"
            (waiting,) = session.prearchive.sessions()
            assert waiting.status == "READY" and waiting.name == "E1"
            experiment = waiting.archive()
            assert (type(experiment).__name__, experiment.label, experiment.project) == ("MrSessionData", "E1", "PROJ")
        (record,) = server.experiments("PROJ")
        assert record.subject == "S1" and sum(len(scan.files) for scan in record.scans.values()) == 3
        assert ("DELETE", "/data/JSESSION", 200) in server.requests_log


def test_xnatpy_lists_resources_and_downloads_a_file(tmp_path: Path) -> None:
    """xnatpy walks an archived experiment's resources and files (listings by label, file URIs by the numeric
    resource id) and downloads a file byte for byte."""
    study = make_study(series=1, per_series=2)
    upload = tmp_path / "study.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        for index, ds in enumerate(study):
            archive.writestr(f"{index}.dcm", encode(ds))
    report = bytes(range(256)) * 300
    with FakeXnat(version="1.8.10") as server:
        server.add_user("alice", "pw-xnatpy")
        server.add_project("PROJ", owners=["alice"])
        with requests.Session() as http:
            http.auth = ("alice", "pw-xnatpy")
            http.post(
                f"{server.url}/data/services/import",
                params={"PROJECT_ID": "PROJ", "SUBJECT_ID": "S1", "EXPT_LABEL": "E1"},
                data=upload.read_bytes(),
                headers={"Content-Type": "application/zip"},
                timeout=10,
            ).raise_for_status()
            server.build_now()
            (row,) = server.prearchive_rows("PROJ")
            http.post(f"{server.url}/data/services/archive", params={"src": row["url"]}, timeout=10).raise_for_status()
            files = f"{server.url}/data/projects/PROJ/subjects/S1/experiments/E1/resources/qBOLD/files"
            for name, data in (("sub/report.bin", report), ("notes.txt", b"notes")):
                answer = http.put(f"{files}/{name}", data=data, headers={"Content-Type": "application/octet-stream"})
                assert answer.status_code == 200 and answer.text == ""
        with xnat.connect(server.url, user="alice", password="pw-xnatpy", loglevel="ERROR") as session:
            experiment = session.projects["PROJ"].subjects["S1"].experiments["E1"]
            assert [found.label for found in experiment.resources.values()] == ["qBOLD"]
            resource = experiment.resources["qBOLD"]
            assert sorted(found.path for found in resource.files.values()) == ["notes.txt", "sub/report.bin"]
            target = tmp_path / "report.bin"
            resource.files["sub/report.bin"].download(str(target), verbose=False)
            assert target.read_bytes() == report
