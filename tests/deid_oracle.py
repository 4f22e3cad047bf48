"""An independent checker for de-identified DICOM: PS3.15 Table E.1-1 (2026c) and the invariants of deid.md §6.2.

Independent of ingestd's own table: Table E.1-1 comes from dicom-anonymizer's ``dicomfields_2026c`` (pinned test
dependency, produced by a different parser), and the E.3 option columns from the innolitics 2024b file as published
(tools/deid/innolitics-confidentiality-2024b-7f4749d.json, pinned by its sha256), parsed here. Nothing here imports
``ingestd``: the option columns are read from the published bytes, never from ingestd's generated JSON.

The checks take an original data set and its de-identified counterpart and walk both in parallel (sequence items
are paired by index), so "differs from the original" always compares the same attribute at the same place.
Every check returns a list of problems (empty when all is well) so a failing test shows all of them at once.

Invariants checked (numbers as in deid.md §6.2):
  1-3   per-attribute codes at any depth (`check_instance`); X never survives, Z/D-family values are absent,
        empty or changed; plus ingestd's always-on sweeps (§5.4): unlisted PN emptied, unlisted dates removed
        without a date option, no UN element survives.
  4, 12 UIDs (`check_instance`): each is a registered standard UID, a structural attribute's unchanged value, or a
        2.25 UUID-derived UID that differs from every original UID.
  5     canary (`leaked_secrets`): no original string of a removed/replaced attribute in the output bytes.
  6     private elements (`check_instance`).
  7, 8  file meta and the de-identification attributes (`check_instance`).
  9-11  UID mapping is a function, injective, and references resolve (`check_study`).
  13    unlinkability between two keys (`check_unlinkable`).
  14    dates under the modified-dates option (`check_study`).
  19    output written with enforce_file_format, re-read by pydicom, values valid for their VR (`check_instance`).
Determinism (16) and fail-closed behaviour (17) are properties of a call, checked by the tests themselves.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from io import BytesIO
from pathlib import Path

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _oracle_table
from pydicom import config as pydicom_config
from pydicom import dcmread, dcmwrite
from pydicom._uid_dict import UID_dictionary  # pydicom.uid uses it without re-exporting it
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

__all__ = [
    "BINARY_VRS",
    "MASKED",
    "OPTION_CODE",
    "OPTION_COLUMNS",
    "PRIVATE_COLUMN",
    "SINGLE",
    "X_REQUIRED_SOMEWHERE",
    "Expectation",
    "basic_code",
    "check_instance",
    "check_study",
    "check_unlinkable",
    "columns_of",
    "leaked_secrets",
    "option_code",
    "secrets",
    "text_values",
    "to_bytes",
    "vr_of",
]

# ---------------------------------------------------------------------------------------------------------------
# Table E.1-1, 2026c, from dicom-anonymizer 2.1.0 (the loader sketch of deid.md §2).

_CODE = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
SINGLE: dict[int, str] = {
    (g << 16) | e: code for name, code in _CODE.items() for (g, e, *mask) in getattr(_oracle_table, name) if not mask
}
# (group, element, group mask, element mask, code): 50xx,xxxx; 60xx,3000; 60xx,4000
MASKED: list[tuple[int, int, int, int, str]] = [
    (g, e, gm, em, code)
    for name, code in _CODE.items()
    for (g, e, *mask) in getattr(_oracle_table, name)
    if mask
    for gm, em in [mask]
]
assert len(SINGLE) == 652, len(SINGLE)
assert len(MASKED) == 3, MASKED

_Z_FAMILY = frozenset({"Z", "X/Z"})  # may be emptied (a sequence: emptied, never kept with items)
_D_FAMILY = frozenset({"D", "Z/D", "X/D", "X/Z/D", "C"})  # absent, empty or a changed value


def basic_code(tag: int) -> str | None:
    """The Basic Profile code of a standard tag (concrete tags, then the repeating groups); None if unlisted."""
    code = SINGLE.get(tag)
    if code is not None:
        return code
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, gm, em, masked_code in MASKED:
        if group & gm == g and element & em == e:
            return masked_code
    return None


def vr_of(tag: int) -> str:
    """pydicom's VR for a tag, or 'UN' for the 2026c tags its dictionary does not know."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


# ---------------------------------------------------------------------------------------------------------------
# CID 7050 codes, and what each E.3 option may retain (test-local, deliberately small and conservative).

OPTION_CODE: dict[str, str] = {
    "clean-pixel-data": "113101",
    "clean-recognizable-visual-features": "113102",
    "clean-graphics": "113103",
    "clean-structured-content": "113104",
    "clean-descriptors": "113105",
    "retain-longitudinal-full-dates": "113106",
    "retain-longitudinal-modified-dates": "113107",
    "retain-patient-characteristics": "113108",
    "retain-device-identity": "113109",
    "retain-uids": "113110",
    "retain-safe-private": "113111",
    "retain-institution-identity": "113112",
}


