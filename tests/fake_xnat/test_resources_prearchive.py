"""Session-level resources of a prearchive session (docs/xnat-resources.md §5): only after the build, always
overwritten, never extracted, no digest; kept through a rebuild; archived with the session, digests added."""

from __future__ import annotations

import hashlib

import pytest
import requests

from ingestd.testing.xnat import FakeXnat
from tests.fake_xnat.archived import listing, zip_of
from tests.fake_xnat.helpers import TIMEOUT, h3, import_zip, numbered_study, zipped

OCTETS = {"Content-Type": "application/octet-stream"}


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _row(xnat: FakeXnat) -> dict[str, str]:
    (row,) = xnat.prearchive_rows("PROJ")
    return row


@pytest.fixture
def study(xnat: FakeXnat, alice: requests.Session) -> bytes:
    data = zipped(numbered_study(1, 2))
    assert import_zip(xnat, alice, data).status_code == 200
    return data


def test_not_before_the_build(xnat: FakeXnat, alice: requests.Session, study: bytes) -> None:
    url = f"{xnat.url}/data{_row(xnat)['url']}/resources/L/files/a.pdf"
    early = alice.put(url, data=b"a", headers=OCTETS, timeout=TIMEOUT)
    assert (early.status_code, h3(early)) == (404, "Unable to locate prearc resource.")
    xnat.build_now()
    assert alice.put(url, data=b"a", headers=OCTETS, timeout=TIMEOUT).status_code == 200


def test_always_overwrites_never_extracts_no_digest(xnat: FakeXnat, alice: requests.Session, study: bytes) -> None:
    xnat.build_now()
    base = f"{xnat.url}/data{_row(xnat)['url']}/resources/L/files"
    assert alice.put(f"{base}/a.bin", data=b"first", headers=OCTETS, timeout=TIMEOUT).status_code == 200
    second = alice.put(f"{base}/a.bin", data=b"second!", headers=OCTETS, timeout=TIMEOUT)
    assert (second.status_code, second.text) == (200, "")  # no duplicates check
    bundle = zip_of([("m.txt", b"m")])
    alice.put(f"{base}/b.zip", params={"extract": "true"}, data=bundle, headers={"Content-Type": "application/zip"})
    rows = listing(alice, base)
    assert [list(row) for row in rows] == [["Name", "Size", "URI"]] * 2
    by_name = {row["Name"]: row for row in rows}
    assert by_name["a.bin"]["Size"] == "7"  # the listing reads the file's length on disk
    assert by_name["a.bin"]["URI"] == f"/data{_row(xnat)['url']}/resources/L/files/a.bin"
    assert by_name["b.zip"]["Size"] == str(len(bundle))
    assert alice.get(f"{base}/a.bin", timeout=TIMEOUT).content == b"second!"
    resources = listing(alice, f"{xnat.url}/data{_row(xnat)['url']}/resources")
    assert [r["label"] for r in resources] == ["L"]


def test_post_and_scan_level_writes_are_refused(xnat: FakeXnat, alice: requests.Session, study: bytes) -> None:
    xnat.build_now()
    session = f"{xnat.url}/data{_row(xnat)['url']}"
    assert alice.post(f"{session}/resources/L/files/a.bin", data=b"a", headers=OCTETS).status_code == 405
    assert alice.put(f"{session}/scans/1/resources/L/files/a.bin", data=b"a", headers=OCTETS).status_code == 405


def test_kept_through_a_rebuild_and_archived_with_digests(
    xnat: FakeXnat, alice: requests.Session, study: bytes
) -> None:
    xnat.build_now()
    url = _row(xnat)["url"]
    base = f"{xnat.url}/data{url}/resources/L/files"
    alice.put(f"{base}/a.bin", data=b"short", headers=OCTETS, timeout=TIMEOUT)
    alice.put(f"{base}/a.bin", data=b"much longer", headers=OCTETS, timeout=TIMEOUT)  # the SIZE entry stays 5
    assert import_zip(xnat, alice, study).status_code == 200  # new files: RECEIVING, rebuilt
    xnat.build_now()
    assert _row(xnat)["url"] == url and [r["Name"] for r in listing(alice, base)] == ["a.bin"]
    archived = alice.post(f"{xnat.url}/data/services/archive", params={"src": url}, timeout=TIMEOUT)
    assert archived.status_code == 200
    (row,) = listing(alice, f"{xnat.url}/data/projects/PROJ/subjects/SUBJ01/experiments/SESS01/resources/L/files")
    # cleanupScans adds the MD5 of the file; the prearchive's SIZE metafield is what the archived catalog says
    assert (row["Name"], row["Size"], row["digest"]) == ("a.bin", "5", _md5(b"much longer"))
    state = xnat.resource_state("PROJ", "L", session="SESS01")
    assert state is not None and state.disk == {"a.bin": b"much longer"}


def test_reset_leaves_an_unlisted_file(xnat: FakeXnat, alice: requests.Session, study: bytes) -> None:
    xnat.build_now()
    url = _row(xnat)["url"]
    xnat.reset_next("PUT", f"/data{url}/resources/L/files", after_bytes=1000)
    with pytest.raises(requests.ConnectionError):
        alice.put(f"{xnat.url}/data{url}/resources/L/files/a.bin", data=b"x" * 50_000, headers=OCTETS)
    project, timestamp, folder = url.removeprefix("/prearchive/projects/").split("/")
    state = xnat.resource_state(project, "L", prearchive=(timestamp, folder))
    assert state is not None and state.disk == {"a.bin": b"x" * 1000} and state.catalog == {}
    assert listing(alice, f"{xnat.url}/data{url}/resources/L/files") == []
