"""Load rules files: YAML -> validated models -> a compiled `RuleSet`, with every problem of every file at once.

Each file is read within the limits of `ingestd.config.read_yaml` (size, nesting, aliases) and validated on its
own (`validate_document`, which also reads the keys and lookup tables it refers to); then the checks that span
files run: duplicate profile and rule names, `anonymize:` naming a profile, and label hashes that need a key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydicom.datadict import tag_for_keyword

from ingestd.config import _line_of, read_yaml, read_yaml_file, validate_document
from ingestd.configwords import repeated_keys
from ingestd.deid.profile import Override, PrivateKeep, Profile
from ingestd.deid.table import load_table
from ingestd.errors import ConfigError
from ingestd.patterns import compile_regex
from ingestd.rules.attach_model import attach_names, attach_problems, compile_attach
from ingestd.rules.attachment import is_files_only
from ingestd.rules.labels import Template, TemplateError
from ingestd.rules.match import LABEL_NAMES, Condition, Route, Rule, RuleSet, When, glob_pattern
from ingestd.rules.model import ConditionModel, ProfileModel, RuleModel, RulesFile, WhenModel, route_template
from ingestd.rules.names import did_you_mean, sop_class_uid

__all__ = ["load_rules", "rules_version"]

_LINE = re.compile(r"^(\d+):")


@dataclass
class _File:
    index: int
    path: Path
    data: bytes
    lines: dict[tuple[Any, ...], int]
    raw: dict[str, Any]
    model: RulesFile | None

    @property
    def source(self) -> str:
        return str(self.path)

    def line(self, *loc: Any) -> int:
        return _line_of(loc, self.lines) or 1

    def where(self, *loc: Any) -> str:
        key = ".".join(str(part) for part in loc)
        return f"{self.source}:{self.line(*loc)}: {key}"


class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[int, int, str]] = []

    def add(self, file: _File, loc: tuple[Any, ...], message: str) -> None:
        self.items.append((file.index, file.line(*loc), f"{file.where(*loc)}: {message}"))

    def add_line(self, index: int, line: int, message: str) -> None:
        self.items.append((index, line, message))

    def sorted(self) -> list[str]:
        return [message for _, _, message in sorted(self.items, key=lambda item: (item[0], item[1]))]


def rules_version(contents: Sequence[bytes]) -> str:
    """The rule set's version: the first 12 hex characters of the sha256 of the files' bytes, in order."""
    return hashlib.sha256(b"".join(contents)).hexdigest()[:12]


def _duplicate_keys(node: yaml.Node | None, file: _File, problems: _Problems) -> None:
    """PyYAML keeps the last of two equal keys silently; a rules file must not say one thing twice."""
    for twice in repeated_keys(node):
        problems.add_line(
            file.index,
            twice.line,
            f"{file.source}:{twice.line}: {twice.dotted}: '{twice.key}' is given twice in this mapping "
            f"(first on line {twice.first_line})",
        )


def _read(index: int, path: Path, problems: _Problems) -> _File:
    file = _File(index, path, b"", {}, {}, None)
    try:
        text = read_yaml_file(path, "rules file")
        file.data = text.encode("utf-8")
        document = read_yaml(
            text, file.source, what="rules file", inspect=lambda node: _duplicate_keys(node, file, problems)
        )
    except ConfigError as exc:
        for problem in exc.problems:
            match = _LINE.match(problem.removeprefix(file.source + ":"))
            problems.add_line(index, int(match.group(1)) if match else 0, problem)
        return file
    file.lines = document.lines
    file.raw = document.data if isinstance(document.data, dict) else {}
    try:
        file.model = validate_document(document, file.source, RulesFile, what="rules file")
    except ConfigError as exc:
        for problem in exc.problems:
            match = _LINE.match(problem.removeprefix(file.source + ":"))
            problems.add_line(index, int(match.group(1)) if match else 0, problem)
    return file


def _raw_names(file: _File) -> tuple[list[str], list[tuple[int, str]]]:
    profiles = file.raw.get("profiles")
    rules = file.raw.get("rules")
    profile_names = [str(name) for name in profiles] if isinstance(profiles, dict) else []
    rule_names = (
        [
            (i, rule["name"])
            for i, rule in enumerate(rules)
            if isinstance(rule, dict) and isinstance(rule.get("name"), str)
        ]
        if isinstance(rules, list)
        else []
    )
    return profile_names, rule_names


def _check_names(files: list[_File], problems: _Problems) -> set[str]:
    """Report profile and rule names defined twice; return every profile name defined anywhere."""
    profiles: dict[str, tuple[int, str]] = {}
    rules: dict[str, str] = {}
    for file in files:
        profile_names, rule_names = _raw_names(file)
        for name in profile_names:  # twice in one file is a duplicate YAML key, reported by _duplicate_keys
            if name in profiles and profiles[name][0] != file.index:
                problems.add(file, ("profiles", name), f"profile '{name}' is also defined at {profiles[name][1]}")
            profiles.setdefault(name, (file.index, f"{file.source}:{file.line('profiles', name)}"))
        for index, name in rule_names:
            if name in rules:
                problems.add(file, ("rules", index, "name"), f"rule name '{name}' is also used at {rules[name]}")
            else:
                rules[name] = f"{file.source}:{file.line('rules', index)}"
    return set(profiles)


def _check_rule(file: _File, index: int, rule: dict[str, Any], profile_names: set[str], problems: _Problems) -> None:
    """Checks that need every file's profiles; on the raw YAML, so they run even where the rule has other errors."""
    anonymize = rule.get("anonymize")
    route_raw = rule.get("route")
    route: dict[str, Any] = route_raw if isinstance(route_raw, dict) else {}
    if isinstance(anonymize, str) and anonymize not in profile_names:
        hint = did_you_mean(anonymize, sorted(profile_names))
        problems.add(file, ("rules", index, "anonymize"), f"no profile named '{anonymize}'{hint}")
    if anonymize is not None and route.get("key") is not None:
        problems.add(
            file,
            ("rules", index, "route", "key"),
            f"labels of a rule with anonymize use the key of profile '{anonymize}': remove route.key",
        )
    if anonymize is not None:
        _check_identifying_labels(file, index, route, problems)
    for loc, message in attach_problems(rule):
        problems.add(file, ("rules", index, *loc), message)
    if anonymize is None and route.get("key") is None:
        for name in ("project", "subject", "session"):
            text = route.get(name)
            try:
                uses_hash = isinstance(text, str) and route_template(name, text).uses_hash
            except TemplateError:
                continue  # reported by validation
            if uses_hash:
                problems.add(
                    file,
                    ("rules", index, "route", name),
                    ":hashN needs a key: set anonymize to a profile, or give route.key: {env: ...} or {file: ...}",
                )


