"""Loading `attach:` and its privacy keys: one test per mistake, each reported at its key's line with what to do;
and what a valid rule compiles to (Rule.attach, attach_names, files_only)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ingestd.cli import main
from ingestd.errors import ConfigError
from ingestd.rules import RuleSet, load_rules

KEY = "0123456789abcdef" * 4
PROFILE = "profiles:\n  research:\n    key: {env: KEY_A}\n"
FILES_ROUTE = 'route: {server: main, project: P, subject: "{path[0]}", session: "{path[0]}_{path[1]}", archive: true}'
PRIVACY = 'attach_unreviewed_files: true\n    justification: "qBOLD maps computed from de-identified images"\n'


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_A", KEY)


def _text(attach: str, extra: str = "", *, route: str = FILES_ROUTE, when: str = "{drop_folder: results}") -> str:
    """A rules file with one rule; `attach` and `extra` are the rule's further lines (indented 4)."""
    return PROFILE + f"rules:\n  - name: r\n    when: {when}\n    {route}\n" + attach + extra


def _load(tmp_path: Path, text: str) -> RuleSet:
    path = tmp_path / "r.rules.yaml"
    path.write_text(text)
    return load_rules([path])


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    return caught.value.problems


def _one(tmp_path: Path, text: str, line: int, key: str) -> str:
    """The only problem; it names the file, the line and the key."""
    problems = _problems(tmp_path, text)
    assert len(problems) == 1, problems
    prefix = f"{tmp_path / 'r.rules.yaml'}:{line}: {key}: "
    assert problems[0].startswith(prefix), problems
    return problems[0].removeprefix(prefix)


def _attach(*entries: str) -> str:
    return "    attach:\n" + "".join(f"      - {entry}\n" for entry in entries)


# --- what compiles -----------------------------------------------------------------------------------------------


def test_attach_compiles(tmp_path: Path) -> None:
    """Entries keep their order, glob, templates and level; a rule without anonymize keeps names; it is files-only:
    its `when` is on the drop folder and its labels come from paths."""
    rules = _load(
        tmp_path,
        _text(
            _attach(
                '{match: "*/*/qBOLD/**", resource: qBOLD}',
                '{match: "*/*/*.PAR", resource: "PAR_{path[1]}", level: scan, scan: "{path[1]}"}',
                '{match: "**/*.pdf", resource: docs, level: subject}',
            )
        ),
    )
    rule = rules.rules[0]
    assert [(entry.index, entry.match_text, entry.resource.text, entry.level) for entry in rule.attach] == [
        (0, "*/*/qBOLD/**", "qBOLD", "session"),
        (1, "*/*/*.PAR", "PAR_{path[1]}", "scan"),
        (2, "**/*.pdf", "docs", "subject"),
    ]
    assert rule.attach[0].scan is None
    assert rule.attach[1].scan is not None and rule.attach[1].scan.text == "{path[1]}"
    assert rule.attach[0].match.fullmatch("s1/v1/qBOLD/a/b.nii")
    assert not rule.attach[0].match.fullmatch("s1/qBOLD/b.nii")
    assert rule.attach_names == "keep"
    assert rule.files_only


def test_rule_without_attach_is_unchanged(tmp_path: Path) -> None:
    rule = _load(tmp_path, _text("")).rules[0]
    assert rule.attach == ()
    assert rule.attach_names == "keep"
    assert not rule.files_only


@pytest.mark.parametrize(
    ("names", "effective"),
    [("", "replace"), ("    attach_names: replace\n", "replace"), ("    attach_names: keep\n", "keep")],
)
def test_names_with_anonymize(tmp_path: Path, names: str, effective: str) -> None:
    """With anonymize, names are replaced unless the rule says keep (and its justification says why)."""
    privacy = (
        "    attach_unreviewed_files: true\n"
        '    justification: "maps from de-identified images; file names are fixed by the pipeline"\n'
    )
    text = _text(_attach("{match: '**/*.nii', resource: maps}"), "    anonymize: research\n" + privacy + names)
    assert _load(tmp_path, text).rules[0].attach_names == effective


