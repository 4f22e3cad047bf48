"""Validity by the IOD (issue 18): combined codes resolved by the attribute's Type, required attributes kept empty or
with a dummy, overlay and curve groups removed whole; checked on the issue's files with dicom3tools' dciodvfy.

The Type table (ingestd/deid/iod_types.json) is regenerated from highdicom (pinned in the `test` extra) and must
be byte-identical. The issue's files: pydicom's examples_overlay.dcm, pydicom-data's JPGLosslessP14SV1_1s_1f_8b.dcm
and MR-SIEMENS-DICOM-WithOverlays.dcm (pinned in the `test` extra), and an animal patient like deid-data's
animals/cat.dcm (built from pydicom's CT_small.dcm) and cat.dcm itself (deid-data, in the `test` extra).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from importlib import resources
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from ingestd.deid.engine import Change, Labels, anonymize
from ingestd.deid.groups import removed_groups
from ingestd.deid.iod import Iod, iod_for, path_of, resolve
from ingestd.deid.profile import Override, Profile
from ingestd.deid.table import load_table
from tests import deid_oracle as oracle

ROOT = Path(__file__).resolve().parents[1]
PROFILE = Profile(name="basic", key=b"iod tests key, tests only, 32 by")
CT = "1.2.840.10008.5.1.4.1.1.2"
COMBINED = frozenset({"X/Z", "X/D", "X/Z/D", "Z/D", "X/Z/U*"})


def _testdata(name: str) -> Path:
    """A pydicom or pydicom-data test file, never downloaded (pydicom-data is in the `test` extra)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = get_testdata_file(name, download=False)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: pydicom-data is in the test extra")
        pytest.skip(f"{name} needs pydicom-data (pip install pydicom-data)")
    return Path(str(found))


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path)


def _iod_name(sop_class: str) -> str:
    iod = iod_for(sop_class)
    assert iod is not None
    return iod.name


def _run(ds: Dataset, profile: Profile = PROFILE) -> tuple[Dataset, list[Change]]:
    changes: list[Change] = []
    return anonymize(ds, profile, Labels(), changes), changes


# -- the generated table ------------------------------------------------------------------------------------------


def test_generator_reproduces_the_vendored_table(tmp_path: Path) -> None:
    out = tmp_path / "iod_types.json"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "deid" / "generate_iod.py"), "--output", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert out.read_bytes() == (ROOT / "ingestd" / "deid" / "iod_types.json").read_bytes()


def _document() -> dict[str, dict[str, object]]:
    text = resources.files("ingestd.deid").joinpath("iod_types.json").read_text("utf-8")
    document: dict[str, dict[str, object]] = json.loads(text)
    return document


def test_sop_classes_map_to_their_iods() -> None:
    ct, mr, seg = iod_for(CT), iod_for("1.2.840.10008.5.1.4.1.1.4"), iod_for("1.2.840.10008.5.1.4.1.1.66.4")
    assert ct is not None and mr is not None and seg is not None
    assert (ct.name, mr.name, seg.name) == ("ct-image", "mr-image", "segmentation")
    assert iod_for(" " + CT + "\x00") is ct  # padding as read from a file; one cached object per IOD
    assert iod_for("1.2.3.4") is None
    assert iod_for("") is None


def test_types_at_paths_of_the_issue() -> None:
    ct = iod_for(CT)
    dx = iod_for("1.2.840.10008.5.1.4.1.1.1.1")  # deid-data's cat.dcm
    seg = iod_for("1.2.840.10008.5.1.4.1.1.66.4")
    assert ct is not None and dx is not None and seg is not None
    assert ct.type_at((0x00081110,)) == "3"  # Referenced Study Sequence, General Study Module
    assert dx.type_at((0x00102297,)) == dx.type_at((0x00102299,)) == "2C"  # Responsible Person / Organization
    assert ct.type_at((0x00100020,)) == "2"  # Patient ID (Z/D)
    assert seg.type_at((0x52009230, 0x00089124, 0x00082112)) == "2"  # Source Image Sequence in Derivation Image
    assert ct.type_at((0x00080080, 0x00081110)) is None  # no such path


