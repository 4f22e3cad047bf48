"""ingestd.xnat.resources against the XNAT stand-in: paths, listings, uploads (and what the listing shows after each
fault: a reset mid-body, a 503, a proxy's 504, a read-only account), downloads and the look-ups delivery needs."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ingestd.config import Credentials, XnatServer
from ingestd.testing.xnat import FakeXnat
from ingestd.xnat import XnatClient, XnatError
from ingestd.xnat.resources import (
    ResourceFile,
    download,
    experiment_id,
    list_resource,
    resource_path,
    scan_ids,
    subject_exists,
    upload_file,
    upload_zip,
)
from tests.fake_xnat.archived import archive_session
from tests.fake_xnat.helpers import import_zip, numbered_study, zipped

MEMBERS = {"qBOLD/run1.PAR": b"PAR " * 5000, "report.pdf": b"%PDF-1.4 " * 3000, "notes.txt": b"fine"}


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@pytest.fixture
def xnat() -> Iterator[FakeXnat]:
    with FakeXnat() as server:
        server.add_user("ingestd", "pw-123456")
        server.add_user("reader", "pw-reader")
        server.add_project("PROJ", members=["ingestd"], collaborators=["reader"])
        yield server


def _client(xnat: FakeXnat, tmp_path: Path, secret: str = "ingestd:pw-123456") -> XnatClient:
    path = tmp_path / f"{secret.partition(':')[0]}.credentials"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    server = XnatServer(url=xnat.url, credentials=Credentials(file=path), read_timeout_seconds=5)
    return XnatClient("main", server)


@pytest.fixture
def eid(xnat: FakeXnat) -> str:
    with requests.Session() as session:
        session.auth = ("ingestd", "pw-123456")
        return archive_session(xnat, session)


@pytest.fixture
def client(xnat: FakeXnat, tmp_path: Path) -> Iterator[XnatClient]:
    made = _client(xnat, tmp_path)
    yield made
    made.close()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "set.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in MEMBERS.items():
            archive.writestr(name, data)
    return path


def _expected() -> list[ResourceFile]:
    return _sorted([ResourceFile(name, len(data), _md5(data)) for name, data in MEMBERS.items()])


def _sorted(files: list[ResourceFile] | None) -> list[ResourceFile]:
    assert files is not None
    return sorted(files, key=lambda found: found.name)


def test_resource_path_levels_and_quoting() -> None:
    base = "/data/experiments/XNAT_E00001"
    assert resource_path(base, "session", "", "qBOLD", project="P", subject="S") == f"{base}/resources/qBOLD"
    assert resource_path(base, "scan", "7 b", "NIFTI", project="P", subject="S") == (
        f"{base}/scans/7%20b/resources/NIFTI"
    )
    assert resource_path(base, "subject", "", "L/x", project="P Q", subject="S&1") == (
        "/data/projects/P%20Q/subjects/S%261/resources/L%2Fx"
    )
    prearc = "/data/prearchive/projects/P/20260101_000000000/S 1"
    assert resource_path(prearc, "session", "", "L", project="P", subject="S") == (
        "/data/prearchive/projects/P/20260101_000000000/S%201/resources/L"
    )
    with pytest.raises(ValueError, match="cannot be written"):
        resource_path(prearc, "scan", "1", "L", project="P", subject="S")
    with pytest.raises(ValueError, match="unknown resource level"):
        resource_path(base, "project", "", "L", project="P", subject="S")


def test_upload_zip_lists_every_member_with_its_md5(xnat: FakeXnat, client: XnatClient, eid: str, bundle: Path) -> None:
    path = resource_path(f"/data/experiments/{eid}", "session", "", "qBOLD", project="PROJ", subject="SUBJ01")
    assert list_resource(client, path) == []  # no such label: nothing listed
    assert upload_zip(client, path, bundle, name="ingestd-1.zip", overwrite=False) == ()
    assert _sorted(list_resource(client, path)) == _expected()
    assert download(client, path, "qBOLD/run1.PAR") == MEMBERS["qBOLD/run1.PAR"]
    # Sent whole with a Content-Length, never chunked
    (framing,) = [f for f in xnat.body_framing if f[0] == "PUT"]
    assert framing[2] == bundle.stat().st_size and not framing[3]
    # Again: every member is a duplicate (nothing stored); with overwrite none is
    assert sorted(upload_zip(client, path, bundle, name="ingestd-1.zip", overwrite=False)) == sorted(MEMBERS)
    assert upload_zip(client, path, bundle, name="ingestd-1.zip", overwrite=True) == ()
    with pytest.raises(ValueError, match=r"\.zip"):
        upload_zip(client, path, bundle, name="ingestd-1.ZIP", overwrite=False)


def test_scan_and_subject_levels(xnat: FakeXnat, client: XnatClient, eid: str, bundle: Path) -> None:
    base = f"/data/experiments/{eid}"
    scan = resource_path(base, "scan", "1", "NIFTI", project="PROJ", subject="SUBJ01")
    subject = resource_path(base, "subject", "", "CONSENT", project="PROJ", subject="SUBJ01")
    for path in (scan, subject):
        assert upload_zip(client, path, bundle, name="ingestd-2.zip", overwrite=False) == ()
        assert _sorted(list_resource(client, path)) == _expected()


def test_listing_of_an_unknown_owner_is_none(client: XnatClient, eid: str) -> None:
    path = resource_path("/data/experiments/XNAT_E99999", "session", "", "L", project="P", subject="S")
    assert list_resource(client, path) is None
    missing_scan = resource_path(f"/data/experiments/{eid}", "scan", "99", "L", project="P", subject="S")
    assert list_resource(client, missing_scan) is None


def test_reset_mid_upload_then_what_the_listing_shows(
    xnat: FakeXnat, client: XnatClient, eid: str, bundle: Path
) -> None:
    """res §6: the members read whole are on disk but not listed; a retry with overwrite=false reports them as
    duplicates and stores only the others; overwrite=true stores them all."""
    path = resource_path(f"/data/experiments/{eid}", "session", "", "qBOLD", project="PROJ", subject="SUBJ01")
    xnat.reset_next("PUT", path, after_bytes=25_000)  # past the first member (20 kB), not the second
    with pytest.raises(XnatError) as caught:
        upload_zip(client, path, bundle, name="ingestd-3.zip", overwrite=False)
    assert caught.value.retryable
    assert list_resource(client, path) == []
    assert upload_zip(client, path, bundle, name="ingestd-3.zip", overwrite=False) == ("qBOLD/run1.PAR",)
    assert sorted(f.name for f in list_resource(client, path) or []) == ["notes.txt", "report.pdf"]
    assert upload_zip(client, path, bundle, name="ingestd-3.zip", overwrite=True) == ()
    assert _sorted(list_resource(client, path)) == _expected()


def test_503_stores_nothing(xnat: FakeXnat, client: XnatClient, eid: str, bundle: Path) -> None:
    path = resource_path(f"/data/experiments/{eid}", "session", "", "qBOLD", project="PROJ", subject="SUBJ01")
    xnat.fail_next("PUT", path)
    with pytest.raises(XnatError) as caught:
        upload_zip(client, path, bundle, name="ingestd-4.zip", overwrite=False)
    assert caught.value.retryable and caught.value.status == 503
    assert list_resource(client, path) == []


def test_proxy_504_after_xnat_stored_everything(xnat: FakeXnat, client: XnatClient, eid: str, bundle: Path) -> None:
    path = resource_path(f"/data/experiments/{eid}", "session", "", "qBOLD", project="PROJ", subject="SUBJ01")
    xnat.proxy_timeout_next(path, method="PUT", after_seconds=0.3, import_seconds=0.0)
    with pytest.raises(XnatError) as caught:
        upload_zip(client, path, bundle, name="ingestd-5.zip", overwrite=False)
    assert caught.value.retryable and caught.value.status == 504
    assert _sorted(list_resource(client, path)) == _expected()


def test_read_only_account_gets_an_empty_200_and_the_listing_tells(
    xnat: FakeXnat, tmp_path: Path, eid: str, bundle: Path
) -> None:
    reader = _client(xnat, tmp_path, "reader:pw-reader")
    path = resource_path(f"/data/experiments/{eid}", "session", "", "qBOLD", project="PROJ", subject="SUBJ01")
    assert upload_zip(reader, path, bundle, name="ingestd-6.zip", overwrite=False) == ()
    assert list_resource(reader, path) == []
    reader.close()


def test_an_html_page_with_200_is_a_refusal(xnat: FakeXnat, client: XnatClient, eid: str, bundle: Path) -> None:
    path = resource_path(f"/data/experiments/{eid}", "session", "", "qBOLD", project="PROJ", subject="SUBJ01")
    xnat.html_error_with_200_next("PUT", path, message="Something went wrong")
    with pytest.raises(XnatError) as caught:
        upload_zip(client, path, bundle, name="ingestd-7.zip", overwrite=False)
    assert not caught.value.retryable and "Something went wrong" in str(caught.value)


def test_download_of_a_missing_file_is_an_error(client: XnatClient, eid: str) -> None:
    path = resource_path(f"/data/experiments/{eid}", "session", "", "qBOLD", project="PROJ", subject="SUBJ01")
    with pytest.raises(XnatError) as caught:
        download(client, path, "nothing.pdf")
    assert caught.value.status == 404 and "Unable to find file." in str(caught.value)


def test_upload_file_into_a_prearchive_session(xnat: FakeXnat, client: XnatClient, tmp_path: Path) -> None:
    with requests.Session() as session:
        session.auth = ("ingestd", "pw-123456")
        assert import_zip(xnat, session, zipped(numbered_study(1, 1))).status_code == 200
    (row,) = xnat.prearchive_rows("PROJ")
    path = resource_path(f"/data{row['url']}", "session", "", "qBOLD", project="PROJ", subject="SUBJ01")
    report = tmp_path / "report 1.pdf"
    report.write_bytes(b"%PDF-1.4 prearchive")
    with pytest.raises(XnatError) as caught:  # not built yet: no session document
        upload_file(client, path, "report 1.pdf", report)
    assert caught.value.status == 404 and not caught.value.retryable
    assert list_resource(client, path) is None
    xnat.build_now()
    assert list_resource(client, path) is None  # built, but no such resource yet
    upload_file(client, path, "report 1.pdf", report)
    report.write_bytes(b"%PDF-1.4 prearchive, again")
    upload_file(client, path, "report 1.pdf", report)  # always overwrites
    assert list_resource(client, path) == [ResourceFile("report 1.pdf", len(report.read_bytes()), "")]
    assert download(client, path, "report 1.pdf") == report.read_bytes()
    # XNAT keeps the prearchive name as sent, undecoded: the listing URI decodes back to the name asked for
    state = xnat.resource_state("PROJ", "qBOLD", prearchive=(row["timestamp"], row["folderName"]))
    assert state is not None and list(state.disk) == ["report%201.pdf"]


def test_lookups(xnat: FakeXnat, client: XnatClient, eid: str) -> None:
    assert experiment_id(client, "PROJ", "SUBJ01", "SESS01") == eid
    assert experiment_id(client, "PROJ", "SUBJ01", "NOPE") is None
    assert scan_ids(client, eid) == frozenset({"1", "2"})
    assert subject_exists(client, "PROJ", "SUBJ01")
    assert not subject_exists(client, "PROJ", "NOBODY")


def test_a_name_xnat_will_not_catalog_is_a_permanent_refusal(client: XnatClient, eid: str, tmp_path: Path) -> None:
    """A 500 "XNAT cannot catalog" (res §1.3) does not change on retry: not retryable. The resource's own catalog
    name is always refused."""
    path = resource_path(f"/data/experiments/{eid}", "session", "", "L", project="PROJ", subject="SUBJ01")
    catalog = tmp_path / "L_catalog.xml"
    catalog.write_bytes(b"<x/>")
    with pytest.raises(XnatError) as caught:
        upload_file(client, path, "L_catalog.xml", catalog)
    assert caught.value.status == 500 and not caught.value.retryable
