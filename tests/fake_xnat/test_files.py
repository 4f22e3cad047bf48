"""File names as XNAT gives them, the archive's catalog merge by SOP Instance UID, and files XNAT drops silently."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence

import pytest
import requests
from pydicom.dataset import Dataset

from ingestd.testing.xnat import FakeXnat
from tests.dicom import encode
from tests.fake_xnat.conftest import Factory
from tests.fake_xnat.helpers import TIMEOUT, h3, import_zip, numbered_study


def study(series: int = 1, per_series: int = 3, **attributes: str) -> list[Dataset]:
    return numbered_study(series, per_series, **attributes)


def zipped(entries: Sequence[tuple[str, Dataset]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, ds in entries:
            archive.writestr(name, encode(ds))
    return buffer.getvalue()


def named(datasets: Sequence[Dataset], pattern: str = "dicom/IM{}.dcm") -> list[tuple[str, Dataset]]:
    return [(pattern.format(index), ds) for index, ds in enumerate(datasets)]


def prearchive_files(xnat: FakeXnat, session: requests.Session, label: str = "SESS01") -> dict[str, dict[str, int]]:
    """Build the row of `label` and map scan -> file name -> size from the prearchive listings."""
    (row,) = [r for r in xnat.prearchive_rows("PROJ") if r["name"] == label]
    xnat.build_now()
    uri = f"{xnat.url}/data{row['url']}"
    found: dict[str, dict[str, int]] = {}
    for scan in session.get(f"{uri}/scans", params={"format": "json"}, timeout=TIMEOUT).json()["ResultSet"]["Result"]:
        files = session.get(
            f"{uri}/scans/{scan['ID']}/resources/DICOM/files", params={"format": "json"}, timeout=TIMEOUT
        ).json()["ResultSet"]["Result"]
        found[scan["ID"]] = {f["Name"]: int(f["Size"]) for f in files}
    return found


def java_hash(text: str) -> int:
    value = 0
    for char in text:
        value = (31 * value + ord(char)) & 0xFFFFFFFF
    return value


def template_name(ds: Dataset) -> str:
    """TemplatizedDicomFileNamer with XNAT's default template, computed independently: List.hashCode in base 36."""
    digest = (31 * (31 + java_hash(ds.SOPClassUID)) + java_hash(ds.SOPInstanceUID)) & 0xFFFFFFFF
    digits = ""
    while True:
        digest, rest = divmod(digest, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[rest] + digits
        if not digest:
            break
    return f"{ds.StudyInstanceUID}-{ds.SeriesNumber}-{ds.InstanceNumber}-{digits}.dcm"


def archive(xnat: FakeXnat, session: requests.Session, src: str, **params: str) -> requests.Response:
    return session.post(
        f"{xnat.url}/data/services/archive", params={"src": src, **params}, allow_redirects=False, timeout=TIMEOUT
    )


# ---------------------------------------------------------------------------------------------------------------
# File names (GradualDicomImporter.getSafeFile)
# ---------------------------------------------------------------------------------------------------------------


def test_entry_names_become_file_names_as_xnat_makes_them(xnat: FakeXnat, alice: requests.Session) -> None:
    datasets = study(per_series=5)
    entries = [
        ("a/b/IM 1(x).dcm", datasets[0]),  # last path component, then every char outside [A-Za-z0-9_.-] -> _
        ("win\\path\\IM2.dcm", datasets[1]),  # a backslash is no separator in getLastPathComponent
        ("séries/Bild-ä.dcm", datasets[2]),  # non-ASCII letters are no \\w for Java
        ("emoji-\U0001f600.dcm", datasets[3]),  # outside the BMP: two UTF-16 units, two underscores
        ("dir/.hidden", datasets[4]),
    ]
    assert import_zip(xnat, alice, zipped(entries)).status_code == 200
    names = set(prearchive_files(xnat, alice)["1"])
    assert names == {"IM_1_x_.dcm", "win_path_IM2.dcm", "Bild-_.dcm", "emoji-__.dcm", ".hidden"}


def test_rename_uses_the_template_namer(xnat: FakeXnat, alice: requests.Session) -> None:
    datasets = study(per_series=2)
    assert import_zip(xnat, alice, zipped(named(datasets)), rename="true").status_code == 200
    assert set(prearchive_files(xnat, alice)["1"]) == {template_name(ds) for ds in datasets}


def test_a_name_taken_by_another_object_gets_the_template_name(xnat: FakeXnat, alice: requests.Session) -> None:
    first, second = study(per_series=2)
    assert import_zip(xnat, alice, zipped([("IM.dcm", first)])).status_code == 200
    # Another object under the same name: the first keeps it, the newcomer gets the namer's name.
    assert import_zip(xnat, alice, zipped([("IM.dcm", second)])).status_code == 200
    files = prearchive_files(xnat, alice)["1"]
    assert set(files) == {"IM.dcm", template_name(second)}
    # The same object again under the same name: overwritten in place, nothing added.
    assert import_zip(xnat, alice, zipped([("IM.dcm", first)])).status_code == 200
    assert prearchive_files(xnat, alice)["1"] == files
    # The same object under a new name is a second file in the prearchive (getSafeFile only looks at the name).
    assert import_zip(xnat, alice, zipped([("other.dcm", first)])).status_code == 200
    assert set(prearchive_files(xnat, alice)["1"]) == {"IM.dcm", "other.dcm", template_name(second)}


def test_gradual_in_body_uploads_are_named_upload_dcm_first(xnat: FakeXnat, alice: requests.Session) -> None:
    """An in-body upload's file writer is named from its Content-Type (`upload.dcm`): the first object of a scan
    keeps that name, every other one gets the template name."""
    datasets = study(per_series=2)
    for ds in datasets:
        response = alice.post(
            f"{xnat.url}/data/services/import",
            params={"PROJECT_ID": "PROJ", "EXPT_LABEL": "SESS01"},
            data=encode(ds),
            headers={"Content-Type": "application/dicom"},
            timeout=TIMEOUT,
        )
        assert response.status_code == 200
    assert set(prearchive_files(xnat, alice)["1"]) == {"upload.dcm", template_name(datasets[1])}


# ---------------------------------------------------------------------------------------------------------------
# The archive's catalog merge (MergeCatCatalog, MergeSessionsA.checkForConflict)
# ---------------------------------------------------------------------------------------------------------------


def archive_first(xnat: FakeXnat, alice: requests.Session, datasets: Sequence[Dataset], pattern: str) -> None:
    uri = import_zip(xnat, alice, zipped(named(datasets, pattern)), dest="/prearchive/projects/PROJ").text.strip()
    assert archive(xnat, alice, uri).status_code == 200


def reimport(xnat: FakeXnat, alice: requests.Session, entries: Sequence[tuple[str, Dataset]]) -> str:
    response = import_zip(xnat, alice, zipped(entries), dest="/prearchive/projects/PROJ")
    assert response.status_code == 200
    return response.text.strip()


def archived(xnat: FakeXnat) -> dict[str, str]:
    (experiment,) = xnat.experiments("PROJ")
    return experiment.scans["1"].files


def test_same_uids_under_new_names_replace_the_archived_entries(xnat: FakeXnat, alice: requests.Session) -> None:
    """Entries are matched by SOP Instance UID (useSopInstanceUidToUniquelyIdentifyDicom, default true): the renamed
    files replace the old ones, so the scan holds each UID once."""
    datasets = study(per_series=3)
    archive_first(xnat, alice, datasets, "old/A{}.dcm")
    src = reimport(xnat, alice, named(datasets, "new/B{}.dcm"))
    assert archive(xnat, alice, src, overwrite="append").status_code == 200
    assert archived(xnat) == {f"B{i}.dcm": ds.SOPInstanceUID for i, ds in enumerate(datasets)}


def test_with_the_uid_preference_off_entries_are_matched_by_name(make_xnat: Factory, alice: requests.Session) -> None:
    xnat = make_xnat(use_sop_instance_uid=False)
    datasets = study(per_series=2)
    archive_first(xnat, alice, datasets, "A{}.dcm")
    src = reimport(xnat, alice, named(datasets, "B{}.dcm"))
    assert archive(xnat, alice, src, overwrite="append").status_code == 200
    assert sorted(archived(xnat)) == ["A0.dcm", "A1.dcm", "B0.dcm", "B1.dcm"]  # each UID twice
    # By name, a different object under a taken name simply replaces it.
    newcomer = study(per_series=1)[0]
    newcomer.StudyInstanceUID = datasets[0].StudyInstanceUID
    newcomer.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    src = reimport(xnat, alice, [("A0.dcm", newcomer)])
    assert archive(xnat, alice, src, overwrite="append").status_code == 200
    assert archived(xnat)["A0.dcm"] == newcomer.SOPInstanceUID


def test_a_taken_name_with_another_uid_is_a_conflict_even_with_overwrite(
    xnat: FakeXnat, alice: requests.Session
) -> None:
    datasets = study(per_series=2)
    archive_first(xnat, alice, datasets, "A{}.dcm")
    newcomer = study(per_series=1)[0]
    newcomer.StudyInstanceUID = datasets[0].StudyInstanceUID
    newcomer.SeriesInstanceUID = datasets[0].SeriesInstanceUID
    src = reimport(xnat, alice, [("A0.dcm", newcomer)])
    failed = archive(xnat, alice, src, overwrite="append")
    assert failed.status_code == 500
    assert h3(failed).endswith(
        "A DICOM file with the same name but different UID already exists. "
        "There is no way to override this conflict, you will need to fix your data."
    )
    assert [row["status"] for row in xnat.prearchive_rows()] == ["CONFLICT"]
    assert archived(xnat) == {f"A{i}.dcm": ds.SOPInstanceUID for i, ds in enumerate(datasets)}  # untouched


def test_without_overwrite_any_overlap_is_refused(xnat: FakeXnat, alice: requests.Session) -> None:
    """checkForConflict: a file path that exists -> "matching files"; else a UID the scan's catalog has -> "same
    resources"; new files only -> merged."""
    datasets = study(per_series=3)
    archive_first(xnat, alice, datasets[:2], "A{}.dcm")
    same_path = archive(xnat, alice, reimport(xnat, alice, [("A0.dcm", datasets[0])]))
    assert h3(same_path).endswith("Session already exists with matching files.")
    alice.delete(f"{xnat.url}/data{xnat.prearchive_rows()[0]['url']}", timeout=TIMEOUT)
    same_uid = archive(xnat, alice, reimport(xnat, alice, [("Z.dcm", datasets[1])]))
    assert h3(same_uid).endswith("Session already exists with the same resources.")
    alice.delete(f"{xnat.url}/data{xnat.prearchive_rows()[0]['url']}", timeout=TIMEOUT)
    new_only = archive(xnat, alice, reimport(xnat, alice, [("A2.dcm", datasets[2])]))
    assert new_only.status_code == 200
    assert sorted(archived(xnat)) == ["A0.dcm", "A1.dcm", "A2.dcm"]


# ---------------------------------------------------------------------------------------------------------------
# Files XNAT accepts and drops silently
# ---------------------------------------------------------------------------------------------------------------


def test_a_series_import_filter_drops_objects_before_any_row_exists(xnat: FakeXnat, alice: requests.Session) -> None:
    localizer = study(per_series=2, SeriesDescription="LOCALIZER")
    kept = study(per_series=2, SeriesDescription="T1")
    for ds in kept:
        ds.StudyInstanceUID = localizer[0].StudyInstanceUID
        ds.SeriesNumber = 2
    xnat.drop_entries(lambda sop_uid, series_uid, description: description == "LOCALIZER")

    only_dropped = import_zip(xnat, alice, zipped(named(localizer)))
    assert (only_dropped.status_code, only_dropped.text) == (200, "")  # accepted, nothing stored, no row
    assert xnat.prearchive_rows() == []

    mixed = import_zip(xnat, alice, zipped(named(localizer + kept)))
    assert mixed.status_code == 200 and mixed.text.count("\r\n") == 1
    assert {scan: sorted(files) for scan, files in prearchive_files(xnat, alice).items()} == {
        "2": ["IM2.dcm", "IM3.dcm"]
    }

    for _ in range(3):  # a client re-sending what XNAT keeps dropping gets 200 every time, and nothing changes
        assert import_zip(xnat, alice, zipped(named(localizer))).status_code == 200
    assert list(prearchive_files(xnat, alice)) == ["2"]

    xnat.drop_entries(None)
    assert import_zip(xnat, alice, zipped(named(localizer))).status_code == 200
    assert sorted(prearchive_files(xnat, alice)) == ["1", "2"]


def test_a_site_anonymization_reject_deletes_the_written_file(xnat: FakeXnat, alice: requests.Session) -> None:
    datasets = study(per_series=3)
    doomed = datasets[1].SOPInstanceUID
    assert import_zip(xnat, alice, zipped(named(datasets))).status_code == 200
    assert sorted(prearchive_files(xnat, alice)["1"]) == ["IM0.dcm", "IM1.dcm", "IM2.dcm"]

    xnat.drop_entries(lambda sop_uid, series_uid, description: sop_uid == doomed, stage="anonymization")
    again = import_zip(xnat, alice, zipped(named(datasets)))
    assert again.status_code == 200
    # The re-sent copy overwrote IM1.dcm in place and was then deleted: the earlier copy is gone too.
    assert sorted(prearchive_files(xnat, alice)["1"]) == ["IM0.dcm", "IM2.dcm"]

    # A row that says prevent_anon is not anonymized, so nothing is rejected there.
    kept = import_zip(xnat, alice, zipped(named(datasets)), EXPT_LABEL="SESS02", prevent_anon="true")
    assert kept.status_code == 200
    assert sorted(prearchive_files(xnat, alice, "SESS02")["1"]) == ["IM0.dcm", "IM1.dcm", "IM2.dcm"]


def test_a_reject_of_the_first_object_still_leaves_its_new_row(xnat: FakeXnat, alice: requests.Session) -> None:
    """The row is found or created before the file is written (GradualDicomImporter.java:324): rejecting every
    object leaves an empty RECEIVING row that the idle builder then fails to build."""
    xnat.drop_entries(lambda *_: True, stage="anonymization")
    response = import_zip(xnat, alice, zipped(named(study(per_series=2))))
    assert (response.status_code, response.text) == (200, "")
    (row,) = xnat.prearchive_rows("PROJ")
    assert row["status"] == "RECEIVING"
    xnat.build_now()
    assert xnat.prearchive_rows("PROJ")[0]["status"] == "ERROR"


def test_drop_entries_refuses_an_unknown_stage(xnat: FakeXnat) -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        xnat.drop_entries(lambda *_: True, stage="later")


def test_the_filter_runs_before_the_sop_uid_checks(xnat: FakeXnat, alice: requests.Session) -> None:
    """GradualDicomImporter.call filters (:193) before it checks the SOP UIDs (:206-211): an object without a SOP
    Instance UID that a filter drops is accepted, one that no filter drops fails the import."""
    (broken,) = study(per_series=1, SeriesDescription="SCOUT")
    del broken.SOPInstanceUID
    refused = import_zip(xnat, alice, zipped([("IM0.dcm", broken)]))
    assert (refused.status_code, h3(refused)) == (400, "object IM0.dcm contains no SOP Instance UID")
    xnat.drop_entries(lambda sop_uid, series_uid, description: description == "SCOUT")
    accepted = import_zip(xnat, alice, zipped([("IM0.dcm", broken)]))
    assert (accepted.status_code, accepted.text) == (200, "")
    assert xnat.prearchive_rows() == []
