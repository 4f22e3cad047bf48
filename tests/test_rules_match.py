"""Matching studies against rules: conditions, precedence, dropped series, labels, hold reasons, explanations."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestd.rules import Held, Routed, RuleSet, SeriesFacts, StudyFacts, decide, explain_match, label_hash, load_rules
from ingestd.states import HoldCode

KEY = "0123456789abcdef" * 4
RULES_DIR = Path(__file__).parent.parent / "rules"
MR = "1.2.840.10008.5.1.4.1.1.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
PLANTED = "ZZSECRET4711"  # an original value that must never appear in a hold reason

MakeRules = Callable[..., RuleSet]


def series(
    uid: str, headers: Mapping[str, str | tuple[str, ...]] | None = None, count: int = 10, sop: str = MR
) -> SeriesFacts:
    return SeriesFacts(series_uid=uid, instance_count=count, headers=dict(headers or {}), sop_class_uid=sop)


def study(*items: SeriesFacts, **source: Any) -> StudyFacts:
    return StudyFacts(study_uid="1.2.3", series=tuple(items), **source)


def mr(**extra: str | tuple[str, ...]) -> dict[str, str | tuple[str, ...]]:
    return {"Modality": "MR", "PatientID": "P1", "StudyDate": "20240131", "StudyDescription": "RESEARCH^X"} | extra


@pytest.fixture
def make_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MakeRules:
    monkeypatch.setenv("KEY_A", KEY)

    def make(rules: str, profiles: str = "research:\n    key: {env: KEY_A}\n") -> RuleSet:
        path = tmp_path / "t.rules.yaml"
        path.write_text(f"profiles:\n  {profiles}\nrules:\n{rules}")
        return load_rules([path])

    return make


def rule(name: str, when: str, *, route: str = "", extra: str = "") -> str:
    route = route or "{server: main, project: P, subject: '{PatientID:hash8}', session: '{subject}_S'}"
    if "anonymize:" in extra or "key:" in route:
        return f"  - name: {name}\n    when: {when}\n    route: {route}\n{extra}"
    # Labels from raw identifying values are refused for de-identified studies: these rules only route.
    route = route[:-1] + ", key: {env: KEY_A}}"
    return f"  - name: {name}\n    when: {when}\n    route: {route}\n{extra}"


def routed(decision: Routed | Held) -> Routed:
    assert isinstance(decision, Routed), decision
    return decision


def held(decision: Routed | Held) -> Held:
    assert isinstance(decision, Held), decision
    return decision


def test_first_matching_rule_wins(make_rules: MakeRules) -> None:
    """Rules are tried in order; a later, also matching rule is never used."""
    rules = make_rules(
        rule("mr", "{Modality: MR}") + rule("research", "{StudyDescription: {matches: ^RESEARCH}}") + rule("all", "{}")
    )
    assert routed(decide(rules, study(series("1", mr())))).rule == "mr"
    assert routed(decide(rules, study(series("1", mr(Modality="CT"))))).rule == "research"
    assert routed(decide(rules, study(series("1", {"Modality": "CT", "PatientID": "P"})))).rule == "all"


def test_unrouted(make_rules: MakeRules) -> None:
    """No rule matching holds the study, counting the rules tried."""
    rules = make_rules(rule("mr", "{Modality: MR}") + rule("pt", "{Modality: PT}"))
    decision = held(decide(rules, study(series("1", mr(Modality="CT")))))
    assert decision == Held(reason="no rule matches this study (2 rules tried)", code=HoldCode.UNROUTED)
    one = make_rules(rule("mr", "{Modality: MR}"))
    assert held(decide(one, study(series("1", {})))).reason == "no rule matches this study (1 rule tried)"
    assert held(decide(one, study())).code == "empty"


@pytest.mark.parametrize(
    ("when", "headers", "expected"),
    [
        ("{Modality: MR}", {"Modality": "MR "}, True),  # DICOM padding is not part of the value
        ("{Modality: MR}", {"Modality": "mr"}, False),  # equals is case-sensitive
        ("{Modality: {in: [MR, PT]}}", {"Modality": "PT"}, True),
        ("{SeriesNumber: 3}", {"SeriesNumber": "3"}, True),  # a YAML number compares as its text
        ("{StudyDescription: {matches: RESEARCH}}", {"StudyDescription": "MY RESEARCH"}, True),  # re.search
        ("{StudyDescription: {matches: ^RESEARCH}}", {"StudyDescription": "MY RESEARCH"}, False),
        ("{StudyDescription: {matches: '(?i)^research'}}", {"StudyDescription": "Research"}, True),
        ("{ImageType: {equals: M}}", {"ImageType": ("ORIGINAL", "PRIMARY", "M")}, True),  # any value of VM > 1
        ("{ImageType: {in: [DERIVED]}}", {"ImageType": ("ORIGINAL", "PRIMARY")}, False),
        ("{ImageType: {matches: ^PRI}}", {"ImageType": ("ORIGINAL", "PRIMARY")}, True),
        ("{SliceThickness: {ge: 5}}", {"SliceThickness": "5.0"}, True),
        ("{SliceThickness: {gt: 5}}", {"SliceThickness": "5"}, False),
        ("{SliceThickness: {lt: 5, ge: 1}}", {"SliceThickness": "1.25"}, True),
        ("{SliceThickness: {lt: 5, ge: 1}}", {"SliceThickness": "0.5"}, False),  # every operator must hold
        ("{SliceThickness: {le: 5}}", {"SliceThickness": "thin"}, False),  # not a number: false
        ("{SliceThickness: {le: 5}}", {"SliceThickness": "nan"}, False),
        ("{SliceThickness: {le: 5}}", {}, False),
        ("{EchoTime: {lt: 10}}", {"EchoTime": ("12", "4.5")}, True),
        ("{PatientWeight: {gt: -1}}", {"PatientWeight": "-0.5e0"}, True),
        ("{StudyComments: {present: true}}", {"StudyComments": "x"}, True),
        ("{StudyComments: {present: true}}", {"StudyComments": "  "}, False),  # empty counts as missing
        ("{StudyComments: {missing: true}}", {}, True),
        ("{StudyComments: {missing: true}}", {"StudyComments": ""}, True),
        ("{StudyComments: {missing: true}}", {"StudyComments": "x"}, False),
        ("{Modality: MR, StudyDescription: {matches: X}}", mr(), True),
        ("{Modality: MR, StudyDescription: {matches: Y}}", mr(), False),  # every key must hold
        ("{}", {}, True),
        ("{any: [{Modality: CT}, {StationName: PET1}]}", {"Modality": "PT", "StationName": "PET1"}, True),
        ("{any: [{Modality: CT}, {StationName: PET1}]}", {"Modality": "PT", "StationName": "PET2"}, False),
        ("{all: [{Modality: MR}, {StudyDescription: {matches: X}}]}", mr(), True),
        ("{all: [{Modality: MR}, {StudyDescription: {matches: Y}}]}", mr(), False),
        ("{not: {Modality: SR}}", mr(), True),
        ("{not: {Modality: MR}}", mr(), False),
        ("{not: {Modality: MR, StudyDescription: {matches: Y}}}", mr(), True),  # not (A and B)
        ("{Modality: CT, any: [{Modality: MR}]}", mr(), False),  # plain keys beside a group: ANDed
        ("{Modality: MR, any: [{PatientID: P2}, {PatientID: P1}], not: {StudyDate: '1999'}}", mr(), True),
        ("{any: [{not: {Modality: MR}}, {all: [{PatientID: P1}, {StudyDate: '20240131'}]}]}", mr(), True),
    ],
)
def test_conditions_on_one_series(make_rules: MakeRules, when: str, headers: dict[str, str], expected: bool) -> None:
    """Operators over one series' header values."""
    rules = make_rules(rule("r", when, route="{server: m, project: P, subject: S, session: T}"))
    assert isinstance(decide(rules, study(series("1", headers))), Routed) is expected


