"""Table E.1-1 package data: checked against dicom-anonymizer's 2026c lists, looked up, combined, regenerated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as oracle

from ingestd.deid.table import (
    BASIC_PROFILE_CODE,
    OPTION_CODES,
    OPTION_MEANINGS,
    SUPPORTED_OPTIONS,
    TableEntry,
    load_table,
)
from tests import deid_oracle

ROOT = Path(__file__).resolve().parents[1]


def oracle_entries() -> tuple[dict[int, str], dict[tuple[int, int], str]]:
    """dicom-anonymizer's 2026c lists (as tests/deid_oracle.py loads them): concrete tag -> code, and
    (value, mask) -> code for repeating groups."""
    groups = {
        ((((g << 16) | e) & ((gm << 16) | em)), (gm << 16) | em): code for g, e, gm, em, code in deid_oracle.MASKED
    }
    return dict(deid_oracle.SINGLE), groups


def test_oracle_has_655_entries() -> None:
    singles, groups = oracle_entries()
    assert len(oracle.ALL_TAGS) == 655
    assert (len(singles), len(groups)) == (652, 3)


def test_table_matches_the_oracle_exactly() -> None:
    singles, groups = oracle_entries()
    table = load_table("2026c")
    assert table.edition == "2026c"
    assert table.tags() == frozenset(singles)
    for tag, code in singles.items():
        entry = table.lookup(tag)
        assert entry is not None, f"{tag:08X}"
        assert entry.basic == code, f"{tag:08X}"
    assert {(value, mask): entry.basic for value, mask, entry in table.groups} == groups


def test_repeating_groups_by_mask() -> None:
    table = load_table()
    overlay_data = table.lookup(0x60003000)
    assert overlay_data is not None
    assert overlay_data.name == "Overlay Data"
    assert table.lookup(0x60023000) is overlay_data
    assert table.lookup(0x601E3000) is overlay_data
    comments = table.lookup(0x60024000)
    assert comments is not None
    assert comments.name == "Overlay Comments"
    assert table.lookup(0x60020000) is None  # group length of an overlay group: element 3000/4000 only
    assert table.lookup(0x60020010) is None  # Overlay Rows
    curve = table.lookup(0x50100112)  # curve groups match on any element
    assert curve is not None
    assert curve.name == "Curve Data"
    assert curve.options == {"clean-graphics": "C"}


def test_unlisted_and_private_tags() -> None:
    table = load_table()
    assert table.lookup(0x00280010) is None  # Rows
    assert table.lookup(0x00091010) is None  # private
    assert table.lookup(0x60013000) is None  # odd group: private, even though the 60xx mask would match
    assert all(not (tag >> 16) & 1 for tag in table.tags())
    assert table.private.basic == "X"
    assert table.private.options == {"retain-safe-private": "C"}


def test_option_columns() -> None:
    table = load_table()

    def entry(tag: int) -> TableEntry:
        found = table.lookup(tag)
        assert found is not None
        return found

    study_date = entry(0x00080020)
    assert study_date.options["retain-longitudinal-modified-dates"] == "C"
    assert study_date.options["retain-longitudinal-full-dates"] == "K"
    assert entry(0x00080080).options == {"retain-institution-identity": "K"}
    assert entry(0x0008103E).options == {"clean-descriptors": "C"}
    assert entry(0x0020000D).options == {"retain-uids": "K"}
    assert entry(0x00081120).options == {"retain-uids": "K"}  # Referenced Patient Sequence: K in 2024b
    assert entry(0x00100010).options == {}  # Patient's Name: no option keeps it
    for _, _, group in table.groups:
        assert set(group.options) <= SUPPORTED_OPTIONS
    for tag in table.tags():
        assert set(entry(tag).options) <= SUPPORTED_OPTIONS


def test_code_precedence() -> None:
    table = load_table()
    study_date = table.lookup(0x00080020)
    assert study_date is not None
    assert study_date.code(frozenset()) == "Z"
    assert study_date.code(frozenset({"clean-descriptors"})) == "Z"  # no entry in that column
    assert study_date.code(frozenset({"retain-longitudinal-modified-dates"})) == "C"
    both = frozenset({"retain-longitudinal-modified-dates", "retain-longitudinal-full-dates"})
    assert study_date.code(both) == "K"
    assert study_date.code(frozenset({"clean-pixel-data"})) == "Z"  # a pixel option has no column
    calibration = table.lookup(0x00181200)  # Date of Last Calibration: K under device identity, C under modified
    assert calibration is not None
    device = frozenset({"retain-device-identity"})
    assert calibration.code(device) == "K"
    assert calibration.code(device | {"retain-longitudinal-modified-dates"}) == "C"  # shifted with the others
    assert calibration.code(device | both) == "K"
    with pytest.raises(ValueError, match="retain-everything"):
        study_date.code(frozenset({"retain-everything"}))

    entry = TableEntry("t", "X", {"retain-uids": "X", "clean-descriptors": "C", "retain-device-identity": "K"})
    assert entry.code(frozenset({"retain-uids"})) == "X"  # an option overrides basic even when it removes
    assert entry.code(frozenset({"retain-uids", "clean-descriptors"})) == "C"
    assert entry.code(frozenset(SUPPORTED_OPTIONS)) == "K"
    assert TableEntry("t", "X/Z", {"retain-uids": "K"}).code(frozenset({"clean-graphics"})) == "X/Z"


def test_option_constants() -> None:
    assert len(SUPPORTED_OPTIONS) == 10
    assert set(OPTION_CODES) - SUPPORTED_OPTIONS == {"clean-pixel-data", "clean-recognizable-visual-features"}
    assert sorted(OPTION_MEANINGS) == sorted([BASIC_PROFILE_CODE, *OPTION_CODES.values()])
    assert OPTION_MEANINGS["113107"] == "Retain Longitudinal Temporal Information Modified Dates Option"


def test_load_table_is_cached_and_checks_the_edition() -> None:
    assert load_table() is load_table("2026c")
    with pytest.raises(ValueError, match="2026c"):
        load_table("2019a")


def test_generator_is_reproducible(tmp_path: Path) -> None:
    out = tmp_path / "e1_1.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "deid" / "generate_table.py"), "--output", str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.read_bytes() == (ROOT / "ingestd" / "deid" / "e1_1_2026c.json").read_bytes()
    assert "655 entries = 652 single tags + 3 masked groups" in result.stdout
    assert "innolitics rows not in 2026c (dropped): 0" in result.stdout
