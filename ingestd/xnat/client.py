"""The XNAT client: one logged-in `requests.Session` per server, and failures classified where they are born.

XNAT answers errors as HTML status pages (sometimes with status 200), uses 500 for archive conflicts, and
silently routes an unknown project to `Unassigned` (see docs/xnat.md). So every response
is checked here: an HTML body is an error whatever the status; each failure becomes an `XnatError` that says
whether trying again later can help (`retryable`: connection errors, timeouts, 5xx, 429) or not (other 4xx,
XNAT's own messages such as a conflict on archive, the 500s XNAT answers for permanent problems). A refused login
(bad credentials, a locked account, an expired password or alias token, a disabled account) is an
`XnatLoginError`: no batch can do anything about it, so the deliverer pauses the whole server instead (see
ingestd.pipeline.breaker). Credentials are read again at every login (a rotated password or a renewed alias token is
taken up without a restart), kept out of every message and `repr`; the session cookie is reused; a 401, or a 403 on a
site open to guests, logs in again once. An unexpected redirect is an error that names where it pointed. How each
of these follows xnat-web's source: docs/xnat.md.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

import requests
import requests.adapters

from ingestd import __version__
from ingestd.config import XnatServer
from ingestd.states import HoldCode
from ingestd.xnat.credentials import _Secret, is_alias_token, load_credentials
from ingestd.xnat.errors import XnatError, XnatLoginError
from ingestd.xnat.responses import (
    Holdings,
    PrearchiveRow,
    TokenInfo,
    _catalog_entries,
    _dicom_resources,
    _epoch,
    _is_html,
    _json,
    _message,
    _rows,
    _uri_list,
)

__all__ = ["XnatClient"]


# XNAT locks an account after `maxFailedLogins` failed logins (20 by default) for `failedLoginLockoutDuration`
# (1 hour): xdat XDATUserDetails / XnatProviderManager count them. Where XNAT's answers say which refusal it is:
# web XnatExpiredPasswordFilter (SecurityConfig.java:195-200 sets the pages): with Basic credentials an expired
# password answers 403 "Your password has expired...", an unknown or expired alias token 403 "Your security token
# has expired or is invalid..."; with a session, an expired password redirects to XDATScreen_UpdateUser.vm and a
# disabled (or not yet verified) account to InactiveAccount.vm.
_LOGIN_PAGES = (
    (
        "XDATScreen_UpdateUser.vm",
        "the account's password has expired: change it in XNAT (My Account), then update "
        "the credentials ingestd reads; a service account should have the non_expiring role",
    ),
    ("InactiveAccount.vm", "the account is disabled or not verified: an XNAT admin must enable it"),
    ("ChangePassword", "the account's password has expired: change it in XNAT, then update the credentials"),
)
_LOGIN_403 = (
    (
        "password has expired",
        "the account's password has expired: change it in XNAT (My Account), then update "
        "the credentials ingestd reads; a service account should have the non_expiring role",
    ),
    (
        "security token has expired",
        "the alias token has expired or was revoked: issue a new one in XNAT "
        "(My Account > Manage alias tokens) and update the credentials ingestd reads",
    ),
)

# The 500s XNAT answers for problems no retry can fix (xnat-web, see docs/xnat.md): retried for days they would
# only hide the problem. Matched against XNAT's message (the status page's text).
_PERMANENT_500 = re.compile(r"No project named|anonymi[sz]ation script|DicomEdit", re.IGNORECASE)


class _LargeBlocks(requests.adapters.HTTPAdapter):
    """Send request bodies in 1 MiB blocks: urllib3's default of 16 KiB held a zip upload to half of curl's rate."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["blocksize"] = 1 << 20
        super().init_poolmanager(*args, **kwargs)


class _ReportingFile(io.FileIO):
    """A file to upload that calls `progress` on every read: urllib3 sends a body in 1 MiB reads, so a long
    upload keeps telling the daemon's watchdog that the deliverer is not wedged."""

    def __init__(self, path: Path, progress: Callable[[], None] | None) -> None:
        super().__init__(path, "r")
        self._progress = progress

    def read(self, size: int | None = -1, /) -> bytes:
        if self._progress is not None:
            self._progress()
        return super().read(size)