def test_header_conditions_over_several_series(make_rules: MakeRules) -> None:
    """A condition holds if it holds in some series (each condition on its own); missing only if in none."""
    route = "{server: m, project: P, subject: S, session: T}"
    both = make_rules(rule("r", "{Modality: MR, SeriesDescription: {matches: T1}}", route=route))
    mixed = study(
        series("1", {"Modality": "MR", "SeriesDescription": "dwi"}),
        series("2", {"Modality": "SR", "SeriesDescription": "T1 report"}),
    )
    assert isinstance(decide(both, mixed), Routed)
    missing = make_rules(rule("r", "{StudyComments: {missing: true}}", route=route))
    assert isinstance(decide(missing, study(series("1", {}), series("2", {}))), Routed)
    assert isinstance(decide(missing, study(series("1", {}), series("2", {"StudyComments": "c"}))), Held)


@pytest.mark.parametrize(
    ("when", "source", "expected"),
    [
        ("{calling_aet: SCANNER1}", {"calling_aet": "SCANNER1"}, True),
        ("{calling_aet: SCANNER1}", {"calling_aet": "SCANNER2"}, False),
        ("{calling_aet: {missing: true}}", {"drop_folder": "/srv/drop"}, True),
        ("{called_aet: {in: [INGESTD, XNAT]}}", {"called_aet": "XNAT"}, True),
        ("{drop_folder: /srv/drop/legacy}", {"drop_folder": "/srv/drop/legacy"}, True),
        ("{drop_folder: legacy}", {"drop_folder": "/srv/drop/legacy/"}, True),  # or its name
        ("{drop_folder: legacy}", {"drop_folder": "/srv/legacy/drop"}, False),
        ("{drop_folder: {present: true}}", {"calling_aet": "S"}, False),
        ("{path: {glob: '*/*/*.dcm'}}", {"paths": ("s1/v1/a.dcm",)}, True),
        ("{path: {glob: '*.dcm'}}", {"paths": ("s1/a.dcm",)}, False),  # * stays in one folder
        ("{path: {glob: '**/*.dcm'}}", {"paths": ("a.dcm",)}, True),  # ** is zero or more folders
        ("{path: {glob: '**/*.dcm'}}", {"paths": ("s1/v1/x/a.dcm",)}, True),
        ("{path: {glob: 'incoming/**'}}", {"paths": ("incoming/s/a.dcm",)}, True),
        ("{path: {glob: 'incoming/**'}}", {"paths": ("other/s/a.dcm",)}, False),
        ("{path: {glob: 'sub-[0-9]?/**'}}", {"paths": ("sub-07/a", "x/b")}, True),  # any dropped file
        ("{path: {glob: 'sub-[!0-9]*/**'}}", {"paths": ("sub-07/a",)}, False),
        ("{path: {glob: 'a.b/*'}}", {"paths": ("aXb/c",)}, False),  # '.' is literal
        ("{path: {matches: '^s1/'}}", {"paths": ("s1/a",)}, True),
        ("{path: {missing: true}}", {"calling_aet": "S"}, True),
    ],
)
def test_source_conditions(make_rules: MakeRules, when: str, source: dict[str, object], expected: bool) -> None:
    """calling_aet, called_aet, drop_folder (path or name) and path (glob) describe where the study came from."""
    rules = make_rules(rule("r", when, route="{server: m, project: P, subject: S, session: T}"))
    assert isinstance(decide(rules, study(series("1", {}), **source)), Routed) is expected


