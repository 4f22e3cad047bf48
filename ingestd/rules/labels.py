"""Label templates: parsing (at load), rendering, XNAT's label sanitizing and the keyed label hash.

A template is text with `{Field}` substitutions, `{{`/`}}` for literal braces. A field is a DICOM keyword, a
source field (`calling_aet`, `called_aet`, `drop_folder`), `path[N]`, or an earlier label (`project`,
`subject`), optionally sliced (`{StudyDate[0:4]}`) and formatted (`:upper`, `:lower`, `:hashN`).
Pure functions: values come in through a resolver callback; nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass

from ingestd.rules.names import check_field

__all__ = [
    "MAX_LABEL",
    "Field",
    "LabelError",
    "Template",
    "TemplateError",
    "label_hash",
    "make_label",
    "parse_template",
    "render",
    "sanitize_label",
]

MAX_LABEL = 64  # XNAT's limit for extracted labels
HASH_MIN, HASH_MAX = 4, 64

_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[([^\]]*)\])?(?::(.*))?$")
_NOT_LABEL_CHAR = re.compile(r"[^A-Za-z0-9_-]")
_ALNUM = re.compile(r"[A-Za-z0-9]")
_INDEX = re.compile(r"^\s*(\d+)\s*$")
_SLICE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*$")
_HASH = re.compile(r"^hash(\d+)$")

_AVAILABLE = {
    "project": "in route.subject and route.session",
    "subject": "in route.session",
    "session": "in attribute replace values",
}


class TemplateError(ValueError):
    """A template does not parse or names something it may not use (raised at load)."""


class LabelError(Exception):
    """A label cannot be rendered for this study. The message names the field, never its value."""


@dataclass(frozen=True, slots=True)
class Field:
    """One `{...}` substitution."""

    name: str
    index: int | None = None  # path[N]
    start: int | None = None  # [start:stop] slice of the value
    stop: int | None = None
    sliced: bool = False
    format: str = ""  # "", "upper", "lower" or "hash"
    hash_length: int = 0

    @property
    def label(self) -> str:
        """The field as a hold reason or message names it: `PatientID`, `path[1]`."""
        return f"{self.name}[{self.index}]" if self.index is not None else self.name


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal text and fields, in order."""

    text: str
    parts: tuple[str | Field, ...]

    @property
    def fields(self) -> tuple[Field, ...]:
        return tuple(part for part in self.parts if isinstance(part, Field))

    @property
    def uses_hash(self) -> bool:
        return any(field.format == "hash" for field in self.fields)

    @property
    def is_literal(self) -> bool:
        return not self.fields


def _parse_field(body: str, allowed: tuple[str, ...], keywords: bool, formats: bool) -> Field:
    match = _FIELD.match(body)
    if not match:
        raise TemplateError(f"'{{{body}}}' is not a field: write {{Keyword}}, {{Keyword:upper}} or {{path[0]}}")
    name, bracket, spec = match.group(1), match.group(2), match.group(3)
    if name not in allowed:
        if name in _AVAILABLE:
            raise TemplateError(f"{{{name}}} cannot be used here; it is available {_AVAILABLE[name]}")
        if not keywords:
            names = ", ".join(f"{{{n}}}" for n in allowed)
            raise TemplateError(f"'{{{body}}}' is not allowed here: only {names} may be used")
        try:
            check_field(name, allowed)
        except ValueError as exc:
            raise TemplateError(f"{{{body}}}: {exc}") from None
    if (bracket is not None or spec is not None) and not formats:
        raise TemplateError(f"'{{{body}}}': no slice or format is allowed here")
    index, start, stop, sliced = _parse_bracket(body, name, bracket)
    fmt, hash_length = _parse_format(body, spec)
    return Field(name, index, start, stop, sliced, fmt, hash_length)


