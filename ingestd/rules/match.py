"""Matching a study against compiled rules: conditions, the routing decision, and its explanation.

Pure: a `StudyFacts` (header values of one representative instance per series, and where the study came from)
goes in, a `Routed` or `Held` comes out. Hold reasons name rules, templates and keywords, never a DICOM value;
only `explain_match`, written for the operator at a terminal, shows values.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath

from ingestd.deid.profile import Profile
from ingestd.patterns import PatternError, Regex, compile_regex, escape
from ingestd.rules.labels import Field, LabelError, Template, make_label
from ingestd.states import HoldCode

__all__ = [
    "Condition",
    "Held",
    "Route",
    "Routed",
    "Rule",
    "RuleSet",
    "SeriesFacts",
    "StudyFacts",
    "decide",
    "explain_match",
    "glob_pattern",
]

# A pattern or glob looks at the first this many characters of a value: more than any header value whose VR has a
# maximum length (LT: 10,240), so that only UT, UC and UR values, and values longer than their VR allows (a file
# may say anything), are cut. It bounds the time one hostile value can cost the router (see ingestd.patterns).
MATCHED_CHARACTERS = 16_384
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_STRIP = " \t\r\n\x00"


@dataclass(frozen=True, slots=True)
class SeriesFacts:
    """One series: its UID, how many instances it has, and the header values of one representative instance."""

    series_uid: str
    instance_count: int
    headers: Mapping[str, str | tuple[str, ...]]  # keyword -> value, or values when VM > 1, in string form
    sop_class_uid: str


@dataclass(frozen=True, slots=True)
class StudyFacts:
    """What the rules see of a study."""

    study_uid: str
    series: tuple[SeriesFacts, ...]
    calling_aet: str | None = None
    called_aet: str | None = None
    drop_folder: str | None = None  # the configured drop folder's path
    paths: tuple[str, ...] = ()  # relative paths of the dropped files, '/'-separated; empty for C-STORE


@dataclass(frozen=True, slots=True)
class Routed:
    """The study goes to XNAT: where, with which profile, and which series."""

    rule: str
    server: str
    project: str
    subject: str
    session: str
    archive: bool
    profile: str | None
    kept_series: tuple[str, ...]
    dropped_series: tuple[tuple[str, int, str], ...]  # (series UID, instance count, reason)


@dataclass(frozen=True, slots=True)
class Held:
    """The study waits for a person; `code` is one of states.HoldCode (empty, unrouted, all-series-dropped, label)."""

    reason: str
    code: HoldCode
    rule: str | None = None  # the rule that matched, when one did


@dataclass(frozen=True, slots=True)
class Condition:
    """One compiled condition on a field; every operator given must hold."""

    field: str  # a DICOM keyword, a source field (calling_aet, called_aet, drop_folder, path) or sop_class
    text: str  # the operators as written, for explanations: "in [MR, PT]"
    equals: str | None = None
    one_of: frozenset[str] | None = None
    pattern: Regex | None = None  # on RE2: time linear in the value, whatever the pattern
    glob: Regex | None = None
    present: bool = False
    missing: bool = False
    lt: float | None = None
    le: float | None = None
    gt: float | None = None
    ge: float | None = None

    @property
    def per_series(self) -> bool:
        """Whether the field is read from each series (a header or sop_class) rather than from the study's source."""
        return self.field not in ("calling_aet", "called_aet", "drop_folder", "path")

    def holds(self, values: tuple[str, ...]) -> bool:
        """Whether the condition holds for these values (empty: the field is missing or empty)."""
        if not values:
            return self.missing
        if self.missing:
            return False
        tests: list[Callable[[str], bool]] = []
        if self.equals is not None:
            tests.append(self.equals.__eq__)
        if self.one_of is not None:
            tests.append(self.one_of.__contains__)
        if self.pattern is not None:
            tests.append(partial(_search, self.pattern))
        if self.glob is not None:
            tests.append(partial(_fullmatch, self.glob))
        for bound, compare in (
            (self.lt, float.__lt__),
            (self.le, float.__le__),
            (self.gt, float.__gt__),
            (self.ge, float.__ge__),
        ):
            if bound is not None:
                tests.append(_numeric(compare, bound))
        return all(any(test(value) for value in values) for test in tests)


def _search(pattern: Regex, value: str) -> bool:
    return pattern.search(value[:MATCHED_CHARACTERS])


def _fullmatch(pattern: Regex, value: str) -> bool:
    return len(value) <= MATCHED_CHARACTERS and pattern.fullmatch(value)


