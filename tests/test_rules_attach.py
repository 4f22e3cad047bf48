"""Where attached files go (`place_files`), which rule routes files without DICOM (`files_only_decision`), what
`explain` shows, shadow warnings for files-only rules, and the invariants of replaced names."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestd.rules import Held, Routed, RuleSet, SeriesFacts, StudyFacts, decide, load_rules
from ingestd.rules.attach import (
    RESOURCE_LABEL,
    SCAN_ID,
    Placed,
    attachable,
    explain_attachments,
    explain_files_only,
    files_only_decision,
    place_files,
    replacement_extension,
)
from ingestd.rules.match import Rule
from ingestd.rules.shadow import shadowed_rules
from ingestd.states import HoldCode

KEY = "0123456789abcdef" * 4
PROFILE = "profiles:\n  research:\n    key: {env: KEY_A}\n"
ROUTE = 'route: {server: main, project: P, subject: "{path[0]}", session: "{path[0]}_{path[1]}", archive: true}'
PRIVACY = '    attach_unreviewed_files: true\n    justification: "maps computed from de-identified images"\n'
LABELS = {"project": "P", "subject": "S01", "session": "S01_V1"}


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_A", KEY)


def _ruleset(directory: Path, *rules: str) -> RuleSet:
    """Rules, each given as the lines after its name."""
    text = PROFILE + "rules:\n" + "".join(f"  - name: r{index}\n{body}" for index, body in enumerate(rules))
    path = directory / "r.rules.yaml"
    path.write_text(text)
    return load_rules([path])


def _body(*entries: str, extra: str = "", when: str = "{drop_folder: results}", route: str = ROUTE) -> str:
    attach = "    attach:\n" + "".join(f"      - {entry}\n" for entry in entries) if entries else ""
    return f"    when: {when}\n    {route}\n" + attach + extra


def _rule(directory: Path, *entries: str, extra: str = "") -> Rule:
    return _ruleset(directory, _body(*entries, extra=extra)).rules[0]


REPLACE = "    anonymize: research\n" + PRIVACY


# --- place_files -------------------------------------------------------------------------------------------------


def test_glob_ending_in_double_star_keeps_the_folders_below(tmp_path: Path) -> None:
    """`*/*/qBOLD/**`: the path below qBOLD/ is the name inside the resource, folders included."""
    rule = _rule(tmp_path, "{match: '*/*/qBOLD/**', resource: qBOLD}")
    placement = place_files(rule, ["S01/V1/qBOLD/maps/r2.nii.gz", "S01/V1/qBOLD/log.txt", "S01/V1/x.pdf"], LABELS)
    assert placement.placed == {
        "S01/V1/qBOLD/log.txt": Placed("session", "", "qBOLD", "log.txt", 0),
        "S01/V1/qBOLD/maps/r2.nii.gz": Placed("session", "", "qBOLD", "maps/r2.nii.gz", 0),
    }
    assert placement.unmatched == ("S01/V1/x.pdf",)
    assert placement.problems == ()


def test_double_star_before_the_folder_takes_the_shortest(tmp_path: Path) -> None:
    """`**/qBOLD/**`: below the first folder named qBOLD; `**` alone: the whole path."""
    rule = _rule(tmp_path, "{match: '**/qBOLD/**', resource: qBOLD}", "{match: '**', resource: rest}")
    placement = place_files(rule, ["a/qBOLD/b/qBOLD/c.nii", "qBOLD/d.nii", "e/f.txt"], LABELS)
    assert placement.placed["a/qBOLD/b/qBOLD/c.nii"].name == "b/qBOLD/c.nii"
    assert placement.placed["qBOLD/d.nii"].name == "d.nii"
    assert placement.placed["e/f.txt"] == Placed("session", "", "rest", "e/f.txt", 1)


def test_other_globs_use_the_base_name_and_the_first_entry_decides(tmp_path: Path) -> None:
    rule = _rule(
        tmp_path,
        "{match: '*/*/*.PAR', resource: PARREC}",
        "{match: '*/*/*.REC', resource: PARREC}",
        "{match: '**/*.PAR', resource: never}",
    )
    placement = place_files(rule, ["S01/V1/scan_7.PAR", "S01/V1/scan_7.REC", "S01/V1/deep/x.PAR"], LABELS)
    assert {relative: (place.resource, place.name, place.entry) for relative, place in placement.placed.items()} == {
        "S01/V1/scan_7.PAR": ("PARREC", "scan_7.PAR", 0),
        "S01/V1/scan_7.REC": ("PARREC", "scan_7.REC", 1),
        "S01/V1/deep/x.PAR": ("never", "x.PAR", 2),
    }


def test_templates_use_the_files_folders_and_the_route_labels(tmp_path: Path) -> None:
    """path[N] is of the file's own folders; project/subject/session come from the route; nothing is sanitized."""
    rule = _rule(
        tmp_path,
        "{match: '*/*/scans/*/**', resource: 'scan{path[3]}_{session}', level: scan, scan: '{path[3]}'}",
        "{match: '**', resource: 'r_{subject}_{project}'}",
    )
    placement = place_files(rule, ["S01/V1/scans/7/a.PAR", "S01/V1/x.pdf"], LABELS)
    assert placement.placed["S01/V1/scans/7/a.PAR"] == Placed("scan", "7", "scan7_S01_V1", "a.PAR", 0)
    assert placement.placed["S01/V1/x.pdf"] == Placed("session", "", "r_S01_P", "S01/V1/x.pdf", 1)
    assert placement.problems == ()


