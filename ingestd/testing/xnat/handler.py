"""The HTTP server: a threading server and its request handler (bodies, resets, answers)."""

from __future__ import annotations

import logging
import struct
import threading
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socket import SHUT_RDWR, SO_LINGER, SOL_SOCKET, socket
from typing import Any, cast

from ingestd.testing.xnat.api import _Api
from ingestd.testing.xnat.common import _HttpError, _Response
from ingestd.testing.xnat.faults import _Reset

LOG = logging.getLogger("ingestd.testing.xnat")

# --------------------------------------------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------------------------------------------


def _content_length(headers: Message) -> int:
    try:
        return max(int(headers.get("Content-Length") or 0), 0)
    except ValueError:
        return 0


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: _Api) -> None:
        super().__init__(address, _Handler)
        self.api = api
        self.connections: set[socket] = set()
        self.connections_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOG.debug("connection from %s ended with an error", client_address, exc_info=True)

    def close_connections(self) -> None:
        with self.connections_lock:
            open_sockets = list(self.connections)
        for sock in open_sockets:
            try:
                sock.shutdown(SHUT_RDWR)
            except OSError:
                continue


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeXnat/1.8"

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        server = cast(_Server, self.server)
        with server.connections_lock:
            server.connections.add(self.connection)

    def finish(self) -> None:
        server = cast(_Server, self.server)
        with server.connections_lock:
            server.connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def log_message(self, format: str, *args: Any) -> None:
        LOG.debug("%s " + format, self.address_string(), *args)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_some(self, limit: int | None) -> bytes:
        """Up to `limit` bytes of the (de-chunked) body; all of it when `limit` is None."""
        if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
            length = _content_length(self.headers)
            return self.rfile.read(length if limit is None else min(limit, length))
        chunks: list[bytes] = []
        got = 0
        while limit is None or got < limit:
            size = int(self.rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                break
            want = size if limit is None else min(size, limit - got)
            chunks.append(self.rfile.read(want))
            got += want
            if want == size:
                self.rfile.readline(65537)
        return b"".join(chunks)

    def _cut(self, api: _Api, reset: _Reset, target: str) -> None:
        """A connection reset mid-upload (`reset_next`): read part of the body, let XNAT do what it does with that
        part, then reset the connection (RST, not a clean close)."""
        try:
            if api.streams_body(self.command, target):
                length = _content_length(self.headers)
                chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
                if reset.after_bytes is not None:
                    body = self._read_some(reset.after_bytes)
                elif chunked:
                    whole = self._read_some(None)
                    body = whole[: len(whole) // 2]
                else:
                    body = self._read_some(length // 2)
                api.process_cut(self.command, target, self.headers, body)
            else:
                self._read_some(65536 if reset.after_bytes is None else reset.after_bytes)
        except (OSError, ValueError):
            LOG.debug("reading the body of a request to be reset failed", exc_info=True)
        self.connection.setsockopt(SOL_SOCKET, SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _serve(self, *, head: bool = False) -> None:
        server = cast(_Server, self.server)
        target = server.api.below_context(self.path)
        if target is None:  # outside the webapp's context path: Tomcat's own 404
            self.close_connection = True
            self._send(
                _HttpError(404, f"The requested resource [{self.path}] is not available", tomcat=True).response()
            )
            return
        server.api.note_framing(self.command, target, self.headers)
        reset = server.api.take_reset(self.command, target)
        if reset is not None:
            self._cut(server.api, reset, target)
            return
        try:
            body = self._read_body()
        except ValueError:
            self.send_error(400, "Bad request body")
            return
        if len(body) < _content_length(self.headers):
            # The client went away part-way through the body: XNAT does with what arrived what it does after a
            # reset (a streamed DICOM-zip keeps the entries read whole), and nobody is there to answer.
            if server.api.streams_body(self.command, target):
                server.api.process_cut(self.command, target, self.headers, body)
            self.close_connection = True
            return
        response = server.api.handle("GET" if head else self.command, target, self.headers, body)
        self._send(response, head=head)

    def _send(self, response: _Response, *, head: bool = False) -> None:
        self.send_response(response.status)
        if response.content_type is not None:
            self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(response.body)