@pytest.mark.parametrize(
    ("when", "route", "files_only"),
    [
        ("{}", FILES_ROUTE, True),
        ("{drop_folder: results, path: {glob: '*/*/**'}}", FILES_ROUTE, True),
        ("{any: [{drop_folder: a}, {not: {path: {glob: 'x/**'}}}]}", FILES_ROUTE, True),
        ("{Modality: MR}", FILES_ROUTE, False),
        ("{any: [{drop_folder: a}, {all: [{calling_aet: X}]}]}", FILES_ROUTE, False),
        ("{drop_folder: a, not: {StudyDescription: x}}", FILES_ROUTE, False),
        (
            "{}",
            'route: {server: main, project: "{drop_folder}", subject: "S_{path[0]:upper}", session: "{subject}"}',
            True,
        ),
        ("{}", 'route: {server: main, project: P, subject: "{PatientID}", session: "{path[0]}"}', False),
        ("{}", 'route: {server: main, project: P, subject: "{path[0]}", session: "{StudyDate}"}', False),
        ("{}", 'route: {server: main, project: P, subject: "{path[0]}", session: "{calling_aet}"}', False),
    ],
)
def test_files_only(tmp_path: Path, when: str, route: str, files_only: bool) -> None:
    """files_only: attach, every condition (through any/all/not) on drop_folder or path, labels without headers."""
    rule = _load(tmp_path, _text(_attach("{match: '**', resource: files}"), route=route, when=when)).rules[0]
    assert rule.files_only is files_only


# --- one test per mistake ----------------------------------------------------------------------------------------


def test_anonymize_without_review_is_refused(tmp_path: Path) -> None:
    """The privacy rule: a de-identified rule cannot attach files nobody said may leave; the message says why."""
    text = _text(_attach("{match: '**/*.pdf', resource: docs}"), "    anonymize: research\n")
    message = _one(tmp_path, text, 8, "rules.0.attach")
    assert "cannot de-identify arbitrary files" in message
    assert "attach_unreviewed_files: true and a justification" in message


def test_anonymize_without_justification_is_refused(tmp_path: Path) -> None:
    text = _text(
        _attach("{match: '**/*.pdf', resource: docs}"), "    anonymize: research\n    attach_unreviewed_files: true\n"
    )
    message = _one(tmp_path, text, 8, "rules.0.attach")
    assert "add a justification" in message
    assert "attach_unreviewed_files: true and" not in message


def test_anonymize_with_review_false_is_refused(tmp_path: Path) -> None:
    text = _text(
        _attach("{match: '**/*.pdf', resource: docs}"),
        '    anonymize: research\n    attach_unreviewed_files: false\n    justification: "no text"\n',
    )
    assert "add attach_unreviewed_files: true saying why" in _one(tmp_path, text, 8, "rules.0.attach")


def test_empty_justification_is_refused(tmp_path: Path) -> None:
    text = _text(_attach("{match: '**/*.pdf', resource: docs}"), '    justification: "  "\n')
    assert "justification is empty" in _one(tmp_path, text, 10, "rules.0.justification")


def test_keep_names_with_anonymize_needs_a_justification_about_names(tmp_path: Path) -> None:
    text = _text(
        _attach("{match: '**/*.nii', resource: maps}"),
        "    anonymize: research\n    " + PRIVACY + "    attach_names: keep\n",
    )
    message = _one(tmp_path, text, 13, "rules.0.attach_names")
    assert "says why the file and folder names are safe" in message


def test_replace_names_without_anonymize_is_refused(tmp_path: Path) -> None:
    text = _text(_attach("{match: '**/*.nii', resource: maps}"), "    attach_names: replace\n")
    assert "without anonymize, files keep their names" in _one(tmp_path, text, 10, "rules.0.attach_names")


def test_unknown_attach_names_is_refused(tmp_path: Path) -> None:
    text = _text(_attach("{match: '**/*.nii', resource: maps}"), "    attach_names: hash\n")
    problems = _problems(tmp_path, text)
    assert len(problems) == 1 and ":10: rules.0.attach_names: " in problems[0], problems
    assert "'replace' or 'keep'" in problems[0]


@pytest.mark.parametrize(
    ("extra", "line", "key"),
    [
        ("    attach_unreviewed_files: true\n", 8, "attach_unreviewed_files"),
        ('    justification: "safe"\n', 8, "justification"),
        ("    attach_names: keep\n", 8, "attach_names"),
    ],
)
def test_privacy_keys_without_attach_are_refused(tmp_path: Path, extra: str, line: int, key: str) -> None:
    message = _one(tmp_path, _text("", extra), line, f"rules.0.{key}")
    assert "used only by a rule that attaches files" in message


@pytest.mark.parametrize("attach", ["    attach: []\n", "    attach:\n"])
def test_empty_attach_is_refused(tmp_path: Path, attach: str) -> None:
    assert "at least one entry" in _one(tmp_path, _text(attach), 8, "rules.0.attach")


def test_attach_not_a_list_is_refused(tmp_path: Path) -> None:
    text = _text("    attach: {match: '**', resource: x}\n")
    assert "attach is a list" in _one(tmp_path, text, 8, "rules.0.attach")


