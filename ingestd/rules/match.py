"""Matching a study against compiled rules: the routing decision, and its explanation.

Pure: a `StudyFacts` (header values of one representative instance per series, and where the study came from)
goes in, a `Routed` or `Held` comes out. Hold reasons name rules, templates and keywords, never a DICOM value;
only `explain_match`, written for the operator at a terminal, shows values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ingestd.deid.profile import Profile
from ingestd.rules.attachment import Attach
from ingestd.rules.conditions import (
    MATCHED_CHARACTERS,
    Condition,
    SeriesFacts,
    StudyFacts,
    clean_values,
    glob_pattern,
    series_values,
    source_values,
)
from ingestd.rules.labels import Field, LabelError, Template, make_label
from ingestd.rules.when import When, explain_when, when_holds
from ingestd.states import HoldCode

__all__ = [
    "MATCHED_CHARACTERS",
    "Condition",
    "Held",
    "Route",
    "Routed",
    "Rule",
    "RuleSet",
    "SeriesFacts",
    "StudyFacts",
    "When",
    "decide",
    "explain_match",
    "glob_pattern",
    "route_files",
]


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
    when: When
    route: Route
    drop_series: tuple[tuple[Condition, ...], ...] = ()
    anonymize: str | None = None
    source: Path = Path()
    line: int = 0
    label_key: bytes | None = field(default=None, repr=False)  # the profile's key, or route.key
    # Without `anonymize`: (label, field) for each label built from a raw identifying value ({PatientID}, path[1]):
    # sent to XNAT as it is (the lab's choice), but named by a digest in logs.
    identifying_labels: tuple[tuple[str, str], ...] = ()
    # Non-DICOM files of the study's upload attached to its session as resources (ingestd.rules.attach.Attach).
    attach: tuple[Attach, ...] = ()
    attach_names: str = "keep"  # `keep` the files' names inside resources, or `replace` them (label and counter)
    files_only: bool = False  # it can route an upload without DICOM: source conditions, labels from paths, attach

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


def _series_dropped_by(entry: tuple[Condition, ...], series: SeriesFacts, study: StudyFacts) -> bool:
    return all(
        condition.holds(series_values(condition, series))
        if condition.per_series
        else condition.holds(source_values(condition.field, study))
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
            values = source_values(ref.name, study)
            if not values:
                how = "by C-STORE" if ref.name != "drop_folder" else "from a drop folder"
                raise LabelError(f"{ref.name} is not known: the study did not arrive {how}")
            return values[-1]  # drop_folder: the folder's name
        seen = [clean_values(series.headers.get(ref.name)) for series in kept]
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
        if when_holds(rule.when, study):
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
    return _routed(rule, study, kept, dropped)


def _routed(
    rule: Rule, study: StudyFacts, kept: list[SeriesFacts], dropped: list[tuple[str, int, str]]
) -> Routed | Held:
    """The rule's route with its labels built for `study` (from the `kept` series' headers), or held `label`."""
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


def route_files(rule: Rule, study: StudyFacts) -> Routed | Held:
    """Route an upload without DICOM (`study.series` empty, `study.paths` its files) by a rule that can
    (`Rule.files_only`), its `when` already known to hold: the labels as `decide` would build them for a study
    of the same files (path[N], drop_folder, literals), held with a LABEL code when they cannot be built."""
    return _routed(rule, study, [], [])


# --- explanation (shows values: for the operator only) -------------------------------------------------------


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
        holds, explained = explain_when(rule.when, study)
        lines.append(f"rule '{rule.name}' ({rule.origin}): {'matches' if holds else 'does not match'}")
        if rule.when.is_empty:
            lines.append("  when: {} (matches every study)")
        lines += explained
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