def test_subject_level(tmp_path: Path) -> None:
    placed = place_files(_rule(tmp_path, "{match: '*/*', resource: docs, level: subject}"), ["a/b.pdf"], LABELS).placed
    assert placed["a/b.pdf"] == Placed("subject", "", "docs", "b.pdf", 0)


def test_replaced_names_count_per_resource_in_sorted_order(tmp_path: Path) -> None:
    """With anonymize: `<resource>_<NNNN><ext>`, numbered per resource in the order of the sorted paths."""
    rule = _rule(tmp_path, "{match: '*/*/qBOLD/**', resource: qBOLD}", "{match: '**', resource: other}", extra=REPLACE)
    assert rule.attach_names == "replace"
    files = ["S01/V1/qBOLD/z/Smith_John.nii.gz", "S01/V1/qBOLD/a.tar.gz", "S01/V1/notes.PAR", "S01/V1/qBOLD/b"]
    placement = place_files(rule, files, LABELS)
    assert {relative: place.name for relative, place in placement.placed.items()} == {
        "S01/V1/notes.PAR": "other_0001.PAR",
        "S01/V1/qBOLD/a.tar.gz": "qBOLD_0001.tar.gz",
        "S01/V1/qBOLD/b": "qBOLD_0002",
        "S01/V1/qBOLD/z/Smith_John.nii.gz": "qBOLD_0003.nii.gz",
    }
    assert placement.problems == ()
    # The order of the input does not matter; the same files always get the same names.
    assert place_files(rule, list(reversed(files)), LABELS) == placement


def test_replaced_names_count_per_scan(tmp_path: Path) -> None:
    rule = _rule(tmp_path, "{match: '*/*/*/*', resource: raw, level: scan, scan: '{path[2]}'}", extra=REPLACE)
    placement = place_files(rule, ["S/V/7/a.REC", "S/V/7/b.REC", "S/V/8/c.REC"], LABELS)
    assert [(place.scan, place.name) for place in placement.placed.values()] == [
        ("7", "raw_0001.REC"),
        ("7", "raw_0002.REC"),
        ("8", "raw_0001.REC"),
    ]


