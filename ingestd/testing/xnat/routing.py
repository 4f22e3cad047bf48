"""Requests and routing: parameters, the request object, path normalisation, and the handlers' base class."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from urllib.parse import unquote

from ingestd.testing.xnat.common import _PREARC_URI, Key, _HttpError, _param_of, _Response
from ingestd.testing.xnat.faults import _Fault, _ProxyTimeout, _Reset, _Truncation
from ingestd.testing.xnat.model import _Config, _HttpSession, _Project, _User
from ingestd.testing.xnat.store import _Store

# --------------------------------------------------------------------------------------------------------------
# Requests and routing
# --------------------------------------------------------------------------------------------------------------


class _Params:
    """Query (and form) parameters: case-sensitive keys, repeatable values."""

    def __init__(self, values: dict[str, list[str]] | None = None) -> None:
        self._values: dict[str, list[str]] = {key: list(v) for key, v in (values or {}).items()}

    def get(self, key: str) -> str | None:
        values = self._values.get(key)
        return values[0] if values else None

    def all(self, key: str) -> list[str]:
        return list(self._values.get(key, []))

    def flag(self, key: str) -> bool:
        return (self.get(key) or "").strip().lower() == "true"

    def add(self, key: str, value: str) -> None:
        self._values.setdefault(key, []).append(value)

    def set(self, key: str, value: str) -> None:
        self._values[key] = [value]

    def merge(self, values: dict[str, list[str]]) -> None:
        for key, items in values.items():
            self._values.setdefault(key, []).extend(items)


@dataclass
class _Request:
    method: str
    target: str
    path: str
    params: _Params
    headers: Message
    body: bytes
    user: _User | None = None
    session: _HttpSession | None = None
    new_session: bool = False
    groups: dict[str, str] = field(default_factory=dict)
    cut: bool = False  # the body is what was read before the connection was reset (`reset_next`)
    import_seconds: float = 0.0  # `proxy_timeout_next`: how long the upload takes to arrive

    @property
    def content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()

    @property
    def agent(self) -> _User:
        if self.user is None:  # every data route is authenticated before its handler runs
            raise _HttpError(401, "Unauthorized")
        return self.user

    def fmt(self, default: str = "json") -> str:
        return (self.params.get("format") or default).strip().lower()

    def group(self, name: str) -> str:
        return unquote(self.groups[name])


Handler = Callable[[_Request], _Response]


@dataclass(frozen=True)
class _Route:
    methods: frozenset[str]
    pattern: re.Pattern[str]
    handler: Handler


def _normalise(path: str) -> str:
    """`/REST` is `/data`; `/data/archive/X` is `/data/X` for every archive URI (§1.1; XNATApplication.attachArchiveURI
    attaches `/projects...`, `/experiments...` and `/subjects...` a second time under `/archive`)."""
    if path == "/REST" or path.startswith("/REST/"):
        path = "/data" + path[5:]
    for alias in ("/data/archive/projects", "/data/archive/experiments", "/data/archive/subjects"):
        if path == alias or path.startswith(alias + "/"):
            path = "/data" + path[len("/data/archive") :]
    return path.rstrip("/") or "/"


def _is_data_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in ("/data", "/xapi", "/fs"))


@dataclass(frozen=True)
class _Dest:
    kind: str  # "prearchive" or "archive"
    project: str | None = None
    timestamp: str | None = None
    folder: str | None = None
    subject: str | None = None
    label: str | None = None


def _parse_dest(dest: str) -> _Dest | None:
    """§3.3 `dest` forms, with or without `/data`."""
    path = dest.split("?", 1)[0]
    for prefix in ("/data", "/REST"):
        if path.startswith(prefix + "/"):
            path = path[len(prefix) :]
    parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
    if parts[:1] == ["prearchive"] and (len(parts) == 1 or (parts[1] == "projects" and 3 <= len(parts) <= 5)):
        values = [*parts[2:], None, None, None]
        return _Dest("prearchive", values[0], values[1], values[2])
    if parts[:2] != ["archive", "projects"] or len(parts) not in (3, 5, 7):
        return None
    if (len(parts) >= 5 and parts[3] != "subjects") or (len(parts) == 7 and parts[5] != "experiments"):
        return None
    values = [*parts[2:], None, None, None, None]
    return _Dest("archive", project=values[0], subject=values[2], label=values[4])


def _prearc_key(src: str) -> Key | None:
    match = _PREARC_URI.match(src.split("?", 1)[0])
    return (unquote(match.group(1)), unquote(match.group(2)), unquote(match.group(3))) if match else None


_PA = r"/data/prearchive/projects/(?P<project>[^/]+)/(?P<timestamp>[^/]+)/(?P<folder>[^/]+)"
_EXP = r"/data/projects/(?P<project>[^/]+)(?:/subjects/(?P<subject>[^/]+))?/experiments/(?P<experiment>[^/]+)"
_EXP_BY_ID = r"/data/experiments/(?P<experiment_id>[^/]+)"  # XNATApplication: /experiments/{EXPT_ID|ASSESSED_ID}/...


class _ApiBase:
    """The state every handler group shares (the store, the configuration, the fault lists, the request log)."""

    def __init__(self, store: _Store, config: _Config, jobs: ThreadPoolExecutor, site_url: Callable[[], str]) -> None:
        self.store = store
        self.config = config
        self.jobs = jobs
        self.site_url = site_url
        self.faults: list[_Fault] = []
        self.resets: list[_Reset] = []  # connections cut mid-upload
        self.truncations: list[_Truncation] = []  # answers cut short by a proxy
        self.proxy_timeouts: list[_ProxyTimeout] = []  # a proxy's 504 while XNAT goes on importing
        self.background: list[threading.Thread] = []  # imports still running after their 504
        self.stopping = threading.Event()
        self.log: list[tuple[str, str, int]] = []
        # (method, target, Content-Length or None, chunked) of every request with a body: how it was framed
        self.framing: list[tuple[str, str, int | None, bool]] = []
        self._log_lock = threading.Lock()

    def _project(self, request: _Request, *, edit: bool = False) -> _Project:
        """The `{project}` of the path (ID or alias): 404 if unknown, 403 without read (or edit) rights."""
        name = request.group("project")
        project = self.store.project(name)
        if project is None:
            raise _HttpError(404, f"Unable to find project {name}")
        allowed = self.store.can_edit if edit else self.store.can_read
        if not allowed(request.agent, project):
            raise _HttpError(403, f"The current user does not have access to the requested project: {name}")
        return project


def _multipart(request: _Request) -> Iterator[tuple[str, str | None, bytes]]:
    """(field name, file name or None, payload) of each part of a multipart/form-data body."""
    boundary = _param_of(request.headers.get("Content-Type") or "", "boundary")
    if not boundary:
        raise _HttpError(400, "Unable to parse the multipart request: no boundary.")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    for chunk in (b"\r\n" + request.body).split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, payload = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disposition = ""
        for line in head.decode("latin-1").split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value.strip()
        name = _param_of(disposition, "name", "content-disposition") or ""
        filename = _param_of(disposition, "filename", "content-disposition")
        yield name, filename, payload
