"""The gate in front of the listener: connections become associations only once their request is whole.

pynetdicom, left to itself, does the TLS handshake in its accept loop (one silent TCP connection stops every
TLS sender) and gives each new connection a thread that reads the A-ASSOCIATE-RQ with blocking reads and no
timeout (its ARTIM timer never fires): a handful of silent or trickling connections take every association slot
and hundreds of them cost hundreds of threads. Here the accept loop only accepts and hands each connection to
one selector thread, which, without blocking:

1. caps connections: at most `listener.max_connections` in this process (waiting here or associated) and
   `listener.max_connections_per_peer` from one address; others are closed at once;
2. runs the TLS handshake, within `listener.tls_handshake_timeout_seconds` of the accept;
3. reads exactly the first PDU, which must be an A-ASSOCIATE-RQ no longer than `MAX_ASSOCIATE_RQ`, whole
   within `listener.acse_timeout_seconds` of the accept (the ARTIM timer of PS3.8 §9.1.5, state Sta2);
4. only then hands the connection to pynetdicom (`admit`), with the request's bytes to replay.

What the protocol says on each failure (PS3.8 §9.2, state Sta2): ARTIM expiring closes the connection without a
PDU (AA-2); a PDU other than an A-ASSOCIATE-RQ, or one that is invalid, is answered with an A-ABORT (AA-1), here
from the service provider with reason 1 (unrecognized PDU), 2 (unexpected PDU) or 6 (invalid PDU parameter value:
the length, as dcm4che's PDUDecoder answers a PDU longer than it accepts); the connection then waits a moment
for the peer to close it (Sta13) before it is closed. Refusals and closes are logged at most once a minute for
each peer address and reason, with how many there were.

With `listener.processes` above 1 every receiver process has its own gate: the caps hold per process.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

__all__ = ["MAX_ASSOCIATE_RQ", "Gate", "RefusalLog"]

log = structlog.get_logger("ingestd.listener")

# The longest A-ASSOCIATE-RQ accepted. A scanner's request for every storage class it sends (100-130
# presentation contexts, a few transfer syntaxes each) is 5-25 KB; 128 contexts (the most a request can carry:
# context IDs are the odd numbers 1-255) each listing 20 transfer syntaxes, with role selection and a user
# identity token of a few KB, stay under 100 KB. 256 KiB leaves room for all of that while a connection that
# has not associated yet holds at most this much: max_connections x 256 KiB in all.
MAX_ASSOCIATE_RQ = 256 * 1024
_MIN_ASSOCIATE_RQ = 68  # the fixed fields of an A-ASSOCIATE-RQ (PS3.8 Table 9-11) before its items
_READ_STEP = 64 * 1024
_LINGER_SECONDS = 2.0  # Sta13: how long an aborted connection waits for the peer to close before it is closed
_LOG_EVERY = 60.0  # seconds between log lines for one peer and reason
_TICK = 0.25  # the selector's longest wait: deadlines are kept to within this

# A-ABORT (PS3.8 §9.3.8, Table 9-26): source 2 is the service provider.
_PROVIDER = 0x02
_UNRECOGNIZED_PDU = 0x01
_UNEXPECTED_PDU = 0x02
_INVALID_PARAMETER_VALUE = 0x06

Admit = Callable[[socket.socket, Any, bytes], None]
"""admit(connection, peer address, the A-ASSOCIATE-RQ PDU read from it): hand it to pynetdicom."""


def abort_pdu(source: int, reason: int) -> bytes:
    """An A-ABORT PDU (PS3.8 §9.3.8)."""
    return b"\x07\x00\x00\x00\x00\x04\x00\x00" + bytes((source, reason))


class RefusalLog:
    """Says when to log an event: at most once a minute for each (event, peer address, reason)."""

    def __init__(self, every: float = _LOG_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def due(self, event: str, peer: str, reason: str) -> int:
        """How many times this happened since it was last logged, this one included, if it is to be logged now
        (not within the last minute for this peer and reason); 0 if not."""
        now = self.clock()
        key = (event, peer, reason)
        with self._lock:
            last, held = self._last.get(key, (float("-inf"), 0))
            if now - last < self.every:
                self._last[key] = (last, held + 1)
                return 0
            self._last[key] = (now, 0)
            if len(self._last) > 4096:  # forget peers not seen for a minute
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self.every}
        return held + 1


@dataclass(eq=False)
class _Pending:
    """A connection the gate holds: its handshake or request under way, or an abort being delivered."""

    sock: socket.socket
    address: Any
    peer: str
    accepted: float
    stage: str  # "tls", "request" or "closing"
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)
    want_write: bool = False
    counted: bool = True  # still counted among the connections the gate holds


class Gate:
    """One selector thread that takes accepted connections to the point of a whole A-ASSOCIATE-RQ.

    `add` is called by the accept loop for every accepted connection; `admit` is called on the gate's thread
    for those that get through. `stop` closes every connection the gate holds and ends its thread.
    """

    def __init__(
        self,
        admit: Admit,
        *,
        max_connections: int,
        max_per_peer: int,
        acse_timeout: float,
        tls_handshake_timeout: float,
        network_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        refusals: RefusalLog | None = None,
    ) -> None:
        self.admit = admit
        self.max_connections = max_connections
        self.max_per_peer = max_per_peer
        self.acse_timeout = acse_timeout
        self.tls_handshake_timeout = tls_handshake_timeout
        self.network_timeout = network_timeout
        self.ssl_context = ssl_context
        self.refusals = refusals or RefusalLog()
        self._lock = threading.Lock()
        self._inbox: list[_Pending] = []
        self._held: dict[int, _Pending] = {}  # by file descriptor; only the gate's thread changes it
        self._held_per_peer: dict[str, int] = {}  # connections per peer the gate holds (inbox included)
        self._held_count = 0
        self._admitted: list[tuple[str, weakref.ref[socket.socket]]] = []
        self._stopping = False
        self._waker_r, self._waker_w = socket.socketpair()
        self._waker_r.setblocking(False)
        self._waker_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._waker_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="ingestd-gate", daemon=True)

    # -- called from other threads -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def counts(self) -> tuple[int, int]:
        """(connections the gate holds, connections admitted and still open)."""
        with self._lock:
            self._prune_admitted()
            return self._held_count, len(self._admitted)

    def add(self, sock: socket.socket, address: Any) -> None:
        """Take an accepted connection, or close it at once when a cap is reached or the gate is stopping."""
        peer = str(address[0]) if isinstance(address, tuple) else str(address)
        now = time.monotonic()
        total = from_peer = 0
        with self._lock:
            if self._stopping:
                refused = "stopping"
            else:
                self._prune_admitted()
                total = self._held_count + len(self._admitted)
                from_peer = self._held_per_peer.get(peer, 0) + sum(1 for p, _ in self._admitted if p == peer)
                if total >= self.max_connections:
                    refused = "max_connections"
                elif from_peer >= self.max_per_peer:
                    refused = "max_connections_per_peer"
                else:
                    refused = ""
            if not refused:
                self._held_count += 1
                self._held_per_peer[peer] = self._held_per_peer.get(peer, 0) + 1
                stage = "tls" if self.ssl_context is not None else "request"
                first = self.tls_handshake_timeout if stage == "tls" else self.acse_timeout
                self._inbox.append(_Pending(sock, address, peer, now, stage, now + min(first, self.acse_timeout)))
        if refused:
            _close(sock, reset=True)
            times = self.refusals.due("receive.connection_refused", peer, refused) if refused != "stopping" else 0
            if times:
                log.warning(
                    "receive.connection_refused",
                    peer=peer,
                    reason=refused,
                    times=times,
                    connections=total,
                    peer_connections=from_peer,
                    max_connections=self.max_connections,
                    max_connections_per_peer=self.max_per_peer,
                )
            return
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection the gate holds and end its thread."""
        with self._lock:
            self._stopping = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if not self._thread.is_alive():
            with contextlib.suppress(OSError):
                self._selector.close()
            self._waker_r.close()
            self._waker_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: it is awake already; closed: stopped
            self._waker_w.send(b"\x00")

    def _prune_admitted(self) -> None:
        # An admitted connection counts until pynetdicom or the data phase closes its socket.
        self._admitted = [(p, ref) for p, ref in self._admitted if (s := ref()) is not None and s.fileno() != -1]

    # -- the gate's thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stopping:
                        break
                    incoming, self._inbox = self._inbox, []
                for pending in incoming:
                    self._start(pending)
                timeout = _TICK
                if self._held:
                    timeout = max(0.0, min(_TICK, min(p.deadline for p in self._held.values()) - time.monotonic()))
                for key, _events in self._selector.select(timeout):
                    self._ready(key)
                now = time.monotonic()
                for pending in [p for p in self._held.values() if p.deadline <= now]:
                    self._expired(pending)
        except Exception:  # never leave connections hanging on a bug: log it and close them all
            log.exception("receive.gate_failed")
        finally:
            with self._lock:
                self._stopping = True
                leftovers, self._inbox = self._inbox, []
            for pending in leftovers:  # accepted, never started: closed too, not left to the garbage collector
                self._forget(pending)
                _close(pending.sock)
            for pending in list(self._held.values()):
                self._drop(pending)

    def _ready(self, key: selectors.SelectorKey) -> None:
        if key.data is None:  # the waker
            with contextlib.suppress(OSError):
                while self._waker_r.recv(4096):
                    pass
            return
        pending = self._held.get(key.fd)
        if pending is not None:
            self._step(pending)

    def _start(self, pending: _Pending) -> None:
        sock = pending.sock
        try:
            sock.setblocking(False)
            if pending.stage == "tls" and self.ssl_context is not None:
                pending.sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            self._held[pending.sock.fileno()] = pending
            self._selector.register(pending.sock, selectors.EVENT_READ, pending)
        except (OSError, ValueError):  # the peer reset it already
            self._forget(pending)
            _close(pending.sock)
            return
        self._step(pending)

    def _step(self, pending: _Pending) -> None:
        """Move a connection on as far as it goes without blocking."""
        try:
            if pending.stage == "tls":
                pending.sock.do_handshake()  # type: ignore[attr-defined]
                pending.stage = "request"
                pending.deadline = pending.accepted + self.acse_timeout
            if pending.stage == "request":
                self._read_request(pending)
            elif pending.stage == "closing":
                while pending.sock.recv(_READ_STEP):  # discard whatever the peer still sends, until it closes
                    pass
                self._drop(pending)
        except ssl.SSLWantReadError:
            self._wait_for(pending, write=False)
        except ssl.SSLWantWriteError:
            self._wait_for(pending, write=True)
        except (BlockingIOError, InterruptedError):
            self._wait_for(pending, write=False)
        except ssl.SSLError as exc:
            self._close(pending, "tls_failed", _ssl_reason(exc))
        except _RefusedError as refusal:
            self._abort(pending, refusal.reason, refusal.abort_reason, refusal.detail)
        except _PeerClosedError:
            self._close(pending, "", quiet=True)
        except OSError as exc:
            self._close(pending, "", quiet=exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN))

    def _read_request(self, pending: _Pending) -> None:
        buffer = pending.buffer
        while True:
            if len(buffer) < 6:
                want = 6 - len(buffer)
            else:
                pdu_type, length = buffer[0], int.from_bytes(buffer[2:6], "big")
                if pdu_type != 0x01:
                    known = pdu_type in (0x02, 0x03, 0x04, 0x05, 0x06, 0x07)
                    raise _RefusedError(
                        "not_an_association_request",
                        _UNEXPECTED_PDU if known else _UNRECOGNIZED_PDU,
                        f"a PDU of type 0x{pdu_type:02X}",
                    )
                if not _MIN_ASSOCIATE_RQ <= length <= MAX_ASSOCIATE_RQ:
                    raise _RefusedError(
                        "request_length",
                        _INVALID_PARAMETER_VALUE,
                        f"an A-ASSOCIATE-RQ of {length} bytes (at most {MAX_ASSOCIATE_RQ} are accepted)",
                    )
                want = 6 + length - len(buffer)
                if want == 0:
                    self._hand_over(pending)
                    return
            got = pending.sock.recv(min(want, _READ_STEP))
            if not got:
                raise _PeerClosedError
            buffer += got

    def _hand_over(self, pending: _Pending) -> None:
        self._unregister(pending)
        sock = pending.sock
        try:
            sock.settimeout(self.network_timeout)  # blocking reads from here on, each at most network_timeout
        except OSError:
            self._forget(pending)
            _close(sock)
            return
        with self._lock:
            self._release_hold(pending)
            self._admitted.append((pending.peer, weakref.ref(sock)))
        try:
            self.admit(sock, pending.address, bytes(pending.buffer))
        except Exception:
            log.exception("receive.gate_failed", peer=pending.peer)
            _close(sock)

    def _wait_for(self, pending: _Pending, *, write: bool) -> None:
        if write != pending.want_write:
            pending.want_write = write
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.modify(pending.sock, selectors.EVENT_WRITE if write else selectors.EVENT_READ, pending)

    def _expired(self, pending: _Pending) -> None:
        if pending.stage == "closing":
            self._drop(pending)
        elif pending.stage == "tls" and time.monotonic() - pending.accepted < self.acse_timeout:
            self._close(pending, "tls_handshake_timeout", "the TLS handshake was not done in time")
        else:
            # ARTIM expired in Sta2 (AA-2): close the connection, no PDU.
            self._close(pending, "acse_timeout", f"{len(pending.buffer)} bytes of an A-ASSOCIATE-RQ received")

    def _abort(self, pending: _Pending, reason: str, abort_reason: int, detail: str) -> None:
        """AA-1: send an A-ABORT, then wait (Sta13) a moment for the peer to close before closing."""
        self._log_closed(pending, reason, detail)
        sock = pending.sock
        with contextlib.suppress(OSError, ssl.SSLError):
            sock.send(abort_pdu(_PROVIDER, abort_reason))
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        pending.stage = "closing"
        pending.deadline = time.monotonic() + _LINGER_SECONDS
        pending.buffer = bytearray()
        self._wait_for(pending, write=False)

    def _close(self, pending: _Pending, reason: str, detail: str = "", *, quiet: bool = False) -> None:
        if not quiet:
            self._log_closed(pending, reason, detail)
        self._drop(pending)

    def _log_closed(self, pending: _Pending, reason: str, detail: str) -> None:
        times = self.refusals.due("receive.connection_closed", pending.peer, reason)
        if times:
            log.warning(
                "receive.connection_closed",
                peer=pending.peer,
                reason=reason,
                detail=detail,
                times=times,
                seconds=round(time.monotonic() - pending.accepted, 1),
            )

    def _drop(self, pending: _Pending) -> None:
        self._unregister(pending)
        self._forget(pending)
        _close(pending.sock)

    def _unregister(self, pending: _Pending) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(pending.sock)
        for fd, held in list(self._held.items()):
            if held is pending:
                del self._held[fd]

    def _forget(self, pending: _Pending) -> None:
        with self._lock:
            self._release_hold(pending)

    def _release_hold(self, pending: _Pending) -> None:
        if pending.counted:  # counted once: a second release is a no-op
            pending.counted = False
            self._held_count -= 1
            left = self._held_per_peer.get(pending.peer, 1) - 1
            if left:
                self._held_per_peer[pending.peer] = left
            else:
                self._held_per_peer.pop(pending.peer, None)


class _RefusedError(Exception):
    def __init__(self, reason: str, abort_reason: int, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.abort_reason = abort_reason
        self.detail = detail


class _PeerClosedError(Exception):
    pass


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.__class__.__name__)


def _close(sock: socket.socket, *, reset: bool = False) -> None:
    with contextlib.suppress(OSError):
        if reset:  # refused at once: no TIME_WAIT left behind for a flood of refused connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