def _parse_bracket(body: str, name: str, bracket: str | None) -> tuple[int | None, int | None, int | None, bool]:
    if name == "path":
        index_match = _INDEX.match(bracket or "")
        if not index_match:
            raise TemplateError(f"'{{{body}}}': path is used by folder, as {{path[0]}}, {{path[1]}}, ...")
        return int(index_match.group(1)), None, None, False
    if bracket is None:
        return None, None, None, False
    slice_match = _SLICE.match(bracket)
    if not slice_match:
        raise TemplateError(f"'{{{body}}}': a slice is [start:stop], e.g. {{{name}[0:4]}}")
    start = int(slice_match.group(1)) if slice_match.group(1) else None
    stop = int(slice_match.group(2)) if slice_match.group(2) else None
    return None, start, stop, True


def _parse_format(body: str, spec: str | None) -> tuple[str, int]:
    if spec is None:
        return "", 0
    if spec in ("upper", "lower"):
        return spec, 0
    hash_match = _HASH.match(spec)
    if hash_match and HASH_MIN <= int(hash_match.group(1)) <= HASH_MAX:
        return "hash", int(hash_match.group(1))
    raise TemplateError(
        f"'{{{body}}}': unknown format ':{spec}'; use :upper, :lower or :hashN with N from {HASH_MIN} to {HASH_MAX}"
    )


def parse_template(text: str, allowed: tuple[str, ...], *, keywords: bool = True, formats: bool = True) -> Template:
    """Parse `text`; raise TemplateError naming the first problem.

    `allowed` are the non-keyword fields this template may use; `keywords` allows DICOM keywords too;
    `formats` allows slices and `:formats`.
    """
    parts: list[str | Field] = []
    literal: list[str] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char == "{" and text.startswith("{{", position):
            literal.append("{")
            position += 2
        elif char == "}" and text.startswith("}}", position):
            literal.append("}")
            position += 2
        elif char == "}":
            raise TemplateError(f"unmatched '}}' at character {position + 1} (write '}}}}' for a literal brace)")
        elif char == "{":
            end = text.find("}", position)
            nested = text.find("{", position + 1)
            if end < 0 or 0 <= nested < end:
                raise TemplateError(f"unmatched '{{' at character {position + 1} (write '{{{{' for a literal brace)")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_parse_field(text[position + 1 : end], allowed, keywords, formats))
            position = end + 1
        else:
            literal.append(char)
            position += 1
    if literal:
        parts.append("".join(literal))
    return Template(text, tuple(parts))


def label_hash(key: bytes, value: str, length: int) -> str:
    """The first `length` hex characters of HMAC-SHA-256(key, b"label:" + value)."""
    return hmac.new(key, b"label:" + value.encode("utf-8"), hashlib.sha256).hexdigest()[:length]


def render(template: Template, resolve: Callable[[Field], str], key: bytes | None) -> str:
    """Substitute every field; `resolve` gives a field's raw value or raises LabelError. Not sanitized."""
    pieces: list[str] = []
    for part in template.parts:
        if isinstance(part, str):
            pieces.append(part)
            continue
        value = resolve(part)
        if part.sliced:
            value = value[part.start : part.stop]
            if not value:
                raise LabelError(f"{part.label}[{part.start or ''}:{part.stop or ''}] is empty")
        if part.format == "upper":
            value = value.upper()
        elif part.format == "lower":
            value = value.lower()
        elif part.format == "hash":
            if key is None:
                raise LabelError(f"{{{part.label}:hash{part.hash_length}}} has no key")
            value = label_hash(key, value, part.hash_length)
        pieces.append(value)
    return "".join(pieces)


def sanitize_label(text: str) -> str:
    """What XNAT does to a label (`Labels.toLabelChars`): anything but [A-Za-z0-9_-] becomes `_`; at most 64."""
    return _NOT_LABEL_CHAR.sub("_", text)[:MAX_LABEL]


def make_label(template: Template, resolve: Callable[[Field], str], key: bytes | None) -> str:
    """Render and sanitize; raise LabelError when the result has no letter or digit left."""
    label = sanitize_label(render(template, resolve, key))
    if not _ALNUM.search(label):
        raise LabelError(
            "the label is empty or has no letter or digit once characters XNAT does not allow are replaced by '_'"
        )
    return label
