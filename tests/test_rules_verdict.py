"""The verdict on a study: the rules' route, then the profile's screening, then the labels a run's studies share."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingestd.rules import Held, Routed, RuleSet, SeriesFacts, StudyFacts, load_rules
from ingestd.rules.verdict import Screened, label_clashes, verdict

MR = "1.2.840.10008.5.1.4.1.1.4"
SR = "1.2.840.10008.5.1.4.1.1.88.11"
US = "1.2.840.10008.5.1.4.1.1.6.1"

RULES = """
profiles:
  research: {key: {env: KEY_A}}
rules:
  - name: plain
    when: {StudyDescription: PLAIN}
    route: {server: main, project: P, subject: S, session: '{StudyDescription}_s', archive: %s}
  - name: research
    when: {}
    route: {server: main, project: P, subject: S, session: X}
    anonymize: research
    drop_series: [{Modality: KO}]
"""


@pytest.fixture
def rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RuleSet:
    monkeypatch.setenv("KEY_A", "0123456789abcdef" * 4)
    path = tmp_path / "t.rules.yaml"
    path.write_text(RULES % "true")
    return load_rules([path])


def facts(*series: tuple[str, str, str], description: str = "R", burned_in: str = "") -> StudyFacts:
    """A study of one instance per (series UID, SOP class, modality)."""
    return StudyFacts(
        study_uid="1.2.3",
        series=tuple(
            SeriesFacts(
                series_uid=uid,
                instance_count=1,
                headers={"Modality": modality, "StudyDescription": description}
                | ({"BurnedInAnnotation": burned_in} if burned_in else {}),
                sop_class_uid=sop,
            )
            for uid, sop, modality in series
        ),
    )


def screened(study: StudyFacts) -> list[Screened]:
    return [Screened(s.series_uid, s.sop_class_uid, str(s.headers["Modality"])) for s in study.series]


def test_a_profile_screens_every_kept_instance(rules: RuleSet) -> None:
    study = facts(("1", MR, "MR"), ("2", SR, "SR"))
    decision = verdict(rules, study, screened(study))
    assert isinstance(decision, Held)
    assert (decision.code, decision.rule) == ("structured-content", "research")
    ultrasound = facts(("1", US, "US"))
    assert isinstance(held := verdict(rules, ultrasound, screened(ultrasound)), Held) and held.code == "burned-in"


def test_burned_in_annotation_from_the_series_header(rules: RuleSet) -> None:
    study = facts(("1", MR, "MR"), burned_in="YES")
    decision = verdict(rules, study, screened(study))
    assert isinstance(decision, Held) and decision.code == "burned-in"


def test_dropped_series_and_routes_without_a_profile_are_not_screened(rules: RuleSet) -> None:
    study = facts(("1", MR, "MR"), ("2", SR, "KO"))  # KO is dropped by the rule
    assert isinstance(verdict(rules, study, screened(study)), Routed)
    plain = facts(("1", SR, "SR"), description="PLAIN")  # no profile: nothing to screen for
    assert isinstance(verdict(rules, plain, screened(plain)), Routed)


def test_rule_holds_come_first(rules: RuleSet) -> None:
    empty = StudyFacts(study_uid="1.2.3", series=())
    assert isinstance(held := verdict(rules, empty, []), Held) and held.code == "empty"


def test_a_session_label_an_earlier_study_of_the_run_archives_under_holds_the_later(
    rules: RuleSet, tmp_path: Path
) -> None:
    first = verdict(rules, facts(("1", MR, "MR"), description="PLAIN"), [])
    second = verdict(rules, facts(("2", MR, "MR"), description="PLAIN"), [])
    other = verdict(rules, facts(("3", MR, "MR"), description="OTHER"), [])
    clashes = label_clashes([("a", first), ("b", second), ("a", first), ("c", other)])
    assert set(clashes) == {"b"}
    assert clashes["b"].code == "label-taken" and "P/S/PLAIN_s for another study" in clashes["b"].reason

    # Left in the prearchive, nothing is archived under the label: the pre-flight has nothing to find.
    path = tmp_path / "t.rules.yaml"
    path.write_text(RULES % "false")
    prearchive = load_rules([path])
    first = verdict(prearchive, facts(("1", MR, "MR"), description="PLAIN"), [])
    second = verdict(prearchive, facts(("2", MR, "MR"), description="PLAIN"), [])
    assert label_clashes([("a", first), ("b", second)]) == {}