def test_the_strongest_type_over_the_iods_modules() -> None:
    """An attribute listed by two modules of one IOD takes the Type that asks most of it."""
    document = _document()
    modules, iods = document["modules"], document["iods"]
    rank = {"1": 0, "1C": 1, "2": 2, "2C": 3, "3": 4}
    found = 0
    for name, listed in iods.items():
        assert isinstance(listed, list)
        seen: dict[str, set[str]] = {}
        for module in listed:
            types = modules[module]
            assert isinstance(types, dict)
            for path, kind in types.items():
                seen.setdefault(path, set()).add(kind)
        uid = next((uid for uid, iod in document["sop_classes"].items() if iod == name), None)
        if uid is None:
            continue  # an IOD no SOP class of the map uses
        iod = iod_for(uid)
        assert iod is not None
        for path, kinds in seen.items():
            tags = tuple(int(part, 16) for part in path.split("/"))
            assert iod.type_at(tags) == min(kinds, key=rank.__getitem__)
            found += len(kinds) > 1
    assert found > 0  # some attribute is in two modules with different Types


def test_path_of_engine_locations() -> None:
    assert path_of("(0008,1110)") == (0x00081110,)
    assert path_of("(5200,9230)[12]/(0008,9124)[0]/(0008,2112)") == (0x52009230, 0x00089124, 0x00082112)
    assert path_of("") == ()


# -- resolution ---------------------------------------------------------------------------------------------------

_IOD = Iod(
    name="test-iod",
    types={(0x00100001,): "1", (0x00100002,): "1C", (0x00100003,): "2", (0x00100004,): "2C", (0x00100005,): "3"},
)
_WHERE = {"1": "(0010,0001)", "1C": "(0010,0002)", "2": "(0010,0003)", "2C": "(0010,0004)", "3": "(0010,0005)"}
# PS3.15 E.1.1 (deid.md 1.2) and, for an X branch of a Type 1/2 attribute, the engine's keep-it-valid rule.
_EXPECTED = {
    "X/Z": {"1": "D", "1C": "D", "2": "Z", "2C": "Z", "3": "X"},
    "X/D": {"1": "D", "1C": "D", "2": "Z", "2C": "Z", "3": "X"},
    "X/Z/D": {"1": "D", "1C": "D", "2": "Z", "2C": "Z", "3": "X"},
    "Z/D": {"1": "D", "1C": "D", "2": "Z", "2C": "Z", "3": "Z"},
    "X/Z/U*": {"1": "U", "1C": "U", "2": "U", "2C": "U", "3": "X"},
    "X": {"1": "D", "1C": "D", "2": "Z", "2C": "Z", "3": "X"},
}


@pytest.mark.parametrize("code", sorted(_EXPECTED))
@pytest.mark.parametrize("kind", ["1", "1C", "2", "2C", "3"])
def test_resolve_by_type(code: str, kind: str) -> None:
    resolved, why = resolve(_IOD, _WHERE[kind], code, "LO", f"E.1-1 {code}")
    assert resolved == _EXPECTED[code][kind]
    assert why.startswith(f"E.1-1 {code}, ") and f"Type {kind} in test-iod" in why


@pytest.mark.parametrize("code", ["X", "X/Z", "X/Z/D"])
def test_a_required_sequence_is_not_kept_for_a_removal(code: str) -> None:
    """D on a sequence would keep its items; an empty Type 1 sequence is no more valid than none."""
    assert resolve(_IOD, _WHERE["1"], code, "SQ", "E.1-1")[0] == ("X" if code != "X/Z/D" else "D")
    assert resolve(_IOD, _WHERE["2"], code, "SQ", "E.1-1")[0] == "Z"


@pytest.mark.parametrize("code", sorted(COMBINED))
def test_unknown_sop_class_or_path_keeps_the_code_for_the_non_removing_branch(code: str) -> None:
    assert resolve(None, "(0010,0001)", code, "LO", "w") == (
        code,
        "w, SOP class not in the IOD table: non-removing branch",
    )
    assert resolve(_IOD, "(0010,0009)", code, "LO", "w") == (
        code,
        "w, not at this path in test-iod: non-removing branch",
    )


@pytest.mark.parametrize("code", ["K", "C", "D", "U", "Z"])
def test_other_codes_pass_through(code: str) -> None:
    assert resolve(_IOD, _WHERE["3"], code, "LO", "w") == (code, "w")
    assert resolve(None, _WHERE["1"], code, "LO", "w") == (code, "w")


# -- the property: any IOD, any attribute the table resolves by Type ----------------------------------------------