@pytest.mark.parametrize(
    ("name", "extension"),
    [
        ("report.pdf", ".pdf"),
        ("scan_7.PAR", ".PAR"),
        ("qBOLD.tar.gz", ".tar.gz"),
        ("t1.nii.gz", ".nii.gz"),
        ("john.smith.pdf", ".pdf"),  # never a second suffix that could be part of a name
        ("john.smith.gz", ".gz"),
        ("Smith^John", ""),
        (".bashrc", ""),
        ("a.verylongextension", ""),
        ("a.p df", ""),
        ("a.", ""),
        ("a.tar.%41", ""),
    ],
)
def test_replacement_extension(name: str, extension: str) -> None:
    assert replacement_extension(name) == extension


def test_two_files_with_one_name_in_a_resource_are_a_problem(tmp_path: Path) -> None:
    """Base names of two folders collide: the set is held, the reason names the entry, not the files."""
    rule = _rule(tmp_path, "{match: '**/*.pdf', resource: docs}")
    placement = place_files(rule, ["S01/V1/a/report.pdf", "S01/V1/b/report.pdf", "S01/V1/c.pdf"], LABELS)
    assert len(placement.problems) == 1
    assert placement.problems[0].startswith('attach.0 resource "docs": two files would have the same path')
    assert "report" not in placement.problems[0]


def test_same_name_in_different_resources_or_scans_is_fine(tmp_path: Path) -> None:
    rule = _rule(tmp_path, "{match: '*/*/*/*.pdf', resource: '{path[2]}', level: scan, scan: '{path[2]}'}")
    route = _ruleset(tmp_path, _body("{match: '*/*/*/*.pdf', resource: docs, level: scan, scan: '{path[2]}'}"))
    files = ["S/V/a7/report.pdf", "S/V/b8/report.pdf"]
    assert place_files(rule, files, LABELS).problems == ()
    assert place_files(route.rules[0], files, LABELS).problems == ()


@pytest.mark.parametrize(
    ("relative", "says"),
    [
        ("S01/V1/qBOLD/x_catalog.xml", "_catalog.xml"),
        ("S01/V1/qBOLD/.~lock-report.odt#", ".~lock-"),
        ("S01/V1/qBOLD/.~lock-dir/a.txt", ".~lock-"),
    ],
)
def test_names_xnat_refuses_are_a_problem(tmp_path: Path, relative: str, says: str) -> None:
    rule = _rule(tmp_path, "{match: '*/*/qBOLD/**', resource: qBOLD}")
    placement = place_files(rule, [relative], LABELS)
    assert len(placement.problems) == 1 and says in placement.problems[0]
    assert "report" not in placement.problems[0] and "dir" not in placement.problems[0]


def test_dot_components_are_a_problem(tmp_path: Path) -> None:
    rule = _rule(tmp_path, "{match: '**', resource: r}")
    for relative in ("a/../b.txt", "a/./b.txt", "a//b.txt"):
        assert "'..' component" in place_files(rule, [relative], LABELS).problems[0]


def test_replaced_names_are_never_refused(tmp_path: Path) -> None:
    """A refused name is a problem only when names are kept: replaced names are the label and a counter."""
    rule = _rule(tmp_path, "{match: '**', resource: r}", extra=REPLACE)
    placement = place_files(rule, ["a/x_catalog.xml", "a/.~lock-y#"], LABELS)
    assert placement.problems == ()
    assert [place.name for place in placement.placed.values()] == ["r_0001", "r_0002.xml"]


