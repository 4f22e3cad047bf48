"""Attachment sets (batches of kind `files`) through every admin path: `status` (text, `--json`, `--filter kind=`),
`retry` (re-route, kept route, `--keep-route`, `--reroute-sent`, `--now`), `release`/`unrelease`, `resend` (refused)
and retention (`purge`, `--dry-run`).

The state directory is real: a journal whose sets are made with `ingestd.journal.attachments` as the intake, the
router and the deliverer make them (store_file, route_set, start_set_delivery, set_verified, finish_set), their
files real files under `attachments/`, one DICOM study beside them spooled by the real spool. The commands run
in-process through `ingestd.cli.main`, as the admin types them.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ingestd.cli import main
from ingestd.config import load_config
from ingestd.digestkey import load_digest_key
from ingestd.header import read_file_header
from ingestd.journal import Journal, RouteRecord, Source
from ingestd.journal.attachments import (
    OutgoingFile,
    attachments_out,
    finish_set,
    route_set,
    set_files,
    set_verified,
    start_set_delivery,
    store_file,
)
from ingestd.journal.resends import ResendRefusedError, resend_batch
from ingestd.journal.retries import RetryOutcome, retry_held, sent_evidence
from ingestd.logs import path_digest, use_digest_key
from ingestd.retention.plan import BatchPaths, batch_removal, safe_relative
from ingestd.rules import load_rules
from ingestd.spool import Spool
from ingestd.states import BatchKind, HoldCode, Step, StudyState
from ingestd.status import JournalStatus, status_data, status_line
from tests.dicom import encode, make_study

DAY = 86400.0
PATIENT_FOLDER = "DOE^JOHN_MRN123"  # an upload named after a patient: never shown without --show-paths
RULES = """\
rules:
  - name: results
    when: {drop_folder: drop}
    route: {server: main, project: PROJ, subject: '{path[0]}', session: '{path[0]}_MR'}
