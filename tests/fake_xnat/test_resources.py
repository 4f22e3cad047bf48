"""The stand-in's resource file API on archived data (docs/xnat-resources.md §1-§4): routes, bodies, names,
`overwrite`, `extract`, listings, downloads, deletes, labels and permissions."""

from __future__ import annotations

import hashlib
import zipfile

import pytest
import requests

from ingestd.testing.xnat import FakeXnat
from ingestd.testing.xnat.resource_files import hack_check
from tests.fake_xnat.archived import archive_session, listing, tar_of, zip_of
from tests.fake_xnat.conftest import Factory
from tests.fake_xnat.helpers import TIMEOUT, h3

PDF = {"Content-Type": "application/pdf"}
ZIP = {"Content-Type": "application/zip"}
EXP = "/data/projects/PROJ/subjects/SUBJ01/experiments/SESS01"


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@pytest.fixture
def eid(xnat: FakeXnat, alice: requests.Session) -> str:
    return archive_session(xnat, alice)


def _routes(eid: str) -> dict[str, tuple[str, str]]:
    """Every route to a resource (res §1.1, §2): name -> (upload path, what `resource_state` calls it)."""
    return {
        "session": (f"{EXP}/resources/L", "session"),
        "session-archive": (f"/data/archive{EXP.removeprefix('/data')}/resources/L", "session"),
        "session-no-subject": ("/data/projects/PROJ/experiments/SESS01/resources/L", "session"),
        "session-by-label-no-subject": (f"/data/archive/projects/PROJ/experiments/{eid}/resources/L", "session"),
        "session-by-id": (f"/data/experiments/{eid}/resources/L", "session"),
        "session-by-id-archive": (f"/data/archive/experiments/{eid}/resources/L", "session"),
        "scan": (f"{EXP}/scans/1/resources/L", "scan"),
        "scan-by-id": (f"/data/experiments/{eid}/scans/1/resources/L", "scan"),
        "scan-by-id-archive": (f"/data/archive/experiments/{eid}/scans/1/resources/L", "scan"),
        "subject": ("/data/projects/PROJ/subjects/SUBJ01/resources/L", "subject"),
        "subject-archive": ("/data/archive/projects/PROJ/subjects/SUBJ01/resources/L", "subject"),
        "subject-by-id": ("/data/subjects/{sid}/resources/L", "subject"),
        "subject-by-id-archive": ("/data/archive/subjects/{sid}/resources/L", "subject"),
    }


@pytest.mark.parametrize("route", list(_routes("E")))
@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_every_route_stores_lists_and_serves_a_file(
    xnat: FakeXnat, alice: requests.Session, eid: str, route: str, method: str
) -> None:
    path, level = _routes(eid)[route]
    subject_id = next(s["ID"] for s in listing(alice, f"{xnat.url}/data/projects/PROJ/subjects"))
    url = f"{xnat.url}{path.format(sid=subject_id)}/files"
    response = alice.request(method, f"{url}/report.pdf", data=b"%PDF-1 report", headers=PDF, timeout=TIMEOUT)
    assert (response.status_code, response.text) == (200, "")
    assert response.headers["Content-Type"].startswith("text/plain")
    (row,) = listing(alice, url)
    assert (row["Name"], row["Size"], row["digest"]) == ("report.pdf", "13", _md5(b"%PDF-1 report"))
    assert alice.get(f"{url}/report.pdf", timeout=TIMEOUT).content == b"%PDF-1 report"
    if level == "subject":
        state = xnat.resource_state("PROJ", "L", subject="SUBJ01")
    else:
        state = xnat.resource_state("PROJ", "L", session="SESS01", scan="1" if level == "scan" else None)
    assert state is not None and state.disk == {"report.pdf": b"%PDF-1 report"}