@pytest.mark.parametrize(
    ("resource", "folder"),
    [
        ("'{path[1]}'", "2024"),  # digits: XNAT reads a resource ID
        ("'{path[1]}'", "my results"),
        ("'{path[1]}'", "a,b"),
        ("'r_{path[1]}'", "x" * 63),  # 65 characters
        ("'{path[1]}'", "Ré"),
        ("'{path[1]}'", "_x"),
    ],
)
def test_rendered_labels_xnat_refuses_are_a_problem(tmp_path: Path, resource: str, folder: str) -> None:
    """Never sanitized into something else: a problem naming the template, not the value."""
    rule = _rule(tmp_path, f"{{match: '**', resource: {resource}}}")
    placement = place_files(rule, [f"S01/{folder}/f.txt"], LABELS)
    assert placement.problems == (
        f'attach.0 resource "{resource[1:-1]}": XNAT would refuse the label built for a file (1 to 64 letters, '
        "digits, '_' or '-', starting with a letter)",
    )
    assert folder not in placement.problems[0]


@pytest.mark.parametrize("folder", ["7 b", ".7", "x" * 65, "7,8"])
def test_rendered_scan_ids_xnat_refuses_are_a_problem(tmp_path: Path, folder: str) -> None:
    rule = _rule(tmp_path, "{match: '**', resource: raw, level: scan, scan: '{path[1]}'}")
    placement = place_files(rule, [f"S01/{folder}/f.REC"], LABELS)
    assert len(placement.problems) == 1 and "XNAT would refuse the scan ID" in placement.problems[0]
    assert folder not in placement.problems[0]


def test_missing_folder_or_label_is_a_problem(tmp_path: Path) -> None:
    rule = _rule(tmp_path, "{match: '**', resource: 'r_{path[3]}'}", "{match: '**', resource: 'r_{session}'}")
    placement = place_files(rule, ["a/b.txt"], LABELS)
    assert placement.problems == (
        'attach.0 resource "r_{path[3]}": path[3] is missing: a file lies fewer than 4 folders deep',
    )
    assert placement.placed == {}
    assert place_files(rule, ["a/b/c/d/e.txt"], {}).problems == ()  # path[3] is there; session unused
    second = _rule(tmp_path, "{match: '**', resource: 'r_{session}'}")
    assert place_files(second, ["a.txt"], {"project": "P"}).problems == (
        'attach.0 resource "r_{session}": session is not known for these files',
    )


def test_hashed_labels_use_the_rules_key(tmp_path: Path) -> None:
    rule = _rule(tmp_path, "{match: '**', resource: 'r_{path[0]:hash8}'}", extra=REPLACE)
    placed = place_files(rule, ["Smith/a.txt"], LABELS).placed["Smith/a.txt"]
    assert re.fullmatch(r"r_[0-9a-f]{8}", placed.resource)


def test_attachable(tmp_path: Path) -> None:
    rules = _ruleset(tmp_path, _body("{match: '*/*/qBOLD/**', resource: q}"), _body("{match: '**/*.pdf', resource: d}"))
    assert attachable(rules, "S/V/qBOLD/x.nii")
    assert attachable(rules, "S/V/qBOLD/sub/x.nii")
    assert attachable(rules, "a.pdf")
    assert not attachable(rules, "S/qBOLD/x.nii")
    assert not attachable(rules, "S/V/notes.txt")


# --- files_only_decision -----------------------------------------------------------------------------------------


def _files(*paths: str, drop_folder: str = "/srv/drop/results") -> StudyFacts:
    return StudyFacts(study_uid="files:x", series=(), drop_folder=drop_folder, paths=paths)


def test_files_only_decision_routes_by_path_labels(tmp_path: Path) -> None:
    """The labels a study of the same files gets from `decide` (path[N], sanitized as XNAT labels)."""
    rules = _ruleset(tmp_path, _body("{match: '*/*/qBOLD/**', resource: qBOLD}"))
    facts = _files("sub 01/ses1/qBOLD/a.nii", "sub 01/ses1/qBOLD/b/c.nii")
    decision = files_only_decision(rules, facts)
    assert decision == Routed(
        rule="r0",
        server="main",
        project="P",
        subject="sub_01",
        session="sub_01_ses1",
        archive=True,
        profile=None,
        kept_series=(),
        dropped_series=(),
    )
    study = StudyFacts(
        "1.2",
        (SeriesFacts("1.2.3", 1, {"Modality": "MR"}, "1.2.840.10008.5.1.4.1.1.4"),),
        None,
        None,
        "/srv/drop/results",
        ("sub 01/ses1/dicom/1.dcm",),
    )
    routed = decide(rules, study)
    assert isinstance(routed, Routed)
    assert (routed.project, routed.subject, routed.session) == (decision.project, decision.subject, decision.session)


