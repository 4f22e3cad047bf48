"""The XNAT servers the deliverer talks to: one logged-in client each, the pause after a refused login (see
`ingestd.pipeline.breaker`), and the alias tokens ingestd renews before XNAT lets them expire."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import structlog

from ingestd.config import XnatServer
from ingestd.journal import Journal
from ingestd.journal.retries import wake_requested
from ingestd.pipeline.breaker import Breaker
from ingestd.xnat import XnatClient, XnatError, XnatLoginError, save_credentials_file

__all__ = ["XnatServers"]

log = structlog.get_logger("ingestd.deliver")


class XnatServers:
    """The configured servers' clients, pauses and tokens, as the delivery thread uses them (one thread only)."""

    def __init__(self, journal: Journal, servers: Mapping[str, XnatServer], progress: Callable[[], None]) -> None:
        self._servers = servers
        self._progress = progress  # what every client calls while it waits for XNAT (the worker's beat)
        self._journal = journal
        self._woken = wake_requested(journal)  # the last `ingestd retry --now` seen (a start tries paused ones anyway)
        self.breaker = Breaker(journal)
        self.clients: dict[str, XnatClient] = {}
        self._token_due: dict[str, float] = {}  # server -> when to look at its alias token again

    def client(self, name: str, server: XnatServer) -> XnatClient:
        client = self.clients.get(name)
        if client is None:
            client = self.clients[name] = XnatClient(name, server, progress=self._progress)
        return client

    def reconfigure(self, servers: Mapping[str, XnatServer]) -> None:
        """Use reloaded server settings and credentials: every client logs out, and its next request logs in with
        the credentials read then (a reload is what an admin does after fixing them: a session opened with the old
        ones, still valid, would otherwise go on as the old account); paused servers are tried now."""
        self._servers = servers
        for name in list(self.clients):
            self.clients.pop(name).close()
        self.breaker.wake()
        self._token_due.clear()

    def _wake_if_asked(self) -> None:
        """Try paused servers now if `ingestd retry --now` asked for it since the last look (a meta row). A request
        made while none was paused is spent all the same: it must not wake a pause that began after it."""
        asked = wake_requested(self._journal)
        if asked <= self._woken:
            return
        self._woken = asked
        paused = self.breaker.paused()
        if paused:
            self.breaker.wake()
            log.info("xnat.wake_requested", servers=paused)

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def admit(self, name: str) -> bool:
        """Whether batches of server `name` may take steps in this check: it is not paused, or the one login tried
        now (when its pause is due to end) went through. Also looks after its alias token, if it logs in with one."""
        server = self._servers.get(name)
        if server is None:
            return True  # the step holds the batch: no such server
        self._wake_if_asked()
        now = time.time()
        if self.breaker.probe_due(name, now):
            client = self.client(name, server)
            try:
                client.close()
                client.login()
            except XnatLoginError as exc:
                self.breaker.refused(name, server, str(exc), now)
                return False
            except XnatError as exc:  # XNAT down or slow: try the login again later, no refusal counted
                self.breaker.postpone(name, server.poll_interval_seconds * 6, now)
                log.warning("xnat.login_probe_failed", server=name, error=str(exc))
                return False
            self.breaker.accepted(name, now)
        if not self.breaker.admits(name, now):
            return False
        if now >= self._token_due.get(name, 0.0):
            self._tend_token(name, server)
        return self.breaker.admits(name, now)

    def _tend_token(self, name: str, server: XnatServer) -> None:
        """Renew the alias token the server's credentials file holds before XNAT lets it expire (2 days after it was
        issued by default: aliasTokenTimeout); warn when the token comes from .netrc or the environment."""
        now = time.time()
        self._token_due[name] = now + 3600.0
        client = self.client(name, server)
        try:
            info = client.token_info()
            if info is None or info.expires_at is None:
                return
            left = info.expires_at - now
            if left > server.token_renew_seconds:
                self._token_due[name] = min(now + 3600.0, info.expires_at - server.token_renew_seconds)
                return
            if server.credentials.file is None:
                log.warning(
                    "xnat.token_expiring",
                    server=name,
                    expires_in_seconds=round(left),
                    detail="issue a new alias token in XNAT and update the credentials, or use a credentials file,"
                    " which ingestd renews by itself",
                )
                return
            alias, secret, expires_at = client.issue_token()
            save_credentials_file(server.credentials.file, alias, secret)
            client.close()  # the next request logs in with the new token
            log.info(
                "xnat.token_renewed",
                server=name,
                expires_in_seconds=None if expires_at is None else round(expires_at - now),
            )
        except XnatLoginError as exc:
            self.breaker.refused(name, server, str(exc), now)
        except (XnatError, OSError) as exc:
            self._token_due[name] = now + 600.0
            log.warning("xnat.token_check_failed", server=name, error=str(exc))