"""  # (its `attach:` is the rules helper's: these tests need only the rule by name and its label templates)


@dataclass
class Lab:
    """A state directory, its configuration file and journal, and the drop folder's path."""

    root: Path
    config_file: Path
    journal: Journal
    drop: str
    version: str
    now: float = field(default_factory=time.time)

    @property
    def state(self) -> Path:
        return self.root / "state"

    def source(self, upload: str, relative: str) -> Source:
        return Source("folder", self.drop, relative, upload)

    def put(self, upload: str, relative: str, content: bytes, at: float) -> int:
        """Spool one file as the intake does (durable copy under `attachments/`, then the journal); its set's id."""
        name = secrets.token_hex(16)
        path = self.state / "attachments" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        stored = store_file(
            self.journal,
            self.source(upload, relative),
            relative,
            size=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            md5=hashlib.md5(content, usedforsecurity=False).hexdigest(),
            spool_path=f"attachments/{name}",
            now=at,
        )
        assert stored.outcome == "stored"
        return stored.batch_id

    def make_set(self, upload: str, count: int, *, ago: float = 600.0, complete: bool = True) -> int:
        """A set of `count` files of `upload`, received `ago` seconds ago and (unless not `complete`) complete."""
        at = self.now - ago
        batch_id = 0
        for n in range(count):
            batch_id = self.put(upload, f"{upload}/qBOLD/r{n}.nii", f"{upload} {n} ".encode() * (n + 10), at)
        if complete:
            (row,) = [b for b in self.journal.batches() if b.id == batch_id]
            assert self.journal.complete_batch(batch_id, row.last_received, at)
        return batch_id

    def route(self, batch_id: int, *, profile: str | None = None) -> None:
        """Route a complete set as the set router would: every file to session resource qBOLD."""
        record = RouteRecord("results", self.version, "main", "PROJ", PATIENT_FOLDER, f"{PATIENT_FOLDER}_MR",
                             False, profile, "", ())  # fmt: skip
        outgoing = [
            OutgoingFile(f.id, "session", "", "qBOLD", f.relative.rsplit("/", 1)[-1], f.size, f.md5)
            for f in set_files(self.journal, batch_id)
        ]
        assert route_set(self.journal, batch_id, record, outgoing, self.now - 300)
        start_set_delivery(self.journal, batch_id, self.now - 300)

    def verify(self, batch_id: int, count: int) -> None:
        """XNAT's listing was seen holding the first `count` outgoing files."""
        out = attachments_out(self.journal, batch_id)
        set_verified(self.journal, batch_id, {o.id: n < count for n, o in enumerate(out)}, self.now - 200)

    def deliver(self, batch_id: int, *, ago: float) -> None:
        self.route(batch_id)
        self.journal.update_delivery(batch_id, step=Step.CHECK)
        self.verify(batch_id, len(attachments_out(self.journal, batch_id)))
        assert finish_set(self.journal, batch_id, self.now - ago)

    def hold(self, batch_id: int, code: str, reason: str, *, routed: bool = False) -> None:
        state = StudyState.ROUTED if routed else StudyState.COMPLETE
        assert self.journal.hold_batch(batch_id, code, reason, self.now - 100, from_state=state)

    def row(self, batch_id: int) -> tuple[str, str | None, str | None]:
        (batch,) = [b for b in self.journal.batches() if b.id == batch_id]
        return batch.state, batch.hold_code, batch.reason

    def count(self, table: str, batch_id: int) -> int:
        rows = self.journal.query(f"SELECT count(*) FROM {table} WHERE batch_id = ?", (batch_id,))  # noqa: S608
        return int(rows[0][0])

    def files_on_disk(self, batch_id: int) -> list[bool]:
        return [(self.state / f.spool_path).is_file() for f in set_files(self.journal, batch_id)]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    (tmp_path / "drop").mkdir()
    (tmp_path / "lab.rules.yaml").write_text(RULES, encoding="utf-8")
    config_file = tmp_path / "ingestd.yaml"
    config_file.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "rules: [lab.rules.yaml]\n"
        f"drop_folders: [{{path: {tmp_path / 'drop'}}}]\n"
        "retention: {delivered_days: 1, released_days: 2}\n"
        "xnat:\n"
        "  servers:\n"
        "    main:\n"
        "      url: http://127.0.0.1:9\n"
        "      credentials: {env_username: XNAT_TEST_USER, env_password: XNAT_TEST_PASSWORD}\n",
        encoding="utf-8",
    )
    config = load_config(config_file)
    (tmp_path / "state").mkdir()
    load_digest_key(config.state_dir)
    journal = Journal(config.journal_path)
    version = load_rules(config.rules).version
    try:
        yield Lab(tmp_path, config_file, journal, str(tmp_path / "drop"), version)
    finally:
        journal.close()


def _dicom_batch(lab: Lab) -> int:
    """One DICOM study from the drop folder, complete (spooled by the real spool)."""
    spool = Spool(lab.state / "spool", lab.journal)
    study = make_study(series=1, per_series=2)
    for ds in study:
        data = encode(ds)
        spool.store(data[:0], data, read_file_header(data), lab.source("other", "other/IM.dcm"))
    (batch,) = [b for b in lab.journal.batches() if b.kind == BatchKind.DICOM]
    assert lab.journal.complete_batch(batch.id, batch.last_received, lab.now)
    return batch.id


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# -- status ----------------------------------------------------------------------------------------------------


