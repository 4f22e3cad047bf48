"""A rule's compiled `attach:` entry, the labels XNAT takes for resources and scans, and which rules can route
files without DICOM (`ingestd.rules.attach` decides with them; `ingestd.rules.match.Rule` holds them)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ingestd.patterns import Regex
from ingestd.rules.labels import Template
from ingestd.rules.when import When

__all__ = [
    "ATTACH_FIELDS",
    "FILES_ONLY_CONDITIONS",
    "FILES_ONLY_LABEL_FIELDS",
    "LEVELS",
    "RESOURCE_LABEL",
    "SCAN_ID",
    "Attach",
    "is_files_only",
]

# A resource label XNAT takes as a label (docs/xnat-resources.md §3): it starts with a letter (a label of digits is
# read as a resource's numeric ID and refused with 403), has no comma (which addresses several resources), no
# space (so none of HackCheck's `SELECT ` words), quote or backslash, and is at most 64 characters.
RESOURCE_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
# An XNAT scan ID as ingestd addresses one in a URL: letters, digits, '_', '.', '-', starting with a letter or digit.
SCAN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LEVELS = ("session", "scan", "subject")
# The fields a resource label or scan ID template may use: path[N] of the file's own folders, and the route's labels.
ATTACH_FIELDS = ("path", "project", "subject", "session")
# What a rule that routes files without DICOM may look at, and build its labels from: no header exists.
FILES_ONLY_CONDITIONS = frozenset({"drop_folder", "path"})
FILES_ONLY_LABEL_FIELDS = frozenset({"path", "drop_folder", "project", "subject"})


@dataclass(frozen=True, slots=True)
class Attach:
    """One compiled `attach:` entry of a rule."""

    match: Regex  # the glob (ingestd.rules.conditions.glob_pattern) over the file's path below its folder
    match_text: str  # the glob as written
    resource: Template  # the resource label
    level: str  # `session`, `scan` or `subject`
    scan: Template | None  # the scan ID, at level `scan`
    index: int  # its place in the rule's list (`attach.0`)

    @property
    def is_literal(self) -> bool:
        """Whether its resource label (and scan ID) is the rule's own text: safe to log as it is. One built from
        folders or labels (`{path[0]}`, `{subject}`) may hold an identifying value: logs name it by a digest."""
        return self.resource.is_literal and (self.scan is None or self.scan.is_literal)


def _conditions(when: When) -> Iterable[str]:
    """The field of every condition of a `when`, through its `any`, `all` and `not` groups."""
    yield from (condition.field for condition in when.conditions)
    for part in (*(when.any_of or ()), *(when.all_of or ()), *((when.none_of,) if when.none_of else ())):
        yield from _conditions(part)


def is_files_only(when: When, labels: Iterable[Template], attach: tuple[Attach, ...]) -> bool:
    """Whether a rule can route an upload that has no DICOM: it attaches files, its `when` looks only at where the
    files came from (`drop_folder`, `path`), and its route's labels are built from literals, `path[N]`,
    `drop_folder` and earlier labels, never from a header."""
    return (
        bool(attach)
        and all(field in FILES_ONLY_CONDITIONS for field in _conditions(when))
        and all(field.name in FILES_ONLY_LABEL_FIELDS for template in labels for field in template.fields)
    )
