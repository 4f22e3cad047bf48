"""What each page shows, as plain data for its template: built from `ingestd.status.status_data`, the read model
`ingestd status` prints, so that the page names studies exactly as the command does (digests, de-identified labels,
modalities, counts and times; never original UIDs, paths or identifying labels: `status_data` is called without
`show_uids` / `show_paths`, and nothing here reads the journal or the spool itself).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ingestd.admin.statusfilter import FILTER_KEYS, StudyFilter, parse_filters
from ingestd.config import Config
from ingestd.states import StudyState
from ingestd.ui.hints import hold_hint

__all__ = ["filters_from_query", "form_values", "overview", "quarantine", "studies", "study"]

Health = Callable[[], dict[str, Any]]


def filters_from_query(query: Mapping[str, Sequence[str]]) -> StudyFilter:
    """`?state=held&reason=unrouted` as `--filter` options; FilterError as the command refuses them."""
    texts = [f"{key}={value}" for key in FILTER_KEYS for value in query.get(key, ()) if value.strip()]
    return parse_filters(texts)


def form_values(query: Mapping[str, Sequence[str]], chosen: StudyFilter) -> dict[str, tuple[str, ...]]:
    """What the studies form shows as chosen: the filters applied, and the ages as typed (`older-than=2h`)."""
    values = dict(chosen.values)
    for key in ("older-than", "newer-than"):
        typed = [value.strip()[:20] for value in query.get(key, ()) if value.strip()]
        if typed:
            values[key] = (typed[-1],)  # the last one given is the one applied
    return values


def _health(health: Health) -> dict[str, Any]:
    try:
        return health()
    except Exception as exc:  # noqa: BLE001 - the page still shows the rest: "not healthy, and why"
        return {"status": "failing", "live": False, "ready": False, "detail": f"health check failed: {exc!r}"[:200]}


def overview(config: Config, health: Health, data: dict[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """The overview: service health (the /healthz facts), batches by state, held batches by hold code, spool free
    space, last heartbeat, the listener, the drop folders and the XNAT servers with their pause state."""
    now = time.time() if now is None else now
    facts = _health(health)
    counts = {state.value: 0 for state in StudyState}
    for study in data.get("studies", []):
        counts[study["state"]] = counts.get(study["state"], 0) + 1
    status_health = data.get("health", {})
    paused = {server["server"]: server for server in data.get("xnat_servers", [])}
    breaker = facts.get("xnat") or {}
    servers = [
        {
            "name": name,
            "url": server.url,
            "state": (breaker.get(name) or paused.get(name) or {"state": "ok"}).get("state", "ok"),
            "reason": (paused.get(name) or {}).get("reason"),
        }
        for name, server in sorted(config.xnat.servers.items())
    ]
    listener = config.listener
    return {
        "health": facts,
        "services": sorted((facts.get("services") or {}).items()),
        "counts": counts,
        "held_by_reason": sorted(status_health.get("held_by_reason", {}).items()),
        "disk_free_bytes": status_health.get("disk_free_bytes"),
        "spool_bytes": status_health.get("spool_bytes"),
        "heartbeat_seconds_ago": status_health.get("last_heartbeat_seconds_ago"),
        "listener": {"ae_title": listener.ae_title, "host": listener.host, "port": listener.port}
        if listener.enabled
        else None,
        "drop_folders": [{"name": folder.path.name, "path": str(folder.path)} for folder in config.drop_folders],
        "servers": servers,
        "quarantined": sum(1 for item in data.get("quarantine", []) if item.get("purged_at") is None),
        "now": now,
    }


def studies(data: dict[str, Any], chosen: StudyFilter) -> dict[str, Any]:
    """The study list, newest first, with the filters applied and what a hold asks of a person."""
    rows = [
        dict(study, hint=_hint(study), reason_text=_reason(study))
        for study in data.get("studies", [])
        if chosen.matches(study)
    ]
    return {"studies": rows, "total": len(data.get("studies", []))}


def study(data: dict[str, Any], batch_id: int) -> dict[str, Any] | None:
    """One batch as `ingestd status --json` lists it, with what a hold asks of a person; None for an unknown id."""
    for row in data.get("studies", []):
        if row.get("batch_id") == batch_id:
            held = row.get("state") == StudyState.HELD
            return dict(row, hint=hold_hint(row.get("hold_code")) if held else "", reason_text=_reason(row))
    return None


def _reason(study: Mapping[str, Any]) -> str:
    """The reason without the hold code it starts with (the page shows the code beside it)."""
    code, reason = study.get("hold_code"), str(study.get("reason") or "")
    return reason.removeprefix(f"{code}:").strip() if code else reason


def _hint(study: Mapping[str, Any]) -> str:
    """What a hold asks of a person, as the study's page says it (`HOLD_HINTS` alone knows only the attachment
    sets' codes: a study held `unrouted` had no hint in the list)."""
    if study.get("state") != StudyState.HELD:
        return ""
    return hold_hint(study.get("hold_code"))


def _source_name(config: Config, kind: str, source: str) -> str:
    """Where a quarantined item came from without its path: the AE title, `drop:<folder>` or `import`."""
    if kind == "dicom":
        return source
    for folder in config.drop_folders:
        if str(folder.path) == source:
            return f"drop:{folder.path.name}"
    return "import" if kind == "folder" else kind


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def quarantine(config: Config, data: dict[str, Any]) -> dict[str, Any]:
    """Quarantined items still kept, newest first: reason, size, when and the kind of source (no original path)."""
    items = [
        {
            "item": item["path"],
            "reason": item["reason"],
            "source": _source_name(config, str(item["source_kind"]), str(item["source"])),
            "at": item["at"],
            "bytes": _size(config.quarantine_dir / item["path"]),
        }
        for item in data.get("quarantine", [])
        if item.get("purged_at") is None
    ]
    items.sort(key=lambda item: item["at"], reverse=True)
    return {"items": items}
