"""Benchmark attaching files: seconds from a drop to a verified XNAT resource, and requests per attachment set.

Starts the XNAT stand-in (`FakeXnat`) in this process and `ingestd run` (this working tree) as a subprocess with a
drop folder and a rule that attaches `*/*/qBOLD/**` to the session named by the folders. First a small DICOM study
is dropped as `<subject>/<session>/dicom/` and delivered (archived), so the session exists. Then, for each
repetition, a results tree of `--files` files totalling `--mb` MB (`<subject>/<session>/qBOLD/NNN/file-NNNN.bin`,
random bytes: nothing compresses) is moved into the drop folder at once, and the clock runs until the journal says
the attachment set is delivered: taken from the drop folder, spooled (fsync'd), routed, zipped, uploaded and
verified in XNAT's listing by name, size and MD5. The requests the daemon made to the stand-in meanwhile are
counted from its request log. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this working tree's ingestd

from ingestd.testing.xnat import FakeXnat  # noqa: E402
from tests.dicom import make_study, write_instances  # noqa: E402
from tests.procs import free_port  # noqa: E402

USER, PASSWORD = "bench", "bench-password-not-a-secret"  # the stand-in's made-up account


def _config(work: Path, url: str, drop: Path, port: int) -> Path:
    rules = work / "bench.rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - name: results\n"
        f"    when: {{drop_folder: {drop}}}\n"
        "    route: {server: main, project: BENCH, subject: '{path[0]}', session: '{path[1]}', archive: true}\n"
        "    attach:\n"
        "      - {match: '*/*/qBOLD/**', resource: qBOLD}\n"
    )
    config = work / "ingestd.yaml"
    config.write_text(
        f"state_dir: {work / 'state'}\n"
        f"listener: {{host: 127.0.0.1, port: {port}, ae_title: INGESTD}}\n"
        "study_idle_seconds: 1\n"
        "spool: {min_free_mb: 10}\n"
        "logging: {level: info, format: json}\n"
        "metrics: {port: 0}\n"
        f"drop_folders: [{{path: {drop}, settle_seconds: 0.5}}]\n"
        "rules: [bench.rules.yaml]\n"
        "xnat:\n  servers:\n    main:\n"
        f"      url: {url}\n"
        "      credentials: {env_username: BENCH_USER, env_password: BENCH_PASSWORD}\n"
        "      poll_interval_seconds: 0.2\n"
    )
    return config


def _sets(journal: Path) -> list[tuple[int, str]]:
    if not journal.exists():
        return []
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return [(int(r[0]), str(r[1])) for r in db.execute("SELECT id, state FROM batches WHERE kind = 'files'")]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def _delivered(journal: Path, kind: str) -> int:
    if not journal.exists():
        return 0
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        query = "SELECT count(*) FROM batches WHERE kind = ? AND state = 'delivered'"
        return int(db.execute(query, (kind,)).fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _results(staging: Path, subject: str, session: str, files: int, total: int) -> Path:
    base = staging / subject
    size = total // files
    for index in range(files):
        path = base / session / "qBOLD" / f"{index // 100:03d}" / f"file-{index:04d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(secrets.token_bytes(size))
    return base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ingestd-bench-attach-") as scratch, FakeXnat(version="1.8.10") as xnat:
        work = Path(scratch)
        xnat.add_user(USER, PASSWORD)
        xnat.add_project("BENCH", members=[USER])
        drop, staging = work / "drop", work / "staging"
        drop.mkdir()
        port = free_port()
        config = _config(work, xnat.url, drop, port)
        journal = work / "state" / "journal.sqlite"
        env = {**os.environ, "BENCH_USER": USER, "BENCH_PASSWORD": PASSWORD, "PYTHONPATH": str(REPO)}
        log = (work / "daemon.log").open("w")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "ingestd", "run", "--config", str(config)], env=env, stdout=log, stderr=log
        )
        try:
            for repeat in range(args.repeats):
                subject, session = f"SUB{repeat:02d}", f"SES{repeat:02d}"
                write_instances(make_study(series=1, per_series=2), staging / subject / session / "dicom")
                (staging / subject).rename(drop / subject)
                _wait(lambda r=repeat: _delivered(journal, "dicom") == r + 1, 120, "the DICOM session")
                tree = _results(staging, subject, session, args.files, int(args.mb * 1e6))
                seen = len(xnat.requests_log)
                started = time.monotonic()
                tree.rename(drop / subject)
                _wait(lambda r=repeat: _delivered(journal, "files") == r + 1, 1800, "the attachment set")
                seconds = time.monotonic() - started
                made = xnat.requests_log[seen:]
                runs.append(
                    {
                        "files": args.files,
                        "mb": args.mb,
                        "seconds": round(seconds, 2),
                        "requests": len(made),
                        "by_kind": {
                            kind: sum(1 for method, path, _ in made if (method, "/resources/" in path) == key)
                            for kind, key in (("resource PUT", ("PUT", True)), ("resource GET", ("GET", True)))
                        },
                    }
                )
                print(json.dumps(runs[-1]), flush=True)
        finally:
            daemon.terminate()
            daemon.wait(60)
            log.close()
    seconds = [run["seconds"] for run in runs]
    print(
        f"{args.files} files, {args.mb:g} MB: drop -> verified resource median {statistics.median(seconds):.1f} s"
        f" (min {min(seconds):.1f}, max {max(seconds):.1f}); requests per set: {runs[-1]['requests']}"
    )
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
