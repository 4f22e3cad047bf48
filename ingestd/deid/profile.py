"""A compiled de-identification profile: what the engine needs, already validated and loaded.

`ingestd.rules` builds these from the YAML (`profiles:` in a rules file), reading keys and lookup tables;
the engine (`ingestd.deid.engine`) only reads them. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ingestd.patterns import Regex

__all__ = ["BurnedIn", "Override", "OverrideAction", "PrivateKeep", "Profile", "Rectangle", "Region", "RegionTest"]

OverrideAction = Literal[
    "remove",  # X: delete the element (a sequence with all its items)
    "empty",  # Z: keep it with a zero-length value
    "replace",  # D: a literal or a template over {project}, {subject}, {session}
    "keep",  # K: unchanged (a sequence is entered and its items processed)
    "uid",  # U: keyed UID remap of every value
    "pseudonym",  # D: keyed text pseudonym, within the VR's length limit
    "shift-date",  # C: DA/DT shifted by the patient's offset (TM unchanged)
    "lookup",  # D: value replaced from a table; a value not in it holds the study
    "regex",  # C: pattern.sub(replacement, value), Python's re.sub on RE2 (ingestd.patterns)
]


@dataclass(frozen=True, slots=True)
class Override:
    """One `attributes:` entry of a profile: the action for one tag, wherever it occurs."""

    tag: int
    action: OverrideAction
    value: str | None = None  # replace: the literal or template
    pattern: Regex | None = None  # regex
    replacement: str = ""  # regex
    table: Mapping[str, str] | None = None  # lookup: original value -> new value
    table_name: str | None = None  # lookup: where the table came from, for messages
    justification: str | None = None  # required when the action weakens the standard


@dataclass(frozen=True, slots=True)
class PrivateKeep:
    """A private element kept under retain-safe-private: by its block's creator, never by raw element number."""

    creator: str
    group: int  # odd
    element: int  # the low byte, 0x00-0xFF, within the creator's block
    justification: str


BurnedIn = Literal[
    "hold",  # every instance that may carry burned-in text is held for a person
    "trust-header",  # ... unless its Burned In Annotation says NO
    "clean",  # ... cleaned by the first matching region (ingestd.deid.pixels), held when none matches
]


@dataclass(frozen=True, slots=True)
class Rectangle:
    """An area of every frame blacked out, in pixels from the top left corner (0, 0)."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class RegionTest:
    """One condition of a region's `when`: the attribute's value (any of them, when it has several) is one of
    `values`, or `pattern` finds a match in it (RE2, as `matches` in rules)."""

    keyword: str  # a DICOM keyword (Manufacturer, Rows, ImageType, ...); SOPClassUID for `sop_class`
    values: frozenset[str] = frozenset()
    pattern: Regex | None = None


@dataclass(frozen=True, slots=True)
class Region:
    """One `pixels.regions` entry: which instances it applies to, and what to black out in them."""

    name: str
    when: tuple[RegionTest, ...]
    rectangles: tuple[Rectangle, ...]


@dataclass(frozen=True, slots=True)
class Profile:
    """One de-identification profile, compiled."""

    name: str
    key: bytes = field(repr=False)  # the project's secret: UIDs, pseudonyms and date offsets derive from it
    options: frozenset[str] = frozenset()  # E.3 option names from ingestd.deid.table.SUPPORTED_OPTIONS
    edition: str = "2026c"
    date_shift_days: tuple[int, int] = (30, 730)  # keyed per-patient offset range, in days into the past
    overrides: Mapping[int, Override] = field(default_factory=dict)
    private_keep: tuple[PrivateKeep, ...] = ()
    burned_in: BurnedIn = "hold"
    regions: tuple[Region, ...] = ()  # with burned_in "clean": the first that matches an instance cleans it
    max_decoded_bytes: int = 1 << 30  # an instance whose decoded Pixel Data is larger is held, not cleaned
    compress: Literal["none", "rle"] = "none"  # cleaned frames stored uncompressed, or RLE Lossless
    source: str = ""  # "rules.yaml@<sha256 prefix>", written into De-identification Method
