"""Regular expressions from rules files and profiles, run on RE2: time linear in the text, whatever the pattern.

A lab's rules are matched against header values a scanner or a dropped file chose. Python's `re` backtracks: a
pattern such as `^(a+)+$` takes exponential time on a value of 40 `a`s and a `!`, holding the GIL all along, so
that one study would freeze every thread of the daemon. RE2 (google-re2) never backtracks; the price is that it
has no backreferences, lookaround, possessive quantifiers or atomic groups. Such a pattern is refused when the
rules are loaded, with a message that names the construct, never at match time.

Python spellings with an exact RE2 equivalent are accepted as written: `\\Z` (end of text, RE2's `\\z`),
`{,n}` (`{0,n}`; RE2 would read it literally) and an escaped non-ASCII character. docs/rules.md, "Patterns",
lists what differs from Python's `re`.

Matching and substituting never raise for any text: a lone surrogate (not valid UTF-8, so not something RE2
can read) is matched as U+FFFD.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import re2

__all__ = ["MAX_PROGRAM_SIZE", "PatternError", "Regex", "compile_regex", "escape"]

# RE2's time is linear in the value but also in the pattern's program: in the worst case (a pattern whose DFA would
# not fit in memory, so RE2 falls back to its NFA) every character of a value costs a step per instruction, about
# 2 ns each. Typical rule patterns compile to 5 to 100 instructions; a list of 60 protocol names to about 1,000.
MAX_PROGRAM_SIZE = 5000


class PatternError(ValueError):
    """A pattern or replacement that cannot be used; the message names the construct, for the lab admin."""


def _options(*, dot_all: bool) -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would print each refused pattern on stderr through absl: we report it ourselves
    options.dot_nl = dot_all
    return options


_WHY = "patterns run on RE2, which takes time linear in the value and so cannot backtrack (docs/rules.md, Patterns)"

# Constructs that need backtracking, by the opening of their group.
_BACKTRACKING = {
    "(?=": "a lookahead (?=...)",
    "(?!": "a negative lookahead (?!...)",
    "(?<=": "a lookbehind (?<=...)",
    "(?<!": "a negative lookbehind (?<!...)",
    "(?>": "an atomic group (?>...)",
    "(?(": "a conditional group (?(...)...)",
    "(?P=": "a named backreference (?P=name)",
    "(?P>": "a recursive group (?P>name)",
    "(?&": "a recursive group (?&name)",
    "(?R": "a recursive pattern (?R)",
}
# Python spellings RE2 does not know, and what to write instead.
_SYNTAX = {
    "(?#": ("a comment (?#...)", "remove it"),
    "(?|": ("a branch reset group (?|...)", "use a plain group"),
    "(?x": ("the verbose flag (?x)", "remove the spaces and comments"),
    "(?a": ("the ASCII flag (?a)", "remove it: \\d, \\w, \\s and \\b are ASCII-only on RE2"),
    "(?u": ("the Unicode flag (?u)", "write \\pL, \\pN or \\p{Greek} for Unicode classes"),
    "(?L": ("the locale flag (?L)", "remove it"),
    "\\u": ("the escape \\u", "write the code point as \\x{00E9}"),
    "\\U": ("the escape \\U", "write the code point as \\x{1F600}"),
    "\\N": ("a named character \\N{...}", "write its code point as \\x{00E9}"),
    "\\b": ("\\b inside [...] (a backspace in Python)", "write \\x08"),
}


def _group_construct(pattern: str, start: str) -> str | None:
    """The opening of the first `(?...` group RE2 refused, found from the start RE2 reported."""
    openings = sorted((*_BACKTRACKING, *(key for key in _SYNTAX if key.startswith("("))), key=len, reverse=True)
    position = pattern.find(start)
    while position >= 0:
        for opening in openings:
            if pattern.startswith(opening, position):
                return opening
        position = pattern.find(start, position + 1)
    return None


def _problem(message: str, pattern: str) -> str:  # noqa: PLR0911 - one sentence per kind of RE2 error
    """RE2's error, as a sentence that names the construct."""
    code, _, argument = message.partition(": ")
    opening: str | None = None
    if code == "invalid escape sequence":
        if len(argument) == 2 and argument[1] in "123456789":
            return f"a backreference ({argument}) is not supported: {_WHY}"
        opening = argument if argument in _SYNTAX else None
        if opening is None:
            return f"the escape {argument} is not supported by RE2, the engine patterns run on"
    elif code == "invalid perl operator":
        opening = _group_construct(pattern, argument)
    elif code == "bad repetition operator" and argument.endswith("+"):
        return f"a possessive quantifier ({argument}) is not supported: {_WHY}"
    elif code == "invalid repetition size":
        return f"a repetition count above 1000 ({argument}; nested counts multiply) is too large for RE2"
    elif code.startswith("pattern too large"):
        return "the pattern is too large: RE2 would need more than 8 MiB to run it"
    if opening in _BACKTRACKING:
        return f"{_BACKTRACKING[opening]} is not supported: {_WHY}"
    if opening in _SYNTAX:
        construct, hint = _SYNTAX[opening]
        return f"{construct} is not supported by RE2, the engine patterns run on: {hint}"
    return f"not a valid regular expression: {message}"


