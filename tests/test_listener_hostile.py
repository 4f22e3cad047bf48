"""Nobody can starve the listener, nor make it buffer what a PDU declares (issue 13, observations 1 and 2).

Each test runs a real daemon on 127.0.0.1 with short timeouts, opens hostile connections (silent, trickling,
mid-TLS-handshake, associated and trickling, oversized PDUs) and measures a legitimate scanner alongside: its
C-ECHO and C-STORE must succeed within 40 s and go on succeeding. The daemon's thread count and RSS are read
from /proc. Every connection and process a test opens, it closes.
"""

from __future__ import annotations

import select
import shutil
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestd.receive.gate import RefusalLog
from tests.dicom import encode_raw, make_instance
from tests.hostile import (
    Trickler,
    associate_rq,
    c_store_p_data,
    certificates,
    client_context,
    closed_by_peer,
    connect,
    legitimate,
    proc_status,
    read_pdu,
    refused,
    status_of,
)
from tests.procs import HOST, DaemonProcess, free_port, wait_until

ACSE_TIMEOUT = 3.0
NETWORK_TIMEOUT = 4.0


def _config(tmp_path: Path, port: int, listener: str = "") -> Path:
    """The listener's settings for these tests, `listener` (`", key: value, ..."`) replacing any of them: each key
    once (`run` refuses a key given twice)."""
    settings = {
        "host": HOST,
        "port": str(port),
        "ae_title": "INGESTD",
        "max_associations": "16",
        "max_connections": "400",
        "max_connections_per_peer": "400",
        "acse_timeout_seconds": str(ACSE_TIMEOUT),
        "network_timeout_seconds": str(NETWORK_TIMEOUT),
    }
    for item in filter(None, (part.strip() for part in listener.split(","))):
        key, _, value = item.partition(":")
        settings[key.strip()] = value.strip()
    path = tmp_path / "ingestd.yaml"
    path.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        f"listener: {{{', '.join(f'{key}: {value}' for key, value in settings.items())}}}\n"
        "study_idle_seconds: 3600\n"
        "spool: {min_free_mb: 10}\n"
        "logging: {level: info, format: json}\n"
        "metrics: {port: 0}\n",
        encoding="utf-8",
    )
    return path


Start = Callable[..., tuple[DaemonProcess, int]]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Start]:
    started: list[DaemonProcess] = []

    def start(listener: str = "") -> tuple[DaemonProcess, int]:
        port = free_port()
        daemon = DaemonProcess(_config(tmp_path, port, listener), tmp_path / "daemon.log").start()
        started.append(daemon)
        daemon.wait_ready(port)
        return daemon, port

    yield start
    for daemon in started:
        daemon.__exit__(None, None, None)


def _threads(daemon: DaemonProcess) -> int:
    return proc_status(daemon.pid, "Threads")


def _rss_mb(daemon: DaemonProcess) -> float:
    return proc_status(daemon.pid, "VmRSS") / 1024


def _served_meanwhile(port: int, rounds: int = 3, **kwargs: Any) -> list[float]:
    """Latencies of `rounds` legitimate C-ECHO + C-STORE exchanges, each of which must succeed within 40 s."""
    return [legitimate(port, store=make_instance(), **kwargs) for _ in range(rounds)]


def test_silent_partial_requests_do_not_starve(daemon_factory: Start) -> None:
    """(a) max_associations connections that send 5 bytes of an A-ASSOCIATE-RQ and then nothing."""
    daemon, port = daemon_factory()
    baseline = _threads(daemon)
    hostile = [connect(port) for _ in range(16)]
    try:
        for sock in hostile:
            sock.sendall(associate_rq()[:5])
        latencies = _served_meanwhile(port)
        assert max(latencies) < 40
        assert _threads(daemon) <= baseline + 4
        # ingestd closes them once ARTIM (acse_timeout) has passed since their accept
        assert all(closed_by_peer(sock, ACSE_TIMEOUT + 5) for sock in hostile)
        closes = daemon.logged("receive.connection_closed")
        assert closes and closes[0]["reason"] == "acse_timeout" and closes[0]["peer"] == HOST
        assert len(closes) == 1  # once per peer and reason a minute, however many
        assert closes[0]["times"] >= 1
    finally:
        for sock in hostile:
            sock.close()
    assert legitimate(port) < 40


def test_trickled_requests_do_not_starve(daemon_factory: Start) -> None:
    """(b) 200 connections trickling an A-ASSOCIATE-RQ a byte at a time: no thread each, closed at ARTIM."""
    daemon, port = daemon_factory()
    baseline = _threads(daemon)
    trickler = Trickler(port, 200, associate_rq(), step=1, interval=0.5)
    try:
        peak = baseline
        latencies = []
        for _ in range(3):
            latencies.append(legitimate(port, store=make_instance()))
            peak = max(peak, _threads(daemon))
        assert max(latencies) < 40
        assert peak <= baseline + 4, f"{peak} threads with 200 trickling connections (baseline {baseline})"
        wait_until(lambda: trickler.open_count() == 0, ACSE_TIMEOUT + 10, message="ingestd to close the tricklers")
        assert max(trickler.closed_at) < ACSE_TIMEOUT + 3
    finally:
        trickler.stop()
    assert legitimate(port) < 40


