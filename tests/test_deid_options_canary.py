"""A canary per E.3 option: what each option (alone and in the usual combinations) lets survive, judged by the
2024b option columns that tests/deid_oracle.py reads from the published innolitics file, never by ingestd's table.

A distinct token goes into every attribute of Table E.1-1 (2026c) that has a VR a token can live in, once at the
top level and once inside an item of a sequence the table does not list; sequences get an item whose Code Value
is the token; the repeating groups (a curve, an overlay and its comment) and two private blocks (one with an
element the profile lists as safe) get theirs. Dates, times and numbers carry distinct values and are judged at
their place only (a shifted date or a 39-digit UID may contain them by chance). After de-identification, in
memory and through the writing path (`open_instance` / `write_instance`):

- an attribute an enabled option keeps (K) is there, unchanged, at its tag;
- one it cleans (C) is there and differs (dates) or is cleaned (text loses the patient's identifiers; a time and
  the token itself may stay, as ingestd's `_clean` keeps them); a binary value is removed or changed, or the
  instance is held with a reason naming the attribute (ingestd cannot clean bytes), and the rest is checked
  without those values;
- where no enabled option has an entry, the Basic Profile holds (X absent, Z empty, D-family never the original,
  U a new UID; X/Z, X/D and X/Z/D absent or the value their Type asks for);
- no token is anywhere in the written bytes or in the `changes` after-values unless the oracle lets it survive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

from ingestd.deid.engine import Change, DeidError, Labels, anonymize
from ingestd.deid.profile import PrivateKeep, Profile
from ingestd.deid.stream import open_instance, write_instance
from ingestd.deid.table import SUPPORTED_OPTIONS, load_table
from tests import deid_oracle as oracle

KEY = bytes(range(7, 39))
ROOT = "1.2.826.0.1.3680043.10.544"  # a made-up organisation root for every planted UID
CARRIER = 0x00081115  # Referenced Series Sequence: not in Table E.1-1, so its item goes through the profile
SAFE_CREATOR, VENDOR_CREATOR = "CANARY SAFE BLOCK", "CANARY VENDOR BLOCK"
SAFE_KEEP = PrivateKeep(SAFE_CREATOR, 0x0029, 0x01, "canary: the one safe-listed element")
LABELS = Labels(project="P", subject="S", session="E")

RETAIN = frozenset(option for option in SUPPORTED_OPTIONS if option.startswith("retain-"))
COMBINATIONS: dict[str, frozenset[str]] = {
    **{option: frozenset({option}) for option in sorted(SUPPORTED_OPTIONS)},
    "basic": frozenset(),
    "all-retain": RETAIN,
    "uids+full-dates": frozenset({"retain-uids", "retain-longitudinal-full-dates"}),
    "modified-dates+patient+device": frozenset(
        {"retain-longitudinal-modified-dates", "retain-patient-characteristics", "retain-device-identity"}
    ),
    "all-clean": frozenset({"clean-descriptors", "clean-structured-content", "clean-graphics"}),
    "all": frozenset(SUPPORTED_OPTIONS),
}

_TEXT = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_ROOMY = frozenset({"LO", "LT", "ST", "UT", "UC"})  # room for the token and the patient's ID
_DATES = frozenset({"DA", "DT", "TM"})
_NUMBERS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
_Z_OR_GONE = frozenset({"X", "Z", "X/Z"})  # sequences: never kept with their items


@dataclass(frozen=True)
class Site:
    """One planted element: where (`nested`: in the carrier's item), its tag, VR and value, and its token."""

    tag: int
    vr: str
    value: object
    token: str | None  # searched for in bytes; None for dates, times and numbers (judged at their place)
    nested: bool
    private: bool = False

    @property
    def where(self) -> str:
        return ("carrier item / " if self.nested else "") + f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X}) {self.vr}"