def _tags(*keywords: str) -> frozenset[int]:
    found = {keyword: tag_for_keyword(keyword) for keyword in keywords}
    missing = [keyword for keyword, tag in found.items() if tag is None]
    assert not missing, missing
    return frozenset(tag for tag in found.values() if tag is not None)


def _tags_in(text: str) -> frozenset[int]:
    """The tags of the keywords in `text`, separated by white space."""
    return _tags(*text.split())


_BIRTH = _tags("PatientBirthDate", "PatientBirthTime")
# Table E.1-1 X attributes that PS3.3 makes Type 1, 1C, 2 or 2C in some module (read from its module tables: e.g.
# Responsible Person and Responsible Organization, Type 2C in the Patient Module when the patient is an animal;
# Presentation Creation Date and Time, Type 1 in the Presentation State Identification Module). Removing one that
# the input has leaves an invalid instance, so a de-identifier may keep it empty or with a new value instead, never
# with its original value: checked as X/Z/D (a sequence as X/Z: absent or without items).
X_REQUIRED_SOMEWHERE = _tags_in(
    """
    ResponsiblePerson ResponsibleOrganization PresentationCreationDate PresentationCreationTime RetrieveAETitle
    IssuerOfClinicalTrialProtocolID MAC NonconformingDataElementValue PatientSetupPhotoDescription
    PatientTreatmentPreparationProcedureParameterDescription PositionAcquisitionTemplateDescription
    PositionAcquisitionTemplateName PriorTreatmentDoseDescription RadiopharmaceuticalStartDateTime
    ReasonForRequestedProcedureCodeSequence RequestedProcedureID ScheduledProcedureStepID SeriesDescription
    SourceManufacturer StudyDescription TimezoneOffsetFromUTC UniqueDeviceIdentifier
    """
)

# ---------------------------------------------------------------------------------------------------------------
# The E.3 option columns of Table E.1-1, 2024b: innolitics/dicom-standard's
# standard/confidentiality_profile_attributes.json at 7f4749d (last changed in 8670abd, "Update standard to
# rev2024b"), vendored byte for byte (621 rows, MIT); tools/deid/README.md says where it came from.

INNOLITICS_2024B = (
    Path(__file__).resolve().parents[1] / "tools" / "deid" / "innolitics-confidentiality-2024b-7f4749d.json"
)
INNOLITICS_2024B_SHA256 = "a99a35d1278e2bace8d90ff791b11aea2d45f1e3e1230388eb5224c9dbcd29e6"
_COLUMN_KEYS = {
    "rtnSafePrivOpt": "retain-safe-private",
    "rtnUIDsOpt": "retain-uids",
    "rtnDevIdOpt": "retain-device-identity",
    "rtnInstIdOpt": "retain-institution-identity",
    "rtnPatCharsOpt": "retain-patient-characteristics",
    "rtnLongFullDatesOpt": "retain-longitudinal-full-dates",
    "rtnLongModifDatesOpt": "retain-longitudinal-modified-dates",
    "cleanDescOpt": "clean-descriptors",
    "cleanStructContOpt": "clean-structured-content",
    "cleanGraphOpt": "clean-graphics",
}


def _load_columns() -> tuple[dict[int, dict[str, str]], list[tuple[int, int, dict[str, str]]], dict[str, str]]:
    data = INNOLITICS_2024B.read_bytes()
    assert hashlib.sha256(data).hexdigest() == INNOLITICS_2024B_SHA256, "the vendored 2024b file changed"
    singles: dict[int, dict[str, str]] = {}
    groups: list[tuple[int, int, dict[str, str]]] = []
    private: dict[str, str] = {}
    rows = json.loads(data)
    for row in rows:
        columns = {_COLUMN_KEYS[key]: value for key, value in row.items() if key in _COLUMN_KEYS}
        assert set(row) - set(_COLUMN_KEYS) == {"name", "tag", "stdCompIOD", "basicProfile", "id"}, row
        assert set(columns.values()) <= {"K", "C"}, row  # 2024b's option columns hold nothing else
        ident = row["id"]
        if ident == "ggggeeee-where-gggg-is-odd":
            private = columns
            continue
        assert re.fullmatch("[0-9a-fx]{8}", ident), ident
        value = int(ident.replace("x", "0"), 16)
        mask = int("".join("0" if char == "x" else "F" for char in ident), 16)
        if mask == 0xFFFFFFFF:
            assert value not in singles, ident
            singles[value] = columns
        else:
            groups.append((value, mask, columns))
    assert (len(rows), len(singles), len(groups)) == (621, 617, 3), (len(rows), len(singles), len(groups))
    return singles, groups, private


OPTION_COLUMNS, _OPTION_GROUPS, PRIVATE_COLUMN = _load_columns()
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})


