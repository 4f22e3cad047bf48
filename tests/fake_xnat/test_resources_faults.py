"""Resource uploads that go wrong (docs/xnat-resources.md §6, §1.8): a connection reset mid-body leaves bytes on disk
that the catalog does not list, a later overwrite=false upload takes them for a duplicate; an injected 503 stores
nothing; a proxy's 504 hides a stored file; two uploads into one resource at once are refused (500)."""

from __future__ import annotations

import hashlib
import socket
import threading
from urllib.parse import urlsplit

import pytest
import requests

from ingestd.testing.xnat import FakeXnat
from tests.fake_xnat.archived import archive_session, listing, zip_of
from tests.fake_xnat.conftest import Factory
from tests.fake_xnat.helpers import TIMEOUT, h3, wait_for

EXP = "/data/projects/PROJ/subjects/SUBJ01/experiments/SESS01"
FILES = f"{EXP}/resources/L/files"
OCTETS = {"Content-Type": "application/octet-stream"}
BODY = bytes(range(256)) * 1024  # 256 KiB


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@pytest.fixture
def eid(xnat: FakeXnat, alice: requests.Session) -> str:
    return archive_session(xnat, alice)


def _reset_put(xnat: FakeXnat, alice: requests.Session, url: str, body: bytes, **params: str) -> None:
    with pytest.raises(requests.ConnectionError):
        alice.put(url, params=params, data=body, headers=OCTETS, timeout=TIMEOUT)