def test_trickling_associations_are_aborted(daemon_factory: Start) -> None:
    """(c) Associated peers sending P-DATA 1 byte every 2 s (under network_timeout) lose their slots."""
    daemon, port = daemon_factory(", min_receive_rate_kbps: 8")
    hostile = []
    try:
        for _ in range(16):  # every association slot
            sock = connect(port)
            sock.sendall(associate_rq(calling="TRICKLER"))
            kind, _ = read_pdu(sock)
            assert kind == 0x02  # A-ASSOCIATE-AC
            sock.sendall(b"\x04\x00\x00\x00\x08\x00")  # a P-DATA-TF of 2 KB: 2 s at the floor, + 4 s
            hostile.append(sock)
        started = time.monotonic()
        stop_at = started + NETWORK_TIMEOUT + 2 + 15
        open_ = list(hostile)
        latency = None
        while open_ and time.monotonic() < stop_at:
            for sock in list(open_):
                try:
                    sock.send(b"\x00")
                except OSError:
                    open_.remove(sock)
            if latency is None and time.monotonic() - started > 1:
                latency = legitimate(port, store=make_instance())  # retries while the slots are held
            time.sleep(2.0)
            open_ = [s for s in open_ if not closed_by_peer(s, 0.01)]
        assert not open_, f"{len(open_)} trickling associations still open"
        assert latency is not None and latency < 40
        slow = daemon.logged("receive.peer_too_slow")
        assert slow and slow[0]["pdu_length"] == 2048
        closed = [r for r in daemon.logged("receive.association_closed") if r.get("calling_aet") == "TRICKLER"]
        assert closed and all(r["how"] == "too slow" for r in closed)
    finally:
        for sock in hostile:
            sock.close()
    assert _served_meanwhile(port, rounds=2)


def test_slow_sender_above_the_floor_is_served(daemon_factory: Start) -> None:
    """A PDU that takes longer than network_timeout, arriving faster than the floor rate, is stored."""
    _daemon, port = daemon_factory(", min_receive_rate_kbps: 8")  # 1000 bytes/s
    instance = make_instance(rows=100)  # a 20 KB data set
    pdu = c_store_p_data(instance.SOPClassUID, instance.SOPInstanceUID, encode_raw(instance))
    assert len(pdu) > 20000
    sock = connect(port)
    try:
        sock.sendall(associate_rq(calling="SLOWLINK", abstract=str(instance.SOPClassUID).encode()))
        kind, _ = read_pdu(sock)
        assert kind == 0x02
        started = time.monotonic()
        for at in range(0, len(pdu), 1000):  # 4000 bytes/s: 5 s for the PDU, network_timeout is 4 s
            sock.sendall(pdu[at : at + 1000])
            time.sleep(0.25)
        assert time.monotonic() - started > NETWORK_TIMEOUT
        kind, body = read_pdu(sock)
        assert kind == 0x04 and status_of(body) == 0x0000
        sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-RELEASE-RQ
        assert read_pdu(sock)[0] == 0x06
    finally:
        sock.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_silent_connections_do_not_block_tls(tmp_path: Path, daemon_factory: Start) -> None:
    """(d) With TLS, silent TCP connections (mid-handshake) while a TLS sender does C-ECHO and C-STORE."""
    folder = tmp_path / "certs"
    folder.mkdir()
    paths = certificates(folder)
    tls = (
        f", tls: {{certificate: {paths['server.crt']}, key: {paths['server.key']},"
        f" ca_certificates: {paths['ca.crt']}}}, tls_handshake_timeout_seconds: 2"
    )
    port = free_port()
    daemon = DaemonProcess(_config(tmp_path, port, tls), tmp_path / "daemon.log")
    with daemon:
        context = client_context(paths, with_certificate=True)
        wait_until(lambda: _tls_echo(port, context), 30, message="ingestd to answer C-ECHO over TLS")
        baseline = _threads(daemon)
        silent = [connect(port) for _ in range(200)]
        try:
            latencies = _served_meanwhile(port, tls=context)
            assert max(latencies) < 40
            assert _threads(daemon) <= baseline + 4
            assert all(closed_by_peer(sock, 2 + 5) for sock in silent)  # tls_handshake_timeout_seconds
            reasons = {r["reason"] for r in daemon.logged("receive.connection_closed")}
            assert "tls_handshake_timeout" in reasons
        finally:
            for sock in silent:
                sock.close()
        assert legitimate(port, tls=context) < 40


def _tls_echo(port: int, context: ssl.SSLContext) -> bool:
    try:
        return legitimate(port, tls=context, within=2) < 2
    except AssertionError:
        return False


