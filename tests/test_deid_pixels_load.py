"""A profile's `pixels:` section: compiled into regions, and every mistake reported with its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingestd.deid.profile import Rectangle
from ingestd.errors import ConfigError
from ingestd.rules import load_rules

KEY = "0123456789abcdef" * 4
RULE = """\
rules:
  - name: all
    when: {}
    route: {server: main, project: PROJA, subject: "{PatientID:hash8}", session: "{subject}_{StudyDate:hash6}"}
    anonymize: us
"""


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_A", KEY)


def _profile(pixels: str) -> str:
    return "profiles:\n  us:\n    key: {env: KEY_A}\n" + pixels + RULE


def _problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "r.rules.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_rules([path])
    return caught.value.problems


def test_pixels_compile(tmp_path: Path) -> None:
    """Both rectangle spellings, exact values, `in`, `matches`, SOP class keywords and the size limit."""
    text = _profile(
        "    pixels:\n"
        "      burned_in: clean\n"
        "      max_decoded_mb: 200\n"
        "      compress: rle\n"
        "      regions:\n"
        "        - name: sono-9\n"
        "          when:\n"
        "            Manufacturer: Acme Imaging\n"
        "            ManufacturerModelName: {matches: '^Sono'}\n"
        "            sop_class: {in: [UltrasoundImageStorage, 1.2.840.10008.5.1.4.1.1.3.1]}\n"
        "            Rows: 600\n"
        "            Columns: 800\n"
        "          rectangles:\n"
        "            - [0, 0, 800, 40]\n"
        "            - {x: 600, y: 560, width: 200, height: 40}\n"
        "        - name: any-sc\n"
        "          when: {Modality: {in: [SC, OT]}}\n"
        "          rectangles: [[0, 0, 10, 10]]\n"
    )
    path = tmp_path / "r.rules.yaml"
    path.write_text(text)
    profile = load_rules([path]).profiles["us"]
    assert profile.burned_in == "clean"
    assert profile.max_decoded_bytes == 200 << 20
    assert profile.compress == "rle"
    first, second = profile.regions
    assert first.name == "sono-9"
    assert first.rectangles == (Rectangle(0, 0, 800, 40), Rectangle(600, 560, 200, 40))
    tests = {test.keyword: test for test in first.when}
    assert tests["Manufacturer"].values == {"Acme Imaging"}
    assert tests["ManufacturerModelName"].pattern is not None
    assert tests["SOPClassUID"].values == {"1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1"}
    assert tests["Rows"].values == {"600"}
    assert second.when[0].values == {"SC", "OT"}


def test_default_is_hold_and_the_old_key_still_works(tmp_path: Path) -> None:
    path = tmp_path / "r.rules.yaml"
    path.write_text(_profile("    burned_in: trust-header\n"))
    profile = load_rules([path]).profiles["us"]
    assert (profile.burned_in, profile.regions, profile.compress) == ("trust-header", (), "none")


@pytest.mark.parametrize(
    ("pixels", "line", "says"),
    [
        ("    pixels: {burned_in: clean}\n", 4, "burned_in: clean needs at least one entry under regions"),
        (
            "    pixels:\n      burned_in: hold\n      regions:\n        - {name: a, when: {Modality: US}, "
            "rectangles: [[0, 0, 1, 1]]}\n",
            4,
            "regions are used only with burned_in: clean",
        ),
        (
            "    burned_in: hold\n    pixels:\n      burned_in: clean\n      regions:\n"
            "        - {name: a, when: {Modality: US}, rectangles: [[0, 0, 1, 1]]}\n",
            2,
            "burned_in is given twice",
        ),
        (
            "    pixels:\n      burned_in: clean\n      regions:\n"
            "        - name: a\n          when: {Rows: 100, Columns: 200}\n"
            "          rectangles:\n            - [150, 0, 60, 10]\n",
            7,
            "rectangle 0 ends at x = 210, beyond Columns 200",
        ),
        (
            "    pixels:\n      burned_in: clean\n      regions:\n"
            "        - name: a\n          when: {Rows: 100}\n          rectangles: [[0, 90, 10, 20]]\n",
            7,
            "rectangle 0 ends at y = 110, beyond Rows 100",
        ),
        (
            "    pixels:\n      burned_in: clean\n      regions:\n"
            "        - name: a\n          when: {PatientName: X}\n          rectangles: [[0, 0, 1, 1]]\n",
            8,
            "a region cannot look at 'PatientName'",
        ),
        (
            "    pixels:\n      burned_in: clean\n      regions:\n"
            "        - name: a\n          when: {}\n          rectangles: [[0, 0, 1, 1]]\n",
            8,
            "when is a mapping of conditions",
        ),
        (
            "    pixels:\n      burned_in: clean\n      regions:\n"
            "        - name: a\n          when: {Modality: US}\n          rectangles: [[0, 0, 1]]\n",
            9,
            "a rectangle is [x, y, width, height]",
        ),
        (
            "    pixels:\n      burned_in: clean\n      regions:\n"
            "        - name: a\n          when: {ManufacturerModelName: {matches: '(a)\\1'}}\n"
            "          rectangles: [[0, 0, 1, 1]]\n",
            8,
            "backreference",
        ),
        (
            "    pixels:\n      burned_in: clean\n      regions:\n"
            "        - name: a\n          when: {sop_class: UltrasoundImageStorge}\n"
            "          rectangles: [[0, 0, 1, 1]]\n",
            7,
            "neither a UID nor a SOP class keyword",
        ),
        (
            "    pixels:\n      burned_in: clean\n      regions:\n"
            "        - {name: a, when: {Modality: US}, rectangles: [[0, 0, 1, 1]]}\n"
            "        - {name: a, when: {Modality: SC}, rectangles: [[0, 0, 1, 1]]}\n",
            4,
            "a is used twice",
        ),
        ("    pixels: {burned_in: scrub}\n", 4, "burned_in"),
        ("    pixels: {burned_in: hold, compress: jpeg}\n", 4, "compress"),
        ("    pixels: {burned_in: trust-header, compress: rle}\n", 4, "compress is used only with burned_in: clean"),
    ],
)
def test_mistakes_name_file_and_line(tmp_path: Path, pixels: str, line: int, says: str) -> None:
    problems = _problems(tmp_path, _profile(pixels))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{tmp_path / 'r.rules.yaml'}:{line}: profiles.us"), problems
    assert says in problems[0]
