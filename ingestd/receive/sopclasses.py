"""The storage SOP classes the listener accepts: every standard one pydicom and pynetdicom know, retired included,
and the private ones the lab lists in `listener.extra_sop_classes`.

pynetdicom's `AllStoragePresentationContexts` offers 170 classes, none of them retired: an old ultrasound
scanner's Ultrasound Image Storage (retired, 1.2.840.10008.5.1.4.1.1.6) or a Siemens scanner's CSA Non-Image
(private, 1.3.12.2.1107.5.9.1) was rejected at negotiation, and the study arrived without those series. The
standard's storage classes of non-patient objects (hanging protocols, colour palettes, implant templates,
protocols, inventories) carry no study and are left out, as are Storage Commitment, the DICOMDIR's class and
Print Management's stored prints.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

from pydicom._uid_dict import UID_dictionary
from pynetdicom import sop_class

__all__ = ["sop_class_name", "storage_sop_classes"]

# Storage Commitment, the Media Storage Directory (DICOMDIR) and Print Management's stored prints and hardcopies.
_NOT_STORED = ("1.2.840.10008.1.20.", "1.2.840.10008.1.3.10", "1.2.840.10008.5.1.1.")


@functools.cache
def _standard() -> dict[str, str]:
    """UID -> name of every standard storage SOP class for patient objects, retired ones included."""
    excluded = set(sop_class._NON_PATIENT_OBJECT_CLASSES.values())  # hanging protocols, palettes, templates, ...
    classes: dict[str, str] = {}
    for keyword, uid in sop_class._STORAGE_CLASSES.items():  # pynetdicom's own storage table
        entry = UID_dictionary.get(uid)
        classes[str(uid)] = entry[0] if entry is not None else keyword
    for uid, (name, kind, _info, retired, _keyword) in UID_dictionary.items():
        if kind != "SOP Class" or "Storage" not in name or uid in excluded or uid.startswith(_NOT_STORED):
            continue
        classes.setdefault(str(uid), f"{name} (Retired)" if retired and "Retired" not in name else name)
    return classes


def storage_sop_classes(extra: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
    """UID -> name of every storage SOP class the listener accepts: the standard's, then `extra` (uid, name)."""
    classes = dict(_standard())
    for uid, name in extra:
        classes.setdefault(uid, name)
    return classes


def sop_class_name(uid: str, extra: Mapping[str, str] | None = None) -> str:
    """What to call a SOP class (or any abstract syntax) in a log line: its name, or `unknown`."""
    if extra is not None and uid in extra:
        return extra[uid]
    entry = UID_dictionary.get(uid)
    return str(entry[0]) if entry is not None else "unknown"
