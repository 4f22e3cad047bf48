"""Hostile rules input: what one backtracking pattern and one alias bomb cost, with Python's re and PyYAML as they
were and with ingestd's RE2 patterns and bounded YAML loader.

    .venv/bin/python bench/hostile_input.py [--json FILE]

1. Per-value match cost of typical rule patterns (`matches`), Python's `re.search` against `Regex.search`
   (RE2 through google-re2's Python wrapper), median of 5 runs of 20,000 searches each.
2. `^(a+)+$` against n `a`s and a `!`: Python's re for n = 16 to 24 (it doubles with every `a`; the issue's
   n = 40 would take about 2**16 times n = 24), RE2 for n = 40 and n = 1,000,000.
3. `ingestd check-rules` on a 9-by-9 alias bomb, in a child process: exit status, seconds, peak RSS.
   (Before the bounded loader it grew past 6.5 GB in 60 s without finishing.)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ingestd.patterns import compile_regex

TYPICAL = [
    (r"(?i)localizer|scout", ["t1_mprage_sag_p2_iso", "AAHead_Scout_64ch", "Localizer"]),
    (r"^RESEARCH", ["RESEARCH^STUDY_01", "CLINICAL BRAIN"]),
    (r"^\d{3}$", ["123", "4"]),
    (r"T1|T2", ["FLAIR_T2_axial", "dwi_b1000"]),
]


def _per_search_ns(search: Any, values: list[str], rounds: int = 20_000) -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter_ns()
        for index in range(rounds):
            search(values[index % len(values)])
        times.append((time.perf_counter_ns() - started) / rounds)
    return statistics.median(times)


def typical_patterns() -> list[dict[str, Any]]:
    rows = []
    for pattern, values in TYPICAL:
        python, ours = re.compile(pattern), compile_regex(pattern)
        rows.append(
            {
                "pattern": pattern,
                "re_ns": round(_per_search_ns(python.search, values)),
                "re2_ns": round(_per_search_ns(ours.search, values)),
            }
        )
    return rows


def catastrophic() -> dict[str, Any]:
    pattern = r"^(a+)+$"
    python: dict[int, float] = {}
    for n in (16, 18, 20, 22, 24):
        started = time.perf_counter()
        re.search(pattern, "a" * n + "!")
        python[n] = round(time.perf_counter() - started, 4)
    ours = compile_regex(pattern)
    re2: dict[int, float] = {}
    for n in (40, 1_000_000):
        started = time.perf_counter()
        ours.search("a" * n + "!")
        re2[n] = round(time.perf_counter() - started, 6)
    return {"re_seconds": python, "re2_seconds": re2}


def alias_bomb() -> dict[str, Any]:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    measured = (
        # VmHWM, not ru_maxrss: Linux carries the forking parent's peak over into the child's across exec.
        "import sys\nfrom ingestd.cli import main\nstatus = main(sys.argv[1:])\n"
        "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')), "
        "file=sys.stderr)\nsys.exit(status)\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        rules = Path(folder) / "bomb.rules.yaml"
        rules.write_text("rules: []\nbomb:\n" + "".join(f"  {line}\n" for line in lines))
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", measured, "check-rules", str(rules)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        seconds = time.perf_counter() - started
    *_, maxrss = result.stderr.splitlines()
    return {"exit": result.returncode, "seconds": round(seconds, 2), "peak_rss_mb": round(int(maxrss) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args()
    results = {"typical": typical_patterns(), "catastrophic": catastrophic(), "alias_bomb": alias_bomb()}
    for row in results["typical"]:
        print(f"{row['pattern']:<24} re {row['re_ns']:>6} ns/search   RE2 {row['re2_ns']:>6} ns/search")
    print("^(a+)+$, Python re:", ", ".join(f"n={n}: {s} s" for n, s in results["catastrophic"]["re_seconds"].items()))
    print("^(a+)+$, RE2:      ", ", ".join(f"n={n}: {s} s" for n, s in results["catastrophic"]["re2_seconds"].items()))
    bomb = results["alias_bomb"]
    print(
        f"check-rules on a 9x9 alias bomb: exit {bomb['exit']} in {bomb['seconds']} s, "
        f"peak RSS {bomb['peak_rss_mb']} MB"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
