"""Attaching non-DICOM files to sessions: a rule's compiled `attach:` entries, and where each file goes.

Pure: paths and labels in, decisions out; nothing here does I/O. The intake asks `attachable` whether any rule in
force would take a file that is not DICOM (else it goes to quarantine); the router of attachment sets
(`ingestd.pipeline.attach`) asks where each file of a set goes.
"""

from __future__ import annotations

from ingestd.rules.attachment import Attach
from ingestd.rules.match import RuleSet

__all__ = ["Attach", "attachable"]


def attachable(rules: RuleSet, relative: str) -> bool:
    """Whether some rule in force attaches a file at `relative` (its path below the drop folder or import root,
    archives opened): the intake keeps such a file that is not DICOM instead of quarantining it."""
    return any(entry.match.fullmatch(relative) for rule in rules.rules for entry in rule.attach)