def columns_of(tag: int) -> dict[str, str]:
    """The option columns of a standard tag's row: {option: "K" or "C"}; {} when no option has an entry.

    Rows of 2026c that 2024b lacks get the two mechanical rules of E.3.6 and E.3.9 (a date or time keeps K/C in
    the longitudinal columns, a U attribute K under Retain UIDs), the only columns derivable without the newer
    text. Private tags (odd groups) have no row here: see `PRIVATE_COLUMN`.
    """
    if (tag >> 16) % 2:
        return {}
    found = OPTION_COLUMNS.get(tag)
    if found is not None:
        return dict(found)
    for value, mask, columns in _OPTION_GROUPS:
        if tag & mask == value:
            return dict(columns)
    derived: dict[str, str] = {}
    if tag in SINGLE and vr_of(tag) in _DATE_VRS:
        derived |= {"retain-longitudinal-full-dates": "K", "retain-longitudinal-modified-dates": "C"}
    if SINGLE.get(tag) == "U":
        derived["retain-uids"] = "K"
    return derived


def option_code(tag: int, options: Iterable[str]) -> str | None:
    """The code the enabled options give a standard tag: "K" if any enabled option's column keeps it, else "C" if
    any cleans it, else None (the Basic Profile applies). E.3: an option's requirement overrides the Basic Profile;
    where two enabled options disagree (K and C), the retaining one is taken, as the options combine. Except for
    dates: under Modified Dates without Full Dates, a row the modified-dates column cleans is cleaned whatever
    another option says (a real calibration date among shifted dates would undo the shift, E.3.6)."""
    enabled = set(options)
    columns = columns_of(tag)
    modified = "retain-longitudinal-modified-dates"
    if modified in enabled and "retain-longitudinal-full-dates" not in enabled and columns.get(modified) == "C":
        return "C"
    entries = {code for option, code in columns.items() if option in enabled}
    return "K" if "K" in entries else "C" if "C" in entries else None


_DATE_OPTIONS = frozenset({"retain-longitudinal-full-dates", "retain-longitudinal-modified-dates"})
_DATE_VRS = frozenset({"DA", "DT", "TM"})
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_STRING_VRS = _TEXT_VRS | _DATE_VRS | {"AS", "DS", "IS", "UI"}