def test_files_disagreeing_on_a_label_are_held(tmp_path: Path) -> None:
    rules = _ruleset(tmp_path, _body("{match: '**', resource: r}"))
    decision = files_only_decision(rules, _files("S01/V1/a.nii", "S02/V1/b.nii"))
    assert decision == Held(
        reason="rule 'r0': route.subject \"{path[0]}\": path[0] differs between the dropped files",
        code=HoldCode.LABEL,
        rule="r0",
    )
    shallow = files_only_decision(rules, _files("S01/a.nii"))
    assert isinstance(shallow, Held) and shallow.code == HoldCode.LABEL and "path[1] is missing" in shallow.reason


def test_files_only_decision_skips_rules_that_need_dicom(tmp_path: Path) -> None:
    """A `when: {}` rule with header labels comes first: it cannot route files; the files-only rule behind it does."""
    header = _body(
        "{match: '**', resource: r}",
        when="{}",
        route='route: {server: main, project: P, subject: "{PatientID}", session: "{StudyDate}"}',
    )
    no_attach = _body(when="{}")
    rules = _ruleset(tmp_path, header, no_attach, _body("{match: '**', resource: r}", when="{path: {glob: 'S*/**'}}"))
    assert [rule.files_only for rule in rules.rules] == [False, False, True]
    decision = files_only_decision(rules, _files("S01/V1/a.nii"))
    assert isinstance(decision, Routed) and decision.rule == "r2"
    unrouted = files_only_decision(rules, _files("X01/V1/a.nii"))
    assert unrouted == Held(
        reason="no rule that attaches files without DICOM matches these files (1 such rule tried)",
        code=HoldCode.UNROUTED,
    )


def test_files_only_decision_by_drop_folder(tmp_path: Path) -> None:
    rules = _ruleset(
        tmp_path,
        _body("{match: '**', resource: a}", when="{drop_folder: results}"),
        _body(
            "{match: '**', resource: b}",
            when="{drop_folder: {matches: '^other'}}",
            route='route: {server: main, project: "{drop_folder}", subject: S, session: "{subject}_{path[0]}"}',
        ),
    )
    decision = files_only_decision(rules, _files("V1/a.nii", drop_folder="/srv/other_site"))
    assert isinstance(decision, Routed)
    assert (decision.rule, decision.project, decision.subject, decision.session) == ("r1", "other_site", "S", "S_V1")


def test_files_only_decision_with_a_profile(tmp_path: Path) -> None:
    rules = _ruleset(tmp_path, _body("{match: '**', resource: r}", extra=REPLACE))
    decision = files_only_decision(rules, _files("S01/V1/a.nii"))
    assert isinstance(decision, Routed) and decision.profile == "research"


# --- explanations ------------------------------------------------------------------------------------------------


def test_explain_attachments(tmp_path: Path) -> None:
    rule = _rule(
        tmp_path,
        "{match: '*/*/qBOLD/**', resource: qBOLD}",
        "{match: '**/*.PAR', resource: raw, level: scan, scan: '7'}",
    )
    lines = explain_attachments(rule, ["S/V/qBOLD/a/b.nii", "S/V/x.PAR", "S/V/notes.txt"], LABELS)
    assert lines == [
        "  attach: 3 files (names kept)",
        "    S/V/notes.txt: no attach entry of rule 'r0' matches: quarantined",
        '    S/V/qBOLD/a/b.nii -> session resource qBOLD, as a/b.nii (attach.0 "*/*/qBOLD/**")',
        '    S/V/x.PAR -> scan 7 resource raw, as x.PAR (attach.1 "**/*.PAR")',
    ]


