"""Rules an earlier rule shadows: `check-rules` warns (never falsely), the daemon logs `rules.shadowed`; and the
algebra of `any`/`all`/`not` against random facts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from ingestd.cli import main
from ingestd.config import Config
from ingestd.patterns import compile_regex
from ingestd.pipeline.build import load_rules_for
from ingestd.rules import RuleSet, SeriesFacts, StudyFacts, load_rules
from ingestd.rules.match import Condition, glob_pattern
from ingestd.rules.shadow import implies, shadowed_rules
from ingestd.rules.when import When, when_holds

ROUTE = "{server: main, project: P, subject: S, session: T}"


def _rules(tmp_path: Path, *whens: str) -> tuple[Path, RuleSet]:
    path = tmp_path / "r.rules.yaml"
    text = "rules:\n" + "".join(
        f"  - name: r{index}\n    when: {when}\n    route: {ROUTE}\n" for index, when in enumerate(whens)
    )
    path.write_text(text)
    return path, load_rules([path])


def _shadowed(tmp_path: Path, *whens: str) -> list[tuple[str, str, str]]:
    _path, rules = _rules(tmp_path, *whens)
    return [(found.rule.name, found.earlier.name, found.why) for found in shadowed_rules(rules)]


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ("{}", "{Modality: MR}"),
        ("{}", "{}"),
        ("{Modality: {in: [MR, CT]}}", "{Modality: MR}"),
        ("{Modality: {in: [MR, CT]}}", "{Modality: {in: [CT]}, calling_aet: SCANNER1}"),
        ("{Modality: MR}", "{Modality: MR}"),
        ("{SeriesDescription: {matches: '.*'}}", "{SeriesDescription: {equals: T1}}"),
        ("{SeriesDescription: {matches: '.*'}}", "{SeriesDescription: {matches: '^T1'}}"),
        ("{SeriesDescription: {matches: '^T1'}}", "{SeriesDescription: {in: [T1_MPRAGE, T1_SE]}}"),
        ("{SeriesDescription: {present: true}}", "{SeriesDescription: {matches: x}}"),
        ("{SeriesDescription: {matches: '^'}}", "{SeriesDescription: {present: true}}"),
        ("{SliceThickness: {lt: 5}}", "{SliceThickness: {le: 3}}"),
        ("{SliceThickness: {le: 5}}", "{SliceThickness: {lt: 5}}"),
        ("{SliceThickness: {ge: 1, lt: 5}}", "{SliceThickness: {gt: 1, le: 4}}"),
        ("{StudyComments: {missing: true}}", "{StudyComments: {missing: true}, Modality: MR}"),
        ("{calling_aet: {in: [MR1, MR2]}}", "{calling_aet: MR2, Modality: MR}"),
        ("{drop_folder: legacy}", "{drop_folder: legacy, path: {glob: '*/*/**'}}"),
        ("{drop_folder: legacy}", "{drop_folder: /srv/drop/legacy}"),  # a folder's path: its name is seen too
        ("{drop_folder: {matches: '^leg'}}", "{drop_folder: {in: [/srv/drop/legacy, legacy2]}}"),
        ("{path: {glob: '**/*.dcm'}}", "{path: {glob: '**/*.dcm'}, drop_folder: {present: true}}"),
        ("{any: [{calling_aet: MR1}, {calling_aet: MR2}]}", "{calling_aet: MR2}"),
        ("{any: [{Modality: MR}, {StationName: PET1}]}", "{StationName: PET1, Modality: PT}"),
        ("{Modality: MR}", "{any: [{Modality: MR, calling_aet: A}, {Modality: MR, calling_aet: B}]}"),
        ("{any: [{Modality: MR}, {Modality: CT}]}", "{any: [{Modality: CT}, {Modality: MR}]}"),
        ("{all: [{Modality: MR}, {calling_aet: A}]}", "{calling_aet: A, Modality: MR, StationName: X}"),
        ("{not: {Modality: SR}}", "{not: {Modality: {in: [SR, KO]}}}"),
        ("{not: {not: {Modality: MR}}}", "{Modality: MR}"),
        ("{Modality: MR}", "{not: {not: {Modality: MR}}}"),
        ("{any: [{Modality: MR}]}", "{Modality: MR}"),
    ],
)
def test_shadowed(tmp_path: Path, earlier: str, later: str) -> None:
    """A later rule whose `when` implies an earlier one's is reported, with the earlier rule."""
    found = _shadowed(tmp_path, earlier, later)
    assert [(rule, by) for rule, by, _why in found] == [("r1", "r0")], found


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        ("{Modality: MR}", "{}"),
        ("{Modality: MR}", "{Modality: {in: [MR, CT]}}"),
        ("{Modality: MR}", "{Modality: CT}"),
        ("{Modality: MR}", "{StationName: MR}"),  # another field
        ("{Modality: MR, calling_aet: A}", "{Modality: MR}"),  # the earlier rule asks more
        ("{SeriesDescription: {matches: '^T1'}}", "{SeriesDescription: {matches: '^T1_'}}"),  # not proven: no warning
        ("{SeriesDescription: {matches: '^T1'}}", "{SeriesDescription: {in: [T1, T2]}}"),
        ("{SeriesDescription: {matches: '.*'}}", "{SeriesDescription: {missing: true}}"),
        ("{SeriesDescription: {present: true}}", "{SeriesDescription: {missing: true}}"),
        ("{SeriesDescription: {missing: true}}", "{SeriesDescription: {present: true}}"),
        ("{SliceThickness: {lt: 5}}", "{SliceThickness: {le: 5}}"),
        ("{SliceThickness: {lt: 5}}", "{SliceThickness: {gt: 1}}"),
        ("{calling_aet: MR1}", "{drop_folder: MR1}"),
        ("{drop_folder: /srv/drop/legacy}", "{drop_folder: legacy}"),  # /srv/other/legacy is a legacy too
        ("{path: {glob: '*.dcm'}}", "{path: {glob: '**/*.dcm'}}"),
        ("{any: [{calling_aet: MR1}, {calling_aet: MR2}]}", "{calling_aet: MR3}"),
        ("{calling_aet: MR2}", "{any: [{calling_aet: MR1}, {calling_aet: MR2}]}"),
        ("{not: {Modality: {in: [SR, KO]}}}", "{not: {Modality: SR}}"),
        ("{not: {Modality: SR}}", "{Modality: MR}"),  # true (a series with MR may sit beside an SR), not proven
        ("{all: [{Modality: MR}, {calling_aet: A}]}", "{Modality: MR}"),
    ],
)
def test_not_shadowed(tmp_path: Path, earlier: str, later: str) -> None:
    """No warning where the later rule can match a study the earlier does not (or where that cannot be proven)."""
    assert _shadowed(tmp_path, earlier, later) == []


