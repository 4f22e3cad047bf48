"""Repeating groups that go whole: an Overlay Plane (60xx) or a Curve (50xx) whose data the profile removes.

Table E.1-1 lists only Overlay Data (60xx,3000) and Overlay Comments (60xx,4000) of an overlay group; removing the
data alone leaves Overlay Rows, Columns, Type, Origin, Bits Allocated and Bit Position behind, and the instance
then has an Overlay Plane without its Type 1 data (dciodvfy: "Overlay Data missing"). So when (gggg,3000) goes
(table code X, or a 'remove' override), every element of group gggg goes with it. With clean-graphics (code C)
or an override that keeps the data, the group stays as before.

An overlay stored in the unused high bits of Pixel Data (old style: no (60xx,3000), Overlay Bits Allocated 16)
has no data element to remove: its group stays, its bits stay in the pixels (pixel cleaning is not done here).
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from ingestd.deid.profile import Profile
from ingestd.deid.table import Table

__all__ = ["removed_groups"]

_KINDS = {0x5000: "Curve Data", 0x6000: "Overlay Data"}
# (gggg,3000) of the 16 curve and 16 overlay groups: 5000-501E and 6000-601E, even (PS3.5 7.6).
_DATA_TAGS = tuple((base + offset) << 16 | 0x3000 for base in (0x5000, 0x6000) for offset in range(0, 0x20, 2))


def _removes(tag: int, profile: Profile, table: Table) -> str | None:
    """Why the profile removes the element `tag`, or None when it keeps it in any form."""
    override = profile.overrides.get(tag)
    if override is not None:
        return "profile override" if override.action == "remove" else None
    entry = table.lookup(tag)
    if entry is None or entry.code(profile.options) != "X":
        return None
    return f"E.1-1 {entry.basic}"


def removed_groups(ds: Dataset, profile: Profile, table: Table) -> dict[int, str]:
    """Groups 50xx/60xx of `ds` (top level) to remove whole -> why."""
    found: dict[int, str] = {}
    keys = ds.keys()  # membership in the keys view: no element is read or converted, no tag parsed
    for data in _DATA_TAGS:
        if data in keys:
            group = data >> 16
            why = _removes(data, profile, table)
            if why is not None:
                kind = _KINDS[group & 0xFF00]
                found[group] = f"{why}: {kind} ({group:04X},3000) goes, and with it its whole group {group:04X}"
    return found
