"""The study page of a real daemon (`ingestd run`) with the XNAT stand-in: its log events, its XNAT link and Resend.

An MR study is delivered (the spool keeps its copies: `delivery.keep_after_delivery`), a CT study, dropped in a
folder named after the patient, is held unrouted. The held study's page lists its `assemble.*` and `route.*` events
from the daemon's buffer, without a planted value. The delivered study's page links to the session in XNAT and
offers Resend: pressed, it makes a new batch (`ingestd resend BATCH`), which the daemon delivers into the same
session, every instance once (checked by SOP Instance UID in the stand-in). Once the spooled copies are gone, Resend
is refused in the command's words.
"""

from __future__ import annotations

from pathlib import Path

import requests

from ingestd.logs import uid_digest
from ingestd.testing.xnat import FakeXnat
from tests.dicom import make_study
from tests.lab import xnat_holdings
from tests.procs import DaemonProcess, journal_rows, wait_until
from tests.spooled import PATIENT_FOLDER, PATIENT_ID
from tests.test_retry import daemon_config, drop, in_state
from tests.test_ui_actions import _forms

TOKEN = "daemon-token-0123456789abcdef"
RULES = """
profiles:
  research: {key: {env: INGESTD_TEST_KEY}}
rules:
  - name: scanner
    when: {drop_folder: drop, Modality: MR}
    route: {server: main, project: PROJ, subject: '{PatientID:hash8}', session: '{subject}_MR', archive: true}
    anonymize: research
"""


def _config(tmp_path: Path, xnat: FakeXnat) -> Path:
    config = daemon_config(tmp_path, xnat)
    token_file = tmp_path / "ui.token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    text = config.read_text(encoding="utf-8").replace(
        "metrics: {enabled: false}\n",
        f"metrics: {{port: 0}}\nui: {{token_file: {token_file}}}\ndelivery: {{keep_after_delivery: true}}\n",
    )
    config.write_text(text, encoding="utf-8")
    (tmp_path / "lab.rules.yaml").write_text(RULES)
    return config


def _outgoing(tmp_path: Path, batch_id: int) -> set[str]:
    rows = journal_rows(tmp_path / "state" / "journal.sqlite", "SELECT batch_id, sop_uid FROM outgoing")
    return {str(row[1]) for row in rows if row[0] == batch_id}


def test_the_page_lists_events_links_xnat_and_resends_into_the_same_session(tmp_path: Path, xnat: FakeXnat) -> None:
    config = _config(tmp_path, xnat)
    mr, ct = make_study(series=1, per_series=3), make_study(series=1, per_series=2)
    for ds in ct:
        ds.Modality = "CT"
    mr_uid, ct_uid = str(mr[0].StudyInstanceUID), str(ct[0].StudyInstanceUID)
    planted = [PATIENT_ID, PATIENT_FOLDER, "DOE^JOHN", mr_uid, ct_uid]
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        daemon.wait_logged("daemon.started")
        base = f"http://127.0.0.1:{int(daemon.wait_logged('metrics.started')['port'])}"
        drop(tmp_path, mr, "mr")
        drop(tmp_path, ct, PATIENT_FOLDER)
        held, _, code, _ = wait_until(lambda: in_state(tmp_path, ct_uid, "held"), 60, message="held")
        assert code == "unrouted"
        first, *_ = wait_until(lambda: in_state(tmp_path, mr_uid, "delivered"), 60, message="delivered")

        session = requests.Session()
        assert session.post(f"{base}/ui/login", data={"token": TOKEN}, timeout=10).status_code == 200
        page = session.get(f"{base}/ui/studies/{held}", timeout=10).text
        events = page[page.index('id="events"') :]
        assert "route.held" in events and "assemble.study_complete" in events
        assert events.index("route.held") < events.index("assemble.study_complete")  # newest first
        assert uid_digest(ct_uid) in events and "Log events" in page

        delivered = session.get(f"{base}/ui/studies/{first}", timeout=10).text
        assert "deliver.archived" in delivered and "route.routed" in delivered
        assert f'<a href="{xnat.url}/data/' in delivered and '?format=html" rel="noreferrer">' in delivered
        assert "Delivered</dt>" in delivered
        forms = _forms(delivered)
        path = f"/ui/studies/{first}/resend"
        assert set(forms) == {path}
        answer = session.post(f"{base}{path}", data={"csrf": forms[path]}, allow_redirects=False, timeout=30)
        assert answer.status_code == 303
        shown = session.get(f"{base}/ui/studies/{first}", timeout=10).text
        assert f"3 instances re-sent from batch {first} with rule &#39;scanner&#39;" in shown

        def resent() -> int | None:
            rows = journal_rows(tmp_path / "state" / "journal.sqlite", "SELECT id, state FROM batches ORDER BY id")
            later = [int(row[0]) for row in rows if int(row[0]) not in (first, held) and row[1] == "delivered"]
            return later[0] if later else None

        second = wait_until(resent, 60, message="the re-sent batch delivered")
        assert len(xnat.experiments("PROJ")) == 1  # the same session, no duplicate
        archived, prearchived = xnat_holdings(xnat, "PROJ")
        sent = _outgoing(tmp_path, second)
        assert sent == _outgoing(tmp_path, first) == set(archived)  # de-identified again to the same instances
        assert all(len(archived[uid]) == 1 for uid in sent) and not set(prearchived) & sent
        assert f"re-sent by a person from batch {first}" in session.get(f"{base}/ui/studies/{second}", timeout=10).text

        for (relative,) in journal_rows(tmp_path / "state" / "journal.sqlite", "SELECT spool_path FROM instances"):
            (tmp_path / "state" / "spool" / relative).unlink(missing_ok=True)  # as retention.delivered_days does
        answer = session.post(f"{base}{path}", data={"csrf": forms[path]}, allow_redirects=False, timeout=30)
        assert answer.status_code == 303
        refused = session.get(f"{base}/ui/studies/{first}", timeout=10).text
        assert "spooled copies are gone" in refused and "keep_after_delivery" in refused
        assert "ingestd import" in refused and "ingestd: " not in refused
        assert len(journal_rows(tmp_path / "state" / "journal.sqlite", "SELECT id FROM batches")) == 3
        pages = page + delivered + shown + refused
        assert daemon.terminate() == 0
    for value in planted:
        assert value not in pages, value
    log = (tmp_path / "daemon.log").read_text(encoding="utf-8")
    assert '"action": "resend"' in log and TOKEN not in log and mr_uid not in log
