"""Property tests of ingestd's de-identification engine against the independent checker (tests/deid_oracle.py).

Hypothesis builds small studies: one to three instances of one patient sharing Study, Series and Frame of
Reference UIDs, each with a random subset of Table E.1-1 (2026c) attributes and of attributes the table does not
list, VR-valid values (multi-valued and empty ones too, non-ASCII person names under ISO_IR 192), the 2026c tags
pydicom does not know as UN bytes, nested sequences (listed and unlisted) to a random depth, random private blocks,
and references from one instance to another. Every text value carries a unique token, so the canary check can tell
one value from another. Each study is de-identified under a random set of E.3 options with two keys, and the
checker's invariants must hold.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time
from io import BytesIO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage

from ingestd.deid.engine import DeidError, Labels, anonymize
from ingestd.deid.keyed import remap_uid
from ingestd.deid.profile import Override, PrivateKeep, Profile
from ingestd.deid.table import load_table
from tests import deid_oracle as oracle

KEY = b"\x11" * 32
OTHER_KEY = b"\x22" * 32
ROOT = "1.2.826.0.1.3680043.10.543"
LABELS = Labels(project="PROJ", subject="SUBJ01", session="SUBJ01_MR1")
PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,  # the same examples on every run and machine, whatever failed before
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
OPTIONS = sorted(set(oracle.OPTION_CODE) - {"clean-pixel-data", "clean-recognizable-visual-features"})
IDENTITY = frozenset(
    tag_for_keyword(k) or 0
    for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "PatientID")
) | {tag_for_keyword("PatientName") or 0, tag_for_keyword("SpecificCharacterSet") or 0}


def _tags_in(text: str) -> list[int]:
    keywords = text.split()
    tags = [tag_for_keyword(keyword) for keyword in keywords]
    assert None not in tags, keywords
    return [t for t in tags if t is not None]


LISTED = [t for t in sorted(oracle.SINGLE) if t >> 16 not in (0x0000, 0x0002) and t not in IDENTITY]
LISTED_LEAVES = [t for t in LISTED if oracle.vr_of(t) != "SQ"]
UNKNOWN = [t for t in LISTED if oracle.vr_of(t) == "UN"]  # the 2026c tags pydicom 3.0 does not know, and one UN VR
UNKNOWN += [0x00700FF0, 0x00440FF0, 0x00181FF0]  # tags no edition lists: unlisted UN elements
REPEATING = [0x50000010, 0x50003000, 0x60003000, 0x60004000, 0x60020010]  # curve and overlay groups
UNLISTED_LEAVES = _tags_in(
    """
    SliceThickness ImageType SeriesNumber Rows PixelSpacing WindowCenter ScanningSequence SecondaryReviewerName
    EvaluatorName ExpiryDate SecondaryReviewDate StudyUpdateDateTime ExpirationDateTime SecondaryReviewTime
    TimeOfGainCalibration MultiFrameSourceSOPInstanceUID ContextUID CodingSchemeUID ReferencedSOPClassUID
    RescaleIntercept EchoTime AcquisitionMatrix ImagePositionPatient ReferencedFrameNumber RetrieveURL ValueType
    LongCodeValue CodeMeaning CodeValue CodingSchemeDesignator RealWorldValueLUTData SpatialResolution
    """
)
UNLISTED_SEQUENCES = _tags_in(
    """
    ReferencedSeriesSequence ReferencedInstanceSequence DerivationCodeSequence AnatomicRegionSequence
    ConceptNameCodeSequence SharedFunctionalGroupsSequence DerivationImageSequence ReferencedSOPSequence
    """
)
LISTED_SEQUENCES = [t for t in LISTED if oracle.vr_of(t) == "SQ"]
assert not {*UNLISTED_LEAVES, *UNLISTED_SEQUENCES} & set(oracle.SINGLE)
assert len(UNKNOWN) >= 28 and all(oracle.vr_of(t) == "UN" for t in UNKNOWN)
PRIVATE_GROUPS = (0x0009, 0x0019, 0x0029)
CREATORS = ("ACME 1.0", "SIEMENS CSA HEADER", "GEMS_PARM_01", "QZ TEST")
# Kept under retain-safe-private: (creator, group, element byte); the draws hit them often.
SAFE = (PrivateKeep("ACME 1.0", 0x0019, 0x01, "numeric"), PrivateKeep("ACME 1.0", 0x0019, 0x02, "test"))
HOLD_OPTIONS = frozenset({"retain-longitudinal-modified-dates", "clean-descriptors", "clean-graphics"})

# ---------------------------------------------------------------------------------------------------------------
# Values, VR by VR.

_PRINTABLE = "".join(c for c in string.printable if c not in "\\\t\n\r\x0b\x0c")
_NON_ASCII = "äöüßéèñçøåÆŒœ中文日本한국Ωπ"
_LIMIT = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240, "UC": 1024, "UT": 1024}


def _text(max_size: int, utf8: bool, alphabet: str = _PRINTABLE) -> st.SearchStrategy[str]:
    letters = alphabet + (_NON_ASCII if utf8 else "")
    return st.text(st.sampled_from(letters), max_size=max_size)


def _person(utf8: bool) -> st.SearchStrategy[str]:
    part = _text(10, utf8, string.ascii_letters + " -'")
    group = st.lists(part, min_size=1, max_size=3).map("^".join)
    return st.lists(group, min_size=1, max_size=2).map("=".join).filter(lambda v: len(v) <= 60)


def _uid() -> st.SearchStrategy[str]:
    component = st.integers(0, 10**8).map(str)
    return st.lists(component, min_size=1, max_size=4).map(lambda parts: ".".join([ROOT, "9", *parts]))


_REGISTERED = ("1.2.840.10008.1.2.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.4.50")
_DATES = st.dates(date(1950, 1, 1), date(2030, 12, 31))


def _time_text(t: time, precision: int) -> str:
    text = f"{t:%H%M%S}"[: (2, 4, 6, 6)[precision]]
    return text + (f".{t.microsecond:06d}" if precision == 3 else "")


def _datetime_text(moment: datetime, precision: int, zone: int | None) -> str:
    text = f"{moment:%Y%m%d%H%M%S}"[: (8, 10, 12, 14, 14)[precision]]
    text += f".{moment.microsecond:06d}" if precision == 4 else ""
    return text + ("" if zone is None else f"{'+' if zone >= 0 else '-'}{abs(zone) // 60:02d}{abs(zone) % 60:02d}")


def _single(vr: str, utf8: bool) -> st.SearchStrategy[object]:  # noqa: PLR0911, PLR0912 - one branch per VR
    if vr == "AE":
        return _text(16, False).map(str.strip)
    if vr == "AS":
        return st.from_regex(r"[0-9]{3}[DWMY]", fullmatch=True)
    if vr == "CS":
        return _text(16, False, string.ascii_uppercase + string.digits + " _")
    if vr == "DA":
        return _DATES.map(lambda d: f"{d:%Y%m%d}")
    if vr == "DS":
        return st.one_of(st.integers(-99999, 99999).map(str), st.floats(-1e4, 1e4).map(lambda f: f"{f:.4f}"))
    if vr == "IS":
        return st.integers(-(2**31), 2**31 - 1).map(str)
    if vr == "DT":
        moments = st.datetimes(datetime(1950, 1, 1), datetime(2030, 12, 31))
        zones = st.none() | st.integers(-12 * 60, 14 * 60).map(lambda m: m - m % 15)
        return st.builds(_datetime_text, moments, st.integers(0, 4), zones)
    if vr == "TM":
        return st.builds(_time_text, st.times(), st.integers(0, 3))
    if vr == "PN":
        return _person(utf8)
    if vr in ("LO", "SH"):
        return _text(_LIMIT[vr] if not utf8 else 16, utf8)
    if vr in ("ST", "LT", "UT", "UC"):
        return _text(80, utf8)
    if vr == "UI":
        return st.one_of(_uid(), _uid(), st.sampled_from(_REGISTERED))
    if vr == "UR":
        return st.from_regex(r"http://example\.invalid/[a-z0-9]{0,12}", fullmatch=True)
    if vr in ("US", "UL", "UV"):
        return st.integers(0, {"US": 2**16, "UL": 2**32, "UV": 2**64}[vr] - 1)
    if vr in ("SS", "SL", "SV"):
        bits = {"SS": 15, "SL": 31, "SV": 63}[vr]
        return st.integers(-(2**bits), 2**bits - 1)
    if vr in ("FL", "FD"):
        return st.floats(-1e6, 1e6, width=32 if vr == "FL" else 64)
    if vr in ("OB", "OW", "UN"):
        return st.binary(max_size=24).map(lambda b: b + b"\x00" * (len(b) % 2))
    raise AssertionError(f"no strategy for VR {vr}")


_MULTI = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "PN", "SH", "TM", "UC", "UI"})


def _value(vr: str, utf8: bool) -> st.SearchStrategy[object]:
    one = _single(vr, utf8)
    if vr in _MULTI:
        return st.one_of(st.just(""), one, one, st.lists(one, min_size=2, max_size=3))
    if vr in ("US", "SS", "UL", "SL", "FL", "FD"):
        return st.one_of(st.none(), one, one, st.lists(one, min_size=2, max_size=3))
    return one


def _element(tag: int, utf8: bool) -> st.SearchStrategy[list[DataElement]]:
    vr = oracle.vr_of(tag)
    if tag >> 16 in (0x5000, 0x6000, 0x6002):
        vr = {0x0010: "US", 0x3000: "OB" if tag >> 16 == 0x5000 else "OW", 0x4000: "LT"}[tag & 0xFFFF]
    return _value(vr, utf8).map(lambda value: [DataElement(tag, vr, value)])


_PRIVATE_VRS = ("LO", "SH", "DS", "US", "UL", "FD", "OB", "UN", "UI", "PN", "SQ")


@st.composite
def _private_block(draw: st.DrawFn, utf8: bool) -> list[DataElement]:
    group = draw(st.sampled_from(PRIVATE_GROUPS))
    slot = draw(st.sampled_from((0x10, 0x11)))
    out = [DataElement((group << 16) | slot, "LO", draw(st.sampled_from(CREATORS)))]
    for offset in draw(st.sets(st.integers(1, 4), max_size=3)):
        tag = (group << 16) | (slot << 8) | offset
        vr = draw(st.sampled_from(_PRIVATE_VRS))
        if vr == "SQ":  # a private sequence with a person name and a UID inside
            item = Dataset()
            item.PatientName = draw(_person(utf8))
            item.ReferencedSOPInstanceUID = draw(_uid())
            out.append(DataElement(tag, "SQ", Sequence([item])))
        else:
            out.append(DataElement(tag, vr, draw(_single(vr, utf8))))
    if draw(st.booleans()):  # an element outside any block
        out.append(DataElement((group << 16) | 0x0001, "LO", "QZ"))
    return out


def _leaves(utf8: bool) -> st.SearchStrategy[list[DataElement]]:
    return st.one_of(
        st.sampled_from(LISTED_LEAVES).flatmap(lambda t: _element(t, utf8)),
        st.sampled_from(LISTED_LEAVES).flatmap(lambda t: _element(t, utf8)),
        st.sampled_from(UNLISTED_LEAVES).flatmap(lambda t: _element(t, utf8)),
        st.sampled_from(UNKNOWN).flatmap(lambda t: _element(t, utf8)),
        st.sampled_from(REPEATING).flatmap(lambda t: _element(t, utf8)),
        _private_block(utf8),
    )


def _to_dataset(elements: list[DataElement]) -> Dataset:
    ds = Dataset()
    for elem in elements:
        if elem.tag not in ds:
            ds.add(elem)
    return ds


def _items(utf8: bool) -> st.SearchStrategy[list[DataElement]]:
    leaves = _leaves(utf8)

    def flatten(groups: list[list[DataElement]]) -> list[DataElement]:
        return [elem for group in groups for elem in group]

    def extend(children: st.SearchStrategy[list[DataElement]]) -> st.SearchStrategy[list[DataElement]]:
        sequence = st.tuples(
            st.sampled_from(LISTED_SEQUENCES) | st.sampled_from(UNLISTED_SEQUENCES),
            st.lists(children, max_size=2),
        ).map(lambda pair: [[DataElement(pair[0], "SQ", Sequence([_to_dataset(item) for item in pair[1]]))]])
        return st.lists(st.one_of(leaves.map(lambda x: [x]), sequence), min_size=1, max_size=6).map(
            lambda groups: flatten([elem for group in groups for elem in group])
        )

    return st.recursive(st.lists(leaves, min_size=1, max_size=6).map(flatten), extend, max_leaves=16)


DATES = [t for t in LISTED_LEAVES if oracle.vr_of(t) in ("DA", "DT", "TM")] + [
    t for t in UNLISTED_LEAVES if oracle.vr_of(t) in ("DA", "DT", "TM")
]


def _dates(utf8: bool) -> st.SearchStrategy[list[DataElement]]:
    """A few dates and times at the top level and one item down, so the date invariants always have material."""
    one = st.sampled_from(DATES).flatmap(lambda t: _element(t, utf8))
    nested = st.lists(one, min_size=1, max_size=2).map(
        lambda groups: [DataElement(0x00081115, "SQ", Sequence([_to_dataset([e for g in groups for e in g])]))]
    )
    return st.lists(st.one_of(one, one, nested), min_size=1, max_size=4).map(lambda gs: [e for g in gs for e in g])


# ---------------------------------------------------------------------------------------------------------------
# Studies.


def _ref(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


@st.composite
def studies(draw: st.DrawFn) -> list[Dataset]:
    utf8 = draw(st.booleans())
    count = draw(st.integers(1, 3))
    patient_id = draw(st.one_of(st.none(), _text(12, False, string.ascii_uppercase + string.digits).filter(bool)))
    patient_name = draw(st.one_of(st.none(), _person(utf8)))
    series = [f"{ROOT}.2.{n}" for n in range(draw(st.integers(1, 2)))]
    instances: list[Dataset] = []
    for number in range(count):
        ds = _to_dataset(draw(_dates(utf8)) + draw(_items(utf8)))
        sop_class = draw(st.sampled_from([CTImageStorage, MRImageStorage, f"{ROOT}.8.1"]))  # the last: private
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{ROOT}.4.{number}")
        ds.file_meta.SourceApplicationEntityTitle = "QZSOURCE"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = f"{ROOT}.4.{number}"
        ds.StudyInstanceUID = f"{ROOT}.1"
        ds.SeriesInstanceUID = draw(st.sampled_from(series))
        ds.FrameOfReferenceUID = f"{ROOT}.3"
        ds.Modality = "MR" if sop_class == MRImageStorage else "CT"
        if utf8:
            ds.SpecificCharacterSet = "ISO_IR 192"
        if patient_id is not None:
            ds.PatientID = patient_id
        if patient_name is not None:
            ds.PatientName = patient_name
        if len(instances) > 0 and draw(st.booleans()):  # references to earlier instances, top level and nested
            targets = draw(st.lists(st.sampled_from(instances), min_size=1, max_size=2))
            kind = draw(st.sampled_from(("ReferencedImageSequence", "SourceImageSequence", "nested")))
            if kind == "nested":
                inner = Dataset()
                inner.SeriesInstanceUID = targets[0].SeriesInstanceUID
                inner.ReferencedInstanceSequence = Sequence([_ref(t) for t in targets])
                ds.ReferencedSeriesSequence = Sequence([inner])
            else:
                setattr(ds, kind, Sequence([_ref(t) for t in targets]))
        instances.append(ds)
    _tokenize(instances)
    return instances


_TOKENIZED = frozenset({"AE", "CS", "SH", "LO", "ST", "LT", "UT", "UC", "PN", "UR", "OB", "OW", "UN"})
TOKEN = re.compile(r"QZ[0-9]{3}Q")


def _tokenize(instances: list[Dataset]) -> None:
    """Give every non-empty text or binary value a unique token (QZnnnQ) at its start, within its VR's limit."""
    counter = iter(range(1000))
    shared: dict[str, str] = {}  # the patient's values are one value, shared by every instance

    def mark(vr: str, value: object) -> object:
        if isinstance(value, bytes):
            marker = f"QZ{next(counter):03d}Q".encode()
            return marker + value if value else value
        text = str(value)
        if not text.strip() or vr not in _TOKENIZED:
            return value
        if text in shared:
            return shared[text]
        token = f"QZ{next(counter):03d}Q"
        if vr == "UR":
            new = text.replace("example.invalid/", f"example.invalid/{token}")
        else:
            new = (token + text)[: _LIMIT.get(vr, 64)]
        if vr in ("PN", "LO"):
            shared[text] = new
        return new

    def visit(ds: Dataset) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
            elif elem.VR in _TOKENIZED and elem.value not in (None, "", b""):
                if (elem.tag & 0xFFFF <= 0xFF and (elem.tag >> 16) % 2) or elem.tag in (0x00080005, 0x00080060):
                    continue  # private creators (a block's identity), Specific Character Set and Modality
                if isinstance(elem.value, list | MultiValue):
                    elem.value = [mark(elem.VR, v) for v in elem.value]
                else:
                    elem.value = mark(elem.VR, elem.value)

    for ds in instances:
        visit(ds)