def test_explain_attachments_shows_the_hold(tmp_path: Path) -> None:
    rule = _rule(tmp_path, "{match: '**', resource: '{path[0]}'}")
    lines = explain_attachments(rule, ["2024/a.txt", "b/c/d.txt"], LABELS)
    assert lines[-1].startswith('  attach: held (label): attach.0 resource "{path[0]}": XNAT would refuse')
    assert '    b/c/d.txt -> session resource b, as b/c/d.txt (attach.0 "**")' in lines


def test_explain_files_only(tmp_path: Path) -> None:
    rules = _ruleset(
        tmp_path,
        _body(when="{}"),
        _body("{match: '**', resource: r}", when="{drop_folder: results}"),
    )
    lines = explain_files_only(rules, _files("S01/V1/a.nii"))
    assert lines[0] == "1 file without DICOM"
    assert "cannot route files without DICOM (skipped)" in lines[1]
    assert lines[-1] == "decision: routed by rule 'r1': project P, subject S01, session S01_V1"


# --- shadowed rules ---------------------------------------------------------------------------------------------


def test_files_only_rule_behind_a_catch_all_is_not_shadowed(tmp_path: Path) -> None:
    """Uploads without DICOM pass the `when: {}` rule by (it cannot route them): no warning."""
    catch_all = _body(when="{}", route='route: {server: main, project: P, subject: "{PatientID}", session: x}')
    files = _body("{match: '**', resource: r}")
    assert shadowed_rules(_ruleset(tmp_path, catch_all, files)) == []


def test_files_only_rule_behind_a_files_only_catch_all_is_shadowed(tmp_path: Path) -> None:
    rules = _ruleset(tmp_path, _body("{match: '**', resource: a}", when="{}"), _body("{match: '**', resource: b}"))
    found = shadowed_rules(rules)
    assert [(item.rule.name, item.earlier.name) for item in found] == [("r1", "r0")]
    assert "every study and every upload without DICOM it matches" in found[0].message


def test_rule_needing_dicom_behind_a_files_only_rule_is_still_shadowed(tmp_path: Path) -> None:
    rules = _ruleset(tmp_path, _body("{match: '**', resource: a}", when="{}"), _body(when="{Modality: MR}"))
    assert [(item.rule.name, item.earlier.name) for item in shadowed_rules(rules)] == [("r1", "r0")]


# --- invariants --------------------------------------------------------------------------------------------------

