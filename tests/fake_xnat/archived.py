"""What the resource file tests share: an archived session to hang resources on, and zips and tars to upload."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Sequence

import requests

from ingestd.testing.xnat import FakeXnat
from tests.fake_xnat.helpers import TIMEOUT, import_zip, numbered_study, zipped


def archive_session(xnat: FakeXnat, session: requests.Session, label: str = "SESS01", series: int = 2) -> str:
    """Import a study as SUBJ01/`label` of PROJ, build and archive it; return the experiment's accession ID."""
    response = import_zip(xnat, session, zipped(numbered_study(series, 2)), EXPT_LABEL=label)
    assert response.status_code == 200, response.text
    xnat.build_now()
    (row,) = [r for r in xnat.prearchive_rows("PROJ") if r["name"] == label]
    archived = session.post(f"{xnat.url}/data/services/archive", params={"src": row["url"]}, timeout=TIMEOUT)
    assert archived.status_code == 200, archived.text
    (found,) = [e for e in xnat.experiments("PROJ") if e.label == label]
    return found.id


def zip_of(entries: Sequence[tuple[str, bytes]], *, compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_of(entries: Sequence[tuple[str, bytes]], *, gz: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as archive:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def listing(session: requests.Session, url: str) -> list[dict[str, str]]:
    """The rows of a `?format=json` ResultSet."""
    response = session.get(url, params={"format": "json"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    rows = response.json()["ResultSet"]["Result"]
    assert isinstance(rows, list)
    return rows
