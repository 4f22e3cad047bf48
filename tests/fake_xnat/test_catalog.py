"""What a verifying client reads: archived scan catalogs with SOP Instance UIDs, scan resource listings, the
experiment's resources, and the prearchive's scans/resources/files of a built session."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from xml.etree import ElementTree

import requests
from pydicom.dataset import Dataset

from ingestd.testing.xnat import FakeXnat
from tests.dicom import encode
from tests.fake_xnat.conftest import Factory
from tests.fake_xnat.helpers import TIMEOUT, h3, import_zip, numbered_study, zipped

CAT = "{http://nrg.wustl.edu/catalog}"
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"


def study(series: int = 2, per_series: int = 2) -> list[Dataset]:
    datasets = numbered_study(series, per_series)
    for ds in datasets:
        ds.SeriesDescription = f"series {ds.SeriesNumber}"
    return datasets


def archived(xnat: FakeXnat, session: requests.Session, datasets: Sequence[Dataset]) -> str:
    """Import, build and archive the datasets as PROJ/SUBJ01/SESS01; the experiment's accession ID."""
    uri = import_zip(xnat, session, zipped(datasets), dest="/prearchive/projects/PROJ").text.strip()
    done = session.post(f"{xnat.url}/data/services/archive", params={"src": uri}, timeout=TIMEOUT)
    assert done.status_code == 200, done.text
    (experiment,) = xnat.experiments("PROJ")
    return experiment.id


def catalog_entries(response: requests.Response) -> list[dict[str, str]]:
    root = ElementTree.fromstring(response.content)  # noqa: S314 - the stand-in's own answer, on 127.0.0.1
    assert root.tag == f"{CAT}DCMCatalog"
    (entries,) = root.findall(f"{CAT}entries")
    return [dict(entry.attrib) for entry in entries.findall(f"{CAT}entry")]


# ---------------------------------------------------------------------------------------------------------------
# Archived scan catalogs (CatalogResource)
# ---------------------------------------------------------------------------------------------------------------


def test_a_scan_catalog_lists_every_file_with_its_sop_instance_uid(xnat: FakeXnat, alice: requests.Session) -> None:
    datasets = study()
    experiment_id = archived(xnat, alice, datasets)
    (experiment,) = xnat.experiments("PROJ")
    resource_id = alice.get(
        f"{xnat.url}/data/projects/PROJ/subjects/SUBJ01/experiments/SESS01/scans/1/resources",
        params={"format": "json"},
        timeout=TIMEOUT,
    ).json()["ResultSet"]["Result"][0]["xnat_abstractresource_id"]
    forms = [
        "/data/projects/PROJ/subjects/SUBJ01/experiments/SESS01/scans/1/resources/DICOM",
        "/data/archive/projects/PROJ/subjects/SUBJ01/experiments/SESS01/scans/1/resources/DICOM",
        f"/data/projects/PROJ/subjects/SUBJ01/experiments/{experiment_id}/scans/1/resources/DICOM",
        f"/data/experiments/{experiment_id}/scans/1/resources/DICOM",
        f"/data/archive/experiments/{experiment_id}/scans/1/resources/DICOM",
        f"/REST/experiments/{experiment_id}/scans/1/resources/{resource_id}",
    ]
    expected = {ds.SOPInstanceUID: ds for ds in datasets[:2]}
    for form in forms:
        response = alice.get(f"{xnat.url}{form}", params={"format": "json"}, timeout=TIMEOUT)  # XML regardless
        assert response.status_code == 200, (form, response.text)
        assert response.headers["Content-Type"].startswith("text/xml")
        assert response.text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<cat:DCMCatalog ')
        assert 'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"' in response.text
        entries = catalog_entries(response)
        assert {entry["UID"] for entry in entries} == set(expected)
        for entry in entries:
            ds = expected[entry["UID"]]
            assert entry[XSI_TYPE] == "cat:dcmEntry"
            assert entry["URI"] == entry["ID"]
            assert (entry["format"], entry["instanceNumber"]) == ("DICOM", str(ds.InstanceNumber))
        assert {entry["URI"] for entry in entries} == set(experiment.scans["1"].files)
    files = alice.get(f"{xnat.url}{forms[0]}/files", params={"format": "json"}, timeout=TIMEOUT).json()["ResultSet"][
        "Result"
    ]
    assert {f["Name"] for f in files} == {entry["URI"] for entry in catalog_entries(alice.get(f"{xnat.url}{forms[0]}"))}


