"""Helpers of the attachment intake tests: rules whose `attach:` globs say what is attached, and what was kept."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from ingestd.rules.attachment import Attach
from ingestd.rules.conditions import glob_pattern
from ingestd.rules.labels import parse_template
from ingestd.rules.load import load_rules
from ingestd.rules.match import RuleSet
from tests.procs import journal_rows

RULE = """
rules:
  - name: lab
    when: {drop_folder: tree}
    route: {server: main, project: PROJ, subject: '{path[0]}', session: '{path[1]}'}
"""


def attach_rules(folder: Path, *globs: str) -> RuleSet:
    """One rule (written to `folder`, loaded as a rules file is) with an `attach:` entry per glob."""
    path = folder / "attach.rules.yaml"
    path.write_text(RULE)
    rules = load_rules([path])
    entries = tuple(
        Attach(glob_pattern(glob), glob, parse_template("files", ("path",)), "session", None, index)
        for index, glob in enumerate(globs)
    )
    return dataclasses.replace(rules, rules=(dataclasses.replace(rules.rules[0], attach=entries),))


@dataclasses.dataclass(frozen=True, slots=True)
class Kept:
    """One `attached_files` row, with its set's state and kind."""

    relative: str
    source_detail: str
    upload: str
    size: int
    sha256: str
    md5: str
    spool_path: str
    batch_id: int
    state: str
    kind: str


def kept_files(journal: Path) -> dict[str, Kept]:
    """Every journaled attachment by its `relative`."""
    rows = journal_rows(
        journal,
        "SELECT f.relative, f.source_detail, f.upload, f.size, f.sha256, f.md5, f.spool_path, f.batch_id, b.state,"
        " b.kind FROM attached_files f JOIN batches b ON b.id = f.batch_id ORDER BY f.relative",
    )
    return {row[0]: Kept(*row) for row in rows}


def digests(data: bytes) -> tuple[str, str]:
    """(SHA-256, MD5) of `data`, hex."""
    return hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()  # noqa: S324 - what XNAT lists


def spool_files(state_dir: Path) -> set[str]:
    """Every file under `attachments/` (temp files included), as `attachments/...` paths."""
    root = state_dir / "attachments"
    files = [path for path in root.rglob("*") if path.is_file() and path.name != ".lock"]
    return {f"attachments/{path.relative_to(root).as_posix()}" for path in files}


def instance_uploads(journal: Path) -> dict[str, Any]:
    """SOP Instance UID -> the upload its instance came in."""
    return dict(journal_rows(journal, "SELECT sop_uid, upload FROM instances"))
