"""Fault injection: injected failures, connection resets, truncated answers and proxy timeouts."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ingestd.testing.xnat.common import ALL_STATUSES, _phrase, _Response, _status_page
from ingestd.testing.xnat.model import _AnonScript, _Drop
from ingestd.testing.xnat.store import _Store


@dataclass
class _Fault:
    method: str
    prefix: str
    status: int
    remaining: int
    body: str | None
    html: bool
    after_processing: bool
    delay: float

    def response(self) -> _Response:
        message = self.body if self.body is not None else f"{self.status} {_phrase(self.status)}"
        if self.html:
            return _Response(self.status, _status_page(self.status, message), "text/html;charset=UTF-8")
        return _Response(self.status, message.encode(), "text/plain;charset=UTF-8")


@dataclass
class _Reset:
    method: str
    prefix: str
    remaining: int
    after_bytes: int | None


@dataclass
class _Truncation:
    method: str
    prefix: str
    remaining: int
    keep_bytes: int | None


@dataclass
class _ProxyTimeout:
    method: str
    prefix: str
    remaining: int
    after_seconds: float
    import_seconds: float


# nginx's own 504 page (ngx_http_special_response.c: ngx_http_error_504_page + ngx_http_error_tail).
_NGINX_504 = (
    b"<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n"
    b"<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)


class _FaultLists(Protocol):
    """What fault injection needs of the handlers (`_Api`): the pending faults and the lock that guards them."""

    @property
    def faults(self) -> list[_Fault]: ...
    @property
    def resets(self) -> list[_Reset]: ...
    @property
    def truncations(self) -> list[_Truncation]: ...
    @property
    def proxy_timeouts(self) -> list[_ProxyTimeout]: ...
    @property
    def _log_lock(self) -> threading.Lock: ...


class _FaultInjection:
    """`FakeXnat`'s fault-injection methods (see the package docstring)."""

    _api: _FaultLists
    _store: _Store
    _timers: list[tuple[threading.Timer, Callable[[], None]]]

    # -- fault injection ----------------------------------------------------------------------------------------

    def fail_next(
        self,
        method: str,
        path_prefix: str,
        *,
        status: int = 503,
        times: int = 1,
        body: str | None = None,
        html: bool = True,
        after_processing: bool = False,
        delay: float = 0.0,
    ) -> None:
        """Answer the next `times` matching requests with `status` (see the package docstring)."""
        fault = _Fault(method.upper(), path_prefix, status, times, body, html, after_processing, delay)
        with self._api._log_lock:
            self._api.faults.append(fault)

    def reset_next(self, method: str, path_prefix: str, *, times: int = 1, after_bytes: int | None = None) -> None:
        """Cut the connection of the next `times` matching requests part-way through their body (a TCP reset).

        `POST /data/services/import`: `after_bytes` of the body (default: half of it) are read, and what XNAT does
        with them happens: a raw DICOM-zip upload has every entry that lies wholly inside them stored, as a complete
        upload would (rows stay RECEIVING; see `_Api.process_cut`); other uploads store nothing. A resource file
        upload (`.../resources/L/files...`, archived or prearchive): `after_bytes` (default half) arrive and stay in
        the final file, uncatalogued (with `extract`, the members read whole). Other paths: up to `after_bytes`
        (default 64 KiB) are read and nothing is processed. `requests_log` records each with status 0.
        """
        with self._api._log_lock:
            self._api.resets.append(_Reset(method.upper(), path_prefix, times, after_bytes))

    def truncate_next(self, method: str, path_prefix: str, *, times: int = 1, keep_bytes: int | None = None) -> None:
        """A reply cut short by a proxy: the next `times` matching requests are processed as usual and answered with
        the real status and headers but only the first `keep_bytes` of the body (default: half), Content-Length
        matching what is sent (so a JSON listing arrives as invalid JSON)."""
        with self._api._log_lock:
            self._api.truncations.append(_Truncation(method.upper(), path_prefix, times, keep_bytes))

    def drop_entries(self, predicate: Callable[[str, str, str], bool] | None, *, stage: str = "filter") -> None:
        """Make XNAT accept and silently drop objects: `predicate(sop_instance_uid, series_instance_uid,
        series_description)` returns True for those to drop; None removes every rule.

        The import still answers 200 and stores nothing for such an object (DICOM-zip entries and gradual-DICOM
        uploads). `stage="filter"` is a series import filter: dropped before any prearchive row exists
        (archive/GradualDicomImporter.java:193-200). `stage="anonymization"` is a site-wide DicomEdit script that
        rejects the file (:388-400): the row is found or created first, the file written and deleted again (an earlier
        copy it overwrote included), and rows whose `prevent_anon` is true are not affected.
        """
        if predicate is None:
            with self._store.lock:
                self._store.drops.clear()
            return
        if stage not in ("filter", "anonymization"):
            raise ValueError(f"unknown stage {stage!r}: expected 'filter' or 'anonymization'")
        with self._store.lock:
            self._store.drops.append(_Drop(predicate, stage))

    def proxy_timeout_next(
        self,
        path_prefix: str = "/data/services/import",
        *,
        after_seconds: float,
        import_seconds: float,
        method: str = "POST",
        times: int = 1,
    ) -> None:
        """A proxy in front of XNAT (nginx `proxy_read_timeout`) gives up on the next `times` matching requests: the
        client gets nginx's 504 page after `after_seconds` while XNAT goes on. For an import, the upload's entries are
        stored one by one over `import_seconds` in the background (rows RECEIVING, lastmod refreshed at most every
        `lastmod_refresh_seconds`, and the idle builder leaves a row alone while its import still writes to it);
        other requests are processed in the background at once. `stop()` ends the background work."""
        proxy = _ProxyTimeout(method.upper(), path_prefix, times, after_seconds, import_seconds)
        with self._api._log_lock:
            self._api.proxy_timeouts.append(proxy)

    def hold_row_lock(
        self, project: str, timestamp: str, folder: str, seconds: float, *, status: str = "_BUILDING"
    ) -> None:
        """Lock a prearchive row for `seconds` as XNAT's LockAndSync does (status `status`, one of the `_` ones), then
        give it back its status: meanwhile `?action=build` and `?action=commit` answer 409 "session document locked"."""
        if not status.startswith("_") or status not in ALL_STATUSES:
            raise ValueError(f"not a lock status: {status!r}")
        with self._store.lock:
            row = self._store.rows.get((project, timestamp, folder))
            if row is None:
                raise KeyError((project, timestamp, folder))
            previous, row.status = row.status, status

        def release() -> None:
            with self._store.lock:
                if row.status == status:
                    row.status = previous

        timer = threading.Timer(seconds, release)
        timer.daemon = True
        self._timers.append((timer, release))
        timer.start()

    def set_anon_script(
        self, script: str | None, *, project: str | None = None, enabled: bool = True, fails: bool = False
    ) -> None:
        """Set (None: remove) the site-wide (`project=None`) or a project's DicomEdit anonymisation script. The scripts
        are not run; `fails=True` makes an enabled one fail: the site script during import (each entry answers 400
        "unable to read DICOM object NAME", its new row deleted), a project script at archive (row ERROR). Served by
        `/xapi/anonymize/...` and the config service paths."""
        with self._store.lock:
            current = self._store.site_anon if project is None else self._store.project_anon.get(project)
            version = (current.version if current else 0) + 1
            anon = None if script is None else _AnonScript(script, enabled, fails, version)
            if project is None:
                self._store.site_anon = anon
            elif anon is None:
                self._store.project_anon.pop(project, None)
            else:
                self._store.project_anon[project] = anon

    def faults_pending(self) -> int:
        """How many injected faults (fail_next, reset_next, truncate_next) have not met their request yet."""
        with self._api._log_lock:
            return (
                sum(f.remaining for f in self._api.faults)
                + sum(r.remaining for r in self._api.resets)
                + sum(t.remaining for t in self._api.truncations)
                + sum(p.remaining for p in self._api.proxy_timeouts)
            )

    def clear_faults(self) -> None:
        """Forget every pending fault, reset, truncation and drop rule: XNAT behaves again."""
        with self._api._log_lock:
            self._api.faults.clear()
            self._api.resets.clear()
            self._api.truncations.clear()
            self._api.proxy_timeouts.clear()
        self.drop_entries(None)

    def html_error_with_200_next(
        self, method: str, path_prefix: str, message: str = "The upload failed: the session could not be imported."
    ) -> None:
        """The next matching request gets status 200 with an HTML error page (XNAT's `format=html` style)."""
        self.fail_next(method, path_prefix, status=200, body=message, html=True)