def _error_text(exc: BaseException) -> str:
    argument = exc.args[0] if exc.args else ""
    return argument.decode("utf-8", "replace") if isinstance(argument, bytes) else str(argument)


def _translate(pattern: str) -> str:
    """Python spellings that RE2 lacks or reads otherwise, rewritten to their exact RE2 equivalents:
    `\\Z` -> `\\z`, `{,n}` -> `{0,n}`, `\\é` (an escaped non-ASCII character) -> `é`."""
    out: list[str] = []
    position, end, in_class = 0, len(pattern), False
    while position < end:
        char = pattern[position]
        if char == "\\" and position + 1 < end:
            escaped = pattern[position + 1]
            if escaped == "Z" and not in_class:
                out.append("\\z")
            elif not escaped.isascii():
                out.append(escaped)
            else:
                out.append(pattern[position : position + 2])
            position += 2
            continue
        if in_class:
            if char == "[" and pattern.startswith("[:", position) and (close := pattern.find(":]", position)) > 0:
                out.append(pattern[position : close + 2])  # a POSIX class, [:alpha:]
                position = close + 2
                continue
            in_class = char != "]"
            out.append(char)
            position += 1
            continue
        if char == "[":
            in_class = True
            start = position + 1
            start += pattern.startswith("^", start)
            start += pattern.startswith("]", start)  # a ']' first in a class is a literal
            out.append(pattern[position:start])
            position = start
            continue
        if char == "{" and pattern.startswith("{,", position):
            digits = position + 2
            while digits < end and pattern[digits].isdigit():
                digits += 1
            if digits > position + 2 and pattern.startswith("}", digits):
                out.append("{0," + pattern[position + 2 : digits] + "}")
                position = digits + 1
                continue
        out.append(char)
        position += 1
    return "".join(out)


