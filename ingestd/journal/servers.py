"""The pause state of each XNAT server (the breaker's), as kept in the journal's meta table (`xnat_server:<name>`).

Written by the delivery's breaker (`ingestd.pipeline.breaker`), read by it after a restart and by the status read
model (`ingestd status`): here, below both, so that neither imports the other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ingestd.journal.store import Journal

__all__ = ["META_PREFIX", "ServerState", "server_states"]

META_PREFIX = "xnat_server:"


@dataclass
class ServerState:
    """Whether deliveries to one server are paused, since when, why, and when the next login is tried."""

    server: str
    paused: bool = False
    reason: str = ""
    since: float | None = None
    refusals: int = 0  # refused logins in a row
    probe_at: float = 0.0

    def as_dict(self, now: float) -> dict[str, object]:
        data: dict[str, object] = {"server": self.server, "state": "paused" if self.paused else "ok"}
        if self.paused:
            data.update(
                reason=self.reason,
                paused_seconds=round(now - (self.since or now), 1),
                refused_logins=self.refusals,
                next_login_in_seconds=round(max(0.0, self.probe_at - now), 1),
            )
        return data


def server_states(journal: Journal) -> list[ServerState]:
    """The pause state of every server the journal knows of (`ingestd status`, a restart)."""
    states = []
    for key, value in journal.meta_items(META_PREFIX):
        try:
            fields = json.loads(value)
            states.append(ServerState(**{**fields, "server": key.removeprefix(META_PREFIX)}))
        except (ValueError, TypeError):
            continue  # written by another version: ignored, the next refusal writes it again
    return states
