"""Attaching non-DICOM files to sessions: which files a rule takes, where each goes, and which rule routes an
upload that has no DICOM.

Pure: paths and labels in, decisions out; nothing here does I/O. The intake asks `attachable` whether any rule in
force would take a file that is not DICOM (else it goes to quarantine); the router of attachment sets
(`ingestd.pipeline.attach`) asks `files_only_decision` where an upload without DICOM goes and `place_files` where
each file of a set goes; `explain` and `import --dry-run` show `explain_attachments`. Problems and hold reasons
name entries and templates (`attach.1 resource "{path[2]}"`), never a file name or a label's value; only the
explanations, written for the operator at a terminal, show paths.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from ingestd.patterns import Regex
from ingestd.rules.attachment import RESOURCE_LABEL, SCAN_ID, Attach
from ingestd.rules.conditions import StudyFacts, glob_pattern
from ingestd.rules.labels import Field, LabelError, Template, render
from ingestd.rules.match import Held, Routed, Rule, RuleSet, route_files
from ingestd.rules.when import explain_when, when_holds
from ingestd.states import HoldCode

__all__ = [
    "RESOURCE_LABEL",
    "SCAN_ID",
    "Attach",
    "Placed",
    "Placement",
    "attachable",
    "explain_attachments",
    "explain_files_only",
    "files_only_decision",
    "kept_name",
    "place_files",
    "replacement_extension",
]

# The extension a replaced name keeps: one short suffix of letters and digits (`.pdf`, `.PAR`), or a compressed
# one after a known format (`.tar.gz`, `.nii.gz`): never a second suffix that could be part of a person's name
# (`john.smith.pdf` keeps `.pdf`).
_EXTENSION = re.compile(r"^\.[A-Za-z0-9]{1,8}$")
_COMPRESSED = frozenset({"gz", "bz2", "xz", "zst", "z", "lz4"})
_COMPOUND = frozenset({"tar", "nii", "csv", "tsv", "txt", "json", "log", "par", "rec", "img", "hdr", "mat", "dcm"})
_CATALOG = "_catalog.xml"
_LOCK = ".~lock-"


@dataclass(frozen=True, slots=True)
class Placed:
    """Where one file goes: a resource at a level (`scan` is the scan ID at level scan, else ""), and its path
    inside the resource; `entry` is the index of the `attach:` entry that took it."""

    level: str
    scan: str
    resource: str
    name: str
    entry: int


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the files of a set go, by their relative path; the files no entry takes; and the problems that keep the
    set from being sent (each free of file names and values; the router holds the set with the first). With
    problems, `placed` may lack the files whose labels could not be built."""

    placed: dict[str, Placed]
    unmatched: tuple[str, ...]
    problems: tuple[str, ...]


def attachable(rules: RuleSet, relative: str) -> bool:
    """Whether some rule in force attaches a file at `relative` (its path below the drop folder or import root,
    archives opened): the intake keeps such a file that is not DICOM instead of quarantining it."""
    return any(entry.match.fullmatch(relative) for rule in rules.rules for entry in rule.attach)


def _entry(rule: Rule, relative: str) -> Attach | None:
    """The first of the rule's entries whose glob matches the file: it decides."""
    return next((entry for entry in rule.attach if entry.match.fullmatch(relative)), None)


# --- names inside the resource ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _folder_glob(text: str) -> Regex:
    return glob_pattern(text)


def kept_name(entry: Attach, relative: str) -> str:
    """The file's path inside the resource when names are kept: below the folder the glob's part before a final
    `/**` matches (the shortest such folder, when `**` earlier in the glob allows several), else its base name."""
    parts = PurePosixPath(relative).parts
    if entry.match_text == "**":
        return relative
    if entry.match_text.endswith("/**"):
        folder = _folder_glob(entry.match_text[:-3])
        for depth in range(1, len(parts)):
            if folder.fullmatch("/".join(parts[:depth])):
                return "/".join(parts[depth:])
    return parts[-1] if parts else relative