def test_each_later_rule_names_the_first_earlier_rule(tmp_path: Path) -> None:
    """Every shadowed rule is reported once, with the first rule that shadows it, and why."""
    found = _shadowed(tmp_path, "{Modality: {in: [MR, CT]}}", "{}", "{Modality: MR}", "{Modality: PT}")
    assert found == [
        ("r2", "r0", "Modality equals 'MR' is within Modality in [MR, CT]"),
        ("r3", "r1", "when: {} matches every study"),
    ]


def test_check_rules_prints_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`check-rules` says which rule, which earlier rule and why, as `file:line: warning:`, and exits 0."""
    path, _rules_loaded = _rules(tmp_path, "{Modality: {in: [MR, CT]}}", "{Modality: MR}", "{Modality: PT}")
    assert main(["check-rules", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{path}: OK (3 rules")
    assert captured.err.splitlines() == [
        f"{path}:5: warning: rule 'r1' can never match: the earlier rule 'r0' ({path}:2) matches every study it "
        "matches (Modality equals 'MR' is within Modality in [MR, CT]); move 'r1' above 'r0', or remove it"
    ]


def test_daemon_logs_shadowed_rules(tmp_path: Path) -> None:
    """Loading the configuration's rules (start, reload, import) logs `rules.shadowed`, naming rules and lines only."""
    path, _rules_loaded = _rules(tmp_path, "{}", "{Modality: MR}")
    config = Config.model_validate({"state_dir": str(tmp_path / "state"), "rules": [str(path)]})
    with capture_logs() as logged:
        rules = load_rules_for(config)
    assert rules is not None
    events = [event for event in logged if event["event"] == "rules.shadowed"]
    assert events == [
        {
            "event": "rules.shadowed",
            "log_level": "warning",
            "rule": "r1",
            "at": f"{path}:5",
            "earlier": "r0",
            "earlier_at": f"{path}:2",
            "detail": "never reached: the earlier rule matches every study it matches (ingestd check-rules says why)",
        }
    ]


