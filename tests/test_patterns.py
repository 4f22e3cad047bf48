"""Patterns from rules files run on RE2 (ingestd.patterns): linear time, Python's meaning where both engines
accept a pattern, a load error naming the construct where RE2 cannot run it."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ingestd.patterns import PatternError, compile_regex

BACKTRACKING = "which takes time linear in the value and so cannot backtrack"


@pytest.mark.parametrize(
    ("pattern", "named"),
    [
        (r"(a)\1", r"a backreference (\1) is not supported: patterns run on RE2, " + BACKTRACKING),
        (r"(?P<n>a)(?P=n)", f"a named backreference (?P=name) is not supported: patterns run on RE2, {BACKTRACKING}"),
        (r"T1(?=_MPRAGE)", "a lookahead (?=...) is not supported"),
        (r"T1(?!_MPRAGE)", "a negative lookahead (?!...) is not supported"),
        (r"(?<=T)1", "a lookbehind (?<=...) is not supported"),
        (r"(?<!T)1", "a negative lookbehind (?<!...) is not supported"),
        (r"a*+b", "a possessive quantifier (*+) is not supported"),
        (r"a++b", "a possessive quantifier (++) is not supported"),
        (r"a{2}+", "a possessive quantifier ({2}+) is not supported"),
        (r"(?>a+)b", "an atomic group (?>...) is not supported"),
        (r"(a)?(?(1)b|c)", "a conditional group (?(...)...) is not supported"),
        (r"(?P<x>a)(?P>x)", "a recursive group (?P>name) is not supported"),
        (r"(?x) a b", "the verbose flag (?x) is not supported by RE2, the engine patterns run on"),
        (r"(?#note)a", "a comment (?#...) is not supported by RE2"),
        (r"\u00e9", r"the escape \u is not supported by RE2, the engine patterns run on: write the code point as"),
        (r"\N{DIGIT ONE}", r"a named character \N{...} is not supported"),
        (r"[\b]", r"\b inside [...] (a backspace in Python) is not supported by RE2"),
        (r"a{1001}", "a repetition count above 1000 ({1001}; nested counts multiply) is too large for RE2"),
        (r"((a{100}){100}){100}", "is too large for RE2"),
        ("^RES(", "not a valid regular expression: missing ): ^RES("),
        ("[z-a]", "not a valid regular expression: invalid character class range: z-a"),
    ],
)
def test_what_re2_cannot_run_is_refused_naming_the_construct(pattern: str, named: str) -> None:
    with pytest.raises(PatternError) as raised:
        compile_regex(pattern)
    assert named in str(raised.value)


def test_refused_patterns_print_nothing_on_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    """RE2 logs each pattern it refuses through absl unless told not to: a lab admin sees our message only."""
    for pattern in (r"(a)\1", "a(?=b)", "(", "a{5000}"):
        with pytest.raises(PatternError):
            compile_regex(pattern)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("pattern", "value", "matching"),
    [
        (r"^(a+)+$", "a" * 40 + "!", "a" * 40),  # the pattern and value of issue 13: Python's re never ends on it
        (r"^(a|a)*$", "a" * 40 + "!", "a" * 40),
        (r"^(\w+\s?)*$", "word " * 30 + "!", "word " * 30),
        (r"(x+x+)+y", "x" * 5000, "x" * 5000 + "y"),
        (r"^(a+)+$", "a" * 1_000_000 + "!", "a" * 1_000_000),  # a megabyte-long value (an odd UT element)
    ],
)
def test_catastrophic_patterns_take_linear_time(pattern: str, value: str, matching: str) -> None:
    """Patterns that make a backtracking engine take exponential time answer at once (the timeout is the
    guard: with Python's re each of the values below would run for longer than the universe has existed)."""
    regex = compile_regex(pattern)
    assert regex.search(value) is False
    assert regex.sub("-", value) == value
    assert regex.search(matching) is True


# Patterns both engines accept, with values on which they must agree (search and sub).
AGREE = [
    (r"^RESEARCH", ["RESEARCH_01", "research", " RESEARCH"]),
    (r"(?i)localizer|scout", ["LOCALIZER", "3-plane Scout", "t1_mprage"]),
    (r"(?i)^qa", ["QA phantom", "qA", "aqa"]),
    (r"T1|T2", ["T1w", "t2", "FLAIR_T2"]),
    (r"a|ab", ["ab", "b"]),  # leftmost-first, as Python
    (r"^\d{3}$", ["123", "12", "1234", "12a"]),
    (r"^[A-Z]{2}\d+$", ["MR42", "Mr42", "MR"]),
    (r"\bT1\b", ["T1 MPRAGE", "T1W", "sag T1"]),
    (r"x{,2}y", ["y", "xxy", "xxxy", "x{,2}y"]),  # Python's {,n} is {0,n}; RE2 alone reads it literally
    (r"^a\Z", ["a", "ab", "a\n"]),  # Python's \Z is RE2's \z
    (r"\é", ["é", "e"]),
    (r"(?s)a.b", ["a\nb", "axb"]),
    (r"a.b", ["a\nb", "axb"]),
    (r"(?m)^b$", ["a\nb\nc", "abc"]),
    (r"(?i)é", ["É", "e"]),
    (r"(?i)straße", ["STRASSE", "Straße", "STRAẞE"]),
    (r"^.$", ["é", "日", "ab"]),
    (r"[^/]*\.dcm", ["a.dcm", "x/y.dcm", "dcm"]),
    (r"(?P<scan>\w+)_(\d+)", ["t1_01", "t1-01"]),
    (r"x*", ["", "axb", "éxé"]),
]


@pytest.mark.parametrize(("pattern", "values"), AGREE)
def test_where_both_engines_accept_a_pattern_they_agree(pattern: str, values: list[str]) -> None:
    regex = compile_regex(pattern)
    for value in values:
        assert regex.search(value) == (re.search(pattern, value) is not None), value
        assert regex.fullmatch(value) == (re.fullmatch(pattern, value) is not None), value
        assert regex.sub("<\\g<0>>", value) == re.sub(pattern, "<\\g<0>>", value), value


@pytest.mark.parametrize(
    ("pattern", "value", "python", "re2"),
    [
        (r"\d", "٣", True, False),  # ASCII-only classes on RE2 (documented in docs/rules.md)
        (r"\w", "é", True, False),
        (r"\s", "\u00a0", True, False),
        (r"\s", "\v", True, False),
        (r"^a$", "a\n", True, False),  # $ only at the very end on RE2
    ],
)
def test_the_documented_differences(pattern: str, value: str, python: bool, re2: bool) -> None:
    """What docs/rules.md says differs, differs (and no more than said)."""
    assert (re.search(pattern, value) is not None) is python
    assert compile_regex(pattern).search(value) is re2


def test_what_re2_adds_over_python() -> None:
    """Unicode and POSIX classes, which docs/rules.md offers in place of Python's Unicode \\w and \\d."""
    assert compile_regex(r"^\pL+$").search("Müller")
    assert compile_regex(r"^\p{Greek}+$").search("αβγ")
    assert not compile_regex(r"^\p{Greek}+$").search("abc")
    assert compile_regex(r"^[[:alpha:]]+$").search("abc")
    assert compile_regex(r"MR(?i:_t1)").search("MR_T1")
    assert not compile_regex(r"MR(?i:_t1)").search("mr_T1")


@pytest.mark.parametrize(
    ("pattern", "replacement", "value"),
    [
        (r"(?i)dr\.? \w+", "", "seen by Dr. Who and dr Jekyll"),
        (r"(\w+)\^(\w+)", r"\2 \1", "DOE^JOHN"),
        (r"(?P<last>\w+)\^(?P<first>\w+)", r"\g<first>_\g<last>", "DOE^JOHN"),
        (r"(\d)(x)?", r"[\1\2]", "1x2"),  # an unmatched group inserts nothing
        (r"a", "é", "banana"),  # non-ASCII replacement (re2's own sub would write 'Ã©')
        (r"a", r"\n\t\\", "a"),
        (r"a", r"\0\101", "a"),  # octal escapes
        (r"a", r"\&", "a"),  # other escapes keep their backslash
        (r"x*", "-", "abxd"),  # empty matches, also next to a previous match (Python 3.7+)
        (r"", "|", "日本"),
        (r"(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)(k)", r"\11\10", "abcdefghijk"),
    ],
)
def test_sub_is_pythons_re_sub(pattern: str, replacement: str, value: str) -> None:
    """The regex action keeps Python's replacement syntax and result."""
    regex = compile_regex(pattern)
    regex.check_replacement(replacement)
    assert regex.sub(replacement, value) == re.sub(pattern, replacement, value)


@pytest.mark.parametrize(
    ("pattern", "replacement", "problem"),
    [
        ("(a)", r"\2", "the replacement refers to group 2; the pattern has 1"),
        ("(a)", r"\g<name>", "the pattern has no group named 'name'"),
        ("(a)", r"\g<1", r"\g needs a group in angle brackets"),
        ("(a)", r"\q", r"unknown escape \q"),
        ("(a)", "x\\", "ends with a lone backslash"),
    ],
)
def test_bad_replacements_are_refused(pattern: str, replacement: str, problem: str) -> None:
    with pytest.raises(PatternError, match=re.escape(problem)):
        compile_regex(pattern).check_replacement(replacement)


def test_text_that_is_not_valid_unicode_is_matched_not_raised() -> None:
    """A lone surrogate cannot be UTF-8: it is matched (and substituted) as U+FFFD instead of raising."""
    regex = compile_regex("x")
    assert regex.search("\udcffx")
    assert not regex.fullmatch("\udcff")
    assert compile_regex(".").fullmatch("\udcff")
    assert regex.sub("y", "\udcffx") == "\ufffdy"


OLD_PERSON_NAME = re.compile(r"[^\s\^=\\\"',;:()\[\]{}<>|]*\^[^\s\"',;:()\[\]{}<>|]*")


@given(st.text(alphabet="ab^= \\\"',;:()[]{}<>|\t.é", max_size=60))
def test_person_name_redaction_matches_what_it_did_before(text: str) -> None:
    """The log redaction's person-name pattern starts only where a run of name characters starts: the same
    matches as before, found in linear time."""
    from ingestd.logs import _PERSON_NAME  # noqa: PLC0415

    assert _PERSON_NAME.sub("[redacted]", text) == OLD_PERSON_NAME.sub("[redacted]", text)


@pytest.mark.timeout(20)
def test_person_name_redaction_takes_linear_time() -> None:
    """A long run of name characters, then a space and a caret: quadratic before (50,000 characters, 11 s with
    the GIL held), a few milliseconds now (the timeout is the guard)."""
    from ingestd.logs import redact_value  # noqa: PLC0415

    assert redact_value("a" * 1_000_000 + " ^x") == "a" * 1_000_000 + " [redacted]"


def test_patterns_too_complex_to_run_cheaply_are_refused() -> None:
    """Every character of a value may cost a step per instruction of the pattern: past 5,000 instructions the
    pattern is refused at load (a list of 60 protocol names compiles to about 1,000)."""
    with pytest.raises(PatternError, match=r"too complex: RE2 compiles it to 10004 instructions, at most 5000"):
        compile_regex(r"(.*){1000}")
    names = "|".join(f"protocol_name_{index:03d}" for index in range(60))
    assert compile_regex(f"(?i)^({names})$").search("PROTOCOL_NAME_042")


def test_conditions_look_at_the_first_16384_characters_of_a_value() -> None:
    """More than any header value with a VR maximum (LT: 10,240) needs; a 10 MB value costs no more than that."""
    from ingestd.rules.match import MATCHED_CHARACTERS, Condition, glob_pattern  # noqa: PLC0415

    assert MATCHED_CHARACTERS == 16_384
    tail = Condition(field="ImageComments", text="", pattern=compile_regex("SECRET"))
    assert tail.holds(("x" * 16_378 + "SECRET",))
    assert not tail.holds(("x" * 16_379 + "SECRET",))
    assert not tail.holds(("x" * 10_000_000 + "SECRET",))
    deep = Condition(field="path", text="", glob=glob_pattern("**/*.dcm"))
    assert deep.holds(("a/" * 8000 + "x.dcm",))
    assert not deep.holds(("a/" * 9000 + "x.dcm",))


_ATOMS = st.sampled_from(["a", "b", "é", ".", "[ab]", "[^a]", r"\d", "1", " ", r"\.", "^", r"\A", r"\Z", "_"])
_QUANTIFIERS = st.sampled_from(["", "", "", "*", "+", "?", "{1,2}", "*?", "+?", "??", "{,2}", "{2}"])


def _regexes(depth: int) -> st.SearchStrategy[str]:
    """Patterns both engines may accept: atoms, quantifiers (lazy ones too), groups, alternation, (?i:...)."""
    item = st.builds(str.__add__, _ATOMS, _QUANTIFIERS)
    if depth == 0:
        return item
    inner = _regexes(depth - 1)
    body = st.lists(inner, min_size=1, max_size=3).map("".join)
    alternatives = st.one_of(body, st.builds(lambda left, right: f"{left}|{right}", body, inner))
    openings = st.sampled_from(["(", "(?:", "(?i:"])
    group = st.builds(
        lambda opening, body, quantifier: f"{opening}{body}){quantifier}", openings, alternatives, _QUANTIFIERS
    )
    return st.one_of(item, group)


# Small enough for Python's backtracking side of the comparison: nested quantified groups over longer values take
# it exponential time (in C, where no timeout can stop it).
@settings(max_examples=400, deadline=None)
@given(st.lists(_regexes(1), min_size=1, max_size=3).map("".join), st.lists(st.text("abAé1 ._\n", max_size=8)))
def test_random_patterns_agree_with_python(pattern: str, values: list[str]) -> None:
    """Whether a pattern matches depends only on the strings it describes, so `matches` and `glob` agree with
    Python exactly (no \\w, \\s, \\b or a final newline here: the documented differences). Which match `sub`
    replaces agrees too, unless a lazy quantifier or an empty match is involved (docs/rules.md)."""
    try:
        python = re.compile(pattern)
    except re.error:
        assume(False)
    ours = compile_regex(pattern)
    lazy = re.search(r"[*+?}]\?", pattern) is not None
    for value in (value.rstrip("\n") for value in values):
        assert ours.search(value) == (python.search(value) is not None), value
        assert ours.fullmatch(value) == (python.fullmatch(value) is not None), value
        if not lazy and all(match.end() > match.start() for match in python.finditer(value)):
            assert ours.sub("<\\g<0>>", value) == python.sub("<\\g<0>>", value), value


def test_which_empty_or_lazy_match_sub_replaces_may_differ() -> None:
    """The documented difference: after an empty match Python may take a longer match at the same place, RE2
    moves on (as Python did before 3.7); a lazy repeated group that can match nothing stops Python's loop."""
    assert re.sub("a*?", "<\\g<0>>", "a") == "<><a><>"
    assert compile_regex("a*?").sub("<\\g<0>>", "a") == "<>a<>"
    match = re.search("(a|.)(..{2}|a*?)*", "1111a")
    assert match is not None and match.group() == "1111"
    assert compile_regex("(a|.)(..{2}|a*?)*").sub("<\\g<0>>", "1111a") == "<1111a>"
