"""A validation error of the configuration in ingestd's words, not pydantic's: "must be a list", not "Input should
be a valid tuple"; an unknown key with the key it most likely meant.

Pure: it reads pydantic's error dicts and the models' field names, nothing else.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterator
from typing import Any, NamedTuple

import yaml
from pydantic import BaseModel

__all__ = ["RepeatedKey", "did_you_mean", "problem_text", "repeated_keys"]

# pydantic error type -> what the value must be, in the words a YAML writer knows.
_MUST_BE = {
    "tuple_type": "must be a list (one `- item` a line, or [a, b])",
    "list_type": "must be a list (one `- item` a line, or [a, b])",
    "dict_type": "must be a mapping (one `key: value` a line, or {key: value})",
    "model_type": "must be a mapping (one `key: value` a line, or {key: value})",
    "model_attributes_type": "must be a mapping (one `key: value` a line, or {key: value})",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number, without a fraction",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number (.inf and .nan are not)",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be text (put it in quotes if YAML reads it as something else)",
    "path_type": "must be a file or folder path (text)",
    "missing": "required key is missing",
}


def did_you_mean(word: str, candidates: list[str]) -> str:
    """` (did you mean 'X'?)` for the candidate closest to `word`, or an empty string."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    if not close:
        lowered = {candidate.lower(): candidate for candidate in candidates}
        close = [lowered[c] for c in difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)]
    return f" (did you mean '{close[0]}'?)" if close else ""


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models an annotation holds: itself, or inside Optional, tuple[...], dict[str, ...], Annotated."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _models_in(args[0])
    if origin in (typing.Union, types.UnionType, tuple, list):
        return [model for arg in args if arg is not Ellipsis for model in _models_in(arg)]
    if origin is dict:
        return _models_in(args[1])
    return []


def _keys_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys the mapping at `loc` may have (empty when `loc` does not lead to a model)."""
    current = [model]
    for part in loc:
        fields = [c.model_fields[str(part)] for c in current if str(part) in c.model_fields]
        if fields:
            current = [found for field in fields for found in _models_in(field.annotation)]
        # else: an item's index or a dict's key (a server's name): `current` already holds the value's model
    return sorted({name for candidate in current for name in candidate.model_fields})


def problem_text(error: Any, model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """The message for one pydantic error (a dict of `ValidationError.errors()`) at `loc` of `model`."""
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key" + did_you_mean(str(loc[-1]), _keys_at(model, loc[:-1])) if loc else "unknown key"
    if kind in _MUST_BE:
        return _MUST_BE[kind]
    message = str(error["msg"]).removeprefix("Value error, ")
    if message.startswith("Input should be "):
        return "must be " + message.removeprefix("Input should be ")
    return message


class RepeatedKey(NamedTuple):
    """A key given twice in one YAML mapping (PyYAML keeps the last silently, so the first is ignored)."""

    dotted: str  # where: `xnat.servers.main.url`, `rules.0.when`
    key: str
    first_line: int
    line: int  # of the second, the one YAML keeps


def repeated_keys(node: yaml.Node | None, path: tuple[Any, ...] = ()) -> Iterator[RepeatedKey]:
    """Every key given twice in one mapping of a composed YAML document, depth first (merge keys `<<` aside)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key != "<<":
                if key in seen:
                    yield RepeatedKey(".".join(str(part) for part in (*path, key)), key, seen[key], line)
                else:
                    seen[key] = line
            yield from repeated_keys(value_node, (*path, key))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            yield from repeated_keys(item, (*path, index))
