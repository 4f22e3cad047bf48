"""A rule's compiled `attach:` entry (`ingestd.rules.attach` decides with it; `ingestd.rules.match.Rule` holds it)."""

from __future__ import annotations

from dataclasses import dataclass

from ingestd.patterns import Regex
from ingestd.rules.labels import Template

__all__ = ["Attach"]


@dataclass(frozen=True, slots=True)
class Attach:
    """One compiled `attach:` entry of a rule."""

    match: Regex  # the glob (ingestd.rules.conditions.glob_pattern) over the file's path below its folder
    match_text: str  # the glob as written
    resource: Template  # the resource label
    level: str  # `session`, `scan` or `subject`
    scan: Template | None  # the scan ID, at level `scan`
    index: int  # its place in the rule's list (`attach.0`)