def test_unknown_catalogs_are_404(xnat: FakeXnat, alice: requests.Session) -> None:
    experiment_id = archived(xnat, alice, study())
    base = "/data/projects/PROJ/subjects/SUBJ01/experiments"
    for path in (
        f"{base}/SESS01/scans/9/resources/DICOM",
        f"{base}/SESS01/scans/1/resources/NIFTI",
        f"{base}/NOPE/scans/1/resources/DICOM",
        "/data/experiments/XNAT_E99999/scans/1/resources/DICOM",
    ):
        missing = alice.get(f"{xnat.url}{path}", timeout=TIMEOUT)
        assert (missing.status_code, h3(missing)) == (404, "Unable to find the specified catalog."), path
        assert missing.text.startswith("<html>")
    earlier = {
        "/data/projects/NOPE/subjects/S/experiments/E/scans/1/resources/DICOM": "Unable to identify project",
        "/data/projects/PROJ/subjects/NOPE/experiments/SESS01/scans/1/resources/DICOM": "Unable to identify subject",
    }  # XNATTemplate's constructor fails on these before the catalog is looked for
    for path, message in earlier.items():
        refused = alice.get(f"{xnat.url}{path}", timeout=TIMEOUT)
        assert (refused.status_code, h3(refused)) == (404, message)
    with requests.Session() as bob:
        bob.auth = ("bob", "bob-pw")
        hidden = bob.get(f"{xnat.url}/data/experiments/{experiment_id}/scans/1/resources/DICOM", timeout=TIMEOUT)
        assert (hidden.status_code, h3(hidden)) == (404, "Unable to find the specified catalog.")


def test_scan_resources_have_the_catalog_resource_list_columns(xnat: FakeXnat, alice: requests.Session) -> None:
    datasets = study(series=1, per_series=3)
    experiment_id = archived(xnat, alice, datasets)
    path = f"{xnat.url}/data/experiments/{experiment_id}/scans/1/resources"
    listing = alice.get(path, params={"format": "json"}, timeout=TIMEOUT)
    payload = listing.json()
    assert payload["ResultSet"]["title"] == "Resources" and payload["ResultSet"]["totalRecords"] == "1"
    (row,) = payload["ResultSet"]["Result"]
    size = sum(len(encode(ds)) for ds in datasets)
    assert row == {
        "xnat_abstractresource_id": row["xnat_abstractresource_id"],
        "label": "DICOM",
        "element_name": "xnat:resourceCatalog",
        "category": "scans",
        "cat_id": "1",
        "cat_desc": "series 1",
        "file_count": "3",
        "file_size": str(size),
        "tags": "",
        "content": "RAW",
        "format": "DICOM",
    }
    assert row["xnat_abstractresource_id"].isdigit()
    header = next(csv.reader(io.StringIO(alice.get(path, params={"format": "csv"}, timeout=TIMEOUT).text)))
    assert header == list(row)


def test_the_experiment_item_carries_each_scans_dicom_resource(xnat: FakeXnat, alice: requests.Session) -> None:
    datasets = study(series=2, per_series=2)
    experiment_id = archived(xnat, alice, datasets)
    for path in (
        "/data/projects/PROJ/subjects/SUBJ01/experiments/SESS01",
        f"/data/experiments/{experiment_id}",
        f"/data/archive/experiments/{experiment_id}",
    ):
        item = alice.get(f"{xnat.url}{path}", params={"format": "json"}, timeout=TIMEOUT).json()["items"][0]
        (scans,) = [child for child in item["children"] if child["field"] == "scans/scan"]
        for scan in scans["items"]:
            (files,) = [child for child in scan["children"] if child["field"] == "file"]
            (resource,) = files["items"]
            fields = resource["data_fields"]
            assert resource["meta"]["xsi:type"] == "xnat:resourceCatalog"
            assert (fields["label"], fields["format"], fields["content"], fields["file_count"]) == (
                "DICOM",
                "DICOM",
                "RAW",
                2,
            )


# ---------------------------------------------------------------------------------------------------------------
# The prearchive listings of a built session (PrearcScansListResource, PrearcScanResourceList,
# PrearcSessionResourceFiles)
# ---------------------------------------------------------------------------------------------------------------


def listings(xnat: FakeXnat, session: requests.Session, uri: str) -> dict[str, requests.Response]:
    base = f"{xnat.url}{uri}"
    return {
        "scans": session.get(f"{base}/scans", params={"format": "json"}, timeout=TIMEOUT),
        "resources": session.get(f"{base}/scans/1/resources", params={"format": "json"}, timeout=TIMEOUT),
        "files": session.get(f"{base}/scans/1/resources/DICOM/files", params={"format": "json"}, timeout=TIMEOUT),
    }