def test_drop_series(make_rules: MakeRules) -> None:
    """A series is dropped when every condition of one entry holds for it; reasons name the entry, not values."""
    extra = (
        "    drop_series:\n"
        "      - {SeriesDescription: {matches: '(?i)localizer|scout'}}\n"
        "      - {Modality: {in: [SR, KO, PR]}}\n"
        "      - {sop_class: {in: [SecondaryCaptureImageStorage]}}\n"
        "      - {Modality: CT, SliceThickness: {ge: 5}}\n"
        "      - {calling_aet: OLDPACS, SeriesNumber: '999'}\n"
    )
    rules = make_rules(rule("r", "{}", extra=extra))
    facts = study(
        series("1", mr(SeriesDescription="t1_mprage")),
        series("2", mr(SeriesDescription="AAHead_Scout"), count=3),
        series("3", mr(Modality="SR"), count=1),
        series("4", mr(), sop=SC, count=2),
        series("5", mr(Modality="CT", SliceThickness="5")),
        series("6", mr(Modality="CT", SliceThickness="1")),
        series("7", mr(SeriesNumber="999")),  # the study came by C-STORE from another AE
        calling_aet="SCANNER1",
    )
    decision = routed(decide(rules, facts))
    assert decision.kept_series == ("1", "6", "7")
    assert decision.dropped_series == (
        ("2", 3, "rule 'r' drop_series.0 (SeriesDescription)"),
        ("3", 1, "rule 'r' drop_series.1 (Modality)"),
        ("4", 2, "rule 'r' drop_series.2 (sop_class)"),
        ("5", 10, "rule 'r' drop_series.3 (Modality, SliceThickness)"),
    )
    everything = study(series("2", mr(SeriesDescription="scout"), count=3), series("3", mr(Modality="KO")))
    assert held(decide(rules, everything)) == Held(
        reason="rule 'r' drops every series of this study (2 series)", code=HoldCode.ALL_SERIES_DROPPED, rule="r"
    )


