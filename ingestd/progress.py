"""`ingestd import`'s progress: what it counts, shown as plain lines (a log, a pipe) or as a bar on a terminal."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Never, TextIO

from tqdm import tqdm

from ingestd.states import StudyState

__all__ = ["PROGRESS_SECONDS", "Bar", "Counts", "Lines", "columns"]

PROGRESS_SECONDS = 2.0


@dataclass
class Counts:
    """How far an import is: what its progress shows and `import.finished` logs."""

    files: int = 0
    scanned: int = 0
    spooled: int = 0  # instances stored (or replaced) by this import
    known: int = 0  # instances the spool or the journal already had
    attached: int = 0  # files that are not DICOM kept for a rule's `attach:` (attachment sets)
    attached_known: int = 0  # of those: the same content at the same path of the same upload, kept before
    quarantined: int = 0  # files and archive members kept in quarantine
    already_quarantined: int = 0  # of those not taken: kept in quarantine by an earlier import (not copied again)
    unreadable: int = 0
    passed_over: int = 0  # hidden, partial, links
    studies: int = 0  # batches touched
    delivered: int = 0  # of those: delivered, now or before
    held: int = 0
    released: int = 0  # handed over to a person (`ingestd release`): not delivered, and ingestd will not deliver them
    delivering: bool = False  # everything is spooled; the studies are on their way

    def tally(self, states: Iterable[str | None]) -> bool:
        """Count the touched batches by state; say whether each one is finished (delivered, released or held)."""
        states = list(states)
        self.delivered = states.count(StudyState.DELIVERED)
        self.held = states.count(StudyState.HELD)
        self.released = states.count(StudyState.RELEASED)
        return self.delivered + self.held + self.released == len(states)

    @property
    def finished(self) -> int:
        """Studies that reached an end: delivered, held or released."""
        return self.delivered + self.held + self.released

    @property
    def succeeded(self) -> bool:
        """Whether the import did what it was asked: every study delivered (a released one was not), every file
        read. The exit status is 0 only then."""
        return not (self.held or self.released or self.unreadable)

    def line(self) -> str:
        known = f", {self.known} already known" if self.known else ""
        already = f", {self.already_quarantined} already quarantined" if self.already_quarantined else ""
        released = f", {self.released} released" if self.released else ""
        return (
            f"import: files {self.scanned}/{self.files} scanned, {self.spooled} instances spooled{known}, "
            f"{self.quarantined} quarantined{already}, studies {self.delivered}/{self.studies} delivered,"
            f" {self.held} held{released}"
        )


class Lines:
    """Progress as plain lines (not a terminal): printed when it changed, at most every two seconds, and at the end."""

    def __init__(self, out: TextIO, interval: float = PROGRESS_SECONDS) -> None:
        self.out = out
        self.interval = interval
        self._last = ""
        self._at = -interval

    def show(self, counts: Counts, *, final: bool = False) -> None:
        line = counts.line()
        now = time.monotonic()
        if line == self._last or (not final and now - self._at < self.interval):
            return
        print(line, file=self.out, flush=True)
        self._last, self._at = line, now

    def close(self, counts: Counts) -> None:
        self.show(counts, final=True)


class Bar:
    """Progress as a bar on a terminal: files while they are taken, then studies while they are delivered."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._bar: tqdm[Never] | None = None
        self._delivering = False

    def show(self, counts: Counts, *, final: bool = False) -> None:
        bar = self._bar
        if bar is None or self._delivering != counts.delivering:
            if bar is not None:
                bar.close()
            self._delivering = counts.delivering
            total, what, unit = (
                (counts.studies, "studies", "study") if counts.delivering else (counts.files, "files", "file")
            )
            # A terminal that does not say its size (0 columns) would get no bar at all: draw one 80 wide there.
            width = {"dynamic_ncols": True} if columns(self.out) else {"ncols": 80, "nrows": 24}
            bar = self._bar = tqdm(total=total, desc=what, unit=unit, file=self.out, **width)
        if counts.delivering:
            done, postfix = counts.finished, f"{counts.delivered} delivered, {counts.held} held"
            postfix += f", {counts.released} released" if counts.released else ""
        else:
            done = counts.scanned
            postfix = f"{counts.spooled} instances spooled, {counts.known} known, {counts.quarantined} quarantined"
        bar.set_postfix_str(postfix, refresh=False)
        bar.update(done - bar.n)
        if final:
            bar.refresh()

    def close(self, counts: Counts) -> None:
        self.show(counts, final=True)
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def columns(out: TextIO) -> int:
    """The width of the terminal `out` is on; 0 when it does not say."""
    try:
        return os.get_terminal_size(out.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0
