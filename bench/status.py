"""Benchmark the journal's readers at scale: the systemd STATUS line, `ingestd status --json`, the metrics' counts
and the deliverer's `routes()`, and what they cost a C-STORE commit running beside them.

Builds (once, then reused) a schema-4 journal of `--instances` instances by direct SQL inserts: batches of
`--per-batch` instances, nearly all delivered, a few routed, held and receiving; one receipt per instance; a route
and a finished delivery per routed or delivered batch. Then times each reader (median of `--repeats`), and the
latency of `--commits` commits of one instance and its receipt (as the spool makes them, on the writer's
connection, synchronous=FULL) while a thread builds the STATUS line in a loop.

Runs against whichever ingestd is on the path: this tree (the read model, `ingestd.status`) or an older one
without it (the STATUS line counted from `Journal.batches()` on the writer's connection, as `daemon.py` did):

    .venv/bin/python bench/status.py --dir /tmp/status-bench
    git archive main ingestd | tar -x -C /tmp/main-src
    PYTHONPATH=/tmp/main-src .venv/bin/python bench/status.py --dir /tmp/status-bench

On a shared 2-core machine, 1 M instances in 2,000 batches (medians, ms; before = main at 855866a):

    STATUS line                    417      -> 0.28   (GROUP BY state on its own read-only connection)
    status --json                  526      -> 570    (unchanged: it lists every batch; a separate process)
    metrics, first / next scrape   929/0.7  -> 920/0.8 (unchanged: already a read-only connection)
    the deliverer's routes()       8.9      -> 0.11   (only the routed batches' routes)
    a C-STORE commit, p50/p99/max  616/1543/2600 -> 1.9/9.1/32 while the STATUS line is built in a loop
                                   (alone: 0.7-1.0 / 6-8 / 7-18)
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ingestd
from ingestd.config import load_config
from ingestd.journal import Journal
from ingestd.metrics import JournalCollector
from ingestd.states import Step, StudyState

try:
    from ingestd.status import JournalStatus, status_data, status_line

    READ_MODEL = True
except ImportError:  # an ingestd from before the read model
    READ_MODEL = False

_CT = "1.2.840.10008.5.1.4.1.1.2"
_EXPLICIT = "1.2.840.10008.1.2.1"


def build(state_dir: Path, instances: int, per_batch: int) -> None:
    """A journal of `instances` instances, made by direct inserts (a minute at most for a million)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "journal.sqlite"
    if path.exists():
        return
    Journal(path).close()  # the schema, at this ingestd's version
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    batches = (instances + per_batch - 1) // per_batch
    now = time.time()

    def state(number: int) -> str:
        tail = batches - number
        if tail < 2:
            return StudyState.RECEIVING
        if tail < 5:
            return StudyState.HELD
        if tail < 25:
            return StudyState.ROUTED
        return StudyState.DELIVERED

    db.executemany(
        "INSERT INTO batches (id, study_uid, batch, state, source_kind, source, first_received, last_received,"
        " state_changed, reason, hold_code) VALUES (?, ?, 1, ?, 'dicom', 'CT1', ?, ?, ?, ?, ?)",
        (
            (
                b,
                f"1.2.3.{b}",
                state(b),
                now - batches + b,
                now - batches + b,
                now,
                "unrouted: no rule matched" if state(b) == StudyState.HELD else None,
                "unrouted" if state(b) == StudyState.HELD else None,
            )
            for b in range(1, batches + 1)
        ),
    )

    def rows() -> Iterator[tuple[Any, ...]]:
        for i in range(1, instances + 1):
            b = (i - 1) // per_batch + 1
            study, series, sop = f"1.2.3.{b}", f"1.2.3.{b}.1", f"1.2.3.{b}.1.{i}"
            yield (i, b, study, series, sop, _CT, _EXPLICIT, "CT", 1, 525_000, 1200, "dicom", "CT1", "", now,
                   f"{study}/1/{series}/{sop}.dcm", None)  # fmt: skip

    db.executemany(
        "INSERT INTO instances (id, batch_id, study_uid, series_uid, sop_uid, sop_class_uid, transfer_syntax, modality,"
        " series_number, size, data_offset, source_kind, source, source_detail, received_at, spool_path, data_sha256)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows(),
    )
    db.execute(
        "INSERT INTO receipts (batch_id, sop_uid, outcome, source_kind, source, size, at)"
        " SELECT batch_id, sop_uid, 'stored', source_kind, source, size, received_at FROM instances"
    )
    routed = (StudyState.ROUTED, StudyState.DELIVERED)
    db.execute(
        "INSERT INTO routes SELECT b.id, 'ct', 'v1', 'main', 'P', 'S-' || b.id, 'E-' || b.id, 1, NULL, b.study_uid,"
        " (SELECT count(*) FROM instances i WHERE i.batch_id = b.id), 0, ? FROM batches b WHERE b.state IN (?, ?)",
        (now, *routed),
    )
    db.execute(
        "INSERT INTO outgoing (batch_id, instance_id, series_uid, sop_uid, path, size, verified)"
        " SELECT i.batch_id, i.id, i.series_uid, i.sop_uid, 'outgoing/' || i.spool_path, i.size,"
        " CASE b.state WHEN ? THEN 'archive' END FROM instances i JOIN batches b ON b.id = i.batch_id"
        " WHERE b.state IN (?, ?)",
        (StudyState.DELIVERED, *routed),
    )
    db.execute(
        "INSERT INTO deliveries (batch_id, step, next_attempt_at, started_at, step_started_at, finished_at)"
        " SELECT id, CASE state WHEN ? THEN ? ELSE ? END, ?, ?, ?, ? FROM batches WHERE state IN (?, ?)",
        (StudyState.DELIVERED, Step.DONE, Step.VERIFY, now + 3600, now, now, now, *routed),
    )
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()