def _flood(sock: socket.socket, header: bytes, megabytes: int) -> bytes:
    """Send `header` then up to `megabytes` MB of zeros, reading what comes back; return what came back."""
    sock.setblocking(False)
    chunk = bytes(1024 * 1024)
    pending = memoryview(header + chunk * megabytes)
    received = bytearray()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        want_write = [sock] if pending else []
        readable, writable, _ = select.select([sock], want_write, [], 0.5)
        if readable:
            try:
                got = sock.recv(65536)
            except OSError:
                break
            if not got:
                break
            received += got
        if writable and pending:
            try:
                sent = sock.send(pending[: 256 * 1024])
            except OSError:
                break
            pending = pending[sent:]
        if not pending and not readable:
            break
    return bytes(received)


def test_p_data_longer_than_announced_is_aborted(daemon_factory: Start) -> None:
    """(e) A P-DATA-TF declaring more than the announced maximum: A-ABORT at once, nothing buffered."""
    daemon, port = daemon_factory(", max_pdu_size: 65536")
    rss_before = _rss_mb(daemon)
    sock = connect(port)
    try:
        sock.sendall(associate_rq(calling="BIGPDU"))
        kind, _ = read_pdu(sock)
        assert kind == 0x02
        back = _flood(sock, b"\x04\x00\xff\xff\xff\xf0", 256)
        assert back[:2] == b"\x07\x00" and back[8:10] == b"\x02\x06"  # A-ABORT, provider, invalid parameter
    finally:
        sock.close()
    assert _rss_mb(daemon) - rss_before < 20
    errors = daemon.wait_logged("receive.protocol_error")
    assert "longer than the 65536 announced" in errors["reason"]
    assert legitimate(port, store=make_instance()) < 40


def test_huge_association_request_is_refused_unbuffered(daemon_factory: Start) -> None:
    """(f) An A-ASSOCIATE-RQ declaring 4 GB: A-ABORT and closed, its bytes never buffered."""
    daemon, port = daemon_factory()
    rss_before = _rss_mb(daemon)
    sock = connect(port)
    try:
        back = _flood(sock, b"\x01\x00\xff\xff\xff\xff", 256)
        assert back[:2] == b"\x07\x00" and back[8:10] == b"\x02\x06"
    finally:
        sock.close()
    assert _rss_mb(daemon) - rss_before < 20
    closed = daemon.wait_logged("receive.connection_closed")
    assert closed["reason"] == "request_length" and "4294967295 bytes" in closed["detail"]
    # a PDU that is not an A-ASSOCIATE-RQ first is aborted too (unexpected PDU)
    sock = connect(port)
    try:
        sock.sendall(b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x02\x01\x03")
        kind, body = read_pdu(sock)
        assert kind == 0x07 and body[2:4] == b"\x02\x02"
    finally:
        sock.close()
    assert legitimate(port) < 40


def test_connection_caps_refuse_and_log_once(daemon_factory: Start) -> None:
    """(g) max_connections and max_connections_per_peer close extra connections at once, logged once a minute."""
    daemon, port = daemon_factory(", max_associations: 2, max_connections: 6, max_connections_per_peer: 4")
    held = [connect(port) for _ in range(4)]
    try:
        for sock in held:
            sock.sendall(b"\x01")
        assert all([refused(port) for _ in range(5)])
        assert not any(closed_by_peer(sock, 0.2) for sock in held)
        records = wait_until(lambda: daemon.logged("receive.connection_refused"), 5, message="a refusal logged")
        assert len(records) == 1
        assert records[0]["reason"] == "max_connections_per_peer" and records[0]["peer"] == HOST
        assert records[0]["peer_connections"] == 4
    finally:
        for sock in held:
            sock.close()
    assert legitimate(port) < 40


def test_total_connection_cap(daemon_factory: Start) -> None:
    """max_connections counts every connection of the process, whatever its peer."""
    daemon, port = daemon_factory(", max_associations: 2, max_connections: 3, max_connections_per_peer: 10")
    held = [connect(port) for _ in range(3)]
    try:
        assert refused(port)
        record = wait_until(lambda: daemon.logged("receive.connection_refused"), 5, message="a refusal logged")[0]
        assert record["reason"] == "max_connections" and record["connections"] == 3
    finally:
        for sock in held:
            sock.close()
    # the held ones are gone (closed by the client): room again
    assert legitimate(port, within=10) < 10


def test_refusals_are_logged_once_a_minute_per_peer_and_reason() -> None:
    """The refusal log holds back repeats for a minute and then says how many there were."""
    now = [1000.0]
    refusals = RefusalLog(clock=lambda: now[0])
    assert refusals.due("receive.connection_refused", "10.0.0.1", "max_connections") == 1
    assert refusals.due("receive.connection_refused", "10.0.0.1", "max_connections") == 0
    assert refusals.due("receive.connection_refused", "10.0.0.2", "max_connections") == 1  # another peer
    assert refusals.due("receive.connection_refused", "10.0.0.1", "max_connections_per_peer") == 1  # reason
    now[0] += 59.0
    assert refusals.due("receive.connection_refused", "10.0.0.1", "max_connections") == 0
    now[0] += 1.0
    assert refusals.due("receive.connection_refused", "10.0.0.1", "max_connections") == 3  # and the 2 held back