def test_labels(make_rules: MakeRules) -> None:
    """Templates render from the kept series and the source; hashes use the route's key."""
    route = (
        "{server: main, project: '{path[0]}', subject: '{PatientID:hash8}', "
        "session: '{project}_{subject}_{path[1]:upper}_{StudyDate[0:4]}', archive: true}"
    )
    rules = make_rules(rule("r", "{}", route=route))
    facts = study(series("1", mr()), series("2", mr()), paths=("Proj-A/visit 1/s1/a.dcm", "Proj-A/visit 1/s2/b.dcm"))
    decision = routed(decide(rules, facts))
    subject = label_hash(KEY.encode(), "P1", 8)
    assert decision == Routed(
        rule="r",
        server="main",
        project="Proj-A",
        subject=subject,
        session=f"Proj-A_{subject}_VISIT_1_2024",
        archive=True,
        profile=None,
        kept_series=("1", "2"),
        dropped_series=(),
    )


@pytest.mark.parametrize(
    ("route", "facts", "reason"),
    [
        (
            "{server: m, project: P, subject: '{PatientID}', session: T}",
            study(series("1", mr(PatientID=PLANTED)), series("2", mr(PatientID=PLANTED + "X"))),
            "rule 'r': route.subject \"{PatientID}\": PatientID differs between series",
        ),
        (
            "{server: m, project: P, subject: '{PatientName}', session: T}",
            study(series("1", mr()), series("2", mr(PatientName=PLANTED))),
            "rule 'r': route.subject \"{PatientName}\": PatientName is missing or empty in 1 of 2 series",
        ),
        (
            "{server: m, project: P, subject: S, session: '{subject}_{AccessionNumber}'}",
            study(series("1", mr())),
            "rule 'r': route.session \"{subject}_{AccessionNumber}\": AccessionNumber is missing or empty",
        ),
        (
            "{server: m, project: P, subject: '{PatientName}', session: T}",
            study(series("1", mr(PatientName="^^ ^"))),
            "rule 'r': route.subject \"{PatientName}\": the label is empty or has no letter or digit once characters "
            "XNAT does not allow are replaced by '_'",
        ),
        (
            "{server: m, project: P, subject: '{path[0]}', session: T}",
            study(series("1", mr()), calling_aet="S"),
            "rule 'r': route.subject \"{path[0]}\": path[0] is not known: the study did not come from a drop folder",
        ),
        (
            "{server: m, project: P, subject: '{path[1]}', session: T}",
            study(series("1", mr()), paths=(f"{PLANTED}/a.dcm",)),
            "rule 'r': route.subject \"{path[1]}\": path[1] is missing: a dropped file lies fewer than 2 folders deep",
        ),
        (
            "{server: m, project: P, subject: '{path[0]}', session: T}",
            study(series("1", mr()), paths=(f"{PLANTED}/a.dcm", "other/b.dcm")),
            "rule 'r': route.subject \"{path[0]}\": path[0] differs between the dropped files",
        ),
        (
            "{server: m, project: P, subject: 'S_{calling_aet}', session: T}",
            study(series("1", mr()), drop_folder="/srv/drop", paths=("a",)),
            "rule 'r': route.subject \"S_{calling_aet}\": calling_aet is not known: "
            "the study did not arrive by C-STORE",
        ),
        (
            "{server: m, project: P, subject: '{PatientID[20:30]}', session: T}",
            study(series("1", mr(PatientID=PLANTED))),
            "rule 'r': route.subject \"{PatientID[20:30]}\": PatientID[20:30] is empty",
        ),
    ],
)
def test_label_holds_name_template_and_keyword_never_value(
    make_rules: MakeRules, route: str, facts: StudyFacts, reason: str
) -> None:
    """A label that cannot be made holds the study; the reason names the template and field, not the value."""
    rules = make_rules(rule("r", "{}", route=route))
    decision = held(decide(rules, facts))
    assert decision == Held(reason=reason, code=HoldCode.LABEL, rule="r")
    assert PLANTED not in decision.reason


