"""`ingestd status` as text: what `ingestd.status.status_data` found, for a lab admin at a terminal.

The default output fits 100 columns: a heading, then one compact row per batch (its id, state, modalities, series
and instances, source, when it arrived and how long it has been quiet, rule and XNAT labels), and under a row,
indented, what a person should read about it: the hold code and reason, a delivery waiting for another attempt,
the batch's note, and the labels when they do not fit the row. An attachment set (non-DICOM files attached to a
session as XNAT resources) has a row of its own: `files` for modalities, its resources once routed for series, its
files for instances; under it, while routed, its delivery step and how many of its files XNAT was seen holding.
A hold whose code asks something particular of a person (a missing XNAT session, a held study, an ambiguous or
conflicting file) gets a line saying what to do. `--wide` puts every column of a batch on one line,
however long; `--json` prints every field. Nothing here reads the journal: `status_data` did, and it names
studies and labels without patient data.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from ingestd.admin.statusfilter import FilterError, StudyFilter, parse_filters
from ingestd.config import Config

__all__ = ["WIDTH", "render_status", "show_status"]

WIDTH = 100  # the default output's widest line
_INDENT = "      "
# The compact row's columns: (header, widest cell before it is cut with "…", aligned right).
_COLUMNS = (
    ("BATCH", 7, True),
    ("STATE", 9, False),
    ("MOD", 7, False),
    ("SER", 4, True),
    ("INST", 6, True),
    ("SOURCE", 14, False),
    ("RECEIVED", 11, False),
    ("QUIET", 5, False),
    ("RULE", 12, False),
)
_WIDE = (
    "BATCH",
    "STATE",
    "MODALITY",
    "SERIES",
    "INST",
    "SIZE",
    "SOURCE",
    "RECEIVED",
    "AGE",
    "QUIET",
    "STUDY",
    "RULE",
    "LABELS",
    "CODE",
    "REASON",
    "NOTE",
)


def show_status(
    config: Config,
    *,
    running: bool,
    as_json: bool = False,
    wide: bool = False,
    show_uids: bool = False,
    show_paths: bool = False,
    filters: Sequence[str] = (),
    out: TextIO | None = None,
) -> int:
    """`ingestd status`: print the state of the spool and the journal; 0, or 2 for a filter that cannot apply."""
    from ingestd.status import status_data  # noqa: PLC0415 - only for this command

    out = out or sys.stdout
    try:
        chosen = parse_filters(filters)
    except FilterError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return 2
    data = status_data(config, running=running, show_uids=show_uids, show_paths=show_paths)
    if chosen:
        data["total_studies"] = len(data["studies"])
        data["studies"] = [study for study in data["studies"] if chosen.matches(study)]
        data["filter"] = list(chosen.given)
    if as_json:
        out.write(json.dumps(data, indent=2) + "\n")  # one write: json.dump writes each token on its own
        return 0
    for line in render_status(data, wide=wide, chosen=chosen):
        print(line, file=out)
    return 0


def age(seconds: float) -> str:
    """A duration as status shows it: `45s`, `12m`, `5h`, `3d`."""
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _when(at: float, *, seconds: bool = False) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%m-%d %H:%M", time.localtime(at))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _modalities(modalities: Sequence[str], width: int | None = None) -> str:
    """`MR`, `CT/PT`; in a narrow column as many as fit and how many more: `MR/PR+2`."""
    text = "/".join(modalities) or "-"
    if width is None or len(text) <= width:
        return text
    for shown in range(len(modalities) - 1, 0, -1):
        cut = "/".join(modalities[:shown]) + f"+{len(modalities) - shown}"
        if len(cut) <= width:
            return cut
    return f"{len(modalities)} kinds"[:width]


def _is_set(study: dict[str, Any]) -> bool:
    return study.get("kind") == "files"


def _kind_cell(study: dict[str, Any], width: int | None = None) -> str:
    return "files" if _is_set(study) else _modalities(study["modalities"], width)


def _series_cell(study: dict[str, Any]) -> str:
    """A study's series; an attachment set's resources once routed (`-` before)."""
    if _is_set(study):
        return "-" if study.get("resources") is None else str(study["resources"])
    return str(study["series"])


def _count_cell(study: dict[str, Any]) -> str:
    return str(study["files"] if _is_set(study) else study["instances"])


# What a person does about a hold that only attachment sets have (docs/xnat.md §5 says more).
HOLD_HINTS = {
    "no-session": "what to do: create or archive that session in XNAT (ingestd looks for it again every"
    " attachments.recheck_seconds), or fix the rule's labels and `ingestd retry`; `ingestd release` gives up",
    "study-held": "what to do: nothing for the set itself: it follows its study once that study is routed"
    " (`ingestd retry` the study); released for good, `ingestd release` this set too",
    "attach-ambiguous": "what to do: put each file in the folder of the study it belongs to and drop them again,"
    " or `ingestd release` the set and attach the files by hand",
    "attach-conflict": "what to do: XNAT holds a file of that name with other content: remove or rename it in the"
    " session's resource in XNAT, then `ingestd retry`",
}


def _hint(study: dict[str, Any]) -> str:
    if study.get("state") != "held":
        return ""
    return HOLD_HINTS.get(str(study.get("hold_code")), "")


def _labels(study: dict[str, Any]) -> str:
    labels = study.get("labels")
    if not labels:
        return "-"
    return f"{labels['project']}/{labels['subject']}/{labels['session']}"


def _reason(study: dict[str, Any]) -> str:
    """The hold code and reason (the code once: a reason usually starts with it)."""
    code, reason = study.get("hold_code"), study.get("reason") or ""
    if code and not reason.startswith(f"{code}:"):
        return f"{code}: {reason}" if reason else str(code)
    return reason


def _delivery(delivery: dict[str, Any] | None, files: bool = False) -> str:
    if delivery is None or delivery["step"] == "done":
        return ""
    text = f"delivery: {delivery['step']}"
    if delivery["attempts"] or delivery.get("faults"):
        tries = delivery["attempts"] + delivery.get("faults", 0)
        text += f", attempt {tries + 1} in {age(delivery['next_attempt_in_seconds'])}"
        text += f" ({delivery['last_error']})"
    if files:
        text += f", {delivery.get('verified', 0)} of {delivery.get('files', 0)} files verified"
    elif delivery.get("missing"):
        text += f", {delivery['missing']} of {delivery['instances']} instances not yet in XNAT"
    return text


def _wrap(text: str, indent: str = _INDENT) -> list[str]:
    """`text` in lines of at most WIDTH columns, broken at spaces only (a digest, code or path stays whole)."""
    lines = textwrap.wrap(
        text,
        WIDTH,
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return lines or [indent.rstrip()]


def _heading(data: dict[str, Any]) -> str:
    health = data["health"]
    beat = health["last_heartbeat_seconds_ago"]
    held = health["held_by_reason"]
    return (
        f"daemon {'running' if health['running'] else 'not running'}"
        + (f", last heartbeat {age(beat)} ago" if beat is not None else "")
        + f"; spool {size(health['spool_bytes'])} waiting, {size(health['disk_free_bytes'])} free"
        + ("; held: " + ", ".join(f"{count} {code}" for code, count in sorted(held.items())) if held else "")
    )


def _notices(data: dict[str, Any]) -> Iterator[str]:
    """The lines under the heading: servers paused, imports under way."""
    yield from (_paused(server) for server in data.get("xnat_servers", []) if server["state"] == "paused")
    yield from (_import(running) for running in data["health"].get("imports", []))


def _import(running: dict[str, Any]) -> str:
    """An `ingestd import` under way (ingestd.importprogress), as its progress file says."""
    counts = running["counts"]
    elapsed = age(max(0.0, time.time() - float(running["started"])))
    return (
        f"import under way (pid {running['pid']}, {elapsed}, {running['phase']}): files {counts['scanned']}/"
        f"{counts['files']} scanned, {counts['spooled']} instances spooled, {counts['known']} known,"
        f" {counts['quarantined']} quarantined; studies {counts['delivered']}/{counts['studies']} delivered,"
        f" {counts['held']} held"
    )


def _paused(server: dict[str, Any]) -> str:
    return (
        f"XNAT server {server['server']} PAUSED for {age(server['paused_seconds'])}"
        f" ({server['refused_logins']} refused logins; next login in {age(server['next_login_in_seconds'])}):"
        f" {server['reason']}; fix the account or the credentials, then reload (systemctl reload ingestd)"
        " to try at once; its studies wait in the spool"
    )


def _compact_cells(study: dict[str, Any]) -> list[str]:
    return [
        str(study["batch_id"]),
        study["state"],
        _kind_cell(study, _COLUMNS[2][1]),
        _series_cell(study),
        _count_cell(study),
        study["source_name"],
        _when(study["first_received"]),
        age(study["quiet_seconds"]),
        study["rule"] or "-",
    ]


def _compact(studies: list[dict[str, Any]]) -> Iterator[str]:
    rows = [
        [_cut(cell, width) for cell, (_h, width, _r) in zip(_compact_cells(study), _COLUMNS, strict=True)]
        for study in studies
    ]
    headers = [header for header, _width, _right in _COLUMNS]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, (_h, _w, right) in zip(cells, widths, _COLUMNS, strict=True)
        )

    yield line(headers) + "  LABELS"
    for study, row in zip(studies, rows, strict=True):
        text, labels = line(row), _labels(study)
        fits = len(text) + 2 + len(labels) <= WIDTH
        yield (text + "  " + labels) if fits else text.rstrip()
        details = [] if fits else [f"labels: {labels}"]
        delivery = _delivery(study["delivery"], _is_set(study))
        details += [part for part in (_reason(study), _hint(study), delivery) if part]
        if study.get("note"):
            details.append(f"note: {study['note']}")
        for detail in details:
            yield from _wrap(detail)


def _wide(studies: list[dict[str, Any]], show_seconds: bool = True) -> Iterator[str]:
    rows = [
        [
            str(s["batch_id"]),
            s["state"],
            _kind_cell(s),
            _series_cell(s),
            _count_cell(s),
            size(s["bytes"]),
            s["source_name"],
            _when(s["first_received"], seconds=show_seconds),
            age(s["age_seconds"]),
            age(s["quiet_seconds"]),
            f"{s['study']}#{s['batch']}",
            s["rule"] or "-",
            _labels(s),
            s["hold_code"] or "-",
            (_reason(s) or _delivery(s["delivery"], _is_set(s))) or "-",
            s.get("note") or "-",
        ]
        for s in studies
    ]
    widths = [max(len(row[i]) for row in [list(_WIDE), *rows]) for i in range(len(_WIDE))]
    for row in [list(_WIDE), *rows]:
        yield "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()


_KIND_WORDS = {
    "delivered": "delivered batches' kept copies",
    "released": "released batches",
    "quarantine": "quarantined items",
    "receipts": "receipts",
    "outgoing": "outgoing rows",
}


def _retention(retention: dict[str, Any] | None) -> str:
    """One line: when retention last ran and what it removed, and what it would remove now."""
    if not retention:
        return "retention: not reported"

    def amounts(counts: dict[str, Any] | None) -> str:
        parts = [
            f"{count} {_KIND_WORDS.get(kind, kind)}" + (f" ({size(int(nbytes))})" if nbytes else "")
            for kind, (count, nbytes) in (counts or {}).items()
            if count
        ]
        return ", ".join(parts) or "nothing"

    last = retention.get("last_run")
    text = "retention: " + (
        "not run yet"
        if last is None
        else f"last run {age(time.time() - float(last))} ago removed " + amounts(retention.get("last_purged"))
    )
    return text + f"; due now: {amounts(retention.get('would_purge'))} (`ingestd purge --dry-run` lists them)"


def render_status(data: dict[str, Any], *, wide: bool = False, chosen: StudyFilter | None = None) -> Iterator[str]:
    """The lines of `ingestd status` (every one at most WIDTH columns unless `wide`)."""
    if not data["exists"]:
        yield f"no journal yet at {data['journal']}: nothing received"
        return

    def fit(text: str, indent: str = "") -> list[str]:
        return [text] if wide else _wrap(text, indent)

    yield from fit(_heading(data))
    for notice in _notices(data):
        yield from fit(notice, "  ")
    studies, quarantine = data["studies"], data["quarantine"]
    count = f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} (batches)"
    sets = sum(1 for study in studies if _is_set(study))
    if sets:
        dicom = len(studies) - sets
        count = (
            f"{len(studies)} batches: {dicom} study batch{'es' * (dicom != 1)},"
            f" {sets} attachment set{'s' * (sets != 1)}"
        )
    if chosen:
        count = f"{len(studies)} of {data.get('total_studies', len(studies))} studies (batches) match"
        count += f" --filter {' --filter '.join(chosen.given)}"
    yield from fit(count)
    if studies:
        yield from _wide(studies) if wide else _compact(studies)
    if chosen:
        return  # a filter asks about batches: the quarantine and superseded copies are not batches
    yield from fit(_retention(data.get("retention")))
    yield ""
    purged = [item for item in quarantine if item.get("purged_at") is not None]
    quarantine = [item for item in quarantine if item.get("purged_at") is None]
    yield f"{len(quarantine)} quarantined item{'s' if len(quarantine) != 1 else ''}" + (
        f" ({len(purged)} more removed by retention: `--json` lists them)" if purged else ""
    )
    for item in quarantine:
        came = f" from {item['original_path']}" if item.get("original_path") else ""
        text = f"{_when(item['at'], seconds=True)}  {item['path']}  ({item['source_kind']}:{item['source']}{came}):"
        if wide:
            yield f"  {text} {item['reason']}"
        else:
            yield from _wrap(text, "  ")
            yield from _wrap(item["reason"])
    superseded = data.get("superseded", [])
    if superseded:
        yield ""
        yield from fit(
            f"{len(superseded)} earlier cop{'y' if len(superseded) == 1 else 'ies'} of instances kept aside"
            " (a copy with different content replaced each; the new one is delivered)"
        )
        for item in superseded:
            yield from fit(
                f"{_when(item['superseded_at'], seconds=True)}  {item['study']} batch {item['batch_id']} instance"
                f" {item['instance']}  ({item['source_kind']}:{item['source']}, {size(item['bytes'])})  {item['path']}",
                "  ",
            )
