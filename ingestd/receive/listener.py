"""The DICOM listener: C-ECHO and C-STORE, acknowledging only what is durable.

pynetdicom accepts or rejects each association; ingestd then serves its data phase itself
(`ingestd.receive.dataphase`), which receives every C-STORE's data set into an `_Incoming` sink. A data set that
fits the data phase's buffer (a few MiB) arrives whole; a larger one is written to a part file in the spool as it
arrives (hashed on the way), so that memory never depends on an instance's size; past `listener.max_instance_mb`
the rest is discarded as it arrives and the request refused with 0xA700. At the data set's end the store
(`DicomListener._store_guarded`) walks the encoded data set by its lengths (never decoding values, never touching
pixel data; a part file is read through a read-only mapping, so only the pages of element headers are read) to
see that it is whole, reads the few header values the journal needs, checks that they agree with the C-STORE
request, hands it to the spool, and returns Success only once the spool has the file fsync'd and the journal row
committed. A data set that is cut short, unreadable or not the one the request names is refused and nothing of
it is stored; nor is anything of one whose association ends before it does.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from copy import deepcopy
from datetime import datetime
from typing import Any, cast

import structlog
from pydicom import uid as dicom_uid
from pynetdicom import AE, _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from ingestd.config import Listener as ListenerConfig
from ingestd.dicomfile import check_data_set
from ingestd.errors import IncompleteDataSetError, InvalidInstanceError, ListenerError, SpoolError, SpoolFullError
from ingestd.header import (
    InstanceHeader,
    LeftToPydicomError,
    file_meta_prefix,
    read_stream_header,
    read_whole_stream,
    require_pixel_data,
    stream_has_pixel_data,
)
from ingestd.journal import Source
from ingestd.metrics import AssociationSlot
from ingestd.receive import dataphase
from ingestd.receive.gate import Gate
from ingestd.receive.sopclasses import sop_class_name, storage_sop_classes
from ingestd.spool import PartFile, Spool

VERIFICATION = dicom_uid.UID("1.2.840.10008.1.1")

__all__ = ["TRANSFER_SYNTAXES", "DicomListener", "Status", "read_received"]

log = structlog.get_logger("ingestd.listener")

# Uncompressed first (the cheapest for everyone), then the common compressed syntaxes, stored as received.
TRANSFER_SYNTAXES = [
    dicom_uid.ExplicitVRLittleEndian,
    dicom_uid.ImplicitVRLittleEndian,
    dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.ExplicitVRBigEndian,
    dicom_uid.JPEGBaseline8Bit,
    dicom_uid.JPEGExtended12Bit,
    dicom_uid.JPEGLossless,
    dicom_uid.JPEGLosslessSV1,
    dicom_uid.JPEGLSLossless,
    dicom_uid.JPEGLSNearLossless,
    dicom_uid.JPEG2000Lossless,
    dicom_uid.JPEG2000,
    dicom_uid.HTJ2KLossless,
    dicom_uid.HTJ2KLosslessRPCL,
    dicom_uid.HTJ2K,
    dicom_uid.RLELossless,
]

# A-ASSOCIATE-AC presentation context results (PS3.8 9.3.3.2) other than acceptance.
_CONTEXT_RESULTS = {
    0x01: "user rejection",
    0x02: "no reason",
    0x03: "abstract syntax not supported (listener.extra_sop_classes adds private SOP classes)",
    0x04: "none of its transfer syntaxes is supported",
}
_MAX_REJECTED_LOGGED = 32  # distinct abstract syntaxes named per association; `count` has them all

_DEFER_PER_ASSOCIATION = 0.003  # seconds a receiver process waits per open association before it accepts
_MB = 1024 * 1024


class Status:
    """The C-STORE statuses ingestd answers with (PS3.4 Annex B.2.3). Nothing is stored for a failure."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (spool full; 0xA701: the spool or journal failed)
    DATA_SET_MISMATCH = 0xA900  # Error: data set does not match SOP class (its UIDs are not the request's)
    CANNOT_UNDERSTAND = 0xC210  # Error: cannot understand: the header (UIDs missing or malformed, unparsable)
    INCOMPLETE = 0xC211  # Error: cannot understand: the data set is cut short or does not parse to its end


