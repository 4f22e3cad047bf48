"""The stand-in's import / prearchive / archive behaviour checked against xnat-web's source (1.8.9 `d3a896206`,
1.8.11-SNAPSHOT `4fb6bc14`): imports that go on after a proxy's 504, row locks, several resources per scan, admin
listings, label conflicts, anonymisation scripts, prearchive codes and auto-archive, and xnatpy over all of it."""

from __future__ import annotations

import threading
import time

import pytest
import requests
import xnat as xnatpy
from pydicom.dataset import Dataset

from tests.dicom import encode
from tests.fake_xnat.conftest import Factory
from tests.fake_xnat.helpers import TIMEOUT, ZIP, numbered_study, wait_for, zipped


def study(series: int = 2, per_series: int = 2, **attributes: str) -> list[Dataset]:
    return numbered_study(series, per_series, **{"StudyTime": "101112", **attributes})


def client(user: str) -> requests.Session:
    session = requests.Session()
    session.auth = (user, f"{user}-pw")
    return session


def imported(session: requests.Session, url: str, data: bytes, **params: str) -> str:
    answer = session.post(f"{url}/data/services/import", params=params, data=data, headers=ZIP, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    return answer.text.strip()


# -- 1. an import that goes on after the proxy's 504 -------------------------------------------------------------


def test_proxy_timeout_answers_504_while_the_import_goes_on(make_xnat: Factory) -> None:
    xnat = make_xnat(idle_build_seconds=0.3, rebuild_repeat_seconds=0.05, lastmod_refresh_seconds=0.2)
    datasets = study(series=2, per_series=4)
    xnat.proxy_timeout_next(after_seconds=0.2, import_seconds=1.2)
    with client("alice") as alice:
        answer = alice.post(
            f"{xnat.url}/data/services/import", params={"PROJECT_ID": "PROJ"}, data=zipped(datasets), headers=ZIP,
            timeout=TIMEOUT,
        )  # fmt: skip
    assert answer.status_code == 504 and "<center>nginx</center>" in answer.text
    wait_for(lambda: bool(xnat.prearchive_rows("PROJ")))
    (row,) = xnat.prearchive_rows("PROJ")
    assert row["status"] == "RECEIVING"
    stored = len(next(iter(xnat.prearchive_files("PROJ").values())))
    assert 0 < stored < len(datasets)  # stored progressively
    lastmods = set()
    while len(next(iter(xnat.prearchive_files("PROJ").values()))) < len(datasets):
        row = xnat.prearchive_rows("PROJ")[0]
        assert row["status"] == "RECEIVING"  # the idle builder (0.3 s) waits while the import writes
        lastmods.add(row["lastmod"])
        time.sleep(0.02)
    assert 2 <= len(lastmods) <= 8  # refreshed, but at most every 0.2 s
    wait_for(lambda: xnat.prearchive_rows("PROJ")[0]["status"] == "READY")  # built once the import ended
    assert ("POST", "/data/services/import?PROJECT_ID=PROJ", 504) in xnat.requests_log


def test_lastmod_is_refreshed_at_most_every_refresh_interval(make_xnat: Factory) -> None:
    xnat = make_xnat(lastmod_refresh_seconds=60.0)
    datasets = study(series=1, per_series=2)
    with client("alice") as alice:
        imported(alice, xnat.url, zipped(datasets[:1]), PROJECT_ID="PROJ")
        before = xnat.prearchive_rows("PROJ")[0]["lastmod"]
        time.sleep(0.05)
        imported(alice, xnat.url, zipped(datasets[1:]), PROJECT_ID="PROJ")
    assert xnat.prearchive_rows("PROJ")[0]["lastmod"] == before


def test_reimport_of_missing_entries_merges_into_the_same_row(make_xnat: Factory) -> None:
    xnat = make_xnat()
    datasets = study(series=1, per_series=4)
    with client("alice") as alice:
        first = imported(alice, xnat.url, zipped(datasets[:3]), PROJECT_ID="PROJ")
        again = imported(alice, xnat.url, zipped(datasets), PROJECT_ID="PROJ")  # the same names: overwritten
    assert first == again
    (files,) = xnat.prearchive_files("PROJ").values()
    assert sorted(files.values()) == sorted(ds.SOPInstanceUID for ds in datasets)
    assert len(files) == 4


def test_proxy_timeout_background_import_ends_with_stop(make_xnat: Factory) -> None:
    xnat = make_xnat()
    xnat.proxy_timeout_next(after_seconds=0.05, import_seconds=30.0)
    with client("alice") as alice:
        answer = alice.post(
            f"{xnat.url}/data/services/import", params={"PROJECT_ID": "PROJ"}, data=zipped(study(1, 3)),
            headers=ZIP, timeout=TIMEOUT,
        )  # fmt: skip
    assert answer.status_code == 504 and xnat.faults_pending() == 0
    started = time.monotonic()
    xnat.stop()
    assert time.monotonic() - started < 5


# -- 2. build on a locked row ----------------------------------------------------------------------------------


def test_build_and_commit_on_a_locked_row_answer_409(make_xnat: Factory) -> None:
    xnat = make_xnat()
    with client("alice") as alice:
        url = imported(alice, xnat.url, zipped(study(1, 2)), PROJECT_ID="PROJ")
        _, _, _, project, timestamp, folder = url.removeprefix("/data").split("/")[:6]
        xnat.hold_row_lock(project, timestamp, folder, 0.5)
        assert xnat.prearchive_rows("PROJ")[0]["status"] == "_BUILDING"
        for action in ("build", "commit"):
            answer = alice.post(f"{xnat.url}{url}", params={"action": action}, timeout=TIMEOUT)
            assert answer.status_code == 409 and "session document locked" in answer.text
        wait_for(lambda: xnat.prearchive_rows("PROJ")[0]["status"] == "RECEIVING")
        assert alice.post(f"{xnat.url}{url}", params={"action": "build"}, timeout=TIMEOUT).status_code == 200


def test_build_during_an_import_is_not_locked(make_xnat: Factory) -> None:
    xnat = make_xnat()
    xnat.proxy_timeout_next(after_seconds=0.1, import_seconds=1.0)
    with client("alice") as alice:
        alice.post(
            f"{xnat.url}/data/services/import", params={"PROJECT_ID": "PROJ"}, data=zipped(study(1, 4)), headers=ZIP,
            timeout=TIMEOUT,
        )  # fmt: skip
        wait_for(lambda: bool(xnat.prearchive_rows("PROJ")))
        url = "/data" + xnat.prearchive_rows("PROJ")[0]["url"]
        assert alice.post(f"{xnat.url}{url}", params={"action": "build"}, timeout=TIMEOUT).status_code == 200
    wait_for(lambda: len(next(iter(xnat.prearchive_files("PROJ").values()))) == 4)


def test_build_while_building_answers_409(make_xnat: Factory) -> None:
    xnat = make_xnat(operation_seconds=0.5)
    with client("alice") as alice:
        url = imported(alice, xnat.url, zipped(study(1, 2)), PROJECT_ID="PROJ")
        results: list[int] = []
        first = threading.Thread(
            target=lambda: results.append(
                alice.post(f"{xnat.url}{url}", params={"action": "build"}, timeout=TIMEOUT).status_code
            )
        )
        first.start()
        wait_for(lambda: xnat.prearchive_rows("PROJ")[0]["status"] == "BUILDING")
        with client("alice") as other:
            assert other.post(f"{xnat.url}{url}", params={"action": "build"}, timeout=TIMEOUT).status_code == 409
        first.join()
    assert results == [200]


# -- 3. several resources per scan -----------------------------------------------------------------------------


def test_extra_scan_resources_are_listed_everywhere(make_xnat: Factory) -> None:
    xnat = make_xnat(extra_scan_resources=("NIFTI", "SNAPSHOTS"))
    with client("alice") as alice:
        imported(alice, xnat.url, zipped(study(1, 3)), PROJECT_ID="PROJ", SUBJECT_ID="S1", EXPT_LABEL="E1")
        xnat.build_now()
        url = "/data" + xnat.prearchive_rows("PROJ")[0]["url"]
        assert alice.post(f"{xnat.url}/data/services/archive", params={"src": url}, timeout=TIMEOUT).ok
        exp = f"{xnat.url}/data/projects/PROJ/subjects/S1/experiments/E1"
        item = alice.get(exp, params={"format": "json"}, timeout=TIMEOUT).json()["items"][0]
        (scans,) = [c for c in item["children"] if c["field"] == "scans/scan"]
        (files,) = [c for c in scans["items"][0]["children"] if c["field"] == "file"]
        fields = {i["data_fields"]["label"]: i["data_fields"] for i in files["items"]}
        assert set(fields) == {"DICOM", "NIFTI", "SNAPSHOTS"}
        assert fields["DICOM"]["file_count"] == 3 and fields["NIFTI"]["format"] == "NIFTI"
        assert sum(f["file_count"] for f in fields.values()) > 3  # a client summing all resources is fooled
        listing = alice.get(f"{exp}/scans/1/resources", params={"format": "json"}, timeout=TIMEOUT).json()
        assert {r["label"] for r in listing["ResultSet"]["Result"]} == {"DICOM", "NIFTI", "SNAPSHOTS"}
        catalog = alice.get(f"{exp}/scans/1/resources/NIFTI", timeout=TIMEOUT)
        assert catalog.ok and "<cat:Catalog" in catalog.text and "UID=" not in catalog.text.split("<cat:entries>")[1]
        nifti = alice.get(f"{exp}/scans/1/resources/NIFTI/files", params={"format": "json"}, timeout=TIMEOUT).json()
        names = [r["Name"] for r in nifti["ResultSet"]["Result"]]
        assert len(names) == 2 and alice.get(f"{exp}/scans/1/resources/NIFTI/files/{names[0]}", timeout=TIMEOUT).ok
        assert 'label="SNAPSHOTS"' in alice.get(exp, params={"format": "xml"}, timeout=TIMEOUT).text
    assert len(xnat.archived_files("PROJ", "E1")) == 3  # DICOM only


# -- 4. admins see Unassigned rows in a project listing ----------------------------------------------------------


def test_admin_project_listing_includes_unassigned_rows(make_xnat: Factory) -> None:
    xnat = make_xnat()
    with client("admin") as admin:
        imported(admin, xnat.url, zipped(study(1, 1)), PROJECT_ID="PROJ")
        imported(admin, xnat.url, zipped(study(1, 1)), PROJECT_ID="OTHER")
        imported(admin, xnat.url, zipped(study(1, 1)))  # no project: Unassigned
        rows = admin.get(f"{xnat.url}/data/prearchive/projects/PROJ", params={"format": "json"}, timeout=TIMEOUT)
    assert sorted(r["project"] for r in rows.json()["ResultSet"]["Result"]) == ["PROJ", "Unassigned"]
    with client("alice") as alice:
        rows = alice.get(f"{xnat.url}/data/prearchive/projects/PROJ", params={"format": "json"}, timeout=TIMEOUT)
    assert [r["project"] for r in rows.json()["ResultSet"]["Result"]] == ["PROJ"]


# -- 5. labels across the project ---------------------------------------------------------------------------------


def test_label_used_by_another_subject_fails_only_at_archive(make_xnat: Factory) -> None:
    xnat = make_xnat()
    first, second = study(1, 1), study(1, 1)
    with client("alice") as alice:
        imported(alice, xnat.url, zipped(first), PROJECT_ID="PROJ", SUBJECT_ID="S1", EXPT_LABEL="SAME")
        xnat.build_now()
        url = "/data" + xnat.prearchive_rows("PROJ")[0]["url"]
        assert alice.post(f"{xnat.url}/data/services/archive", params={"src": url}, timeout=TIMEOUT).ok
        (record,) = xnat.experiments("PROJ")
        for name in ("SAME", record.id):
            found = alice.get(f"{xnat.url}/data/projects/PROJ/experiments/{name}", params={"format": "json"},
                              timeout=TIMEOUT)  # fmt: skip
            assert found.ok and found.json()["items"][0]["data_fields"]["ID"] == record.id
        url = imported(alice, xnat.url, zipped(second), PROJECT_ID="PROJ", SUBJECT_ID="S2", EXPT_LABEL="SAME")
        xnat.build_now()
        assert xnat.prearchive_rows("PROJ")[0]["status"] == "READY"  # import and build are fine
        answer = alice.post(f"{xnat.url}/data/services/archive", params={"src": url}, timeout=TIMEOUT)
    assert answer.status_code == 500
    assert "Invalid modification of session subject via archive process.: SAME Already Exists for another Subject" in (
        answer.text
    )
    assert xnat.prearchive_rows("PROJ")[0]["status"] == "CONFLICT"


# -- 6. permanent failures ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.8.9", "1.8.10"])
def test_import_into_an_unknown_project_lands_in_unassigned(make_xnat: Factory, version: str) -> None:
    xnat = make_xnat(version=version)
    with client("admin") as admin:
        answer = admin.post(
            f"{xnat.url}/data/services/import", params={"PROJECT_ID": "NOPE", "import-handler": "DICOM-zip"},
            data=zipped(study(1, 1)), headers=ZIP, timeout=TIMEOUT,
        )  # fmt: skip
    assert answer.status_code == 200 and "/prearchive/projects/Unassigned/" in answer.text


def test_failing_site_anon_script_answers_400_and_removes_the_new_row(make_xnat: Factory) -> None:
    xnat = make_xnat()
    xnat.set_anon_script('(0010,0010) := "x"', fails=True)
    data = zipped([], [("a/IM0.dcm", encode(study(1, 1)[0]))])
    with client("alice") as alice:
        answer = alice.post(
            f"{xnat.url}/data/services/import", params={"PROJECT_ID": "PROJ"}, data=data,
            headers=ZIP, timeout=TIMEOUT,
        )  # fmt: skip
        assert answer.status_code == 400 and "unable to read DICOM object IM0.dcm" in answer.text
        assert xnat.prearchive_rows("PROJ") == []
        assert alice.get(f"{xnat.url}/xapi/anonymize/site/enabled", timeout=TIMEOUT).json() is True
        assert alice.get(f"{xnat.url}/xapi/anonymize/site", timeout=TIMEOUT).text.startswith("(0010,0010)")
        config = alice.get(f"{xnat.url}/data/config/anon/script", params={"format": "json"}, timeout=TIMEOUT)
        assert config.json()["ResultSet"]["Result"][0]["status"] == "enabled"
        # prevent_anon skips the site script
        imported(alice, xnat.url, zipped(study(1, 1)), PROJECT_ID="PROJ", prevent_anon="true")
    xnat.set_anon_script("x", enabled=False, fails=True)
    with client("alice") as alice:
        imported(alice, xnat.url, zipped(study(1, 1)), PROJECT_ID="PROJ")
        assert alice.get(f"{xnat.url}/xapi/anonymize/site/enabled", timeout=TIMEOUT).json() is False


def test_failing_project_anon_script_fails_the_archive(make_xnat: Factory) -> None:
    xnat = make_xnat()
    with client("alice") as alice:
        assert alice.get(f"{xnat.url}/xapi/anonymize/projects/PROJ", timeout=TIMEOUT).status_code == 204
        xnat.set_anon_script("- (0008,0080)", project="PROJ", fails=True)
        assert alice.get(f"{xnat.url}/xapi/anonymize/projects/PROJ/enabled", timeout=TIMEOUT).json() is True
        config = alice.get(f"{xnat.url}/data/projects/PROJ/config/anon/projects/PROJ", params={"format": "json"},
                           timeout=TIMEOUT)  # fmt: skip
        assert config.json()["ResultSet"]["Result"][0]["contents"] == "- (0008,0080)"
        url = imported(alice, xnat.url, zipped(study(1, 1)), PROJECT_ID="PROJ")
        xnat.build_now()
        answer = alice.post(f"{xnat.url}/data/services/archive", params={"src": url}, timeout=TIMEOUT)
    assert answer.status_code == 500 and xnat.prearchive_rows("PROJ")[0]["status"] == "ERROR"


# -- 7. prearchive code and auto-archive --------------------------------------------------------------------------


def test_prearchive_code_and_auto_archive(make_xnat: Factory) -> None:
    xnat = make_xnat()
    xnat.add_project("AUTO", owners=["alice"], prearchive_code=4)
    with client("alice") as alice:
        code = alice.get(f"{xnat.url}/data/projects/AUTO/prearchive_code", timeout=TIMEOUT)
        assert (code.text, code.headers["Content-Type"].split(";")[0]) == ("4", "text/plain")
        imported(alice, xnat.url, zipped(study(1, 1)), PROJECT_ID="AUTO", SUBJECT_ID="S1", EXPT_LABEL="E1")
        xnat.build_now()  # the idle build auto-archives
        assert xnat.prearchive_rows("AUTO") == [] and [e.label for e in xnat.experiments("AUTO")] == ["E1"]
        url = imported(alice, xnat.url, zipped(study(1, 1)), PROJECT_ID="AUTO", SUBJECT_ID="S1", EXPT_LABEL="E2")
        answer = alice.post(f"{xnat.url}{url}", params={"action": "commit"}, allow_redirects=False, timeout=TIMEOUT)
        assert answer.status_code == 301 and answer.text.endswith("/experiments/E2")
        # ≥1.8.10 DICOM-zip action=commit builds synchronously and archives only with AA/auto-archive, not the code
        answer = alice.post(
            f"{xnat.url}/data/services/import",
            params={"PROJECT_ID": "AUTO", "SUBJECT_ID": "S1", "EXPT_LABEL": "E3", "action": "commit",
                    "import-handler": "DICOM-zip"},
            data=zipped(study(1, 1)), headers=ZIP, timeout=TIMEOUT,
        )  # fmt: skip
    assert answer.status_code == 200 and "/prearchive/" in answer.text
    assert [r["status"] for r in xnat.prearchive_rows("AUTO")] == ["READY"]


# -- 8. xnatpy ------------------------------------------------------------------------------------------------------


def test_xnatpy_walks_scans_and_resources(make_xnat: Factory) -> None:
    server = make_xnat(extra_scan_resources=("NIFTI",))
    with client("alice") as alice:
        url = imported(alice, server.url, zipped(study(2, 2)), PROJECT_ID="PROJ", SUBJECT_ID="S1", EXPT_LABEL="E1")
        server.build_now()
        assert alice.post(f"{server.url}/data/services/archive", params={"src": url}, timeout=TIMEOUT).ok
    with xnatpy.connect(server.url, user="alice", password="alice-pw", loglevel="ERROR") as session:
        project = session.projects["PROJ"]
        assert [e.label for e in project.experiments.values()] == ["E1"]
        experiment = project.subjects["S1"].experiments["E1"]
        assert sorted(experiment.scans.keys()) == ["1", "2"]
        scan = experiment.scans["1"]
        assert sorted(resource.label for resource in scan.resources.values()) == ["DICOM", "NIFTI"]
        assert len(scan.resources["DICOM"].files) == 2 and len(scan.resources["NIFTI"].files) == 2
