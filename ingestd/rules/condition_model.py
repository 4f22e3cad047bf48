"""The conditions of a rules file as pydantic models: a `when` mapping (conditions and `any`/`all`/`not` groups),
and one condition (`Keyword: {operator: operand}`), with every check that has a YAML line.

Errors are reported under the key as written (`rules.0.when.any.1.Modalty`), each with the line `load` finds for
it; what they say follows docs/rules.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ingestd.patterns import compile_regex
from ingestd.rules.conditions import glob_pattern
from ingestd.rules.names import SERIES_FIELDS, SOURCE_FIELDS, check_field, did_you_mean, sop_class_uid
from ingestd.rules.when import MAX_DEPTH

__all__ = ["ConditionModel", "WhenModel", "keyed", "regex_text", "text_value"]

_OPERATORS = ("equals", "in", "matches", "present", "missing", "lt", "le", "gt", "ge", "glob")
_GROUP_USE = {
    "any": "any: [{...}, {...}] holds when at least one of its mappings holds, e.g. any: [{calling_aet: MR1}, "
    "{calling_aet: MR2}]",
    "all": "all: [{...}, {...}] holds when every one of its mappings holds",
    "not": "not: {...} holds when its mapping does not hold, e.g. not: {Modality: SR}",
}
_GROUP_WORDS = {
    **dict.fromkeys(("any", "or", "anyof", "oneof", "either"), "any"),
    **dict.fromkeys(("all", "and", "allof", "both"), "all"),
    **dict.fromkeys(("not", "none", "noneof", "nor", "unless", "except"), "not"),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def regex_text(value: str | None) -> str | None:
    """A pattern RE2 compiles (the error names the construct it does not support), or None."""
    if value is not None:
        compile_regex(value)  # PatternError is a ValueError: pydantic reports its message
    return value


def text_value(value: Any) -> Any:
    """YAML numbers become text (`SeriesNumber: 3`); booleans and dates must be quoted."""
    if isinstance(value, bool):
        raise ValueError("YAML reads this as true/false: put the value in quotes")  # noqa: TRY004 - pydantic reports ValueError
    if isinstance(value, int | float):
        return str(value)
    if value is not None and not isinstance(value, str):
        raise ValueError("expected a text value: put it in quotes")
    return value


def keyed(conditions: Any, where: str) -> Any:
    """Give every condition of a `when`/`drop_series` mapping its key, so its errors are reported under it, and say
    where it is (`when` or `drop_series`), for the hint a misspelt `any`/`all`/`not` gets."""
    if not isinstance(conditions, dict):
        return conditions
    return {
        str(key): {"@keyword": str(key), "@in": where, **value}
        if isinstance(value, dict)
        else {"@keyword": str(key), "@in": where, "@bare": value}
        for key, value in conditions.items()
    }


def _group_hint(keyword: str, where: object) -> str | None:
    """What to write instead of a key that looks like `any`, `all` or `not` (`Or:`, `none_of:`), or None."""
    group = _GROUP_WORDS.get(keyword.lower().replace("-", "").replace("_", ""))
    if group is None:
        return None
    if where == "drop_series":
        return (
            f"unknown key '{keyword}': any, all and not are for when; a series is dropped if any drop_series entry "
            "holds, so write one entry per alternative"
        )
    return f"unknown key '{keyword}' (did you mean '{group}'?): {_GROUP_USE[group]}"


class ConditionModel(_Model):
    """`Keyword: {operator: operand, ...}`, or `Keyword: value` for equals."""

    keyword: str = Field(alias="@keyword")
    equals: str | None = None
    in_: tuple[str, ...] | None = Field(default=None, alias="in")
    matches: str | None = None
    glob: str | None = None
    present: bool | None = None
    missing: bool | None = None
    lt: float | None = None
    le: float | None = None
    gt: float | None = None
    ge: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "@keyword" not in data:
            return data
        data = dict(data)
        keyword = data["@keyword"]
        hint = _group_hint(keyword, data.pop("@in", None))
        if hint is not None:
            raise ValueError(hint)
        check_field(keyword, SOURCE_FIELDS + SERIES_FIELDS)
        if "@bare" in data:
            bare = data["@bare"]
            if isinstance(bare, list):
                raise ValueError("a list needs an operator: write {in: [...]}")
            if bare is None:
                raise ValueError("no condition given: write a value, or e.g. {present: true}")
            return {"@keyword": keyword, "equals": bare}
        unknown = [str(key) for key in data if key != "@keyword" and key not in _OPERATORS]
        if unknown:
            listed = f" (operators: {', '.join(_OPERATORS)})"
            raise ValueError(
                "; ".join(f"unknown operator '{key}'{did_you_mean(key, _OPERATORS) or listed}" for key in unknown)
            )
        if len(data) == 1:
            raise ValueError(f"no operator given: use one of {', '.join(_OPERATORS)}")
        return data

    @field_validator("equals", mode="before")
    @classmethod
    def _equals(cls, value: Any) -> Any:
        return text_value(value)

    @field_validator("in_", mode="before")
    @classmethod
    def _in(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise ValueError("in: needs a list of values, e.g. in: [MR, PT]")  # noqa: TRY004 - pydantic reports ValueError
        if not value:
            raise ValueError("in: needs at least one value")
        return tuple(text_value(item) for item in value)

    @field_validator("matches")
    @classmethod
    def _matches(cls, value: str | None) -> str | None:
        return regex_text(value)

    @field_validator("glob")
    @classmethod
    def _glob(cls, value: str | None) -> str | None:
        if value is not None:
            glob_pattern(value)
        return value

    @field_validator("present", "missing")
    @classmethod
    def _true_only(cls, value: bool | None) -> bool | None:
        if value is False:
            raise ValueError("only true is allowed: write present: true or missing: true")
        return value

    @model_validator(mode="after")
    def _combinations(self) -> ConditionModel:
        if self.missing and len(self.model_fields_set) > 2:
            raise ValueError("missing: true cannot be combined with other operators")
        if self.glob is not None and self.keyword != "path":
            raise ValueError("glob applies to path only; use matches for other fields")
        if self.keyword == "sop_class":
            for value in (self.equals, *(self.in_ or ())):
                if value is not None:
                    sop_class_uid(value)
        return self


def _branch(value: Any, what: str) -> Any:
    """One mapping of an `any`/`all` list or of `not`: a non-empty mapping of conditions."""
    if not isinstance(value, dict):
        raise ValueError(f"{what} is a mapping of conditions, e.g. {{Modality: MR}}")  # noqa: TRY004 - pydantic reports ValueError
    if not value:
        raise ValueError(f"{what} is empty: {{}} matches every study, so it says nothing here; remove it")
    return value


class WhenModel(BaseModel):
    """A `when` mapping: plain keys are conditions (validated as extra fields, reported under their key), and
    `any`, `all` and `not` hold further `when` mappings; all of them must hold."""

    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, ConditionModel] = Field(init=False)  # the plain keys, in the file's order

    any_: tuple[WhenModel, ...] | None = Field(default=None, alias="any")
    all_: tuple[WhenModel, ...] | None = Field(default=None, alias="all")
    not_: WhenModel | None = Field(default=None, alias="not")

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("@top") is True:  # the rule's own `when`: {} matches every study
            data = {key: value for key, value in data.items() if key != "@top"}
        else:  # an item of `any`/`all`, or `not`
            data = _branch(data, "a branch of any, all or not")
        plain = {key: value for key, value in data.items() if key not in ("any", "all", "not")}
        return {**keyed(plain, "when"), **{key: data[key] for key in ("any", "all", "not") if key in data}}

    @field_validator("any_", "all_", mode="before")
    @classmethod
    def _list(cls, value: Any, info: ValidationInfo) -> Any:
        key = "any" if info.field_name == "any_" else "all"
        if not isinstance(value, list):
            raise ValueError(f"{key} is a list of mappings: {_GROUP_USE[key]}")  # noqa: TRY004 - pydantic reports ValueError
        if not value:
            raise ValueError(f"{key} needs at least one mapping: {_GROUP_USE[key]}")
        return value

    @field_validator("not_", mode="before")
    @classmethod
    def _not(cls, value: Any) -> Any:
        if isinstance(value, list):
            message = "not takes one mapping, e.g. not: {Modality: SR}; for several: not: {any: [...]}"
            raise ValueError(message)  # noqa: TRY004 - pydantic reports ValueError
        return value

    @property
    def conditions(self) -> dict[str, ConditionModel]:
        return dict(self.__pydantic_extra__ or {})

    @property
    def depth(self) -> int:
        """How many `any`/`all`/`not` levels nest here: 0 for plain conditions."""
        children = [*(self.any_ or ()), *(self.all_ or ()), *((self.not_,) if self.not_ else ())]
        return 1 + max(child.depth for child in children) if children else 0

    def check_depth(self) -> WhenModel:
        if self.depth > MAX_DEPTH:
            raise ValueError(
                f"any/all/not are nested {self.depth} levels deep, at most {MAX_DEPTH}: "
                "split the rule into several rules (the first that matches decides)"
            )
        return self
