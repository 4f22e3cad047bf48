"""A rule's `attach:` entries as pydantic models, the checks across a rule's keys that attaching needs, and their
compiled form (`ingestd.rules.attachment.Attach`).

An entry is checked on its own by `AttachModel` (glob, templates, a literal label XNAT refuses, `scan` with level
`scan`); what depends on the rest of the rule (anonymize and the privacy keys, `route.archive`, a key for
`:hashN`) is checked on the raw YAML by `attach_problems`, so that each message has its own key's line. See
docs/rules.md, "Attaching files".
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from ingestd.rules.attachment import ATTACH_FIELDS, LEVELS, RESOURCE_LABEL, SCAN_ID, Attach
from ingestd.rules.condition_model import text_value
from ingestd.rules.conditions import glob_pattern
from ingestd.rules.labels import MAX_LABEL, Template, TemplateError, parse_template

__all__ = ["AttachModel", "attach_names", "attach_problems", "attach_template", "compile_attach"]

_RESOURCE_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_SCAN_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_MENTIONS_NAMES = re.compile(r"(?i)\bnames?\b")
_PRIVACY_KEYS = ("attach_unreviewed_files", "justification", "attach_names")
_CANNOT_DEIDENTIFY = (
    "ingestd de-identifies DICOM headers but cannot de-identify arbitrary files: a PDF, a spreadsheet, a log or "
    "a results archive may hold names, dates or IDs, and would reach XNAT exactly as it is"
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def attach_template(text: str) -> Template:
    """Parse a resource label or scan ID template: `path[N]` (of the file's folders) and the route's labels."""
    return parse_template(text, ATTACH_FIELDS, keywords=False)


def _check_literals(
    template: Template, what: str, refused: re.Pattern[str], allowed: str, first: tuple[str, str]
) -> None:
    """Refuse what no rendering can make acceptable: a character XNAT refuses in the template's own text, a
    first character it refuses, or more than 64 characters of text; a literal label is checked whole."""
    literal = "".join(part for part in template.parts if isinstance(part, str))
    bad = sorted(set(refused.findall(literal)))
    if bad:
        shown = " ".join(repr(char) for char in bad)
        raise ValueError(f"XNAT would refuse this {what} ({shown}): {allowed}")
    if template.parts and isinstance(template.parts[0], str) and not re.match(first[0], template.parts[0]):
        raise ValueError(f"XNAT would refuse this {what}: it must start with {first[1]}")
    if len(literal) > MAX_LABEL:
        raise ValueError(f"a {what} is at most {MAX_LABEL} characters: shorten it")


class AttachModel(_Model):
    """One `attach:` entry: which files (a glob over their path below the drop folder or import root), into which
    resource, at which level."""

    match: str
    resource: str
    level: str = "session"
    scan: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError('an attach entry is a mapping, e.g. {match: "*/*/qBOLD/**", resource: qBOLD}')  # noqa: TRY004 - pydantic reports ValueError
        return data

    @field_validator("match", "resource", "scan", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return text_value(value)

    @field_validator("match")
    @classmethod
    def _glob(cls, value: str) -> str:
        if not value.strip():
            raise ValueError('match is a glob over the file\'s path below the drop folder, e.g. "*/*/qBOLD/**"')
        glob_pattern(value)
        return value

    @field_validator("resource")
    @classmethod
    def _resource(cls, value: str) -> str:
        template = attach_template(value)
        _check_literals(
            template,
            "resource label",
            _RESOURCE_CHARS,
            "a resource label is letters, digits, '_' and '-' (no space, comma, dot or quote), e.g. qBOLD",
            (
                "[A-Za-z]",
                "a letter (a label of digits is read as a resource's numeric ID, and refused)",
            ),
        )
        if template.is_literal and not RESOURCE_LABEL.match(value):
            raise ValueError("a resource label is 1 to 64 letters, digits, '_' or '-', starting with a letter")
        return value

    @field_validator("level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> Any:
        if value not in LEVELS:
            raise ValueError(f"level is one of {', '.join(LEVELS)} (session when not given)")
        return value

    @field_validator("scan")
    @classmethod
    def _scan(cls, value: str | None) -> str | None:
        if value is None:
            return None
        template = attach_template(value)
        _check_literals(
            template,
            "scan ID",
            _SCAN_CHARS,
            "a scan ID is letters, digits, '_', '.' and '-', e.g. \"7\" or \"{path[2]}\"",
            ("[A-Za-z0-9]", "a letter or digit"),
        )
        if template.is_literal and not SCAN_ID.match(value):
            raise ValueError("a scan ID is 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _scan_level(self) -> AttachModel:
        if self.level == "scan" and self.scan is None:
            raise ValueError('level scan needs scan: the XNAT scan ID the files go to, e.g. scan: "{path[2]}"')
        if self.level != "scan" and self.scan is not None:
            raise ValueError(f"scan is used only with level: scan (this entry's level is {self.level}): remove it")
        return self


def _templates(entry: dict[str, Any]) -> list[tuple[str, Template]]:
    found: list[tuple[str, Template]] = []
    for key in ("resource", "scan"):
        text = entry.get(key)
        try:
            if isinstance(text, str):
                found.append((key, attach_template(text)))
        except TemplateError:
            continue  # reported by validation
    return found


def attach_problems(rule: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """The problems of a raw rule's attaching that span its keys, each with the key it is reported under."""
    attach = rule.get("attach")
    anonymize = rule.get("anonymize")
    route_raw = rule.get("route")
    route: dict[str, Any] = route_raw if isinstance(route_raw, dict) else {}
    if not attach:
        return [
            (
                (key,),
                f"{key} is used only by a rule that attaches files: remove it, or add attach: [{{match: ..., "
                "resource: ...}]",
            )
            for key in _PRIVACY_KEYS
            if key in rule
        ]
    problems: list[tuple[tuple[Any, ...], str]] = []
    entries = list(enumerate(attach)) if isinstance(attach, list) else []
    if anonymize is not None:
        problems += _privacy(rule, anonymize)
    elif rule.get("attach_names") == "replace":
        problems.append(
            (
                ("attach_names",),
                "without anonymize, files keep their names (the rule sends its studies as they are, too): "
                "remove attach_names",
            )
        )
    for index, entry in entries:
        if not isinstance(entry, dict):
            continue  # reported by validation
        level = entry.get("level", "session")
        if level in ("scan", "subject") and route.get("archive") is not True:
            problems.append(
                (
                    ("attach", index, "level"),
                    f"level {level} needs route.archive: true: without it the session stays in the prearchive, "
                    "which takes session-level resources only; use level: session, or archive",
                )
            )
        if anonymize is None and route.get("key") is None:
            problems += [
                (
                    ("attach", index, key),
                    ":hashN needs a key: set anonymize to a profile, or give route.key: {env: ...} or {file: ...}",
                )
                for key, template in _templates(entry)
                if template.uses_hash
            ]
    return problems


def _privacy(rule: dict[str, Any], anonymize: Any) -> list[tuple[tuple[Any, ...], str]]:
    """A de-identified rule attaches files only when a person has said, with a reason, that they may leave."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    justification = rule.get("justification")
    justified = isinstance(justification, str) and bool(justification.strip())
    if rule.get("attach_unreviewed_files") is not True or not justified:
        checks = (("attach_unreviewed_files: true", rule.get("attach_unreviewed_files") is True),)
        missing = [what for what, ok in (*checks, ("a justification", justified)) if not ok]
        problems.append(
            (
                ("attach",),
                f"this rule de-identifies its studies (anonymize: {anonymize}); {_CANNOT_DEIDENTIFY}. Check what "
                "these files hold; if they may leave as they are, add " + " and ".join(missing) + " saying why "
                '(e.g. justification: "qBOLD maps computed from de-identified images; no text fields"), '
                "else remove attach",
            )
        )
    if rule.get("attach_names") == "keep" and justified and not _MENTIONS_NAMES.search(str(justification)):
        problems.append(
            (
                ("attach_names",),
                "with anonymize, files keep their names only when justification says why the file and folder names "
                "are safe (mention the names); else remove attach_names, and the names are replaced by the resource "
                "label and a counter",
            )
        )
    return problems


def attach_names(model_names: str | None, anonymize: str | None) -> str:
    """The effective `attach_names`: `replace` for a rule with anonymize unless it says `keep`; else `keep`."""
    return "replace" if anonymize is not None and model_names != "keep" else "keep"


def compile_attach(entries: tuple[AttachModel, ...]) -> tuple[Attach, ...]:
    """The compiled entries, in order."""
    return tuple(
        Attach(
            match=glob_pattern(entry.match),
            match_text=entry.match,
            resource=attach_template(entry.resource),
            level=entry.level,
            scan=attach_template(entry.scan) if entry.scan is not None else None,
            index=index,
        )
        for index, entry in enumerate(entries)
    )
