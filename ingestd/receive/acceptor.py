"""The accepting side of the DICOM listener: pynetdicom's association server, behind the gate.

The listening socket's accept loop only accepts; the gate (`ingestd.receive.gate`) does the TLS handshake and
reads the A-ASSOCIATE-RQ, then hands the connection to pynetdicom with that request replayed
(`_ReplaySocket`). With a listening socket shared by several receiver processes (`_SharedSocketServer`), a
process busy with associations of its own lets an idle one win a new connection. `_ListenerAE` is the AE
that builds these servers; `ingestd.receive.listener` uses it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from copy import deepcopy
from datetime import datetime
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from ingestd.config import Listener as ListenerConfig
from ingestd.receive.gate import Gate

_DEFER_PER_ASSOCIATION = 0.003  # seconds a receiver process waits per open association before it accepts


class _ReplaySocket(AssociationSocket):
    """An association's socket that first gives back the A-ASSOCIATE-RQ the gate read off it."""

    def __init__(self, assoc: Any, client_socket: socket.socket, replay: bytes) -> None:
        self._replay = bytearray(replay)
        super().__init__(assoc, client_socket=client_socket)

    @property
    def ready(self) -> bool:
        if self._replay and self.socket is not None:
            return True
        return bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        if not self._replay:
            return super().recv(nr_bytes)
        taken = self._replay[:nr_bytes]
        del self._replay[:nr_bytes]
        if len(taken) < nr_bytes:
            taken += super().recv(nr_bytes - len(taken))
        return taken

    def _shutdown_socket(self) -> None:
        # pynetdicom 3.0 calls close() only when shutdown() succeeds: a peer already gone (ENOTCONN) left the
        # socket open until the garbage collector found it.
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):  # the peer has gone already: nothing left to shut down
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


class _GatedRequestHandler(RequestHandler):
    """pynetdicom's handler, for a connection that comes through the gate with its request read already."""

    server: _GatedServer

    def _create_association(self) -> Any:
        # pynetdicom 3.0's RequestHandler._create_association, with the replaying socket.
        server = self.server
        ae = server.ae
        assoc = Association(ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        request = cast(socket.socket, self.request)
        assoc.set_socket(_ReplaySocket(assoc, request, server.take_replay(request)))
        assoc.acceptor.maximum_length = ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in cast(list[tuple[Any, Any]], handlers):
                    assoc.bind(event, handler[0], handler[1])
        return assoc


class _GatedServer(ThreadedAssociationServer):
    """An association server whose accept loop only accepts: the gate (`ingestd.receive.gate`) does the rest.

    A connection reaches pynetdicom (`admit`) once its TLS handshake is done and its A-ASSOCIATE-RQ is whole.
    """

    ae: _ListenerAE
    gate: Gate
    # socketserver's default backlog is 5: a burst of connections (a flood, or a scanner opening several
    # associations at once while this process waits for a core) overflows it, and each SYN dropped costs its
    # sender a 1 s retransmission. `bind_listening_socket` listens with 128 too.
    request_queue_size = 128

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", _GatedRequestHandler)
        self._replays: dict[int, bytes] = {}
        self._replays_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        config = cast(ListenerConfig, self.ae.listener_config)
        self.gate = Gate(
            self.admit,
            max_connections=config.max_connections,
            max_per_peer=config.max_connections_per_peer,
            acse_timeout=config.acse_timeout_seconds,
            tls_handshake_timeout=config.tls_handshake_timeout_seconds,
            network_timeout=config.network_timeout_seconds,
            ssl_context=self.ssl_context,
        )
        self.gate.start()

    def get_request(self) -> tuple[socket.socket, Any]:
        return cast(socket.socket, self.socket).accept()  # no TLS handshake here: the gate does it

    def process_request(self, request: Any, client_address: Any) -> None:
        self.gate.add(request, client_address)

    def admit(self, sock: socket.socket, address: Any, replay: bytes) -> None:
        """Called by the gate: serve the connection in a thread of its own, as pynetdicom does."""
        with self._replays_lock:
            self._replays[sock.fileno()] = replay
        super().process_request(sock, address)

    def take_replay(self, sock: socket.socket) -> bytes:
        with self._replays_lock:
            return self._replays.pop(sock.fileno(), b"")

    def shutdown(self) -> None:
        self.gate.stop()
        super().shutdown()


class _SharedSocketServer(_GatedServer):
    """An association server whose listening socket several receiver processes accept from.

    The daemon binds it (`bind_listening_socket`) and every receiver process gets a duplicate. Each
    process's accept loop wakes on a new connection and one of them wins it; a process busy with its own
    associations waits a moment first, so new ones go to an idle process. The socket is non-blocking, so
    the processes that lose the race go back to waiting.
    """

    def server_bind(self) -> None:
        shared = cast(socket.socket, self.ae.listening_socket)
        cast(socket.socket, self.socket).close()
        self.socket = shared
        self.server_address = shared.getsockname()

    def server_activate(self) -> None:
        """The shared socket is listening already."""

    def _handle_request_noblock(self) -> None:
        # Every process wakes for a new connection; one busy with associations of its own waits a moment
        # longer, so that an idle one wins the race and the associations spread over the processes.
        busy = len(self.active_associations)
        if busy:
            time.sleep(min(_DEFER_PER_ASSOCIATION * busy, 0.05))
        super()._handle_request_noblock()  # type: ignore[misc]


class _ListenerAE(AE):
    listening_socket: socket.socket | None = None
    listener_config: ListenerConfig | None = None

    def make_server(  # type: ignore[override]
        self, address: Any, server_class: Any = None, **kwargs: Any
    ) -> Any:
        if server_class is ThreadedAssociationServer:
            server_class = _SharedSocketServer if self.listening_socket is not None else _GatedServer
        return super().make_server(address, server_class=server_class, **kwargs)
