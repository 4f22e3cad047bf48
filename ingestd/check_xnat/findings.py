"""The result of `ingestd check-xnat`: one `Finding` per check, the exit status they make, and their text lines."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, NamedTuple

Level = Literal["ok", "warning", "error"]


class Finding(NamedTuple):
    """One check's result: `level` ok/warning/error, what was checked (`server`, `server/PROJECT`), what was found,
    and what to do about it ('' when nothing)."""

    level: Level
    subject: str
    message: str
    advice: str = ""

    def as_dict(self) -> dict[str, str]:
        return self._asdict()


def exit_status(findings: list[Finding]) -> int:
    """0 when every finding is ok, 1 with a warning (and no error), 2 with an error."""
    levels = {finding.level for finding in findings}
    return 2 if "error" in levels else 1 if "warning" in levels else 0


def iter_lines(findings: list[Finding]) -> Iterator[str]:
    """One line per finding: level, what, what was found, and what to do."""
    for finding in findings:
        line = f"{finding.level:<7} {finding.subject}: {finding.message}"
        if finding.advice:
            line += f" -> {finding.advice}"
        yield line
