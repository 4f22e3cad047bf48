"""`ingestd status` as a lab admin reads it: held studies told apart without patient data, in 100 columns, filtered.

The state directory is a real spool and journal, routed by the real router (tests/spooled.py); the command runs as
a process, as the admin runs it.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from ingestd.admin.statusfilter import FilterError, parse_age, parse_filters
from ingestd.admin.statusview import WIDTH, render_status
from ingestd.digestkey import read_digest_key
from ingestd.logs import path_digest, use_digest_key
from ingestd.retention.store import LAST_RUN_KEY
from ingestd.status import status_data
from tests.procs import run_ingestd
from tests.spooled import KEY, PATIENT_FOLDER, PATIENT_ID, SpooledState, spooled_state, write_config

NOW = 1_900_000_000.0


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SpooledState:
    monkeypatch.setenv("INGESTD_TEST_KEY", KEY)
    return spooled_state(tmp_path, now=NOW)


def _by_source(data: dict[str, object], state: SpooledState) -> dict[str, dict[str, object]]:
    studies = data["studies"]
    assert isinstance(studies, list)
    ids = {batch_id: name for name, batch_id in state.batch_ids.items()}
    return {ids[study["batch_id"]]: study for study in studies}


def _status(state: SpooledState, *options: str) -> str:
    result = run_ingestd(
        "status", "--config", str(state.config_file), *options, env=os.environ | {"INGESTD_TEST_KEY": KEY}
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _phi(state: SpooledState) -> list[str]:
    return [PATIENT_ID, PATIENT_FOLDER, "DOE^JOHN", "Synthetic", *state.uids()]


def test_each_batch_is_named_by_modality_counts_source_time_rule_and_safe_labels(state: SpooledState) -> None:
    data = status_data(state.config, running=False, now=NOW)
    studies = _by_source(data, state)
    scanner, other, drop, imported = studies["SCANNER"], studies["OTHER"], studies["drop"], studies["import"]

    assert (scanner["state"], scanner["modalities"], scanner["series"], scanner["instances"]) == (
        "routed",
        ["MR"],
        2,
        4,
    )
    assert (scanner["source_name"], scanner["rule"], scanner["hidden_labels"]) == ("SCANNER", "research", [])
    labels = scanner["labels"]
    assert isinstance(labels, dict) and labels["project"] == "PROJ_A" and str(labels["session"]).endswith("_MR")
    assert scanner["age_seconds"] == 3 * 3600 and scanner["quiet_seconds"] == 3 * 3600 - 5
    assert scanner["first_received"] == NOW - 3 * 3600

    assert (other["state"], other["hold_code"], other["modalities"], other["instances"]) == (
        "held",
        "unrouted",
        ["CT"],
        3,
    )
    assert other["source_name"] == "OTHER" and other["rule"] is None and other["labels"] is None

    # A rule without `anonymize` whose labels hold the Patient ID: those labels are the logs' keyed digests.
    key = read_digest_key(state.config.state_dir)
    assert key is not None
    use_digest_key(key)
    assert (drop["source_name"], drop["rule"], drop["hidden_labels"]) == (
        "drop:drop",
        "raw-drop",
        ["session", "subject"],
    )
    assert drop["labels"] == {
        "project": "RAW",
        "subject": path_digest(PATIENT_ID),
        "session": path_digest(f"{PATIENT_ID}_20260101"),
    }
    assert drop["route"]["subject"] == path_digest(PATIENT_ID)  # type: ignore[index]

    # `ingestd import` of a folder named after the patient: `import`, the folder a digest.
    assert (imported["source_name"], imported["source"]) == ("import", path_digest(f"/data/{PATIENT_FOLDER}"))

    text = json.dumps(data)
    assert not [value for value in _phi(state) if value in text]


def test_show_uids_shows_the_original_labels_and_show_paths_the_import_folder(state: SpooledState) -> None:
    data = status_data(state.config, running=False, show_uids=True, show_paths=True, now=NOW)
    studies = _by_source(data, state)
    assert studies["drop"]["labels"] == {"project": "RAW", "subject": PATIENT_ID, "session": f"{PATIENT_ID}_20260101"}
    assert studies["import"]["source_name"] == f"import:/data/{PATIENT_FOLDER}"


def test_labels_are_digests_when_the_rules_cannot_be_read(state: SpooledState) -> None:
    """Fail closed: without the rules the batch was routed with, every label of a route without a profile."""
    write_config(state.root, rules=False)
    from ingestd.config import load_config  # noqa: PLC0415

    data = status_data(load_config(state.config_file), running=False, now=NOW)
    drop = _by_source(data, state)["drop"]
    assert drop["hidden_labels"] == ["project", "session", "subject"]
    assert drop["labels"]["project"] == path_digest("RAW")  # type: ignore[index]
    assert _by_source(data, state)["SCANNER"]["hidden_labels"] == []  # de-identified: safe whatever the rules


def test_the_default_text_fits_100_columns_one_row_per_batch(state: SpooledState) -> None:
    out = _status(state)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= WIDTH
    assert "4 studies (batches)" in out
    header = next(line for line in lines if line.lstrip().startswith("BATCH"))
    for column in ("STATE", "MOD", "SER", "INST", "SOURCE", "RECEIVED", "QUIET", "RULE", "LABELS"):
        assert column in header
    rows = {
        name: next(line for line in lines if re.match(rf" *{batch_id}  ", line))
        for name, batch_id in state.batch_ids.items()
    }
    assert rows["SCANNER"].split()[1:6] == ["routed", "MR", "2", "4", "SCANNER"]
    assert "research" in rows["SCANNER"] and "PROJ_A/" in rows["SCANNER"]
    assert rows["OTHER"].split()[1:6] == ["held", "CT", "1", "3", "OTHER"]
    assert "drop:drop" in rows["drop"] and "raw-drop" in rows["drop"]
    assert rows["import"].split()[5] == "import"
    reason = lines[lines.index(rows["OTHER"]) + 1]
    assert reason.startswith("      unrouted: ")  # the hold code and reason, indented under its row
    assert not [value for value in _phi(state) if value in out]


def test_wide_puts_every_column_of_a_batch_on_one_line(state: SpooledState) -> None:
    out = _status(state, "--wide")
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("BATCH"))
    for column in ("MODALITY", "SERIES", "SIZE", "AGE", "STUDY", "LABELS", "CODE", "REASON", "NOTE"):
        assert column in header
    other = next(line for line in lines if re.match(rf"{state.batch_ids['OTHER']}  ", line))
    assert "unrouted" in other and "no rule" in other
    assert not [value for value in _phi(state) if value in out]


def test_the_note_is_shown_under_its_batch(state: SpooledState) -> None:
    import sqlite3  # noqa: PLC0415

    with sqlite3.connect(state.config.journal_path) as db:  # as `ingestd` notes a re-sent released study
        db.execute("UPDATE batches SET note = 'sent again after a release' WHERE id = ?", (state.batch_ids["OTHER"],))
    out = _status(state)
    assert "      note: sent again after a release" in out.splitlines()
    data = json.loads(_status(state, "--json"))
    assert _by_source(data, state)["OTHER"]["note"] == "sent again after a release"


def test_filters_choose_batches(state: SpooledState) -> None:
    data = status_data(state.config, running=False, now=NOW)

    def chosen(*filters: str) -> set[str]:
        parsed = parse_filters(filters)
        ids = {batch_id: name for name, batch_id in state.batch_ids.items()}
        return {ids[study["batch_id"]] for study in data["studies"] if parsed.matches(study)}

    assert chosen("state=held") == {"OTHER", "import"}
    assert chosen("state=held,reason=unrouted", "source=OTHER") == {"OTHER"}
    assert chosen("state=held,routed") == {"OTHER", "import", "SCANNER", "drop"}
    assert chosen("source=drop") == chosen("source=drop:drop") == {"drop"}
    assert chosen("source=import") == {"import"} and chosen("source=scanner") == {"SCANNER"}
    assert chosen("rule=raw-drop") == {"drop"} and chosen("modality=ct") == {"OTHER"}
    assert chosen("older-than=90m") == {"SCANNER", "OTHER"}
    assert chosen("newer-than=2h") == {"drop", "import"} and chosen("older-than=30m,newer-than=2h") == {"drop"}


@pytest.mark.parametrize(
    ("given", "said"),
    [
        ("stat=held", "no such key 'stat' (did you mean 'state'?); the keys are state, reason, source"),
        ("state=helt", "no such state (did you mean 'held'?); one of: receiving"),
        ("reason=unroutd", "no such hold code (did you mean 'unrouted'?)"),
        ("older-than=2 fortnights", "an age is a number and a unit (s, m, h, d, w), e.g. 30m, 2h or 3d"),
        ("newer-than=h", "an age is a number and a unit"),
        ("held", "write KEY=VALUE"),
        ("rule=", "give a value"),
    ],
)
def test_a_wrong_filter_names_what_is_valid(given: str, said: str) -> None:
    with pytest.raises(FilterError, match=None) as raised:
        parse_filters([given])
    assert said in str(raised.value)


def test_the_command_filters_and_refuses_a_wrong_key(state: SpooledState) -> None:
    out = _status(state, "--filter", "state=held,reason=unrouted", "--filter", "modality=CT")
    assert "1 of 4 studies (batches) match --filter state=held,reason=unrouted --filter modality=CT" in out
    assert "quarantined" not in out
    data = json.loads(_status(state, "--json", "--filter", "state=routed"))
    assert {study["state"] for study in data["studies"]} == {"routed"} and data["total_studies"] == 4
    wrong = run_ingestd("status", "--config", str(state.config_file), "--filter", "modalty=MR")
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert "no such key 'modalty' (did you mean 'modality'?)" in wrong.stderr


def test_ages() -> None:
    assert [parse_age(text) for text in ("90s", "30 min", "2hours", "3 days", "1w", "1.5h")] == [
        90,
        1800,
        7200,
        259200,
        604800,
        5400,
    ]


def test_long_reasons_and_labels_wrap_within_100_columns() -> None:
    study = {
        "batch_id": 123456,
        "state": "held",
        "modalities": ["MR", "PR", "SR", "KO"],
        "series": 12,
        "instances": 4096,
        "bytes": 1,
        "source_kind": "dicom",
        "source": "A_VERY_LONG_AE_T",
        "source_name": "A_VERY_LONG_AE_T",
        "first_received": time.time(),
        "age_seconds": 10,
        "quiet_seconds": 10,
        "study": "sha256:0123456789abcdef",
        "batch": 1,
        "rule": "a-rule-with-a-long-name",
        "labels": {"project": "P" * 20, "subject": "sha256:0123456789abcdef", "session": "sha256:fedcba9876543210"},
        "hold_code": "label-taken",
        "reason": "deliver: " + "the session label is taken by another study in XNAT " * 5,
        "note": None,
        "delivery": None,
    }
    data = {
        "exists": True,
        "health": {
            "running": True,
            "last_heartbeat_seconds_ago": 1.0,
            "spool_bytes": 0,
            "disk_free_bytes": 0,
            "held_by_reason": {f"code-{n}": n for n in range(20)},
        },
        "studies": [study],
        "quarantine": [],
        "superseded": [],
    }
    lines = list(render_status(data))
    assert max(len(line) for line in lines) <= WIDTH
    assert "MR/PR+2" in "\n".join(lines) and "a-rule-with…" in "\n".join(lines)
    assert any(line.startswith("      labels: " + "P" * 20) for line in lines)
    assert any(line.startswith("      label-taken: deliver: the session label") for line in lines)
    assert max(len(line) for line in render_status(data, wide=True)) > WIDTH


def test_retention_is_reported_and_purged_quarantine_items_are_counted_not_listed(state: SpooledState) -> None:
    """The retention line says when it last ran, what it removed and what is due; a quarantined item whose file
    retention removed is counted under the list (its row stays, in `--json` with `purged_at`)."""
    import sqlite3  # noqa: PLC0415

    out = _status(state)
    (line,) = [line for line in out.splitlines() if line.startswith("retention: ")]
    assert line.startswith("retention: not run yet; due now: "), line
    now = time.time()
    with sqlite3.connect(state.config.journal_path) as db:
        db.execute(
            "INSERT INTO quarantine (path, reason, source_kind, source, at, purged_at)"
            " VALUES ('q-old', 'not a DICOM file', 'drop', 'incoming', ?, ?)",
            (now - 40 * 86400, now - 86400),
        )
        db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (LAST_RUN_KEY, json.dumps({"at": now - 600, "purged": {"quarantine": [1, 2048], "released": [0, 0]}})),
        )
    out = _status(state)
    (line,) = [line for line in out.splitlines() if line.startswith("retention: ")]
    assert line.startswith("retention: last run 10m ago removed 1 quarantined items (2.0 KiB); due now: "), line
    assert "(1 more removed by retention: `--json` lists them)" in out and "q-old" not in out
    data = json.loads(_status(state, "--json"))
    (purged,) = [item for item in data["quarantine"] if item["path"] == "q-old"]
    assert purged["purged_at"] == pytest.approx(now - 86400)
    assert data["retention"]["last_run"] == pytest.approx(now - 600)
