"""The data transfer phase of an accepted association, read and answered straight on the socket.

pynetdicom negotiates every association: the A-ASSOCIATE request and response, presentation contexts and
transfer syntaxes, the calling-AE allow-list, the association limit and TLS. Once it has accepted one,
ingestd serves the rest of it here, in the association's own thread: it reads P-DATA-TF PDUs off the
socket, puts command and data set fragments together (PS3.8 §9.3.5, Annex E), hands each complete C-STORE
data set to the listener's store function and writes the response PDU itself. It answers C-ECHO, ignores
C-CANCEL, answers any other request with "unrecognized operation" (0x0211), answers an A-RELEASE-RQ with
an A-RELEASE-RP, and aborts on a protocol error or when a PDU is not whole by its deadline: the network timeout
after the previous one, plus its length at the floor rate (`listener.min_receive_rate_kbps`), so that a peer
trickling a byte now and then cannot hold its association for ever. A P-DATA-TF PDU longer than the maximum
length we announced is aborted on its header, before any of it is read.

Why: in pynetdicom, every PDU passes through a second thread (the DUL), a state machine, three queues and
per-PDU event dispatch; its socket reads come in 4 KiB pieces and each turn of its loops may sleep; each
C-STORE becomes a pydicom Dataset for its response. That is ~3.2 ms of Python per instance, more than the
~1.5 ms it takes to store and journal it, and the reason one association topped out at ~205 images/s. Here
a data set is read with `recv_into` into one buffer, in as few system calls as the peer's segments allow, and
one association needs one thread.

Memory is bounded by configuration, not by what the peer sends: a data set is received into a buffer of at most
`_SPILL` bytes. One that fits is handed whole to the store (`DataSetSink.finish`), which writes it in one go;
a larger one is handed over a buffer at a time as it arrives (`DataSetSink.write`, which streams it to a part
file in the spool), and the buffer is reused. A peer that goes away mid-instance has its sink abandoned.

The takeover relies on pynetdicom internals (the DUL thread, its state machine and queues, the
association's reactor hook), so it is used only with the pynetdicom releases it was checked against
(`DATA_PHASE_VERSIONS`); with any other release pynetdicom serves the association itself and the listener's
pynetdicom event handlers do the storing, as they did before.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pynetdicom
import structlog
from pynetdicom import evt

from ingestd.receive.dimse import (
    _INVALID_PARAMETER,
    _RELEASE_RP,
    _SERVICE_PROVIDER,
    _SERVICE_USER,
    _UNEXPECTED_PDU,
    _UNRECOGNIZED_PDU,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    RESPONSE_BIT,
    SUCCESS,
    UNRECOGNIZED_OPERATION,
    Command,
    ProtocolError,
    _abort_pdu,
    encode_response,
    p_data_tf,
    parse_command,
)

__all__ = [
    "DATA_PHASE_VERSIONS",
    "Command",
    "DataPhase",
    "DataSetSink",
    "ProtocolError",
    "StoreFunction",
    "StoreRequest",
    "available",
    "encode_response",
    "hold_transport",
    "p_data_tf",
    "parse_command",
]

log = structlog.get_logger("ingestd.listener")

# pynetdicom releases whose DUL and association internals `hold_transport` and `DataPhase` were checked against.
DATA_PHASE_VERSIONS = frozenset({"3.0.0", "3.0.1", "3.0.2", "3.0.3", "3.0.4"})

_MAX_COMMAND = 64 * 1024  # a command set is a few hundred bytes; more is not a DICOM peer
_MAX_SHORT_PDU = 64 * 1024  # A-RELEASE and A-ABORT PDUs carry 4 bytes
_READ_CHUNK = 256 * 1024  # the reader's buffer for PDU and item headers and small fragments
_BUFFER_START = 1024 * 1024  # a data set buffer's first size; it doubles as needed, by at most _GROWTH_STEP
_GROWTH_STEP = 16 * 1024 * 1024  # the most a buffer grows ahead of the bytes actually received
# The most of one data set held in memory: a larger one goes to its sink a buffer at a time as it arrives.
_SPILL = 4 * 1024 * 1024


class DataSetSink(Protocol):
    """Where one message's data set goes as it arrives, in order: `write` (none for a data set that fits the
    buffer), then `finish` with the last bytes; or `abandon`, when the association ends before the data set does.

    The views are the data phase's buffer, reused once the call returns. A sink never raises for what it is given
    (a refusal is the status `finish` returns); an exception ends the association.
    """

    def write(self, chunk: memoryview) -> None: ...

    def finish(self, tail: memoryview) -> int: ...

    def abandon(self) -> None: ...


StoreFunction = Callable[[Any, "StoreRequest"], DataSetSink]
"""open_store(association, what the C-STORE request says) -> the sink its data set is received into; its `finish`
returns the C-STORE status."""


class _Discard:
    """The sink of a data set no operation here uses (a C-FIND identifier, say): its bytes are dropped."""

    def write(self, chunk: memoryview) -> None:
        pass

    def finish(self, tail: memoryview) -> int:
        return UNRECOGNIZED_OPERATION

    def abandon(self) -> None:
        pass


_DISCARD = _Discard()


def available() -> bool:
    """Whether this pynetdicom is one the data phase was checked against."""
    return pynetdicom.__version__ in DATA_PHASE_VERSIONS


class _ClosedError(Exception):
    """The peer closed the connection (or it was shut down locally)."""


class _TooSlowError(TimeoutError):
    """A PDU did not arrive whole by its deadline (network_timeout + its length at the floor rate)."""


@dataclass(frozen=True, slots=True)
class StoreRequest:
    """What a C-STORE request says about its data set: the command's UIDs and its presentation context."""

    sop_class_uid: str  # (0000,0002) Affected SOP Class UID
    sop_instance_uid: str  # (0000,1000) Affected SOP Instance UID
    abstract_syntax: str  # the presentation context's
    transfer_syntax: str  # the presentation context's


