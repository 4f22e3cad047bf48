"""De-identify one DICOM data set by a profile: PS3.15 Annex E Table E.1-1 with its options, and overrides.

Pure: a pydicom Dataset in, a new Dataset (with new file meta) out; the input is never modified. Anything the
engine cannot handle raises `DeidError` with a reason that names tags, never values, and nothing is returned,
so a partially de-identified data set cannot leave.

Per element, at every sequence depth, in this order:
1. the profile's override for the tag, else
2. the table's code under the profile's options, its combined codes and removals of required attributes resolved
   by the Type in the instance's IOD, where unknown to the non-removing branch (ingestd.deid.iod), else
3. the sweeps by VR for attributes the table does not list: UIDs remapped, DA/DT/TM by the date option,
   PN emptied, undecodable (UN) elements removed; everything else kept.
A sequence's own action comes first: removed or emptied sequences are not entered; kept ones are processed
item by item; in a sequence the table replaces (D) text the table does not list is replaced too (a code's value
and meaning in Person Identification Code Sequence are an employee number and a name). UIDs are remapped by
value (keyed HMAC -> 2.25), so references anywhere stay consistent; structural UIDs (SOP classes, transfer
syntaxes, registered standard UIDs) are never changed.
Private elements go, except those the profile keeps by (creator, group, element) under retain-safe-private.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import UID

import ingestd
from ingestd.deid.groups import removed_groups
from ingestd.deid.hold import DeidError
from ingestd.deid.iod import Iod, drop_orphans, iod_for, resolve
from ingestd.deid.keyed import date_offset_days, pseudonym, remap_uid, shift_da, shift_dt
from ingestd.deid.pixels import check as check_pixels
from ingestd.deid.pixels import clean as clean_pixels
from ingestd.deid.profile import Override, Profile
from ingestd.deid.table import OPTION_CODES, OPTION_MEANINGS, Table, load_table
from ingestd.states import HoldCode

__all__ = ["Change", "DeidError", "Labels", "anonymize", "screen"]

# ingestd's Implementation Class UID: 2.25 + uuid5(NAMESPACE_URL, "https://ingestd.invalid/implementation-class").
IMPLEMENTATION_CLASS_UID = "2.25.19246594826947478539115802516302672517"
IMPLEMENTATION_VERSION = ("INGESTD_" + ingestd.__version__.replace(".", "_"))[:16]


@dataclass(frozen=True, slots=True)
class Labels:
    """The XNAT labels a study was routed to; `replace` overrides may use them as {project}, {subject}, {session}."""

    project: str = ""
    subject: str = ""
    session: str = ""


@dataclass(frozen=True, slots=True)
class Change:
    """What happened to one element, for `ingestd explain`. `before`/`after` are shown to the operator only."""

    path: str
    tag: int
    keyword: str
    action: str
    why: str
    before: str
    after: str


# Attributes whose values are UIDs of the standard's own registry or of coding schemes, never instance UIDs.
_STRUCTURAL_UID_TAGS = frozenset(
    {
        0x00020002,  # Media Storage SOP Class UID
        0x00020010,  # Transfer Syntax UID
        0x00041510,  # Referenced SOP Class UID in File
        0x00041512,  # Referenced Transfer Syntax UID in File
        0x00080016,  # SOP Class UID
        0x0008001A,  # Related General SOP Class UID
        0x0008001B,  # Original Specialized SOP Class UID
        0x0008010C,  # Coding Scheme UID
        0x0008010D,  # Context Group Extension Creator UID
        0x00080118,  # Mapping Resource UID
        0x00081150,  # Referenced SOP Class UID
        0x04000010,  # MAC Calculation Transfer Syntax UID
    }
)
_ALWAYS_REMOVED = frozenset(
    {
        0x04000500,  # Encrypted Attributes Sequence
        0x04000561,  # Original Attributes Sequence
        0x4FFE0001,  # MAC Parameters Sequence
        0xFFFAFFFA,  # Digital Signatures Sequence
        0x00880200,  # Icon Image Sequence (its pixels are not cleaned)
        0xFFFCFFFC,  # Data Set Trailing Padding
    }
)
# Written by the engine itself after the walk; any incoming value is dropped first.
_WRITTEN = frozenset({0x00120062, 0x00120063, 0x00120064, 0x00280303})
_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN", "CS", "AE", "UR"})
_MAX_LENGTH = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "PN": 64, "ST": 1024, "LT": 10240, "UC": 1024, "UT": 1024}
_DUMMY_DATE = {"DA": "19000101", "DT": "19000101000000", "TM": "000000"}
_NUMERIC_BINARY = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
_BINARY = frozenset({"OB", "OW", "OF", "OD", "OL", "OV"})

# SOP classes with free-text content the header profile cannot clean (SR, KOS, presentation states).
_STRUCTURED_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.")


def screen(ds: Dataset, profile: Profile) -> None:
    """Raise DeidError if this instance must be held rather than de-identified (pixels: ingestd.deid.pixels)."""
    check_pixels(ds, profile)
    sop_class = str(ds.get("SOPClassUID", "")).strip()
    modality = str(ds.get("Modality", "")).strip().upper()
    structured = sop_class.startswith(_STRUCTURED_PREFIXES) or modality in ("SR", "KO", "PR")
    if structured and "clean-structured-content" not in profile.options:
        raise DeidError(
            HoldCode.STRUCTURED_CONTENT,
            f"SOP class {sop_class or '(none)'} carries free-text content; drop the series with a "
            "drop_series filter or enable clean-structured-content",
        )


@dataclass
class _Run:
    profile: Profile
    labels: Labels
    identifiers: tuple[str, ...]
    date_offset: int
    changes: list[Change] | None
    iod: Iod | None = None  # the instance's IOD: the Types that resolve the combined codes (ingestd.deid.iod)
    uid_cache: dict[str, str] = field(default_factory=dict)
    in_dummy: int = 0  # depth of sequences E.1-1 replaces (D): their unlisted text is replaced too

    def uid(self, value: str) -> str:
        value = value.strip("\x00 ")
        if not value or value in UID_dictionary:
            return value
        mapped = self.uid_cache.get(value)
        if mapped is None:
            mapped = self.uid_cache[value] = remap_uid(self.profile.key, value)
        return mapped


def anonymize(ds: Dataset, profile: Profile, labels: Labels, changes: list[Change] | None = None) -> Dataset:
    """De-identify `ds` (not modified) by `profile`; return a new data set with new file meta.

    `changes`, when given, receives one entry per element the walk touched (for `ingestd explain`).
    Raises DeidError when any element cannot be handled.
    """
    table = load_table(profile.edition)
    run = _Run(
        profile=profile,
        labels=labels,
        identifiers=_identifiers(ds),
        date_offset=_patient_offset(ds, profile),
        changes=changes,
        iod=iod_for(str(ds.get("SOPClassUID", ""))),
    )
    try:
        out = _walk(ds, run, table, "")
        drop_orphans(out, lambda where, elem, why: _note(run, where, elem, "remove", why, None))
    except DeidError:
        raise
    except Exception as exc:  # noqa: BLE001 - fail closed: never hand on a half-processed data set
        raise DeidError(HoldCode.ENGINE, f"de-identification failed: {type(exc).__name__}") from None
    _write_method(out, profile)
    out.file_meta = _file_meta(ds, out)
    out.preamble = b"\x00" * 128
    region = clean_pixels(ds, out, profile)  # Burned In Annotation NO and 113101 only when pixels changed
    if region is not None and changes is not None and 0x7FE00010 in out:
        why = f"E.3.1 Clean Pixel Data, region {region.name}"
        _note(run, "(7FE0,0010)", ds[0x7FE00010], "clean pixels", why, out[0x7FE00010])
    return out


def _identifiers(ds: Dataset) -> tuple[str, ...]:
    """Identifying strings of this patient and study, removed from any value the profile cleans (C)."""
    found: set[str] = set()
    for keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber", "PatientBirthDate", "MedicalRecordLocator"):
        for value in _values(ds.get(keyword)):
            if len(value) >= 3:
                found.add(value)
    for elem in ds:
        if elem.VR == "PN" and elem.value:
            for value in _values(elem.value):
                for part in re.split(r"[\^=]", value):
                    if len(part.strip()) >= 3:
                        found.add(part.strip())
    return tuple(sorted(found, key=len, reverse=True))


def _values(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, list | MultiValue):
        return [str(v).strip() for v in value if str(v).strip()]
    return [str(value).strip()] if str(value).strip() else []


def _patient_offset(ds: Dataset, profile: Profile) -> int:
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID"):
        value = str(ds.get(keyword, "") or "").strip()
        if value:
            low, high = profile.date_shift_days
            return date_offset_days(profile.key, value, low, high)
    return profile.date_shift_days[0]


def _walk(ds: Dataset, run: _Run, table: Table, path: str) -> Dataset:
    out = Dataset()
    kept_blocks: dict[int, str] = {}  # private creator tag -> creator, for blocks with a kept element
    private_creators: dict[int, str] = {}  # creators come before their blocks: elements are in tag order
    whole_groups = {} if path else removed_groups(ds, run.profile, table)  # 50xx/60xx going with their data
    for elem in ds:
        tag = int(elem.tag)
        group, element = tag >> 16, tag & 0xFFFF
        where = f"{path}({group:04X},{element:04X})"
        if group == 0x0002 or element == 0x0000 or group == 0x0000 or tag in _WRITTEN:
            continue  # file meta is rebuilt; group lengths and command elements are not part of a stored data set
        if group % 2:
            if 0x10 <= element <= 0xFF:
                private_creators[tag] = str(elem.value).strip()
            _private(elem, out, run, table, private_creators, kept_blocks, where)
            continue
        if group in whole_groups:
            _note(run, where, elem, "remove", whole_groups[group], None)
            continue
        if tag in _ALWAYS_REMOVED:
            _note(run, where, elem, "remove", "never kept (old values, signatures, icons)", None)
            continue
        override = run.profile.overrides.get(tag)
        if override is not None:
            _apply_override(elem, override, out, run, table, where)
            continue
        entry = table.lookup(tag)
        if entry is not None:
            code = entry.code(run.profile.options)
            why = f"E.1-1 {entry.basic}" if code == entry.basic else f"E.1-1 {entry.basic}, by option {code}"
            code, why = resolve(run.iod, where, code, elem.VR, why)
            _apply_code(elem, code, why, out, run, table, where)
            continue
        _sweep(elem, out, run, table, where)
    for creator_tag, creator in kept_blocks.items():
        out.add_new(creator_tag, "LO", creator)
    return out


def _note(run: _Run, where: str, elem: DataElement, action: str, why: str, new: DataElement | None) -> None:
    if run.changes is None:
        return
    run.changes.append(
        Change(
            path=where,
            tag=int(elem.tag),
            keyword=keyword_for_tag(elem.tag) or "(unknown)",
            action=action,
            why=why,
            before=_show(elem),
            after="(removed)" if new is None else _show(new),
        )
    )


def _show(elem: DataElement) -> str:
    if elem.VR == "SQ":
        return f"<{len(elem.value)} item(s)>"
    if elem.is_buffered:  # Pixel Data left on disk (ingestd.deid.stream): its length, without reading it
        value = elem.value
        here = value.tell()
        size = value.seek(0, 2)
        value.seek(here)
        return f"<{size} bytes>"
    if elem.VR in _BINARY or elem.VR == "UN":
        return f"<{len(elem.value or b'')} bytes>"
    text = str(elem.value)
    return text if len(text) <= 60 else text[:57] + "..."


def _apply_code(  # noqa: PLR0911 - one return per resolved code
    elem: DataElement, code: str, why: str, out: Dataset, run: _Run, table: Table, where: str
) -> None:
    if code in ("Z/D", "X/D", "X/Z/D"):
        code = "D"
    elif code == "X/Z":
        code = "Z"
    elif code == "X/Z/U*":
        code = "U"
    if elem.VR == "UN" and code not in ("K",):
        _note(run, where, elem, "remove", why + " (undecodable value, removed)", None)
        return
    if code == "X":
        _note(run, where, elem, "remove", why, None)
        return
    if code == "Z":
        new = DataElement(elem.tag, elem.VR, Sequence() if elem.VR == "SQ" else _empty(elem.VR))
        _put(out, run, where, elem, "empty", why, new)
        return
    if elem.VR == "SQ":  # K, C, D, U on a sequence: keep it and process every item
        run.in_dummy += code == "D"  # D: a dummy in place of the content, so unlisted text in it is replaced
        try:
            _put(out, run, where, elem, "process items", why, _sequence(elem, run, table, where))
        finally:
            run.in_dummy -= code == "D"
        return
    if code == "K":
        _put(out, run, where, elem, "keep", why, elem)
        return
    if code == "U" or elem.VR == "UI":
        _put(out, run, where, elem, "remap UID", why, _remap(elem, run))
        return
    if code == "C":
        _put(out, run, where, elem, "clean", why, _clean(elem, run, where))
        return
    _put(out, run, where, elem, "dummy", why, _dummy(elem, run))


def _put(out: Dataset, run: _Run, where: str, elem: DataElement, action: str, why: str, new: DataElement) -> None:
    out.add(new)
    _note(run, where, elem, action, why, new)


def _apply_override(elem: DataElement, override: Override, out: Dataset, run: _Run, table: Table, where: str) -> None:
    why = "profile override" + (f" ({override.justification})" if override.justification else "")
    action = override.action
    if action == "remove":
        _note(run, where, elem, "remove", why, None)
    elif action == "empty":
        _put(out, run, where, elem, "empty", why, DataElement(elem.tag, elem.VR, _empty(elem.VR)))
    elif action == "keep":
        new = _sequence(elem, run, table, where) if elem.VR == "SQ" else elem
        _put(out, run, where, elem, "keep", why, new)
    elif action == "uid":
        if elem.VR != "UI":  # a sequence or text would silently become one made-up UID
            raise DeidError(HoldCode.OVERRIDE, f"override 'uid' cannot apply to {where}, whose VR is {elem.VR}")
        _put(out, run, where, elem, "remap UID", why, _remap(elem, run))
    elif elem.VR in ("SQ", "UN") or elem.VR in _BINARY or elem.VR in _NUMERIC_BINARY:
        raise DeidError(HoldCode.OVERRIDE, f"override '{action}' cannot apply to {where}, whose VR is {elem.VR}")
    elif action == "replace":
        value = (override.value or "").format(
            project=run.labels.project, subject=run.labels.subject, session=run.labels.session
        )
        _put(out, run, where, elem, "replace", why, DataElement(elem.tag, elem.VR, _fit(value, elem.VR)))
    elif action == "pseudonym":
        _put(out, run, where, elem, "pseudonym", why, _map_values(elem, lambda v: _pseudo(run, v, elem.VR)))
    elif action == "shift-date":
        _put(out, run, where, elem, "shift date", why, _shift(elem, run, where))
    elif action == "lookup":

        def look(value: str) -> str:
            found = override.table.get(value.strip()) if override.table is not None else None
            if found is None:
                raise DeidError(
                    HoldCode.LOOKUP,
                    f"the lookup table {override.table_name or ''} has no entry for the value of {where}",
                )
            return found

        _put(out, run, where, elem, "lookup", why, _map_values(elem, look))
    elif action == "regex" and override.pattern is not None:
        pattern, replacement = override.pattern, override.replacement
        _put(out, run, where, elem, "regex", why, _map_values(elem, lambda v: pattern.sub(replacement, v)))
    else:  # pragma: no cover - the loader only builds the actions above
        raise DeidError(HoldCode.OVERRIDE, f"unknown override action for {where}")


def _sweep(elem: DataElement, out: Dataset, run: _Run, table: Table, where: str) -> None:  # noqa: PLR0912 - one branch per VR family
    """Attributes the table does not list: by VR."""
    vr = elem.VR
    options = run.profile.options
    if vr == "SQ":
        _put(out, run, where, elem, "process items", "not in E.1-1", _sequence(elem, run, table, where))
    elif vr == "UI":
        if int(elem.tag) in _STRUCTURAL_UID_TAGS or "retain-uids" in options:
            out.add(elem)
        else:
            _put(out, run, where, elem, "remap UID", "UID not in E.1-1", _remap(elem, run))
    elif vr in ("DA", "DT", "TM"):
        if "retain-longitudinal-full-dates" in options:
            out.add(elem)
        elif "retain-longitudinal-modified-dates" in options:
            if vr == "TM":
                out.add(elem)
            else:
                _put(out, run, where, elem, "shift date", "date not in E.1-1", _shift(elem, run, where))
        else:
            _note(run, where, elem, "remove", "date/time not in E.1-1, no longitudinal option", None)
    elif vr == "PN":
        _put(out, run, where, elem, "empty", "person name not in E.1-1", DataElement(elem.tag, "PN", ""))
    elif vr == "UN":
        _note(run, where, elem, "remove", "not in E.1-1 and undecodable (UN)", None)
    elif run.in_dummy and vr in _TEXT_VRS and vr != "CS" and str(elem.value or "").strip():
        _put(out, run, where, elem, "dummy", "text not in E.1-1, in a sequence it replaces (D)", _dummy(elem, run))
    else:
        out.add(elem)


def _private(
    elem: DataElement,
    out: Dataset,
    run: _Run,
    table: Table,
    creators: dict[int, str],
    kept_blocks: dict[int, str],
    where: str,
) -> None:
    tag = int(elem.tag)
    group, element = tag >> 16, tag & 0xFFFF
    if element < 0x1000 or group in (0x0001, 0x0003, 0x0005, 0x0007, 0xFFFF):
        if not 0x10 <= element <= 0xFF:
            _note(run, where, elem, "remove", "private", None)
        return  # creators are re-added only for blocks with a kept element
    creator_tag = (group << 16) | (element >> 8)
    creator = creators.get(creator_tag)
    if "retain-safe-private" in run.profile.options and creator is not None:
        for keep in run.profile.private_keep:
            if keep.group == group and keep.element == element & 0xFF and keep.creator == creator:
                kept_blocks[creator_tag] = creator
                if elem.VR == "SQ":  # kept, and its items processed like any other sequence's
                    new = _sequence(elem, run, table, where)
                else:
                    new = _remap(elem, run) if elem.VR == "UI" else elem
                _put(out, run, where, elem, "keep", f"safe private ({keep.justification})", new)
                return
    _note(run, where, elem, "remove", "private", None)


def _sequence(elem: DataElement, run: _Run, table: Table, where: str) -> DataElement:
    items = [_walk(item, run, table, f"{where}[{index}]/") for index, item in enumerate(elem.value or ())]
    return DataElement(elem.tag, "SQ", Sequence(items))


def _remap(elem: DataElement, run: _Run) -> DataElement:
    if elem.VR == "UN":
        raise DeidError(HoldCode.ENGINE, "a UID element could not be decoded")
    if int(elem.tag) in _STRUCTURAL_UID_TAGS:
        return elem
    return _map_values(elem, lambda value: UID(run.uid(value)), vr="UI")


def _map_values(elem: DataElement, function: Callable[[str], str], vr: str | None = None) -> DataElement:
    value = elem.value
    if value is None or value == "":
        return DataElement(elem.tag, vr or elem.VR, value)
    if isinstance(value, list | MultiValue):
        return DataElement(elem.tag, vr or elem.VR, [function(str(v)) for v in value])
    return DataElement(elem.tag, vr or elem.VR, function(str(value)))


def _empty(vr: str) -> object:
    if vr in _NUMERIC_BINARY:
        return None
    if vr in _BINARY or vr == "UN":
        return b""
    return ""


def _fit(value: str, vr: str) -> str:
    limit = _MAX_LENGTH.get(vr)
    return value[:limit] if limit else value


def _pseudo(run: _Run, value: str, vr: str) -> str:
    if not value.strip():
        return value
    return pseudonym(run.profile.key, value, min(16, _MAX_LENGTH.get(vr, 16)))


_DUMMY_BY_VR: dict[str, object] = {
    **_DUMMY_DATE,
    "IS": "0",
    "DS": "0",
    "AS": "000Y",
    **dict.fromkeys(_NUMERIC_BINARY, 0),
    **dict.fromkeys(_BINARY, b"\x00\x00"),
}


def _dummy(elem: DataElement, run: _Run) -> DataElement:
    vr = elem.VR
    if int(elem.tag) == 0x00080201:  # Timezone Offset From UTC: "&ZZXX" (PS3.3 C.12.1.1.8); UTC is no one's zone
        return DataElement(elem.tag, vr, "+0000")
    if vr in _DUMMY_BY_VR:
        return DataElement(elem.tag, vr, _DUMMY_BY_VR[vr])
    if vr in _TEXT_VRS:
        if not str(elem.value or "").strip():
            return DataElement(elem.tag, vr, "ANONYMIZED"[: _MAX_LENGTH.get(vr, 64)])
        return _map_values(elem, lambda v: _pseudo(run, v, vr) if v.strip() else "ANON")
    raise DeidError(HoldCode.ENGINE, f"no dummy value for VR {vr}")


def _shift(elem: DataElement, run: _Run, where: str) -> DataElement:
    vr = elem.VR
    if vr == "TM":
        return elem
    if vr not in ("DA", "DT"):
        raise DeidError(HoldCode.DATE, f"{where} is not a date (VR {vr}) and cannot be shifted")
    shift = shift_da if vr == "DA" else shift_dt

    def one(value: str) -> str:
        if not value.strip():
            return value
        try:
            return shift(value, run.date_offset)
        except ValueError:
            raise DeidError(
                HoldCode.DATE, f"{where} holds a value that is not a valid {vr}; it cannot be shifted"
            ) from None

    return _map_values(elem, one)


def _clean(elem: DataElement, run: _Run, where: str) -> DataElement:
    vr = elem.VR
    if vr in ("DA", "DT", "TM"):
        if "retain-longitudinal-full-dates" in run.profile.options:
            return elem
        return _shift(elem, run, where)
    if vr in _TEXT_VRS:
        return _map_values(elem, lambda value: _scrub(value, run.identifiers))
    if vr in _BINARY or vr == "UN":
        raise DeidError(HoldCode.ENGINE, f"{where} (VR {vr}) cannot be cleaned")
    return elem


def _scrub(value: str, identifiers: Iterable[str]) -> str:
    for identifier in identifiers:
        if identifier.lower() in value.lower():
            value = re.sub(re.escape(identifier), "", value, flags=re.IGNORECASE)
    return value


def _write_method(out: Dataset, profile: Profile) -> None:
    options = sorted(profile.options, key=lambda name: OPTION_CODES[name])
    out.PatientIdentityRemoved = "YES"
    method = [f"ingestd {ingestd.__version__}", f"PS3.15 E.1-1 {profile.edition}", f"profile {profile.name}"[:64]]
    if profile.source:
        method.append(f"rules {profile.source}"[:64])
    if profile.overrides or profile.private_keep:
        method.append("with local overrides")
    out.DeidentificationMethod = method
    codes = []
    for code in ["113100", *(OPTION_CODES[name] for name in options)]:
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = OPTION_MEANINGS[code]
        codes.append(item)
    out.DeidentificationMethodCodeSequence = Sequence(codes)
    if "retain-longitudinal-full-dates" in profile.options:
        out.LongitudinalTemporalInformationModified = "UNMODIFIED"
    elif "retain-longitudinal-modified-dates" in profile.options:
        out.LongitudinalTemporalInformationModified = "MODIFIED"
    else:
        out.LongitudinalTemporalInformationModified = "REMOVED"


def _file_meta(original: Dataset, out: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = out.get("SOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = out.get("SOPInstanceUID", "")
    old = getattr(original, "file_meta", None)
    syntax = old.get("TransferSyntaxUID") if old is not None else None
    if not syntax:
        raise DeidError(HoldCode.ENGINE, "the data set has no transfer syntax")
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta
