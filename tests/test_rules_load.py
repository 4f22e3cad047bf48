"""Loading rules files: every problem at once with file, line and key; keys, lookup tables and compiled profiles."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from ingestd.cli import main
from ingestd.errors import ConfigError
from ingestd.rules import RuleSet, load_rules
from ingestd.rules.sources import read_table
from ingestd.rules.when import MAX_DEPTH

KEY = "0123456789abcdef" * 4
PROFILE = """\
profiles:
  research:
    key: {env: KEY_A}
"""
RULE = """\
rules:
  - name: all
    when: {}
    route: {server: main, project: PROJA, subject: "{PatientID:hash8}", session: "{subject}_{StudyDate:hash6}"}
    anonymize: research
"""


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_A", KEY)
    monkeypatch.setenv("KEY_B", KEY[::-1])


def _write(directory: Path, text: str, name: str = "r.rules.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def _problems(*paths: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_rules(list(paths))
    return caught.value.problems


def _load(directory: Path, text: str) -> RuleSet:
    return load_rules([_write(directory, text)])


def test_minimal_file_compiles(tmp_path: Path) -> None:
    """A profile and a catch-all rule; defaults are filled in and the version is the files' sha256 prefix."""
    path = _write(tmp_path, PROFILE + RULE)
    rules = load_rules([path])
    assert [rule.name for rule in rules.rules] == ["all"]
    assert rules.rules[0].line == 5
    assert rules.rules[0].when.is_empty
    assert rules.rules[0].route.archive is False
    assert rules.version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    profile = rules.profiles["research"]
    assert profile.key == KEY.encode()
    assert profile.date_shift_days == (30, 730)
    assert profile.burned_in == "hold"
    assert profile.options == frozenset()
    assert profile.source == f"r.rules.yaml@{rules.version}"
    assert rules.rules[0].label_key == KEY.encode()
    assert rules.sources == (path,)


def test_every_problem_reported_at_once_with_lines(tmp_path: Path) -> None:
    """Misspelt keywords, bad regexes, templates, options and references all come back together, in line order."""
    text = (
        "profiles:\n"  # 1
        "  research:\n"  # 2
        "    options: [retain-uid, clean-descriptors]\n"  # 3
        "    key: {env: KEY_A}\n"  # 4
        "    dates: {min_days: 40, max_days: 30}\n"  # 5
        "    attributes:\n"  # 6
        "      - {tag: SeriesDescription, action: keep}\n"  # 7
        "rules:\n"  # 8
        "  - name: mr-research\n"  # 9
        "    when:\n"  # 10
        "      Modalty: {in: [MR, PT]}\n"  # 11
        "      StudyDescription: {matches: '^RES('}\n"  # 12
        "    route:\n"  # 13
        "      server: main\n"  # 14
        "      project: PROJ A\n"  # 15
        "      subject: '{PatientId:hash8}'\n"  # 16
        "      session: '{subject}_{StudyDate'\n"  # 17
        "      achive: true\n"  # 18
        "    anonymize: reserch\n"  # 19
    )
    path = _write(tmp_path, text, "rules.yaml")
    problems = _problems(path)
    assert problems == [
        f"{path}:3: profiles.research.options: unknown option 'retain-uid' (did you mean 'retain-uids'?)",
        f"{path}:5: profiles.research.dates: min_days must not be greater than max_days",
        f"{path}:7: profiles.research.attributes.0: action: keep needs justification "
        "(say why keeping this element is safe)",
        f"{path}:11: rules.0.when.Modalty: unknown DICOM keyword 'Modalty' (did you mean 'Modality'?)",
        f"{path}:12: rules.0.when.StudyDescription.matches: not a valid regular expression: missing ): ^RES(",
        f"{path}:15: rules.0.route.project: an XNAT project ID is 1 to 64 letters, digits, '_' or '-'",
        f"{path}:16: rules.0.route.subject: {{PatientId:hash8}}: unknown DICOM keyword 'PatientId' "
        "(did you mean 'PatientID'?)",
        f"{path}:17: rules.0.route.session: unmatched '{{' at character 11 (write '{{{{' for a literal brace)",
        f"{path}:18: rules.0.route.achive: unknown key",
        f"{path}:19: rules.0.anonymize: no profile named 'reserch' (did you mean 'research'?)",
    ]


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        (
            "when: {calling_ae: X}",
            "rules.0.when.calling_ae: unknown DICOM keyword 'calling_ae' (did you mean 'calling_aet'?)",
        ),
        ("when: {Modality: {equal: MR}}", "rules.0.when.Modality: unknown operator 'equal' (did you mean 'equals'?)"),
        ("when: {Modality: [MR, PT]}", "rules.0.when.Modality: a list needs an operator: write {in: [...]}"),
        ("when: {Modality: }", "rules.0.when.Modality: no condition given"),
        ("when: {Modality: {}}", "rules.0.when.Modality: no operator given"),
        ("when: {Modality: {in: []}}", "rules.0.when.Modality.in: in: needs at least one value"),
        ("when: {Modality: {in: MR}}", "rules.0.when.Modality.in: in: needs a list of values"),
        ("when: {Modality: {present: false}}", "rules.0.when.Modality.present: only true is allowed"),
        ("when: {Modality: {missing: true, equals: MR}}", "missing: true cannot be combined"),
        ("when: {Modality: {glob: 'M*'}}", "rules.0.when.Modality: glob applies to path only"),
        ("when: {path: {glob: 'a**/b'}}", "rules.0.when.path.glob: '**' must be a whole path component"),
        ("when: {path: {glob: '/abs/*'}}", "remove the leading '/'"),
        ("when: {ReferencedImageSequence: {present: true}}", "ReferencedImageSequence has VR SQ: rules see only"),
        (
            "when: {Modality: NO}",
            "rules.0.when.Modality.equals: YAML reads this as true/false: put the value in quotes",
        ),
        ("when: {StudyDate: 2024-01-01}", "rules.0.when.StudyDate.equals: expected a text value: put it in quotes"),
        ("when: {SliceThickness: {ge: thick}}", "rules.0.when.SliceThickness.ge: Input should be a valid number"),
        ("when: {sop_class: {in: [SecondaryCapture]}}", "(did you mean 'SecondaryCaptureImageStorage'?)"),
        ("when:", "rules.0.when: no conditions: write when: {} to match every study (deliberately)"),
        ("when: {}\n    drop_series: [{}]", "rules.0.drop_series: drop_series.0 has no condition"),
        ("when: {}\n    drop_series: [{Modalty: SR}]", "rules.0.drop_series.0.Modalty: unknown DICOM keyword"),
        ("when: {}\n    anonymize: research\n    extra: 1", "rules.0.extra: unknown key"),
        ("when: {}\n    anonymize: nothere", "rules.0.anonymize: no profile named 'nothere'"),
        ("when: {any: []}", "rules.0.when.any: any needs at least one mapping: any: [{...}, {...}] holds when"),
        ("when: {all: []}", "rules.0.when.all: all needs at least one mapping"),
        ("when: {any: {Modality: MR}}", "rules.0.when.any: any is a list of mappings: any: [{...}, {...}]"),
        ("when: {any: [{Modality: MR}, {}]}", "rules.0.when.any.1: a branch of any, all or not is empty"),
        ("when: {any: [MR, CT]}", "rules.0.when.any.0: a branch of any, all or not is a mapping of conditions"),
        ("when: {not: {}}", "rules.0.when.not: a branch of any, all or not is empty"),
        ("when: {not: [{Modality: SR}]}", "rules.0.when.not: not takes one mapping, e.g. not: {Modality: SR}"),
        ("when: {any: [{Modalty: MR}]}", "rules.0.when.any.0.Modalty: unknown DICOM keyword 'Modalty' (did you"),
        ("when: {not: {all: [{Modality: {equal: MR}}]}}", "rules.0.when.not.all.0.Modality: unknown operator"),
        ("when: {Any: [{Modality: MR}]}", "rules.0.when.Any: unknown key 'Any' (did you mean 'any'?): any: [{...}"),
        ("when: {or: [{Modality: MR}]}", "rules.0.when.or: unknown key 'or' (did you mean 'any'?)"),
        ("when: {and: [{Modality: MR}]}", "rules.0.when.and: unknown key 'and' (did you mean 'all'?)"),
        ("when: {none_of: {Modality: MR}}", "rules.0.when.none_of: unknown key 'none_of' (did you mean 'not'?)"),
        ("when: {any_: [{Modality: MR}]}", "rules.0.when.any_: unknown key 'any_' (did you mean 'any'?)"),
        ("when: {}\n    drop_series: [{any: [{Modality: SR}]}]", "rules.0.drop_series.0.any: unknown key 'any': any,"),
    ],
)
def test_condition_errors(tmp_path: Path, snippet: str, expected: str) -> None:
    """Each malformed condition is reported under its own key."""
    text = (
        PROFILE
        + "rules:\n  - name: r\n    route: {server: main, project: P, subject: S, session: T}\n    "
        + snippet
        + "\n"
    )
    problems = _problems(_write(tmp_path, text))
    assert any(expected in problem for problem in problems), problems


def test_groups_load_with_lines(tmp_path: Path) -> None:
    """`any`, `all` and `not` nest, beside plain keys; each problem is reported at its own line and key."""
    text = (
        PROFILE + "rules:\n"
        "  - name: r\n"  # 5
        "    route: {server: main, project: P, subject: S, session: T}\n"
        "    when:\n"
        "      Modality: MR\n"
        "      any:\n"
        "        - {calling_aet: MR1}\n"  # 10
        "        - calling_aet: MR2\n"
        "          StudyDescription: {matches: '^RES('}\n"
        "      not:\n"
        "        all:\n"
        "          - {SeriesDescription: {matches: phantom}}\n"  # 15
        "          - {StationNme: QA}\n"
    )
    path = _write(tmp_path, text)
    assert _problems(path) == [
        f"{path}:12: rules.0.when.any.1.StudyDescription.matches: not a valid regular expression: missing ): ^RES(",
        f"{path}:16: rules.0.when.not.all.1.StationNme: unknown DICOM keyword 'StationNme' (did you mean "
        "'StationName'?)",
    ]
    fixed = text.replace("'^RES('", "'^RES'").replace("StationNme", "StationName")
    when = _load(tmp_path, fixed).rules[0].when
    assert [condition.field for condition in when.conditions] == ["Modality"]
    assert when.any_of is not None and [len(part.conditions) for part in when.any_of] == [1, 2]
    assert when.none_of is not None and when.none_of.all_of is not None and len(when.none_of.all_of) == 2
    assert when.all_of is None and when.depth == 2


def test_group_nesting_is_limited(tmp_path: Path) -> None:
    """Groups nest at most MAX_DEPTH levels: deeper is refused at the rule's `when`, saying what to do instead."""
    when = "{Modality: MR}"
    for _level in range(MAX_DEPTH):
        when = f"{{not: {when}}}"
    ok = (
        PROFILE
        + f"rules:\n  - name: r\n    route: {{server: m, project: P, subject: S, session: T}}\n    when: {when}\n"
    )
    assert _load(tmp_path, ok).rules[0].when.depth == MAX_DEPTH
    deeper = ok.replace(f"when: {when}", f"when: {{any: [{when}]}}")
    path = _write(tmp_path, deeper)
    assert _problems(path) == [
        f"{path}:7: rules.0.when: any/all/not are nested {MAX_DEPTH + 1} levels deep, at most {MAX_DEPTH}: split the "
        "rule into several rules (the first that matches decides)"
    ]


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        ("{server: '', project: P, subject: S, session: T}", "rules.0.route.server: name the XNAT server"),
        ("{server: m, project: 'P/Q', subject: S, session: T}", "an XNAT project ID is 1 to 64"),
        ("{server: m, project: '" + "P" * 65 + "', subject: S, session: T}", "an XNAT project ID is 1 to 64"),
        ("{server: m, project: P, subject: '{subject}', session: T}", "{subject} cannot be used here"),
        (
            "{server: m, project: P, subject: S, session: '{PatientID:hash8}'}",
            "rules.0.route.session: :hashN needs a key",
        ),
        ("{server: m, project: P, subject: S}", "rules.0.route.session: required key is missing"),
        ("{server: m, project: P, subject: S, session: T, key: " + KEY + "}", "never the key itself"),
        ("{server: m, project: P, subject: S, session: T, key: {env: KEY_A, file: k}}", "exactly one of them"),
    ],
)
def test_route_errors(tmp_path: Path, route: str, expected: str) -> None:
    """Route problems, including a hash without any key to make it with."""
    text = f"rules:\n  - name: r\n    when: {{}}\n    route: {route}\n"
    problems = _problems(_write(tmp_path, text))
    assert any(expected in problem for problem in problems), problems
    assert all(KEY not in problem for problem in problems)


def test_route_key_serves_rules_without_profile(tmp_path: Path) -> None:
    """A rule without anonymize hashes labels with route.key; with anonymize, route.key is refused."""
    text = (
        "rules:\n  - name: r\n    when: {}\n"
        "    route: {server: m, project: P, subject: '{PatientID:hash8}', session: T, key: {env: KEY_B}}\n"
    )
    rules = _load(tmp_path, text)
    assert rules.rules[0].label_key == KEY[::-1].encode()
    both = PROFILE + text + "    anonymize: research\n"
    problems = _problems(_write(tmp_path, both))
    assert problems == [
        f"{tmp_path / 'r.rules.yaml'}:7: rules.0.route.key: labels of a rule with anonymize use the key of profile "
        "'research': remove route.key"
    ]


@pytest.mark.parametrize(
    ("key", "env", "expected"),
    [
        ("{env: NOT_SET_ANYWHERE}", None, "environment variable NOT_SET_ANYWHERE is not set"),
        ("{env: SHORT}", "x" * 31, "environment variable SHORT holds fewer than 32 characters"),
        ("{env: SHORT}", "  " + "x" * 31 + "\n", "environment variable SHORT holds fewer than 32 characters"),
        ("{env: 'BAD NAME'}", None, "'BAD NAME' is not an environment variable name"),
        ("{file: nothere.key}", None, "nothere.key does not exist (create one with: ingestd new-key"),
        ("{}", None, "a key is {env: VARIABLE} or {file: path}, exactly one of them"),
    ],
)
def test_key_problems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, env: str | None, expected: str
) -> None:
    """Missing, short and malformed keys are refused with what to do about it."""
    if env is not None:
        monkeypatch.setenv("SHORT", env)
    problems = _problems(_write(tmp_path, f"profiles:\n  p:\n    key: {key}\n"))
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'r.rules.yaml'}:3: profiles.p.key: ")
    assert expected in problems[0]


def test_key_file_permissions_and_length(tmp_path: Path) -> None:
    """A key file readable by others is refused with the chmod to fix it; relative to the rules file."""
    keys = tmp_path / "keys"
    keys.mkdir()
    key_file = keys / "research.key"
    key_file.write_text(f"\n  {KEY}  \n")
    key_file.chmod(0o640)
    path = _write(tmp_path, "profiles:\n  p:\n    key: {file: keys/research.key}\n")
    problems = _problems(path)
    assert problems == [
        f"{path}:3: profiles.p.key: key file {key_file} may be read or written by group or others: chmod 600 {key_file}"
    ]
    key_file.chmod(0o600)
    assert load_rules([path]).profiles["p"].key == KEY.encode()
    key_file.write_text("x" * 31 + "\n")
    assert "holds fewer than 32 characters" in _problems(path)[0]
    key_file.unlink()
    key_file.mkdir()
    assert "is not a regular file" in _problems(path)[0]


def test_key_material_never_shown(tmp_path: Path) -> None:
    """Neither a profile's nor a rule's repr, nor any message, contains the key."""
    rules = _load(tmp_path, PROFILE + RULE)
    assert KEY not in repr(rules)
    assert KEY not in repr(rules.profiles["research"])
    assert KEY not in repr(rules.rules[0])


def test_profile_compiles(tmp_path: Path) -> None:
    """Options, dates, overrides by tag number in every tag form, private elements and burned_in."""
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "subjects.csv").write_text("original,new\nMRN1,S001\n MRN2 , S002 \n\n")
    text = (
        "profiles:\n"
        "  research:\n"
        "    options: [retain-safe-private, retain-longitudinal-modified-dates, clean-descriptors]\n"
        "    key: {env: KEY_A}\n"
        "    dates: {min_days: 10, max_days: 20}\n"
        "    burned_in: trust-header\n"
        "    attributes:\n"
        "      - {tag: PatientName, action: replace, value: '{subject}'}\n"
        "      - {tag: '(0010,0020)', action: lookup, table: tables/subjects.csv}\n"
        "      - {tag: '0008,0050', action: pseudonym}\n"
        "      - {tag: '0008103E', action: keep, justification: 'scan types'}\n"
        "      - {tag: StudyComments, action: regex, pattern: '(?i)dr\\.? \\w+'}\n"
        "      - {tag: StudyDate, action: shift-date}\n"
        "      - {tag: StudyInstanceUID, action: uid}\n"
        "    private:\n"
        "      - {creator: SIEMENS MR HEADER, group: '0019', element: '0a', justification: number of slices}\n"
    )
    profile = _load(tmp_path, text).profiles["research"]
    assert profile.options == {"retain-safe-private", "retain-longitudinal-modified-dates", "clean-descriptors"}
    assert profile.date_shift_days == (10, 20)
    assert profile.burned_in == "trust-header"
    assert set(profile.overrides) == {
        0x00100010,
        0x00100020,
        0x00080050,
        0x0008103E,
        0x00324000,
        0x00080020,
        0x0020000D,
    }
    assert profile.overrides[0x00100010].value == "{subject}"
    lookup = profile.overrides[0x00100020]
    assert lookup.action == "lookup"
    assert dict(lookup.table or {}) == {"MRN1": "S001", "MRN2": "S002"}
    assert lookup.table_name == str(tmp_path / "tables" / "subjects.csv")
    assert profile.overrides[0x0008103E].justification == "scan types"
    regex = profile.overrides[0x00324000]
    assert regex.pattern is not None
    assert regex.pattern.sub(regex.replacement, "seen by Dr. Who") == "seen by "
    (private,) = profile.private_keep
    assert (private.creator, private.group, private.element) == ("SIEMENS MR HEADER", 0x0019, 0x0A)


@pytest.mark.parametrize(
    ("attribute", "expected"),
    [
        (
            "{tag: PatientNam, action: remove}",
            "attributes.0.tag: unknown DICOM keyword 'PatientNam' (did you mean 'PatientName'?)",
        ),
        ("{tag: 00100010, action: remove}", "attributes.0.tag: put the tag in quotes"),
        ("{tag: '(0019,100A)', action: remove}", "(0019,100A) is a private element: list it under private:"),
        ("{tag: PatientName, action: replace}", "attributes.0: action: replace needs value"),
        ("{tag: PatientName, action: replace, value: '{subjct}'}", "value: '{subjct}' is not allowed here"),
        ("{tag: PatientName, action: remove, value: x}", "attributes.0: value is not used by action: remove"),
        ("{tag: PatientName, action: keep, justification: '  '}", "justification is empty"),
        (
            "{tag: PatientName, action: shift-date}",
            "shift-date applies to dates (DA, DT); PatientName (0010,0010) is PN",
        ),
        ("{tag: PatientName, action: uid}", "uid applies to UIDs (UI)"),
        ("{tag: PatientName, action: regex, pattern: '('}", "attributes.0.pattern: not a valid regular expression"),
        ("{tag: PatientName, action: lookup, table: none.csv}", "lookup table "),
        ("{tag: PatientName, action: scramble}", "attributes.0.action: Input should be 'remove'"),
    ],
)
def test_attribute_errors(tmp_path: Path, attribute: str, expected: str) -> None:
    """Each malformed override is reported under its entry."""
    problems = _problems(
        _write(tmp_path, f"profiles:\n  p:\n    key: {{env: KEY_A}}\n    attributes:\n      - {attribute}\n")
    )
    assert any(expected in problem for problem in problems), problems


def test_profile_level_errors(tmp_path: Path) -> None:
    """A tag twice (in two spellings), both longitudinal options, private entries without the option."""
    text = (
        "profiles:\n"
        "  p:\n"
        "    options: [retain-longitudinal-full-dates, retain-longitudinal-modified-dates,\n"
        "              clean-graphics, clean-graphics]\n"
        "    key: {env: KEY_A}\n"
        "    attributes:\n"
        "      - {tag: PatientID, action: remove}\n"
        "      - {tag: '(0010,0020)', action: empty}\n"
        "    private:\n"
        "      - {creator: X, group: '0019', element: '0A', justification: why}\n"
        "      - {creator: X, group: '0020', element: '0A1', justification: ''}\n"
        "  q:\n"
        "    key: {env: KEY_A}\n"
        "    dates: {min_days: 0, max_days: 10}\n"
        "  bad name:\n"
        "    key: {env: KEY_A}\n"
    )
    path = _write(tmp_path, text)
    assert _problems(path) == [
        f"{path}:3: profiles.p.options: option 'clean-graphics' is listed twice; use at most one of "
        "retain-longitudinal-full-dates and retain-longitudinal-modified-dates",
        f"{path}:6: profiles.p.attributes: PatientID (0010,0020) is listed twice (entries 0 and 1); "
        "give one action per tag",
        f"{path}:11: profiles.p.private.1.group: a private group is odd and above 0007 (and not FFFF)",
        f"{path}:11: profiles.p.private.1.element: the element is its low byte within the creator's block, "
        '2 hex digits (e.g. "0A" for (0019,xx0A))',
        f"{path}:11: profiles.p.private.1.justification: justification is empty: say why keeping this element is safe",
        f"{path}:14: profiles.q.dates.min_days: Input should be greater than or equal to 1",
        f"{path}:15: profiles.bad name: a profile name is 1 to 64 letters, digits, '_', '.' or '-', starting with a "
        "letter or digit",
    ]
    text = (
        "profiles:\n  p:\n    key: {env: KEY_A}\n    private:\n"
        "      - {creator: X, group: '0019', element: '0A', justification: y}\n"
    )
    assert _problems(_write(tmp_path, text)) == [
        f"{path}:4: profiles.p.private: private elements are kept only with option retain-safe-private: add it, "
        "or remove them"
    ]
    text = "profiles:\n  p:\n    key: {env: KEY_A}\n    dates: {min_days: 1, max_days: 10}\n"
    assert "dates is used only with retain-longitudinal-modified-dates" in _problems(_write(tmp_path, text))[0]


def test_lookup_tables(tmp_path: Path) -> None:
    """A header row is required; duplicates and malformed rows are named by row, never by content."""
    table = tmp_path / "t.csv"
    table.write_text("\ufefforiginal,new\nSECRET1,S1\n\nSECRET1,S2\nA,B,C\n,S3\n")
    with pytest.raises(ValueError, match="lookup table") as caught:
        read_table(table)
    message = str(caught.value)
    assert "row 4: its original value is already on row 2" in message
    assert "row 5: expected 2 columns (original,new), found 3" in message
    assert "row 6: a cell is empty" in message
    assert "SECRET1" not in message
    table.write_text("SECRET1,S1\n")
    with pytest.raises(ValueError, match="row 1: the first row must be the header: original,new"):
        read_table(table)
    table.write_text("")
    with pytest.raises(ValueError, match="the table is empty"):
        read_table(table)
    table.write_text("Original , NEW\n")
    assert read_table(table) == {}
    table.write_bytes(b"original,new\n\xff,x\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_table(table)


def test_lookup_table_relative_to_rules_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative table and key paths are relative to the rules file, not to the working directory."""
    rules_dir = tmp_path / "etc"
    rules_dir.mkdir()
    (rules_dir / "subjects.csv").write_text("original,new\nA,B\n")
    key = rules_dir / "p.key"
    key.write_text(KEY)
    key.chmod(0o600)
    _write(
        rules_dir,
        "profiles:\n  p:\n    key: {file: p.key}\n    attributes:\n"
        "      - {tag: PatientID, action: lookup, table: subjects.csv}\n",
    )
    monkeypatch.chdir(tmp_path)
    rules = load_rules([Path("etc/r.rules.yaml")])
    assert dict(rules.profiles["p"].overrides[0x00100020].table or {}) == {"A": "B"}


def test_several_files(tmp_path: Path) -> None:
    """Rules are concatenated in order, profiles merged; a rule may use a profile from another file."""
    first = _write(tmp_path, PROFILE, "a.rules.yaml")
    second = _write(tmp_path, RULE.replace("name: all", "name: second"), "b.rules.yaml")
    third = _write(tmp_path, RULE.replace("name: all", "name: third"), "c.rules.yaml")
    rules = load_rules([first, second, third])
    assert [rule.name for rule in rules.rules] == ["second", "third"]
    assert rules.profile_sources == {"research": first}
    assert (
        rules.version == hashlib.sha256(first.read_bytes() + second.read_bytes() + third.read_bytes()).hexdigest()[:12]
    )
    assert rules.profiles["research"].source == f"a.rules.yaml@{rules.version}"


def test_duplicate_names_name_both_places(tmp_path: Path) -> None:
    """A profile or rule defined twice is an error that names both places; so is any YAML key given twice."""
    first = _write(tmp_path, PROFILE + RULE, "a.rules.yaml")
    second = _write(tmp_path, PROFILE + RULE, "b.rules.yaml")
    assert _problems(first, second) == [
        f"{second}:2: profiles.research: profile 'research' is also defined at {first}:2",
        f"{second}:5: rules.0.name: rule name 'all' is also used at {first}:5",
    ]
    twice = _write(tmp_path, PROFILE + "  research:\n    key: {env: KEY_B}\n" + RULE + RULE.replace("rules:\n", ""))
    assert _problems(twice) == [
        f"{twice}:4: profiles.research: 'research' is given twice in this mapping (first on line 2)",
        f"{twice}:11: rules.1.name: rule name 'all' is also used at {twice}:7",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules: [unclosed\n", ":2: not valid YAML"),
        ("- a\n", ":1: the rules file must be a mapping of keys to values"),
        ("rule: []\n", ":1: rule: unknown key"),
        ("profiles:\n  p: {key: !!python/object:os.system ls}\n", "not valid YAML"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, expected: str) -> None:
    """Broken YAML, a non-mapping, unknown top-level keys and unsafe tags fail with a located message."""
    problems = _problems(_write(tmp_path, text))
    assert any(expected in problem for problem in problems), problems


def test_unreadable_and_empty_files(tmp_path: Path) -> None:
    """A missing file is a problem like any other; an empty file is valid and routes nothing."""
    missing = tmp_path / "missing.rules.yaml"
    assert _problems(missing) == [f"{missing}: cannot read the rules file: No such file or directory"]
    rules = _load(tmp_path, "")
    assert rules.rules == ()
    assert dict(rules.profiles) == {}
    assert _load(tmp_path, "profiles:\nrules:\n").rules == ()


def test_check_rules_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-rules prints one summary line per file and exits 0, or every problem on stderr and exits 2."""
    first = _write(tmp_path, PROFILE, "a.rules.yaml")
    second = _write(tmp_path, RULE, "b.rules.yaml")
    assert main(["check-rules", str(first), str(second)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{first}: OK (0 rules, 1 profile; rule set ")
    assert out[1].startswith(f"{second}: OK (1 rule, 0 profiles; rule set ")
    bad = _write(tmp_path, RULE.replace("PROJA", "PROJ A").replace("when: {}", "when: {Modalty: MR}"), "c.rules.yaml")
    assert main(["check-rules", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = captured.err.splitlines()
    assert errors[0] == f"{bad}:3: rules.0.when.Modalty: unknown DICOM keyword 'Modalty' (did you mean 'Modality'?)"
    assert errors[1].startswith(f"{bad}:4: rules.0.route.project:")
    assert errors[2] == f"{bad}:5: rules.0.anonymize: no profile named 'research'"
    assert "Traceback" not in captured.err


def test_new_key_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """new-key writes 64 hex characters to a new 0600 file, prints where (not the key), and never overwrites."""
    target = tmp_path / "research.key"
    assert main(["new-key", str(target)]) == 0
    content = target.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", content)
    assert target.stat().st_mode & 0o777 == 0o600
    out = capsys.readouterr().out
    assert str(target) in out
    assert content.strip() not in out
    assert main(["new-key", str(target)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert target.read_text() == content
    assert main(["new-key", str(tmp_path / "no" / "such" / "dir.key")]) == 1
    path = _write(tmp_path, f"profiles:\n  p:\n    key: {{file: {target.name}}}\n")
    assert load_rules([path]).profiles["p"].key == content.strip().encode()


def test_deidentified_labels_never_carry_raw_identifying_values(tmp_path: Path) -> None:
    """{PatientID} or {StudyDate} in the label of a de-identified study would send the original to XNAT."""
    raw = RULE.replace('"{PatientID:hash8}"', '"{PatientID}"').replace("{StudyDate:hash6}", "{StudyDate}")
    path = _write(tmp_path, PROFILE + raw)
    problems = _problems(path)
    assert len(problems) == 2
    assert "rules.0.route.subject: {PatientID} is de-identified by Table E.1-1" in problems[0]
    assert "use {PatientID:hash8}" in problems[0]
    assert "rules.0.route.session: {StudyDate} is de-identified" in problems[1]
    # Without de-identification the same labels are the lab's choice.
    plain = raw.replace("    anonymize: research\n", "")
    assert load_rules([_write(tmp_path, PROFILE + plain, "plain.rules.yaml")]).rules[0].anonymize is None


def test_check_rules_refuses_what_re2_cannot_run_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A backreference, a lookahead, a possessive quantifier: each refused at its line, naming the construct;
    the backtracking pattern of issue 13 is accepted (on RE2 it is harmless)."""
    text = (
        "profiles:\n"  # 1
        "  research:\n"  # 2
        "    key: {env: KEY_A}\n"  # 3
        "    attributes:\n"  # 4
        "      - {tag: StudyComments, action: regex, pattern: '(?<=Dr )\\w+'}\n"  # 5
        "      - {tag: ImageComments, action: regex, pattern: '(\\w+)', replacement: '\\2'}\n"  # 6
        "rules:\n"  # 7
        "  - name: doubled\n"  # 8
        "    when:\n"  # 9
        "      SeriesDescription: {matches: '(T1)_\\1'}\n"  # 10
        "      StudyDescription: {matches: '^(a+)+$'}\n"  # 11
        "      ProtocolName: {matches: 'a*+b'}\n"  # 12
        "      path: {glob: '[z-a]*.dcm'}\n"  # 13
        "    route: {server: main, project: P, subject: '{PatientID:hash8}', session: s}\n"  # 14
        "    anonymize: research\n"  # 15
    )
    path = _write(tmp_path, text)
    assert main(["check-rules", str(path)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.splitlines() == [
        f"{path}:5: profiles.research.attributes.0.pattern: a lookbehind (?<=...) is not supported: patterns run "
        "on RE2, which takes time linear in the value and so cannot backtrack (docs/rules.md, Patterns)",
        f"{path}:6: profiles.research.attributes.1: replacement: the replacement refers to group 2; the pattern has 1",
        f"{path}:10: rules.0.when.SeriesDescription.matches: a backreference (\\1) is not supported: patterns run "
        "on RE2, which takes time linear in the value and so cannot backtrack (docs/rules.md, Patterns)",
        f"{path}:12: rules.0.when.ProtocolName.matches: a possessive quantifier (*+) is not supported: patterns "
        "run on RE2, which takes time linear in the value and so cannot backtrack (docs/rules.md, Patterns)",
        f"{path}:13: rules.0.when.path.glob: not a valid path glob: not a valid regular expression: invalid "
        "character class range: z-a",
    ]


def test_anchors_and_merge_keys_share_blocks(tmp_path: Path) -> None:
    """Anchors, aliases and `<<` merges stay allowed: a lab may share a route or a list of conditions."""
    text = PROFILE + (
        "rules:\n"
        "  - name: mr\n"
        "    when: &mr {Modality: MR}\n"
        "    route: &route {server: main, project: PROJA, subject: '{PatientID:hash8}', session: s}\n"
        "    drop_series: &scouts\n"
        "      - {SeriesDescription: {matches: '(?i)scout|localizer'}}\n"
        "    anonymize: research\n"
        "  - name: mr-b\n"
        "    when: *mr\n"
        "    route: {<<: *route, project: PROJB}\n"
        "    drop_series: *scouts\n"
        "    anonymize: research\n"
    )
    rules = _load(tmp_path, text)
    first, second = rules.rules
    assert second.when == first.when and second.drop_series == first.drop_series
    assert second.route.project.is_literal and second.route.server == "main"
    assert second.route.project.parts == ("PROJB",) and first.route.project.parts == ("PROJA",)


def test_keys_and_tables_are_read_within_bounds(tmp_path: Path) -> None:
    """What a rules file points at is read in bounded memory, and never waits: a FIFO or a device is refused
    unread (a reload runs inside the daemon), an oversized table or key file is refused by its size."""
    fifo = tmp_path / "table.csv"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="cannot be read: not a regular file"):
        read_table(fifo)
    with pytest.raises(ValueError, match="cannot be read: not a regular file"):
        read_table(Path("/dev/zero"))
    huge = tmp_path / "huge.csv"
    with huge.open("wb") as file:
        file.truncate(33 * 2**20)  # sparse: no disk used
    with pytest.raises(ValueError, match=r"lookup table .*huge.csv is larger than 32 MiB"):
        read_table(huge)
    key = tmp_path / "big.key"
    with key.open("wb") as file:
        file.truncate(2**20)
    key.chmod(0o600)
    rules = _write(tmp_path, f"profiles:\n  p:\n    key: {{file: {key}}}\n")
    assert _problems(rules) == [f"{rules}:3: profiles.p.key: key file {key} is larger than 64 KiB: not a key"]
