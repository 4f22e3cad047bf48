"""The rules YAML as pydantic models: frozen, unknown keys forbidden, every check that has a YAML line here.

Validation reads what a rules file refers to (key files and variables, lookup tables; see `sources`),
resolving relative paths against the rules file's folder (the `source` in the validation context), so that
every problem in a file is reported at once with its line. The material read is kept in private attributes,
out of every repr.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ingestd.deid.profile import OverrideAction
from ingestd.patterns import PatternError, compile_regex
from ingestd.rules.attach_model import AttachModel
from ingestd.rules.condition_model import ConditionModel, WhenModel, keyed, regex_text, text_value
from ingestd.rules.labels import Template, TemplateError, parse_template
from ingestd.rules.names import did_you_mean, parse_tag, tag_name, tag_vr
from ingestd.rules.pixels_model import PixelsModel
from ingestd.rules.sources import read_env_key, read_key_file, read_table

__all__ = [
    "OPTIONS",
    "AttributeModel",
    "ConditionModel",
    "DatesModel",
    "KeyModel",
    "PrivateModel",
    "ProfileModel",
    "RouteModel",
    "RuleModel",
    "RulesFile",
    "WhenModel",
    "route_template",
]

OPTIONS = (
    "retain-safe-private",
    "retain-uids",
    "retain-device-identity",
    "retain-institution-identity",
    "retain-patient-characteristics",
    "retain-longitudinal-full-dates",
    "retain-longitudinal-modified-dates",
    "clean-descriptors",
    "clean-structured-content",
    "clean-graphics",
)
_LONGITUDINAL = ("retain-longitudinal-full-dates", "retain-longitudinal-modified-dates")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PROJECT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LABEL_SOURCES = ("calling_aet", "called_aet", "drop_folder", "path")
_TEMPLATE_FIELDS = {
    "project": _LABEL_SOURCES,
    "subject": (*_LABEL_SOURCES, "project"),
    "session": (*_LABEL_SOURCES, "project", "subject"),
}
_REPLACE_FIELDS = ("project", "subject", "session")
_ACTION_FIELDS = {"replace": ("value",), "lookup": ("table",), "regex": ("pattern", "replacement")}
_REQUIRED = {"replace": "value", "lookup": "table", "regex": "pattern", "keep": "justification"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _base(info: ValidationInfo) -> Path:
    """The folder relative paths in this rules file are relative to."""
    source = info.context.get("source") if isinstance(info.context, dict) else None
    return Path(source).parent if source else Path()


def _list(value: Any, what: str) -> Any:
    """Say what a list-valued key should look like (pydantic would ask for "a valid tuple")."""
    if value is not None and not isinstance(value, list):
        raise ValueError(f"{what} is a list, e.g. {what}: [...] or one '- ' line per item")
    return value


def _mapping(value: Any, what: str, example: str) -> Any:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is a mapping, e.g. {what}: {example}")  # noqa: TRY004 - pydantic reports ValueError
    return value


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"a {what} name is 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit")


def route_template(name: str, text: str) -> Template:
    """Parse one of the route's label templates (`project`, `subject` or `session`)."""
    return parse_template(text, _TEMPLATE_FIELDS[name])


# --- conditions ----------------------------------------------------------------------------------------------


def _conditions_not_empty(entries: tuple[dict[str, ConditionModel], ...]) -> tuple[dict[str, ConditionModel], ...]:
    for index, entry in enumerate(entries):
        if not entry:
            raise ValueError(f"drop_series.{index} has no condition: it would drop every series")
    return entries


# --- keys, profiles ------------------------------------------------------------------------------------------


