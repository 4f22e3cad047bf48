"""`ingestd purge`: what retention would remove now (`--dry-run`), or remove it by hand when no daemon runs (the
daemon's retention worker does it every `retention.check_interval_seconds`).

Batches are named by id and quarantined items by their name in the quarantine folder (a time and a random part,
never the original name): nothing here shows patient data.
"""

from __future__ import annotations

import sys
from typing import TextIO

from ingestd.config import Config, Retention
from ingestd.journal import Journal
from ingestd.retention import KINDS, Outcome, preview, purge
from ingestd.statedir import StateDirLockedError, lock_state_dir

__all__ = ["format_outcome", "run_purge"]

_SHOWN = 20  # items named per kind; the rest are counted
_NOUNS = {
    "delivered": ("delivered batch", "delivered batches"),
    "released": ("released batch", "released batches"),
    "quarantine": ("quarantined item", "quarantined items"),
    "receipts": ("receipt row", "receipt rows"),
    "outgoing": ("outgoing row", "outgoing rows"),
}


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _days(days: float | None) -> str:
    return "kept for ever" if days is None else f"after {days:g} days"


def _settings(retention: Retention) -> str:
    return (
        f"delivered copies {_days(retention.delivered_days)}, released batches {_days(retention.released_days)}, "
        f"quarantine {_days(retention.quarantine_days)}, receipts {_days(retention.receipts_days)}"
    )


def format_outcome(outcome: Outcome, retention: Retention, *, done: bool) -> list[str]:
    """The lines `ingestd purge` prints: one per kind with its count and bytes, and the items by id or name."""
    lines = [f"{'removed' if done else 'would remove'} ({_settings(retention)}):"]
    for kind in KINDS:
        count, size = outcome.purged[kind]
        singular, plural = _NOUNS[kind]
        noun = singular if count == 1 else plural
        shown = ", ".join(outcome.items[kind][:_SHOWN])
        more = len(outcome.items[kind]) - _SHOWN
        shown += f" and {more} more" if more > 0 else ""
        line = f"  {count} {noun}" + (f", {_size(size)}" if kind not in ("receipts", "outgoing") else "")
        lines.append(line + (f": {shown}" if shown else ""))
    lines.extend(
        f"  not removed: {failure.item} ({failure.kind}): {failure.error}; tried again next time"
        for failure in outcome.failures
    )
    return lines


def run_purge(
    config: Config,
    *,
    dry_run: bool,
    running: bool,
    out: TextIO | None = None,
    now: float | None = None,
) -> int:
    """`ingestd purge [--dry-run]`; `running`: whether a daemon holds the state directory. Returns the exit status:
    0, or 1 when a daemon runs (it removes these itself) or something could not be removed."""
    out = out or sys.stdout
    every = f"{config.retention.check_interval_seconds:g} s"
    if dry_run:
        outcome = preview(config, now)
        for line in format_outcome(outcome, config.retention, done=False):
            print(line, file=out)
        if running:
            print(f"a daemon runs on {config.state_dir}: it removes these itself every {every}", file=out)
        return 0
    if running:
        print(
            f"ingestd: a daemon runs on {config.state_dir} and removes these itself every {every}"
            " (retention.check_interval_seconds); `ingestd purge --dry-run` shows what it would remove now",
            file=sys.stderr,
        )
        return 1
    if not config.journal_path.exists():
        print(f"nothing to remove: no journal at {config.journal_path}", file=out)
        return 0
    try:
        lock = lock_state_dir(config.state_dir)
    except StateDirLockedError as exc:  # a daemon started meanwhile
        print(f"ingestd: {exc}; it removes these itself every {every}", file=sys.stderr)
        return 1
    try:
        journal = Journal(config.journal_path)
        try:
            outcome = purge(config, journal, now)
        finally:
            journal.close()
    finally:
        lock.close()
    for line in format_outcome(outcome, config.retention, done=True):
        print(line, file=out)
    return 1 if outcome.failures else 0