def _numeric(compare: Callable[[float, float], bool], bound: float) -> Callable[[str], bool]:
    def test(value: str) -> bool:
        return bool(_NUMBER.match(value)) and compare(float(value), bound)

    return test


def glob_pattern(pattern: str) -> Regex:
    """Compile a path glob (on RE2, as every pattern): `*` and `?` stay within one folder, `[...]` is a character
    class, and a `**` component matches any number of folders (none included). Raise ValueError for a misplaced
    `**` or a character class RE2 refuses."""
    if pattern.startswith("/"):
        raise ValueError("a path glob is relative to the drop folder: remove the leading '/'")
    components = pattern.split("/")
    regex: list[str] = []
    for position, component in enumerate(components):
        last = position == len(components) - 1
        if component == "**":
            regex.append(".*" if last else "(?:[^/]+/)*")
            continue
        if "**" in component:
            raise ValueError("'**' must be a whole path component, as in 'scans/**/*.dcm'")
        regex.append(_glob_component(component) + ("" if last else "/"))
    try:
        return compile_regex("".join(regex), dot_all=True)
    except PatternError as exc:
        raise ValueError(f"not a valid path glob: {exc}") from None


def _glob_component(component: str) -> str:
    out: list[str] = []
    position = 0
    while position < len(component):
        char = component[position]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and (end := component.find("]", position + 2)) > 0:
            body = component[position + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            out.append(("[^/" if negate else "[") + body.replace("\\", "\\\\").replace("^", "\\^") + "]")
            position = end
        else:
            out.append(escape(char))
        position += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a matching study goes: an XNAT server, and label templates."""

    server: str
    project: Template
    subject: Template
    session: Template
    archive: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule."""

    name: str
    when: tuple[Condition, ...]
    route: Route
    drop_series: tuple[tuple[Condition, ...], ...] = ()
    anonymize: str | None = None
    source: Path = Path()
    line: int = 0
    label_key: bytes | None = field(default=None, repr=False)  # the profile's key, or route.key
    # Without `anonymize`: (label, field) for each label built from a raw identifying value ({PatientID}, path[1]):
    # sent to XNAT as it is (the lab's choice), but named by a digest in logs.
    identifying_labels: tuple[tuple[str, str], ...] = ()

    @property
    def origin(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Every rule in order, the profiles they use, the files they came from and a version of those files."""

    rules: tuple[Rule, ...]
    profiles: Mapping[str, Profile]
    sources: tuple[Path, ...]
    version: str  # first 12 hex characters of the sha256 of the files' bytes, concatenated in order
    profile_sources: Mapping[str, Path] = field(default_factory=dict)


# --- values ------------------------------------------------------------------------------------------------


def _clean(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    raw = (value,) if isinstance(value, str) else value
    return tuple(cleaned for item in raw if (cleaned := str(item).strip(_STRIP)))


def _series_values(condition: Condition, series: SeriesFacts) -> tuple[str, ...]:
    if condition.field == "sop_class":
        return _clean(series.sop_class_uid)
    return _clean(series.headers.get(condition.field))


def _source_values(field_name: str, study: StudyFacts) -> tuple[str, ...]:
    if field_name == "calling_aet":
        return _clean(study.calling_aet)
    if field_name == "called_aet":
        return _clean(study.called_aet)
    if field_name == "drop_folder":
        if not study.drop_folder:
            return ()
        folder = study.drop_folder.rstrip("/") or "/"
        return tuple(dict.fromkeys((folder, PurePosixPath(folder).name)))
    return tuple(path for path in study.paths if path)


def _when_holds(condition: Condition, study: StudyFacts) -> bool:
    if not condition.per_series:
        return condition.holds(_source_values(condition.field, study))
    results = (condition.holds(_series_values(condition, series)) for series in study.series)
    return all(results) if condition.missing else any(results)


def _series_dropped_by(entry: tuple[Condition, ...], series: SeriesFacts, study: StudyFacts) -> bool:
    return all(
        condition.holds(_series_values(condition, series))
        if condition.per_series
        else condition.holds(_source_values(condition.field, study))
        for condition in entry
    )


def _drop_reason(rule: Rule, index: int) -> str:
    fields = ", ".join(dict.fromkeys(condition.field for condition in rule.drop_series[index]))
    return f"rule '{rule.name}' drop_series.{index} ({fields})"


def _split_series(rule: Rule, study: StudyFacts) -> tuple[list[SeriesFacts], list[tuple[str, int, str]]]:
    kept: list[SeriesFacts] = []
    dropped: list[tuple[str, int, str]] = []
    for series in study.series:
        index = next(
            (i for i, entry in enumerate(rule.drop_series) if _series_dropped_by(entry, series, study)),
            None,
        )
        if index is None:
            kept.append(series)
        else:
            dropped.append((series.series_uid, series.instance_count, _drop_reason(rule, index)))
    return kept, dropped


# --- labels --------------------------------------------------------------------------------------------------


def _resolver(study: StudyFacts, kept: list[SeriesFacts], labels: dict[str, str]) -> Callable[[Field], str]:
    def resolve(ref: Field) -> str:
        if ref.name in labels:
            return labels[ref.name]
        if ref.name == "path":
            return _path_component(study, ref)
        if ref.name in ("calling_aet", "called_aet", "drop_folder"):
            values = _source_values(ref.name, study)
            if not values:
                how = "by C-STORE" if ref.name != "drop_folder" else "from a drop folder"
                raise LabelError(f"{ref.name} is not known: the study did not arrive {how}")
            return values[-1]  # drop_folder: the folder's name
        seen = [_clean(series.headers.get(ref.name)) for series in kept]
        missing = sum(1 for values in seen if not values)
        if missing == len(seen):
            raise LabelError(f"{ref.name} is missing or empty")
        if missing:
            raise LabelError(f"{ref.name} is missing or empty in {missing} of {len(seen)} series")
        if len(set(seen)) > 1:
            raise LabelError(f"{ref.name} differs between series")
        return "\\".join(seen[0])

    return resolve


def _path_component(study: StudyFacts, ref: Field) -> str:
    if not study.paths:
        raise LabelError(f"{ref.label} is not known: the study did not come from a drop folder")
    index = ref.index or 0
    components = set()
    for path in study.paths:
        folders = PurePosixPath(path).parts[:-1]
        if len(folders) <= index:
            deep = _plural(index + 1, "folder")
            raise LabelError(f"{ref.label} is missing: a dropped file lies fewer than {deep} deep")
        components.add(folders[index])
    if len(components) > 1:
        raise LabelError(f"{ref.label} differs between the dropped files")
    return components.pop()


def _labels(rule: Rule, study: StudyFacts, kept: list[SeriesFacts]) -> dict[str, str]:
    labels: dict[str, str] = {}
    resolve = _resolver(study, kept, labels)
    for name, template in (
        ("project", rule.route.project),
        ("subject", rule.route.subject),
        ("session", rule.route.session),
    ):
        try:
            labels[name] = make_label(template, resolve, rule.label_key)
        except LabelError as exc:
            raise LabelError(f'route.{name} "{template.text}": {exc}') from None
    return labels


# --- decisions -----------------------------------------------------------------------------------------------


def _first_match(rules: RuleSet, study: StudyFacts) -> Rule | None:
    for rule in rules.rules:
        if all(_when_holds(condition, study) for condition in rule.when):
            return rule
    return None


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 or word.endswith('s') else 's'}"


def decide(rules: RuleSet, study: StudyFacts, *, rule: str | None = None) -> Routed | Held:
    """Route the study by the first rule whose `when` holds, or hold it with a reason free of DICOM values.

    `rule` names a rule to apply as if its `when` held (`ingestd anonymize --rule`); its drop_series and labels
    apply as usual.
    """
    if not study.series:
        return Held(reason="the study has no series", code=HoldCode.EMPTY)
    if rule is not None:
        chosen = next((candidate for candidate in rules.rules if candidate.name == rule), None)
        if chosen is None:
            return Held(reason=f"no rule named '{rule}'", code=HoldCode.UNROUTED)
    else:
        chosen = _first_match(rules, study)
    if chosen is None:
        tried = _plural(len(rules.rules), "rule")
        return Held(reason=f"no rule matches this study ({tried} tried)", code=HoldCode.UNROUTED)
    return _route(chosen, study)


def _route(rule: Rule, study: StudyFacts) -> Routed | Held:
    kept, dropped = _split_series(rule, study)
    if not kept:
        return Held(
            reason=f"rule '{rule.name}' drops every series of this study ({_plural(len(dropped), 'series')})",
            code=HoldCode.ALL_SERIES_DROPPED,
            rule=rule.name,
        )
    try:
        labels = _labels(rule, study, kept)
    except LabelError as exc:
        return Held(reason=f"rule '{rule.name}': {exc}", code=HoldCode.LABEL, rule=rule.name)
    return Routed(
        rule=rule.name,
        server=rule.route.server,
        project=labels["project"],
        subject=labels["subject"],
        session=labels["session"],
        archive=rule.route.archive,
        profile=rule.anonymize,
        kept_series=tuple(series.series_uid for series in kept),
        dropped_series=tuple(dropped),
    )


# --- explanation (shows values: for the operator only) -------------------------------------------------------


def _shown(values: tuple[str, ...]) -> str:
    return "\\".join(values) if values else "(missing)"


def _observed(condition: Condition, study: StudyFacts) -> str:
    if not condition.per_series:
        return _shown(_source_values(condition.field, study))
    counts = Counter(_shown(_series_values(condition, series)) for series in study.series)
    return ", ".join(
        f"{value!r}" + (f" ({_plural(count, 'series')})" if len(study.series) > 1 else "")
        for value, count in counts.items()
    )


def explain_match(rules: RuleSet, study: StudyFacts) -> list[str]:
    """Lines for `ingestd explain`: every rule tried, each condition's outcome with the values seen, the series
    kept or dropped and the labels or hold reason. Shows DICOM values: never log these lines."""
    lines = [
        f"rule set {rules.version} ({_plural(len(rules.rules), 'rule')}); study {study.study_uid}: "
        f"{_plural(len(study.series), 'series')}, calling AE {study.calling_aet or '-'}, "
        f"called AE {study.called_aet or '-'}, drop folder {study.drop_folder or '-'}, "
        f"{_plural(len(study.paths), 'dropped file')}"
    ]
    if not study.series:
        lines.append("decision: held (empty): the study has no series")
        return lines
    matched: Rule | None = None
    for rule in rules.rules:
        outcomes = [(condition, _when_holds(condition, study)) for condition in rule.when]
        holds = all(ok for _, ok in outcomes)
        lines.append(f"rule '{rule.name}' ({rule.origin}): {'matches' if holds else 'does not match'}")
        if not rule.when:
            lines.append("  when: {} (matches every study)")
        for condition, ok in outcomes:
            lines.append(
                f"  when.{condition.field} {condition.text}: {'holds' if ok else 'fails'}"
                f" (seen: {_observed(condition, study)})"
            )
        if holds:
            matched = rule
            break
    if matched is None:
        lines.append(
            f"decision: held (unrouted): no rule matches this study ({_plural(len(rules.rules), 'rule')} tried)"
        )
        return lines
    for series in study.series:
        dropped_by = [
            index for index, entry in enumerate(matched.drop_series) if _series_dropped_by(entry, series, study)
        ]
        what = f"series {series.series_uid} ({_plural(series.instance_count, 'instance')})"
        if dropped_by:
            entry = matched.drop_series[dropped_by[0]]
            conditions = ", ".join(f"{c.field} {c.text}" for c in entry)
            lines.append(f"  {what}: dropped by drop_series.{dropped_by[0]} ({conditions})")
        else:
            lines.append(f"  {what}: kept")
    decision = decide(rules, study)
    if isinstance(decision, Routed):
        lines.append(
            f"  route: server {decision.server}, project {decision.project}, subject {decision.subject}, "
            f"session {decision.session}, archive {str(decision.archive).lower()}, "
            f"profile {decision.profile or '(none)'}"
        )
        lines.append(
            f"decision: routed by rule '{decision.rule}' "
            f"({_plural(len(decision.kept_series), 'series')} kept, {len(decision.dropped_series)} dropped)"
        )
    else:
        lines.append(f"decision: held ({decision.code}): {decision.reason}")
    return lines


LABEL_NAMES = ("project", "subject", "session")


def identifying_labels(rules: RuleSet | None, *, rule: str, rules_version: str, profile: str | None) -> frozenset[str]:
    """Which of a routed batch's labels (`project`, `subject`, `session`) logs must name by a digest.

    The batch was routed by `rule` of the rules at `rules_version`, with `profile` (the journal's route). A
    de-identified route's labels are safe (loading refuses raw identifying values in them); otherwise the labels its
    rule builds from raw identifying values. When the rules the batch was routed with are not the ones at hand (a
    reload since, `rules` None), every label of a route without a profile is taken as identifying: fail closed.
    """
    if profile:
        return frozenset()
    if rules is None or rules_version != rules.version:
        return frozenset(LABEL_NAMES)
    found = next((candidate for candidate in rules.rules if candidate.name == rule), None)
    if found is None:
        return frozenset(LABEL_NAMES)
    return frozenset(label for label, _field in found.identifying_labels)