_ALWAYS_REMOVED = frozenset({0x04000500, 0x04000561, 0x4FFE0001, 0xFFFAFFFA, 0x00880200})
_VALUES: dict[str, object] = {
    "DA": "20210304",
    "TM": "101112",
    "DT": "20210304101112",
    "UI": "1.2.826.0.1.3680043.10.9999.1.2",
    "IS": "7",
    "DS": "7.5",
    "AS": "042Y",
    "CS": "CANARYCS",
    "AE": "CANARYAE",
    "SH": "CANARYSH",
    "OB": b"\x01\x02",
    "OW": b"\x01\x02",
    **dict.fromkeys(("US", "UL", "SS", "SL"), 7),
    **dict.fromkeys(("FL", "FD"), 7.5),
}


def _cases() -> list[tuple[str, tuple[int, ...], str]]:
    """(SOP class, tag path, Type) of every attribute the table resolves whose enclosing sequences the engine walks."""
    table = load_table()
    cases = []
    document = _document()
    sop_classes = document["sop_classes"]
    assert isinstance(sop_classes, dict)
    first: dict[str, str] = {}
    for uid, name in sorted(sop_classes.items()):
        first.setdefault(str(name), uid)
    for uid in sorted(first.values()):
        iod = iod_for(uid)
        assert iod is not None
        for path, kind in sorted(iod.types.items()):
            if any(table.lookup(tag) is not None or tag in _ALWAYS_REMOVED for tag in path[:-1]):
                continue  # inside a sequence the table removes, empties or keeps: judged there
            try:
                vr = dictionary_VR(path[-1])
            except KeyError:
                continue
            if vr in _VALUES or vr in ("LO", "LT", "PN", "ST", "UT", "UC", "SQ"):
                cases.append((uid, path, kind))
    return cases


CASES = _cases()


def _plant(sop_class: str, path: tuple[int, ...]) -> tuple[Dataset, DataElement]:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.9999.1.1"
    here = ds
    for tag in path[:-1]:
        item = Dataset()
        here.add(DataElement(tag, "SQ", Sequence([item])))
        here = item
    vr = dictionary_VR(path[-1])
    if vr == "SQ":
        inner = Dataset()
        inner.CodeValue = "CANARY-ITEM"
        value: object = Sequence([inner])
    else:
        value = _VALUES.get(vr, f"CANARY-{vr}-{path[-1]:08X}")
    elem = DataElement(path[-1], vr, value)
    here.add(elem)
    return ds, elem


def _find(ds: Dataset, path: tuple[int, ...]) -> DataElement | None:
    here = ds
    for tag in path[:-1]:
        if tag not in here or not here[tag].value:
            return None
        here = here[tag].value[0]
    found: DataElement | None = here.get(path[-1])
    return found


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CASES))
def test_any_iod_any_resolved_attribute(case: tuple[str, tuple[int, ...], str]) -> None:
    """Present iff the IOD's Type requires it (Z/D: always), never with its original value."""
    sop_class, path, kind = case
    ds, planted = _plant(sop_class, path)
    code = load_table().lookup(path[-1])
    assert code is not None
    out, changes = _run(ds)
    found = _find(out, path)
    required = kind in ("1", "1C", "2", "2C")
    expected = required or code.basic == "Z/D"
    if planted.VR == "SQ" and kind in ("1", "1C") and code.basic in ("X", "X/Z"):
        expected = False  # a removal of a required sequence stays a removal
    assert (found is not None) == expected, (code.basic, kind)
    if found is not None:
        if planted.VR == "SQ":
            kept = required if code.basic == "X/Z/U*" else kind in ("1", "1C")  # D or U: items kept, else Z
            assert len(found.value) == (1 if kept else 0)
        else:
            assert found.value in ("", None, b"") or found.value != planted.value
    [change] = [c for c in changes if path_of(c.path) == path]
    assert f"Type {kind} in {_iod_name(sop_class)}" in change.why


def test_the_property_covers_every_combined_code_and_type() -> None:
    table = load_table()
    seen = set()
    for _, path, kind in CASES:
        entry = table.lookup(path[-1])
        assert entry is not None
        seen.add((entry.basic, kind in ("1", "1C"), kind in ("2", "2C")))
    assert {code for code, _, _ in seen} == COMBINED | {"X"}
    assert len(seen) >= 14


# -- overlays and curves ------------------------------------------------------------------------------------------