class Planter:
    def __init__(self, clean: frozenset[int]) -> None:
        self.n = 0
        self.sites: list[Site] = []
        self.clean = clean  # tags whose text value also names the patient (the options clean them)
        self.patient_id = self._token()

    def _token(self) -> str:
        self.n += 1
        return f"TK{self.n:05d}Q"  # fixed width: no token is part of another; even length for binary values

    def value(self, tag: int, vr: str) -> tuple[object, str | None]:  # noqa: PLR0911 - one return per VR family
        token = self._token()
        n = self.n
        day = date(1950, 1, 1) + timedelta(days=n)
        if vr == "DA":
            return f"{day:%Y%m%d}", None
        if vr == "DT":
            return f"{day:%Y%m%d}120000.{n:06d}", None
        if vr == "TM":
            return f"1{n % 10}{n // 10 % 60:02d}{n % 60:02d}.{n:06d}", None
        if vr == "UI":
            uid = f"{ROOT}.{100000 + n}"
            return uid, uid
        if vr in _NUMBERS:
            return (n + 0.5 if vr in ("FL", "FD") else n), None
        if vr == "AS":
            return f"{n % 1000:03d}D", None
        if vr == "DS":
            return f"8{n:05d}.5", None
        if vr == "IS":
            return f"8{n:05d}", None
        if vr in oracle.BINARY_VRS:
            return token.encode("ascii"), token
        if vr == "UR":
            return f"http://canary.invalid/{token}", token
        if vr in _ROOMY and tag in self.clean:
            return f"{token} {self.patient_id}", token
        return token, token

    def plant(self, ds: Dataset, tag: int, vr: str, *, nested: bool, private: bool = False) -> None:
        if vr == "SQ":
            item = Dataset()
            code_value = self._token()
            item.CodeValue = code_value
            ds.add(DataElement(tag, "SQ", Sequence([item])))
            self.sites.append(Site(tag, vr, code_value, code_value, nested, private))
            return
        value, token = (self.patient_id, self.patient_id) if tag == 0x00100020 else self.value(tag, vr)
        ds.add(DataElement(tag, vr, value))
        self.sites.append(Site(tag, vr, value, token, nested, private))


def _vr(tag: int) -> str:
    return oracle.vr_of(tag).split(" or ")[0]


def _table_tags() -> list[int]:
    """Every concrete tag of Table E.1-1 2026c that a stored data set can hold (no command or file meta group)."""
    return sorted(tag for tag in oracle.SINGLE if tag >> 16 not in (0x0000, 0x0002))


REPEATING = ((0x50000022, "LO"), (0x50003000, "OB"), (0x60003000, "OW"), (0x60024000, "LT"))


def uncleanable(options: frozenset[str]) -> frozenset[int]:
    """Tags a planted instance holds with a binary value (not UN) that an enabled option cleans (C)."""
    tags = [*_table_tags(), *(tag for tag, _ in REPEATING)]
    return frozenset(
        tag for tag in tags if oracle.option_code(tag, options) == "C" and _vr_at(tag) in oracle.BINARY_VRS - {"UN"}
    )


def _vr_at(tag: int) -> str:
    return dict(REPEATING).get(tag) or _vr(tag)


def build(options: frozenset[str], skip: frozenset[int] = frozenset()) -> tuple[Dataset, Planter]:
    """The planted instance; text the options clean also carries the patient's ID."""
    clean = frozenset(tag for tag in oracle.SINGLE if oracle.option_code(tag, options) == "C")
    planter = Planter(clean)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    carrier_item = Dataset()
    for tag in _table_tags():
        if tag in skip:
            continue
        vr = _vr(tag)
        planter.plant(ds, tag, vr, nested=False)
        planter.plant(carrier_item, tag, vr, nested=True)
    for tag, vr in REPEATING:
        if tag not in skip:
            planter.plant(ds, tag, vr, nested=False)
    for target, nested in ((ds, False), (carrier_item, True)):
        target.add_new(0x00090010, "LO", VENDOR_CREATOR)
        for element, vr in ((0x1001, "LO"), (0x1002, "PN"), (0x1003, "OB"), (0x1004, "UI"), (0x1005, "SQ")):
            planter.plant(target, 0x00090000 | element, vr, nested=nested, private=True)
        target.add_new(0x00290010, "LO", SAFE_CREATOR)
        planter.plant(target, 0x00291001, "LO", nested=nested, private=True)  # safe-listed
        planter.plant(target, 0x00291002, "LO", nested=nested, private=True)  # same block, not listed
    ds.add(DataElement(CARRIER, "SQ", Sequence([carrier_item])))
    ds.file_meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID))
    return ds, planter


# ---------------------------------------------------------------------------------------------------------------
# The oracle's judgement of one site.


