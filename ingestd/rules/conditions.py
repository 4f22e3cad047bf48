"""Conditions and the facts they look at: what one `when` or `drop_series` key says, and whether it holds.

Pure: a `Condition` is tested against the values of a `StudyFacts` (header values of one representative instance
per series, and where the study came from). Patterns and globs run on RE2 (`ingestd.patterns`) and look at the
first MATCHED_CHARACTERS characters of a value.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath

from ingestd.patterns import PatternError, Regex, compile_regex, escape

__all__ = [
    "MATCHED_CHARACTERS",
    "Condition",
    "SeriesFacts",
    "StudyFacts",
    "ValueTest",
    "clean_values",
    "condition_holds",
    "glob_pattern",
    "series_values",
    "source_values",
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
    tests: tuple[ValueTest, ...] = dataclasses.field(init=False, repr=False, compare=False)  # value_tests(), once

    def __post_init__(self) -> None:
        object.__setattr__(self, "tests", self.value_tests())

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
        return all(any(test.check(value) for value in values) for test in self.tests)

    def value_tests(self) -> tuple[ValueTest, ...]:
        """The operators other than present/missing, each as it tests one value: the condition holds for a list of
        values when each operator is passed by one of them (not necessarily the same)."""
        tests: list[ValueTest] = []
        if self.equals is not None:
            tests.append(ValueTest(self.equals.__eq__, "values", values=frozenset((self.equals,))))
        if self.one_of is not None:
            tests.append(ValueTest(self.one_of.__contains__, "values", values=self.one_of))
        if self.pattern is not None:
            tests.append(ValueTest(partial(_search, self.pattern), "matches", text=self.pattern.pattern))
        if self.glob is not None:
            tests.append(ValueTest(partial(_fullmatch, self.glob), "glob", text=self.glob.pattern))
        for name, bound, compare in (
            ("lt", self.lt, float.__lt__),
            ("le", self.le, float.__le__),
            ("gt", self.gt, float.__gt__),
            ("ge", self.ge, float.__ge__),
        ):
            if bound is not None:
                tests.append(ValueTest(_numeric(compare, bound), name, bound=bound))
        return tuple(tests)


@dataclass(frozen=True, slots=True)
class ValueTest:
    """One operator of a condition, as it tests one value (`kind`: values, matches, glob, lt, le, gt or ge)."""

    check: Callable[[str], bool]
    kind: str
    values: frozenset[str] = frozenset()  # equals, in
    text: str = ""  # matches: the pattern as written; glob: the expression it was turned into
    bound: float = 0.0  # lt, le, gt, ge


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


# --- values ------------------------------------------------------------------------------------------------


def clean_values(value: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    raw = (value,) if isinstance(value, str) else value
    return tuple(cleaned for item in raw if (cleaned := str(item).strip(_STRIP)))


def series_values(condition: Condition, series: SeriesFacts) -> tuple[str, ...]:
    if condition.field == "sop_class":
        return clean_values(series.sop_class_uid)
    return clean_values(series.headers.get(condition.field))


def source_values(field_name: str, study: StudyFacts) -> tuple[str, ...]:
    if field_name == "calling_aet":
        return clean_values(study.calling_aet)
    if field_name == "called_aet":
        return clean_values(study.called_aet)
    if field_name == "drop_folder":
        if not study.drop_folder:
            return ()
        folder = study.drop_folder.rstrip("/") or "/"
        return tuple(dict.fromkeys((folder, PurePosixPath(folder).name)))
    return tuple(path for path in study.paths if path)


def condition_holds(condition: Condition, study: StudyFacts) -> bool:
    """Whether a `when` condition holds for the study: a source field's values, or a header's in at least one
    series (`missing`: in every series)."""
    if not condition.per_series:
        return condition.holds(source_values(condition.field, study))
    results = (condition.holds(series_values(condition, series)) for series in study.series)
    return all(results) if condition.missing else any(results)
