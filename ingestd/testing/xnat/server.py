"""The public facade: `FakeXnat` starts, configures, injects faults into and inspects the stand-in."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

from ingestd.testing.xnat.api import _Api
from ingestd.testing.xnat.faults import _FaultInjection
from ingestd.testing.xnat.handler import _Server
from ingestd.testing.xnat.model import ExperimentRecord, ResourceState, _Config, _Project, _Resource, _User
from ingestd.testing.xnat.store import _Store

LOG = logging.getLogger("ingestd.testing.xnat")

# --------------------------------------------------------------------------------------------------------------
# The public facade
# --------------------------------------------------------------------------------------------------------------


class FakeXnat(_FaultInjection):
    """An XNAT 1.8 stand-in on a local port (see the package docstring for the API and its limits)."""

    _api: _Api

    def __init__(
        self,
        *,
        version: str = "1.8.10",
        host: str = "127.0.0.1",
        port: int = 0,
        idle_build_seconds: float = 300.0,
        rebuild_repeat_seconds: float = 60.0,
        session_timeout_seconds: float = 900.0,
        archive_timeout_seconds: float = 600.0,
        operation_seconds: float = 0.0,
        site_id: str = "XNAT",
        use_sop_instance_uid: bool = True,
        token_lifetime_seconds: float = 2 * 24 * 3600.0,
        max_failed_logins: int = 20,
        lockout_seconds: float = 3600.0,
        password_expiration_seconds: float | None = None,
        require_login: bool = True,
        context_path: str = "",
        lastmod_refresh_seconds: float | None = None,
        extra_scan_resources: Sequence[str] = (),
        checksums: bool = True,
    ) -> None:
        context_path = context_path.rstrip("/")
        if context_path and not context_path.startswith("/"):
            raise ValueError(f"context_path must be empty or start with '/': {context_path!r}")
        if lastmod_refresh_seconds is None:  # XNAT's 15 s against its 5-minute idle build, scaled like the idle time
            lastmod_refresh_seconds = min(15.0, idle_build_seconds / 20)
        self._config = _Config(
            version=version,
            site_id=site_id,
            idle_build_seconds=idle_build_seconds,
            rebuild_repeat_seconds=rebuild_repeat_seconds,
            session_timeout_seconds=session_timeout_seconds,
            archive_timeout_seconds=archive_timeout_seconds,
            operation_seconds=operation_seconds,
            use_sop_instance_uid=use_sop_instance_uid,
            token_lifetime_seconds=token_lifetime_seconds,
            max_failed_logins=max_failed_logins,
            lockout_seconds=lockout_seconds,
            password_expiration_seconds=password_expiration_seconds,
            require_login=require_login,
            context_path=context_path,
            lastmod_refresh_seconds=lastmod_refresh_seconds,
            extra_scan_resources=tuple(extra_scan_resources),
            checksums=checksums,
        )
        self._timers: list[tuple[threading.Timer, Callable[[], None]]] = []
        self._host = host
        self._port = port
        self._store = _Store(self._config)
        self._jobs = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fake-xnat-job")
        self._api = _Api(self._store, self._config, self._jobs, lambda: self.url)
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeXnat is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{self._config.context_path}"

    @property
    def version(self) -> str:
        return self._config.version

    def start(self) -> FakeXnat:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._api.stopping.clear()
        self._server = _Server((self._host, self._port), self._api)
        server_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-xnat-http", daemon=True
        )
        builder_thread = threading.Thread(target=self._builder_loop, name="fake-xnat-idle-builder", daemon=True)
        self._threads = [server_thread, builder_thread]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop the HTTP server, the idle builder and the job pool, and wait for them."""
        server, self._server = self._server, None
        self._stopping.set()
        self._api.stopping.set()
        for timer, release in self._timers:
            timer.cancel()
            release()
        self._timers = []
        if server is not None:
            server.shutdown()
            server.close_connections()
            server.server_close()
        with self._api._log_lock:
            background, self._api.background = self._api.background, []
        for thread in [*self._threads, *background]:
            thread.join(timeout=10)
        self._threads = []
        self._jobs.shutdown(wait=True)
        self._jobs = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fake-xnat-job")
        self._api.jobs = self._jobs

    def __enter__(self) -> FakeXnat:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _builder_loop(self) -> None:
        while not self._stopping.wait(self._config.rebuild_repeat_seconds):
            try:
                self._store.idle_pass(ignore_idle=False)
            except Exception:
                LOG.exception("fake XNAT idle builder failed")

    # -- set-up -------------------------------------------------------------------------------------------------

    def add_user(self, username: str, password: str, *, admin: bool = False) -> None:
        with self._store.lock:
            self._store.users[username] = _User(username, password, admin)

    def add_project(
        self,
        project_id: str,
        *,
        owners: Iterable[str] = (),
        members: Iterable[str] = (),
        collaborators: Iterable[str] = (),
        prearchive_code: int = 0,
        aliases: Iterable[str] = (),
        name: str | None = None,
    ) -> None:
        project = _Project(
            project_id,
            name or project_id,
            set(owners),
            set(members),
            set(collaborators),
            prearchive_code,
            tuple(aliases),
        )
        with self._store.lock:
            self._store.projects[project_id] = project

    def issue_token(self, username: str) -> tuple[str, str]:
        """An alias token for `username`: (alias UUID, secret), usable as Basic credentials."""
        token = self._store.issue_token(username)
        return token.alias, token.secret

    def expire_sessions(self) -> None:
        """Invalidate every JSESSIONID (clients must log in again)."""
        with self._store.lock:
            self._store.sessions.clear()

    # -- accounts and tokens ------------------------------------------------------------------------------------

    def _user(self, username: str) -> _User:
        user = self._store.users.get(username)
        if user is None:
            raise KeyError(f"no user {username!r}")
        return user

    def expire_tokens(self, username: str | None = None) -> int:
        """What XNAT's alias-token sweep does to tokens past `aliasTokenTimeout` (ClearExpiredAliasTokens ->
        HibernateAliasTokenService.invalidateExpiredTokens deletes them), for every token of `username` (or of
        everyone) now; returns how many were removed."""
        with self._store.lock:
            doomed = [a for a, t in self._store.tokens.items() if username is None or t.username == username]
            for alias in doomed:
                del self._store.tokens[alias]
        return len(doomed)

    def failed_logins(self, username: str) -> int:
        """The account's failed-login count (xhbm_xdat_user_auth.failed_login_attempts; it keeps counting while
        locked and drops to 0 on a success or when the lockout ends)."""
        with self._store.lock:
            user = self._user(username)
            self._store._unlock_if_due(user)
            return user.failed_logins

    def is_locked(self, username: str) -> bool:
        """Whether the account is locked out after `max_failed_logins` failures (until `lockout_seconds` pass)."""
        with self._store.lock:
            user = self._user(username)
            self._store._unlock_if_due(user)
            return user.locked_at is not None

    def expire_password(self, username: str) -> None:
        """Make the account's password expired (as if last set longer ago than the site's passwordExpirationInterval):
        its authenticated requests then answer 302 to the change-password page (sessions already found not expired
        keep working)."""
        with self._store.lock:
            self._user(username).password_expired = True

    def set_password(self, username: str, password: str) -> None:
        """Change the account's password (clears an expired password; password_updated = now)."""
        with self._store.lock:
            user = self._user(username)
            user.password, user.password_expired, user.password_updated = password, False, time.time()

    def disable_user(self, username: str, *, inactivity: bool = False) -> None:
        """Disable the account. By an admin (`inactivity=False`): every login (password, token, form) fails with 401
        and counts as a failed login. For inactivity (`inactivity=True`, what XNAT's DisableInactiveUsers job does):
        the password still logs in, then every authenticated request answers 302 to the inactive-account page; tokens
        fail (Users.validateUserLogin). Existing sessions are left alone [INF]."""
        with self._store.lock:
            user = self._user(username)
            user.enabled, user.inactive = False, inactivity

    def unverify_user(self, username: str) -> None:
        """Mark the account's email as unverified (site preference emailVerification, default on): logins fail with
        401 (XnatDatabaseAuthenticationProvider.additionalAuthenticationChecks: CredentialsExpiredException)."""
        with self._store.lock:
            self._user(username).verified = False

    def enable_user(self, username: str) -> None:
        """Undo `disable_user` / `unverify_user` / a lockout (as an admin enabling and verifying the account)."""
        with self._store.lock:
            user = self._user(username)
            user.enabled, user.inactive, user.verified = True, False, True
            user.failed_logins, user.locked_at = 0, None

    # -- inspection ---------------------------------------------------------------------------------------------

    def prearchive_rows(self, project: str | None = None) -> list[dict[str, str]]:
        """The prearchive rows (§5.1 dicts), optionally of one project (or "Unassigned")."""
        with self._store.lock:
            return [r.as_dict() for r in self._store.rows.values() if project is None or r.project_label == project]

    def prearchive_files(self, project: str | None = None) -> dict[str, dict[str, str]]:
        """The files every prearchive row holds now, built or not: row url -> file name -> SOP Instance UID."""
        with self._store.lock:
            return {
                row.url: {name: file.dicom.sop_uid for files in row.scans.values() for name, file in files.items()}
                for row in self._store.rows.values()
                if project is None or row.project_label == project
            }

    def experiments(self, project: str | None = None) -> list[ExperimentRecord]:
        """Snapshots of the archived imaging sessions, optionally of one project."""
        with self._store.lock:
            return [e.record() for e in self._store.experiments.values() if project is None or e.project == project]

    def archived_files(self, project: str, label: str) -> dict[str, bytes]:
        """The stored files of an archived session, keyed `<scan id>/<file name>` (tests assert on the bytes)."""
        with self._store.lock:
            for experiment in self._store.experiments.values():
                if experiment.project == project and experiment.label == label:
                    return {
                        f"{scan_id}/{name}": file.data
                        for scan_id, scan in experiment.scans.items()
                        for name, file in scan.files.items()
                    }
        return {}

    def resource_state(
        self,
        project: str,
        resource: str,
        *,
        session: str | None = None,
        scan: str | None = None,
        subject: str | None = None,
        prearchive: tuple[str, str] | None = None,
    ) -> ResourceState | None:
        """What one resource holds on disk and lists in its catalog (they part ways after an interrupted upload):
        an archived session's (`session`, with `scan` for a scan's), a subject's (`subject`), or a prearchive
        session's (`prearchive=(timestamp, folder)`). None if there is no such resource."""
        with self._store.lock:
            owner: dict[str, _Resource] = {}
            if prearchive is not None:
                row = self._store.rows.get((project, *prearchive))
                owner = row.resources if row else {}
            elif session is not None:
                experiment = self._store.experiments.get((project, session))
                found = experiment.scans.get(scan) if experiment and scan is not None else None
                owner = found.resources if found else experiment.resources if experiment and scan is None else {}
            elif subject is not None:
                known = self._store.subjects.get((project, subject))
                owner = known.resources if known else {}
            found_resource = owner.get(resource)
            return found_resource.state() if found_resource else None

    @property
    def body_framing(self) -> list[tuple[str, str, int | None, bool]]:
        """(method, path+query, Content-Length or None, chunked) of every request that sent a body header."""
        with self._api._log_lock:
            return list(self._api.framing)

    @property
    def requests_log(self) -> list[tuple[str, str, int]]:
        """(method, path+query, status) of every request so far."""
        with self._api._log_lock:
            return list(self._api.log)

    def build_now(self) -> None:
        """Run the idle builder once now, ignoring the idle time (auto-archive included)."""
        self._store.idle_pass(ignore_idle=True)