def test_reset_mid_body_leaves_an_uncatalogued_partial_file(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    xnat.reset_next("PUT", FILES, after_bytes=100_000)
    _reset_put(xnat, alice, f"{xnat.url}{FILES}/scan.PAR", BODY)
    state = xnat.resource_state("PROJ", "L", session="SESS01")
    assert state is not None  # the resource was created before the write (res §1.7)
    assert state.disk == {"scan.PAR": BODY[:100_000]} and state.catalog == {}
    assert listing(alice, f"{xnat.url}{FILES}") == []  # invisible
    missing = alice.get(f"{xnat.url}{FILES}/scan.PAR", timeout=TIMEOUT)
    assert missing.status_code == 404
    # The trap: a retry without overwrite is told "duplicate" and stores nothing, with a 200
    retry = alice.put(f"{xnat.url}{FILES}/scan.PAR", data=BODY, headers=OCTETS, timeout=TIMEOUT)
    assert (retry.status_code, retry.text) == (200, '{"duplicates":["scan.PAR"]}')
    assert listing(alice, f"{xnat.url}{FILES}") == []
    # The fix: overwrite=true
    fixed = alice.put(f"{xnat.url}{FILES}/scan.PAR", params={"overwrite": "true"}, data=BODY, headers=OCTETS)
    assert (fixed.status_code, fixed.text) == (200, "")
    (row,) = listing(alice, f"{xnat.url}{FILES}")
    assert (row["Size"], row["digest"]) == (str(len(BODY)), _md5(BODY))
    assert ("PUT", f"{FILES}/scan.PAR", 0) in xnat.requests_log


def test_reset_while_overwriting_leaves_the_old_entry_over_a_cut_file(
    xnat: FakeXnat, alice: requests.Session, eid: str
) -> None:
    """res §6: the old file is deleted, the new bytes cut short, the catalog still shows the old Size and digest."""
    old = b"old contents " * 100
    alice.put(f"{xnat.url}{FILES}/a.bin", data=old, headers=OCTETS, timeout=TIMEOUT)
    xnat.reset_next("PUT", FILES, after_bytes=5000)
    _reset_put(xnat, alice, f"{xnat.url}{FILES}/a.bin", BODY, overwrite="true")
    (row,) = listing(alice, f"{xnat.url}{FILES}")
    assert (row["Size"], row["digest"]) == (str(len(old)), _md5(old))
    assert alice.get(f"{xnat.url}{FILES}/a.bin", timeout=TIMEOUT).content == BODY[:5000]


def test_reset_mid_extract_keeps_the_members_read_whole_uncatalogued(
    xnat: FakeXnat, alice: requests.Session, eid: str
) -> None:
    members = [(f"m{n}.bin", bytes([n]) * 40_000) for n in range(4)]
    bundle = zip_of(members)  # stored: member n's bytes end near 40 kB * (n + 1)
    xnat.reset_next("PUT", FILES, after_bytes=90_000)
    _reset_put(xnat, alice, f"{xnat.url}{FILES}/bundle.zip", bundle, extract="true")
    state = xnat.resource_state("PROJ", "L", session="SESS01")
    assert state is not None and set(state.disk) == {"m0.bin", "m1.bin"} and state.catalog == {}
    assert listing(alice, f"{xnat.url}{FILES}") == []
    again = alice.put(f"{xnat.url}{FILES}/bundle.zip", params={"extract": "true"}, data=bundle, headers=OCTETS)
    assert again.text == '{"duplicates":["m0.bin","m1.bin"]}'
    assert sorted(row["Name"] for row in listing(alice, f"{xnat.url}{FILES}")) == ["m2.bin", "m3.bin"]


def test_client_hanging_up_mid_body_is_a_reset_too(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    """A client that dies after part of the body (Content-Length promised more) leaves the same partial file."""
    where = urlsplit(xnat.url)
    head = (
        f"PUT {FILES}/half.bin HTTP/1.1\r\nHost: {where.netloc}\r\nAuthorization: Basic YWxpY2U6YWxpY2UtcHc=\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    with socket.create_connection((where.hostname, where.port), timeout=TIMEOUT) as sock:
        sock.sendall(head + BODY[:1000])
    wait_for(lambda: xnat.resource_state("PROJ", "L", session="SESS01") is not None)
    state = xnat.resource_state("PROJ", "L", session="SESS01")
    assert state is not None and state.disk == {"half.bin": BODY[:1000]} and state.catalog == {}


def test_injected_503_stores_nothing(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    xnat.fail_next("PUT", FILES)
    failed = alice.put(f"{xnat.url}{FILES}/a.bin", data=b"a", headers=OCTETS, timeout=TIMEOUT)
    assert failed.status_code == 503
    assert xnat.resource_state("PROJ", "L", session="SESS01") is None
    assert xnat.faults_pending() == 0


def test_proxy_timeout_answers_504_while_xnat_stores_the_file(
    xnat: FakeXnat, alice: requests.Session, eid: str
) -> None:
    xnat.proxy_timeout_next(FILES, method="PUT", after_seconds=0.3, import_seconds=0.0)
    answer = alice.put(f"{xnat.url}{FILES}/late.bin", data=BODY, headers=OCTETS, timeout=TIMEOUT)
    assert answer.status_code == 504 and "nginx" in answer.text
    (row,) = listing(alice, f"{xnat.url}{FILES}")
    assert (row["Name"], row["digest"]) == ("late.bin", _md5(BODY))


def test_after_processing_failure_stored_the_file(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    xnat.fail_next("PUT", FILES, status=502, after_processing=True)
    assert alice.put(f"{xnat.url}{FILES}/a.bin", data=b"abc", headers=OCTETS, timeout=TIMEOUT).status_code == 502
    assert [row["Name"] for row in listing(alice, f"{xnat.url}{FILES}")] == ["a.bin"]


def _parallel(xnat: FakeXnat, urls: list[str]) -> list[requests.Response]:
    answers: list[requests.Response] = []
    lock = threading.Lock()

    def put(url: str) -> None:
        with requests.Session() as session:
            session.auth = ("alice", "alice-pw")
            response = session.put(url, data=b"data of " + url.encode(), headers=OCTETS, timeout=TIMEOUT)
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=put, args=(url,)) for url in urls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_concurrent_uploads_into_one_resource_are_refused(make_xnat: Factory) -> None:
    """res §1.8: writeCatalogToFile refuses a catalog changed since it was read (ConcurrentModificationException ->
    500); the refused upload's bytes are on disk, uncatalogued. Different resources do not meet."""
    xnat = make_xnat(operation_seconds=0.5)
    with requests.Session() as alice:
        alice.auth = ("alice", "alice-pw")
        archive_session(xnat, alice)
        same = _parallel(xnat, [f"{xnat.url}{FILES}/a.bin", f"{xnat.url}{FILES}/b.bin"])
        assert sorted(r.status_code for r in same) == [200, 500]
        (refused,) = [r for r in same if r.status_code == 500]
        assert "since I last read it" in h3(refused)
        state = xnat.resource_state("PROJ", "L", session="SESS01")
        assert state is not None and set(state.disk) == {"a.bin", "b.bin"} and len(state.catalog) == 1
        other = f"{xnat.url}{EXP}/resources/OTHER/files/c.bin"
        apart = _parallel(xnat, [f"{xnat.url}{FILES}/d.bin", other])
        assert [r.status_code for r in apart] == [200, 200]