@pytest.mark.parametrize(
    ("resource", "says"),
    [
        ("'2024'", "must start with a letter"),
        ("2024", "must start with a letter"),
        ("'_x'", "must start with a letter"),
        ("'q BOLD'", "(' ')"),
        ("'a,b'", "(',')"),
        ("'SELECT x'", "(' ')"),
        ("'qBOLD.v2'", "('.')"),
        ('"it\'s"', '("\'")'),
        ("'" + "a" * 65 + "'", "at most 64 characters"),
        ("'x_{path[0]}_" + "a" * 64 + "'", "at most 64 characters"),
        ("'{path[0]} maps'", "(' ')"),
        ("'1_{path[0]}'", "must start with a letter"),
    ],
)
def test_resource_label_xnat_refuses(tmp_path: Path, resource: str, says: str) -> None:
    """A label XNAT refuses (docs/xnat-resources.md §3) is an error at load, for literal text in templates too."""
    message = _one(tmp_path, _text(_attach(f"{{match: '**', resource: {resource}}}")), 9, "rules.0.attach.0.resource")
    assert "XNAT would refuse this resource label" in message or "at most 64" in message
    assert says in message


@pytest.mark.parametrize("resource", ["'{PatientID}'", "'{calling_aet}'", "'{drop_folder}'", "'{path}'", "'{path[x]}'"])
def test_resource_field_not_allowed(tmp_path: Path, resource: str) -> None:
    message = _one(tmp_path, _text(_attach(f"{{match: '**', resource: {resource}}}")), 9, "rules.0.attach.0.resource")
    assert "{path" in message


@pytest.mark.parametrize(
    ("scan", "says"), [("'7 b'", "(' ')"), ("'.7'", "start with a letter or digit"), ("'a/b'", "('/')")]
)
def test_scan_id_xnat_refuses(tmp_path: Path, scan: str, says: str) -> None:
    entry = f"{{match: '**', resource: r, level: scan, scan: {scan}}}"
    message = _one(tmp_path, _text(_attach(entry)), 9, "rules.0.attach.0.scan")
    assert says in message


def test_scan_field_not_allowed(tmp_path: Path) -> None:
    entry = "{match: '**', resource: r, level: scan, scan: '{SeriesNumber}'}"
    assert "only {path}" in _one(tmp_path, _text(_attach(entry)), 9, "rules.0.attach.0.scan")


def test_level_scan_without_scan_is_refused(tmp_path: Path) -> None:
    message = _one(tmp_path, _text(_attach("{match: '**', resource: r, level: scan}")), 9, "rules.0.attach.0")
    assert "level scan needs scan" in message


def test_scan_without_level_scan_is_refused(tmp_path: Path) -> None:
    message = _one(tmp_path, _text(_attach("{match: '**', resource: r, scan: '7'}")), 9, "rules.0.attach.0")
    assert "scan is used only with level: scan" in message


def test_unknown_level_is_refused(tmp_path: Path) -> None:
    message = _one(tmp_path, _text(_attach("{match: '**', resource: r, level: project}")), 9, "rules.0.attach.0.level")
    assert "session, scan, subject" in message


@pytest.mark.parametrize("level", ["scan", "subject"])
def test_level_scan_or_subject_without_archive_is_refused(tmp_path: Path, level: str) -> None:
    """The prearchive takes session-level resources only (docs/xnat-resources.md §5)."""
    scan = ", scan: '7'" if level == "scan" else ""
    route = 'route: {server: main, project: P, subject: "{path[0]}", session: "{path[1]}"}'
    text = _text(_attach(f"{{match: '**', resource: r, level: {level}{scan}}}"), route=route)
    message = _one(tmp_path, text, 9, "rules.0.attach.0.level")
    assert f"level {level} needs route.archive: true" in message and "prearchive" in message


def test_level_session_without_archive_is_fine(tmp_path: Path) -> None:
    route = 'route: {server: main, project: P, subject: "{path[0]}", session: "{path[1]}"}'
    assert _load(tmp_path, _text(_attach("{match: '**', resource: r}"), route=route)).rules[0].attach


@pytest.mark.parametrize(
    ("glob", "says"),
    [("/abs/**", "remove the leading '/'"), ("a**/x", "whole path component"), ("''", "match is a glob")],
)
def test_bad_glob_is_refused(tmp_path: Path, glob: str, says: str) -> None:
    message = _one(tmp_path, _text(_attach(f"{{match: {glob}, resource: r}}")), 9, "rules.0.attach.0.match")
    assert says in message


