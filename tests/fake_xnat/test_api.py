"""The fake XNAT over real HTTP on 127.0.0.1: auth, import, prearchive, archive and fault injection."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest
import requests
from pydicom.dataset import Dataset

from ingestd.testing.xnat import FakeXnat
from tests.dicom import encode
from tests.fake_xnat.conftest import Factory
from tests.fake_xnat.helpers import TIMEOUT, ZIP, h3, numbered_study, wait_for, zipped


def client(user: str) -> requests.Session:
    session = requests.Session()
    session.auth = (user, f"{user}-pw")
    return session


def study(series: int = 2, per_series: int = 2, **attributes: str) -> list[Dataset]:
    """A synthetic study with distinct SeriesNumbers, a StudyTime and any extra attributes."""
    return numbered_study(series, per_series, **{"StudyTime": "101112", **attributes})


def upload(
    xnat: FakeXnat, session: requests.Session, data: bytes, headers: dict[str, str] | None = None, **params: str
) -> requests.Response:
    return session.post(
        f"{xnat.url}/data/services/import", params=params, data=data, headers=headers or ZIP, timeout=TIMEOUT
    )


def labelled(xnat: FakeXnat, session: requests.Session, data: bytes, **params: str) -> requests.Response:
    """Import into PROJ as subject SUBJ01 / session SESS01 (overridable)."""
    values = {"PROJECT_ID": "PROJ", "SUBJECT_ID": "SUBJ01", "EXPT_LABEL": "SESS01", **params}
    return upload(xnat, session, data, headers=None, **values)


def archive(xnat: FakeXnat, session: requests.Session, src: str, **params: str) -> requests.Response:
    return session.post(
        f"{xnat.url}/data/services/archive",
        params={"src": src, **params},
        allow_redirects=False,
        timeout=TIMEOUT,
    )


def only_row(xnat: FakeXnat, project: str | None = None) -> dict[str, str]:
    rows = xnat.prearchive_rows(project)
    assert len(rows) == 1, rows
    return rows[0]


def file_count(xnat: FakeXnat, session: requests.Session, uri: str) -> int:
    scans = session.get(f"{xnat.url}{uri}/scans", params={"format": "json"}, timeout=TIMEOUT).json()
    total = 0
    for scan in scans["ResultSet"]["Result"]:
        url = f"{xnat.url}{uri}/scans/{scan['ID']}/resources"
        resources = session.get(url, params={"format": "json"}, timeout=TIMEOUT).json()
        total += int(resources["ResultSet"]["Result"][0]["file_count"])
    return total


# ---------------------------------------------------------------------------------------------------------------
# Authentication (§2)
# ---------------------------------------------------------------------------------------------------------------


def test_form_login_jsession_and_logout(xnat: FakeXnat) -> None:
    with requests.Session() as session:
        login = session.put(
            f"{xnat.url}/data/services/auth", data={"username": "alice", "password": "alice-pw"}, timeout=TIMEOUT
        )
        assert login.status_code == 200
        assert re.fullmatch(r"[0-9A-F]{32}", login.text)
        assert session.cookies["JSESSIONID"] == login.text
        whoami = session.get(f"{xnat.url}/data/auth", timeout=TIMEOUT)
        assert (whoami.status_code, whoami.text) == (200, "User 'alice' is logged in")
        assert session.get(f"{xnat.url}/data/JSESSION", timeout=TIMEOUT).text == login.text
        assert session.delete(f"{xnat.url}/data/JSESSION", timeout=TIMEOUT).status_code == 200
        after = session.get(f"{xnat.url}/data/auth", timeout=TIMEOUT)
        assert after.status_code == 401
        assert after.headers["WWW-Authenticate"] == 'Basic realm="XNAT Protected Area"'

    bad = requests.post(
        f"{xnat.url}/data/services/auth", data={"username": "alice", "password": "nope"}, timeout=TIMEOUT
    )
    assert bad.status_code == 401
    assert "<h3>Authentication failed.</h3>" in bad.text
    assert requests.get(f"{xnat.url}/data/services/auth", timeout=TIMEOUT).status_code == 405


def test_sessions_expire_when_idle_or_on_demand(make_xnat: Factory) -> None:
    xnat = make_xnat(session_timeout_seconds=0.3)
    with requests.Session() as session:
        session.put(f"{xnat.url}/data/services/auth", data={"username": "bob", "password": "bob-pw"}, timeout=TIMEOUT)
        assert session.get(f"{xnat.url}/data/auth", timeout=TIMEOUT).status_code == 200
        time.sleep(0.4)
        assert session.get(f"{xnat.url}/data/auth", timeout=TIMEOUT).status_code == 401

        session.put(f"{xnat.url}/data/services/auth", data={"username": "bob", "password": "bob-pw"}, timeout=TIMEOUT)
        assert session.get(f"{xnat.url}/data/JSESSION", timeout=TIMEOUT).status_code == 200
        xnat.expire_sessions()
        assert session.get(f"{xnat.url}/data/JSESSION", timeout=TIMEOUT).status_code == 401


def test_basic_auth_and_alias_tokens(xnat: FakeXnat) -> None:
    with client("alice") as session:
        response = session.get(f"{xnat.url}/data/auth", timeout=TIMEOUT)
        assert response.status_code == 200
        assert re.fullmatch(r"[0-9A-F]{32}", response.cookies["JSESSIONID"])
        token = session.get(f"{xnat.url}/data/services/tokens/issue", timeout=TIMEOUT).json()
    assert re.fullmatch(r"[0-9a-f-]{36}", token["alias"])
    assert token["xdatUserId"] == "alice"
    by_token = requests.get(f"{xnat.url}/data/auth", auth=(token["alias"], token["secret"]), timeout=TIMEOUT)
    assert by_token.text == "User 'alice' is logged in"
    alias, secret = xnat.issue_token("bob")
    assert (
        requests.get(f"{xnat.url}/data/auth", auth=(alias, secret), timeout=TIMEOUT).text == "User 'bob' is logged in"
    )
    assert requests.get(f"{xnat.url}/data/auth", auth=(alias, "wrong"), timeout=TIMEOUT).status_code == 401
    assert requests.get(f"{xnat.url}/data/auth", auth=("alice", "wrong"), timeout=TIMEOUT).status_code == 401


def test_401_403_404_and_bootstrap_routes(xnat: FakeXnat) -> None:
    assert requests.get(f"{xnat.url}/data/projects", timeout=TIMEOUT).status_code == 401
    # an open URL in XNAT (configured-urls.yaml openUrls), unlike the rest of /xapi
    assert requests.get(f"{xnat.url}/xapi/siteConfig/buildInfo", timeout=TIMEOUT).status_code == 200
    assert requests.get(f"{xnat.url}/xapi/siteConfig/buildInfo/version", timeout=TIMEOUT).status_code == 401
    browser = requests.get(
        f"{xnat.url}/data/projects", headers={"User-Agent": "Mozilla/5.0"}, allow_redirects=False, timeout=TIMEOUT
    )
    assert browser.status_code == 302
    home = requests.get(xnat.url, timeout=TIMEOUT)
    assert home.status_code == 200
    assert home.url.endswith("/app/template/Login.vm")
    with client("alice") as alice:
        assert alice.get(f"{xnat.url}/data/version", timeout=TIMEOUT).status_code == 404
        info = alice.get(f"{xnat.url}/xapi/siteConfig/buildInfo", params={"format": "json"}, timeout=TIMEOUT)
        assert info.json()["version"] == "1.8.10"
        listing = alice.get(f"{xnat.url}/data/projects", params={"format": "json"}, timeout=TIMEOUT).json()
        assert [p["ID"] for p in listing["ResultSet"]["Result"]] == ["PROJ"]
        csv_text = alice.get(f"{xnat.url}/REST/projects", params={"format": "csv", "columns": "ID"}, timeout=TIMEOUT)
        assert csv_text.text.splitlines()[0].startswith("ID,")
        assert csv_text.text.splitlines()[1].startswith("PROJ,")
        assert (
            alice.get(f"{xnat.url}/data/projects/PROJ", timeout=TIMEOUT).json()["items"][0]["data_fields"]["ID"]
            == "PROJ"
        )
        forbidden = alice.get(f"{xnat.url}/data/projects/OTHER", timeout=TIMEOUT)
        assert forbidden.status_code == 403
        assert forbidden.headers["Content-Type"].startswith("text/html")
        assert alice.get(f"{xnat.url}/data/projects/NOPE", timeout=TIMEOUT).status_code == 404
        assert alice.get(f"{xnat.url}/data/archive/projects/PROJ/prearchive_code", timeout=TIMEOUT).text == "0"
    with client("carol") as carol:
        assert carol.put(f"{xnat.url}/data/projects/PROJ/prearchive_code/4", timeout=TIMEOUT).status_code == 403


# ---------------------------------------------------------------------------------------------------------------
# Import (§3) and routing (§4)
# ---------------------------------------------------------------------------------------------------------------


def test_import_with_dest_on_1_8_10_builds_a_ready_row(xnat: FakeXnat) -> None:
    datasets = study(series=2, per_series=2)
    with client("alice") as alice:
        response = labelled(xnat, alice, zipped(datasets), dest="/prearchive/projects/PROJ")
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/uri-list"
        match = re.fullmatch(r"/data/prearchive/projects/PROJ/(\d{8}_\d{9})/SESS01\r\n", response.text)
        assert match, response.text
        uri = response.text.strip()
        row = only_row(xnat)
        assert row == {
            **row,
            "project": "PROJ",
            "timestamp": match.group(1),
            "status": "READY",
            "subject": "SUBJ01",
            "name": "SESS01",
            "folderName": "SESS01",
            "tag": datasets[0].StudyInstanceUID,
            "url": f"/prearchive/projects/PROJ/{match.group(1)}/SESS01",
            "autoarchive": "Manual",
            "scan_date": "2026-01-01 10:11:12.0",
            "scan_time": "10:11:12",
            "prevent_anon": "false",
            "prevent_auto_commit": "false",
        }
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+", row["uploaded"])
        one = alice.get(f"{xnat.url}{uri}", params={"format": "json"}, timeout=TIMEOUT).json()
        assert one == {"ResultSet": {"Result": [row]}}
        scans = alice.get(f"{xnat.url}{uri}/scans", params={"format": "json"}, timeout=TIMEOUT).json()
        assert [s["ID"] for s in scans["ResultSet"]["Result"]] == ["1", "2"]
        files = alice.get(f"{xnat.url}{uri}/scans/1/resources/DICOM/files", params={"format": "json"}, timeout=TIMEOUT)
        assert sorted(f["Name"] for f in files.json()["ResultSet"]["Result"]) == ["IM0.dcm", "IM1.dcm"]
        assert alice.get(f"{xnat.url}{uri}", timeout=TIMEOUT).text.startswith("<?xml")
        missing = alice.get(f"{xnat.url}{uri[:-6]}NOPE", params={"format": "json"}, timeout=TIMEOUT)
        assert missing.json() == {"ResultSet": {"Result": []}}
        unknown = alice.get(f"{xnat.url}/data/prearchive/projects/NOPE/1/2", params={"format": "json"}, timeout=TIMEOUT)
        assert (unknown.status_code, h3(unknown)) == (500, "No project named NOPE")


def test_import_on_1_8_9_stays_receiving_until_the_idle_builder_runs(make_xnat: Factory) -> None:
    xnat = make_xnat(version="1.8.9", idle_build_seconds=0.2, rebuild_repeat_seconds=0.1)
    with client("alice") as alice:
        response = labelled(
            xnat, alice, zipped(study()), **{"import-handler": "DICOM-zip", "dest": "/prearchive/projects/PROJ"}
        )
        assert response.status_code == 200
        row = only_row(xnat)
        assert (row["status"], row["uploaded"], row["scan_time"]) == ("RECEIVING", "", "")
        before_build = alice.get(f"{xnat.url}{response.text.strip()}/scans", timeout=TIMEOUT)
        assert (before_build.status_code, h3(before_build)) == (404, "Unable to locate prearc resource.")
        wait_for(lambda: only_row(xnat)["status"] == "READY")
        assert only_row(xnat)["uploaded"] != ""
        assert only_row(xnat)["scan_time"] == "10:11:12"

        # ≤1.8.9 DICOM-zip ignores xnatpy's project/subject/session names: the data land in Unassigned.
        ignored = upload(xnat, alice, zipped(study()), None, project="PROJ", **{"import-handler": "DICOM-zip"})
        assert ignored.status_code == 200
        assert ignored.text.startswith("/data/prearchive/projects/Unassigned/")


def test_unknown_or_unreadable_project_lands_in_unassigned(xnat: FakeXnat) -> None:
    with client("alice") as alice, client("admin") as admin:
        unknown = upload(xnat, alice, zipped(study()), PROJECT_ID="NOPE")
        assert unknown.status_code == 200
        assert unknown.text.startswith("/data/prearchive/projects/Unassigned/")
        unreadable = upload(xnat, alice, zipped(study()), PROJECT_ID="OTHER")
        assert unreadable.text.startswith("/data/prearchive/projects/Unassigned/")
        mine = alice.get(f"{xnat.url}/data/prearchive/projects", params={"format": "json"}, timeout=TIMEOUT).json()
        assert mine == {"ResultSet": {"Result": []}}
        assert alice.get(f"{xnat.url}/data/prearchive/projects/Unassigned", timeout=TIMEOUT).status_code == 403
        everything = admin.get(f"{xnat.url}/data/prearchive", params={"format": "json"}, timeout=TIMEOUT).json()
        assert [r["project"] for r in everything["ResultSet"]["Result"]] == ["Unassigned", "Unassigned"]
        refused = archive(xnat, admin, unknown.text.strip())
        assert (refused.status_code, h3(refused)) == (400, "Cannot archive sessions from the Unassigned folder.")


def test_dicom_routing_from_comments_and_patient_fields(xnat: FakeXnat) -> None:
    with client("alice") as alice:
        assigned = study(PatientComments="Project: PROJ_ALIAS Subject:subj7; Session:sess7 AA:false")
        response = upload(xnat, alice, zipped(assigned))
        assert re.fullmatch(r"/data/prearchive/projects/PROJ/\d{8}_\d{9}/sess7\r\n", response.text)
        derived = study(PatientName="DOE^JOHN", PatientID="MR 42", StudyDescription="PROJ")
        upload(xnat, alice, zipped(derived))
        unnamed = study(PatientID="", AccessionNumber="PROJ")
        upload(xnat, alice, zipped(unnamed))
    rows = {row["name"]: row for row in xnat.prearchive_rows("PROJ")}
    assert rows["sess7"]["subject"] == "subj7"
    assert rows["sess7"]["autoarchive"] == "Manual"
    assert rows["MR_42"]["subject"] == "DOE_JOHN"
    assert rows["dicom_upload"]["subject"] == "Synthetic_Test"


def test_upload_format_and_handler_errors(xnat: FakeXnat) -> None:
    with client("alice") as alice:
        octet = upload(xnat, alice, zipped(study()), {"Content-Type": "application/octet-stream"}, PROJECT_ID="PROJ")
        assert (octet.status_code, h3(octet)) == (400, "Unsupported format UNKNOWN")
        bogus = upload(xnat, alice, zipped(study()), None, **{"import-handler": "bogus"})
        assert (bogus.status_code, h3(bogus)) == (404, "Unknown importer implementation specified: bogus")
        windows = upload(xnat, alice, zipped(study()), {"Content-Type": "application/x-zip-compressed"}, **{
            "import-handler": "DICOM-zip"
        })  # fmt: skip
        assert (windows.status_code, h3(windows)) == (400, "Unable to identify upload format.")
        assert alice.get(f"{xnat.url}/data/services/import", timeout=TIMEOUT).status_code == 405
        not_a_zip = upload(xnat, alice, b"plain text, not a zip")
        assert (not_a_zip.status_code, not_a_zip.text) == (200, "")
        multipart = alice.post(
            f"{xnat.url}/data/services/import",
            files={"file": ("study.zip", zipped(study()), "application/zip")},
            data={"PROJECT_ID": "PROJ", "EXPT_LABEL": "MULTI"},
            timeout=TIMEOUT,
        )
        assert multipart.status_code == 200
        assert re.fullmatch(r"/data/prearchive/projects/PROJ/\d{8}_\d{9}/MULTI\r\n", multipart.text)
        txt = labelled(xnat, alice, zipped(study()), format="txt", EXPT_LABEL="TXT")
        assert txt.headers["Content-Type"].startswith("text/plain")
        assert not txt.text.endswith("\r\n")


def test_a_bad_entry_aborts_the_import_after_earlier_entries_were_stored(xnat: FakeXnat) -> None:
    datasets = study(series=1, per_series=3)
    junk = [("dicom/README.txt", b"not dicom at all")]
    with client("alice") as alice:
        failed = labelled(xnat, alice, zipped(datasets, junk, at=2))
        assert (failed.status_code, h3(failed)) == (400, "unable to read DICOM object README.txt")
        xnat.build_now()
        uri = "/data" + only_row(xnat)["url"]
        assert file_count(xnat, alice, uri) == 2

        skipped = labelled(xnat, alice, zipped(datasets, junk, at=2), **{"Ignore-Unparsable": "true"})
        assert skipped.status_code == 200
        assert skipped.text.strip() == uri  # merged into the same prearchive session
        xnat.build_now()
        assert file_count(xnat, alice, uri) == 3

        no_class = datasets[0].copy()
        del no_class.SOPClassUID
        missing = labelled(xnat, alice, zipped([no_class]))
        assert (missing.status_code, h3(missing)) == (400, "object IM0.dcm contains no SOP Class UID")
        nothing = labelled(xnat, alice, zipped([], junk), **{"Ignore-Unparsable": "true"})
        assert (nothing.status_code, h3(nothing)) == (400, "unable to read DICOM object README.txt")


def test_reimport_into_a_ready_row_reopens_it(make_xnat: Factory) -> None:
    xnat = make_xnat(version="1.8.9")
    datasets = study()
    with client("alice") as alice:
        first = labelled(xnat, alice, zipped(datasets), **{"import-handler": "DICOM-zip"})
        uri = first.text.strip()
        built = alice.post(f"{xnat.url}{uri}", params={"action": "build"}, timeout=TIMEOUT)
        assert (built.status_code, built.text) == (200, uri + "\r\n")
        assert only_row(xnat)["status"] == "READY"
        again = labelled(xnat, alice, zipped(datasets), **{"import-handler": "DICOM-zip"})
        assert again.text.strip() == uri
        assert only_row(xnat)["status"] == "RECEIVING"
        xnat.build_now()
        assert only_row(xnat)["status"] == "READY"
        assert file_count(xnat, alice, uri) == 4


def test_gradual_dicom_one_object_per_request(xnat: FakeXnat) -> None:
    datasets = study(series=1, per_series=2)
    with client("alice") as alice:
        uris = {
            upload(xnat, alice, encode(ds), {"Content-Type": "application/dicom"}, PROJECT_ID="PROJ").text
            for ds in datasets
        }
    assert len(uris) == 1
    row = only_row(xnat)
    assert (row["status"], row["name"]) == ("RECEIVING", "SYN0001")


# ---------------------------------------------------------------------------------------------------------------
# Archive (§6) and auto-archive (§5.3, §7)
# ---------------------------------------------------------------------------------------------------------------


def test_archive_conflict_on_identical_reimport_then_append(xnat: FakeXnat) -> None:
    datasets = study(series=2, per_series=2)
    dest = {"dest": "/prearchive/projects/PROJ"}
    with client("alice") as alice:
        uri = labelled(xnat, alice, zipped(datasets), **dest).text.strip()
        done = archive(xnat, alice, uri, **{"auto-archive": "false"})
        assert (done.status_code, done.text) == (
            200,
            "/data/archive/projects/PROJ/subjects/SUBJ01/experiments/SESS01\r\n",
        )
        assert done.headers["Content-Type"] == "text/uri-list"
        assert xnat.prearchive_rows() == []
        (experiment,) = xnat.experiments("PROJ")
        assert (experiment.subject, experiment.label, experiment.xsi_type) == ("SUBJ01", "SESS01", "xnat:mrSessionData")
        assert experiment.study_uid == datasets[0].StudyInstanceUID
        assert experiment.scans["1"].series_uid == datasets[0].SeriesInstanceUID
        assert set(experiment.scans["2"].files.values()) == {ds.SOPInstanceUID for ds in datasets[2:]}
        item = alice.get(
            f"{xnat.url}/data/projects/PROJ/subjects/SUBJ01/experiments/SESS01",
            params={"format": "json"},
            timeout=TIMEOUT,
        ).json()["items"][0]
        assert item["meta"] == {"xsi:type": "xnat:mrSessionData", "isHistory": False}
        assert item["data_fields"]["UID"] == datasets[0].StudyInstanceUID
        scan_items = item["children"][0]["items"]
        assert scan_items[0]["children"][0]["items"][0]["data_fields"]["file_count"] == 2
        listing = alice.get(f"{xnat.url}/data/projects/PROJ/experiments", params={"format": "json"}, timeout=TIMEOUT)
        assert listing.json()["ResultSet"]["Result"][0]["UID"] == datasets[0].StudyInstanceUID

        again = labelled(xnat, alice, zipped(datasets), **dest).text.strip()
        assert again != uri  # archived already: a new prearchive session
        conflict = archive(xnat, alice, again)
        assert conflict.status_code == 500
        assert (
            h3(conflict)
            == "FAILED: Unable to archive SESS01: Operation Failed: Session already exists with matching files."
        )
        assert only_row(xnat)["status"] == "CONFLICT"
        appended = archive(xnat, alice, again, overwrite="append")
        assert appended.status_code == 200
        assert xnat.prearchive_rows() == []
        assert archive(xnat, alice, again).status_code == 404


def test_archive_refuses_another_study_under_the_same_label(xnat: FakeXnat) -> None:
    with client("alice") as alice:
        first = labelled(xnat, alice, zipped(study()), dest="/prearchive/projects/PROJ").text.strip()
        assert archive(xnat, alice, first).status_code == 200
        second = labelled(xnat, alice, zipped(study()), dest="/prearchive/projects/PROJ").text.strip()
        failed = archive(xnat, alice, second)
        assert failed.status_code == 500
        assert h3(failed).endswith("Invalid modification of session UID via archive process.")
        assert only_row(xnat)["status"] == "CONFLICT"
        with client("carol") as carol:
            assert archive(xnat, carol, second).status_code == 403


def test_archiving_an_unbuilt_session_fails_with_error(xnat: FakeXnat) -> None:
    with client("alice") as alice:
        uri = labelled(xnat, alice, zipped(study())).text.strip()
        assert only_row(xnat)["status"] == "RECEIVING"
        failed = archive(xnat, alice, uri)
        assert failed.status_code == 500
        assert h3(failed).startswith("FAILED: Unable to archive SESS01: Operation Failed:")
        assert only_row(xnat)["status"] == "ERROR"


def test_import_with_archive_dest_archives_synchronously(xnat: FakeXnat) -> None:
    with client("alice") as alice:
        response = upload(
            xnat, alice, zipped(study()), dest="/archive/projects/PROJ/subjects/S9/experiments/E9", project="PROJ"
        )
        assert (response.status_code, response.text) == (
            200,
            "/data/archive/projects/PROJ/subjects/S9/experiments/E9\r\n",
        )
        assert xnat.prearchive_rows() == []
        assert [e.label for e in xnat.experiments()] == ["E9"]


def test_project_code_4_makes_the_idle_builder_auto_archive(make_xnat: Factory) -> None:
    xnat = make_xnat(version="1.8.9", idle_build_seconds=0.2, rebuild_repeat_seconds=0.1)
    with client("alice") as alice:
        assert alice.put(f"{xnat.url}/data/projects/PROJ/prearchive_code/4", timeout=TIMEOUT).status_code == 200
        assert alice.get(f"{xnat.url}/data/projects/PROJ/prearchive_code", timeout=TIMEOUT).text == "4"
        response = labelled(xnat, alice, zipped(study()), **{"import-handler": "DICOM-zip"})
        assert response.status_code == 200
        assert only_row(xnat)["autoarchive"] == "AutoArchive"
        wait_for(lambda: xnat.prearchive_rows() == [])
    assert [(e.subject, e.label) for e in xnat.experiments("PROJ")] == [("SUBJ01", "SESS01")]


def test_archive_answers_303_for_auto_archive_sessions(xnat: FakeXnat) -> None:
    with client("alice") as alice:
        flagged = study(PatientComments="AA:true")
        uri = labelled(xnat, alice, zipped(flagged), dest="/prearchive/projects/PROJ").text.strip()
        assert only_row(xnat)["status"] == "READY"  # the 1.8.10 commit path never auto-archives
        redirected = archive(xnat, alice, uri, **{"auto-archive": "false"})  # cannot cancel a row marked AutoArchive
        assert redirected.status_code == 303
        assert (
            redirected.headers["Location"]
            == f"{xnat.url}/data/archive/projects/PROJ/subjects/SUBJ01/experiments/SESS01"
        )
        assert redirected.text == ""

        # A row created while the project was Manual: only the project rule applies, and auto-archive=false cancels it.
        manual = labelled(xnat, alice, zipped(study()), EXPT_LABEL="E2", dest="/prearchive/projects/PROJ")
        later = labelled(xnat, alice, zipped(study()), EXPT_LABEL="E3", dest="/prearchive/projects/PROJ")
        assert alice.put(f"{xnat.url}/data/projects/PROJ/prearchive_code/4", timeout=TIMEOUT).status_code == 200
        assert archive(xnat, alice, manual.text.strip(), **{"auto-archive": "false"}).status_code == 200
        assert archive(xnat, alice, later.text.strip()).status_code == 303
        assert archive(xnat, alice, "/prearchive/projects/PROJ/1/2", redirect="true").status_code == 404


def test_archiving_a_locked_row_is_refused(make_xnat: Factory) -> None:
    xnat = make_xnat(operation_seconds=0.5)
    with client("alice") as alice:
        uri = labelled(xnat, alice, zipped(study()), dest="/prearchive/projects/PROJ").text.strip()
        results: list[int] = []

        def first_archive() -> None:
            with client("alice") as other:
                results.append(archive(xnat, other, uri).status_code)

        worker = threading.Thread(target=first_archive)
        worker.start()
        wait_for(lambda: xnat.prearchive_rows() != [] and only_row(xnat)["status"] == "_ARCHIVING")
        second = archive(xnat, alice, uri)
        assert (second.status_code, h3(second)) == (403, "Operation already in progress on this prearchive entry.")
        worker.join()
        assert results == [200]


# ---------------------------------------------------------------------------------------------------------------
# Prearchive listings and services (§5)
# ---------------------------------------------------------------------------------------------------------------


def test_prearchive_listing_permissions(xnat: FakeXnat) -> None:
    with client("alice") as alice:
        uri = labelled(xnat, alice, zipped(study())).text.strip()
    with client("bob") as bob:
        upload(xnat, bob, zipped(study()), PROJECT_ID="OTHER")
    with client("alice") as alice:
        rows = alice.get(f"{xnat.url}/data/prearchive/projects", params={"format": "json"}, timeout=TIMEOUT).json()
        assert [r["project"] for r in rows["ResultSet"]["Result"]] == ["PROJ"]
        csv_text = alice.get(f"{xnat.url}/data/prearchive/projects", params={"format": "csv"}, timeout=TIMEOUT).text
        assert csv_text.splitlines()[0].startswith("project,timestamp,lastmod,uploaded,")
        denied = alice.get(f"{xnat.url}/data/prearchive/projects/PROJ,OTHER", timeout=TIMEOUT)
        assert (denied.status_code, h3(denied)) == (
            403,
            "The current user does not have access to the requested project: OTHER",
        )
        assert alice.get(f"{xnat.url}/data/prearchive", params={"tag": "1.2.3"}, timeout=TIMEOUT).status_code == 403
    with client("carol") as carol:  # read-only collaborator: not in the edit-rights listing, but may ask for PROJ
        mine = carol.get(f"{xnat.url}/data/prearchive/projects", params={"format": "json"}, timeout=TIMEOUT).json()
        assert mine == {"ResultSet": {"Result": []}}
        proj = carol.get(f"{xnat.url}/data/prearchive/projects/PROJ", params={"format": "json"}, timeout=TIMEOUT)
        assert len(proj.json()["ResultSet"]["Result"]) == 1
        assert carol.get(f"{xnat.url}{uri}", params={"format": "json"}, timeout=TIMEOUT).status_code == 403
    with client("admin") as admin:
        both = admin.get(f"{xnat.url}/data/prearchive/projects/PROJ,OTHER", params={"format": "json"}, timeout=TIMEOUT)
        assert sorted(r["project"] for r in both.json()["ResultSet"]["Result"]) == ["OTHER", "PROJ"]


def test_batch_delete_and_session_delete(xnat: FakeXnat) -> None:
    with client("alice") as alice:
        first = labelled(xnat, alice, zipped(study())).text.strip()
        second = labelled(xnat, alice, zipped(study()), EXPT_LABEL="SESS02").text.strip()
        deleted = alice.post(
            f"{xnat.url}/data/services/prearchive/delete", data={"src": first, "async": "false"}, timeout=TIMEOUT
        )
        assert deleted.status_code == 200
        assert deleted.text.startswith('<?xml version="1.0"')
        assert "<cell>QUEUED_DELETING</cell>" in deleted.text
        assert [r["name"] for r in xnat.prearchive_rows()] == ["SESS02"]
        with client("bob") as bob:
            refused = bob.post(f"{xnat.url}/data/services/prearchive/delete", params={"src": second}, timeout=TIMEOUT)
            assert refused.status_code == 403
            assert h3(refused).startswith("Invalid permissions for user bob to delete prearchive sessions")
        assert alice.delete(f"{xnat.url}{second}", timeout=TIMEOUT).status_code == 200
        assert xnat.prearchive_rows() == []
        assert alice.delete(f"{xnat.url}{second}", timeout=TIMEOUT).status_code == 404


# ---------------------------------------------------------------------------------------------------------------
# Fault injection and bookkeeping
# ---------------------------------------------------------------------------------------------------------------


def test_fail_next_before_and_after_processing(xnat: FakeXnat) -> None:
    with client("alice") as alice:
        xnat.fail_next("POST", "/data/services/import", status=503, times=2)
        for _ in range(2):
            assert labelled(xnat, alice, zipped(study())).status_code == 503
        assert xnat.prearchive_rows() == []

        xnat.fail_next("POST", "/data/services/import", status=504, after_processing=True, body="Gateway Time-out")
        proxied = labelled(xnat, alice, zipped(study()))
        assert (proxied.status_code, h3(proxied)) == (504, "Gateway Time-out")
        assert only_row(xnat)["status"] == "RECEIVING"  # the work was done anyway

        xnat.fail_next("GET", "/data/prearchive", status=502, html=False, body="bad gateway")
        plain = alice.get(f"{xnat.url}/data/prearchive", timeout=TIMEOUT)
        assert (plain.status_code, plain.text) == (502, "bad gateway")
        assert alice.get(f"{xnat.url}/data/prearchive", timeout=TIMEOUT).status_code == 200

        xnat.fail_next("GET", "/data/auth", delay=0.5)
        with pytest.raises(requests.Timeout):
            alice.get(f"{xnat.url}/data/auth", timeout=0.1)

        xnat.html_error_with_200_next("POST", "/data/services/import")
        html_200 = labelled(xnat, alice, zipped(study()), EXPT_LABEL="HTML")
        assert html_200.status_code == 200
        assert html_200.text.startswith("<html>")
        assert [r["name"] for r in xnat.prearchive_rows()] == ["SESS01"]

    methods_and_statuses = [(method, status) for method, _, status in xnat.requests_log]
    assert methods_and_statuses[:4] == [("POST", 503), ("POST", 503), ("POST", 504), ("GET", 502)]
    assert any(path.startswith("/data/services/import?PROJECT_ID=PROJ") for _, path, _ in xnat.requests_log)


def test_command_line_runs_a_server_in_the_foreground() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "ingestd.testing.xnat", "--port", "0", "--user", "admin:admin", "--project", "P"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, line
        response = requests.get(
            f"{match.group(1)}/data/projects", params={"format": "json"}, auth=("admin", "admin"), timeout=TIMEOUT
        )
        assert [p["ID"] for p in response.json()["ResultSet"]["Result"]] == ["P"]
    finally:
        process.terminate()
        process.wait(timeout=TIMEOUT)
        if process.stderr is not None:
            process.stderr.close()
    assert process.returncode == 0