def test_status_lists_sets_with_their_state_files_resources_delivery_and_what_to_do(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    receiving = lab.make_set("sub00", 1, ago=30, complete=False)
    held = lab.make_set(PATIENT_FOLDER, 2, ago=3600)
    lab.hold(held, HoldCode.NO_SESSION, "no-session: XNAT has no session PROJ/…/… (looked at 10:00)")
    routed = lab.make_set("sub02", 3, ago=1800)
    lab.route(routed)
    lab.journal.update_delivery(routed, step=Step.UPLOAD)
    lab.verify(routed, 1)
    study = _dicom_batch(lab)
    config = str(lab.config_file)

    data = status_data(load_config(lab.config_file), running=False, now=lab.now)
    by_id = {s["batch_id"]: s for s in data["studies"]}
    assert {by_id[i]["kind"] for i in (receiving, held, routed)} == {"files"} and by_id[study]["kind"] == "dicom"
    assert (by_id[routed]["files"], by_id[routed]["resources"], by_id[routed]["instances"]) == (3, 1, 0)
    assert (by_id[held]["files"], by_id[held]["resources"], by_id[held]["state"]) == (2, None, "held")
    assert (by_id[study]["files"], by_id[study]["instances"], by_id[study]["resources"]) == (0, 2, None)
    delivery = by_id[routed]["delivery"]
    assert (delivery["step"], delivery["files"], delivery["verified"], delivery["missing"]) == ("upload", 3, 1, 2)
    assert by_id[held]["upload"] == _installation_digest(lab, PATIENT_FOLDER)
    assert by_id[routed]["source_name"] == "drop:drop"
    # labels built from a folder name (path[0]) by a rule that does not de-identify: digests, as the logs show
    assert by_id[routed]["labels"]["subject"] == _installation_digest(lab, PATIENT_FOLDER)

    status, out, _err = _run(capsys, "status", "--config", config)
    assert status == 0
    assert "4 batches: 1 study batch, 3 attachment sets" in out
    assert PATIENT_FOLDER not in out and "DOE" not in out
    assert all(len(line) <= 100 for line in out.splitlines()), out
    rows = {int(line.split()[0]): line.split() for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert rows[routed][1:5] == ["routed", "files", "1", "3"], rows[routed]
    assert rows[held][1:5] == ["held", "files", "-", "2"], rows[held]
    assert rows[receiving][1:5] == ["receiving", "files", "-", "1"], rows[receiving]
    assert rows[study][2] == "MR"
    assert "delivery: upload, 1 of 3 files verified" in out
    assert "no-session: XNAT has no session" in out and "what to do: create or archive that session" in out

    status, out, _err = _run(capsys, "status", "--config", config, "--json")
    assert status == 0 and PATIENT_FOLDER not in out and "DOE" not in out
    assert {s["kind"] for s in json.loads(out)["studies"]} == {"files", "dicom"}
    status, out, _err = _run(capsys, "status", "--config", config, "--json", "--show-paths")
    assert {s["upload"] for s in json.loads(out)["studies"] if s["batch_id"] == held} == {PATIENT_FOLDER}

    status, out, _err = _run(capsys, "status", "--config", config, "--json", "--filter", "kind=files")
    assert sorted(s["batch_id"] for s in json.loads(out)["studies"]) == sorted([receiving, held, routed])
    status, out, _err = _run(capsys, "status", "--config", config, "--json", "--filter", "kind=DICOM,state=complete")
    assert [s["batch_id"] for s in json.loads(out)["studies"]] == [study]
    status, out, _err = _run(capsys, "status", "--config", config, "--filter", "kind=files,state=held", "--wide")
    assert status == 0 and "1 of 4 studies (batches) match" in out and "files" in out
    status, _out, err = _run(capsys, "status", "--config", config, "--filter", "kind=file")
    assert status == 2 and "no such kind of batch" in err and "did you mean" in err and "dicom, files" in err

    reader = JournalStatus(load_config(lab.config_file).journal_path)
    try:
        counts = reader.state_counts()
        assert counts == {"complete": 1, "held": 1, "receiving": 1, "routed": 1}
        assert status_line(counts) == "serving; studies: 1 complete, 1 held, 1 receiving, 1 routed"
        assert dict(reader.totals().held_reasons) == {"no-session": 1}
    finally:
        reader.close()


def _installation_digest(lab: Lab, value: str) -> str:
    use_digest_key(load_digest_key(lab.state))
    return path_digest(value)


def test_a_set_whose_route_de_identifies_shows_its_labels_and_every_hold_code_has_its_line(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    routed = lab.make_set("sub01", 1)
    lab.route(routed, profile="research")  # a de-identified route's labels are safe (loading checks them)
    for code in ("study-held", "attach-ambiguous", "attach-conflict"):
        batch_id = lab.make_set(f"u-{code}", 1)
        if code == "attach-conflict":
            lab.route(batch_id)
        reason = f"{code}: XNAT holds r0.nii in session {PATIENT_FOLDER}_MR, resource qBOLD, with other content"
        reason = reason if code == "attach-conflict" else f"{code}: something"  # only a routed set has labels
        lab.hold(batch_id, code, reason, routed=code == "attach-conflict")
    status, out, _err = _run(capsys, "status", "--config", str(lab.config_file))
    assert status == 0 and f"PROJ/{PATIENT_FOLDER}/{PATIENT_FOLDER}_MR" in out
    assert all(len(line) <= 100 for line in out.splitlines()), out
    out = " ".join(out.split())  # the lines under a row are wrapped at 100 columns
    assert "it follows its study once that study is routed" in out
    assert "put each file in the folder of the study it belongs to" in out
    assert "remove or rename it in the session's resource in XNAT, then `ingestd retry`" in out
    # the reason of a set whose route builds its labels from folder names: those labels as the logs' digests
    assert f"in session {_installation_digest(lab, PATIENT_FOLDER + '_MR')}, resource qBOLD" in out
    assert f"session {PATIENT_FOLDER}_MR" not in out
    docs = (Path(__file__).parent.parent / "docs" / "xnat.md").read_text(encoding="utf-8")
    for code in ("no-session", "study-held", "attach-ambiguous", "attach-conflict"):
        assert f"| `{code}` |" in docs


# -- retry -------------------------------------------------------------------------------------------------------


def test_retry_reroutes_a_held_set_dropping_its_route_its_outgoing_files_and_its_delivery_at_once(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    """Never routed (study-held): back to complete. Routed, held while locating, nothing seen in XNAT: its route,
    attachments_out and delivery rows go in the transaction that makes it complete; its files and their rows stay."""
    waiting = lab.make_set("sub01", 2)
    lab.hold(waiting, HoldCode.STUDY_HELD, "study-held: its study (batch 9) is held")
    located = lab.make_set("sub02", 3)
    lab.route(located)
    lab.hold(located, HoldCode.NO_SESSION, "no-session: not in XNAT", routed=True)
    assert sent_evidence(lab.journal, located) is None

    status, out, _err = _run(capsys, "retry", "--config", str(lab.config_file), "--held")
    assert status == 0, out
    assert f"batch {waiting} (attachment set sha256:" in out and "re-routed with rule set" in out
    assert f"batch {located} (attachment set sha256:" in out and "its route by rule 'results'" in out
    for batch_id, files in ((waiting, 2), (located, 3)):
        assert lab.row(batch_id) == (StudyState.COMPLETE, None, None)
        assert [lab.count(t, batch_id) for t in ("routes", "attachments_out", "deliveries")] == [0, 0, 0]
        assert lab.count("attached_files", batch_id) == files and lab.files_on_disk(batch_id) == [True] * files
    assert retry_held(lab.journal, lab.state, located, lab.now).outcome == RetryOutcome.NOT_HELD


def test_a_set_xnat_may_hold_files_of_keeps_its_route_and_goes_back_to_locate(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    """Held after its delivery went past `locate` (an upload may have gone out), or after XNAT was seen holding a
    file: its route stays, its delivery starts again at `locate`; `--reroute-sent` drops it all the same."""
    uploaded = lab.make_set("sub01", 2)
    lab.route(uploaded)
    lab.journal.update_delivery(uploaded, step=Step.UPLOAD, attempts=3)
    lab.journal.update_delivery(uploaded, step=Step.UPLOADING)
    lab.hold(uploaded, HoldCode.DELIVER_FAILED, "deliver-failed: boom", routed=True)
    seen = lab.make_set("sub02", 3)
    lab.route(seen)
    lab.verify(seen, 1)
    lab.hold(seen, HoldCode.ATTACH_CONFLICT, "attach-conflict: r1.nii differs", routed=True)
    config = str(lab.config_file)

    status, out, _err = _run(capsys, "retry", "--config", config, str(uploaded))
    assert status == 0
    assert "because XNAT may already hold some of its files: its delivery reached step uploading." in out, out
    assert "delete its files from the resources of that session in XNAT, then run" in out
    assert f"`ingestd retry --reroute-sent {uploaded}`" in out
    status, out, _err = _run(capsys, "retry", "--config", config, f"#{seen}")
    assert "XNAT was seen holding 1 of its 3 files" in out, out
    for batch_id, files in ((uploaded, 2), (seen, 3)):
        assert lab.row(batch_id) == (StudyState.ROUTED, None, None)
        delivery = lab.journal.delivery(batch_id)
        assert delivery is not None and (delivery.step, delivery.attempts) == (Step.LOCATE, 0)
        assert lab.count("routes", batch_id) == 1 and lab.count("attachments_out", batch_id) == files
    assert [o.verified_at is not None for o in attachments_out(lab.journal, seen)] == [True, False, False]

    lab.hold(seen, HoldCode.ATTACH_CONFLICT, "attach-conflict: r1.nii differs", routed=True)
    (lab.state / set_files(lab.journal, seen)[0].spool_path).unlink()
    kept = retry_held(lab.journal, lab.state, seen, lab.now, keep_route=True)
    assert (kept.outcome, kept.missing_files) == (RetryOutcome.KEPT_ROUTE, 1)
    lab.hold(seen, HoldCode.ATTACH_CONFLICT, "attach-conflict: r1.nii differs", routed=True)
    status, out, _err = _run(capsys, "retry", "--config", config, "--reroute-sent", str(seen))
    assert status == 0 and "re-routed with rule set" in out
    assert lab.row(seen)[0] == StudyState.COMPLETE
    assert [lab.count(t, seen) for t in ("routes", "attachments_out", "deliveries", "attached_files")] == [0, 0, 0, 3]


def test_keep_route_and_retry_now_work_for_sets(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    held = lab.make_set("sub01", 1)
    lab.route(held)
    lab.hold(held, HoldCode.NO_SESSION, "no-session: not there", routed=True)
    config = str(lab.config_file)
    status, out, _err = _run(capsys, "retry", "--config", config, "--keep-route", str(held))
    assert status == 0 and "kept its route by rule 'results'" in out
    assert lab.row(held)[0] == StudyState.ROUTED and lab.count("attachments_out", held) == 1

    lab.journal.update_delivery(held, next_attempt_at=lab.now + 3600)
    status, out, _err = _run(capsys, "retry", "--config", config, "--now", str(held))
    assert status == 0 and f"batch {held} (routed): its next delivery attempt was due in" in out
    delivery = lab.journal.delivery(held)
    assert delivery is not None and delivery.next_attempt_at <= time.time()


# -- release, unrelease, resend ------------------------------------------------------------------------------------


def test_release_and_unrelease_a_set_and_resend_refuses_sets(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    held = lab.make_set("sub01", 2)
    lab.hold(held, HoldCode.ATTACH_AMBIGUOUS, "attach-ambiguous: 1 file lies as close to batch 3 as to 4")
    config = str(lab.config_file)
    assert _run(capsys, "release", "--config", config, str(held))[:2] == (0, f"batch {held}: released\n")
    assert lab.row(held)[0] == StudyState.RELEASED
    status, out, _err = _run(capsys, "status", "--config", config, "--json", "--filter", "state=released")
    assert [s["batch_id"] for s in json.loads(out)["studies"]] == [held]
    status, out, _err = _run(capsys, "unrelease", "--config", config, str(held))
    assert status == 0 and f"batch {held}: held again (attach-ambiguous: 1 file" in out
    assert lab.row(held) == (
        StudyState.HELD,
        "attach-ambiguous",
        "attach-ambiguous: 1 file lies as close to batch 3 as to 4",
    )
    assert lab.files_on_disk(held) == [True, True]

    delivered = lab.make_set("sub02", 2)
    lab.deliver(delivered, ago=60)
    assert lab.row(delivered)[0] == StudyState.DELIVERED
    for reference in (str(delivered), str(held)):
        status, out, err = _run(capsys, "resend", "--config", config, reference)
        assert status == 1 and "an attachment set (non-DICOM files) is not re-sent" in err, err
        assert "drop its files into the drop folder again" in err
    with pytest.raises(ResendRefusedError, match="attachment set"):
        resend_batch(lab.journal, lab.state / "spool", delivered, "results", lab.now)
    assert sorted(b.id for b in lab.journal.batches()) == sorted([delivered, held])  # nothing new made


# -- retention -------------------------------------------------------------------------------------------------


def test_retention_removes_the_files_of_released_and_delivered_sets_only_when_due(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    """released_days 2, delivered_days 1: an old released and an old delivered set lose their files (rows stay,
    purged_at set); a young delivered set, and held, routed, complete and receiving sets however old, keep theirs;
    so does the intake's temp folder. `--dry-run` counts and measures first, changing nothing."""
    released = lab.make_set("sub01", 2, ago=5 * DAY)
    lab.hold(released, HoldCode.NO_SESSION, "no-session: x")
    assert lab.journal.release_batch(released, lab.now - 3 * DAY)
    old = lab.make_set("sub02", 3, ago=5 * DAY)
    lab.deliver(old, ago=2 * DAY)
    young = lab.make_set("sub03", 1, ago=5 * DAY)
    lab.deliver(young, ago=DAY / 2)
    held = lab.make_set("sub04", 1, ago=9 * DAY)
    lab.hold(held, HoldCode.STUDY_HELD, "study-held: x")
    routed = lab.make_set("sub05", 1, ago=9 * DAY)
    lab.route(routed)
    complete = lab.make_set("sub06", 1, ago=9 * DAY)
    receiving = lab.make_set("sub07", 1, ago=9 * DAY, complete=False)
    temp = lab.state / "attachments" / ".tmp" / "partial"
    temp.parent.mkdir()
    temp.write_bytes(b"half")
    # a released set young enough stays too
    young_released = lab.make_set("sub08", 1, ago=9 * DAY)
    lab.hold(young_released, HoldCode.NO_SESSION, "no-session: x")
    assert lab.journal.release_batch(young_released, lab.now - DAY)
    sizes = {b: sum(f.size for f in set_files(lab.journal, b)) for b in (released, old)}
    config = str(lab.config_file)

    status, out, _err = _run(capsys, "purge", "--config", config, "--dry-run")
    assert status == 0
    assert f"1 released batch, {sizes[released]} B: #{released}" in out, out
    assert f"1 delivered batch, {sizes[old]} B: #{old}" in out, out
    assert all(all(lab.files_on_disk(b)) for b in (released, old))
    data = status_data(load_config(lab.config_file), running=False, now=lab.now)
    assert data["retention"]["would_purge"]["released"][0] == 1

    status, out, _err = _run(capsys, "purge", "--config", config)
    assert status == 0 and f"#{released}" in out and f"#{old}" in out
    for batch_id, files in ((released, 2), (old, 3)):
        assert lab.files_on_disk(batch_id) == [False] * files
        assert lab.count("attached_files", batch_id) == files
        (batch,) = [b for b in lab.journal.batches() if b.id == batch_id]
        assert batch.purged_at is not None
    for batch_id in (young, held, routed, complete, receiving, young_released):
        assert all(lab.files_on_disk(batch_id)), batch_id
    assert temp.read_bytes() == b"half"
    status, _out, err = _run(capsys, "unrelease", "--config", config, str(released))
    assert status == 1 and "its files were removed by retention" in err
    status, out, _err = _run(capsys, "purge", "--config", config, "--dry-run")
    assert "0 released batches" in out and "0 delivered batches" in out


def test_retention_names_only_plain_files_under_attachments_and_never_a_protected_one() -> None:
    """A set's spool paths come from the journal: one that leaves `attachments/` (absolute, `..`, the folder
    itself), or lies in the intake's temp folder, or that a set still being worked on refers to, is never named."""
    paths = BatchPaths(
        attachments=(
            "attachments/0a1b",
            "attachments/../journal.sqlite",
            "/etc/passwd",
            "attachments",
            "attachments/.tmp/0a1c",
            "attachments/./0a1d",
            "spool/../attachments/0a1e",
            "attachments/0a1f",
        )
    )
    removal = batch_removal(7, "released", paths, frozenset({"attachments/0a1f"}))
    assert [f for f in removal.files if f.startswith("attachments")] == ["attachments/0a1b"]
    assert safe_relative("attachments/0a1b") == "attachments/0a1b" and safe_relative("attachments/.tmp") is None