def _group(ds: Dataset, group: int) -> list[int]:
    return [int(e.tag) for e in ds if int(e.tag) >> 16 == group]


def test_overlay_group_goes_whole_with_its_data() -> None:
    ds = _read(_testdata("examples_overlay.dcm"))
    before = _group(ds, 0x6000)
    assert 0x60003000 in before and len(before) > 3
    out, changes = _run(ds)
    assert _group(out, 0x6000) == []
    noted = {c.tag: c for c in changes if c.tag >> 16 == 0x6000}
    assert set(noted) == set(before)
    assert all(c.action == "remove" and "whole group 6000" in c.why for c in noted.values())
    assert out.PixelData == ds.PixelData


def test_overlay_group_stays_when_its_data_is_kept() -> None:
    ds = _read(_testdata("examples_overlay.dcm"))
    keep = Profile(
        name="keep overlay",
        key=PROFILE.key,
        overrides={0x60003000: Override(tag=0x60003000, action="keep", justification="test")},
    )
    out, _ = _run(ds, keep)
    assert _group(out, 0x6000) == _group(ds, 0x6000)
    assert out[0x60003000].value == ds[0x60003000].value
    assert removed_groups(ds, keep, load_table()) == {}


def test_an_old_style_overlay_in_the_pixel_bits_keeps_its_group_and_pixels() -> None:
    """No (60xx,3000): nothing to remove the group with; the bits stay in Pixel Data (not cleaned here)."""
    ds = _read(_testdata("examples_overlay.dcm"))
    del ds[0x60003000]
    out, _ = _run(ds)
    assert _group(out, 0x6000) == [t for t in _group(ds, 0x6000) if t != 0x60004000]
    assert out.PixelData == ds.PixelData


def test_curve_group_goes_whole() -> None:
    ds = _read(_testdata("CT_small.dcm"))
    ds.add_new(0x50020005, "US", 2)  # Curve Dimensions
    ds.add_new(0x50020010, "US", 2)  # Number of Points
    ds.add_new(0x50020022, "LO", "CANARY curve description")
    ds.add_new(0x50023000, "OB", b"\x00\x01\x00\x02")
    out, changes = _run(ds)
    assert _group(out, 0x5002) == []
    assert {c.tag for c in changes if c.tag >> 16 == 0x5002} == set(_group(ds, 0x5002))
    assert removed_groups(ds, PROFILE, load_table()) == {
        0x5002: "E.1-1 X: Curve Data (5002,3000) goes, and with it its whole group 5002"
    }


# -- the issue's files --------------------------------------------------------------------------------------------