# ---------------------------------------------------------------------------------------------------------------
# The properties.


def _through_file(ds: Dataset, syntax: str) -> Dataset:
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return dcmread(BytesIO(oracle.to_bytes(ds)))


@dataclass
class Run:
    profile: Profile
    expect: oracle.Expectation
    outs: list[Dataset] | None
    error: DeidError | None


def _profile(options: frozenset[str], keep: frozenset[int], replace_name: bool, key: bytes = KEY) -> Profile:
    overrides = {tag: Override(tag=tag, action="keep", justification="test") for tag in keep}
    if replace_name:
        overrides[0x00100010] = Override(tag=0x00100010, action="replace", value="{subject}")
    return Profile(name="property", key=key, options=options, overrides=overrides, private_keep=SAFE)


def _run(study: list[Dataset], profile: Profile) -> Run:
    expect = oracle.Expectation(
        options=profile.options,
        keep=frozenset(t for t, o in profile.overrides.items() if o.action == "keep"),
        overridden=frozenset(t for t, o in profile.overrides.items() if o.action != "keep"),
        private_keep=frozenset((k.creator, k.group, k.element) for k in profile.private_keep),
        date_shift_days=profile.date_shift_days,
    )
    try:
        return Run(profile, expect, [anonymize(ds, profile, LABELS) for ds in study], None)
    except DeidError as exc:
        return Run(profile, expect, None, exc)


