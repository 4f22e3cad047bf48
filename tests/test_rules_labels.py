"""Label templates: parsing errors at load, rendering, XNAT's sanitizing and the keyed hash."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingestd.rules.labels import (
    Field,
    LabelError,
    TemplateError,
    label_hash,
    make_label,
    parse_template,
    render,
    sanitize_label,
)

ROUTE_FIELDS = ("calling_aet", "called_aet", "drop_folder", "path", "project")
LABEL = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _values(mapping: dict[str, str]) -> Callable[[Field], str]:
    def resolve(field: Field) -> str:
        if field.label not in mapping:
            raise LabelError(f"{field.label} is missing or empty")
        return mapping[field.label]

    return resolve


def test_parse_fields_literals_and_escapes() -> None:
    """Literal text, fields with slices and formats, and doubled braces as literal braces."""
    template = parse_template("S_{PatientID:hash8}_{StudyDate[0:4]}{{x}}_{path[1]}", ROUTE_FIELDS)
    assert template.parts[0] == "S_"
    assert template.parts[1] == Field("PatientID", format="hash", hash_length=8)
    assert template.parts[3] == Field("StudyDate", start=0, stop=4, sliced=True)
    assert template.parts[4] == "{x}_"
    assert template.parts[5] == Field("path", index=1)
    assert template.uses_hash
    assert not template.is_literal
    assert parse_template("PROJA", ROUTE_FIELDS).is_literal


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{PatientID", "unmatched '{' at character 1"),
        ("a}b", "unmatched '}' at character 2"),
        ("{Patient{ID}", "unmatched '{'"),
        ("{PatientId}", "unknown DICOM keyword 'PatientId' (did you mean 'PatientID'?)"),
        ("{projet}", "did you mean 'project'?"),
        ("{PatientID:hash2}", "unknown format ':hash2'"),
        ("{PatientID:hash65}", "unknown format ':hash65'"),
        ("{PatientID:title}", "unknown format ':title'"),
        ("{PatientID!r}", "is not a field"),
        ("{}", "is not a field"),
        ("{path}", "path is used by folder"),
        ("{path[-1]}", "path is used by folder"),
        ("{StudyDate[x]}", "a slice is [start:stop]"),
        ("{subject}", "{subject} cannot be used here; it is available in route.session"),
        ("{session}", "{session} cannot be used here"),
    ],
)
def test_parse_errors(text: str, fragment: str) -> None:
    """Each malformed template fails with a message that says what to write."""
    with pytest.raises(TemplateError) as caught:
        parse_template(text, ROUTE_FIELDS)
    assert fragment in str(caught.value)


def test_restricted_templates() -> None:
    """Replace values take only {project}, {subject} and {session}, without formats."""
    allowed = ("project", "subject", "session")
    parse_template("{subject}", allowed, keywords=False, formats=False)
    with pytest.raises(TemplateError, match="only"):
        parse_template("{PatientID}", allowed, keywords=False, formats=False)
    with pytest.raises(TemplateError, match="no slice or format"):
        parse_template("{subject:upper}", allowed, keywords=False, formats=False)


def test_render_formats_and_sanitizing() -> None:
    """upper, lower, slices and the hash apply to the value; the result is sanitized like XNAT does."""
    resolve = _values({"PatientName": "Doe^John", "StudyDate": "20240131", "PatientID": "12345"})
    key = b"k" * 32
    assert make_label(parse_template("{PatientName}", ()), resolve, None) == "Doe_John"
    assert make_label(parse_template("{PatientName:upper}", ()), resolve, None) == "DOE_JOHN"
    assert make_label(parse_template("{StudyDate[0:4]}-x", ()), resolve, None) == "2024-x"
    assert make_label(parse_template("{StudyDate[4:]}", ()), resolve, None) == "0131"
    hashed = make_label(parse_template("{PatientID:hash8}", ()), resolve, key)
    assert hashed == label_hash(key, "12345", 8)
    assert make_label(parse_template("a.b c/é", ()), resolve, None) == "a_b_c__"
    assert make_label(parse_template("x" * 80, ()), resolve, None) == "x" * 64


def test_label_hash_is_hmac_sha256_of_prefixed_value() -> None:
    """The documented construction, so that labels can be reproduced outside ingestd."""
    key = b"0123456789abcdef0123456789abcdef"
    expected = hmac.new(key, b"label:" + b"PAT-1", hashlib.sha256).hexdigest()
    assert label_hash(key, "PAT-1", 64) == expected
    assert label_hash(key, "PAT-1", 8) == expected[:8]


@pytest.mark.parametrize("text", ["{PatientName}", "^^^{PatientName}", "---"])
def test_label_without_letters_or_digits_is_refused(text: str) -> None:
    """All underscores (or nothing) left after sanitizing is not a label."""
    with pytest.raises(LabelError, match="no letter or digit"):
        make_label(parse_template(text, ()), _values({"PatientName": "^ ^"}), None)


def test_empty_slice_and_missing_value() -> None:
    """A slice past the end of the value, and a missing value, are errors naming the field only."""
    with pytest.raises(LabelError, match=r"PatientID\[8:12\] is empty"):
        render(parse_template("{PatientID[8:12]}", ()), _values({"PatientID": "SECRET"}), None)
    with pytest.raises(LabelError) as caught:
        render(parse_template("{PatientName}", ()), _values({}), None)
    assert str(caught.value) == "PatientName is missing or empty"


@given(st.text(max_size=200))
def test_sanitized_is_label_chars(text: str) -> None:
    """Whatever goes in, only [A-Za-z0-9_-] and at most 64 characters come out; sanitizing is idempotent."""
    label = sanitize_label(text)
    assert re.fullmatch(r"[A-Za-z0-9_-]{0,64}", label)
    assert sanitize_label(label) == label


@given(
    value=st.text(max_size=100), prefix=st.text(max_size=10), form=st.sampled_from(["", ":upper", ":lower", ":hash8"])
)
def test_label_is_valid_or_refused(value: str, prefix: str, form: str) -> None:
    """A rendered label always matches ^[A-Za-z0-9_-]{1,64}$, or the study is held with LabelError."""
    escaped = prefix.replace("{", "{{").replace("}", "}}")
    template = parse_template(escaped + "{PatientID" + form + "}", ())
    try:
        label = make_label(template, _values({"PatientID": value}), b"k" * 32)
    except LabelError:
        return
    assert LABEL.fullmatch(label)


@given(value=st.text(max_size=50))
def test_rendering_is_deterministic(value: str) -> None:
    """The same value and key give the same label, every time."""
    template = parse_template("{PatientID:hash12}_{PatientID:lower}", ())
    resolve = _values({"PatientID": value})
    assert render(template, resolve, b"a" * 32) == render(template, resolve, b"a" * 32)


@given(value=st.text(max_size=50), key_a=st.binary(min_size=32, max_size=40), key_b=st.binary(min_size=32, max_size=40))
def test_hash_differs_between_keys(value: str, key_a: bytes, key_b: bytes) -> None:
    """Two projects with different keys never share a label for the same patient."""
    if key_a == key_b:
        return
    assert label_hash(key_a, value, 16) != label_hash(key_b, value, 16)