class KeyModel(_Model):
    """`{env: VARIABLE}` or `{file: path}`: where a key is, never the key itself."""

    env: str | None = None
    file: str | None = None
    _material: bytes = PrivateAttr(default=b"")

    @model_validator(mode="before")
    @classmethod
    def _not_inline(cls, data: Any) -> Any:
        if isinstance(data, str | bytes | int):
            raise ValueError("write {env: VARIABLE} or {file: path}; never the key itself in a rules file")  # noqa: TRY004 - pydantic reports ValueError
        return data

    @model_validator(mode="after")
    def _read(self, info: ValidationInfo) -> KeyModel:
        if (self.env is None) == (self.file is None):
            raise ValueError("a key is {env: VARIABLE} or {file: path}, exactly one of them")
        if self.env is not None:
            self._material = read_env_key(self.env)
        elif self.file is not None:
            self._material = read_key_file(_base(info) / self.file)
        return self

    @property
    def material(self) -> bytes:
        return self._material


class DatesModel(_Model):
    """The range of whole days dates are shifted into the past, per patient, derived from the key."""

    min_days: Annotated[int, Field(ge=1)] = 30
    max_days: Annotated[int, Field(ge=1)] = 730

    @model_validator(mode="after")
    def _ordered(self) -> DatesModel:
        if self.min_days > self.max_days:
            raise ValueError("min_days must not be greater than max_days")
        return self