def read_received(body: memoryview, transfer_syntax: str) -> InstanceHeader:
    """The header of a data set received by C-STORE, once it is known to be whole.

    Raises IncompleteDataSetError (answered 0xC211) when it is cut short or does not parse to its end,
    InvalidInstanceError (0xC210) when its UIDs are missing or malformed. The walk in `read_whole_stream` decides
    unless the data set uses an encoding it leaves to pydicom; then pydicom's reading decides, as for a dropped
    file (`check_data_set`).
    """
    try:
        return read_whole_stream(body, transfer_syntax)
    except LeftToPydicomError:
        pass
    try:
        check_data_set(body, transfer_syntax)
    except InvalidInstanceError as exc:
        reason = str(exc).removeprefix("corrupt DICOM file: ")
        raise IncompleteDataSetError(f"the data set does not parse to its end ({reason})") from None
    header = read_stream_header(body, transfer_syntax)
    require_pixel_data(header, stream_has_pixel_data(body, transfer_syntax))
    return header


def _mismatch(request: dataphase.StoreRequest, header: InstanceHeader) -> str | None:
    """Why the data set is not the one the C-STORE request names (as DCMTK's storescp checks), or None."""
    if header.sop_class_uid != request.sop_class_uid:
        return "the data set's SOP Class UID is not the request's Affected SOP Class UID"
    if header.sop_class_uid != request.abstract_syntax:
        return "the data set's SOP Class UID is not the presentation context's abstract syntax"
    if header.sop_uid != request.sop_instance_uid:
        return "the data set's SOP Instance UID is not the request's Affected SOP Instance UID"
    return None


def _command_uid(value: object) -> str:
    return str(value or "").rstrip("\x00 ")


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


def _ascii(value: str) -> str:
    # For the file meta of a part file, written before the data set is checked: a request whose UIDs are not ASCII
    # is refused at the end anyway (its data set's UIDs, which are valid, cannot be the same).
    return value.encode("ascii", "replace").decode("ascii")


class _Incoming:
    """One C-STORE data set on its way into the spool: the `dataphase.DataSetSink` of a C-STORE request.

    A data set that fits the data phase's buffer arrives whole in `finish` and is stored in one write. A larger one
    is written to a part file in the spool as it arrives; past `listener.max_instance_mb` (or when the spool
    refuses) the part file is removed, the rest is discarded as it arrives, and `finish` answers the refusal.
    """

    def __init__(self, listener: DicomListener, assoc: Any, request: dataphase.StoreRequest) -> None:
        self.listener = listener
        self.assoc = assoc
        self.request = request
        self.limit = listener.config.max_instance_mb * _MB
        self.size = 0
        self.part: PartFile | None = None
        self.status: int | None = None  # a refusal decided before the data set's end

    def write(self, chunk: memoryview) -> None:
        self.size += len(chunk)
        if self.status is not None:
            return
        if self.size > self.limit:
            self._too_large()
            return
        try:
            if self.part is None:
                request = self.request
                prefix = file_meta_prefix(
                    _ascii(request.sop_class_uid),
                    _ascii(request.sop_instance_uid),
                    request.transfer_syntax,
                    self.assoc.requestor.ae_title,
                )
                self.part = self.listener.spool.open_part(prefix)
            self.part.write(chunk)
        except Exception as exc:  # noqa: BLE001 - a refusal for the peer, never an exception into the data phase
            self.status = self.listener._refusal(self.assoc, exc)
            self._discard()

    def finish(self, tail: memoryview) -> int:
        if len(tail) and (self.part is not None or self.status is not None or self.size + len(tail) > self.limit):
            self.write(tail)
        else:
            self.size += len(tail)
        if self.status is not None:
            return self.status
        part, self.part = self.part, None
        if part is None:
            return self.listener._store_guarded(self.assoc, self.request, tail)
        try:
            return self.listener._store_guarded(self.assoc, self.request, part)
        finally:
            part.discard()  # nothing left once it is stored; refused, it is removed

    def abandon(self) -> None:
        self._discard()

    def _discard(self) -> None:
        part, self.part = self.part, None
        if part is not None:
            part.discard()

    def _too_large(self) -> None:
        self.status = Status.OUT_OF_RESOURCES
        self._discard()
        self.listener._log_too_large(self.assoc)


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


def bind_listening_socket(config: ListenerConfig) -> socket.socket:
    """Bind and listen on the configured host and port, for several receiver processes to accept from.

    The socket is non-blocking: every process wakes for a new connection and those that lose the race to
    accept it go back to waiting instead of blocking.
    """
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((config.host, config.port))
        listening.listen(128)
    except OSError as exc:
        listening.close()
        raise ListenerError(_cannot_listen(config, exc)) from None
    listening.setblocking(False)
    return listening


