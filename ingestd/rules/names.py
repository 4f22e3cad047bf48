"""Names a rules file may use: DICOM keywords, source fields, tags and SOP classes, with did-you-mean hints.

Pure lookups in pydicom's static dictionaries; nothing here does I/O.
"""

from __future__ import annotations

import difflib
import re
from functools import cache

from pydicom._uid_dict import UID_dictionary
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag

from ingestd.header import is_valid_uid

__all__ = [
    "SERIES_FIELDS",
    "SOURCE_FIELDS",
    "check_field",
    "did_you_mean",
    "is_keyword",
    "parse_tag",
    "sop_class_uid",
    "tag_name",
    "tag_vr",
]

SOURCE_FIELDS = ("calling_aet", "called_aet", "drop_folder", "path")  # where and how the study arrived
SERIES_FIELDS = ("sop_class",)  # a series' SOP Class UID, by UID or pydicom keyword

_NOT_TEXT_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_HEX_TAG = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,?\s*([0-9A-Fa-f]{4})\s*\)?$")


def did_you_mean(word: str, candidates: tuple[str, ...] | list[str]) -> str:
    """Return ` (did you mean 'X'?)` for the candidate closest to `word`, or an empty string."""
    lowered = {candidate.lower(): candidate for candidate in candidates}
    if word.lower() in lowered:
        return f" (did you mean '{lowered[word.lower()]}'?)"
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.75)
    if not close:
        close = [lowered[c] for c in difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.75)]
    if not close:
        close = sorted(c for c in candidates if c.lower().startswith(word.lower()))[:1] if len(word) >= 4 else []
    return f" (did you mean '{close[0]}'?)" if close else ""


@cache
def _keywords() -> tuple[str, ...]:
    return tuple(keyword for keyword in keyword_dict if keyword)


def is_keyword(name: str) -> bool:
    """Say whether `name` is a keyword in pydicom's data dictionary."""
    return name in keyword_dict


def check_field(name: str, extra: tuple[str, ...]) -> None:
    """Raise ValueError unless `name` is one of `extra` or the keyword of an element with a text value
    (rules never see sequences or binary values), with a did-you-mean hint for a misspelling."""
    if name in extra:
        return
    if not is_keyword(name):
        raise ValueError(f"unknown DICOM keyword '{name}'{did_you_mean(name, list(extra) + list(_keywords()))}")
    vr = tag_vr(int(keyword_dict[name])) or ""
    if any(part in _NOT_TEXT_VRS for part in vr.split(" or ")):
        raise ValueError(f"{name} has VR {vr}: rules see only elements with text values, not sequences or binary data")


def parse_tag(text: str) -> int:
    """Parse a pydicom keyword or a hex tag "(gggg,eeee)", "gggg,eeee" or "ggggeeee" into its integer."""
    match = _HEX_TAG.match(text.strip())
    if match:
        return int(match.group(1), 16) << 16 | int(match.group(2), 16)
    name = text.strip()
    if is_keyword(name):
        return int(keyword_dict[name])
    raise ValueError(
        f"unknown DICOM keyword '{name}'{did_you_mean(name, _keywords())}; "
        'a tag is a keyword or a hex tag such as "(0010,0020)"'
    )


def tag_name(tag: int) -> str:
    """`PatientID (0010,0020)`, or just `(0019,100A)` for a tag without a keyword."""
    hex_tag = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    keyword = keyword_for_tag(tag)
    return f"{keyword} {hex_tag}" if keyword else hex_tag


def tag_vr(tag: int) -> str | None:
    """The tag's VR in the data dictionary, or None for a tag it does not know."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


@cache
def _sop_classes() -> dict[str, str]:
    return {entry[4]: uid for uid, entry in UID_dictionary.items() if entry[1] == "SOP Class" and entry[4]}


def sop_class_uid(text: str) -> str:
    """Resolve a SOP Class UID or a pydicom SOP class keyword (e.g. SecondaryCaptureImageStorage) to its UID."""
    name = text.strip()
    if is_valid_uid(name):
        return name
    classes = _sop_classes()
    if name in classes:
        return classes[name]
    raise ValueError(
        f"'{name}' is neither a UID nor a SOP class keyword{did_you_mean(name, list(classes))} "
        "(e.g. 1.2.840.10008.5.1.4.1.1.7 or SecondaryCaptureImageStorage)"
    )