def test_referenced_study_sequence_is_removed_where_the_iod_makes_it_type_3() -> None:
    ds = _read(_testdata("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert "ReferencedStudySequence" in ds
    out, changes = _run(ds)
    assert "ReferencedStudySequence" not in out
    [change] = [c for c in changes if c.tag == 0x00081110]
    assert change.action == "remove"
    assert change.why == f"E.1-1 X/Z, Type 3 in {_iod_name(ds.SOPClassUID)}: removed"


def _animal() -> Dataset:
    """An animal patient like deid-data's animals/cat.dcm, from pydicom's CT_small.dcm."""
    ds = _read(_testdata("CT_small.dcm"))
    ds.PatientSpeciesDescription = "Feline"
    ds.PatientBreedDescription = "Domestic shorthair"  # not in E.1-1: kept
    ds.ResponsiblePerson = "CANARY^Owner"
    ds.ResponsiblePersonRole = "OWNER"
    ds.ResponsibleOrganization = "CANARY cattery"
    ds.PatientID = "CANARY-CAT-1"
    return ds


def test_an_animal_keeps_responsible_person_and_organization_empty() -> None:
    ds = _animal()
    out, changes = _run(ds)
    assert out.ResponsiblePerson == "" and out.ResponsibleOrganization == ""
    whys = {c.tag: c.why for c in changes}
    assert whys[0x00102297] == whys[0x00102299] == "E.1-1 X, Type 2C in ct-image: emptied, not removed"
    assert out.PatientID == ""  # Z/D, Type 2 in the Patient Module
    # Responsible Person Role is Type 1C "if Responsible Person is present and has a value": it goes with the value.
    assert "ResponsiblePersonRole" not in out
    assert whys[0x00102298] == "Type 1C while (0010,2297) has a value, which it no longer has"
    assert oracle.check_instance(ds, out, oracle.Expectation()) == []
    text = oracle.to_bytes(out)
    assert b"CANARY" not in text


def _cat() -> Dataset:
    """deid-data's animals/cat.dcm (deid-data is in the `test` extra)."""
    spec = importlib.util.find_spec("deid_data")
    if spec is None or spec.origin is None:
        if os.environ.get("CI"):
            pytest.fail("deid-data is missing: it is in the test extra")
        pytest.skip("cat.dcm needs deid-data (pip install deid-data)")
    return _read(Path(spec.origin).parent / "data" / "animals" / "cat.dcm")


def test_deid_datas_cat_keeps_responsible_person_and_organization() -> None:
    ds = _cat()
    out, _ = _run(ds)
    assert "ResponsiblePerson" in out and "ResponsibleOrganization" in out
    assert out.ResponsiblePerson == "" and out.ResponsibleOrganization == ""


# -- dciodvfy before and after ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    """dicom3tools' validator; .ci/run installs it, so CI never skips."""
    found = shutil.which("dciodvfy")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy is not installed: .ci/run must apt-get install dicom3tools")
        pytest.skip("dciodvfy is not installed (apt-get install dicom3tools)")
    return found


def _errors(tool: str, path: Path) -> set[str]:
    result = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, timeout=120, check=False)
    return {line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")}


ISSUE_ERRORS = {
    "examples_overlay.dcm": "</OverlayData(6000,3000)> - Missing attribute for Type 1 Required",
    "MR-SIEMENS-DICOM-WithOverlays.dcm": "</OverlayData(6000,3000)> - Missing attribute for Type 1 Required",
    "JPGLosslessP14SV1_1s_1f_8b.dcm": "</ReferencedStudySequence(0008,1110)> - Bad Sequence number of Items = <0>",
    "animal": "</ResponsiblePerson(0010,2297)> - Missing attribute for Type 2C Conditional",
    "cat.dcm": "</ResponsiblePerson(0010,2297)> - Missing attribute for Type 2C Conditional",
}


@pytest.mark.dicom3tools
@pytest.mark.parametrize("name", sorted(ISSUE_ERRORS))
def test_no_new_validator_errors(name: str, dciodvfy: str, tmp_path: Path) -> None:
    """The issue's observed errors are gone, and the output has no error its input did not have."""
    source = tmp_path / "in.dcm"
    ds = _animal() if name == "animal" else _cat() if name == "cat.dcm" else _read(_testdata(name))
    ds.save_as(source)
    out, _ = _run(ds)
    written = tmp_path / "out.dcm"
    out.save_as(written, enforce_file_format=True)
    before, after = _errors(dciodvfy, source), _errors(dciodvfy, written)
    assert sorted(after - before) == []
    assert not any(ISSUE_ERRORS[name] in line for line in after)
    # The same output without the IOD's Types (every X/Z taken as Z, the overlay's data alone removed) shows the
    # issue's error: the check above sees what it is meant to see.
    legacy = copy.deepcopy(out)
    if name == "JPGLosslessP14SV1_1s_1f_8b.dcm":
        legacy.ReferencedStudySequence = Sequence()
    elif name in ("animal", "cat.dcm"):
        del legacy.ResponsiblePerson
    else:
        for elem in ds:
            if int(elem.tag) >> 16 == 0x6000 and int(elem.tag) not in (0x60003000, 0x60004000):
                legacy.add(elem)
    legacy.save_as(tmp_path / "legacy.dcm", enforce_file_format=True)
    assert any(ISSUE_ERRORS[name] in line for line in _errors(dciodvfy, tmp_path / "legacy.dcm"))


def test_a_required_timezone_offset_gets_a_valid_dummy() -> None:
    """Timezone Offset From UTC is X in E.1-1 and Type 1 in the Timezone module (of the Simplified Adult Echo SR):
    its dummy is a valid offset, not a pseudonym of the original."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.72", "1.2.3.4"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "1.2.3", "1.2.3.1", "SR"
    ds.TimezoneOffsetFromUTC = "-0500"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    changes: list[Change] = []
    out = anonymize(ds, Profile(name="tz", key=b"k" * 32), Labels(), changes)
    assert out.TimezoneOffsetFromUTC == "+0000"
    (change,) = [c for c in changes if c.tag == 0x00080201]
    assert "Type 1 in simplified-adult-echo-sr" in change.why