def replacement_extension(name: str) -> str:
    """The extension a replaced name keeps (`.pdf`, `.PAR`, `.tar.gz`, `.nii.gz`), or "" when it has none that is
    short and harmless."""
    suffixes = PurePosixPath(name).suffixes
    if not suffixes or not _EXTENSION.match(suffixes[-1]):
        return ""
    last = suffixes[-1]
    if len(suffixes) > 1 and last[1:].lower() in _COMPRESSED and suffixes[-2][1:].lower() in _COMPOUND:
        return suffixes[-2] + last
    return last


def _name_problem(name: str) -> str | None:
    """Why XNAT would refuse a path inside a resource (docs/xnat-resources.md §3), or None."""
    components = name.split("/")
    if any(component in ("", ".", "..") for component in components):
        return "a path inside the resource has an empty, '.' or '..' component"
    if name.endswith(_CATALOG):
        return f"a file name ends in '{_CATALOG}', which XNAT refuses to catalog: rename the file"
    if any(component.startswith(_LOCK) for component in components):
        return f"a file name starts with '{_LOCK}' (an office lock file), which XNAT refuses: remove the file"
    return None


# --- labels of resources and scans -----------------------------------------------------------------------------


def _resolver(relative: str, labels: Mapping[str, str]) -> Callable[[Field], str]:
    folders = PurePosixPath(relative).parts[:-1]

    def resolve(ref: Field) -> str:
        if ref.name == "path":
            index = ref.index or 0
            if index >= len(folders):
                deep = f"{index + 1} folder{'' if index == 0 else 's'}"
                raise LabelError(f"{ref.label} is missing: a file lies fewer than {deep} deep")
            return folders[index]
        if ref.name in labels:
            return labels[ref.name]
        raise LabelError(f"{ref.label} is not known for these files")

    return resolve


def _render(rule: Rule, entry: Attach, what: str, template: Template, relative: str, labels: Mapping[str, str]) -> str:
    """A resource label or scan ID as written (not sanitized: a label XNAT would refuse is a problem, not changed)."""
    try:
        return render(template, _resolver(relative, labels), rule.label_key)
    except LabelError as exc:
        raise LabelError(f'attach.{entry.index} {what} "{template.text}": {exc}') from None


def place_files(rule: Rule, relatives: Sequence[str], labels: Mapping[str, str]) -> Placement:
    """Where each file goes by the rule's `attach:` entries (the first whose glob matches decides), with the route's
    `labels` (project, subject, session) for the templates.

    Names are kept (see `kept_name`), or with `rule.attach_names == "replace"` become `<resource>_<NNNN><ext>`,
    numbered from 1 per resource in the order of the sorted paths. A problem is a label or scan ID XNAT would
    refuse, a template that cannot be built, two files with the same path in one resource, or a name XNAT refuses.
    """
    placed: dict[str, Placed] = {}
    unmatched: list[str] = []
    problems: list[str] = []
    counters: Counter[tuple[str, str, str]] = Counter()
    for relative in sorted(set(relatives)):
        entry = _entry(rule, relative)
        if entry is None:
            unmatched.append(relative)
            continue
        try:
            resource = _render(rule, entry, "resource", entry.resource, relative, labels)
            scan = _render(rule, entry, "scan", entry.scan, relative, labels) if entry.scan is not None else ""
        except LabelError as exc:
            problems.append(str(exc))
            continue
        if not RESOURCE_LABEL.match(resource):
            problems.append(
                f'attach.{entry.index} resource "{entry.resource.text}": XNAT would refuse the label built for a '
                "file (1 to 64 letters, digits, '_' or '-', starting with a letter)"
            )
        if entry.scan is not None and not SCAN_ID.match(scan):
            problems.append(
                f'attach.{entry.index} scan "{entry.scan.text}": XNAT would refuse the scan ID built for a file '
                "(1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit)"
            )
        if rule.attach_names == "replace":
            counters[entry.level, scan, resource] += 1
            number = counters[entry.level, scan, resource]
            name = f"{resource}_{number:04d}{replacement_extension(PurePosixPath(relative).name)}"
        else:
            name = kept_name(entry, relative)
        problem = _name_problem(name)
        if problem is not None:
            problems.append(f"attach.{entry.index}: {problem}")
        placed[relative] = Placed(entry.level, scan, resource, name, entry.index)
    problems += _collisions(rule, placed)
    return Placement(placed, tuple(unmatched), tuple(dict.fromkeys(problems)))