def hold_transport(assoc: Any) -> None:
    """Stop this association's DUL thread from reading the socket from now on.

    Called when pynetdicom is about to send the A-ASSOCIATE-AC, before the peer can send any P-DATA, so every
    byte of the data phase reaches `DataPhase` and none is taken by the DUL. The DUL still sends what is
    queued for it (the A-ASSOCIATE-AC itself).
    """
    assoc.dul._is_transport_event = _nothing_to_read


def _nothing_to_read() -> bool:
    return False


class _Reader:
    """Reads a socket through one buffer: headers from the buffer, large fragments straight into their target.

    Every read must be done by `deadline` (a monotonic time; the data phase sets one per PDU), and waits at most
    `idle` seconds for a byte; either raises TimeoutError (`_TooSlowError` for the deadline).
    """

    def __init__(self, sock: socket.socket, idle: float | None = None) -> None:
        self._sock = sock
        self._buffer = bytearray(_READ_CHUNK)
        self._view = memoryview(self._buffer)
        self._start = 0
        self._end = 0
        self.idle = idle
        self.deadline = float("inf")
        self._timeout = sock.gettimeout()

    def _recv_into(self, target: memoryview) -> int:
        timeout, by_deadline = self.idle, False
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _TooSlowError
        if timeout is None or left < timeout:
            timeout, by_deadline = left, True
        if timeout != self._timeout:  # a system call: only when it changes (close to a deadline)
            self._sock.settimeout(timeout)
            self._timeout = timeout
        try:
            return self._sock.recv_into(target)
        except TimeoutError:
            if by_deadline:
                raise _TooSlowError from None
            raise

    def exact(self, size: int) -> bytes:
        """The next `size` bytes (`size` at most the buffer's)."""
        while self._end - self._start < size:
            self._fill()
        start = self._start
        self._start += size
        return bytes(self._view[start : start + size])

    def into(self, target: memoryview) -> None:
        """Fill `target` with the next len(target) bytes."""
        have = min(self._end - self._start, len(target))
        if have:
            target[:have] = self._view[self._start : self._start + have]
            self._start += have
        filled = have
        while filled < len(target):
            got = self._recv_into(target[filled:])
            if not got:
                raise _ClosedError
            filled += got

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buffer):
            pending = self._end - self._start
            self._view[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        got = self._recv_into(self._view[self._end :])
        if not got:
            raise _ClosedError
        self._end += got


class _DataSetBuffer:
    """One message's data set, received into a buffer of at most `_SPILL` bytes that is reused from instance to
    instance; a data set larger than that is handed to its sink a full buffer at a time."""

    def __init__(self) -> None:
        self._buffer = bytearray(_BUFFER_START)
        self.size = 0

    def append_from(self, reader: _Reader, length: int, sink: DataSetSink) -> None:
        """Read the next `length` bytes onto the data set, growing the buffer only as the bytes arrive."""
        while length:
            if self.size == _SPILL:
                with memoryview(self._buffer) as view, view[: self.size] as full:
                    sink.write(full)
                self.size = 0
            step = min(length, _GROWTH_STEP, _SPILL - self.size)
            end = self.size + step
            if end > len(self._buffer):
                grown = max(end, len(self._buffer) + min(len(self._buffer), _GROWTH_STEP))
                self._buffer.extend(bytes(min(grown, _SPILL) - len(self._buffer)))
            with memoryview(self._buffer) as view:
                reader.into(view[self.size : end])
            self.size = end
            length -= step

    def view(self) -> memoryview:
        return memoryview(self._buffer)[: self.size]

    def reset(self) -> None:
        self.size = 0


class _Message:
    """The DIMSE message being put together from presentation data value fragments (PS3.8 Annex E)."""

    def __init__(self, accepted_contexts: dict[int, Any], open_sink: Callable[[Command, int], DataSetSink]) -> None:
        self._accepted = accepted_contexts
        self._open_sink = open_sink
        self._command_bytes = bytearray()
        self.command: Command | None = None
        self.context_id: int | None = None
        self.data = _DataSetBuffer()
        self.sink: DataSetSink | None = None

    def add_fragment(self, reader: _Reader, context_id: int, control: int, size: int) -> bool:
        """Read one fragment of `size` bytes; True when it completes the message."""
        if self.context_id is None:
            if context_id not in self._accepted:
                raise ProtocolError(f"P-DATA for presentation context {context_id}, which was not accepted")
            self.context_id = context_id
        elif context_id != self.context_id:
            raise ProtocolError("one DIMSE message's fragments arrived on two presentation contexts")
        last = bool(control & 0x02)
        if control & 0x01:  # a command fragment
            if self.command is not None or len(self._command_bytes) + size > _MAX_COMMAND:
                raise ProtocolError("a command set arrived out of order or too large")
            self._command_bytes += reader.exact(size)
            if not last:
                return False
            self.command = parse_command(self._command_bytes)
            return not self.command.has_data_set
        if self.command is None or not self.command.has_data_set:
            raise ProtocolError("a data set fragment arrived without its command")
        if self.sink is None:
            self.sink = self._open_sink(self.command, context_id)
        self.data.append_from(reader, size, self.sink)
        return last

    def finish(self) -> int:
        """Hand the rest of the data set to its sink (an empty one if the command said there is none)."""
        if self.command is None or self.context_id is None:
            raise ProtocolError("a message without its command")  # cannot happen: add_fragment reads it first
        sink = self.sink if self.sink is not None else self._open_sink(self.command, self.context_id)
        self.sink = None
        with self.data.view() as tail:
            return sink.finish(tail)

    def abandon(self) -> None:
        """The association ended mid-message: the sink keeps nothing."""
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.abandon()

    def reset(self) -> None:
        self.abandon()
        self._command_bytes.clear()
        self.command = None
        self.context_id = None
        self.data.reset()


class DataPhase:
    """Serves one accepted association from the A-ASSOCIATE-AC to its release or abort.

    `run` replaces the association's reactor (it runs in the association's thread); `abort` may be called from
    any thread to end the association (the listener stopping). `how` says how it ended.
    """

    def __init__(
        self,
        assoc: Any,
        store: StoreFunction,
        network_timeout: float,
        *,
        max_pdu_length: int = 0,
        min_rate: float = 0.0,
    ) -> None:
        self.assoc = assoc
        self.store = store
        self.network_timeout = network_timeout
        # The longest P-DATA-TF PDU accepted: the maximum length we announced in the A-ASSOCIATE-AC (0: none).
        self.max_pdu_length = max_pdu_length
        # The floor, in bytes per second: a PDU must be whole within network_timeout + its length / min_rate of
        # the end of the one before (0: within network_timeout, however long it is).
        self.min_rate = min_rate
        self.slow: tuple[int, float] | None = None  # (the PDU's length, seconds it was given) when too slow
        self.how = "open"
        self.protocol_error: str | None = None
        self._send_lock = threading.Lock()
        self._stopping = False
        self._abort_sent = False
        self._sock: socket.socket | None = None
        self._peer_max_pdu = int(assoc.requestor.maximum_length or 0)  # 0: no limit
        self._message: _Message | None = None

    def install(self) -> None:
        """Have the association run this data phase instead of pynetdicom's reactor."""
        self.assoc._run_reactor = self.run

    def run(self) -> None:
        assoc = self.assoc
        released = False
        try:
            self._take_over_from_dul()
            self._sock = assoc.dul.socket.socket
            self._sock.settimeout(self.network_timeout)
            released = self._serve(_Reader(self._sock, self.network_timeout))
        except _ClosedError:
            if self._stopping:
                self.how = "stopped"
                self._send_abort(_SERVICE_USER, 0x00)
            else:
                self.how = "closed by peer"
        except _TooSlowError:
            self.how = "stopped" if self._stopping else "too slow"
            self._send_abort(_SERVICE_USER, 0x00)
        except TimeoutError:
            self.how = "stopped" if self._stopping else "network timeout"
            self._send_abort(_SERVICE_USER, 0x00)
        except ProtocolError as exc:
            self.how = "protocol error"
            self.protocol_error = str(exc)
            self._send_abort(_SERVICE_PROVIDER, exc.reason)
        except OSError:
            self.how = "stopped" if self._stopping else "connection lost"
        except Exception:
            self.how = "failed"
            log.exception("receive.association_failed", calling_aet=assoc.requestor.ae_title)
            self._send_abort(_SERVICE_PROVIDER, 0x00)
        finally:
            self._finish(released)

    def abort(self) -> None:
        """End the association from another thread: A-ABORT to the peer, then shut the connection down.

        A store already running finishes (it is durable); its response may not reach the peer.
        """
        self._stopping = True
        self._send_abort(_SERVICE_USER, 0x00)
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- the loop ------------------------------------------------------------------------------------

    def _serve(self, reader: _Reader) -> bool:
        """Serve PDUs until the peer releases (True) or aborts (False)."""
        message = self._message = _Message(self.assoc._accepted_cx, self._open_sink)
        while True:
            if self._stopping:
                raise _ClosedError
            # No progress (a whole PDU) for network_timeout ends the association; a long PDU gets its length at
            # the floor rate on top, so that a peer trickling it cannot hold its association for ever.
            started = time.monotonic()
            reader.deadline = started + self.network_timeout
            header = reader.exact(6)
            pdu_type = header[0]
            length = int.from_bytes(header[2:6], "big")
            if self.min_rate > 0:
                reader.deadline += length / self.min_rate
            self.slow = (length, reader.deadline - started)
            if pdu_type == 0x04:
                if self.max_pdu_length and length > self.max_pdu_length:
                    # Refused before a byte of it is read. PS3.8 Table 9-26 has no "PDU length" reason: the A-ABORT
                    # is from the service provider (2) with reason 6, invalid PDU parameter value, as dcm4che's
                    # PDUDecoder answers a PDU longer than it accepts (AAbort.INVALID_PDU_PARAMETER_VALUE).
                    raise ProtocolError(
                        f"a P-DATA-TF PDU of {length} bytes, longer than the {self.max_pdu_length} announced",
                        _INVALID_PARAMETER,
                    )
                self._p_data(reader, length, message)
            elif pdu_type == 0x05:  # A-RELEASE-RQ
                self._skip(reader, length)
                self._send(_RELEASE_RP)
                return True
            elif pdu_type == 0x07:  # A-ABORT
                self._skip(reader, length)
                self.how = "aborted by peer"
                return False
            elif pdu_type in (0x01, 0x02, 0x03, 0x06):
                raise ProtocolError(f"an unexpected PDU (type 0x{pdu_type:02X}) during the data phase", _UNEXPECTED_PDU)
            else:
                raise ProtocolError(f"an unrecognized PDU (type 0x{pdu_type:02X})", _UNRECOGNIZED_PDU)

    def _p_data(self, reader: _Reader, length: int, message: _Message) -> None:
        """Read one P-DATA-TF PDU's presentation data value items, serving each message they complete."""
        remaining = length
        while remaining:
            if remaining < 6:
                raise ProtocolError("a P-DATA-TF PDU ends inside a presentation data value item")
            item = reader.exact(6)
            item_length = int.from_bytes(item[0:4], "big")
            if item_length < 2 or item_length + 4 > remaining:
                raise ProtocolError("a presentation data value item's length does not fit its PDU")
            remaining -= item_length + 4
            if message.add_fragment(reader, item[4], item[5], item_length - 2):
                started = time.monotonic()
                self._dispatch(message)
                message.reset()
                reader.deadline += time.monotonic() - started  # the peer waits for our answer meanwhile

    def _dispatch(self, message: _Message) -> None:
        command, context_id = message.command, message.context_id
        if command is None or context_id is None:
            raise ProtocolError("a message without its command")  # cannot happen: add_fragment reads it first
        field = command.field
        if field == C_STORE_RQ:
            status = message.finish()
            response_field = C_STORE_RQ | RESPONSE_BIT
            instance = command.sop_instance_uid
        elif field == C_CANCEL_RQ or field & RESPONSE_BIT:
            return  # nothing to cancel (one operation at a time), and ingestd never sends requests
        else:
            status = SUCCESS if field == C_ECHO_RQ else UNRECOGNIZED_OPERATION
            response_field = field | RESPONSE_BIT
            instance = command.sop_instance_uid if field != C_ECHO_RQ else ""
        response = encode_response(response_field, command.message_id, command.sop_class_uid, instance, status)
        self._send(p_data_tf(context_id, response, self._peer_max_pdu))

    def _open_sink(self, command: Command, context_id: int) -> DataSetSink:
        """Where a message's data set goes: the store's sink for a C-STORE, nowhere for any other."""
        if command.field != C_STORE_RQ:
            return _DISCARD
        context = self.assoc._accepted_cx[context_id]
        request = StoreRequest(
            command.sop_class_uid,
            command.sop_instance_uid,
            str(context.abstract_syntax),
            str(context.transfer_syntax[0]),
        )
        return self.store(self.assoc, request)

    @staticmethod
    def _skip(reader: _Reader, length: int) -> None:
        if length > _MAX_SHORT_PDU:
            raise ProtocolError("a release or abort PDU is impossibly long")
        reader.exact(length)

    # -- sending and ending --------------------------------------------------------------------------

    def _send(self, pdu: bytes) -> None:
        with self._send_lock:
            if self._stopping or self._sock is None:
                raise _ClosedError
            self._sock.sendall(pdu)

    def _send_abort(self, source: int, reason: int) -> None:
        sock = self._sock
        # Another thread may be stuck sending to a peer that reads nothing: then the abort is not sent, and
        # shutting the socket down (`abort`) ends that send.
        if sock is None or not self._send_lock.acquire(timeout=1.0):
            return
        try:
            if self._abort_sent:
                return
            self._abort_sent = True
            with contextlib.suppress(OSError):
                sock.sendall(_abort_pdu(source, reason))
        finally:
            self._send_lock.release()

    def _take_over_from_dul(self) -> None:
        """Wait until the DUL has sent the A-ASSOCIATE-AC, then stop its thread: the socket is ours alone."""
        dul = self.assoc.dul
        deadline = time.monotonic() + self.network_timeout
        while True:
            state = dul.state_machine.current_state
            if state == "Sta6" and dul.to_provider_queue.empty():
                break
            # Sta3: the A-ASSOCIATE-AC is still queued; anything else: the connection went meanwhile.
            if state not in ("Sta3", "Sta6") or not dul.is_alive() or time.monotonic() > deadline:
                raise _ClosedError
            time.sleep(0.0001)
        dul.kill_dul()
        dul.join()

    def _finish(self, released: bool) -> None:
        assoc = self.assoc
        if self._message is not None:  # an instance cut off by the association's end: nothing of it is kept
            try:
                self._message.abandon()
            except Exception:
                log.exception("receive.association_failed", calling_aet=assoc.requestor.ae_title)
        if released:
            self.how = "released"
        assoc.dul.state_machine.current_state = "Sta1"
        assoc.is_established = False
        if released:
            assoc.is_released = True
            evt.trigger(assoc, evt.EVT_RELEASED, {})
        else:
            assoc.is_aborted = True
            evt.trigger(assoc, evt.EVT_ABORTED, {})
        assoc.kill()
