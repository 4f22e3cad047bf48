"""Benchmark the whole pipeline: from the last instance received to the study archived in XNAT, by stage.

Starts the XNAT stand-in (in this process) and `ingestd run` (a subprocess, JSON logs), sends a generated study
with DCMTK `storescu`, waits until `ingestd status` says delivered, and reads the stages from the daemon's log:
route + de-identify, zip, upload (import), build wait and the look before archiving, archive, verify. It counts
the requests the daemon made to XNAT for the study (the stand-in's log, before the curl upload). The idle time
that makes a study complete (`study_idle_seconds`) is reported but excluded from the total. Then posts the same
zip with `curl` to the same stand-in (the upload limit) and reads the daemon's peak RSS. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gen_study import generate  # noqa: E402
from ingestd.testing.xnat import FakeXnat  # noqa: E402

RULES = """\
profiles:
  bench: {key: {env: INGESTD_BENCH_KEY}, options: [retain-longitudinal-modified-dates, clean-descriptors]}
rules:
  - name: bench
    when: {calling_aet: BENCHSCU}
    route: {server: main, project: BENCH, subject: "{PatientID:hash8}", session: "{subject}_S", archive: true}
    anonymize: bench
"""


def _config(work: Path, port: int, url: str, idle: float, compression: str) -> Path:
    (work / "bench.rules.yaml").write_text(RULES)
    path = work / "ingestd.yaml"
    path.write_text(
        f"state_dir: {work / 'state'}\n"
        f"listener: {{host: 127.0.0.1, port: {port}, ae_title: INGESTD}}\n"
        "spool: {min_free_mb: 100}\n"
        f"study_idle_seconds: {idle}\n"
        "rules: [bench.rules.yaml]\n"
        f"delivery: {{compression: {compression}, keep_after_delivery: true}}\n"
        "logging: {level: info, format: json}\n"
        "xnat:\n  servers:\n    main:\n"
        f"      url: {url}\n"
        "      credentials: {env_username: BENCH_XNAT_USER, env_password: BENCH_XNAT_PASSWORD}\n"
        "      poll_interval_seconds: 0.1\n"
    )
    return path


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _status(config: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "ingestd", "status", "--config", str(config), "--json"],
        capture_output=True, text=True, check=True, env=os.environ | {"PYTHONPATH": str(ROOT)},
    ).stdout  # fmt: skip
    return dict(json.loads(out))


def _peak_rss_mib(pid: int) -> float:
    total = 0
    for entry in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _events(log: Path) -> list[dict[str, Any]]:
    events = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            record["at"] = datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00")).timestamp()
            events.append(record)
    return events


def run_once(work: Path, files: list[Path], compression: str, idle: float) -> dict[str, Any]:
    """One delivery of the study; the stage times in seconds."""
    password = secrets.token_urlsafe(12)
    env = os.environ | {
        "PYTHONPATH": str(ROOT), "TCP_NODELAY": "1", "INGESTD_BENCH_KEY": secrets.token_hex(32),
        "BENCH_XNAT_USER": "bench", "BENCH_XNAT_PASSWORD": password,
    }  # fmt: skip
    os.environ.update({k: v for k, v in env.items() if k.startswith(("BENCH_", "INGESTD_BENCH"))})
    with FakeXnat(version="1.8.10") as xnat:
        xnat.add_user("bench", password)
        xnat.add_project("BENCH", members=["bench"])
        port = _free_port()
        config = _config(work, port, xnat.url, idle, compression)
        log = work / "daemon.log"
        with log.open("w") as sink:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "ingestd", "run", "--config", str(config)], stdout=sink, stderr=sink, env=env
            )
        try:
            deadline = time.monotonic() + 30
            while subprocess.run(["echoscu", "-aec", "INGESTD", "127.0.0.1", str(port)], env=env,
                                 capture_output=True, check=False).returncode != 0:  # fmt: skip
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError(log.read_text()[-2000:])
                time.sleep(0.2)
            sent_started = time.time()
            subprocess.run(
                ["storescu", "-aet", "BENCHSCU", "-aec", "INGESTD", "127.0.0.1", str(port), *map(str, files)],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            last_acknowledged = time.time()
            while True:
                studies = _status(config)["studies"]
                if studies and studies[0]["state"] in ("delivered", "held"):
                    break
                time.sleep(0.2)
            delivered = time.time()
            rss = _peak_rss_mib(daemon.pid)
            calls = [(method, path.split("?", 1)[0]) for method, path, _status in xnat.requests_log]
            if studies[0]["state"] == "held":
                raise RuntimeError(f"held: {studies[0]['reason']}")
        finally:
            daemon.terminate()
            daemon.wait(60)
        events = _events(log)

        def at(event: str, **match: Any) -> dict[str, Any]:
            return next(e for e in events if e["event"] == event and all(e.get(k) == v for k, v in match.items()))

        complete = at("assemble.study_complete")["at"]
        routed = at("route.routed")
        packaged = at("deliver.packaged")
        imported = at("deliver.imported")
        archived = at("deliver.archived")
        done = at("deliver.delivered")
        zip_path = work / "state" / "packages" / "1.zip"
        zip_mb = zip_path.stat().st_size / 1e6
        curl_started = time.monotonic()
        subprocess.run(
            ["curl", "-sS", "-f", "-o", "/dev/null", "-u", f"bench:{password}", "-H", "Content-Type: application/zip",
             "-X", "POST", "--upload-file", str(zip_path),  # streamed: --data-binary @file reads it all into memory
             f"{xnat.url}/data/services/import?import-handler=DICOM-zip&PROJECT_ID=BENCH&SUBJECT_ID=curl&EXPT_LABEL=curl"],
            check=True,
        )  # fmt: skip
        curl_seconds = time.monotonic() - curl_started
    stages = {
        "receive (storescu)": last_acknowledged - sent_started,
        "idle wait (excluded)": complete - last_acknowledged,
        "route + de-identify": routed["seconds"],
        "zip": packaged["seconds"],
        "upload (import)": imported["seconds"],
        "build wait + verify": archived["at"] - archived["seconds"] - imported["at"],
        "archive": archived["seconds"],
        "verify + cleanup": done["at"] - archived["at"],
    }
    stages["total after idle"] = delivered - complete
    return {
        "stages": stages,
        "xnat_requests": len(calls),
        "xnat_gets": sum(1 for method, _path in calls if method == "GET"),
        "zip_mb": zip_mb,
        "upload_mb_s": zip_mb / imported["seconds"],
        "curl_mb_s": zip_mb / curl_seconds,
        "peak_rss_mib": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mr", type=int, default=500, help="MR instances, 256x256x16 bit (default 500)")
    parser.add_argument("--ct", type=int, default=0, help="CT instances, 512x512x16 bit (default 0)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compression", default="stored", choices=["stored", "deflated"])
    parser.add_argument("--idle", type=float, default=2.0, help="study_idle_seconds (excluded from the total)")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="ingestd-pipeline-"))
    files = generate(root / "study", args.mr, args.ct)
    runs = []
    try:
        for repeat in range(args.repeats):
            work = root / f"run{repeat}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            result = run_once(work, files, args.compression, args.idle)
            runs.append(result)
            print(f"run {repeat + 1}: total after idle {result['stages']['total after idle']:.2f} s")
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.mr} MR + {args.ct} CT instances, {args.compression} zip of {runs[0]['zip_mb']:.0f} MB")
    print(f"{'stage':<24}{'median s':>10}{'min':>8}{'max':>8}")
    for stage in runs[0]["stages"]:
        values = sorted(run["stages"][stage] for run in runs)
        print(f"{stage:<24}{values[len(values) // 2]:>10.2f}{values[0]:>8.2f}{values[-1]:>8.2f}")
    for key, label in (("upload_mb_s", "upload MB/s (ingestd)"), ("curl_mb_s", "upload MB/s (curl)"),
                       ("peak_rss_mib", "daemon peak RSS MiB"), ("xnat_requests", "XNAT requests"),
                       ("xnat_gets", "XNAT GET requests")):  # fmt: skip
        values = sorted(run[key] for run in runs)
        print(f"{label:<24}{values[len(values) // 2]:>10.1f}{values[0]:>8.1f}{values[-1]:>8.1f}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