def _collisions(rule: Rule, placed: Mapping[str, Placed]) -> list[str]:
    """Two files that would have the same path in the same resource: one would overwrite the other."""
    seen = Counter((place.level, place.scan, place.resource, place.name) for place in placed.values())
    problems: list[str] = []
    for place in placed.values():
        if seen[place.level, place.scan, place.resource, place.name] > 1:
            entry = rule.attach[place.entry]
            problems.append(
                f'attach.{entry.index} resource "{entry.resource.text}": two files would have the same path in '
                "the resource: match them with a glob ending in '/**' to keep their folders, or rename them"
            )
    return problems


# --- uploads without DICOM -------------------------------------------------------------------------------------


def files_only_decision(rules: RuleSet, facts: StudyFacts) -> Routed | Held:
    """Route files that came without DICOM (`facts.series` empty; `facts.paths` the files' relative paths; the drop
    folder) by the first rule that can (`Rule.files_only`) whose `when` holds: the labels a study of these files
    would get. Held UNROUTED when no such rule matches, LABEL when the files disagree on a label."""
    candidates = [rule for rule in rules.rules if rule.files_only]
    for rule in candidates:
        if when_holds(rule.when, facts):
            return route_files(rule, facts)
    count = len(candidates)
    tried = f"{count} such rule{'' if count == 1 else 's'} tried"
    return Held(
        reason=f"no rule that attaches files without DICOM matches these files ({tried})", code=HoldCode.UNROUTED
    )


# --- explanations (show paths: for the operator only) ----------------------------------------------------------


def _where(place: Placed) -> str:
    if place.level == "scan":
        return f"scan {place.scan} resource {place.resource}"
    return f"{place.level} resource {place.resource}"


def explain_attachments(rule: Rule, relatives: Sequence[str], labels: Mapping[str, str]) -> list[str]:
    """Lines for `ingestd explain` and `import --dry-run`: where each file would go, which ones no entry takes
    (quarantined), and the problem that would hold the set. Shows paths: never log these lines."""
    if not rule.attach:
        return [f"  attach: rule '{rule.name}' attaches no files; {len(relatives)} quarantined"]
    placement = place_files(rule, relatives, labels)
    names = "kept" if rule.attach_names == "keep" else "replaced by the resource label and a counter"
    lines = [f"  attach: {len(relatives)} file{'' if len(relatives) == 1 else 's'} (names {names})"]
    for relative in sorted(set(relatives)):
        place = placement.placed.get(relative)
        if place is not None:
            entry = rule.attach[place.entry]
            by = f'attach.{entry.index} "{entry.match_text}"'
            lines.append(f"    {relative} -> {_where(place)}, as {place.name} ({by})")
        elif relative in placement.unmatched:
            lines.append(f"    {relative}: no attach entry of rule '{rule.name}' matches: quarantined")
        else:
            lines.append(f"    {relative}: its labels cannot be built (see the problem below)")
    lines += [f"  attach: held ({HoldCode.LABEL}): {problem}" for problem in placement.problems[:1]]
    lines += [f"  attach: also: {problem}" for problem in placement.problems[1:]]
    return lines


def explain_files_only(rules: RuleSet, facts: StudyFacts) -> list[str]:
    """Lines for `ingestd explain` of files without DICOM: each rule that can route them, tried in order, with
    its conditions and the values seen, and the decision. Shows values: never log these lines."""
    lines = [f"{len(facts.paths)} file{'' if len(facts.paths) == 1 else 's'} without DICOM"]
    for rule in rules.rules:
        if not rule.files_only:
            lines.append(f"rule '{rule.name}' ({rule.origin}): cannot route files without DICOM (skipped)")
            continue
        holds, explained = explain_when(rule.when, facts)
        lines.append(f"rule '{rule.name}' ({rule.origin}): {'matches' if holds else 'does not match'}")
        lines += explained
        if holds:
            break
    decision = files_only_decision(rules, facts)
    if isinstance(decision, Routed):
        lines.append(
            f"decision: routed by rule '{decision.rule}': project {decision.project}, subject {decision.subject}, "
            f"session {decision.session}"
        )
    else:
        lines.append(f"decision: held ({decision.code}): {decision.reason}")
    return lines