_COMPONENT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=12).filter(
    lambda text: text not in (".", "..")
)
_PATHS = st.lists(st.lists(_COMPONENT, min_size=1, max_size=5).map("/".join), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(paths=_PATHS)
def test_replaced_names_hide_the_path_and_are_unique(
    tmp_path_factory: pytest.TempPathFactory, paths: list[str]
) -> None:
    """With `replace`: no placed name contains any component of the file's path (beyond the extension kept), names
    are unique per resource, and XNAT takes every one of them."""
    rule = _replacing_rule(tmp_path_factory)
    placement = place_files(rule, paths, LABELS)
    assert placement.problems == ()
    assert set(placement.placed) == set(paths)
    ranks: dict[str, int] = {}
    for relative in sorted(
        set(paths)
    ):  # the name is the resource, its rank and the extension: nothing else of the path
        place = placement.placed[relative]
        ranks[place.resource] = ranks.get(place.resource, 0) + 1
        ext = replacement_extension(PurePosixPath(relative).name)
        assert place.name == f"{place.resource}_{ranks[place.resource]:04d}{ext}"
        assert re.fullmatch(r"(\.[A-Za-z0-9]{1,8}){0,2}", ext)
        assert ext.count(".") < 2 or ext.split(".")[1].lower() in (
            "tar",
            "nii",
            "csv",
            "tsv",
            "txt",
            "json",
            "log",
            "par",
            "rec",
            "img",
            "hdr",
            "mat",
            "dcm",
        )
        assert not any(component in place.name for component in relative.split("/") if len(component) > 8)
    keys = [(place.resource, place.name) for place in placement.placed.values()]
    assert len(keys) == len(set(keys))


_REPLACING: dict[str, Rule] = {}


def _replacing_rule(factory: pytest.TempPathFactory) -> Rule:
    if "rule" not in _REPLACING:
        directory = factory.mktemp("replacing")
        _REPLACING["rule"] = _rule(
            directory, "{match: '**/*.pdf', resource: docs}", "{match: '**', resource: rest}", extra=REPLACE
        )
    return _REPLACING["rule"]


@settings(max_examples=150, deadline=None)
@given(paths=_PATHS)
def test_kept_names_are_paths_below_the_folder(tmp_path_factory: pytest.TempPathFactory, paths: list[str]) -> None:
    """With `keep` and a glob `**`: every file placed, its name its whole path; problems only for names XNAT refuses."""
    rule = _keeping_rule(tmp_path_factory)
    placement = place_files(rule, paths, LABELS)
    assert {relative: place.name for relative, place in placement.placed.items()} == {path: path for path in paths}
    refused = [path for path in paths if path.endswith("_catalog.xml") or ".~lock-" in path]
    assert bool(placement.problems) == bool(refused)


_KEEPING: dict[str, Rule] = {}


def _keeping_rule(factory: pytest.TempPathFactory) -> Rule:
    if "rule" not in _KEEPING:
        _KEEPING["rule"] = _rule(factory.mktemp("keeping"), "{match: '**', resource: all}")
    return _KEEPING["rule"]


@given(st.text(max_size=80))
def test_label_patterns_are_xnats(folder: str) -> None:
    """RESOURCE_LABEL and SCAN_ID say what docs/xnat-resources.md §3 says, for any text."""
    ascii_word = all(char.isascii() and (char.isalnum() or char in "_-") for char in folder)
    first = folder[:1]
    assert bool(RESOURCE_LABEL.match(folder)) == (
        first.isascii() and first.isalpha() and len(folder) <= 64 and ascii_word
    )
    scan_chars = all(char.isascii() and (char.isalnum() or char in "_.-") for char in folder)
    assert bool(SCAN_ID.match(folder)) == (first.isascii() and first.isalnum() and len(folder) <= 64 and scan_chars)


@settings(max_examples=150, deadline=None)
@given(folder=_COMPONENT)
def test_built_labels_are_placed_only_as_xnat_takes_them(tmp_path_factory: pytest.TempPathFactory, folder: str) -> None:
    """Whatever a folder is called, the label and scan ID built from it are placed as they are (never changed),
    and the set has a problem exactly when XNAT would refuse one of them."""
    rule = _labelled_rule(tmp_path_factory)
    placement = place_files(rule, [f"{folder}/f.txt"], LABELS)
    place = placement.placed[f"{folder}/f.txt"]
    assert (place.resource, place.scan) == (f"r{folder}", folder)
    refused = not RESOURCE_LABEL.match(place.resource) or not SCAN_ID.match(place.scan)
    assert bool(placement.problems) == refused
    assert {problem.split(":")[0] for problem in placement.problems} <= {  # fixed texts: never the folder's name
        'attach.0 resource "r{path[0]}"',
        'attach.0 scan "{path[0]}"',
    }


_LABELLED: dict[str, Rule] = {}


def _labelled_rule(factory: pytest.TempPathFactory) -> Rule:
    if "rule" not in _LABELLED:
        _LABELLED["rule"] = _rule(
            factory.mktemp("labelled"), "{match: '*/*', resource: 'r{path[0]}', level: scan, scan: '{path[0]}'}"
        )
    return _LABELLED["rule"]


def test_example_rules_attach(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped example attaches qBOLD results of the legacy layout, with or without their DICOM, names replaced."""
    path = Path(__file__).resolve().parents[1] / "rules" / "example.rules.yaml"
    monkeypatch.setenv("INGESTD_KEY_RESEARCH", KEY)
    monkeypatch.setenv("INGESTD_KEY_PET", KEY)
    rules = load_rules([path])
    legacy = next(rule for rule in rules.rules if rule.name == "legacy-import")
    assert legacy.files_only and legacy.attach_names == "replace"
    assert [rule.name for rule in rules.rules if rule.files_only] == ["legacy-import"]
    facts = _files("S01/V1/qBOLD/r2.nii.gz", "S01/V1/qBOLD/sub/t2.nii.gz", drop_folder="/srv/drop/legacy")
    decision = files_only_decision(rules, facts)
    assert isinstance(decision, Routed)
    assert (decision.rule, decision.project, decision.subject, decision.session) == (
        "legacy-import",
        "LEGACY",
        "S01",
        "S01_V1",
    )
    labels = {"project": decision.project, "subject": decision.subject, "session": decision.session}
    placement = place_files(legacy, [*facts.paths, "S01/V1/notes.txt"], labels)
    assert [(place.resource, place.name) for place in placement.placed.values()] == [
        ("qBOLD", "qBOLD_0001.nii.gz"),
        ("qBOLD", "qBOLD_0002.nii.gz"),
    ]
    assert placement.unmatched == ("S01/V1/notes.txt",)
    assert shadowed_rules(rules) == []


_AGREEING: dict[str, RuleSet] = {}


def _agreeing_rules(factory: pytest.TempPathFactory) -> RuleSet:
    if "rules" not in _AGREEING:
        _AGREEING["rules"] = _ruleset(
            factory.mktemp("agreeing"),
            _body("{match: '*/*/qBOLD/**', resource: qBOLD}", "{match: '**/*.pdf', resource: docs}", when="{}"),
        )
    return _AGREEING["rules"]


@settings(max_examples=150, deadline=None)
@given(subject=_COMPONENT, session=_COMPONENT, tail=st.lists(_COMPONENT, min_size=1, max_size=3).map("/".join))
def test_files_get_the_labels_their_study_would_get(
    tmp_path_factory: pytest.TempPathFactory, subject: str, session: str, tail: str
) -> None:
    """files_only_decision and decide agree on the labels of the same folders, whatever they are called (or both
    hold them with code label); and a file is unmatched exactly when `attachable` says no rule takes it."""
    rules = _agreeing_rules(tmp_path_factory)
    relative = f"{subject}/{session}/{tail}"
    files = files_only_decision(rules, _files(relative))
    series = (SeriesFacts("1.2.3", 1, {"Modality": "MR"}, "1.2.840.10008.5.1.4.1.1.4"),)
    study = decide(rules, StudyFacts("1.2", series, None, None, "/srv/drop/results", (f"{subject}/{session}/1.dcm",)))
    if isinstance(study, Routed):
        assert isinstance(files, Routed)
        assert (files.project, files.subject, files.session) == (study.project, study.subject, study.session)
        labels = {"project": files.project, "subject": files.subject, "session": files.session}
        placement = place_files(rules.rules[0], [relative], labels)
        assert (relative in placement.unmatched) == (not attachable(rules, relative))
    else:
        assert isinstance(files, Held) and files.code == study.code == HoldCode.LABEL


def test_literal_entries(tmp_path: Path) -> None:
    rule = _rule(
        tmp_path,
        "{match: 'a/**', resource: qBOLD}",
        "{match: 'b/**', resource: 'r_{path[0]}'}",
        "{match: 'c/**', resource: raw, level: scan, scan: '7'}",
        "{match: 'd/**', resource: raw, level: scan, scan: '{path[1]}'}",
    )
    assert [entry.is_literal for entry in rule.attach] == [True, False, True, False]
