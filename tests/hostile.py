"""Hostile and legitimate DICOM clients for the listener's starvation tests and bench/hostile.py.

Hostile clients speak raw TCP: an A-ASSOCIATE-RQ built by hand, sent whole, in part or a byte at a time.
The legitimate client is pynetdicom, as a scanner would be, retrying while it is refused.
`certificates` makes a throw-away CA and TLS certificates. `RawPeer` and the PDU builders below it are the data
phase tests' requestor: PDUs built by hand from PS3.8.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage
from pynetdicom import AE

HOST = "127.0.0.1"
APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
EXPLICIT_LE = b"1.2.840.10008.1.2.1"
VERIFICATION = b"1.2.840.10008.1.1"


def pdu_item(kind: int, value: bytes) -> bytes:
    return bytes((kind, 0)) + len(value).to_bytes(2, "big") + value


def associate_rq(
    called: str = "INGESTD", calling: str = "HOSTILE", max_pdu: int = 16384, abstract: bytes = VERIFICATION
) -> bytes:
    """A valid A-ASSOCIATE-RQ PDU proposing `abstract` (context 1), Explicit VR Little Endian."""
    context = bytes((1, 0, 0, 0)) + pdu_item(0x30, abstract) + pdu_item(0x40, EXPLICIT_LE)
    user = pdu_item(0x51, max_pdu.to_bytes(4, "big")) + pdu_item(0x52, b"1.2.826.0.1.3680043.9.7433.1")
    body = (
        b"\x00\x01\x00\x00"
        + called.encode().ljust(16)
        + calling.encode().ljust(16)
        + bytes(32)
        + pdu_item(0x10, APPLICATION_CONTEXT)
        + pdu_item(0x20, context)
        + pdu_item(0x50, user)
    )
    return b"\x01\x00" + len(body).to_bytes(4, "big") + body


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def refused(port: int, within: float = 2.0) -> bool:
    """Whether a new connection is closed by the listener at once. The close may come before connect() returns:
    with a timeout, connect() waits in poll(), and a reset that arrives first is its result (ECONNRESET)."""
    try:
        sock = connect(port)
    except ConnectionResetError:
        return True
    try:
        return closed_by_peer(sock, within)
    finally:
        sock.close()


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """The next PDU's type and body; raises ConnectionError when the connection ends first."""
    sock.settimeout(timeout)
    header = _exact(sock, 6)
    return header[0], _exact(sock, int.from_bytes(header[2:6], "big"))


def _exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        got = sock.recv(size - len(data))
        if not got:
            raise ConnectionError("closed")
        data += got
    return bytes(data)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the other end closes (EOF or reset) within `timeout` s; data it sends first is read and dropped."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            return False
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionError, OSError):
            return True


class Trickler:
    """Many connections, each sending `payload` `step` bytes at a time every `interval` s, in one thread.

    `open_count()` says how many are still open (not closed by the other end); `stop()` closes them all.
    """

    def __init__(self, port: int, count: int, payload: bytes, *, step: int = 1, interval: float = 0.5) -> None:
        self.port = port
        self.payload = payload
        self.step = step
        self.interval = interval
        self.sockets: list[socket.socket] = []
        self.sent: dict[int, int] = {}
        self.closed: set[int] = set()
        self.opened_at = 0.0
        self.closed_at: list[float] = []
        for _ in range(count):
            sock = connect(port)
            sock.setblocking(False)
            self.sockets.append(sock)
            self.sent[sock.fileno()] = 0
        self.opened_at = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="trickler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for sock in self.sockets:
                fd = sock.fileno()
                if fd in self.closed:
                    continue
                with contextlib.suppress(BlockingIOError):
                    try:
                        if sock.recv(65536) == b"":
                            self._mark(fd)
                            continue
                    except BlockingIOError:
                        pass
                    except OSError:
                        self._mark(fd)
                        continue
                    at = self.sent[fd]
                    if at < len(self.payload):
                        try:
                            self.sent[fd] = at + sock.send(self.payload[at : at + self.step])
                        except OSError:
                            self._mark(fd)
            self._stop.wait(self.interval)

    def _mark(self, fd: int) -> None:
        with self._lock:
            if fd not in self.closed:
                self.closed.add(fd)
                self.closed_at.append(time.monotonic() - self.opened_at)

    def open_count(self) -> int:
        with self._lock:
            return len(self.sockets) - len(self.closed)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self.sockets:
            sock.close()