# --- properties against random facts -----------------------------------------------------------------------------

# A small world, so that random conditions often overlap and random facts often satisfy them.
_VALUES = ("MR", "CT", "PT", "T1", "")
_FIELDS = ("Modality", "SeriesDescription", "SliceThickness", "calling_aet", "drop_folder", "path")


def _condition(field: str, kind: str, values: tuple[str, ...], bound: float) -> Condition:
    text = f"{kind} {values} {bound}"
    if kind == "equals":
        return Condition(field=field, text=text, equals=values[0])
    if kind == "in":
        return Condition(field=field, text=text, one_of=frozenset(values))
    if kind == "matches":
        return Condition(field=field, text=text, pattern=compile_regex(values[0]))
    if kind == "glob":
        return Condition(field=field, text=text, glob=glob_pattern(values[0]))
    if kind in ("present", "missing"):
        return Condition(field=field, text=text, present=kind == "present", missing=kind == "missing")
    bounds = {name: bound if name == kind else None for name in ("lt", "le", "gt", "ge")}
    return Condition(field=field, text=text, lt=bounds["lt"], le=bounds["le"], gt=bounds["gt"], ge=bounds["ge"])


_patterns = st.sampled_from((".*", "^", "^M", "T", "^(MR|CT)$", "R$", "1", "^a$", "^/"))
_globs = st.sampled_from(("**", "*.dcm", "**/*.dcm", "a/*", "a/**", "*/*/**"))
_bounds = st.sampled_from((0.5, 1.0, 3.0, 5.0))


@st.composite
def conditions(draw: st.DrawFn) -> Condition:
    field = draw(st.sampled_from(_FIELDS))
    kinds = ["equals", "in", "matches", "present", "missing", "lt", "le", "gt", "ge"]
    kind = draw(st.sampled_from([*kinds, "glob"] if field == "path" else kinds))
    if kind == "matches":
        values: tuple[str, ...] = (draw(_patterns),)
    elif kind == "glob":
        values = (draw(_globs),)
    else:
        values = tuple(
            draw(st.lists(st.sampled_from(("MR", "CT", "1", "3.0", "a/x.dcm", "a", "/srv/a")), min_size=1, max_size=3))
        )
    return _condition(field, kind, values, draw(_bounds))


def whens(depth: int = 2) -> st.SearchStrategy[When]:
    leaf = st.builds(When, conditions=st.lists(conditions(), max_size=2).map(tuple))
    if depth == 0:
        return leaf
    inner = whens(depth - 1)
    return st.one_of(
        leaf,
        st.builds(
            When,
            conditions=st.lists(conditions(), max_size=2).map(tuple),
            any_of=st.none() | st.lists(inner, min_size=1, max_size=3).map(tuple),
            all_of=st.none() | st.lists(inner, min_size=1, max_size=2).map(tuple),
            none_of=st.none() | inner,
        ),
    )