def _held_legitimately(study: list[Dataset], run: Run) -> bool:
    """The one hold these inputs may cause: an option cleans (C) a binary (OB/OW) attribute, which the engine
    cannot clean, so it holds the instance rather than keep or drop it silently."""
    assert run.error is not None
    reason = run.error.reason
    found = re.search(r"\(([0-9A-F]{4}),([0-9A-F]{4})\) \(VR (OB|OW)\) cannot be cleaned", reason)
    if found is None or not run.profile.options & HOLD_OPTIONS:
        return False
    tag = int(found.group(1) + found.group(2), 16)
    return any(node.tag == tag for ds in study for node in oracle.walk(ds, ds))


PRESETS: tuple[frozenset[str], ...] = (
    frozenset(),
    frozenset({"retain-longitudinal-modified-dates"}),
    frozenset({"retain-longitudinal-full-dates"}),
    frozenset({"retain-uids"}),
    frozenset({"retain-longitudinal-modified-dates", "retain-patient-characteristics", "retain-device-identity",
               "clean-descriptors", "retain-safe-private"}),
)  # fmt: skip
options_strategy = st.one_of(st.sampled_from(PRESETS), st.frozensets(st.sampled_from(OPTIONS), max_size=5))
keep_strategy = st.frozensets(st.sampled_from(LISTED_LEAVES), max_size=2)