def _check_identifying_labels(file: _File, index: int, route: dict[str, Any], problems: _Problems) -> None:
    """A de-identified study's labels must not carry a value the profile removes or replaces from its headers."""
    table = load_table()
    for name in ("project", "subject", "session"):
        text = route.get(name)
        try:
            template = route_template(name, text) if isinstance(text, str) else None
        except TemplateError:
            continue  # reported by validation
        for field in template.fields if template is not None else ():
            tag = tag_for_keyword(field.name)
            if tag is None or field.format == "hash" or table.lookup(tag) is None:
                continue
            problems.add(
                file,
                ("rules", index, "route", name),
                f"{{{field.label}}} is de-identified by Table E.1-1, so its original value must not become the "
                f"XNAT {name} label of a de-identified study: use {{{field.name}:hash8}} (a keyed hash)",
            )


def _describe(model: ConditionModel) -> str:
    parts: list[str] = []
    if model.equals is not None:
        parts.append(f"equals {model.equals!r}")
    if model.in_ is not None:
        parts.append(f"in [{', '.join(model.in_)}]")
    if model.matches is not None:
        parts.append(f"matches {model.matches!r}")
    if model.glob is not None:
        parts.append(f"glob {model.glob!r}")
    if model.present:
        parts.append("present")
    if model.missing:
        parts.append("missing")
    parts += [f"{op} {getattr(model, op):g}" for op in ("lt", "le", "gt", "ge") if getattr(model, op) is not None]
    return ", ".join(parts)


def _condition(model: ConditionModel) -> Condition:
    sop = model.keyword == "sop_class"
    equals = sop_class_uid(model.equals) if sop and model.equals is not None else model.equals
    one_of = None
    if model.in_ is not None:
        one_of = frozenset(sop_class_uid(value) if sop else value for value in model.in_)
    return Condition(
        field=model.keyword,
        text=_describe(model),
        equals=equals,
        one_of=one_of,
        pattern=compile_regex(model.matches) if model.matches is not None else None,
        glob=glob_pattern(model.glob) if model.glob is not None else None,
        present=bool(model.present),
        missing=bool(model.missing),
        lt=model.lt,
        le=model.le,
        gt=model.gt,
        ge=model.ge,
    )


def _when(model: WhenModel) -> When:
    return When(
        conditions=tuple(_condition(condition) for condition in model.conditions.values()),
        any_of=None if model.any_ is None else tuple(_when(part) for part in model.any_),
        all_of=None if model.all_ is None else tuple(_when(part) for part in model.all_),
        none_of=None if model.not_ is None else _when(model.not_),
    )