def legitimate(
    port: int,
    *,
    store: Dataset | None = None,
    tls: ssl.SSLContext | None = None,
    within: float = 40.0,
    calling: str = "SCANNER",
) -> float:
    """A C-ECHO (and a C-STORE of `store`) as a scanner does it, retrying while refused, all within `within` s.

    Returns the seconds from the first attempt to the answer; raises AssertionError if it did not succeed.
    """
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION.decode())
    ae.add_requested_context(MRImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    start = time.monotonic()
    last = "not tried"
    while time.monotonic() - start < within:
        tls_args = (tls, HOST) if tls is not None else None
        assoc = ae.associate(HOST, port, ae_title="INGESTD", tls_args=tls_args)
        if not assoc.is_established:
            last = "association refused or failed"
            time.sleep(0.2)
            continue
        try:
            status = assoc.send_c_echo()
            ok = bool(status) and status.Status == 0
            if ok and store is not None:
                stored = assoc.send_c_store(store)
                ok = bool(stored) and stored.Status == 0
            if ok:
                return time.monotonic() - start
            last = "echo or store failed"
        finally:
            assoc.release()
            if assoc.is_established:
                assoc.abort()
    raise AssertionError(f"no legitimate C-ECHO within {within} s: {last}")


def proc_status(pid: int, key: str) -> int:
    """A number from /proc/PID/status (Threads, or VmRSS in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _element(element: int, value: bytes) -> bytes:
    return b"\x00\x00" + element.to_bytes(2, "little") + len(value).to_bytes(4, "little") + value


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\x00" if len(raw) % 2 else raw


def c_store_p_data(sop_class: str, sop_instance: str, data_set: bytes, message_id: int = 1) -> bytes:
    """One P-DATA-TF PDU (context 1) carrying a C-STORE-RQ command and its whole data set."""
    body = (
        _element(0x0002, _uid(sop_class))
        + _element(0x0100, (0x0001).to_bytes(2, "little"))
        + _element(0x0110, message_id.to_bytes(2, "little"))
        + _element(0x0700, b"\x00\x00")
        + _element(0x0800, b"\x00\x00")
        + _element(0x1000, _uid(sop_instance))
    )
    command = _element(0x0000, len(body).to_bytes(4, "little")) + body
    items = b""
    for control, value in ((0x03, command), (0x02, data_set)):
        items += (len(value) + 2).to_bytes(4, "big") + bytes((1, control)) + value
    return b"\x04\x00" + len(items).to_bytes(4, "big") + items


def status_of(p_data_body: bytes) -> int:
    """The (0000,0900) Status of a response command carried whole in one P-DATA-TF PDU's body."""
    command = p_data_body[6:]
    offset = 0
    while offset + 8 <= len(command):
        element = int.from_bytes(command[offset + 2 : offset + 4], "little")
        length = int.from_bytes(command[offset + 4 : offset + 8], "little")
        if element == 0x0900:
            return int.from_bytes(command[offset + 8 : offset + 8 + length], "little")
        offset += 8 + length
    raise ValueError("no status in the response")


# -- TLS: a throw-away CA and certificates, made with openssl --------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def certificates(folder: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    paths = {
        name: folder / name for name in ("ca.key", "ca.crt", "server.key", "server.crt", "client.key", "client.crt")
    }
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(paths["ca.key"]),
        "-out",
        str(paths["ca.crt"]),
    )
    for role in ("server", "client"):
        csr = folder / f"{role}.csr"
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={role}",
            "-keyout",
            str(paths[f"{role}.key"]),
            "-out",
            str(csr),
        )
        ext = folder / f"{role}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n" if role == "server" else "extendedKeyUsage=clientAuth\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(paths["ca.crt"]),
            "-CAkey",
            str(paths["ca.key"]),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(paths[f"{role}.crt"]),
        )
    return paths