def test_labels_use_kept_series_only(make_rules: MakeRules) -> None:
    """A dropped series with another PatientID (a screenshot from elsewhere) does not hold the study."""
    rules = make_rules(rule("r", "{}", extra="    drop_series:\n      - {Modality: OT}\n"))
    facts = study(series("1", mr()), series("2", mr(Modality="OT", PatientID="OTHER")))
    decision = routed(decide(rules, facts))
    assert decision.subject == label_hash(KEY.encode(), "P1", 8)
    assert decision.session == f"{decision.subject}_S"


def test_label_sources_and_formats(make_rules: MakeRules) -> None:
    """path components, calling_aet, drop_folder's name, formats and slices, sanitized."""
    route = (
        "{server: main, project: '{path[0]}', subject: '{path[1]:lower}_{PatientName[0:3]}', "
        "session: '{project}_{subject}_{StudyDate[2:]}_{drop_folder}'}"
    )
    rules = make_rules(rule("r", "{}", route=route))
    facts = study(
        series("1", mr(PatientName="Doe^Jane")),
        drop_folder="/srv/drop/Legacy Data",
        paths=("PROJ-1/Sub 01/ses/a.dcm", "PROJ-1/Sub 01/ses/b.dcm"),
    )
    decision = routed(decide(rules, facts))
    assert (decision.project, decision.subject) == ("PROJ-1", "sub_01_Doe")
    assert decision.session == "PROJ-1_sub_01_Doe_240131_Legacy_Data"
    by_aet = make_rules(rule("r", "{}", route="{server: m, project: P, subject: '{calling_aet}', session: T}"))
    assert routed(decide(by_aet, study(series("1", mr()), calling_aet="PET CT"))).subject == "PET_CT"


def test_forced_rule(make_rules: MakeRules) -> None:
    """decide(rule=NAME) applies that rule as if its `when` held."""
    rules = make_rules(rule("mr", "{Modality: MR}") + rule("pt", "{Modality: PT}"))
    assert routed(decide(rules, study(series("1", mr())), rule="pt")).rule == "pt"
    assert held(decide(rules, study(series("1", mr())), rule="nope")).reason == "no rule named 'nope'"