class AttributeModel(_Model):
    """One per-profile override: the action for one tag."""

    tag: str
    action: OverrideAction
    value: str | None = None
    table: str | None = None
    pattern: str | None = None
    replacement: str | None = None
    justification: str | None = None
    _tag: int = PrivateAttr(default=0)
    _table: dict[str, str] | None = PrivateAttr(default=None)
    _table_path: Path | None = PrivateAttr(default=None)

    @field_validator("tag", mode="before")
    @classmethod
    def _tag_text(cls, value: Any) -> Any:
        if isinstance(value, int):
            raise ValueError('put the tag in quotes, e.g. "(0010,0020)", or use its keyword')  # noqa: TRY004 - pydantic reports ValueError
        return value

    @field_validator("tag")
    @classmethod
    def _known_tag(cls, value: str) -> str:
        tag = parse_tag(value)
        if (tag >> 16) % 2:
            raise ValueError(f"{tag_name(tag)} is a private element: list it under private: (by creator)")
        return value

    @field_validator("value", "replacement", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        return text_value(value)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        return regex_text(value)

    @model_validator(mode="after")
    def _action(self, info: ValidationInfo) -> AttributeModel:
        self._tag = parse_tag(self.tag)
        problems = [
            f"{name} is not used by action: {self.action}"
            for name in ("value", "table", "pattern", "replacement")
            if getattr(self, name) is not None and name not in _ACTION_FIELDS.get(self.action, ())
        ]
        required = _REQUIRED.get(self.action)
        if required is not None and getattr(self, required) is None:
            why = " (say why keeping this element is safe)" if self.action == "keep" else ""
            problems.append(f"action: {self.action} needs {required}{why}")
        if self.justification is not None and not self.justification.strip():
            problems.append("justification is empty")
        vr = tag_vr(self._tag)
        if self.action == "shift-date" and vr is not None and vr not in ("DA", "DT"):
            problems.append(f"shift-date applies to dates (DA, DT); {tag_name(self._tag)} is {vr}")
        if self.action == "uid" and vr is not None and vr != "UI":
            problems.append(f"uid applies to UIDs (UI); {tag_name(self._tag)} is {vr}")
        if self.action == "regex" and self.pattern is not None and self.replacement is not None:
            try:
                compile_regex(self.pattern).check_replacement(self.replacement)
            except PatternError as exc:
                problems.append(f"replacement: {exc}")
        if self.action == "replace" and self.value is not None:
            try:
                parse_template(self.value, _REPLACE_FIELDS, keywords=False, formats=False)
            except TemplateError as exc:
                problems.append(f"value: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        if self.action == "lookup" and self.table is not None:
            self._table_path = _base(info) / self.table
            self._table = read_table(self._table_path)
        return self

    @property
    def tag_number(self) -> int:
        return self._tag

    @property
    def table_content(self) -> dict[str, str] | None:
        return self._table

    @property
    def table_path(self) -> Path | None:
        return self._table_path


class PrivateModel(_Model):
    """A private element kept under retain-safe-private, by its block's creator, group and element byte."""

    creator: Annotated[str, Field(min_length=1, max_length=64)]
    group: str
    element: str
    justification: str

    @field_validator("group", "element", mode="before")
    @classmethod
    def _hex_text(cls, value: Any) -> Any:
        if isinstance(value, int):
            raise ValueError('put it in quotes: group: "0019", element: "0A"')  # noqa: TRY004 - pydantic reports ValueError
        return value

    @field_validator("group")
    @classmethod
    def _group(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9A-Fa-f]{4}", value):
            raise ValueError('a group is 4 hex digits, e.g. "0019"')
        group = int(value, 16)
        if group % 2 == 0 or group <= 0x0007 or group == 0xFFFF:
            raise ValueError("a private group is odd and above 0007 (and not FFFF)")
        return value.upper()

    @field_validator("element")
    @classmethod
    def _element(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9A-Fa-f]{2}", value):
            raise ValueError(
                'the element is its low byte within the creator\'s block, 2 hex digits (e.g. "0A" for (0019,xx0A))'
            )
        return value.upper()

    @field_validator("justification")
    @classmethod
    def _justified(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("justification is empty: say why keeping this element is safe")
        return value


class ProfileModel(_Model):
    """A de-identification profile."""

    name: str = Field(alias="@name")
    options: tuple[str, ...] = ()
    key: KeyModel
    burned_in: Literal["hold", "trust-header"] = "hold"  # also pixels.burned_in (rules/pixels_model.py)
    pixels: PixelsModel | None = None
    attributes: tuple[AttributeModel, ...] = ()
    private: tuple[PrivateModel, ...] = ()
    dates: DatesModel = DatesModel()

    @model_validator(mode="before")
    @classmethod
    def _named(cls, data: Any) -> Any:
        if isinstance(data, dict) and "@name" in data:
            _check_name(str(data["@name"]), "profile")
        return data

    @model_validator(mode="after")
    def _burned_in_once(self) -> ProfileModel:
        if self.pixels is not None and "burned_in" in self.model_fields_set:
            raise ValueError("burned_in is given twice: keep pixels.burned_in and remove the profile's burned_in")
        return self

    @field_validator("options", "attributes", "private", mode="before")
    @classmethod
    def _lists(cls, value: Any, info: ValidationInfo) -> Any:
        return _list(value, info.field_name or "")

    @field_validator("options")
    @classmethod
    def _options(cls, options: tuple[str, ...]) -> tuple[str, ...]:
        problems = [f"unknown option '{o}'{did_you_mean(o, OPTIONS)}" for o in options if o not in OPTIONS]
        problems += [f"option '{o}' is listed twice" for o in dict.fromkeys(o for o in options if options.count(o) > 1)]
        if all(option in options for option in _LONGITUDINAL):
            problems.append(f"use at most one of {_LONGITUDINAL[0]} and {_LONGITUDINAL[1]}")
        if problems:
            raise ValueError("; ".join(problems))
        return options

    @field_validator("attributes")
    @classmethod
    def _one_entry_per_tag(cls, attributes: tuple[AttributeModel, ...]) -> tuple[AttributeModel, ...]:
        first: dict[int, int] = {}
        for index, attribute in enumerate(attributes):
            if attribute.tag_number in first:
                raise ValueError(
                    f"{tag_name(attribute.tag_number)} is listed twice (entries {first[attribute.tag_number]} "
                    f"and {index}); give one action per tag"
                )
            first[attribute.tag_number] = index
        return attributes

    @field_validator("private")
    @classmethod
    def _private(cls, private: tuple[PrivateModel, ...], info: ValidationInfo) -> tuple[PrivateModel, ...]:
        if private and "retain-safe-private" not in info.data.get("options", ("retain-safe-private",)):
            raise ValueError("private elements are kept only with option retain-safe-private: add it, or remove them")
        first: dict[tuple[str, str, str], int] = {}
        for index, entry in enumerate(private):
            ident = (entry.creator, entry.group, entry.element)
            if ident in first:
                raise ValueError(f"entries {first[ident]} and {index} name the same private element")
            first[ident] = index
        return private

    @field_validator("dates")
    @classmethod
    def _dates_used(cls, dates: DatesModel, info: ValidationInfo) -> DatesModel:
        options = info.data.get("options")
        attributes = info.data.get("attributes")
        if options is None or attributes is None:
            return dates
        if "retain-longitudinal-modified-dates" not in options and not any(
            attribute.action == "shift-date" for attribute in attributes
        ):
            raise ValueError("dates is used only with retain-longitudinal-modified-dates or a shift-date attribute")
        return dates


# --- rules ---------------------------------------------------------------------------------------------------


class RouteModel(_Model):
    """Where a matching study goes."""

    server: str
    project: str
    subject: str
    session: str
    archive: bool = False
    key: KeyModel | None = None

    @field_validator("server")
    @classmethod
    def _server(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("name the XNAT server")
        return value.strip()

    @field_validator("project", "subject", "session", mode="before")
    @classmethod
    def _label_text(cls, value: Any) -> Any:
        return text_value(value)

    @field_validator("project", "subject", "session")
    @classmethod
    def _template(cls, value: str, info: ValidationInfo) -> str:
        name = info.field_name or "session"
        template = route_template(name, value)
        if name == "project" and template.is_literal and not _PROJECT.match(value):
            raise ValueError("an XNAT project ID is 1 to 64 letters, digits, '_' or '-'")
        return value


class RuleModel(_Model):
    """One rule: when it applies, where the study goes, which series are left out, which profile applies."""

    name: str
    when: WhenModel
    route: RouteModel
    drop_series: tuple[dict[str, ConditionModel], ...] = ()
    anonymize: str | None = None
    # Non-DICOM files attached as resources, and what a de-identified rule must say to attach them (attach_model).
    attach: tuple[AttachModel, ...] = ()
    attach_unreviewed_files: StrictBool | None = None
    justification: str | None = None
    attach_names: Literal["replace", "keep"] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        _check_name(value, "rule")
        return value

    @field_validator("when", mode="before")
    @classmethod
    def _when(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("no conditions: write when: {} to match every study (deliberately)")
        return {**_mapping(value, "when", "{Modality: MR}"), "@top": True}

    @field_validator("when")
    @classmethod
    def _when_depth(cls, value: WhenModel) -> WhenModel:
        return value.check_depth()

    @field_validator("route", mode="before")
    @classmethod
    def _route(cls, value: Any) -> Any:
        return _mapping(value, "route", "{server: main, project: P, subject: ..., session: ...}")

    @field_validator("drop_series", mode="before")
    @classmethod
    def _drop_series(cls, value: Any) -> Any:
        return [keyed(entry, "drop_series") for entry in _list(value, "drop_series") or ()]

    @field_validator("attach", mode="before")
    @classmethod
    def _attach(cls, value: Any) -> Any:
        if value is None or value == []:
            raise ValueError("attach needs at least one entry {match: <glob>, resource: <label>}; or remove it")
        return _list(value, "attach")

    @field_validator("attach_unreviewed_files", mode="before")
    @classmethod
    def _unreviewed(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, bool):
            raise ValueError("write attach_unreviewed_files: true (unquoted), or remove it")
        return value

    @field_validator("justification")
    @classmethod
    def _justified(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("justification is empty: say why these files may leave as they are")
        return value

    @field_validator("drop_series")
    @classmethod
    def _drop_not_empty(cls, value: tuple[dict[str, ConditionModel], ...]) -> tuple[dict[str, ConditionModel], ...]:
        return _conditions_not_empty(value)


class RulesFile(_Model):
    """A whole rules file."""

    profiles: dict[str, ProfileModel] = {}
    rules: tuple[RuleModel, ...] = ()

    @field_validator("profiles", mode="before")
    @classmethod
    def _name_profiles(cls, value: Any) -> Any:
        if value is None:
            return {}
        _mapping(value, "profiles", "{research: {key: {env: NAME}}}")
        return {
            str(name): {"@name": str(name), **profile} if isinstance(profile, dict) else profile
            for name, profile in value.items()
        }

    @field_validator("rules", mode="before")
    @classmethod
    def _no_rules(cls, value: Any) -> Any:
        return () if value is None else _list(value, "rules")