# Structural UIDs: values from the standard's registry or of coding schemes, never instance UIDs (E.3.9 note).
STRUCTURAL_UID_TAGS = _tags_in(
    """
    MediaStorageSOPClassUID TransferSyntaxUID ReferencedSOPClassUIDInFile ReferencedTransferSyntaxUIDInFile
    SOPClassUID RelatedGeneralSOPClassUID OriginalSpecializedSOPClassUID CodingSchemeUID
    ContextGroupExtensionCreatorUID MappingResourceUID ReferencedSOPClassUID MACCalculationTransferSyntaxUID
    """
)
# Attributes the de-identifier writes itself (E.1.1, 1.5 of deid.md); the only ones allowed to be new.
WRITTEN = _tags_in(
    """
    PatientIdentityRemoved DeidentificationMethod DeidentificationMethodCodeSequence
    LongitudinalTemporalInformationModified
    """
)
_FILE_META_ALLOWED = frozenset({0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013})
_UID_RE = re.compile(r"2\.25\.(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class Expectation:
    """What a profile promises, as the checker needs it."""

    options: frozenset[str] = frozenset()
    keep: frozenset[int] = frozenset()  # tags a profile override keeps unchanged (K)
    overridden: frozenset[int] = frozenset()  # tags with any other override: per-attribute code checks skipped
    private_keep: frozenset[tuple[str, int, int]] = frozenset()  # (creator, odd group, element low byte)
    date_shift_days: tuple[int, int] = (30, 730)

    @property
    def full_dates(self) -> bool:
        return "retain-longitudinal-full-dates" in self.options

    @property
    def modified_dates(self) -> bool:
        # Full Dates retains more than Modified Dates; with both enabled, dates are kept as they are.
        return "retain-longitudinal-modified-dates" in self.options and not self.full_dates

    @property
    def retain_uids(self) -> bool:
        return "retain-uids" in self.options

    def exempt(self, tag: int, vr: str) -> str | None:
        """Why an attribute's original value may legitimately survive (an override or an option), else None."""
        if tag in self.keep or tag in self.overridden:
            return "override"
        if option_code(tag, self.options) is not None:
            return "option column"  # an enabled option keeps (K) or cleans (C) it: `check_options` judges which
        if self.options & _DATE_OPTIONS and vr in _DATE_VRS and basic_code(tag) is None:
            return "dates"  # an unlisted date or time, which ingestd's sweep keeps or shifts under a date option
        if self.retain_uids and vr == "UI" and basic_code(tag) is None:
            return "retain-uids"
        return None


# ---------------------------------------------------------------------------------------------------------------
# Walking an original and its de-identified counterpart in parallel.


@dataclass(frozen=True)
class Node:
    path: str
    tag: int
    orig: DataElement | None
    out: DataElement | None
    depth: int


def _elements(ds: Dataset | None) -> dict[int, DataElement]:
    if ds is None:
        return {}
    return {int(elem.tag): elem for elem in ds}


def walk(orig: Dataset | None, out: Dataset | None, path: str = "", depth: int = 0) -> Iterator[Node]:
    """Every tag present in either data set, at every depth reachable in the output; items paired by index."""
    a, b = _elements(orig), _elements(out)
    for tag in sorted(a.keys() | b.keys()):
        elem_a, elem_b = a.get(tag), b.get(tag)
        where = f"{path}({tag >> 16:04X},{tag & 0xFFFF:04X})"
        yield Node(where, tag, elem_a, elem_b, depth)
        if elem_b is not None and elem_b.VR == "SQ" and tag != 0x00120064:
            items_a = list(elem_a.value or ()) if elem_a is not None and elem_a.VR == "SQ" else []
            for index, item in enumerate(elem_b.value or ()):
                yield from walk(items_a[index] if index < len(items_a) else None, item, f"{where}[{index}]/", depth + 1)


def _values(elem: DataElement | None) -> list[str]:
    if elem is None or elem.value is None:
        return []
    value = elem.value
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    if isinstance(value, list | MultiValue):
        return [str(v) for v in value]
    return [str(value)]


def _norm(elem: DataElement | None) -> tuple[str, ...]:
    return tuple(v.rstrip(" \x00") for v in _values(elem))


def _empty(elem: DataElement) -> bool:
    if elem.VR == "SQ":
        return len(elem.value or ()) == 0
    return all(not v.strip(" \x00") for v in _values(elem))


def _null(elem: DataElement) -> bool:
    """A value that carries no information: empty, or only zeros (e.g. TM 000000, IS 0, AS 000Y, OB 00 00)."""
    text = "".join(_values(elem))
    if elem.VR in ("OB", "OW", "UN", "OF", "OD", "OL", "OV"):
        return not text.strip("\x00")
    return re.fullmatch(r"(0+[DWMY]?)?", re.sub(r"[^A-Za-z0-9]", "", text)) is not None


def _is_registered(uid: str) -> bool:
    return uid in UID_dictionary


def original_uids(datasets: Iterable[Dataset]) -> set[str]:
    """Every instance UID value in the originals (structural and registered UIDs left out)."""
    found: set[str] = set()
    for ds in datasets:
        for node in walk(ds, ds):
            elem = node.orig
            if elem is None or elem.VR != "UI" or node.tag in STRUCTURAL_UID_TAGS:
                continue
            found.update(v.strip("\x00 ") for v in _values(elem) if v.strip("\x00 ") and not _is_registered(v))
    return found


def valid_new_uid(uid: str) -> bool:
    """2.25 followed by the decimal value of a 128-bit integer: digits and dots, no leading zero, <= 64 chars."""
    match = _UID_RE.fullmatch(uid)
    return match is not None and len(uid) <= 64 and int(match.group(1)) < 2**128


def _private_block(tag: int) -> int | None:
    element = tag & 0xFFFF
    return (tag & 0xFFFF0000) | (element >> 8) if element >= 0x1000 else None


def to_bytes(ds: Dataset) -> bytes:
    """The data set as a DICOM file (preamble, file meta, data set) in memory."""
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# One instance.


def check_instance(
    orig: Dataset,
    out: Dataset,
    expect: Expectation,
    all_original_uids: set[str] | None = None,
    data: bytes | None = None,
) -> list[str]:
    """Invariants 1-4, 6-8, 12 and 19 for one (original, de-identified) pair. `data`: the written output."""
    problems: list[str] = []
    uids = original_uids([orig]) if all_original_uids is None else all_original_uids
    for node in walk(orig, out):
        if node.out is None:
            continue
        problems += _check_node(node, expect, uids)
    problems += _check_private(out, expect)
    problems += _check_meta(orig, out, expect)
    problems += _check_written(out, data)
    return problems


def _check_node(node: Node, expect: Expectation, uids: set[str]) -> list[str]:  # noqa: PLR0911, PLR0912
    elem, tag, where = node.out, node.tag, node.path
    assert elem is not None
    group = tag >> 16
    if group == 0x0002 or tag & 0xFFFF == 0 or group == 0:
        return [f"{where}: file meta, group length or command element in the data set"]
    if node.orig is None and not (node.depth == 0 and tag in WRITTEN):
        return [f"{where}: not in the original (the de-identifier invented it)"]
    if group % 2:  # private: `_check_private` checks which may stay; here, that a kept one is unchanged
        if node.orig is not None and elem.VR == "UI":
            return _check_uid(node, expect, uids)
        if node.orig is not None and elem.VR != "SQ" and _norm(elem) != _norm(node.orig):
            return [f"{where}: a kept private element changed its value"]
        return []
    if node.depth == 0 and tag in WRITTEN:
        return []  # `_check_meta`
    problems: list[str] = []
    vr = elem.VR
    code = basic_code(tag)
    why = expect.exempt(tag, vr)
    if node.orig is None or _norm(elem) != _norm(node.orig):  # values the de-identifier wrote (input as it was)
        problems += _check_vr(elem, where)
    if vr == "UN" and why is None:
        problems.append(f"{where}: an undecodable (UN) element survived")
    if vr == "UI":
        problems += _check_uid(node, expect, uids)
    if why is not None:
        return problems
    if code == "X" and tag in X_REQUIRED_SOMEWHERE:
        code = "X/Z" if vr == "SQ" else "X/Z/D"
    if code == "X":
        problems.append(f"{where} {keyword_for_tag(tag) or ''}: code X but present")
    elif code in _Z_FAMILY and vr == "SQ":
        if not _empty(elem):
            problems.append(f"{where}: code {code} sequence has items")
    elif code in _Z_FAMILY or code in _D_FAMILY:
        assert node.orig is not None
        # Sequences are judged item by item; UIDs by `_check_uid` (a registered standard UID may stay as it is).
        if not (_empty(elem) or _null(node.orig) or _norm(elem) != _norm(node.orig)) and vr not in ("SQ", "UI"):
            problems.append(f"{where} {keyword_for_tag(tag) or ''}: code {code} but the original value survived")
    elif code == "U":
        if node.orig is not None and not _empty(node.orig) and _empty(elem) and vr != "SQ":
            problems.append(f"{where}: code U but emptied")
    elif code is None:
        if vr == "PN" and not _empty(elem):
            problems.append(f"{where}: an unlisted person name kept a value")
        if vr in _DATE_VRS and not expect.options & _DATE_OPTIONS:
            problems.append(f"{where}: an unlisted {vr} survived without a date option")
    if vr in _DATE_VRS and expect.options & _DATE_OPTIONS and tag in _BIRTH and not _empty(elem):
        assert node.orig is not None
        if _norm(elem) == _norm(node.orig) and not _null(node.orig):
            problems.append(f"{where}: birth date/time kept under a longitudinal option")
    return problems


def _check_vr(elem: DataElement, where: str) -> list[str]:
    if elem.VR in ("SQ", "UN") or elem.value is None:
        return []
    values = elem.value if isinstance(elem.value, list | MultiValue) else [elem.value]
    for value in values:
        try:
            if elem.VR in _STRING_VRS and not isinstance(value, bytes):
                value = str(value)  # noqa: PLW2901 - DSfloat, IS and PersonName are validated as their text
            validate_value(elem.VR, value, pydicom_config.RAISE)
        except (ValueError, TypeError) as exc:
            return [f"{where}: value not valid for VR {elem.VR}: {exc}"]
    return []


def _check_uid(node: Node, expect: Expectation, uids: set[str]) -> list[str]:
    elem, orig, where = node.out, node.orig, node.path
    assert elem is not None
    new_values, old_values = _values(elem), _values(orig)
    if node.tag in STRUCTURAL_UID_TAGS or (orig is not None and node.tag in expect.keep):
        return [] if _norm(elem) == _norm(orig) else [f"{where}: structural UID changed"]
    if orig is None or len(new_values) != len(old_values):
        return [f"{where}: UID multiplicity changed"]
    problems: list[str] = []
    retained = expect.retain_uids or expect.exempt(node.tag, "UI") not in (None, "clean-descriptors")
    for new_value, old_value in zip(new_values, old_values, strict=True):
        new, old = new_value.strip("\x00 "), old_value.strip("\x00 ")
        if not new:
            continue
        if _is_registered(old):
            if new != old:
                problems.append(f"{where}: registered UID {old} changed to {new}")
        elif retained and (new == old or valid_new_uid(new)):
            continue  # an option may keep it (Retain UIDs, Retain Device Identity's Device UID); or not (conservative)
        elif not valid_new_uid(new):
            problems.append(f"{where}: {new!r} is not a 2.25 UUID UID")
        elif new == old or new in uids:
            problems.append(f"{where}: an original UID survived: {new}")
    return problems


def _check_private(out: Dataset, expect: Expectation) -> list[str]:
    """Invariant 6 at every depth: only safe-listed private elements, each with its creator; no orphan creators."""
    problems: list[str] = []
    datasets = [out, *(item for node in walk(None, out) if node.out is not None and node.out.VR == "SQ"
                        for item in node.out.value or ())]  # fmt: skip
    safe = "retain-safe-private" in expect.options
    for ds in datasets:
        elements = _elements(ds)
        used_blocks: set[int] = set()
        for tag in elements:
            if not (tag >> 16) % 2:
                continue
            element = tag & 0xFFFF
            if 0x10 <= element <= 0xFF:
                continue
            block = _private_block(tag)
            if block is None:
                problems.append(f"({tag >> 16:04X},{element:04X}): private element outside any block")
                continue
            used_blocks.add(block)
            creator_elem = elements.get(block)
            if creator_elem is None:
                problems.append(f"({tag >> 16:04X},{element:04X}): private element without its creator")
                continue
            key = (str(creator_elem.value).strip(), tag >> 16, element & 0xFF)
            if not safe or key not in expect.private_keep:
                problems.append(f"({tag >> 16:04X},{element:04X}) {key}: private element not on the safe list")
        for tag in elements:
            if (tag >> 16) % 2 and 0x10 <= tag & 0xFFFF <= 0xFF and tag not in used_blocks:
                problems.append(f"({tag >> 16:04X},{tag & 0xFFFF:04X}): orphan private creator")
    return problems


def _check_meta(orig: Dataset, out: Dataset, expect: Expectation) -> list[str]:  # noqa: PLR0912 - one per check
    """Invariants 7 and 8."""
    problems: list[str] = []
    meta = getattr(out, "file_meta", None)
    if meta is None:
        return ["no file meta"]
    if meta.get("MediaStorageSOPInstanceUID") != out.get("SOPInstanceUID"):
        problems.append("Media Storage SOP Instance UID != SOP Instance UID")
    if meta.get("MediaStorageSOPClassUID") != out.get("SOPClassUID"):
        problems.append("Media Storage SOP Class UID != SOP Class UID")
    extra = {int(elem.tag) for elem in meta} - _FILE_META_ALLOWED
    if extra:
        problems.append(f"file meta carries {sorted(f'{t:08X}' for t in extra)} (source AE title, private info...)")
    old_meta = getattr(orig, "file_meta", None)
    if old_meta is not None and meta.get("TransferSyntaxUID") != old_meta.get("TransferSyntaxUID"):
        problems.append("transfer syntax changed")
    if getattr(out, "preamble", None) not in (None, b"\x00" * 128):
        problems.append("preamble not zeroed")
    if out.get("PatientIdentityRemoved") != "YES":
        problems.append("(0012,0062) is not YES")
    if not out.get("DeidentificationMethod"):
        problems.append("(0012,0063) missing")
    codes = [str(item.get("CodeValue", "")) for item in out.get("DeidentificationMethodCodeSequence", [])]
    wanted = {"113100"} | {OPTION_CODE[o] for o in expect.options}
    if sorted(codes) != sorted(wanted):
        problems.append(f"(0012,0064) codes {sorted(codes)} != {sorted(wanted)}")
    for item in out.get("DeidentificationMethodCodeSequence", []):
        if item.get("CodingSchemeDesignator") != "DCM" or not item.get("CodeMeaning"):
            problems.append("(0012,0064) item without DCM scheme or meaning")
    longitudinal = "UNMODIFIED" if expect.full_dates else "MODIFIED" if expect.modified_dates else "REMOVED"
    if out.get("LongitudinalTemporalInformationModified") != longitudinal:
        problems.append(f"(0028,0303) is {out.get('LongitudinalTemporalInformationModified')!r}, not {longitudinal}")
    if "BurnedInAnnotation" in out and out.BurnedInAnnotation == "NO" and orig.get("BurnedInAnnotation") != "NO":
        problems.append("(0028,0301) set to NO without pixel cleaning")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality"):
        if keyword in orig and not out.get(keyword):
            problems.append(f"{keyword} missing or empty (needed by XNAT)")
    return problems


def _check_written(out: Dataset, data: bytes | None) -> list[str]:
    """Invariant 19: written with enforce_file_format, the file re-reads with the same elements."""
    if data is None:
        data = to_bytes(out)
    problems: list[str] = []
    if data[:128] != b"\x00" * 128 or data[128:132] != b"DICM":
        problems.append("written file: preamble not zero or no DICM prefix")
    with warnings.catch_warnings():
        # pydicom 3.0 checks a multi-valued text's last value with its padding space: "A\\<16 chars>" read back as
        # SH warns of 17 characters. The values the de-identifier wrote were validated by `_check_vr` already.
        warnings.filterwarnings("ignore", r"The value length \(\d+\) exceeds the maximum length", UserWarning)
        back = dcmread(BytesIO(data))
        back_tags = [node.path for node in walk(None, back)]
    out_tags = [node.path for node in walk(None, out)]
    if back_tags != out_tags:
        problems.append(f"re-read element paths differ: {sorted(set(back_tags) ^ set(out_tags))[:5]}")
    if back.file_meta.get("MediaStorageSOPInstanceUID") != back.get("SOPInstanceUID"):
        problems.append("re-read: media storage SOP instance UID differs")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Several instances: UID mapping, references, dates.


@dataclass
class _Mapping:
    forward: dict[str, set[str]] = field(default_factory=dict)
    backward: dict[str, set[str]] = field(default_factory=dict)


def uid_pairs(orig: Dataset, out: Dataset, skip: frozenset[int] = frozenset()) -> Iterator[tuple[str, str, str]]:
    """(path, original UID, new UID) for every instance UID present in both, at the same place; `skip`: tags whose
    values a profile override decides (a kept reference keeps its original UID, by the profile's choice)."""
    for node in walk(orig, out):
        if node.orig is None or node.out is None or node.out.VR != "UI" or node.tag in STRUCTURAL_UID_TAGS:
            continue
        if node.tag in skip:
            continue
        for old_value, new_value in zip(_values(node.orig), _values(node.out), strict=False):
            old, new = old_value.strip("\x00 "), new_value.strip("\x00 ")
            if old and new and not _is_registered(old):
                yield node.path, old, new


_TARGETS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")


def check_study(origs: list[Dataset], outs: list[Dataset], expect: Expectation) -> list[str]:
    """Invariants 9, 10, 11 and 14 across instances de-identified with one key (any number of runs)."""
    problems: list[str] = []
    mapping = _Mapping()
    for orig, out in zip(origs, outs, strict=True):
        for _, old, new in uid_pairs(orig, out, expect.keep | expect.overridden):
            mapping.forward.setdefault(old, set()).add(new)
            mapping.backward.setdefault(new, set()).add(old)
    if not expect.retain_uids:
        problems += [f"UID {old} mapped to {sorted(new)} (not a function)" for old, new in mapping.forward.items()
                     if len(new) > 1]  # fmt: skip
        problems += [f"UIDs {sorted(old)} all mapped to {new} (not injective)" for new, old in mapping.backward.items()
                     if len(old) > 1]  # fmt: skip
    targets: dict[str, str] = {}
    for orig, out in zip(origs, outs, strict=True):
        for keyword in _TARGETS:
            if tag_for_keyword(keyword) in expect.keep | expect.overridden:
                continue
            old, new = str(orig.get(keyword, "") or "").strip(), str(out.get(keyword, "") or "").strip()
            if old and new:
                targets[old] = new
    for orig, out in zip(origs, outs, strict=True):
        for path, old, new in uid_pairs(orig, out, expect.keep | expect.overridden):
            if old in targets and targets[old] != new:
                problems.append(f"{path}: reference to {old} is {new}, its target became {targets[old]}")
    if expect.modified_dates:
        problems += _check_dates(origs, outs, expect)
    return problems


def _days(text: str) -> date | None:
    text = text.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _check_dates(origs: list[Dataset], outs: list[Dataset], expect: Expectation) -> list[str]:  # noqa: PLR0912
    """Invariant 14: one whole-day shift per patient, in the profile's range; TM and the time of DT unchanged."""
    problems: list[str] = []
    low, high = expect.date_shift_days
    shifts: dict[str, set[int]] = {}
    for orig, out in zip(origs, outs, strict=True):
        patient = str(orig.get("PatientID", "") or "").strip() or "study " + str(orig.get("StudyInstanceUID", ""))
        for node in walk(orig, out):
            if node.orig is None or node.out is None or node.out.VR not in _DATE_VRS or node.tag in expect.keep:
                continue
            if node.tag in expect.overridden or (node.tag >> 16) % 2:
                continue
            old_values, new_values = _values(node.orig), _values(node.out)
            if _empty(node.out):
                continue
            if len(old_values) != len(new_values):
                problems.append(f"{node.path}: date multiplicity changed")
                continue
            for old_value, new_value in zip(old_values, new_values, strict=True):
                old, new = old_value.strip(), new_value.strip()
                if node.out.VR == "TM":
                    if old != new:
                        problems.append(f"{node.path}: TM changed {old} -> {new}")
                    continue
                before, after = _days(old), _days(new)
                if before is None or after is None:
                    if len(old) in (4, 6) and len(new) == len(old) and old.isdigit() and new.isdigit():
                        continue  # year or year-month precision: the shift is checked on full dates only
                    problems.append(f"{node.path}: {old!r} -> {new!r} is not a shifted date")
                    continue
                shift = (before - after).days
                shifts.setdefault(patient, set()).add(shift)
                if not low <= shift <= high:
                    problems.append(f"{node.path}: shifted by {shift} days, outside [{low}, {high}]")
                if node.out.VR == "DT" and old[8:] != new[8:]:
                    problems.append(f"{node.path}: DT time part changed {old} -> {new}")
    for patient, found in shifts.items():
        if len(found) > 1:
            problems.append(f"patient {patient}: dates shifted by different amounts {sorted(found)}")
    return problems


def check_unlinkable(
    origs: list[Dataset], outs_a: list[Dataset], outs_b: list[Dataset], expect: Expectation | None = None
) -> list[str]:
    """Invariant 13: another key gives other UIDs (and, with `expect`, other pseudonyms); no original UID inside
    any new UID."""
    problems: list[str] = []
    originals = {uid for uid in original_uids(origs) if len(uid) >= 10}
    new_a = {new for o, a in zip(origs, outs_a, strict=True) for _, old, new in uid_pairs(o, a) if new != old}
    new_b = {new for o, b in zip(origs, outs_b, strict=True) for _, old, new in uid_pairs(o, b) if new != old}
    common = new_a & new_b
    if common:
        problems.append(f"{len(common)} UIDs identical under two keys, e.g. {sorted(common)[0]}")
    for new in new_a | new_b:
        for old in originals:
            if old in new:
                problems.append(f"new UID {new} contains the original {old}")
    if expect is None:
        return problems
    for orig, a, b in zip(origs, outs_a, outs_b, strict=True):
        in_b = {node.path: node.out for node in walk(orig, b)}
        for node in walk(orig, a):
            other = in_b.get(node.path)
            if node.orig is None or node.out is None or other is None or node.out.VR not in _TEXT_VRS:
                continue
            if basic_code(node.tag) not in _D_FAMILY or expect.exempt(node.tag, node.out.VR) is not None:
                continue
            if _null(node.orig) or _empty(node.out) or _norm(node.out) == _norm(node.orig):
                continue
            if _norm(node.out) == _norm(other):
                problems.append(f"{node.path}: the same pseudonym {_norm(other)} under two keys")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Canary: original values of removed or replaced attributes must not be anywhere in the output.


def _strings(elem: DataElement) -> list[str]:
    """String content of a value: text values, UIDs, and printable runs (>= 6) inside binary values."""
    if elem.VR in _TEXT_VRS or elem.VR == "UI":
        found = []
        for value in _values(elem):
            found.append(value.strip(" \x00"))
            if elem.VR == "PN":
                found += [part.strip() for part in re.split(r"[\^=]", value)]
        return [v for v in found if v]
    if elem.VR in ("OB", "OW", "UN") and isinstance(elem.value, bytes):
        return [m.decode("ascii") for m in re.findall(rb"[\x20-\x7e]{6,}", elem.value)]
    return []


def secrets(orig: Dataset, out: Dataset, expect: Expectation) -> set[str]:
    """Strings of the original that the profile removes or replaces, at any depth (dates and numbers left out).

    An element counts when it is gone from the output or its value changed, or it sits inside a sequence that is
    gone or emptied; not when an option or override may keep or clean it. Strings that also occur in a value the
    output kept (unchanged, or under such an option) are left out.
    """
    found: set[str] = set()
    kept: list[str] = []
    for node in walk(orig, out):
        if node.orig is None:
            continue
        unchanged = node.out is not None and _norm(node.out) == _norm(node.orig)
        if node.out is not None and node.orig.VR != "SQ" and (unchanged or expect.exempt(node.tag, node.orig.VR)):
            kept += _strings(node.orig)
            continue
        if node.out is None or node.orig.VR != "SQ":
            found.update(_strings(node.orig))
        if node.orig.VR == "SQ" and (node.out is None or _empty(node.out)):
            for item in node.orig.value or ():
                for inner in walk(item, item):
                    if inner.orig is not None:
                        found.update(_strings(inner.orig))
    pixels = orig.get("PixelData")
    blob = "\n".join(kept) + (pixels.decode("latin-1") if isinstance(pixels, bytes) else "")
    return {secret for secret in found if secret not in blob and secret not in _EXPECTED_STRINGS}


def text_values(elem: DataElement) -> list[str]:
    """The strings `secrets` looks at in one element (text values, UIDs, printable runs in binary values)."""
    return _strings(elem)


# Values that the de-identifier itself writes and that may equal an original (never a leak).
_EXPECTED_STRINGS = frozenset({"YES", "NO", "DCM", "REMOVED", "MODIFIED", "UNMODIFIED", "ANONYMIZED", "ANON"})


def leaked_secrets(candidates: Iterable[str], *texts: bytes | str, min_length: int = 6) -> list[str]:
    """The candidates (at least `min_length` long) found in any of the texts (bytes searched as UTF-8 and Latin-1)."""
    blobs: list[bytes] = [t.encode("utf-8") if isinstance(t, str) else t for t in texts]
    leaks = []
    for secret in candidates:
        if len(secret) < min_length:
            continue
        needles = {secret.encode("utf-8"), secret.encode("latin-1", "replace")}
        if any(needle in blob for needle in needles for blob in blobs):
            leaks.append(secret)
    return sorted(leaks)