def _sane(text: str) -> str:
    """`text` as RE2 can read it: lone surrogates (not valid UTF-8) become U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= char <= "\udfff" else char for char in text)
    return text


@dataclass(frozen=True, slots=True)
class _Template:
    """A parsed replacement: literal pieces and group numbers, alternating (`pieces[0]` literal, then group,
    literal, group, ...)."""

    literals: tuple[str, ...]
    groups: tuple[int, ...]


_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_OCTAL = "01234567"


def _is_octal(text: str) -> bool:
    return len(text) == 2 and all(char in _OCTAL for char in text)


def _group_number(reference: str, groups: int, names: dict[str, int]) -> int:
    if reference.isdigit() and reference.isascii():
        number = int(reference)
    elif reference in names:
        number = names[reference]
    else:
        raise PatternError(f"\\g<{reference}>: the pattern has no group named {reference!r}")
    if number > groups:
        raise PatternError(f"the replacement refers to group {number}; the pattern has {groups}")
    return number


def _parse_template(template: str, groups: int, names: dict[str, int]) -> _Template:  # noqa: PLR0912 - one branch per escape
    """Python's re.sub replacement syntax: \\1 to \\99, \\g<1>, \\g<name>, \\n and the other escapes of a Python
    string; an unknown escape of an ASCII letter is an error, any other is kept with its backslash."""
    literals: list[str] = []
    numbers: list[int] = []
    current: list[str] = []
    position, end = 0, len(template)
    while position < end:
        char = template[position]
        if char != "\\":
            current.append(char)
            position += 1
            continue
        if position + 1 >= end:
            raise PatternError("the replacement ends with a lone backslash: write \\\\ for one")
        escaped = template[position + 1]
        position += 2
        number: int | None = None
        if escaped == "g":
            close = template.find(">", position)
            if not template.startswith("<", position) or close < 0:
                raise PatternError("\\g needs a group in angle brackets: \\g<1> or \\g<name>")
            number = _group_number(template[position + 1 : close], groups, names)
            position = close + 1
        elif escaped == "0" or (escaped in _OCTAL and _is_octal(template[position : position + 2])):
            digits = escaped
            while len(digits) < 3 and position < end and template[position] in _OCTAL:
                digits += template[position]
                position += 1
            current.append(chr(int(digits, 8)))
        elif escaped.isdigit() and escaped.isascii():
            digits = escaped
            if position < end and template[position].isdigit() and template[position].isascii():
                digits += template[position]
                position += 1
            number = _group_number(digits, groups, names)
        elif escaped in _ESCAPES:
            current.append(_ESCAPES[escaped])
        elif escaped.isascii() and escaped.isalpha():
            raise PatternError(f"the replacement has an unknown escape \\{escaped}: write \\\\ for a backslash")
        else:
            current.append("\\" + escaped)
        if number is not None:
            literals.append("".join(current))
            current = []
            numbers.append(number)
    literals.append("".join(current))
    return _Template(tuple(literals), tuple(numbers))


@dataclass(frozen=True, slots=True)
class Regex:
    """A compiled RE2 pattern. `pattern` is the text as the rules file wrote it."""

    pattern: str
    _compiled: Any = field(repr=False, compare=False)

    @property
    def groups(self) -> int:
        return int(self._compiled.groups)

    def search(self, text: str) -> bool:
        """Whether the pattern occurs anywhere in `text` (Python's `re.search`)."""
        try:
            return self._compiled.search(text) is not None
        except UnicodeEncodeError:
            return self._compiled.search(_sane(text)) is not None

    def fullmatch(self, text: str) -> bool:
        """Whether the pattern matches the whole of `text`."""
        try:
            return self._compiled.fullmatch(text) is not None
        except UnicodeEncodeError:
            return self._compiled.fullmatch(_sane(text)) is not None

    def check_replacement(self, replacement: str) -> None:
        """Raise PatternError if `replacement` is not a valid replacement for this pattern."""
        self._template(replacement)

    def sub(self, replacement: str, text: str) -> str:
        """Python's `re.sub(pattern, replacement, text)`: every non-overlapping match replaced, empty matches
        included (also next to a previous match, as Python 3.7 and later do); an unmatched group is empty."""
        template = self._template(replacement)
        text = _sane(text)
        out: list[str] = []
        end = 0
        for match in self._compiled.finditer(text):
            start, stop = match.span()
            out.append(text[end:start])
            for literal, number in zip(template.literals, template.groups, strict=False):
                out.append(literal)
                out.append(match.group(number) or "")
            out.append(template.literals[-1])
            end = stop
        out.append(text[end:])
        return "".join(out)

    def _template(self, replacement: str) -> _Template:
        return _cached_template(replacement, self.groups, tuple(sorted(self._compiled.groupindex.items())))


@functools.lru_cache(maxsize=256)
def _cached_template(replacement: str, groups: int, names: tuple[tuple[str, int], ...]) -> _Template:
    return _parse_template(replacement, groups, dict(names))


def compile_regex(pattern: str, *, dot_all: bool = False) -> Regex:
    """Compile a pattern from a rules file on RE2; raise PatternError naming what RE2 does not support.

    `dot_all`: `.` matches a newline too (Python's re.DOTALL).
    """
    try:
        compiled = re2.compile(_translate(pattern), _options(dot_all=dot_all))
    except re2.error as exc:
        raise PatternError(_problem(_error_text(exc), pattern)) from None
    if compiled.programsize > MAX_PROGRAM_SIZE:
        raise PatternError(
            f"the pattern is too complex: RE2 compiles it to {compiled.programsize} instructions, at most "
            f"{MAX_PROGRAM_SIZE} (each character of a value may cost a step per instruction): shorten large "
            "repetition counts, or split it into several conditions"
        )
    return Regex(pattern, compiled)


def escape(text: str) -> str:
    """`text` as a pattern that matches it literally."""
    return str(re2.escape(text))
