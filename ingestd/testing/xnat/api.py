"""The HTTP behaviour: the routing table and the request plumbing (faults first, then auth, routing, handler)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from urllib.parse import parse_qs, urlsplit

from ingestd.testing.xnat.common import _HttpError, _Response
from ingestd.testing.xnat.faults import _NGINX_504, _Fault, _ProxyTimeout, _Reset, _Truncation
from ingestd.testing.xnat.model import _Config
from ingestd.testing.xnat.prearc_resources import _PrearcResourceApi
from ingestd.testing.xnat.routing import (
    _EXP,
    _EXP_BY_ID,
    _PA,
    Handler,
    _is_data_path,
    _normalise,
    _Params,
    _Request,
    _Route,
)
from ingestd.testing.xnat.store import _Store

LOG = logging.getLogger("ingestd.testing.xnat")


class _Api(_PrearcResourceApi):
    """The HTTP behaviour: authentication, the routing table and one small handler per resource."""

    def __init__(self, store: _Store, config: _Config, jobs: ThreadPoolExecutor, site_url: Callable[[], str]) -> None:
        super().__init__(store, config, jobs, site_url)
        get, post, put, delete = "GET", "POST", "PUT", "DELETE"
        table: list[tuple[str, str, Handler]] = [
            *self.resource_routes(),
            *self.prearc_resource_routes(),
            (get, r"/", self.root),
            (get, r"/app(?:/.*)?", self.login_page),
            ("GET POST PUT DELETE", r"/data/services/auth", self.login),
            ("GET POST", r"/data/JSESSION", self.jsession),
            (delete, r"/data/JSESSION", self.logout),
            (get, r"/data/auth", self.whoami),
            (get, r"/data/services/tokens/issue", self.token_issue),
            (get, r"/data/services/tokens/issue/user/(?P<user>[^/]+)", self.token_issue),
            (get, r"/data/services/tokens/show", self.token_show),
            (get, r"/data/services/tokens/show/user/(?P<user>[^/]+)", self.token_show),
            (get, r"/data/services/tokens/validate/(?P<alias>[^/]+)/(?P<secret>[^/]+)", self.token_validate),
            (get, r"/data/services/tokens/invalidate/(?P<alias>[^/]+)", self.token_invalidate),
            (get, r"/xapi/siteConfig/buildInfo", self.build_info),
            (get, r"/xapi/siteConfig/buildInfo/(?P<property>[^/]+)", self.build_property),
            (get, r"/xapi/schemas", self.schemas),
            (get, r"/xapi/schemas/(?P<schema>[A-Za-z0-9_/-]+)", self.schema),
            (get, r"/data/search/elements(?:/(?P<element>[^/]+))?", self.search_elements),
            (get, r"/data/projects", self.projects),
            (get, r"/data/projects/(?P<project>[^/]+)", self.project),
            (get, r"/data/projects/(?P<project>[^/]+)/prearchive_code", self.prearchive_code),
            (put, r"/data/projects/(?P<project>[^/]+)/prearchive_code/(?P<code>[^/]+)", self.set_prearchive_code),
            (get, r"/data/projects/(?P<project>[^/]+)/subjects", self.subjects),
            (get, r"/data/projects/(?P<project>[^/]+)/subjects/(?P<subject>[^/]+)", self.subject),
            (get, r"/data/projects/(?P<project>[^/]+)(?:/subjects/(?P<subject>[^/]+))?/experiments", self.experiments),
            *[
                route
                for experiment in (_EXP, _EXP_BY_ID)
                for scan in [experiment + r"/scans/(?P<scan>[^/]+)"]
                for route in (
                    (get, experiment, self.experiment),
                    (get, experiment + r"/scans", self.scans),
                    (get, scan, self.scan),
                    (get, scan + r"/resources", self.scan_resources),
                    (get, scan + r"/resources/(?P<resource>[^/]+)", self.scan_catalog),
                    (get, scan + r"/resources/(?P<resource>[^/]+)/files", self.scan_files),
                    (get, scan + r"/resources/(?P<resource>[^/]+)/files/(?P<name>.+)", self.scan_file),
                )
            ],
            (post, r"/data/services/import", self.import_),
            (post, r"/data/services/archive", self.archive),
            (post, r"/data/services/prearchive/(?P<action>delete|rebuild|move)", self.batch),
            ("GET PUT", r"/data/prearchive", self.prearchive),
            (get, r"/data/prearchive/projects", self.prearchive),
            (get, r"/data/prearchive/projects/(?P<projects>[^/]+)", self.prearchive_projects),
            (get, _PA, self.session_get),
            (post, _PA, self.session_post),
            (delete, _PA, self.session_delete),
            (get, _PA + r"/scans", self.session_scans),
            (get, _PA + r"/scans/(?P<scan>[^/]+)/resources", self.session_resources),
            (get, _PA + r"/scans/(?P<scan>[^/]+)/resources/(?P<resource>[^/]+)/files", self.session_files),
            (get, _PA + r"/scans/(?P<scan>[^/]+)/resources/(?P<resource>[^/]+)/files/(?P<name>.+)", self.session_file),
            (get, _PA + r"/logs(?:/(?P<last>last))?", self.session_logs),
            (get, r"/xapi/anonymize/site", self.anon_site),
            (get, r"/xapi/anonymize/site/enabled", self.anon_site_enabled),
            (get, r"/xapi/anonymize/projects/(?P<project>[^/]+)", self.anon_project),
            (get, r"/xapi/anonymize/projects/(?P<project>[^/]+)/enabled", self.anon_project_enabled),
            (get, r"/data/config/anon/script", self.anon_config),
            (get, r"/data/projects/(?P<project>[^/]+)/config/anon/projects/(?P<target>[^/]+)", self.anon_config),
        ]
        self.routes = [
            _Route(frozenset(methods.split()), re.compile(f"^{pattern}$"), handler)
            for methods, pattern, handler in table
        ]
        self._uploads = [
            route.pattern for route in self.routes if route.handler in (self.resource_upload, self.prearc_upload)
        ]

    # -- plumbing -----------------------------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Message, body: bytes) -> _Response:
        """Answer one request: faults first (§10 proxies), then authentication, routing and the handler."""
        path = urlsplit(target).path
        proxy = self._take_proxy_timeout(method, path)
        if proxy is not None:
            response = self._proxy_timeout(proxy, method, target, headers, body)
            with self._log_lock:
                self.log.append((method, target, response.status))
            return response
        fault = self._take_fault(method, path)
        if fault is not None and not fault.after_processing:
            time.sleep(fault.delay)
            response = fault.response()
        else:
            response = self._process(method, target, headers, body)
            if fault is not None:
                time.sleep(fault.delay)
                response = fault.response()
        truncation = self._take_truncation(method, path)
        if truncation is not None:  # the real status and headers, the body cut (Content-Length follows the body)
            keep = len(response.body) // 2 if truncation.keep_bytes is None else truncation.keep_bytes
            response.body = response.body[: max(keep, 0)]
        with self._log_lock:
            self.log.append((method, self.config.context_path + target, response.status))
        return response

    def below_context(self, target: str) -> str | None:
        """The request target below the context path (`context_path`), or None when it lies outside it. Every route,
        fault prefix and `_normalise`d path is relative to the context path; `requests_log` keeps the target as
        sent."""
        context = self.config.context_path
        if not context:
            return target
        if target == context or target.startswith((context + "/", context + "?")):
            rest = target[len(context) :]
            return rest if rest.startswith("/") else "/" + rest
        return None

    def note_framing(self, method: str, target: str, headers: Message) -> None:
        """Record how a request's body is framed (Content-Length or chunked), for `FakeXnat.body_framing`."""
        chunked = "chunked" in (headers.get("Transfer-Encoding") or "").lower()
        length = headers.get("Content-Length")
        if chunked or length is not None:
            with self._log_lock:
                self.framing.append((method, target, int(length) if length and length.isdigit() else None, chunked))

    def take_reset(self, method: str, target: str) -> _Reset | None:
        """The reset that applies to this request, if any (counted and logged with status 0)."""
        path = urlsplit(target).path
        with self._log_lock:
            for reset in self.resets:
                if reset.remaining > 0 and reset.method == method.upper() and path.startswith(reset.prefix):
                    reset.remaining -= 1
                    self.log.append((method, self.config.context_path + target, 0))
                    return reset
        return None

    def streams_body(self, method: str, target: str) -> bool:
        """Whether XNAT consumes this request's body as it arrives: the import service's in-body uploads, and the
        resource file uploads, whose FileWriterWrapper copies the body straight into the final file (res §6)."""
        path = _normalise(urlsplit(target).path)
        if method.upper() == "POST" and path == "/data/services/import":
            return True
        return method.upper() in ("PUT", "POST") and any(pattern.match(path) for pattern in self._uploads)

    def process_cut(self, method: str, target: str, headers: Message, body: bytes) -> None:
        """What XNAT did with a request whose connection was reset after `body` arrived (no answer reaches anyone).

        Only a raw DICOM-zip upload is processed as it streams (archive/DicomZipImporter.java importZipFile: a
        ZipInputStream over the request entity, each entry handed to GradualDicomImporter.call, which stores it at
        once): the entries read whole before the cut are stored exactly as in a complete upload, then reading fails
        ("unable to read data from file"), so the request ends before the >=1.8.10 synchronous build and the rows stay
        RECEIVING for the idle builder. Everything else stores nothing: multipart bodies are parsed whole by
        commons-fileupload before the importer runs (restlet/resources/SecureResource.java:1273-1277), and SI and
        gradual-DICOM fail on the cut before a row is written [INF]. A raw resource file upload leaves what arrived
        in the final file, uncatalogued; an extracting one the members read whole (`resources._ResourceApi`).
        """
        self._process(method, target, headers, body, cut=True)

    def _take_truncation(self, method: str, path: str) -> _Truncation | None:
        with self._log_lock:
            for truncation in self.truncations:
                if (
                    truncation.remaining > 0
                    and truncation.method == method.upper()
                    and path.startswith(truncation.prefix)
                ):
                    truncation.remaining -= 1
                    return truncation
        return None

    def _take_proxy_timeout(self, method: str, path: str) -> _ProxyTimeout | None:
        with self._log_lock:
            for proxy in self.proxy_timeouts:
                if proxy.remaining > 0 and proxy.method == method.upper() and path.startswith(proxy.prefix):
                    proxy.remaining -= 1
                    return proxy
        return None

    def _proxy_timeout(
        self, proxy: _ProxyTimeout, method: str, target: str, headers: Message, body: bytes
    ) -> _Response:
        """nginx's `proxy_read_timeout` while XNAT goes on: the request is processed in the background, its entries
        stored one by one over `import_seconds` (DicomZipImporter.importZipFile reads the request as a ZipInputStream
        and GradualDicomImporter.call stores each entry as it arrives), and the client gets nginx's 504 page after
        `after_seconds`, whatever XNAT does later."""

        def work() -> None:
            try:
                response = self._process(method, target, headers, body, import_seconds=proxy.import_seconds)
                LOG.info("import behind a proxy timeout ended with %s", response.status)
            except Exception:
                LOG.exception("import behind a proxy timeout failed")

        thread = threading.Thread(target=work, name="fake-xnat-slow-import", daemon=True)
        with self._log_lock:
            self.background = [t for t in self.background if t.is_alive()] + [thread]
        thread.start()
        self.stopping.wait(proxy.after_seconds)
        return _Response(504, _NGINX_504, "text/html")

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._log_lock:
            for fault in self.faults:
                if fault.remaining > 0 and fault.method == method.upper() and path.startswith(fault.prefix):
                    fault.remaining -= 1
                    return fault
        return None

    def _process(
        self, method: str, target: str, headers: Message, body: bytes, *, cut: bool = False, import_seconds: float = 0.0
    ) -> _Response:
        split = urlsplit(target)
        request = _Request(
            method,
            target,
            _normalise(split.path),
            _Params(parse_qs(split.query, keep_blank_values=True)),
            headers,
            body,
            cut=cut,
            import_seconds=import_seconds,
        )
        self._read_form(request)
        try:
            self._authenticate(request)
            route, groups = self._match(request)
            request.groups = groups
            if request.method == "GET":  # reads never wait, so they see one consistent state under the lock
                with self.store.lock:
                    response = route.handler(request)
            else:  # writes take the lock themselves, released while an operation "runs" (operation_seconds)
                response = route.handler(request)
        except _HttpError as error:
            response = error.response()
        except Exception:
            LOG.exception("fake XNAT failed on %s %s", method, target)
            response = _HttpError(500, "Internal Server Error").response()
        if request.session is not None:
            # Tomcat scopes JSESSIONID to the context path ("/" for ROOT); XnatExpiredPasswordFilter.java:71-72 sets
            # SESSION_EXPIRATION_TIME on contextPath + "/".
            context = self.config.context_path
            if request.new_session:
                response.headers.append(
                    ("Set-Cookie", f"JSESSIONID={request.session.id}; Path={context or '/'}; HttpOnly")
                )
            timeout_ms = int(self.config.session_timeout_seconds * 1000)
            response.headers.append(
                ("Set-Cookie", f'SESSION_EXPIRATION_TIME="{int(time.time() * 1000)},{timeout_ms}"; Path={context}/')
            )
        return response

    @staticmethod
    def _read_form(request: _Request) -> None:
        """Form bodies (and a JSON object body, §5.5) add to the query parameters; import bodies are files."""
        if not request.body or request.path == "/data/services/import":
            return
        if request.content_type == "application/x-www-form-urlencoded":
            request.params.merge(parse_qs(request.body.decode("utf-8", "replace"), keep_blank_values=True))
        elif request.content_type == "application/json" and request.path.startswith("/data/prearchive"):
            try:
                value = json.loads(request.body)
            except ValueError:
                return
            if isinstance(value, dict):
                request.params.merge({str(k): [str(v)] for k, v in value.items()})

    def _match(self, request: _Request) -> tuple[_Route, dict[str, str]]:
        allowed: set[str] = set()
        for route in self.routes:
            match = route.pattern.match(request.path)
            if match is None:
                continue
            if request.method in route.methods:
                return route, {k: v for k, v in match.groupdict().items() if v is not None}
            allowed |= route.methods
        if allowed:
            raise _HttpError(405, "Method Not Allowed", headers=[("Allow", ", ".join(sorted(allowed)))])
        if _is_data_path(request.path):
            raise _HttpError(404, "The server has not found anything matching the request URI")
        raise _HttpError(404, f"The requested resource [{request.path}] is not available", tomcat=True)