def _at(out: Dataset, site: Site) -> DataElement | None:
    where = out
    if site.nested:
        carrier = out.get(CARRIER)
        if carrier is None or not carrier.value:
            return None
        where = carrier.value[0]
    return where.get(site.tag)


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\x00 ")
    if isinstance(value, list | MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip(" \x00")


def _same(elem: DataElement, site: Site) -> bool:
    if site.vr == "SQ":
        return bool(elem.value) and _text(elem.value[0].get("CodeValue", "")) == site.value
    if site.vr in ("FL", "FD", "DS"):
        return float(elem.value) == float(str(site.value))
    if site.vr == "IS" or site.vr in _NUMBERS:
        return int(elem.value) == int(str(site.value))
    return _text(elem.value) == _text(site.value)


def _empty(elem: DataElement) -> bool:
    return not elem.value if elem.VR == "SQ" else _text(elem.value) == ""


@dataclass(frozen=True)
class Verdict:
    survives: bool  # the token may be found in the output
    problem: str | None


def judge(site: Site, elem: DataElement | None, options: frozenset[str], patient_id: str) -> Verdict:  # noqa: PLR0911, PLR0912
    """What the 2024b columns (via `oracle.option_code`) and the 2026c Basic Profile allow at this site."""
    if site.private:
        safe = "retain-safe-private" in options and oracle.PRIVATE_COLUMN.get("retain-safe-private") in ("K", "C")
        listed = (site.tag >> 16, site.tag & 0xFF) == (SAFE_KEEP.group, SAFE_KEEP.element)
        if safe and listed:
            ok = elem is not None and _same(elem, site)
            return Verdict(True, None if ok else "a safe-listed private element was not kept unchanged")
        return Verdict(False, None if elem is None else "a private element survived")
    code = oracle.option_code(site.tag, options)
    if code == "K":
        ok = elem is not None and _same(elem, site)
        return Verdict(True, None if ok else "kept (K) by an enabled option, but missing or changed")
    if code == "C":
        if site.vr in oracle.BINARY_VRS:  # ingestd cannot clean bytes: removed or changed, never kept as it was
            ok = elem is None or not _same(elem, site)
            return Verdict(False, None if ok else "cleaned (C) binary value kept unchanged")
        if elem is None:
            return Verdict(False, "cleaned (C) by an enabled option, but missing")
        if site.vr in ("DA", "DT") and _same(elem, site):
            return Verdict(False, "cleaned (C) date kept its original value")
        if site.vr in _TEXT and patient_id in _text(elem.value):
            return Verdict(True, "cleaned (C) text still names the patient")
        return Verdict(True, None)
    basic = oracle.basic_code(site.tag)
    if elem is None:
        return Verdict(False, None if basic != "U" or site.vr != "UI" else "U attribute removed")
    if basic == "X" and site.tag in oracle.X_REQUIRED_SOMEWHERE:  # an IOD may require it: emptied or a dummy
        basic = "X/Z" if site.vr == "SQ" else "X/Z/D"
    if basic == "X":
        return Verdict(False, "X attribute present")
    if site.vr == "SQ":
        if basic in _Z_OR_GONE:
            return Verdict(False, None if _empty(elem) else f"{basic} sequence kept its items")
        return Verdict(True, None)  # D-family, U*: kept with its items processed by the profile (or emptied)
    if basic == "U":
        new = _text(elem.value)
        ok = oracle.valid_new_uid(new) and new != site.value
        return Verdict(False, None if ok else "U attribute not replaced by a new UID")
    if _empty(elem):
        return Verdict(False, None)
    if basic == "Z":
        return Verdict(False, "Z attribute not empty")
    if _same(elem, site):
        return Verdict(False, f"{basic} attribute kept its original value")
    return Verdict(False, None)


def _after_values(changes: Iterable[Change]) -> str:
    return "\n".join(change.after for change in changes)


def check(out: Dataset, planter: Planter, options: frozenset[str], *blobs: bytes | str) -> list[str]:
    """Every site judged at its place, then every token the oracle does not let survive searched for in `blobs`."""
    problems: list[str] = []
    may_survive: set[str] = set()
    for site in planter.sites:
        verdict = judge(site, _at(out, site), options, planter.patient_id)
        if verdict.problem:
            problems.append(f"{site.where}: {verdict.problem}")
        if verdict.survives and site.token:
            may_survive.add(site.token)
    must_go = {site.token for site in planter.sites if site.token} - may_survive
    must_go |= {planter.patient_id, VENDOR_CREATOR}
    if "retain-safe-private" not in options:
        must_go.add(SAFE_CREATOR)
    problems += [f"token {token} survived" for token in oracle.leaked_secrets(must_go, *blobs)]
    return problems


def _profile(options: frozenset[str]) -> Profile:
    return Profile(name="canary", key=KEY, options=options, private_keep=(SAFE_KEEP,))


def _deidentify(ds: Dataset, options: frozenset[str]) -> tuple[Dataset, list[Change]]:
    changes: list[Change] = []
    return anonymize(ds, _profile(options), LABELS, changes), changes


def _planted_and_deidentified(options: frozenset[str]) -> tuple[Dataset, Planter, Dataset, list[Change]]:
    """Everything planted; if the engine holds the instance, only for a binary value an option cleans (the reason
    names it, and no value), and then everything but those binary values."""
    ds, planter = build(options)
    try:
        out, changes = _deidentify(ds, options)
    except DeidError as caught:
        held = uncleanable(options)
        reason = caught.reason
        assert any(f"({tag >> 16:04X},{tag & 0xFFFF:04X})" in reason for tag in held), reason
        assert re.search(r"TK\d{5}Q", reason) is None
        assert ROOT not in reason
        ds, planter = build(options, skip=held)
        out, changes = _deidentify(ds, options)
    return ds, planter, out, changes


# ---------------------------------------------------------------------------------------------------------------
# The tests.


def test_the_oracle_reads_the_published_2024b_columns() -> None:
    """The counts per column of the vendored file (README's table) and the rows the README names."""
    counts = {option: 0 for option in SUPPORTED_OPTIONS}
    for columns in oracle.OPTION_COLUMNS.values():
        for option in columns:
            counts[option] += 1
    assert counts == {
        "retain-longitudinal-full-dates": 165,
        "retain-longitudinal-modified-dates": 165,
        "retain-uids": 59,
        "clean-descriptors": 125,
        "retain-device-identity": 57,
        "retain-patient-characteristics": 13,
        "retain-institution-identity": 10,
        "clean-structured-content": 3,
        "clean-graphics": 1,  # plus the three repeating-group rows
        "retain-safe-private": 0,  # the private-attributes row only
    }
    assert oracle.PRIVATE_COLUMN == {"retain-safe-private": "C"}
    assert oracle.columns_of(0x60023000) == {"clean-graphics": "C"}  # 60xx,3000 by mask
    assert oracle.columns_of(0x00081120) == {"retain-uids": "K"}  # Referenced Patient Sequence
    assert oracle.columns_of(0x00100030) == {}  # Patient's Birth Date: no option keeps it
    assert oracle.columns_of(0x300A0054) == {"retain-uids": "K"}  # 2026c-only U row: derived (E.3.9)
    assert oracle.option_code(0x00181200, {"retain-device-identity"}) == "K"
    assert oracle.option_code(0x00181200, {"retain-device-identity", "retain-longitudinal-modified-dates"}) == "C"


def test_ingestd_table_agrees_with_the_oracle_for_every_option_set() -> None:
    """Row by row: ingestd's effective code keeps (K) or cleans (C) exactly where the 2024b columns do, for each
    option alone and each combination; elsewhere it is the Basic Profile code."""
    table = load_table()
    differ = []
    for name, options in COMBINATIONS.items():
        for tag in sorted(oracle.SINGLE):
            entry = table.lookup(tag)
            assert entry is not None
            want = oracle.option_code(tag, options) or oracle.SINGLE[tag]
            if entry.code(options) != want:
                differ.append(
                    f"{name}: ({tag >> 16:04X},{tag & 0xFFFF:04X}) ingestd {entry.code(options)}, 2024b {want}"
                )
        for value, _, entry in table.groups:
            want = oracle.option_code(value, options) or oracle.basic_code(value) or "?"
            if entry.code(options) != want:
                differ.append(f"{name}: group {value:08X} ingestd {entry.code(options)}, 2024b {want}")
        private = "C" if "retain-safe-private" in options else "X"
        assert table.private.code(options) == private
    assert differ == []


@pytest.mark.parametrize("options", list(COMBINATIONS.values()), ids=list(COMBINATIONS))
def test_option_canary(options: frozenset[str], tmp_path: Path) -> None:
    ds, planter, out, changes = _planted_and_deidentified(options)
    data = oracle.to_bytes(out)
    assert check(out, planter, options, data, _after_values(changes)) == []
    # The generic checker agrees (per-attribute codes at any depth, UIDs, private elements, file meta, VRs).
    expect = oracle.Expectation(options=options, private_keep=frozenset({(SAFE_CREATOR, 0x0029, 0x01)}))
    assert oracle.check_instance(ds, out, expect, data=data) == []
    assert oracle.leaked_secrets(oracle.secrets(ds, out, expect), data) == []
    # The writing path: the planted file read as the daemon reads it, written as the daemon writes it.
    source, target = tmp_path / "in.dcm", tmp_path / "out.dcm"
    ds.save_as(source, enforce_file_format=True)
    written_changes: list[Change] = []
    with open_instance(source, tmp_path) as instance:
        written = write_instance(anonymize(instance.dataset, _profile(options), LABELS, written_changes), target)
    blob = target.read_bytes()
    assert written == len(blob)
    assert check(dcmread(target), planter, options, blob, _after_values(written_changes)) == []
    # The canary is not vacuous: every enabled option keeps or cleans something that was planted.
    judged = {site.tag for site in planter.sites if not site.private and oracle.option_code(site.tag, options)}
    for option in options - {"retain-safe-private"}:
        assert any(option in oracle.columns_of(tag) for tag in judged), option
    if "retain-safe-private" in options:
        assert out[0x00291001].value == ds[0x00291001].value


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.frozensets(st.sampled_from(sorted(SUPPORTED_OPTIONS))))
def test_option_canary_any_subset(options: frozenset[str]) -> None:
    _, planter, out, changes = _planted_and_deidentified(options)
    assert check(out, planter, options, oracle.to_bytes(out), _after_values(changes)) == []