def test_missing_keys_and_unknown_keys_are_refused(tmp_path: Path) -> None:
    problems = _problems(tmp_path, _text(_attach("{match: '**'}", "{resource: r, glob: '**'}")))
    assert [re.sub(r"^.*?:\d+: ", "", problem) for problem in problems] == [
        "rules.0.attach.0.resource: required key is missing",
        "rules.0.attach.1.match: required key is missing",
        "rules.0.attach.1.glob: unknown key",
    ]


def test_hash_without_key_is_refused(tmp_path: Path) -> None:
    text = _text(_attach("{match: '**', resource: 'r_{path[0]:hash8}'}"))
    assert ":hashN needs a key" in _one(tmp_path, text, 9, "rules.0.attach.0.resource")


def test_hash_with_profile_key_is_fine(tmp_path: Path) -> None:
    text = _text(_attach("{match: '**', resource: 'r_{path[0]:hash8}'}"), "    anonymize: research\n    " + PRIVACY)
    assert _load(tmp_path, text).rules[0].label_key == KEY.encode()


def test_every_attach_problem_at_once(tmp_path: Path) -> None:
    """Several mistakes in several entries come back together, in line order."""
    text = _text(
        _attach(
            "{match: '**', resource: '9'}", "{match: '/x', resource: ok}", "{match: '**', resource: r, level: bad}"
        ),
        "    anonymize: research\n",
    )
    problems = _problems(tmp_path, text)
    keys = [re.sub(r"^.*?:\d+: ([^:]+):.*$", r"\1", problem) for problem in problems]
    assert keys == ["rules.0.attach", "rules.0.attach.0.resource", "rules.0.attach.1.match", "rules.0.attach.2.level"]


def test_check_rules_shows_the_privacy_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`ingestd check-rules` prints the problem with its line and exits non-zero."""
    path = tmp_path / "r.rules.yaml"
    path.write_text(_text(_attach("{match: '**/*.pdf', resource: docs}"), "    anonymize: research\n"))
    assert main(["check-rules", str(path)]) != 0
    err = capsys.readouterr().err
    assert f"{path}:8: rules.0.attach: " in err
    assert "cannot de-identify arbitrary files" in err


@pytest.mark.parametrize(
    ("entry_or_keys", "key", "says"),
    [
        ("    attach: [123]\n", "rules.0.attach.0", "an attach entry is a mapping"),
        ("    attach: [{match: '**', resource: true}]\n", "rules.0.attach.0.resource", "true/false"),
        ("    attach: [{match: '**', resource: [x]}]\n", "rules.0.attach.0.resource", "expected a text value"),
        ("    attach: [{match: '**', resource: '{'}]\n", "rules.0.attach.0.resource", "unmatched '{'"),
        ("    attach: [{match: '**', resource: 'a{{b}}'}]\n", "rules.0.attach.0.resource", "('{' '}')"),
        ("    attach: [{match: '**', resource: r, level: 3}]\n", "rules.0.attach.0.level", "level is one of"),
        (
            "    attach: [{match: '**', resource: r}]\n    attach_unreviewed_files: 'yes'\n",
            "rules.0.attach_unreviewed_files",
            "write attach_unreviewed_files: true",
        ),
    ],
)
def test_hostile_shapes_are_refused_with_a_hint(tmp_path: Path, entry_or_keys: str, key: str, says: str) -> None:
    problems = _problems(tmp_path, _text(entry_or_keys))
    assert len(problems) == 1 and f": {key}: " in problems[0] and says in problems[0], problems


def test_a_string_yes_is_not_a_review(tmp_path: Path) -> None:
    """`attach_unreviewed_files: "yes"` never counts as the explicit true the privacy rule asks for."""
    text = _text(
        "    attach: [{match: '**', resource: r}]\n",
        "    anonymize: research\n    attach_unreviewed_files: 'yes'\n    justification: x\n",
    )
    problems = _problems(tmp_path, text)
    assert any("cannot de-identify arbitrary files" in problem for problem in problems), problems


def test_cross_key_problems_name_the_right_entry(tmp_path: Path) -> None:
    """An entry that is not a mapping does not shift the index of the entries after it."""
    route = 'route: {server: main, project: P, subject: "{path[0]}", session: "{path[1]}"}'
    text = _text("    attach:\n      - 7\n      - {match: '**', resource: r, level: subject}\n", route=route)
    problems = _problems(tmp_path, text)
    assert [re.sub(r"^.*?:(\d+): ([^:]+):.*$", r"\1 \2", problem) for problem in problems] == [
        "9 rules.0.attach.0",
        "10 rules.0.attach.1.level",
    ]
