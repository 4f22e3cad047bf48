"""Canary scans and referential integrity of ingestd's de-identification engine (deid.md §6.1 layers 3 and 4).

A unique token is planted in every attribute of Table E.1-1 (2026c) that pydicom can encode, in nested items of a
sequence the table does not list, in private and in UN elements. After de-identification, no token of an
attribute the profile removes or replaces may be found in the written file, in the file name derived from it, or
in anything logged during the run. The second half builds a small study with cross-references (two image series
sharing a frame of reference, an RTSTRUCT, a SEG, a KOS) and checks every reference still resolves after the
instances were de-identified in separate calls and in a separate process.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest
import structlog
from pydicom import dcmread
from pydicom._uid_dict import UID_dictionary  # pydicom.uid uses it without re-exporting it
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian
from structlog.testing import capture_logs

from ingestd.deid.engine import Change, DeidError, Labels, anonymize
from ingestd.deid.profile import Override, OverrideAction, PrivateKeep, Profile
from ingestd.patterns import compile_regex
from tests import deid_oracle as oracle

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
ROOT = "1.2.826.0.1.3680043.10.543"  # a made-up organisation root for every original UID here
PATIENT_ID = "CANARYPATIENT1"
PATIENT_FAMILY, PATIENT_GIVEN = "CANARYFAMILY", "CANARYGIVEN"
RESEARCH = frozenset(
    {
        "retain-longitudinal-modified-dates",
        "retain-patient-characteristics",
        "retain-device-identity",
        "clean-descriptors",
        "retain-safe-private",
    }
)
SAFE_CREATOR = "CANARY SAFE CREATOR"
# The private element a research profile keeps: numeric, justified.
SAFE_KEEP = PrivateKeep(SAFE_CREATOR, 0x0029, 0x01, "slice count, numeric")
# Binary attributes that an option column cleans (C). The engine cannot clean bytes, so it holds the study.
UNCLEANABLE_UNDER_RESEARCH = frozenset({0x00340007, 0x0016002B, 0x0016004B, 0x04000310})


def _uid(*parts: int) -> str:
    return ".".join([ROOT, *map(str, parts)])


def _token(n: int) -> str:
    return f"CANARY{n:04d}"  # 10 characters: an even length, so it fits OB/OW/UN values unpadded


def _date(n: int) -> str:
    return f"{date(1911, 1, 1) + timedelta(days=n):%Y%m%d}"


def _time(n: int) -> str:
    return f"13{n // 60 % 60:02d}{n % 60:02d}"


class Planter:
    """Builds values with unique tokens and remembers where each one went."""

    def __init__(self) -> None:
        self.n = 0
        self.where: dict[str, tuple[int, str, bool]] = {}  # token -> (tag, VR, top level)
        self.dates: dict[str, int] = {}  # planted DA/DT/TM value -> tag

    def next(self) -> int:
        self.n += 1
        return self.n

    def value(self, tag: int, vr: str, *, top: bool = True) -> object:  # noqa: PLR0911 - one return per VR family
        n = self.next()
        token = _token(n)
        if vr in ("DA", "DT", "TM"):
            text = _date(n) if vr == "DA" else _date(n) + "120000" if vr == "DT" else _time(n)
            self.dates[text] = tag
            return text
        if vr == "UI":
            self.where[_uid(7, n)] = (tag, vr, top)
            return _uid(7, n)
        if vr in ("US", "SS", "UL", "SL", "UV", "SV"):
            return n
        if vr in ("FL", "FD"):
            return float(n) + 0.5
        if vr == "AS":
            return f"{n % 100:03d}Y"
        if vr in ("DS", "IS"):
            text = f"8{n:04d}.5" if vr == "DS" else f"8{n:05d}"
            self.where[text] = (tag, vr, top)
            return text
        self.where[token] = (tag, vr, top)
        if vr in ("OB", "OW", "UN", "OF", "OD", "OL", "OV"):
            return token.encode("ascii")
        if vr == "UR":
            return f"http://canary.invalid/{token}"
        return f"{token}^{token}G" if vr == "PN" else token

    def item(self) -> Dataset:
        """A sequence item: a person name and a reference, both canaries."""
        item = Dataset()
        item.PatientName = self.value(0x00100010, "PN", top=False)
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = self.value(0x00081155, "UI", top=False)
        return item


def _base(number: int, sop_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.SourceApplicationEntityTitle = "CANARYSOURCEAE"
    ds.file_meta.ImplementationClassUID = UID(_uid(9999))
    ds.preamble = b"CANARYPREAMBLE".ljust(128, b"\x01")
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = _uid(1)
    ds.SeriesInstanceUID = _uid(2)
    ds.FrameOfReferenceUID = _uid(3)
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.PatientID = PATIENT_ID
    ds.PatientName = f"{PATIENT_FAMILY}^{PATIENT_GIVEN}"
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = b"\x00" * 32
    return ds


def _planted(skip: frozenset[int] = frozenset()) -> tuple[Dataset, Dataset, Planter]:
    """Instance A (a plain image) and instance B (canaries everywhere, referencing A)."""
    a = _base(1, _uid(10))
    b = _base(2, _uid(11))
    planter = Planter()
    identity = {0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00200052, 0x00100020, 0x00100010, 0x00080060}
    for tag in sorted(oracle.SINGLE):
        if tag >> 16 in (0x0000, 0x0002) or tag in identity or tag in skip:
            continue
        vr = oracle.vr_of(tag)
        if vr == "SQ":
            b.add(DataElement(tag, "SQ", Sequence([planter.item()])))
        else:
            b.add(DataElement(tag, vr, planter.value(tag, vr)))
    # The repeating groups: a curve, an overlay and its comment.
    for tag, vr in ((0x50000010, "US"), (0x50003000, "OB"), (0x60003000, "OW"), (0x60004000, "LT")):
        b.add(DataElement(tag, vr, planter.value(tag, vr)))
    # Descriptions that mention the patient: a clean (C) must remove the identifiers even when it keeps the rest.
    b.StudyDescription = f"{planter.value(0x00081030, 'LO')} for {PATIENT_ID} {PATIENT_GIVEN}"
    b.ImageComments = f"{PATIENT_FAMILY} {planter.value(0x00204000, 'LT')}"
    # A sequence the table does not list, two levels deep, with a reference to instance A.
    inner = Dataset()
    inner.OperatorsName = planter.value(0x00081070, "PN", top=False)
    inner.PatientAddress = planter.value(0x00101040, "LO", top=False)
    inner.InstanceCreationDate = planter.value(0x00080012, "DA", top=False)
    inner.ReferencedSOPClassUID = CTImageStorage
    inner.ReferencedSOPInstanceUID = a.SOPInstanceUID
    _private_block(inner, 0x0011, 0x10, "CANARY NESTED CREATOR", planter)
    outer = Dataset()
    outer.SeriesInstanceUID = a.SeriesInstanceUID
    outer.ReferencedInstanceSequence = Sequence([inner])
    b.ReferencedSeriesSequence = Sequence([outer])
    # Private blocks at the top level (one of them safe-listed in the research profile) and UN elements.
    _private_block(b, 0x0009, 0x10, "CANARY VENDOR CREATOR", planter)
    b.add_new(0x00290010, "LO", SAFE_CREATOR)
    b.add_new(0x00291001, "US", 12)  # the safe-listed element: kept under retain-safe-private
    b.add_new(0x00291002, "LO", planter.value(0x00291002, "LO"))  # same block, not safe-listed
    for tag in (0x00700FF0, 0x00440FF0):  # tags no dictionary knows, as an implicit VR reader leaves them
        assert not keyword_for_tag(tag)
        b.add(DataElement(tag, "UN", planter.value(tag, "UN")))
    return a, b, planter


def _private_block(ds: Dataset, group: int, slot: int, creator: str, planter: Planter) -> None:
    ds.add_new((group << 16) | slot, "LO", creator)
    planter.where[creator] = ((group << 16) | slot, "LO", False)
    base = (group << 16) | (slot << 8)
    for offset, vr in enumerate(("LO", "PN", "OB", "UN", "UI", "SH"), start=1):
        ds.add(DataElement(base | offset, vr, planter.value(base | offset, vr, top=False)))
    item = Dataset()
    item.PatientName = planter.value(0x00100010, "PN", top=False)
    ds.add(DataElement(base | 0x20, "SQ", Sequence([item])))


def _profile(options: frozenset[str], key: bytes = KEY) -> Profile:
    keep = (SAFE_KEEP,) if "retain-safe-private" in options else ()
    return Profile(name="canary", key=key, options=options, private_keep=keep)


def _expectation(profile: Profile) -> oracle.Expectation:
    return oracle.Expectation(
        options=profile.options,
        private_keep=frozenset((k.creator, k.group, k.element) for k in profile.private_keep),
        date_shift_days=profile.date_shift_days,
    )


def _must_go(token_site: tuple[int, str, bool], expect: oracle.Expectation) -> bool:
    tag, vr, top = token_site
    if (tag >> 16) % 2:  # private: only the safe-listed element may stay, and it holds no token
        return True
    if not top:
        return True  # nested canaries sit in a person name, a removed attribute, a private block or a reference
    return expect.exempt(tag, vr) is None


def _dates_in(ds: Dataset) -> set[str]:
    return {
        str(value)
        for node in oracle.walk(None, ds)
        if node.out is not None and node.out.VR in ("DA", "DT", "TM")
        for value in (node.out.value if isinstance(node.out.value, list) else [node.out.value])
    }


@pytest.mark.parametrize(
    ("options", "at_least"),
    [(frozenset(), 550), (RESEARCH - {"clean-descriptors"}, 500), (RESEARCH, 250)],
    ids=["basic", "research-without-clean-descriptors", "research"],
)
def test_no_canary_survives(options: frozenset[str], at_least: int, caplog: pytest.LogCaptureFixture) -> None:
    """No token of an attribute the profile removes or replaces is left in the files, their names or the logs.

    Under the research options fewer tokens must go: the checker does not model Clean Descriptors row by row and
    so exempts every free-text attribute from the scan when that option is on (see `Expectation.exempt`).
    """
    skip = UNCLEANABLE_UNDER_RESEARCH if options else frozenset()
    a, b, planter = _planted(skip)
    profile = _profile(options)
    expect = _expectation(profile)
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logged:
        structlog.get_logger("ingestd.test").info("de-identifying", instances=2)
        outs = [anonymize(ds, profile, Labels(project="P", subject="S", session="E")) for ds in (a, b)]
    data = [oracle.to_bytes(out) for out in outs]
    names = " ".join(f"{out.SOPInstanceUID}.dcm" for out in outs)
    logs = json.dumps(logged, default=str) + caplog.text
    assert logged and logged[0]["event"] == "de-identifying", "structlog capture is not active"

    must_go = {token for token, site in planter.where.items() if _must_go(site, expect)}
    kept = set(planter.where) - must_go
    assert len(must_go) > at_least
    assert oracle.leaked_secrets(must_go, *data) == []
    assert oracle.leaked_secrets(must_go, names, logs) == []
    for identifier in (PATIENT_ID, PATIENT_FAMILY, PATIENT_GIVEN, "CANARYSOURCEAE", "CANARYPREAMBLE", _uid(9999)):
        assert identifier.encode() not in data[1], identifier
    if not options:
        assert kept == set()
        assert not set(planter.dates) & _dates_in(outs[1]), "a planted date or time survived without a date option"
    else:  # the options do keep what they promise (device and patient characteristics, cleaned descriptions)
        survived = set(oracle.leaked_secrets(kept, data[1]))
        for keyword in ("StationName", "PatientSex", "StudyDescription")[: 3 if "clean-descriptors" in options else 2]:
            assert any(planter.where[token][0] == tag_for_keyword(keyword) for token in survived), keyword
        assert outs[1][0x00291001].value == 12, "the safe-listed private element was not kept"
    rest = data[0] + data[1]
    for token in kept:  # e.g. Device UID under Retain Device Identity
        rest = rest.replace(token.encode(), b"")
    assert ROOT.encode() not in rest, "an original UID (or its root) survived"
    # The generic oracle agrees, for each instance and across both.
    for orig, out, blob in zip((a, b), outs, data, strict=True):
        assert oracle.check_instance(orig, out, expect, oracle.original_uids([a, b]), blob) == []
        assert oracle.leaked_secrets(oracle.secrets(orig, out, expect), blob) == []
    assert oracle.check_study([a, b], outs, expect) == []
    # B's nested reference points at A's new SOP Instance UID.
    nested = outs[1].ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert nested.ReferencedSOPInstanceUID == outs[0].SOPInstanceUID
    # Determinism (16) and unlinkability (13).
    again = anonymize(b, profile, Labels(project="P", subject="S", session="E"))
    assert oracle.to_bytes(again) == data[1]
    others = [anonymize(ds, _profile(options, OTHER_KEY), Labels()) for ds in (a, b)]
    assert oracle.check_unlinkable([a, b], outs, others, expect) == []


def test_uncleanable_binary_is_held_without_leaking() -> None:
    """Under options that clean (C) an OB attribute, the engine holds the instance; the reason names no value."""
    _, b, planter = _planted()
    with capture_logs() as logged, pytest.raises(DeidError) as caught:
        anonymize(b, _profile(RESEARCH), Labels())
    text = f"{caught.value} {caught.value.reason} {caught.value.code} {logged}"
    assert oracle.leaked_secrets(planter.where, text) == []
    assert any(f"({tag >> 16:04X},{tag & 0xFFFF:04X})" in text for tag in UNCLEANABLE_UNDER_RESEARCH), text


def test_fail_closed_messages_name_tags_not_values() -> None:
    """Invariant 17: a missing lookup key and an unparsable date hold the instance, and the reason has no value."""
    _, b, planter = _planted()
    lookup = Override(tag=0x00100020, action="lookup", table={"someone else": "SUBJ1"}, table_name="subjects.csv")
    profile = Profile(name="canary", key=KEY, overrides={0x00100020: lookup})
    before = oracle.to_bytes(b)
    with pytest.raises(DeidError) as caught:
        anonymize(b, profile, Labels())
    assert caught.value.code == "lookup"
    assert PATIENT_ID not in str(caught.value)
    assert oracle.leaked_secrets(planter.where, str(caught.value)) == []
    assert oracle.to_bytes(b) == before, "the input was modified"

    b.SeriesDate = "20260231"  # DA syntax, but no such day
    before = oracle.to_bytes(b)
    with pytest.raises(DeidError) as caught:
        anonymize(b, _profile(frozenset({"retain-longitudinal-modified-dates"})), Labels())
    assert caught.value.code == "date"
    assert "2026" not in str(caught.value)
    assert "(0008,0021)" in str(caught.value)
    assert oracle.to_bytes(b) == before


def test_dates_of_one_patient_shift_together_across_studies() -> None:
    """(14): two studies of one patient months apart, de-identified in separate calls: one whole-day shift for
    every date, so the interval between the studies survives; times and the time of day in DT stay."""
    first, second = _base(1, _uid(20)), _base(1, _uid(21))
    second.StudyInstanceUID = second.SeriesInstanceUID = _uid(22)
    for ds, day in ((first, "20250110"), (second, "20250503")):
        ds.StudyDate = ds.SeriesDate = day
        ds.StudyTime = "235959.5"
        ds.AcquisitionDateTime = day + "235959.123456+0100"
        item = Dataset()
        item.InstanceCreationDate = day
        ds.ReferencedSeriesSequence = Sequence([item])
    profile = _profile(frozenset({"retain-longitudinal-modified-dates"}))
    outs = [anonymize(ds, profile, Labels()) for ds in (first, second)]
    assert oracle.check_study([first, second], outs, _expectation(profile)) == []
    before = date.fromisoformat(second.StudyDate) - date.fromisoformat(first.StudyDate)
    after = date.fromisoformat(outs[1].StudyDate) - date.fromisoformat(outs[0].StudyDate)
    assert before == after
    assert outs[0].StudyDate != first.StudyDate
    assert outs[0].StudyTime == "235959.5"
    assert outs[0].AcquisitionDateTime.endswith("235959.123456+0100")


@pytest.mark.parametrize("action", ["uid", "pseudonym", "replace", "regex", "shift-date", "lookup"])
def test_override_on_a_sequence_holds(action: OverrideAction) -> None:
    """An override that only makes sense for a value, met by a sequence in the data, holds the instance."""
    _, b, _ = _planted()
    tag = 0x00081140  # Referenced Image Sequence
    override = Override(
        tag=tag,
        action=action,
        value="{subject}",
        pattern=compile_regex("x"),
        table={},
    )
    before = oracle.to_bytes(b)
    with pytest.raises(DeidError) as caught:
        anonymize(b, Profile(name="canary", key=KEY, overrides={tag: override}), Labels(subject="S"))
    assert caught.value.code == "override"
    assert "(0008,1140)" in caught.value.reason
    assert oracle.to_bytes(b) == before


# ---------------------------------------------------------------------------------------------------------------
# Referential integrity across instances, calls and processes (deid.md §6.1 layer 4).


def _image(series: str, number: int, sop_uid: str) -> Dataset:
    ds = _base(number, sop_uid)
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = int(series.rsplit(".", 1)[1])
    return ds


def _ref(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def _fixture_study() -> list[Dataset]:
    series_a = [_image(_uid(100), n, _uid(100, n)) for n in (1, 2, 3)]
    series_b = [_image(_uid(200), n, _uid(200, n)) for n in (1, 2)]
    rtstruct = _base(1, _uid(300, 1))
    rtstruct.SOPClassUID = rtstruct.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.481.3")
    rtstruct.Modality = "RTSTRUCT"
    rtstruct.SeriesInstanceUID = _uid(300)
    del rtstruct.FrameOfReferenceUID
    series_item = Dataset()
    series_item.SeriesInstanceUID = _uid(100)
    series_item.ContourImageSequence = Sequence([_ref(CTImageStorage, ds.SOPInstanceUID) for ds in series_a])
    study_item = _ref("1.2.840.10008.3.1.2.3.1", _uid(1))  # Detached Study Management (retired), as RT does
    study_item.RTReferencedSeriesSequence = Sequence([series_item])
    frame = Dataset()
    frame.FrameOfReferenceUID = _uid(3)
    frame.RTReferencedStudySequence = Sequence([study_item])
    rtstruct.ReferencedFrameOfReferenceSequence = Sequence([frame])
    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = _uid(3)
    roi.ROIName = "GTV"
    rtstruct.StructureSetROISequence = Sequence([roi])

    seg = _base(1, _uid(400, 1))
    seg.SOPClassUID = seg.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.66.4")
    seg.Modality = "SEG"
    seg.SeriesInstanceUID = _uid(400)
    seg_series = Dataset()
    seg_series.SeriesInstanceUID = _uid(100)
    seg_series.ReferencedInstanceSequence = Sequence([_ref(CTImageStorage, ds.SOPInstanceUID) for ds in series_a])
    seg.ReferencedSeriesSequence = Sequence([seg_series])
    derivation = Dataset()
    derivation.SourceImageSequence = Sequence([_ref(CTImageStorage, series_a[0].SOPInstanceUID)])
    frame_group = Dataset()
    frame_group.DerivationImageSequence = Sequence([derivation])
    seg.PerFrameFunctionalGroupsSequence = Sequence([frame_group])
    seg.SourceImageSequence = Sequence([_ref(CTImageStorage, ds.SOPInstanceUID) for ds in series_a[1:]])
    seg.ReferencedImageSequence = Sequence([_ref(CTImageStorage, series_b[0].SOPInstanceUID)])
    dimension = Dataset()
    dimension.DimensionOrganizationUID = _uid(401)
    seg.DimensionOrganizationSequence = Sequence([dimension])
    index = Dataset()
    index.DimensionOrganizationUID = _uid(401)
    seg.DimensionIndexSequence = Sequence([index])

    kos = _base(1, _uid(500, 1))
    kos.SOPClassUID = kos.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.88.59")
    kos.Modality = "KO"
    kos.SeriesInstanceUID = _uid(500)
    for attribute in ("FrameOfReferenceUID", "Rows", "Columns", "PixelData"):
        delattr(kos, attribute)
    evidence = Dataset()
    evidence.StudyInstanceUID = _uid(1)
    evidence_series = []
    for series, members in ((_uid(100), series_a), (_uid(200), series_b), (_uid(300), [rtstruct]), (_uid(400), [seg])):
        item = Dataset()
        item.SeriesInstanceUID = series
        item.ReferencedSOPSequence = Sequence([_ref(ds.SOPClassUID, ds.SOPInstanceUID) for ds in members])
        evidence_series.append(item)
    evidence.ReferencedSeriesSequence = Sequence(evidence_series)
    kos.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    return [*series_a, *series_b, rtstruct, seg, kos]


_SUBPROCESS = """
import sys
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from ingestd.deid.engine import Labels, anonymize
from ingestd.deid.profile import Profile
profile = Profile(name="canary", key=bytes.fromhex(sys.argv[3]))
anonymize(dcmread(sys.argv[1]), profile, Labels()).save_as(sys.argv[2], enforce_file_format=True)
"""


def test_references_resolve_across_runs_and_processes(tmp_path: Path) -> None:
    study = _fixture_study()
    profile = Profile(name="canary", key=KEY)
    expect = _expectation(profile)
    # Different "runs": the KOS first, the images last, each its own call; the RTSTRUCT in a fresh process.
    order = list(reversed(range(len(study))))  # the KOS, the SEG and the RTSTRUCT before the images they reference
    outs: dict[int, Dataset] = {}
    for index in order:
        if study[index].Modality == "RTSTRUCT":
            source, target = tmp_path / "rtstruct-in.dcm", tmp_path / "rtstruct-out.dcm"
            study[index].save_as(source, enforce_file_format=True)
            subprocess.run(
                [sys.executable, "-c", _SUBPROCESS, str(source), str(target), KEY.hex()],
                check=True,
                cwd=Path(__file__).resolve().parents[1],
                timeout=60,
            )
            outs[index] = dcmread(target)
        else:
            outs[index] = anonymize(study[index], profile, Labels())
    ordered = [outs[i] for i in range(len(study))]
    assert oracle.check_study(study, ordered, expect) == []
    uids = oracle.original_uids(study)
    for orig, out in zip(study, ordered, strict=True):
        assert oracle.check_instance(orig, out, expect, uids) == []
    # The subprocess wrote the same bytes this process would.
    rtstruct = next(i for i, ds in enumerate(study) if ds.Modality == "RTSTRUCT")
    assert (tmp_path / "rtstruct-out.dcm").read_bytes() == oracle.to_bytes(
        anonymize(study[rtstruct], profile, Labels())
    )

    new_sop = {ds.SOPInstanceUID: out.SOPInstanceUID for ds, out in zip(study, ordered, strict=True)}
    new_series = {ds.SeriesInstanceUID: out.SeriesInstanceUID for ds, out in zip(study, ordered, strict=True)}
    b1 = new_sop[_uid(200, 1)]
    rt = ordered[rtstruct]
    frame = rt.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == ordered[0].FrameOfReferenceUID == ordered[3].FrameOfReferenceUID
    assert rt.StructureSetROISequence[0].ReferencedFrameOfReferenceUID == ordered[0].FrameOfReferenceUID
    study_item = frame.RTReferencedStudySequence[0]
    assert study_item.ReferencedSOPInstanceUID == ordered[0].StudyInstanceUID
    assert study_item.ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"
    series_item = study_item.RTReferencedSeriesSequence[0]
    assert series_item.SeriesInstanceUID == new_series[_uid(100)]
    assert [i.ReferencedSOPInstanceUID for i in series_item.ContourImageSequence] == [
        new_sop[_uid(100, n)] for n in (1, 2, 3)
    ]
    seg = ordered[-2]
    assert [i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence] == [
        new_sop[_uid(100, n)] for n in (1, 2, 3)
    ]
    # Source Image and Referenced Image Sequence are X/Z/U*, resolved by the Segmentation IOD (ingestd.deid.iod):
    # Type 2 in the Derivation Image macro (kept, UIDs remapped), Type 3 at the top level (removed).
    derived = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert derived.ReferencedSOPInstanceUID == new_sop[_uid(100, 1)]
    assert "SourceImageSequence" not in seg
    assert "ReferencedImageSequence" not in seg
    assert b1 not in oracle.to_bytes(seg).decode("latin-1")
    assert seg.DimensionOrganizationSequence[0].DimensionOrganizationUID == (
        seg.DimensionIndexSequence[0].DimensionOrganizationUID
    )
    evidence = ordered[-1].CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == ordered[0].StudyInstanceUID
    for item in evidence.ReferencedSeriesSequence:
        for ref in item.ReferencedSOPSequence:
            assert ref.ReferencedSOPInstanceUID in new_sop.values()
            assert ref.ReferencedSOPClassUID in UID_dictionary
        assert item.SeriesInstanceUID in new_series.values()


# The Basic Profile codes whose non-removing branch is a dummy (D): a sequence with one keeps its items only as a
# dummy of the content, so text the table does not list inside them (a code's value and meaning: an employee
# number, a person's or an institution's name) must not survive either.
_DUMMY_CODES = frozenset({"D", "X/D", "X/Z/D", "Z/D"})


def test_unlisted_text_inside_a_sequence_the_table_replaces_does_not_survive() -> None:
    sequences = sorted(tag for tag, code in oracle.SINGLE.items() if code in _DUMMY_CODES and oracle.vr_of(tag) == "SQ")
    assert len(sequences) >= 8  # Person Identification Code, Institution Code, Verifying Observer, ...
    ds = _base(1, _uid(7, 1))
    where: dict[str, str] = {}
    for n, tag in enumerate(sequences):
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator = f"CANARYCV{n}", "99LOCAL"
        code.CodeMeaning = f"CANARYMEANING{n}"
        code.LongCodeValue = f"CANARYLONG{n}"
        inner = Dataset()
        inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = f"CANARYIN{n}", "99LOCAL", "CANARYINNER"
        code.EquivalentCodeSequence = Sequence([inner])
        ds.add(DataElement(tag, "SQ", Sequence([code])))
        name = keyword_for_tag(tag)
        where.update({f"CANARYCV{n}": name, f"CANARYMEANING{n}": name, f"CANARYLONG{n}": name})
        where[f"CANARYIN{n}"] = name
    where["CANARYINNER"] = "nested"
    changes: list[Change] = []
    out = anonymize(ds, _profile(frozenset()), Labels(), changes)
    data = oracle.to_bytes(out)
    assert [token for token in where if token.encode() in data] == []
    assert [c.after for c in changes if any(token in c.after for token in where)] == []
    # what is left of them is still valid: coding scheme designators (CS) kept, values replaced, not emptied
    for node in oracle.walk(None, out):
        if node.out is not None and node.out.keyword in ("CodeValue", "CodeMeaning"):
            assert str(node.out.value).strip(), node.path