def test_explain_match(make_rules: MakeRules) -> None:
    """Each rule tried, each condition with the values seen, the series kept or dropped, and the decision."""
    rules = make_rules(
        rule("pet", "{Modality: PT, calling_aet: PETCT1}")
        + rule("mr", "{Modality: MR}", extra="    drop_series:\n      - {SeriesDescription: {matches: scout}}\n")
    )
    facts = study(
        series("1", mr(SeriesDescription="t1")),
        series("2", mr(SeriesDescription="scout"), count=2),
        calling_aet="SCANNER1",
    )
    lines = explain_match(rules, facts)
    text = "\n".join(lines)
    assert "rule 'pet' (" in text
    assert "when.Modality equals 'PT': fails (seen: 'MR' (2 series))" in text
    assert "when.calling_aet equals 'PETCT1': fails (seen: SCANNER1)" in text
    assert "rule 'mr' (" in text and ": matches" in text
    assert "series 1 (10 instances): kept" in text
    assert "series 2 (2 instances): dropped by drop_series.0 (SeriesDescription matches 'scout')" in text
    assert re.search(r"route: server main, project P, subject [0-9a-f]{8}, session [0-9a-f]{8}_S", text)
    assert lines[-1] == "decision: routed by rule 'mr' (1 series kept, 1 dropped)"
    unrouted = explain_match(rules, study(series("1", mr(Modality="CT"))))
    assert unrouted[-1] == "decision: held (unrouted): no rule matches this study (2 rules tried)"
    bad = make_rules(rule("r", "{}", route="{server: m, project: P, subject: '{PatientName}', session: T}"))
    assert explain_match(bad, study(series("1", mr())))[-1].startswith(
        "decision: held (label): rule 'r': route.subject"
    )


def test_any_for_two_scanners(make_rules: MakeRules) -> None:
    """`any` routes the studies of either scanner by one rule; the first matching rule still decides."""
    rules = make_rules(
        rule("mr", "{Modality: MR, any: [{calling_aet: PRISMA1}, {calling_aet: SKYRA2, StationName: SKYRA}]}")
        + rule("all", "{}")
    )
    assert routed(decide(rules, study(series("1", mr()), calling_aet="PRISMA1"))).rule == "mr"
    assert routed(decide(rules, study(series("1", mr(StationName="SKYRA")), calling_aet="SKYRA2"))).rule == "mr"
    assert routed(decide(rules, study(series("1", mr(StationName="OTHER")), calling_aet="SKYRA2"))).rule == "all"
    assert routed(decide(rules, study(series("1", mr()), drop_folder="/srv/drop/PRISMA1"))).rule == "all"


def test_not_over_several_series(make_rules: MakeRules) -> None:
    """`not: {Modality: SR}` holds when no series is an SR (a condition holds when one series satisfies it)."""
    rules = make_rules(rule("no-sr", "{not: {Modality: SR}}", route="{server: m, project: P, subject: S, session: T}"))
    assert isinstance(decide(rules, study(series("1", mr()), series("2", mr()))), Routed)
    assert isinstance(decide(rules, study(series("1", mr()), series("2", mr(Modality="SR")))), Held)


def test_explain_groups(make_rules: MakeRules) -> None:
    """`explain` shows each branch with its outcome and the values seen, and which branch matched or that none did."""
    rules = make_rules(
        rule(
            "scanners",
            "{Modality: MR, any: [{calling_aet: PRISMA1}, {calling_aet: SKYRA2, StudyDescription: {matches: ^RES}}],"
            " not: {SeriesDescription: {matches: phantom}}}",
        )
    )
    lines = explain_match(
        rules, study(series("1", mr(StudyDescription="RESEARCH", SeriesDescription="t1")), calling_aet="SKYRA2")
    )
    assert lines[1:9] == [
        f"rule 'scanners' ({rules.rules[0].origin}): matches",
        "  when.Modality equals 'MR': holds (seen: 'MR')",
        "  when.any: holds (branch 1 of 2 matches)",
        "    when.any.0.calling_aet equals 'PRISMA1': fails (seen: SKYRA2)",
        "    when.any.1.calling_aet equals 'SKYRA2': holds (seen: SKYRA2)",
        "    when.any.1.StudyDescription matches '^RES': holds (seen: 'RESEARCH')",
        "  when.not: holds (what it negates does not hold)",
        "    when.not.SeriesDescription matches 'phantom': fails (seen: 't1')",
    ]
    none = explain_match(rules, study(series("1", mr(SeriesDescription="phantom")), calling_aet="OTHER"))
    assert "  when.any: fails (none of its 2 branches matches)" in none
    assert "  when.not: fails (what it negates holds)" in none
    assert none[-1] == "decision: held (unrouted): no rule matches this study (1 rule tried)"
    single = make_rules(rule("r", "{all: [{Modality: CT}], any: [{Modality: CT}]}"))
    text = explain_match(single, study(series("1", mr())))
    assert "  when.all: fails (branch 0 of 1 does not match)" in text
    assert "  when.any: fails (its only branch does not match)" in text


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    values=st.lists(st.text(min_size=0, max_size=20), min_size=1, max_size=4),
    template=st.sampled_from(
        ["{PatientID}", "{PatientID:hash8}", "x{PatientName[1:3]}", "{PatientID:upper}_{PatientName}"]
    ),
)
def test_decisions_are_valid_labels_or_value_free_holds(
    make_rules: MakeRules, values: list[str], template: str
) -> None:
    """Whatever the header values, a routed study has valid labels and a held one a reason without any value."""
    route = f"{{server: m, project: P, subject: '{template}', session: '{{subject}}_{{PatientID:hash6}}'}}"
    rules = make_rules(rule("r", "{}", route=route))
    facts = study(
        *(series(str(i), {"PatientID": PLANTED + v, "PatientName": PLANTED + v}) for i, v in enumerate(values))
    )
    decision = decide(rules, facts)
    if isinstance(decision, Routed):
        for label in (decision.project, decision.subject, decision.session):
            assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", label)
        assert decide(rules, facts) == decision
    else:
        assert PLANTED not in decision.reason


