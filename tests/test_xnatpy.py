"""A real XNAT client, xnatpy, against the stand-in: connect, import to the prearchive, list, archive."""

from __future__ import annotations

import zipfile
from pathlib import Path

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