def timed(function: Callable[[], object], repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return {"median_ms": round(statistics.median(times) * 1000, 2), "max_ms": round(max(times) * 1000, 2)}


def commit_latency(journal: Journal, commits: int, reader: Callable[[], object] | None) -> dict[str, float]:
    """Commits of one instance and its receipt, as the spool makes them, with `reader` looping in a thread."""
    stop = threading.Event()
    loops = [0]

    def loop() -> None:
        while not stop.is_set() and reader is not None:
            reader()
            loops[0] += 1

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    time.sleep(0.2)
    latencies = []
    base = 10**9 + int(time.time() * 1000) % 10**6 * 1000
    try:
        for n in range(commits):
            started = time.perf_counter()
            with journal.transaction() as db:
                db.execute(
                    "INSERT INTO instances (batch_id, study_uid, series_uid, sop_uid, sop_class_uid, transfer_syntax,"
                    " modality, size, data_offset, source_kind, source, source_detail, received_at, spool_path)"
                    " VALUES (1, '9.9', '9.9.1', ?, ?, ?, 'CT', 1, 0, 'dicom', 'B', '', 0, ?)",
                    (f"9.9.1.{base + n}", _CT, _EXPLICIT, f"bench/{base + n}.dcm"),
                )
                db.execute(
                    "INSERT INTO receipts (batch_id, sop_uid, outcome, source_kind, source, size, at)"
                    " VALUES (1, ?, 'stored', 'dicom', 'B', 1, 0)",
                    (f"9.9.1.{base + n}",),
                )
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)  # C-STOREs arrive; they do not queue back to back
    finally:
        stop.set()
        thread.join()
    with journal.transaction() as db:
        db.execute("DELETE FROM receipts WHERE source = 'B'")
        db.execute("DELETE FROM instances WHERE source = 'B'")
    latencies.sort()
    return {
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2),
        "reader_loops": loops[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ingestd-status-bench"), help="state directory")
    parser.add_argument("--instances", type=int, default=1_000_000)
    parser.add_argument("--per-batch", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--json", type=Path, help="write the numbers to this file too")
    args = parser.parse_args()
    started = time.perf_counter()
    build(args.dir, args.instances, args.per_batch)
    print(f"journal: {args.dir / 'journal.sqlite'} ({args.instances} instances; ready in "
          f"{time.perf_counter() - started:.1f} s); ingestd from {Path(ingestd.__file__).parent}")  # fmt: skip
    config_file = args.dir / "ingestd.yaml"
    config_file.write_text(f"state_dir: {args.dir}\n", encoding="utf-8")
    config = load_config(config_file)
    journal = Journal(config.journal_path)  # the writer's connection, as the daemon holds it
    results: dict[str, Any] = {"read_model": READ_MODEL, "instances": args.instances}
    if READ_MODEL:
        status = JournalStatus(config.journal_path)

        def line() -> object:
            return status_line(status.state_counts())

        def as_json() -> object:
            return json.dumps(status_data(config, running=False))

        routed_routes: Callable[[], object] = lambda: journal.routes(StudyState.ROUTED)  # noqa: E731
    else:
        from ingestd.cli import _status_data  # type: ignore[attr-defined]  # noqa: PLC0415

        def line() -> object:  # daemon.py's _status_line before the read model
            counts: dict[str, int] = {}
            for batch in journal.batches():
                counts[batch.state] = counts.get(batch.state, 0) + 1
            return counts

        def as_json() -> object:
            return json.dumps(_status_data(config))

        routed_routes = journal.routes  # the deliverer read every route, each second
    collector = JournalCollector(config.journal_path, args.dir)
    results["status_line"] = timed(line, args.repeats)
    results["status_json"] = timed(as_json, max(1, args.repeats // 2))
    results["metrics_first_scrape"] = timed(lambda: list(collector.collect()), 1)
    results["metrics_scrape"] = timed(lambda: list(collector.collect()), args.repeats)
    results["deliverer_routes"] = timed(routed_routes, args.repeats)
    results["routes_all"] = timed(journal.routes, args.repeats)
    results["commit_alone"] = commit_latency(journal, args.commits, None)
    results["commit_beside_status_line"] = commit_latency(journal, args.commits, line)
    journal.close()
    for name, value in results.items():
        print(f"{name:28} {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