def _cannot_listen(config: ListenerConfig, exc: OSError) -> str:
    return (
        f"cannot listen on {config.host}:{config.port} ({exc.strerror or exc}); "
        "is another DICOM service using the port, or is it below 1024 without CAP_NET_BIND_SERVICE?"
    )


class DicomListener:
    """A pynetdicom AE serving C-ECHO and C-STORE into the spool.

    Given a `listening_socket` (from `bind_listening_socket`), it accepts from that socket, which several
    processes may share; otherwise it binds the configured host and port itself.
    """

    def __init__(
        self,
        config: ListenerConfig,
        spool: Spool,
        *,
        listening_socket: socket.socket | None = None,
        associations: AssociationSlot | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.listening_socket = listening_socket
        self.associations = associations  # the metrics' counters of this process, if the daemon keeps them
        self._stored: dict[int, int] = {}  # instances stored per open association (by id of the association)
        self._phases: dict[int, dataphase.DataPhase] = {}  # associations ingestd serves itself (by id)
        self._server: Any = None
        self._inflight = 0
        self._idle = threading.Condition()
        self._accepting = True
        self._extra_sop_classes = {extra.uid: extra.name for extra in config.extra_sop_classes}
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        # pynetdicom's "standard" handlers format every PDU and DIMSE message for its debug log (which ingestd
        # keeps at WARNING) on every association: with them off, 4 associations store ~20 % more images/s.
        # The setting is pynetdicom's process-wide one; ingestd logs associations and stores itself.
        _config.LOG_HANDLER_LEVEL = "none"
        ae = _ListenerAE(ae_title=self.config.ae_title)
        ae.listening_socket = self.listening_socket
        ae.listener_config = self.config
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu_size
        ae.network_timeout = self.config.network_timeout_seconds
        ae.acse_timeout = self.config.acse_timeout_seconds
        ae.dimse_timeout = self.config.network_timeout_seconds
        if self.config.allowed_calling_aets:
            ae.require_calling_aet = list(self.config.allowed_calling_aets)
        ae.add_supported_context(VERIFICATION)
        for uid in storage_sop_classes(self._extra_sop_classes.items()):
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        return ae

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.key))
            if tls.ca_certificates is not None:
                context.load_verify_locations(cafile=str(tls.ca_certificates))
        except (OSError, ssl.SSLError) as exc:
            raise ListenerError(
                f"cannot load the listener's TLS certificate, key or CA ({tls.certificate}, {tls.key}, "
                f"{tls.ca_certificates}): {exc.strerror or exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
        return context

    @property
    def port(self) -> int:
        """The port the listener is bound to (useful when configured as 0)."""
        return int(self._server.server_address[1])

    def association_count(self) -> int:
        """How many associations this listener holds open now."""
        server = self._server
        return 0 if server is None else len(server.active_associations)

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACSE_SENT, self._on_acse_sent),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        ssl_context = self._ssl_context()
        try:
            self._server = self.ae.start_server(
                (self.config.host, self.config.port), block=False, evt_handlers=handlers, ssl_context=ssl_context
            )
        except OSError as exc:
            raise ListenerError(_cannot_listen(self.config, exc)) from None
        log.info(
            "receive.listener_started",
            ae_title=self.config.ae_title,
            host=self.config.host,
            port=self.port,
            tls=self.config.tls is not None,
            data_phase="ingestd" if dataphase.available() else "pynetdicom",
        )

    def alive(self) -> bool:
        return self._server is not None

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop gracefully: accept no new association, let stores in flight finish, then close.

        Open associations may go on for `grace_seconds`; those still open then are aborted (the scanner sends
        the rest later). A store already running when its association is aborted still finishes, durable, but
        its response may not get through: nothing acknowledged is ever lost.
        """
        if self._server is None:
            return
        self._accepting = False
        self._server.gate.stop()  # connections not associated yet are closed at once
        deadline = time.monotonic() + grace_seconds
        # Let open associations end by themselves for a while (a scanner mid-study finishes its series).
        while self._server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=max(0.0, deadline - time.monotonic()))
        for assoc in self._server.active_associations:  # shutdown() alone would leave them running
            phase = self._phases.get(id(assoc))
            if phase is not None:
                phase.abort()
            else:
                assoc.abort(block=False)
        self._server.shutdown()
        with self._idle:  # a store already running still finishes
            self._idle.wait_for(lambda: self._inflight == 0, timeout=30.0)
        self._server = None
        log.info("receive.listener_stopped")

    # -- handlers (run in association threads; they must never raise into pynetdicom) --------------

    def _on_acse_sent(self, event: Any) -> None:
        # About to send the A-ASSOCIATE-AC: from here on the data phase reads the socket, not pynetdicom's DUL.
        primitive = event.primitive
        accepting = isinstance(primitive, A_ASSOCIATE) and primitive.result == 0x00 and self._accepting
        if accepting and dataphase.available():
            dataphase.hold_transport(event.assoc)
            self._phases[id(event.assoc)] = dataphase.DataPhase(
                event.assoc,
                self._open_store,
                self.config.network_timeout_seconds,
                max_pdu_length=self.config.max_pdu_size,
                min_rate=self.config.min_receive_rate_kbps * 1000 / 8,
            )

    def _on_established(self, event: Any) -> None:
        requestor = event.assoc.requestor
        phase = self._phases.get(id(event.assoc))
        if phase is not None:
            phase.install()
            if not self._accepting:  # the listener began stopping while this association was accepted
                phase.abort()
        elif not self._accepting:
            event.assoc.abort()
            return
        self._stored[id(event.assoc)] = 0
        if self.associations is not None:
            self.associations.add("accepted")
            self.associations.add("active")
        log.info("receive.association_accepted", calling_aet=requestor.ae_title, peer=requestor.address)
        self._log_rejected_contexts(event.assoc)

    def _log_rejected_contexts(self, assoc: Any) -> None:
        """One line per association naming the SOP classes (and other abstract syntaxes) it proposed in vain.

        A class accepted in another context (with another transfer syntax) is not named: SCUs propose one class
        in several contexts as a matter of course.

        A SOP class is not PHI: its name and UID say what to add to `listener.extra_sop_classes`.
        """
        accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
        refused = [context for context in assoc.rejected_contexts if str(context.abstract_syntax) not in accepted]
        rejected: dict[str, dict[str, str]] = {}
        for context in refused:
            uid = str(context.abstract_syntax)
            if uid not in rejected and len(rejected) < _MAX_REJECTED_LOGGED:
                rejected[uid] = {
                    "sop_class": sop_class_name(uid, self._extra_sop_classes),
                    "sop_class_uid": uid,
                    "reason": _CONTEXT_RESULTS.get(context.result, f"result {context.result}"),
                }
        if rejected:
            distinct = len({str(context.abstract_syntax) for context in refused})
            log.warning(
                "receive.context_rejected",
                calling_aet=assoc.requestor.ae_title,
                contexts=list(rejected.values()),
                count=distinct,
            )

    def _on_closed(self, event: Any) -> None:
        phase = self._phases.pop(id(event.assoc), None)
        stored = self._stored.pop(id(event.assoc), None)
        if stored is None:
            return  # aborted before it was accepted (the listener was stopping)
        if self.associations is not None:
            self.associations.add("active", -1)
        calling = event.assoc.requestor.ae_title
        if phase is not None and phase.protocol_error is not None:
            log.warning("receive.protocol_error", calling_aet=calling, reason=phase.protocol_error)
        if phase is not None and phase.how == "too slow" and phase.slow is not None:
            log.warning(
                "receive.peer_too_slow",
                calling_aet=calling,
                peer=event.assoc.requestor.address,
                pdu_length=phase.slow[0],
                seconds=round(phase.slow[1], 1),
                min_receive_rate_kbps=self.config.min_receive_rate_kbps,
            )
        how = phase.how if phase is not None else "released" if event.event is evt.EVT_RELEASED else "aborted"
        log.info("receive.association_closed", how=how, instances=stored, calling_aet=calling)

    def _on_rejected(self, event: Any) -> None:
        requestor = event.assoc.requestor
        if self.associations is not None:
            self.associations.add("rejected")
        log.warning("receive.association_rejected", calling_aet=requestor.ae_title, peer=requestor.address)

    def _on_echo(self, event: Any) -> int:
        return Status.SUCCESS

    def _on_store(self, event: Any) -> int:
        # Only when pynetdicom serves the association itself (see `dataphase.available`): it has received the whole
        # data set into memory. It must not raise: pynetdicom would answer 0xC211, which ingestd answers for a data
        # set cut short.
        try:
            request = dataphase.StoreRequest(
                _command_uid(event.request.AffectedSOPClassUID),
                _command_uid(event.request.AffectedSOPInstanceUID),
                str(event.context.abstract_syntax),
                str(event.context.transfer_syntax),
            )
            body = event.request.DataSet.getbuffer()
        except Exception:
            log.exception("receive.store_failed", calling_aet=event.assoc.requestor.ae_title)
            return Status.OUT_OF_RESOURCES
        if len(body) > self.config.max_instance_mb * _MB:
            self._log_too_large(event.assoc)
            return Status.OUT_OF_RESOURCES
        return self._store_guarded(event.assoc, request, body)

    def _open_store(self, assoc: Any, request: dataphase.StoreRequest) -> dataphase.DataSetSink:
        """The sink a C-STORE's data set is received into (the data phase's `StoreFunction`)."""
        return _Incoming(self, assoc, request)

    def _log_too_large(self, assoc: Any) -> None:
        log.warning(
            "receive.store_refused",
            calling_aet=assoc.requestor.ae_title,
            status="0xA700",
            reason=f"the data set is larger than listener.max_instance_mb ({self.config.max_instance_mb} MiB); "
            "the rest of it is discarded as it arrives",
            max_instance_mb=self.config.max_instance_mb,
        )

    def _refusal(self, assoc: Any, exc: Exception) -> int:
        """Log why the spool could not take an instance; return the status that says so."""
        calling = assoc.requestor.ae_title
        if isinstance(exc, SpoolFullError):
            log.error("receive.store_refused", calling_aet=calling, status="0xA700", reason=str(exc))
            return Status.OUT_OF_RESOURCES
        if isinstance(exc, SpoolError):
            log.error("receive.store_refused", calling_aet=calling, status="0xA701", reason=str(exc))
            return Status.OUT_OF_RESOURCES + 1
        log.exception("receive.store_failed", calling_aet=calling)  # called in the handler of `exc`
        return Status.OUT_OF_RESOURCES

    def _store_guarded(self, assoc: Any, request: dataphase.StoreRequest, body: memoryview | PartFile) -> int:
        with self._idle:
            self._inflight += 1
        try:
            return self._store(assoc, request, body)
        except Exception:
            log.exception("receive.store_failed", calling_aet=assoc.requestor.ae_title)
            return Status.OUT_OF_RESOURCES
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def _store(self, assoc: Any, request: dataphase.StoreRequest, body: memoryview | PartFile) -> int:
        """Check the data set (in memory, or written to a part file) and store it; return the C-STORE status."""
        requestor = assoc.requestor
        calling = requestor.ae_title
        if isinstance(body, PartFile):
            with body.data_set() as data:
                checked = self._check(calling, request, data)
        else:
            checked = self._check(calling, request, body)
        if isinstance(checked, int):
            return checked
        header = checked
        source = Source("dicom", calling, f"{assoc.acceptor.ae_title}@{requestor.address}")
        try:
            if isinstance(body, PartFile):
                outcome = self.spool.commit_part(body, header, source)
            else:
                prefix = file_meta_prefix(header.sop_class_uid, header.sop_uid, request.transfer_syntax, calling)
                outcome = self.spool.store(prefix, body, header, source)
        except SpoolError as exc:
            return self._refusal(assoc, exc)
        stored = self._stored.get(id(assoc))
        if stored is not None:
            self._stored[id(assoc)] = stored + 1  # only this association's thread writes its entry
        log.debug(
            "receive.instance_stored",
            outcome=outcome.outcome,
            calling_aet=calling,
            batch_id=outcome.batch_id,
            size=outcome.size,
        )
        return Status.SUCCESS

    @staticmethod
    def _check(calling: str, request: dataphase.StoreRequest, body: memoryview) -> InstanceHeader | int:
        """The data set's header if it is whole and the one the request names, else the status refusing it."""
        try:
            header = read_received(body, request.transfer_syntax)
        except IncompleteDataSetError as exc:
            log.warning("receive.store_refused", calling_aet=calling, status="0xC211", reason=str(exc))
            return Status.INCOMPLETE
        except InvalidInstanceError as exc:
            log.warning("receive.store_refused", calling_aet=calling, status="0xC210", reason=str(exc))
            return Status.CANNOT_UNDERSTAND
        mismatch = _mismatch(request, header)
        if mismatch is not None:
            log.warning("receive.store_refused", calling_aet=calling, status="0xA900", reason=mismatch)
            return Status.DATA_SET_MISMATCH
        return header
