"""An old release's state directory: its journal is migrated at start-up and the daemon delivers what it held."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from ingestd.journal import SCHEMA_VERSION
from ingestd.testing.xnat import FakeXnat
from tests.procs import DaemonProcess, free_port, wait_until, write_xnat_daemon_config

pytestmark = [pytest.mark.slow]

STATE_V3 = Path(__file__).parent / "data" / "state-v3"  # made by tests/data/make_state_v3.py
# The rules the old release routed its first study with (tests/data/make_state_v3.py): the others are routed now.
RULES = (
    "rules:\n"
    "  - name: scanner\n"
    "    when: {calling_aet: STORESCU}\n"
    "    route: {server: main, project: PROJ, subject: OLD, session: 'OLD_{SeriesNumber}', archive: true}\n"
)


def _journal_rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_a_schema_3_state_directory_is_migrated_and_delivered(tmp_path: Path, xnat: FakeXnat) -> None:
    """Studies left routed, complete and receiving by the schema-3 release all reach XNAT, checked by SOP UID."""
    port = free_port()
    config = write_xnat_daemon_config(tmp_path, port, xnat.url, rules=RULES)
    state = tmp_path / "state"
    shutil.copytree(STATE_V3 / "spool", state / "spool")
    db = sqlite3.connect(state / "journal.sqlite")
    db.executescript((STATE_V3 / "journal.sql").read_text())
    db.close()
    journal = state / "journal.sqlite"
    assert _journal_rows(journal, "SELECT value FROM meta WHERE key = 'schema_version'") == [("3",)]
    held = {str(uid) for (uid,) in _journal_rows(journal, "SELECT sop_uid FROM instances")}
    states = sorted(str(state) for (state,) in _journal_rows(journal, "SELECT state FROM batches"))
    assert len(held) == 6 and states == ["complete", "receiving", "routed"]

    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_ready(port)
        wait_until(
            lambda: _journal_rows(journal, "SELECT DISTINCT state FROM batches") == [("delivered",)],
            60,
            interval=0.3,
            message="every batch delivered",
        )
        assert daemon.terminate() == 0

    assert _journal_rows(journal, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    in_xnat = {uid for experiment in xnat.experiments("PROJ") for scan in experiment.scans.values() for uid in
               scan.files.values()}  # fmt: skip
    assert in_xnat == held
