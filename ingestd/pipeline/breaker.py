"""A pause per XNAT server after a refused login (a circuit breaker), so that no batch hammers a refusing XNAT.

A refused login (wrong credentials, an expired password or alias token, a disabled or locked account) is the same
for every batch of a server, and retrying it batch by batch would soon lock the account: XNAT locks it after
`maxFailedLogins` failed logins (20 by default) for `failedLoginLockoutDuration` (1 hour; xdat's
XnatProviderManager / XDATUserDetails, see docs/xnat.md). So the first refusal pauses every delivery to that
server. Batches keep their place and their attempt counts; none is held for it. While paused, one login is tried
(the probe) once per back-off, doubling from `login_pause.initial_seconds` up to `login_pause.max_seconds`: with
the defaults (60 s, 1 h) at most 7 failed logins in the first hour, and 1 an hour after. A reload (SIGHUP) or a
restart probes at once: that is what an admin does after fixing the credentials.

The state of each server is kept in the journal's meta table (`xnat_server:<name>`), for `ingestd status`, and in
memory for `/healthz` and `/metrics` (`ingestd_xnat_server_paused{server}`).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict

import structlog

from ingestd.config import XnatServer
from ingestd.journal import Journal
from ingestd.journal.servers import META_PREFIX, ServerState, server_states
from ingestd.metrics import LOGIN_REFUSALS, SERVER_PAUSED

__all__ = ["META_PREFIX", "Breaker", "ServerState", "server_states"]

log = structlog.get_logger("ingestd.breaker")


class Breaker:
    """The pause state of every server, shared by the deliverer (which changes it) and the daemon (which reads it)."""

    def __init__(self, journal: Journal | None) -> None:
        self._journal = journal
        self._lock = threading.Lock()
        self._states: dict[str, ServerState] = {}
        if journal is not None:
            for state in server_states(journal):
                if state.paused:
                    state.probe_at = 0.0  # a restart tries once at once: the credentials may have been fixed
                    self._states[state.server] = state
                    SERVER_PAUSED.labels(server=state.server).set(1)

    def admits(self, server: str, now: float) -> bool:
        """Whether a batch of `server` may take a step now (not paused)."""
        with self._lock:
            state = self._states.get(server)
            return state is None or not state.paused

    def probe_due(self, server: str, now: float) -> bool:
        """Whether `server` is paused and its next login try is due."""
        with self._lock:
            state = self._states.get(server)
            return state is not None and state.paused and now >= state.probe_at

    def refused(self, server: str, settings: XnatServer, reason: str, now: float) -> None:
        """A login was refused: pause `server` (or stay paused) and schedule the next try."""
        with self._lock:
            state = self._states.setdefault(server, ServerState(server))
            first = not state.paused
            state.refusals += 1
            pause = settings.login_pause
            wait = min(pause.max_seconds, pause.initial_seconds * 2 ** (state.refusals - 1))
            state.paused, state.reason, state.probe_at = True, reason, now + wait
            state.since = now if first else state.since
            snapshot = ServerState(**asdict(state))
        LOGIN_REFUSALS.labels(server=server).inc()
        SERVER_PAUSED.labels(server=server).set(1)
        self._save(snapshot)
        log.error(
            "xnat.server_paused",
            first=first,
            server=server,
            reason=reason,
            refused_logins=snapshot.refusals,
            next_login_in_seconds=round(wait, 1),
        )

    def postpone(self, server: str, seconds: float, now: float) -> None:
        """The probe could not reach XNAT (down, timed out): try again later, without counting a refusal."""
        with self._lock:
            state = self._states.get(server)
            if state is not None and state.paused:
                state.probe_at = now + seconds

    def accepted(self, server: str, now: float) -> None:
        """A login went through: resume deliveries to `server` if they were paused."""
        with self._lock:
            state = self._states.get(server)
            if state is None or not state.paused:
                return
            paused_for = now - (state.since or now)
            self._states[server] = snapshot = ServerState(server)
        SERVER_PAUSED.labels(server=server).set(0)
        self._save(snapshot)
        log.info("xnat.server_resumed", server=server, paused_seconds=round(paused_for, 1))

    def wake(self) -> None:
        """Try every paused server at the next check (a reload: the credentials may have been fixed)."""
        with self._lock:
            for state in self._states.values():
                state.probe_at = 0.0

    def states(self, now: float | None = None) -> dict[str, dict[str, object]]:
        """Every server that was ever paused, as /healthz shows it."""
        now = time.time() if now is None else now
        with self._lock:
            return {name: state.as_dict(now) for name, state in sorted(self._states.items())}

    def paused(self) -> list[str]:
        with self._lock:
            return sorted(name for name, state in self._states.items() if state.paused)

    def _save(self, state: ServerState) -> None:
        if self._journal is not None:
            self._journal.set_meta(f"{META_PREFIX}{state.server}", json.dumps(asdict(state)))