@pytest.mark.filterwarnings("ignore:VR lookup failed:UserWarning")  # implicit VR: unknown tags read as UN
@pytest.mark.filterwarnings("ignore:The value length")  # pydicom reads a padded 16-char last SH value as 17 long
@settings(PROPERTY_SETTINGS, max_examples=200)
@given(
    study=studies(),
    options=options_strategy,
    keep=keep_strategy,
    replace_name=st.booleans(),
    via=st.sampled_from([None, ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
)
def test_invariants_hold(
    study: list[Dataset], options: frozenset[str], keep: frozenset[int], replace_name: bool, via: str | None
) -> None:
    if via is not None:  # as the daemon sees it: read from a file (raw elements; implicit VR: private data as UN)
        study = [_through_file(ds, via) for ds in study]
    for ds in study:  # pydicom converts raw elements (stripping padding) when first read: do it before the snapshot
        list(oracle.walk(ds, ds))
    before = [oracle.to_bytes(ds) for ds in study]
    run = _run(study, _profile(options, keep, replace_name))
    assert [oracle.to_bytes(ds) for ds in study] == before, "the input was modified"
    if run.error is not None:
        assert _held_legitimately(study, run), f"unexpected hold: {run.error.code}: {run.error.reason}"
        return
    assert run.outs is not None
    expect = run.expect
    uids = oracle.original_uids(study)
    problems: list[str] = []
    for orig, out in zip(study, run.outs, strict=True):
        data = oracle.to_bytes(out)
        problems += oracle.check_instance(orig, out, expect, uids, data)
        # Canary (5): the token of every removed or replaced value is gone from the file and its name.
        tokens = {t for secret in oracle.secrets(orig, out, expect) for t in TOKEN.findall(secret)}
        leaked = sorted(t for t in tokens if t.encode() in data or t in str(out.SOPInstanceUID))
        problems += [f"token {t} of a removed value is in the output" for t in leaked]
        if replace_name:
            for node in oracle.walk(None, out):
                if node.tag == 0x00100010 and node.out is not None and node.out.value:
                    assert str(node.out.value) == LABELS.subject
    problems += oracle.check_study(study, run.outs, expect)
    assert problems == []
    # Determinism (16) and unlinkability (13).
    again = _run(study, run.profile)
    assert again.outs is not None
    assert [oracle.to_bytes(ds) for ds in again.outs] == [oracle.to_bytes(ds) for ds in run.outs]
    other = _run(study, _profile(options, keep, replace_name, OTHER_KEY))
    assert other.outs is not None
    assert oracle.check_unlinkable(study, run.outs, other.outs, expect) == []


@PROPERTY_SETTINGS
@given(study=studies(), split=st.integers(0, 2))
def test_one_study_in_two_runs_is_one_mapping(study: list[Dataset], split: int) -> None:
    """(9)-(11): the instances of one study de-identified in two separate batches map UIDs exactly like one batch."""
    profile = _profile(frozenset(), frozenset(), replace_name=False)
    first, second = _run(study[:split], profile), _run(study[split:], profile)
    assert first.outs is not None and second.outs is not None
    outs = first.outs + second.outs
    assert oracle.check_study(study, outs, first.expect) == []
    together = _run(study, profile)
    assert together.outs is not None
    assert [oracle.to_bytes(ds) for ds in together.outs] == [oracle.to_bytes(ds) for ds in outs]


_BAD_DATES = st.sampled_from(["20230231", "20230101-20230202", "19990229"])


@PROPERTY_SETTINGS
@given(study=studies(), bad=_BAD_DATES, depth=st.integers(0, 2), vr=st.sampled_from(["DA", "DT"]))
def test_bad_date_under_modified_dates_holds(study: list[Dataset], bad: str, depth: int, vr: str) -> None:
    """(17): a date that cannot be shifted holds the instance, whatever depth it is at; nothing is returned."""
    target = study[-1]
    holder = target
    for _ in range(depth):
        item = Dataset()
        holder.add(DataElement(0x00081115, "SQ", Sequence([item])))
        holder = item
    tag = 0x00080021 if vr == "DA" else 0x0008002A  # Series Date (X/D) or Acquisition DateTime (X/Z/D)
    holder.add(DataElement(tag, vr, bad))
    profile = _profile(frozenset({"retain-longitudinal-modified-dates"}), frozenset(), replace_name=False)
    run = _run([target], profile)
    assert run.outs is None and run.error is not None
    if run.error.code != "date":
        assert _held_legitimately([target], run), run.error.reason
        return
    assert bad not in run.error.reason
    assert f"({tag >> 16:04X},{tag & 0xFFFF:04X})" in run.error.reason


def _check_function(function: Callable[[str], str], values: list[str]) -> None:
    mapped = [function(v) for v in values]
    assert len(set(mapped)) == len(set(values))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(_uid(), min_size=2, max_size=20, unique=True))
def test_uid_remap_is_injective_and_valid(values: list[str]) -> None:
    _check_function(lambda v: remap_uid(KEY, v), values)
    for value in values:
        assert oracle.valid_new_uid(remap_uid(KEY, value))
        assert remap_uid(KEY, value) != remap_uid(OTHER_KEY, value)


def test_table_covers_the_oracle_table() -> None:
    """(18): ingestd's shipped table lists every tag of the pinned oracle table with the same Basic Profile code."""
    table = load_table("2026c")
    differ = {
        f"{tag:08X}": (code, entry.basic if entry else None)
        for tag, code in oracle.SINGLE.items()
        if (entry := table.lookup(tag)) is None or entry.basic != code
    }
    assert differ == {}
    for group, element, _, element_mask, code in oracle.MASKED:
        for high in (0x00, 0x02, 0x1E):
            tag = ((group | high) << 16) | (element if element_mask else 0x0123)
            entry = table.lookup(tag)
            assert entry is not None and entry.basic == code, f"{tag:08X}"
    assert table.lookup(0x60020010) is None  # Overlay Rows: the groups list only 60xx,3000 and 60xx,4000