def _profile(model: ProfileModel, path: Path, version: str) -> Profile:
    overrides = {
        attribute.tag_number: Override(
            tag=attribute.tag_number,
            action=attribute.action,
            value=attribute.value,
            pattern=compile_regex(attribute.pattern) if attribute.pattern is not None else None,
            replacement=attribute.replacement or "",
            table=MappingProxyType(attribute.table_content) if attribute.table_content is not None else None,
            table_name=str(attribute.table_path) if attribute.table_path is not None else None,
            justification=attribute.justification,
        )
        for attribute in model.attributes
    }
    return Profile(
        name=model.name,
        key=model.key.material,
        options=frozenset(model.options),
        date_shift_days=(model.dates.min_days, model.dates.max_days),
        overrides=MappingProxyType(overrides),
        private_keep=tuple(
            PrivateKeep(entry.creator, int(entry.group, 16), int(entry.element, 16), entry.justification)
            for entry in model.private
        ),
        burned_in=model.pixels.burned_in if model.pixels is not None else model.burned_in,
        regions=model.pixels.compile() if model.pixels is not None else (),
        max_decoded_bytes=(model.pixels.max_decoded_mb if model.pixels is not None else 1024) << 20,
        compress=model.pixels.compress if model.pixels is not None else "none",
        source=f"{path.name}@{version}",
    )


def _identifying(templates: dict[str, Template]) -> tuple[tuple[str, str], ...]:
    """(label, field) for each label field holding a raw identifying value: an attribute Table E.1-1 lists, a
    part of a dropped file's path, or an earlier label that holds one; a keyed hash (`:hashN`) is not raw."""
    table = load_table()
    found: list[tuple[str, str]] = []
    for name in LABEL_NAMES:
        for field in templates[name].fields:
            if field.format == "hash":
                continue
            tag = tag_for_keyword(field.name)
            earlier = any(label == field.name for label, _field in found)
            if earlier or field.name == "path" or (tag is not None and table.lookup(tag) is not None):
                found.append((name, field.label))
    return tuple(found)


def _rule(file: _File, index: int, model: RuleModel, profiles: dict[str, Profile]) -> Rule:
    route = model.route
    if model.anonymize is not None:
        key: bytes | None = profiles[model.anonymize].key
    else:
        key = route.key.material if route.key is not None else None
    templates = {name: route_template(name, getattr(route, name)) for name in LABEL_NAMES}
    when = _when(model.when)
    attach = compile_attach(model.attach)
    return Rule(
        name=model.name,
        when=when,
        route=Route(
            server=route.server,
            project=templates["project"],
            subject=templates["subject"],
            session=templates["session"],
            archive=route.archive,
        ),
        drop_series=tuple(tuple(_condition(condition) for condition in entry.values()) for entry in model.drop_series),
        anonymize=model.anonymize,
        source=file.path,
        line=file.line("rules", index),
        label_key=key,
        identifying_labels=_identifying(templates) if model.anonymize is None else (),
        attach=attach,
        attach_names=attach_names(model.attach_names, model.anonymize),
        files_only=is_files_only(when, templates.values(), attach),
    )


def load_rules(paths: Sequence[Path]) -> RuleSet:
    """Load, validate and compile rules files; their rules are concatenated in order and profiles merged.

    Raise ConfigError listing every problem in every file, each as `file:line: key: message`.
    """
    if not paths:
        raise ConfigError("", ["no rules file given"])
    problems = _Problems()
    files = [_read(index, Path(path), problems) for index, path in enumerate(paths)]
    version = rules_version([file.data for file in files])
    profile_names = _check_names(files, problems)
    for file in files:
        rules_raw = file.raw.get("rules")
        for index, rule in enumerate(rules_raw if isinstance(rules_raw, list) else []):
            if isinstance(rule, dict):
                _check_rule(file, index, rule, profile_names, problems)
    if problems.items:
        raise ConfigError(", ".join(str(path) for path in paths), problems.sorted())
    valid = [(file, file.model) for file in files if file.model is not None]  # all of them: no problems
    profiles: dict[str, Profile] = {}
    profile_sources: dict[str, Path] = {}
    for file, rules_file in valid:
        for name, profile in rules_file.profiles.items():
            profiles[name] = _profile(profile, file.path, version)
            profile_sources[name] = file.path
    rules = [
        _rule(file, index, rule, profiles) for file, rules_file in valid for index, rule in enumerate(rules_file.rules)
    ]
    return RuleSet(
        rules=tuple(rules),
        profiles=MappingProxyType(profiles),
        sources=tuple(Path(path) for path in paths),
        version=version,
        profile_sources=MappingProxyType(profile_sources),
    )
