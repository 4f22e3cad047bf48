"""The `ingestd` command: run, check-config, status."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ingestd import __version__
from ingestd.config import Config, load_config
from ingestd.errors import ConfigError, IngestdError
from ingestd.journal import Journal

__all__ = ["main"]

DEFAULT_CONFIG = Path("/etc/ingestd/ingestd.yaml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ingestd", description="DICOM ingestion daemon for research labs.")
    parser.add_argument("--version", action="version", version=f"ingestd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the daemon until SIGTERM or SIGINT")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})")

    check = commands.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("file", type=Path)

    status = commands.add_parser("status", help="list studies and quarantined items from the journal")
    status.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"configuration file ({DEFAULT_CONFIG})")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


def _cmd_run(config: Config) -> int:
    from ingestd.daemon import Daemon  # noqa: PLC0415 - keeps `status` and `check-config` light
    from ingestd.logs import configure_logging  # noqa: PLC0415

    configure_logging(config.logging.level, config.logging.format)
    Daemon(config).run()
    return 0


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _status_data(config: Config) -> dict[str, Any]:
    if not config.journal_path.exists():
        return {"studies": [], "quarantine": [], "journal": str(config.journal_path), "exists": False}
    journal = Journal(config.journal_path, read_only=True)
    try:
        now = time.time()
        studies = [
            {
                "study_uid": batch.study_uid,
                "batch": batch.batch,
                "state": batch.state,
                "series": batch.series,
                "instances": batch.instances,
                "bytes": batch.size,
                "source_kind": batch.source_kind,
                "source": batch.source,
                "first_received": batch.first_received,
                "last_received": batch.last_received,
                "age_seconds": round(now - batch.first_received, 1),
                "quiet_seconds": round(now - batch.last_received, 1),
                "reason": batch.reason,
            }
            for batch in journal.batches()
        ]
        quarantine = journal.quarantined()
    finally:
        journal.close()
    return {"studies": studies, "quarantine": quarantine, "journal": str(config.journal_path), "exists": True}


def _print_status(data: dict[str, Any]) -> None:
    studies, quarantine = data["studies"], data["quarantine"]
    if not data["exists"]:
        print(f"no journal yet at {data['journal']}: nothing received")
        return
    header = ("STATE", "SERIES", "INST", "SIZE", "SOURCE", "AGE", "QUIET", "STUDY", "REASON")
    rows = [
        (
            s["state"],
            str(s["series"]),
            str(s["instances"]),
            _size(s["bytes"]),
            f"{s['source_kind']}:{s['source']}",
            _age(s["age_seconds"]),
            _age(s["quiet_seconds"]),
            f"{s['study_uid']}#{s['batch']}",
            s["reason"] or "",
        )
        for s in studies
    ]
    print(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} (batches)")
    if rows:
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"\n{len(quarantine)} quarantined item{'s' if len(quarantine) != 1 else ''}")
    for item in quarantine:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item["at"]))
        print(f"  {when}  {item['path']}  ({item['source_kind']}:{item['source']}): {item['reason']}")


def main(argv: list[str] | None = None) -> int:
    """Run the `ingestd` command; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            config = load_config(args.file)
            print(f"{args.file}: OK (state_dir {config.state_dir})")
            return 0
        config = load_config(args.config)
        if args.command == "run":
            return _cmd_run(config)
        data = _status_data(config)
        if args.json:
            json.dump(data, sys.stdout, indent=2)
            print()
        else:
            _print_status(data)
        return 0
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    except IngestdError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