def _env_keys(path: Path) -> set[str]:
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if set(node) == {"env"}:
                names.add(str(node["env"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load(path.read_text()))
    return names


# Each example rules file, with studies and the rule (or hold code) each one must get.
EXAMPLES: dict[str, list[tuple[StudyFacts, str]]] = {
    "example.rules.yaml": [
        (
            study(
                series("1", mr(SeriesDescription="t1_mprage")),
                series("2", mr(SeriesDescription="localizer")),
                calling_aet="SCANNER1",
            ),
            "mr-research",
        ),
        (study(series("1", mr(PatientName="QA^Phantom", StationName="MR3T", StudyTime="101500.123"))), "qa-phantom"),
        (
            study(
                series("1", {"Modality": "PT", "PatientID": "P2", "StudyDate": "20240101"}),
                series("2", {"Modality": "CT", "PatientID": "P2", "StudyDate": "20240101", "SliceThickness": "5"}),
                calling_aet="PETCT1",
            ),
            "pet",
        ),
        (
            study(
                series("1", {"Modality": "PT", "PatientID": "P2", "StudyDate": "20240101", "StationName": "PETCT1"}),
                calling_aet="PACS",
            ),
            "pet",
        ),
        (study(series("1", {"Modality": "PT", "StationName": "PETCT1"}), calling_aet="OTHER"), "unrouted"),
        (study(series("1", mr()), drop_folder="/srv/drop/legacy", paths=("S01/V1/T1/a.dcm",)), "legacy-import"),
        (study(series("1", mr(Modality="CT")), calling_aet="SCANNER1"), "unrouted"),
    ],
    "minimal.rules.yaml": [
        (
            study(series("1", mr(StudyInstanceUID="1.2.3")), series("2", mr(Modality="SR", StudyInstanceUID="1.2.3"))),
            "everything",
        ),
        (study(series("1", mr(Modality="KO"))), "all-series-dropped"),
    ],
}


@pytest.mark.parametrize("path", sorted(RULES_DIR.glob("*.rules.yaml")), ids=lambda p: p.name)
def test_example_rules_files(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shipped rules file loads (with its keys in the environment), and each of its rules routes a study."""
    for name in _env_keys(path):
        monkeypatch.setenv(name, KEY)
    rules = load_rules([path])
    assert path.name in EXAMPLES, f"add studies for {path.name} to EXAMPLES"
    outcomes = set()
    for facts, expected in EXAMPLES[path.name]:
        decision = decide(rules, facts)
        outcome = decision.rule if isinstance(decision, Routed) else decision.code
        assert outcome == expected, (decision, explain_match(rules, facts))
        outcomes.add(outcome)
    assert {rule.name for rule in rules.rules} <= outcomes, "every rule of an example routes one of its studies"