def test_prearchive_listings_404_before_the_build_then_answer(make_xnat: Factory, alice: requests.Session) -> None:
    xnat = make_xnat(version="1.8.9")
    datasets = study(series=2, per_series=2)
    uri = import_zip(xnat, alice, zipped(datasets), **{"import-handler": "DICOM-zip"}).text.strip()
    for response in listings(xnat, alice, uri).values():
        assert (response.status_code, h3(response)) == (404, "Unable to locate prearc resource.")

    assert alice.post(f"{xnat.url}{uri}", params={"action": "build"}, timeout=TIMEOUT).status_code == 200
    found = listings(xnat, alice, uri)
    assert found["scans"].json()["ResultSet"]["Result"] == [
        {"ID": "1", "xsiType": "xnat:mrScanData", "series_description": "series 1"},
        {"ID": "2", "xsiType": "xnat:mrScanData", "series_description": "series 2"},
    ]
    sizes = {f"IM{i}.dcm": len(encode(ds)) for i, ds in enumerate(datasets)}
    assert found["resources"].json()["ResultSet"]["Result"] == [
        {"label": "DICOM", "file_count": "2", "file_size": str(sizes["IM0.dcm"] + sizes["IM1.dcm"])}
    ]
    files = found["files"].json()["ResultSet"]["Result"]
    assert [sorted(f) for f in files] == [["Name", "Size", "URI"]] * 2
    assert sorted((f["Name"], f["Size"], f["URI"]) for f in files) == [
        (name, str(sizes[name]), f"{uri}/scans/1/resources/DICOM/files/{name}") for name in ("IM0.dcm", "IM1.dcm")
    ]
    # URI = the path as requested + "/" + the entry's URI, so the /REST alias shows in it.
    rest = alice.get(f"{xnat.url}/REST{uri.removeprefix('/data')}/scans/1/resources/DICOM/files", timeout=TIMEOUT)
    assert all(f["URI"].startswith("/REST/prearchive/") for f in rest.json()["ResultSet"]["Result"])
    download = alice.get(f"{xnat.url}{files[0]['URI']}", timeout=TIMEOUT)
    assert download.content == encode(datasets[int(files[0]["Name"][2])])

    for path in ("/scans/9/resources", "/scans/9/resources/DICOM/files", "/scans/1/resources/NIFTI/files"):
        missing = alice.get(f"{xnat.url}{uri}{path}", params={"format": "json"}, timeout=TIMEOUT)
        assert (missing.status_code, h3(missing)) == (404, "The server has not found anything matching the request URI")


def test_a_row_merged_into_after_its_build_keeps_its_earlier_files(xnat: FakeXnat, alice: requests.Session) -> None:
    """A later import into the same study and label reuses the row and sets it back to RECEIVING. Its session XML
    and catalogs are those of the earlier build, so the listings keep answering with the earlier files until the
    next build adds the new ones (and the new files are not archived before that build either)."""
    datasets = study(series=2, per_series=2)
    uri = import_zip(xnat, alice, zipped(datasets[:2]), dest="/prearchive/projects/PROJ").text.strip()
    assert xnat.prearchive_rows("PROJ")[0]["status"] == "READY"
    again = import_zip(xnat, alice, zipped(datasets[2:], first=2))  # no dest: stored only, no build
    assert again.text.strip() == uri
    assert xnat.prearchive_rows("PROJ")[0]["status"] == "RECEIVING"

    found = listings(xnat, alice, uri)
    assert [s["ID"] for s in found["scans"].json()["ResultSet"]["Result"]] == ["1"]
    assert sorted(f["Name"] for f in found["files"].json()["ResultSet"]["Result"]) == ["IM0.dcm", "IM1.dcm"]

    xnat.build_now()
    found = listings(xnat, alice, uri)
    assert [s["ID"] for s in found["scans"].json()["ResultSet"]["Result"]] == ["1", "2"]
    files_2 = alice.get(f"{xnat.url}{uri}/scans/2/resources/DICOM/files", params={"format": "json"}, timeout=TIMEOUT)
    assert sorted(f["Name"] for f in files_2.json()["ResultSet"]["Result"]) == ["IM2.dcm", "IM3.dcm"]


def test_archiving_a_row_reopened_since_its_build_archives_what_was_built(
    xnat: FakeXnat, alice: requests.Session
) -> None:
    datasets = study(series=2, per_series=1)
    uri = import_zip(xnat, alice, zipped(datasets[:1]), dest="/prearchive/projects/PROJ").text.strip()
    import_zip(xnat, alice, zipped(datasets[1:], first=1))
    assert xnat.prearchive_rows("PROJ")[0]["status"] == "RECEIVING"
    assert alice.post(f"{xnat.url}/data/services/archive", params={"src": uri}, timeout=TIMEOUT).status_code == 200
    (experiment,) = xnat.experiments("PROJ")
    assert {scan: sorted(record.files.values()) for scan, record in experiment.scans.items()} == {
        "1": [datasets[0].SOPInstanceUID]
    }