def test_no_scan_route_through_a_project_without_subject(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    """XNATApplication has no /projects/P/experiments/E/scans/... route (res §2): nothing is stored that way."""
    url = f"{xnat.url}/data/projects/PROJ/experiments/SESS01/scans/1/resources/L/files/a.pdf"
    assert alice.put(url, data=b"x", headers=PDF, timeout=TIMEOUT).status_code == 405
    assert xnat.resource_state("PROJ", "L", session="SESS01", scan="1") is None


def test_listing_columns_uri_and_catalog_ids(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    """res §4: the columns in order; URI by the numeric resource id below getBaseURI's prefix, which has project and
    subject only when the request had them; `collection` the label; `cat_ID` the id."""
    url = f"{xnat.url}{EXP}/resources/qBOLD/files"
    alice.put(f"{url}/a/b.nii", data=b"nifti", headers={"Content-Type": "application/octet-stream"}, timeout=TIMEOUT)
    (row,) = listing(alice, url)
    assert list(row) == [
        "Name", "Size", "URI", "collection", "file_tags", "file_format", "file_content", "cat_ID", "digest",
    ]  # fmt: skip
    resource_id = row["cat_ID"]
    assert resource_id.isdigit() and row["collection"] == "qBOLD" and row["Name"] == "b.nii"
    subject_id = next(s["ID"] for s in listing(alice, f"{xnat.url}/data/projects/PROJ/subjects"))
    prefix = f"/data/projects/PROJ/subjects/{subject_id}/experiments/{eid}"
    assert row["URI"] == f"{prefix}/resources/{resource_id}/files/a/b.nii"
    (by_id,) = listing(alice, f"{xnat.url}/data/experiments/{eid}/resources/qBOLD/files")
    assert by_id["URI"] == f"/data/experiments/{eid}/resources/{resource_id}/files/a/b.nii"
    # The numeric id names the same resource (XNATCatalogTemplate 56-69): listing, download
    assert listing(alice, f"{xnat.url}/data/experiments/{eid}/resources/{resource_id}/files") == [by_id]
    assert alice.get(f"{xnat.url}{by_id['URI']}", timeout=TIMEOUT).content == b"nifti"
    response = alice.get(f"{xnat.url}/data/experiments/{eid}/resources", params={"format": "json"}, timeout=TIMEOUT)
    (resource,) = response.json()["ResultSet"]["Result"]
    assert (resource["label"], resource["file_count"], resource["file_size"]) == ("qBOLD", "1", "5")
    assert resource["xnat_abstractresource_id"] == resource_id


def test_checksums_off_lists_no_digest(make_xnat: Factory) -> None:
    xnat = make_xnat(checksums=False)
    with requests.Session() as alice:
        alice.auth = ("alice", "alice-pw")
        archive_session(xnat, alice)
        url = f"{xnat.url}{EXP}/resources/L/files"
        alice.put(f"{url}/a.pdf", data=b"pdf", headers=PDF, timeout=TIMEOUT)
        (row,) = listing(alice, url)
    assert (row["Size"], row["digest"]) == ("3", "")


def test_body_rules(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    """res §1.2: no upload Content-Type -> 400 (two messages), multipart with inbody=true -> 406, a chunked body not
    application/zip -> 500; a chunked zip is taken; no name after /files -> `upload` + the type's extension."""
    url = f"{xnat.url}{EXP}/resources/L/files"
    empty = alice.put(f"{url}/a.pdf", data=b"", timeout=TIMEOUT)
    assert empty.status_code == 400 and "didn't provide any data (found request entity size of 0)" in h3(empty)
    untyped = alice.put(f"{url}/a.pdf", data=b"abc", headers={"Content-Type": ""}, timeout=TIMEOUT)
    assert untyped.status_code == 400 and "query-string parameter inbody=true" in h3(untyped)
    json_body = alice.put(f"{url}/a.json", data=b"{}", headers={"Content-Type": "application/json"}, timeout=TIMEOUT)
    assert json_body.status_code == 400  # the list is matched exactly: application/json is not in it
    multipart = alice.put(f"{url}/a.pdf", params={"inbody": "true"}, files={"f": ("a.pdf", b"x")}, timeout=TIMEOUT)
    assert multipart.status_code == 406 and "not as part of multi-part form data" in h3(multipart)
    chunked = alice.put(f"{url}/c.pdf", data=iter([b"ab", b"cd"]), headers=PDF, timeout=TIMEOUT)
    assert chunked.status_code == 500 and "request entity size is -1" in h3(chunked)
    chunked_zip = alice.put(f"{url}/c.zip", data=iter([zip_of([("m.txt", b"m")])]), headers=ZIP, timeout=TIMEOUT)
    assert chunked_zip.status_code == 200
    unnamed = alice.put(url, data=b"%PDF", headers=PDF, timeout=TIMEOUT)
    assert unnamed.status_code == 200
    assert {row["Name"] for row in listing(alice, url)} == {"c.zip", "upload.pdf"}
    state = xnat.resource_state("PROJ", "L", session="SESS01")
    assert state is not None and "a.pdf" not in state.disk and "c.pdf" not in state.disk


def test_multipart_upload_takes_the_part_name_unless_the_url_names_one(
    xnat: FakeXnat, alice: requests.Session, eid: str
) -> None:
    url = f"{xnat.url}{EXP}/resources/L/files"
    assert alice.put(url, files={"file": ("C:\\scans\\part.txt", b"part")}, timeout=TIMEOUT).status_code == 200
    assert alice.post(f"{url}/named.txt", files={"file": ("other.txt", b"n")}, timeout=TIMEOUT).status_code == 200
    assert {row["Name"] for row in listing(alice, url)} == {"part.txt", "named.txt"}


@pytest.mark.parametrize(
    ("value", "replaces"),
    [(None, False), ("false", False), ("FALSE", False), ("0", False), ("true", True), ("", True), ("no", True)],
)
def test_overwrite_flag_and_duplicates(
    xnat: FakeXnat, alice: requests.Session, eid: str, value: str | None, replaces: bool
) -> None:
    """res §1.5: absent = false, `false`/`0` false, anything else true; a name on disk with overwrite false is
    200 `{"duplicates":[...]}` as text/html and nothing changes; with overwrite the file and its digest change."""
    url = f"{xnat.url}{EXP}/resources/L/files/a.txt"
    alice.put(url, data=b"old", headers={"Content-Type": "text/plain"}, timeout=TIMEOUT)
    params = {} if value is None else {"overwrite": value}
    again = alice.put(url, params=params, data=b"newer", headers={"Content-Type": "text/plain"}, timeout=TIMEOUT)
    assert again.status_code == 200
    (row,) = listing(alice, f"{xnat.url}{EXP}/resources/L/files")
    if replaces:
        assert again.text == "" and (row["Size"], row["digest"]) == ("5", _md5(b"newer"))
        assert alice.get(url, timeout=TIMEOUT).content == b"newer"
    else:
        assert again.text == '{"duplicates":["a.txt"]}'
        assert again.headers["Content-Type"].startswith("text/html")
        assert (row["Size"], row["digest"]) == ("3", _md5(b"old"))


def test_extract_puts_members_at_the_resource_root_and_drops_the_archive(
    xnat: FakeXnat, alice: requests.Session, eid: str
) -> None:
    """res §1.4: members keep their paths, at the resource root whatever the URL path; the zip is not kept; a second
    extract without overwrite reports every member and changes nothing; with overwrite it replaces them."""
    url = f"{xnat.url}{EXP}/resources/L/files"
    bundle = zip_of([("a/one.txt", b"1"), ("two.txt", b"2"), ("dir/", b"")], compress=True)
    first = alice.put(f"{url}/deep/up.zip", params={"extract": "true"}, data=bundle, headers=ZIP, timeout=TIMEOUT)
    assert (first.status_code, first.text) == (200, "")
    rows = listing(alice, url)
    assert sorted(row["URI"].split("/files/", 1)[1] for row in rows) == ["a/one.txt", "two.txt"]
    changed = zip_of([("a/one.txt", b"one"), ("two.txt", b"two")])
    again = alice.put(f"{url}/up.zip", params={"extract": "true"}, data=changed, headers=ZIP, timeout=TIMEOUT)
    assert again.text == '{"duplicates":["a/one.txt","two.txt"]}'
    assert alice.get(f"{url}/two.txt", timeout=TIMEOUT).content == b"2"
    forced = alice.put(
        f"{url}/up.zip", params={"extract": "true", "overwrite": "true"}, data=changed, headers=ZIP, timeout=TIMEOUT
    )
    assert forced.text == ""
    digests = {row["Name"]: row["digest"] for row in listing(alice, url)}
    assert digests == {"one.txt": _md5(b"one"), "two.txt": _md5(b"two")}


@pytest.mark.parametrize(
    ("name", "kept"),
    [("b.tar", False), ("b.tgz", False), ("b.tar.gz", False), ("B.ZIP", True), ("b.zip.pdf", True)],
)
def test_extract_by_lower_case_name_only(
    xnat: FakeXnat, alice: requests.Session, eid: str, name: str, kept: bool
) -> None:
    url = f"{xnat.url}{EXP}/resources/L/files"
    members = [("m/x.txt", b"x")]
    body = tar_of(members, gz=name.endswith("gz")) if "tar" in name or "tgz" in name else zip_of(members)
    response = alice.put(
        f"{url}/{name}", params={"extract": "true"}, data=body, headers={"Content-Type": "application/octet-stream"},
        timeout=TIMEOUT,
    )  # fmt: skip
    assert response.status_code == 200
    assert [row["Name"] for row in listing(alice, url)] == ([name] if kept else ["x.txt"])


def test_without_extract_an_archive_is_one_file(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    url = f"{xnat.url}{EXP}/resources/L/files"
    body = zip_of([("x.txt", b"x")])
    alice.put(f"{url}/bundle.zip", data=body, headers=ZIP, timeout=TIMEOUT)
    (row,) = listing(alice, url)
    assert (row["Name"], row["digest"]) == ("bundle.zip", _md5(body))
    assert zipfile.is_zipfile(__import__("io").BytesIO(alice.get(f"{url}/bundle.zip", timeout=TIMEOUT).content))


def test_resource_is_created_with_format_and_content_and_tags_pile_up(
    xnat: FakeXnat, alice: requests.Session, eid: str
) -> None:
    """res §1.6-1.7, §2: query values set on the resource (and on the entries); a scan's first resource gets
    content RAW only when the scan had none (the DICOM one counts)."""
    url = f"{xnat.url}{EXP}/resources/PDFS/files"
    params = {"format": "PDF", "content": "REPORT", "tags": "t1"}
    alice.put(f"{url}/a.pdf", params=params, data=b"a", headers=PDF, timeout=TIMEOUT)
    alice.put(f"{url}/b.pdf", params={"tags": "t2"}, data=b"b", headers=PDF, timeout=TIMEOUT)
    (resource,) = listing(alice, f"{xnat.url}{EXP}/resources")
    assert (resource["format"], resource["content"], resource["tags"]) == ("PDF", "REPORT", "t1,t2")
    rows = {row["Name"]: row for row in listing(alice, url)}
    assert (rows["a.pdf"]["file_format"], rows["a.pdf"]["file_content"], rows["a.pdf"]["file_tags"]) == (
        "PDF", "REPORT", "t1",
    )  # fmt: skip
    assert rows["b.pdf"]["file_format"] == ""
    alice.put(f"{xnat.url}{EXP}/scans/1/resources/NIFTI/files/s.nii", data=b"n", headers=PDF, timeout=TIMEOUT)
    scan_resources = listing(alice, f"{xnat.url}{EXP}/scans/1/resources")
    assert {r["label"]: r["content"] for r in scan_resources} == {"DICOM": "RAW", "NIFTI": ""}


def test_unknown_owners_are_404_with_xnat_texts(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    cases = {
        "/data/projects/NOPE/subjects/SUBJ01/experiments/SESS01": "Unable to identify project",
        "/data/projects/OTHER/subjects/SUBJ01/experiments/SESS01": "Unable to identify project",  # not readable
        "/data/projects/PROJ/subjects/NOBODY/experiments/SESS01": "Unable to identify subject",
        "/data/projects/PROJ/subjects/SUBJ01/experiments/NOPE": "Unable to identify experiment",
        "/data/experiments/XNAT_E99999": "Unable to identify experiment",
        f"{EXP}/scans/99": "Unable to identify scan",
    }
    for path, message in cases.items():
        response = alice.put(f"{xnat.url}{path}/resources/L/files/a.pdf", data=b"a", headers=PDF, timeout=TIMEOUT)
        assert (response.status_code, h3(response)) == (404, message), path


def test_labels_xnat_takes_otherwise(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    """res §3: a digits-only label is a resource ID (none -> 403); a label is not URL-decoded (Restlet 1.1
    attributes [INF]), so `my%20label` is that label, literally."""
    digits = alice.put(f"{xnat.url}{EXP}/resources/2024/files/a.pdf", data=b"a", headers=PDF, timeout=TIMEOUT)
    assert digits.status_code == 403 and "requested 1 resources by ID" in h3(digits)
    spaced = alice.put(f"{xnat.url}{EXP}/resources/my%20label/files/a.pdf", data=b"a", headers=PDF, timeout=TIMEOUT)
    assert spaced.status_code == 200
    assert [r["label"] for r in listing(alice, f"{xnat.url}{EXP}/resources")] == ["my%20label"]


def test_hack_check() -> None:
    """PoolDBUtils.HackCheck (res §3): what makes XNAT answer a silent 200 that stores nothing. A URL label cannot
    carry the whitespace the SQL words need while labels stay undecoded, so only the function is tested here."""
    assert not hack_check("qBOLD") and not hack_check("scan_7.PAR") and not hack_check("a-b")
    assert not hack_check("DROP table")  # letters and spaces pass before the SQL words are looked at
    assert hack_check("x;DROP table") and hack_check("x-select y") and hack_check("ends\\")


def test_catalog_and_lock_names(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    """CatalogUtils.storeCatalogEntry 1753-1756 refuses (500 "XNAT cannot catalog") a `_catalog.xml` or `.~lock-`
    name only when that file is already there: the resource's own catalog always is; a new one is written and
    catalogued as any file, and refused the next time. Extracted members of such names are written, never
    catalogued (1728)."""
    url = f"{xnat.url}{EXP}/resources/L/files"
    own = alice.put(f"{url}/L_catalog.xml", data=b"<x/>", headers={"Content-Type": "text/xml"}, timeout=TIMEOUT)
    assert own.status_code == 500 and h3(own) == "XNAT cannot catalog L_catalog.xml"
    new = alice.put(f"{url}/.~lock-x", data=b"l", headers=PDF, timeout=TIMEOUT)
    assert new.status_code == 200 and [row["Name"] for row in listing(alice, url)] == [".~lock-x"]
    again = alice.put(f"{url}/.~lock-x", data=b"l", headers=PDF, params={"overwrite": "true"}, timeout=TIMEOUT)
    assert again.status_code == 500 and h3(again) == "XNAT cannot catalog .~lock-x"
    bundle = zip_of([("a_catalog.xml", b"<c/>"), ("ok.txt", b"ok")])
    alice.put(f"{url}/b.zip", params={"extract": "true"}, data=bundle, headers=ZIP, timeout=TIMEOUT)
    assert sorted(row["Name"] for row in listing(alice, url)) == [".~lock-x", "ok.txt"]
    state = xnat.resource_state("PROJ", "L", session="SESS01")
    assert state is not None and "a_catalog.xml" in state.disk


def test_read_only_account_gets_an_empty_200_and_stores_nothing(
    make_xnat: Factory, xnat: FakeXnat, alice: requests.Session, eid: str
) -> None:
    """res §1.1: handlePost's `if (canEdit)` has no else branch."""
    with requests.Session() as carol:
        carol.auth = ("carol", "carol-pw")
        response = carol.put(f"{xnat.url}{EXP}/resources/L/files/a.pdf", data=b"a", headers=PDF, timeout=TIMEOUT)
        assert (response.status_code, response.text) == (200, "")
        assert xnat.resource_state("PROJ", "L", session="SESS01") is None
        alice.put(f"{xnat.url}{EXP}/resources/L/files/a.pdf", data=b"a", headers=PDF, timeout=TIMEOUT)
        denied = carol.delete(f"{xnat.url}{EXP}/resources/L/files/a.pdf", timeout=TIMEOUT)
        assert denied.status_code == 403
        assert "doesn't have permission to modify this session" in h3(denied)


def test_download_and_delete(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    url = f"{xnat.url}{EXP}/resources/L/files"
    alice.put(f"{url}/a.pdf", data=b"a", headers=PDF, timeout=TIMEOUT)
    missing = alice.get(f"{url}/b.pdf", timeout=TIMEOUT)
    assert (missing.status_code, h3(missing)) == (404, "Unable to find file.")
    quiet = alice.get(f"{url}/b.pdf", params={"accept-not-found": "true"}, timeout=TIMEOUT)
    assert (quiet.status_code, quiet.content) == (204, b"")
    assert alice.delete(f"{url}/a.pdf", timeout=TIMEOUT).status_code == 200
    assert listing(alice, url) == []
    gone = alice.delete(f"{url}/a.pdf", timeout=TIMEOUT)
    assert (gone.status_code, h3(gone)) == (404, "No matched files")
    state = xnat.resource_state("PROJ", "L", session="SESS01")
    assert state is not None and state.disk == {}


def test_experiment_json_lists_session_resources(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    alice.put(f"{xnat.url}{EXP}/resources/L/files/a.pdf", data=b"abc", headers=PDF, timeout=TIMEOUT)
    item = alice.get(f"{xnat.url}{EXP}", params={"format": "json"}, timeout=TIMEOUT).json()["items"][0]
    (resources,) = [child for child in item["children"] if child["field"] == "resources/resource"]
    (resource,) = resources["items"]
    assert (resource["data_fields"]["label"], resource["data_fields"]["file_size"]) == ("L", 3)


def test_scan_listings_keep_the_dicom_resource_and_know_no_other_label(
    xnat: FakeXnat, alice: requests.Session, eid: str
) -> None:
    """The scan routes the resource API adds in front still serve the DICOM catalog's files; a label the scan does
    not have lists nothing (an empty table, not 404); uploads into DICOM are not modelled (500, said so)."""
    scan = f"{xnat.url}/data/experiments/{eid}/scans/1/resources"
    assert len(listing(alice, f"{scan}/DICOM/files")) == 2
    assert listing(alice, f"{scan}/NIFTI/files") == []
    refused = alice.put(f"{scan}/DICOM/files/x.dcm", data=b"x", headers=PDF, timeout=TIMEOUT)
    assert refused.status_code == 500 and "does not model" in h3(refused)


def test_format_json_on_an_upload_is_the_resource_format(xnat: FakeXnat, alice: requests.Session, eid: str) -> None:
    """res §1.6: `format` is both the answer's format and the resource's: `format=json` on a PUT makes "json" the
    resource's and the file's format."""
    url = f"{xnat.url}{EXP}/resources/L/files"
    alice.put(f"{url}/a.pdf", params={"format": "json"}, data=b"a", headers=PDF, timeout=TIMEOUT)
    (resource,) = listing(alice, f"{xnat.url}{EXP}/resources")
    (row,) = listing(alice, url)
    assert (resource["format"], row["file_format"]) == ("json", "json")
