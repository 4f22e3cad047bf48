"""What a lab admin watches: the metrics and /healthz after a real end-to-end run, and logs free of PHI.

One daemon (a real process, JSON logs at DEBUG) receives a study by C-STORE and another through the drop
folder, both with planted PHI in headers and the dropped one also in its folder and file names; a non-DICOM
file is quarantined and a calling AE off the allow-list is rejected. Both studies reach the XNAT stand-in.
Then the metrics must show exactly those counts, and no planted value nor original UID may appear anywhere in
the logs or in `ingestd status`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset

from ingestd.journal import Journal
from ingestd.journal import Source as JournalSource
from ingestd.logs import REDACTED, redact
from ingestd.metrics import JournalCollector
from ingestd.testing.xnat import FakeXnat
from tests.dicom import make_study, write_instances
from tests.procs import (
    SCANNER_RULES,
    DaemonProcess,
    Storescu,
    free_port,
    run_ingestd,
    wait_until,
    write_xnat_daemon_config,
)

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.slow]

# Values no log line may contain (compared case-insensitively), planted in headers and in dropped file names.
PLANTED = {
    "PatientName": "Quixote^Alonso",
    "PatientBirthDate": "19311107",
    "AccessionNumber": "ACC99173X",
    "InstitutionName": "Planted General Hospital",
    "ReferringPhysicianName": "Panza^Sancho",
    "StudyDescription": "Planted Knee Protocol",
    "OperatorsName": "Dulcinea^Toboso",
}
SCANNED_ID = "PHI7731XQ"
DROPPED_ID = "PHI8842ZR"
DROP_SUBFOLDER = "Quixote_Alonso_1931"


def _planted_study(patient_id: str, series: int, per_series: int) -> list[Dataset]:
    study = make_study(series=series, per_series=per_series)
    numbers = {uid: index + 1 for index, uid in enumerate(dict.fromkeys(ds.SeriesInstanceUID for ds in study))}
    for ds in study:
        ds.SeriesNumber = numbers[ds.SeriesInstanceUID]
        for keyword, value in PLANTED.items():
            setattr(ds, keyword, value)
        ds.PatientID = patient_id
    return study


def _config(tmp_path: Path, port: int, drop: Path, url: str, metrics_port: int) -> Path:
    dropped_rule = (
        "  - name: dropped\n"
        "    when: {drop_folder: drop}\n"
        "    route: {server: main, project: PROJ, subject: '{PatientID:hash8}', session: '{subject}_MR',"
        " archive: true}\n"
        "    anonymize: research\n"
    )
    config = write_xnat_daemon_config(
        tmp_path,
        port,
        url,
        rules=SCANNER_RULES + dropped_rule,
        extra=f"drop_folders: [{{path: {drop}, settle_seconds: 0.3}}]\n",
    )
    config.write_text(
        config.read_text()
        .replace("level: info", "level: debug")
        .replace("metrics: {port: 0}", f"metrics: {{port: {metrics_port}}}")
        .replace("processes: 1}", "processes: 2, allowed_calling_aets: [STORESCU, ECHOSCU]}")
    )
    return config


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - http://127.0.0.1 only
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _status(config: Path, *options: str) -> str:
    return run_ingestd("status", "--config", str(config), *options, check=True).stdout


def test_metrics_health_and_logs_without_phi(tmp_path: Path, xnat: FakeXnat) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    port = free_port()
    config = _config(tmp_path, port, drop, xnat.url, free_port())
    scanned = _planted_study(SCANNED_ID, series=2, per_series=4)
    dropped = _planted_study(DROPPED_ID, series=1, per_series=3)
    scan_files = write_instances(scanned, tmp_path / "scan")
    staging = write_instances(dropped, tmp_path / "staging")
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port, ae_title="INGESTD")
        metrics_port = int(daemon.wait_logged("metrics.started")["port"])
        base = f"http://127.0.0.1:{metrics_port}"
        wait_until(lambda: _get(f"{base}/healthz")[0] == 200, 10, message="/healthz ready")  # ready after start

        rejected = subprocess.run(
            ["echoscu", "-aet", "INTRUDER", "-aec", "INGESTD", "127.0.0.1", str(port)],
            capture_output=True,
            env={**os.environ, "TCP_NODELAY": "1"},
            timeout=30,
            check=False,
        )
        assert rejected.returncode != 0
        with Storescu(port, scan_files) as storescu:
            assert storescu.wait() == 0, storescu.output()
        target = drop / DROP_SUBFOLDER
        target.mkdir()
        for path in staging:
            os.replace(path, target / f"{DROP_SUBFOLDER}_{path.name}")
        (drop / f"{DROP_SUBFOLDER}_notes.txt").write_text(f"notes on {PLANTED['PatientName']}\n")

        def delivered() -> bool:
            status = json.loads(_status(config, "--json"))
            states = [study["state"] for study in status["studies"]]
            return len(states) == 2 and all(state == "delivered" for state in states)

        wait_until(delivered, 90, interval=0.3, message="both studies delivered")
        assert len(xnat.experiments("PROJ")) == 2

        code, health = _get(f"{base}/healthz")
        assert code == 200, health
        body = json.loads(health)
        assert body["live"] is True and body["ready"] is True and body["status"] == "ok"
        code, text = _get(f"{base}/metrics")
        assert code == 200
        samples = _samples(text)

        def value(name: str, **labels: str) -> float:
            return samples.get((name, tuple(sorted(labels.items()))), 0.0)

        folder = str(drop)
        assert value("ingestd_instances_received_total", kind="dicom", source="STORESCU", outcome="stored") == 8
        assert value("ingestd_instances_received_total", kind="folder", source=folder, outcome="stored") == 3
        assert value("ingestd_received_bytes_total", kind="folder", source=folder) > 0
        assert value("ingestd_drop_sources_total", folder=folder, outcome="taken") == 3
        assert value("ingestd_drop_sources_total", folder=folder, outcome="quarantined") == 1
        assert value("ingestd_quarantined_items_total", kind="folder") == 1
        assert value("ingestd_associations_total", outcome="rejected") == 1
        assert value("ingestd_associations_total", outcome="accepted") >= 1
        assert value("ingestd_associations_active") == 0
        assert value("ingestd_studies", state="delivered") == 2
        assert value("ingestd_studies", state="held") == 0
        assert value("ingestd_deliveries_total", outcome="delivered") == 2
        assert value("ingestd_stage_duration_seconds_count", stage="route") == 2
        assert value("ingestd_stage_duration_seconds_count", stage="archive") == 2
        assert value("ingestd_spool_free_bytes") > 0
        # `ingestd health`: the allow-list lacks INGESTD_HEALTH, so its C-ECHO comes from the first allowed title.
        health_check = subprocess.run(
            [sys.executable, "-m", "ingestd", "health", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert health_check.returncode == 0, health_check.stdout + health_check.stderr
        assert daemon.terminate() == 0

    logs = (tmp_path / "daemon.log").read_text(encoding="utf-8", errors="replace")
    assert '"receive.instance_stored"' in logs and '"deliver.archived"' in logs  # DEBUG lines were captured
    shown = "\n".join([logs, _status(config), _status(config, "--json")])
    forbidden = [*PLANTED.values(), SCANNED_ID, DROPPED_ID, DROP_SUBFOLDER, "Quixote", "Sancho", "Dulcinea"]
    forbidden += sorted({uid for ds in [*scanned, *dropped] for uid in _uids(ds)})
    leaked = [value for value in forbidden if value.lower() in shown.lower()]
    assert leaked == [], f"PHI in logs or status: {leaked}"


def _uids(ds: Dataset) -> list[str]:
    return [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]


def test_redaction_is_the_safety_net_for_library_messages() -> None:
    """Keys named like PHI attributes lose their values; UIDs and person names in any text are hidden."""
    event: dict[str, Any] = {
        "event": "association rejected for 1.2.826.0.1.3680043.8.498.77 (DOE^JOHN)",
        "patient_name": "DOE^JOHN",
        "PatientID": "X123",
        "sop_class": "1.2.840.10008.5.1.4.1.1.4",
        "exception": "Traceback ...\nValueError: bad value 'SMITH^ANNA^^DR' in 2.25.123456789012345678",
        "nested": {"AccessionNumber": "A1", "detail": ["x 1.2.3.4.5.6 y"]},
        "version": "1.8.10",
        "peer": "192.168.1.10",
    }
    out = redact(None, "warning", event)
    assert out["patient_name"] == REDACTED and out["PatientID"] == REDACTED
    assert out["nested"]["AccessionNumber"] == REDACTED
    text = json.dumps(out)
    for secret in ("DOE", "JOHN", "SMITH", "1.2.826.0.1.3680043.8.498.77", "2.25.123456789012345678", "1.2.3.4.5.6"):
        assert secret not in text
    assert out["sop_class"] == "1.2.840.10008.5.1.4.1.1.4"  # the standard's own UIDs stay readable
    assert out["version"] == "1.8.10" and out["peer"] == "192.168.1.10"
    assert "sha256:" in out["event"]


def test_receipts_are_counted_once_across_scrapes(tmp_path: Path) -> None:
    """Each scrape adds only the receipts after the last one it counted; the totals stay exact."""
    journal = Journal(tmp_path / "journal.sqlite")
    source = JournalSource("dicom", "CT1", "INGESTD@127.0.0.1")
    with journal.transaction() as tx:
        batch_id, _number = tx.receiving_batch("1.2.3.4", source, 0.0)
    collector = JournalCollector(journal.path, tmp_path)

    def received() -> dict[str, float]:
        families = {family.name: family for family in collector.collect()}
        return {sample.name: sample.value for sample in families["ingestd_instances_received"].samples} | {
            sample.name: sample.value for sample in families["ingestd_received_bytes"].samples
        }

    assert received() == {}
    with journal.transaction() as tx:
        for size in (100, 200):
            tx.add_receipt(batch_id, f"1.2.3.4.{size}", "stored", source, size, 0.0)
    assert received() == {"ingestd_instances_received_total": 2, "ingestd_received_bytes_total": 300}
    assert received() == {"ingestd_instances_received_total": 2, "ingestd_received_bytes_total": 300}
    with journal.transaction() as tx:
        tx.add_receipt(batch_id, "1.2.3.4.5", "stored", source, 50, 0.0)
    assert received() == {"ingestd_instances_received_total": 3, "ingestd_received_bytes_total": 350}
    journal.close()


_LIBRARIES = """
import logging, warnings
from ingestd.logs import configure_logging
configure_logging("debug", "json")
logging.getLogger("pynetdicom.assoc").warning("no context for 1.2.826.0.1.3680043.2.1.99 from DOE^JOHN")
logging.getLogger("pynetdicom.dsutils").debug("hidden below WARNING")
logging.getLogger("watchdog.observers.inotify").warning("inotify watch limit reached")
logging.getLogger("urllib3.connectionpool").info("Resetting dropped connection: xnat.example.org")
warnings.warn("bad value DOE^JANE in 1.2.826.0.1.3680043.2.1.98", UserWarning, stacklevel=1)
"""


def test_library_logs_and_warnings_come_out_as_redacted_json_lines() -> None:
    """pynetdicom, watchdog, urllib3 and Python warnings go through ingestd's pipeline and its redaction."""
    done = subprocess.run([sys.executable, "-c", _LIBRARIES], capture_output=True, text=True, timeout=60, check=True)
    records = [json.loads(line) for line in done.stderr.splitlines()]
    by_logger = {record["logger"]: record for record in records}
    assert set(by_logger) == {"pynetdicom.assoc", "watchdog.observers.inotify", "urllib3.connectionpool", "py.warnings"}
    assert all({"event", "level", "timestamp", "pid"} <= set(record) for record in records)
    assert "DOE" not in done.stderr and "1.2.826.0.1.3680043.2.1.9" not in done.stderr
    assert by_logger["pynetdicom.assoc"]["event"].startswith("no context for sha256:")
    assert by_logger["py.warnings"]["level"] == "warning"