def client_context(paths: dict[str, Path], *, with_certificate: bool) -> ssl.SSLContext:
    """A client's TLS context trusting the CA of `certificates`, presenting the client certificate if asked."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(paths["ca.crt"]))
    if with_certificate:
        context.load_cert_chain(str(paths["client.crt"]), str(paths["client.key"]))
    return context


# -- a raw requestor for the data phase tests: PDUs built by hand (PS3.8), no pynetdicom ----------------


def associate_rq_contexts(calling: str, called: str, contexts: dict[int, str]) -> bytes:
    """An A-ASSOCIATE-RQ proposing each context's abstract syntax with Explicit VR Little Endian."""
    body = b"\x00\x01\x00\x00" + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
    body += pdu_item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, abstract in contexts.items():
        body += pdu_item(
            0x20, bytes((context_id, 0, 0, 0)) + pdu_item(0x30, abstract.encode()) + pdu_item(0x40, EXPLICIT_LE)
        )
    body += pdu_item(0x50, pdu_item(0x51, (16384).to_bytes(4, "big")) + pdu_item(0x52, b"1.2.826.0.1.3680043.9.9999"))
    return b"\x01\x00" + len(body).to_bytes(4, "big") + body


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """A presentation data value item: control 0x01 = command, 0x02 = last fragment."""
    return (len(data) + 2).to_bytes(4, "big") + bytes((context_id, control)) + data


def p_data(*items: bytes) -> bytes:
    """A P-DATA-TF PDU of these presentation data value items."""
    body = b"".join(items)
    return b"\x04\x00" + len(body).to_bytes(4, "big") + body


def dimse_command(
    field: int, message_id: int, sop_class: str, sop_instance: str = "", *, data_set: bool = True
) -> bytes:
    """A request's command set, encoded by hand (PS3.7 §9.3): group length first, elements in tag order."""

    def element(number: int, value: bytes) -> bytes:
        return b"\x00\x00" + number.to_bytes(2, "little") + len(value).to_bytes(4, "little") + value

    def uid(value: str) -> bytes:
        raw = value.encode()
        return raw + b"\x00" if len(raw) % 2 else raw

    body = (
        element(0x0002, uid(sop_class))
        + element(0x0100, field.to_bytes(2, "little"))
        + element(0x0110, message_id.to_bytes(2, "little"))
        + element(0x0700, (0).to_bytes(2, "little"))
        + element(0x0800, (0x0000 if data_set else 0x0101).to_bytes(2, "little"))
    )
    if sop_instance:
        body += element(0x1000, uid(sop_instance))
    return element(0x0000, len(body).to_bytes(4, "little")) + body


def store_command(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    return dimse_command(0x0001, message_id, sop_class, sop_instance)


class RawPeer:
    """A DICOM requestor speaking PDUs directly on a socket."""

    def __init__(self, port: int, contexts: dict[int, str] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(
            associate_rq_contexts("RAWSCU", "INGESTD", contexts or {1: MRImageStorage, 3: VERIFICATION.decode()})
        )
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x02, f"association not accepted (PDU type {pdu_type:#x})"
        self.accepted = self._accepted_contexts(body)

    @staticmethod
    def _accepted_contexts(body: bytes) -> set[int]:
        accepted, offset = set(), 68
        while offset < len(body):
            kind, length = body[offset], int.from_bytes(body[offset + 2 : offset + 4], "big")
            if kind == 0x21 and body[offset + 6] == 0:
                accepted.add(body[offset + 4])
            offset += 4 + length
        return accepted

    def _exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def read_pdu(self) -> tuple[int, bytes]:
        header = self._exact(6)
        return header[0], self._exact(int.from_bytes(header[2:6], "big"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def status_of_response(self) -> tuple[int, int]:
        """(Command Field, Status) of the next response, which must be one PDU with one command fragment."""
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x04, f"expected P-DATA, got PDU type {pdu_type:#x}"
        assert body[5] == 0x03, "a response's command set comes as one last fragment"
        elements, raw, offset = {}, body[6:], 0
        while offset < len(raw):
            number, length = (
                int.from_bytes(raw[offset + 2 : offset + 4], "little"),
                int.from_bytes(raw[offset + 4 : offset + 8], "little"),
            )
            elements[number] = raw[offset + 8 : offset + 8 + length]
            offset += 8 + length
        return int.from_bytes(elements[0x0100], "little"), int.from_bytes(elements[0x0900], "little")

    def release(self) -> None:
        self.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        assert self.read_pdu() == (0x06, b"\x00\x00\x00\x00")
        self.sock.close()

    def closed_by_listener(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionError:
            return True

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()  # after release() too: closing a closed socket does nothing