_header = st.one_of(
    st.sampled_from(_VALUES),
    st.sampled_from(("0.5", "1", "3.0", "4", "7.5", "x")),
    st.lists(st.sampled_from(("MR", "T1", "3", "CT")), min_size=2, max_size=3).map(tuple),
)


@st.composite
def facts(draw: st.DrawFn) -> StudyFacts:
    series = tuple(
        SeriesFacts(
            series_uid=f"1.{index}",
            instance_count=1,
            headers=draw(
                st.dictionaries(st.sampled_from(("Modality", "SeriesDescription", "SliceThickness")), _header)
            ),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        )
        for index in range(draw(st.integers(1, 3)))
    )
    dicom = draw(st.booleans())
    return StudyFacts(
        study_uid="1.2.3",
        series=series,
        calling_aet=draw(st.sampled_from(("MR", "CT", "1", ""))) if dicom else None,
        drop_folder=None if dicom else draw(st.sampled_from(("/srv/a", "/srv/a/", "/srv/b", "/a", "a"))),
        paths=() if dicom else tuple(draw(st.lists(st.sampled_from(("x.dcm", "a/x.dcm", "a/b/c", "MR")), max_size=3))),
    )


def _holds(when: When, study: StudyFacts) -> bool:
    return when_holds(when, study)


@settings(max_examples=200, deadline=None)
@given(when=whens(), study=facts())
def test_not_of_not_and_any_of_one(when: When, study: StudyFacts) -> None:
    """`not: {not: X}` is X; `any: [X]` and `all: [X]` are X; `{}` holds for every study."""
    assert _holds(When(none_of=When(none_of=when)), study) == _holds(when, study)
    assert _holds(When(any_of=(when,)), study) == _holds(when, study)
    assert _holds(When(all_of=(when,)), study) == _holds(when, study)
    assert _holds(When(), study)


@settings(max_examples=200, deadline=None)
@given(first=whens(1), second=whens(1), study=facts())
def test_de_morgan(first: When, second: When, study: StudyFacts) -> None:
    """not any = all not; not all = any not; plain keys beside a group are ANDed with it."""
    nots = (When(none_of=first), When(none_of=second))
    assert _holds(When(none_of=When(any_of=(first, second))), study) == _holds(When(all_of=nots), study)
    assert _holds(When(none_of=When(all_of=(first, second))), study) == _holds(When(any_of=nots), study)
    mixed = When(conditions=first.conditions, any_of=(second,))
    assert _holds(mixed, study) == (_holds(When(conditions=first.conditions), study) and _holds(second, study))


@settings(max_examples=400, deadline=None)
@given(later=whens(1), earlier=whens(1), studies=st.lists(facts(), min_size=1, max_size=8))
def test_shadow_warnings_are_never_false(later: When, earlier: When, studies: list[StudyFacts]) -> None:
    """Whenever `implies` says the later `when` implies the earlier, every study the later holds for, the earlier
    holds for too (a false warning would tell the admin to move or delete a rule that does route studies)."""
    if implies(later, earlier) is None:
        return
    for study in studies:
        if _holds(later, study):
            assert _holds(earlier, study), (implies(later, earlier), study)


@settings(max_examples=200, deadline=None)
@given(when=whens(), studies=st.lists(facts(), min_size=1, max_size=4))
def test_a_when_implies_its_weakenings(when: When, studies: list[StudyFacts]) -> None:
    """Proven, and true: a `when` implies itself, any `any` that lists it, and `{}`."""
    assert implies(when, when) is not None
    assert (
        implies(when, When(any_of=(When(conditions=(_condition("Modality", "equals", ("X",), 0),)), when))) is not None
    )
    assert implies(when, When()) is not None
    for study in studies:
        assert not _holds(when, study) or _holds(When(any_of=(When(), when)), study)