class XnatClient:
    """A connection to one XNAT server. Not thread-safe: one delivery worker uses it at a time.

    `progress`, if set, is called before every request and for every block of an upload: the longest the
    client then goes without calling it is one request's wait for XNAT's answer (`longest_wait_seconds`).
    """

    def __init__(self, name: str, server: XnatServer, progress: Callable[[], None] | None = None) -> None:
        self.name = name
        self.server = server
        self.base = server.url
        self.progress = progress
        self._secret: _Secret | None = None
        self._session: requests.Session | None = None
        self._fresh = False  # the session was opened by the request under way: a 401/403 is not an old cookie
        self._timeout = (server.connect_timeout_seconds, server.read_timeout_seconds)

    @staticmethod
    def longest_wait_seconds(server: XnatServer) -> float:
        """The longest one request to `server` may wait between two signs of life: connecting, then XNAT's
        answer (an archive request waits up to `archive_timeout_seconds`, any other `read_timeout_seconds`)."""
        return server.connect_timeout_seconds + max(server.read_timeout_seconds, server.archive_timeout_seconds)

    def _report(self) -> None:
        if self.progress is not None:
            self.progress()

    # -- session -------------------------------------------------------------------------------------

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        session.headers["User-Agent"] = f"ingestd/{__version__}"
        session.verify = str(self.server.ca_bundle) if self.server.ca_bundle else self.server.verify_tls
        session.trust_env = False  # no proxies or .netrc from the environment: only what the config names
        adapter = _LargeBlocks()
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        return session

    def login(self) -> None:
        """Open a JSESSION with the configured credentials (HTTP Basic once), then use only the cookie.

        The credentials are read again each time: a password rotated or an alias token renewed in the file, .netrc
        or environment is used from the next login on. A refusal raises XnatLoginError (never the secret)."""
        self._secret = load_credentials(self.server.credentials, self.base)
        session = self._session or self._new_session()
        session.cookies.clear()
        self._report()
        try:
            response = session.get(
                f"{self.base}/data/JSESSION",
                auth=(self._secret.username, self._secret.password),
                timeout=self._timeout,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise self._connection_error(exc) from None
        self._check_login(response)
        self._raise_for(response, "log in")
        if "JSESSIONID" not in session.cookies:
            session.cookies.set("JSESSIONID", response.text.strip(), domain=urlsplit(self.base).hostname or "")
        self._session = session
        self._fresh = True

    def _check_login(self, response: requests.Response) -> None:
        """Raise XnatLoginError if XNAT refused the account (see _LOGIN_PAGES and _LOGIN_403 for the sources)."""
        status = response.status_code
        if status == 401:
            # XNAT's answer does not tell these apart (its default login-failure message mentions locking whatever
            # the cause, SiteConfigPreferences.java:1455): name them all.
            raise XnatLoginError(
                f"XNAT {self.name} refused the login (401): check the credentials (user name and password, or alias"
                " token); XNAT also answers so for an account that is locked after too many failed logins (it"
                " unlocks by itself after 1 h by default), disabled by an admin or not yet verified",
                status=401,
            )
        if status == 403:
            message = _message(response)
            for words, advice in _LOGIN_403:
                if words in message.lower():
                    raise XnatLoginError(f"XNAT {self.name} refused the login (403): {advice}", status=403)
        if 300 <= status < 400:
            self._raise_redirect(response, "log in")

    def _raise_redirect(self, response: requests.Response, doing: str) -> None:
        location = response.headers.get("Location", "")
        where = urlsplit(location).path or "(no Location)"
        for page, advice in _LOGIN_PAGES:
            if page.lower() in where.lower():
                raise XnatLoginError(
                    f"XNAT {self.name} sent {doing} to {where} ({response.status_code}): {advice}",
                    status=response.status_code,
                )
        raise XnatError(
            f"XNAT {self.name} answered {doing} with a redirect ({response.status_code}) to {location or 'nowhere'}:"
            " check the server url in the configuration (http or https, the context path such as /xnat) and any"
            " proxy or single sign-on in front of XNAT",
            retryable=False,
            status=response.status_code,
            code=HoldCode.XNAT_REDIRECT,
        )

    def close(self) -> None:
        """Log out (DELETE /data/JSESSION) and drop the session; errors are ignored."""
        if self._session is None:
            return
        with contextlib.suppress(requests.RequestException):
            self._session.delete(f"{self.base}/data/JSESSION", timeout=self._timeout)
        self._session.close()
        self._session = None

    def _connection_error(self, exc: requests.RequestException) -> XnatError:
        kind = "timed out" if isinstance(exc, requests.Timeout) else "is unreachable"
        return XnatError(f"XNAT {self.name} {kind} ({type(exc).__name__})", retryable=True)

    def _raise_for(self, response: requests.Response, doing: str) -> None:
        status = response.status_code
        if 300 <= status < 400:
            self._raise_redirect(response, doing)  # asked for: passed in `allow`; anything else is not an answer
        if status < 400 and not _is_html(response):
            return
        message = _message(response)
        retryable = status >= 500 or status == 429 or status in (401, 408)
        if status < 400:  # an HTML page with a 2xx status: XNAT's way of reporting some errors
            retryable = False
        if status == 500 and (message.startswith("FAILED:") or _PERMANENT_500.search(message)):
            retryable = False  # XNAT states a reason no retry changes (a conflict, a missing project, a script)
        raise XnatError(f"XNAT {self.name} could not {doing}: {status} {message}", retryable=retryable, status=status)

    def request(
        self,
        method: str,
        path: str,
        doing: str,
        *,
        params: Mapping[str, str] | list[tuple[str, str]] | None = None,
        data: BinaryIO | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        allow: tuple[int, ...] = (),
        basic: bool = False,
    ) -> requests.Response:
        """One request with the session cookie; on 401 log in again once and repeat. Raises XnatError.

        `basic`: send the credentials too. For the requests that file data (import, archive): on a site open to
        guests an expired session is served as the guest, and a guest's import lands in Unassigned (xnat-web
        Importer has no guest check); with the credentials on the request XNAT takes it as this account."""
        for attempt in (1, 2):
            self._report()
            self._fresh = False
            if self._session is None:
                self.login()
            assert self._session is not None  # noqa: S101 - login() set it
            if hasattr(data, "seek"):
                data.seek(0)  # type: ignore[union-attr]
            try:
                secret = self._secret
                response = self._session.request(
                    method,
                    f"{self.base}{path}",
                    params=params,
                    auth=(secret.username, secret.password) if basic and secret is not None else None,
                    data=data,
                    headers=dict(headers or {}),
                    timeout=(self.server.connect_timeout_seconds, timeout or self.server.read_timeout_seconds),
                    allow_redirects=False,
                )
            except requests.RequestException as exc:
                raise self._connection_error(exc) from None
            # An expired session answers 401; on a site open to guests (requireLogin=false) it is served as the
            # guest, and what the guest may not do answers 403: log in again once for either, then believe it.
            if response.status_code in (401, 403) and attempt == 1 and not self._fresh:
                self._session.cookies.clear()
                self.login()
                continue
            if response.status_code in allow:
                return response
            self._raise_for(response, doing)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    # -- projects --------------------------------------------------------------------------------------

    def check_project(self, project: str) -> None:
        """Pre-flight: the project exists and this account may write to it; else a permanent XnatError.

        `GET /data/projects?permissions=edit&dataType=xnat:subjectData`: the projects where this account may edit
        subjects, as lower-case `id`/`secondary_id` columns (xnat-web ProjectListResource.PermissionsProjectHandler).
        `dataType` is required from 1.8.9 on: without it the handler asks the permissions cache for a null element
        and XNAT answers a bare 500 (SchemaElement.GetElement(null) throws ElementNotFoundException "NULL",
        XNAT-7845, b30a31bc9). Should the listing still fail with a 5xx, the project is looked up on its own and the
        import tells whether the account may write to it.
        """
        try:
            response = self.request(
                "GET",
                "/data/projects",
                f"list projects for {project}",
                params={"format": "json", "permissions": "edit", "dataType": "xnat:subjectData"},
            )
            writable: set[str] | None = {row.get("id") or row.get("ID") or "" for row in _rows(response)}
        except XnatError as exc:
            if not (exc.status or 0) >= 500:
                raise
            writable = None
        if writable is not None and project in writable:
            return
        if writable is not None and not self._fresh:
            # An expired session on a site open to guests lists the guest's projects (none): ask once more afresh.
            self.close()
            self.check_project(project)
            return
        check = self.request(
            "GET", f"/data/projects/{project}", f"look up {project}", params={"format": "json"}, allow=(403, 404)
        )
        if check.status_code == 404:
            raise XnatError(f"XNAT {self.name} has no project {project}", retryable=False, status=404)
        if writable is None and check.status_code == 200:
            return  # the listing failed: the project exists and is readable; the import will say more
        raise XnatError(
            f"the XNAT account on {self.name} cannot write to project {project}: make it a member or owner",
            retryable=False,
            status=403,
        )

    def version(self) -> str:
        """XNAT's version as it states it (`GET /xapi/siteConfig/buildInfo`: `version`); '' if it does not say."""
        response = self.request("GET", "/xapi/siteConfig/buildInfo", "read XNAT's version", allow=(404,))
        if response.status_code == 404:
            return ""
        payload = _json(response)
        return str(payload.get("version", "")) if isinstance(payload, dict) else ""

    def token_info(self) -> TokenInfo | None:
        """When the alias token this client logs in with expires; None if the credential is not a token.

        `GET /data/services/tokens/show`: the account's tokens as serialized AliasToken beans, each with `alias` and
        `estimatedExpirationTime` (epoch ms; xnat-web AliasTokenRestlet OP_SHOW, xdat AliasToken). `validate`
        answers only the owner's name, so it cannot say when a token expires."""
        secret = load_credentials(self.server.credentials, self.base)
        if not is_alias_token(secret.username):
            return None
        response = self.request("GET", "/data/services/tokens/show", "list the account's alias tokens")
        payload = _json(response)
        for token in payload if isinstance(payload, list) else []:
            if isinstance(token, dict) and str(token.get("alias", "")).lower() == secret.username.lower():
                return TokenInfo(secret.username, _epoch(token.get("estimatedExpirationTime")))
        return TokenInfo(secret.username, None)

    def issue_token(self) -> tuple[str, str, float | None]:
        """A new alias token for this account (`GET /data/services/tokens/issue`): (alias, secret, expires_at)."""
        response = self.request("GET", "/data/services/tokens/issue", "issue a new alias token")
        payload = _json(response)
        if not isinstance(payload, dict) or not payload.get("alias") or not payload.get("secret"):
            raise XnatError(f"XNAT {self.name} answered a token request without alias and secret", retryable=True)
        return str(payload["alias"]), str(payload["secret"]), _epoch(payload.get("estimatedExpirationTime"))

    def site_path(self, uri: str) -> str:
        """A path XNAT answered, as a path under the site root (`/data/...`): without scheme and host, and
        without the context path the configured url carries (`https://host/xnat`) should XNAT include it."""
        path = urlsplit(uri).path if "://" in uri else uri
        context = urlsplit(self.base).path.rstrip("/")
        if context and (path == context or path.startswith(f"{context}/")):
            path = path[len(context) :]
        return path

    # -- import and prearchive -------------------------------------------------------------------------

    def import_zip(self, zip_path: Path, project: str, subject: str, session: str) -> list[str]:
        """Upload a study zip to the project's prearchive (DICOM-zip); return the URIs XNAT answered."""
        params = {
            "import-handler": "DICOM-zip",
            "PROJECT_ID": project,
            "SUBJECT_ID": subject,
            "EXPT_LABEL": session,
            "dest": f"/prearchive/projects/{project}",
            "overwrite": "append",
        }
        with _ReportingFile(zip_path, self.progress) as body:
            response = self.request(
                "POST",
                "/data/services/import",
                f"import {session} into {project}",
                params=params,
                data=body,
                headers={"Content-Type": "application/zip"},
                basic=True,
            )
        return [self.site_path(uri) for uri in _uri_list(response)]

    def prearchive(self, project: str) -> list[PrearchiveRow]:
        response = self.request(
            "GET", f"/data/prearchive/projects/{project}", f"list prearchive {project}", params={"format": "json"}
        )
        return [self._prearchive_row(row) for row in _rows(response)]

    def prearchive_session(self, url: str) -> PrearchiveRow | None:
        """One prearchive session by its URL (with or without /data); None if XNAT no longer has it."""
        path = "/data" + url.removeprefix("/data")
        response = self.request("GET", path, "read a prearchive session", params={"format": "json"}, allow=(404,))
        if response.status_code == 404:
            return None
        rows = _rows(response)
        return self._prearchive_row(rows[0]) if rows else None

    def prearchive_log(self, url: str) -> str:
        """The last entry of a prearchive session's log (XNAT writes why a build or archive failed there)."""
        path = "/data" + url.removeprefix("/data") + "/logs/last"
        response = self.request("GET", path, "read a prearchive session's log", allow=(404,))
        return "" if response.status_code == 404 else " ".join(response.text.split())[:500]

    def build(self, url: str) -> bool:
        """Ask XNAT to build a prearchive session; False if the session is locked (409 "session document locked":
        another build, an archive or a move holds it; xnat-web PrearcSessionResource), which waits."""
        path = "/data" + url.removeprefix("/data")
        response = self.request("POST", path, "build a prearchive session", params={"action": "build"}, allow=(409,))
        return response.status_code != 409

    def archive(self, url: str, project: str, subject: str, session: str) -> str:
        """Archive a prearchive session (blocks until XNAT is done); return the archive URI."""
        src = "/data" + url.removeprefix("/data")
        response = self.request(
            "POST",
            "/data/services/archive",
            f"archive {session} in {project}",
            params={
                "src": src,
                "overwrite": "append",
                "project": project,
                "subject": subject,
                "session": session,
                "auto-archive": "false",
            },
            timeout=self.server.archive_timeout_seconds,
            allow=(301, 302, 303),
            basic=True,
        )
        if response.status_code in (301, 302, 303):
            return self.site_path(response.headers.get("Location", ""))
        uris = _uri_list(response)
        return self.site_path(uris[0]) if uris else ""

    def _prearchive_row(self, row: Mapping[str, str]) -> PrearchiveRow:
        return PrearchiveRow(
            project=row.get("project", ""),
            timestamp=row.get("timestamp", ""),
            folder=row.get("folderName", ""),
            name=row.get("name", ""),
            subject=row.get("subject", ""),
            study_uid=row.get("tag", ""),
            status=row.get("status", ""),
            url=self.site_path(row.get("url", "")).removeprefix("/data"),
            lastmod=row.get("lastmod", ""),
        )

    # -- archive ---------------------------------------------------------------------------------------

    def experiment(self, project: str, subject: str, session: str) -> dict[str, Any] | None:
        """The archived experiment's JSON item (data_fields and children), or None if XNAT has none."""
        return self._item(f"/data/projects/{project}/subjects/{subject}/experiments/{session}", session)

    def project_experiment(self, project: str, label: str) -> dict[str, Any] | None:
        """The experiment labelled `label` anywhere in `project`, under any subject (`GET
        /data/projects/P/experiments/LABEL`, by label or ID), or None: a label is unique in a project, not in a
        subject, and XNAT refuses to archive a session under a label another subject's experiment holds."""
        return self._item(f"/data/projects/{project}/experiments/{label}", label)

    def _item(self, path: str, label: str) -> dict[str, Any] | None:
        """The first JSON item of an experiment resource, or None on 404."""
        response = self.request("GET", path, f"read experiment {label}", params={"format": "json"}, allow=(404,))
        if response.status_code == 404:
            return None
        payload = _json(response)
        items = payload.get("items") if isinstance(payload, dict) else None
        item = items[0] if isinstance(items, list) and items else None
        return item if isinstance(item, dict) else None

    def archive_holdings(self, experiment: Mapping[str, Any]) -> Holdings:
        """The DICOM files of an archived experiment (its JSON item, from `experiment`): one catalog per scan
        resource, `GET /data/experiments/{ID}/scans/{scan}/resources/{label}` (xnat-web CatalogResource.represent:
        the catalog bean as XML, whose `cat:dcmEntry` entries carry `UID` = SOP Instance UID and `URI` = the file)."""
        experiment_id = str(experiment.get("data_fields", {}).get("ID", ""))
        uids: set[str] = set()
        names: set[str] = set()
        for scan_id, label in _dicom_resources(experiment):
            path = f"/data/experiments/{quote(experiment_id, safe='')}/scans/{quote(scan_id, safe='')}"
            response = self.request(
                "GET", f"{path}/resources/{quote(label, safe='')}", "read a scan's catalog", allow=(404,)
            )
            if response.status_code == 404:
                raise XnatError(f"XNAT {self.name} lists scan {scan_id} but not its {label} catalog", retryable=True)
            entries = _catalog_entries(response.content)
            uids.update(uid for uid, _name in entries if uid)
            names.update(name for _uid, name in entries if name)
        return Holdings(frozenset(uids), frozenset(names))

    def prearchive_holdings(self, url: str) -> Holdings | None:
        """The file names of a built prearchive session, or None if it is not built (XNAT lists a session's
        files only from its catalogs, written by the build: 404 "Unable to locate prearc resource." before).

        xnat-web PrearcScansListResource, PrearcScanResourceList, PrearcSessionResourceFiles (`Name`, `Size`,
        `URI`): one request for the scans, one per scan for its resources, one per resource for its files.
        """
        path = "/data" + url.removeprefix("/data")
        scans = self.request("GET", f"{path}/scans", "list a prearchive session's scans", params=_JSON, allow=(404,))
        if scans.status_code == 404:
            return None
        names: set[str] = set()
        for scan in _rows(scans):
            scan_path = f"{path}/scans/{quote(str(scan.get('ID', '')), safe='')}"
            resources = self.request(
                "GET", f"{scan_path}/resources", "list a prearchive scan's resources", params=_JSON
            )
            for resource in _rows(resources):
                files = self.request(
                    "GET",
                    f"{scan_path}/resources/{quote(str(resource.get('label', '')), safe='')}/files",
                    "list a prearchive scan's files",
                    params=_JSON,
                )
                names.update(str(row.get("Name", "")) for row in _rows(files))
        return Holdings(frozenset(), frozenset(names - {""}))


_JSON = {"format": "json"}
