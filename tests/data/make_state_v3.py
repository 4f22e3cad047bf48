"""Make tests/data/state-v3/: a state directory as the last release with journal schema 3 left it.

Run with that release's ingestd on the path (the commit before schema 4, 784015e^):

    git archive 784015e^ ingestd | tar -x -C /tmp/v3-src
    PYTHONPATH=/tmp/v3-src:. .venv/bin/python tests/data/make_state_v3.py

Three studies of two instances each, sent by calling AE STORESCU: one routed (its delivery not started; without
de-identification its outgoing files are the spooled ones), one complete (not routed yet), one still receiving.
The journal is kept as an SQL dump (`journal.sql`), the spooled files as they are. Synthetic instances only.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

from ingestd.route import Router

from ingestd.dicomfile import data_set_offset
from ingestd.header import read_file_header
from ingestd.journal import SCHEMA_VERSION, Journal, Source
from ingestd.rules import load_rules
from ingestd.spool import Spool
from tests.dicom import make_study, write_instances

OUT = Path(__file__).parent / "state-v3"
RULES = (
    "rules:\n"
    "  - name: scanner\n"
    "    when: {calling_aet: STORESCU}\n"
    "    route: {server: main, project: PROJ, subject: OLD, session: 'OLD_{SeriesNumber}', archive: true}\n"
)


def main() -> None:
    assert SCHEMA_VERSION == 3, "run with the schema-3 release on PYTHONPATH"
    shutil.rmtree(OUT, ignore_errors=True)
    work = Path("/tmp/make-state-v3")
    shutil.rmtree(work, ignore_errors=True)
    state = work / "state"
    (state / "spool").mkdir(parents=True)
    journal = Journal(state / "journal.sqlite")
    spool = Spool(state / "spool", journal)
    (work / "lab.rules.yaml").write_text(RULES)
    router = Router(journal, load_rules([work / "lab.rules.yaml"]), state)
    router.recover()
    source = Source("dicom", "STORESCU", "INGESTD@127.0.0.1")
    for index, fate in enumerate(("routed", "complete", "receiving")):
        study = make_study(series=1, per_series=2)
        for ds in study:
            ds.SeriesNumber = index + 1
        for path in write_instances(study, work / fate):
            data = path.read_bytes()
            offset = data_set_offset(data)
            spool.store(data[:offset], data[offset:], read_file_header(data), source)
        if fate != "receiving":
            (batch,) = [b for b in journal.batches(("receiving",))]
            assert journal.complete_batch(batch.id, batch.last_received, time.time())
        if fate == "routed":
            assert router.check() == 1
    journal.close()
    OUT.mkdir(parents=True)
    db = sqlite3.connect(state / "journal.sqlite")
    (OUT / "journal.sql").write_text("\n".join(db.iterdump()) + "\n")
    db.close()
    # The outbox is empty: a rule without de-identification sends the spooled files themselves.
    shutil.copytree(state / "spool", OUT / "spool", ignore=shutil.ignore_patterns(".tmp", ".part"))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
