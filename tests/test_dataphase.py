"""The data phase ingestd serves itself (ingestd/receive/dataphase.py).

Encodings are checked against pynetdicom's own. The protocol is checked with a raw DICOM peer written here
from PS3.8 (no pynetdicom on the sending side), so that fragmenting, odd PDUs and broken peers reach the
listener exactly as a scanner could send them.
"""

from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import MRImageStorage
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ, C_ECHO_RSP, C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from ingestd.receive import dataphase
from tests.conftest import Receiver, make_config, start_receiver
from tests.dicom import VERIFICATION, encode_raw, make_instance, make_study
from tests.hostile import RawPeer, associate_rq_contexts, dimse_command, p_data, pdv, store_command
from tests.procs import journal_rows, wait_until

EXPLICIT_LE = "1.2.840.10008.1.2.1"

uids = (
    st.lists(st.integers(0, 10**12), min_size=2, max_size=8)
    .map(lambda parts: ".".join(map(str, parts)))
    .filter(lambda uid: len(uid) <= 64)
)


def _pynetdicom_command(message: DIMSEMessage) -> bytes:
    """The command set bytes pynetdicom sends for a message (all fragments joined)."""
    pdata = list(message.encode_msg(1, 16384))
    return b"".join(value[1:] for p in pdata for _context, value in p.presentation_data_value_list if value[0] & 1)


class TestEncodings:
    @given(message_id=st.integers(0, 0xFFFF), sop_class=uids, sop_instance=uids, status=st.integers(0, 0xFFFF))
    def test_store_response_matches_pynetdicom(
        self, message_id: int, sop_class: str, sop_instance: str, status: int
    ) -> None:
        primitive = C_STORE()
        primitive.MessageIDBeingRespondedTo = message_id
        primitive.AffectedSOPClassUID = sop_class
        primitive.AffectedSOPInstanceUID = sop_instance
        primitive.Status = status
        message = C_STORE_RSP()
        message.primitive_to_message(primitive)
        ours = dataphase.encode_response(0x8001, message_id, sop_class, sop_instance, status)
        assert ours == _pynetdicom_command(message)

    @given(message_id=st.integers(0, 0xFFFF))
    def test_echo_response_matches_pynetdicom(self, message_id: int) -> None:
        primitive = C_ECHO()
        primitive.MessageIDBeingRespondedTo = message_id
        primitive.AffectedSOPClassUID = VERIFICATION
        primitive.Status = 0x0000
        message = C_ECHO_RSP()
        message.primitive_to_message(primitive)
        ours = dataphase.encode_response(0x8030, message_id, VERIFICATION, "", 0x0000)
        assert ours == _pynetdicom_command(message)

    @given(
        message_id=st.integers(0, 0xFFFF),
        sop_class=uids,
        sop_instance=uids,
        priority=st.sampled_from([0, 1, 2]),
        originator=st.one_of(st.none(), st.tuples(st.sampled_from(["MOVESCU", "A B"]), st.integers(0, 0xFFFF))),
    )
    def test_store_request_is_read_as_pynetdicom_wrote_it(
        self, message_id: int, sop_class: str, sop_instance: str, priority: int, originator: tuple[str, int] | None
    ) -> None:
        primitive = C_STORE()
        primitive.MessageID = message_id
        primitive.AffectedSOPClassUID = sop_class
        primitive.AffectedSOPInstanceUID = sop_instance
        primitive.Priority = priority
        if originator is not None:
            primitive.MoveOriginatorApplicationEntityTitle = originator[0]
            primitive.MoveOriginatorMessageID = originator[1]
        primitive.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
        message = C_STORE_RQ()
        message.primitive_to_message(primitive)
        command = dataphase.parse_command(_pynetdicom_command(message))
        assert command == dataphase.Command(0x0001, message_id, sop_class, sop_instance, has_data_set=True)

    def test_echo_request_has_no_data_set(self) -> None:
        primitive = C_ECHO()
        primitive.MessageID = 7
        primitive.AffectedSOPClassUID = VERIFICATION
        message = C_ECHO_RQ()
        message.primitive_to_message(primitive)
        command = dataphase.parse_command(_pynetdicom_command(message))
        assert command == dataphase.Command(0x0030, 7, VERIFICATION, "", has_data_set=False)

    @given(command=st.binary(min_size=1, max_size=600), max_length=st.sampled_from([0, 7, 8, 50, 4096]))
    def test_responses_fit_the_peers_maximum_pdu_length(self, command: bytes, max_length: int) -> None:
        """Split into PDUs whose variable field is at most the peer's Maximum Length Received (0: no limit)."""
        stream, offset, pieces, controls = dataphase.p_data_tf(5, command, max_length), 0, [], []
        while offset < len(stream):
            assert stream[offset] == 0x04
            length = int.from_bytes(stream[offset + 2 : offset + 6], "big")
            assert max_length == 0 or length <= max_length
            item = stream[offset + 6 : offset + 6 + length]
            assert int.from_bytes(item[:4], "big") == length - 4 and item[4] == 5
            controls.append(item[5])
            pieces.append(item[6:])
            offset += 6 + length
        assert b"".join(pieces) == command
        assert controls == [0x01] * (len(controls) - 1) + [0x03]

    @pytest.mark.parametrize(
        "raw",
        [
            b"\x00\x00\x00\x01\x02\x00",  # ends inside an element header
            b"\x08\x00\x00\x01\x02\x00\x00\x00\x01\x00",  # not group 0000
            b"\x00\x00\x00\x01\x08\x00\x00\x00\x01\x00",  # value longer than what is left
            b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x01",  # no Command Field, no Message ID
        ],
    )
    def test_malformed_command_sets_are_protocol_errors(self, raw: bytes) -> None:
        with pytest.raises(dataphase.ProtocolError):
            dataphase.parse_command(raw)


# -- a raw DICOM peer ---------------------------------------------------------------------------------


def _spooled(receiver: Receiver) -> list[str]:
    return [row[0] for row in journal_rows(receiver.config.journal_path, "SELECT sop_uid FROM instances")]


class TestRawPeer:
    def test_fragmented_store_is_assembled_byte_identical(self, receiver: Receiver) -> None:
        """Command in two fragments, data set in three, spread over PDUs holding several items each."""
        ds = make_instance()
        data = encode_raw(ds)
        command = store_command(5, ds.SOPClassUID, ds.SOPInstanceUID)
        peer = RawPeer(receiver.port)
        third = len(data) // 3
        peer.send(p_data(pdv(1, 0x01, command[:20]), pdv(1, 0x03, command[20:]), pdv(1, 0x00, data[:third])))
        peer.send(p_data(pdv(1, 0x00, data[third : 2 * third])))
        peer.send(p_data(pdv(1, 0x02, data[2 * third :])))
        assert peer.status_of_response() == (0x8001, 0x0000)
        peer.release()
        stored = pydicom.dcmread(next(receiver.config.spool_dir.rglob("*.dcm")))
        assert stored.SOPInstanceUID == ds.SOPInstanceUID
        file_bytes = next(receiver.config.spool_dir.rglob("*.dcm")).read_bytes()
        assert file_bytes.endswith(data)
        wait_until(lambda: receiver.listener.association_count() == 0, timeout=10)

    def test_instances_larger_than_the_buffer_arrive_whole(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Large, small, large, with a tiny buffer that grows in steps and spills to a part file: all arrive whole."""
        monkeypatch.setattr(dataphase, "_BUFFER_START", 1024)
        monkeypatch.setattr(dataphase, "_GROWTH_STEP", 4096)
        monkeypatch.setattr(dataphase, "_SPILL", 16384)
        running = start_receiver(make_config(tmp_path))
        try:
            study = [make_instance(rows=rows, fill=rows) for rows in (200, 8, 150)]
            peer = RawPeer(running.port)
            for number, ds in enumerate(study, start=1):
                data = encode_raw(ds)
                command = store_command(number, ds.SOPClassUID, ds.SOPInstanceUID)
                fragments = [data[i : i + 30000] for i in range(0, len(data), 30000)]
                items = [pdv(1, 0x03, command)]
                items += [pdv(1, 0x02 if i == len(fragments) - 1 else 0x00, f) for i, f in enumerate(fragments)]
                peer.send(p_data(*items))
                assert peer.status_of_response() == (0x8001, 0x0000)
            peer.release()
            for ds in study:
                (path,) = running.config.spool_dir.rglob(f"*{ds.SOPInstanceUID}*")
                assert path.read_bytes().endswith(encode_raw(ds))
            assert not list((running.config.spool_dir / ".tmp").iterdir())
        finally:
            running.listener.stop(grace_seconds=2)
            running.journal.close()

    def test_unsupported_operation_is_answered_and_the_association_goes_on(self, receiver: Receiver) -> None:
        """A C-FIND on a storage context gets 0x0211 (unrecognized operation), then storing still works."""
        ds = make_instance()
        find = dimse_command(0x0020, 9, ds.SOPClassUID)  # C-FIND-RQ
        peer = RawPeer(receiver.port)
        peer.send(p_data(pdv(1, 0x03, find), pdv(1, 0x02, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ")))
        assert peer.status_of_response() == (0x8020, 0x0211)
        peer.send(
            p_data(pdv(1, 0x03, store_command(10, ds.SOPClassUID, ds.SOPInstanceUID)), pdv(1, 0x02, encode_raw(ds)))
        )
        assert peer.status_of_response() == (0x8001, 0x0000)
        peer.release()
        assert _spooled(receiver) == [ds.SOPInstanceUID]

    def test_echo_on_the_verification_context(self, receiver: Receiver) -> None:
        peer = RawPeer(receiver.port)
        assert peer.accepted == {1, 3}
        peer.send(p_data(pdv(3, 0x03, dimse_command(0x0030, 3, VERIFICATION, data_set=False))))
        assert peer.status_of_response() == (0x8030, 0x0000)
        peer.release()

    @pytest.mark.parametrize(
        ("what", "pdu", "reason"),
        [
            ("an unaccepted context", p_data(pdv(7, 0x03, b"\x00" * 12)), 0x06),
            ("data before its command", p_data(pdv(1, 0x02, b"\x08\x00\x52\x00\x00\x00\x00\x00")), 0x06),
            ("an item longer than its PDU", b"\x04\x00\x00\x00\x00\x08\x00\x00\x01\x00\x01\x03\x00\x00", 0x06),
            ("an unrecognized PDU type", b"\x09\x00\x00\x00\x00\x02\x00\x00", 0x01),
            ("a second A-ASSOCIATE-RQ", associate_rq_contexts("RAWSCU", "INGESTD", {1: MRImageStorage}), 0x02),
        ],
    )
    def test_protocol_errors_abort_the_association(
        self, receiver: Receiver, what: str, pdu: bytes, reason: int
    ) -> None:
        with RawPeer(receiver.port) as peer:
            peer.send(pdu)
            pdu_type, body = peer.read_pdu()
            assert (pdu_type, body[2], body[3]) == (0x07, 0x02, reason), what
            assert peer.closed_by_listener()
        wait_until(lambda: receiver.listener.association_count() == 0, timeout=10)
        assert _spooled(receiver) == []

    def test_peer_vanishing_mid_instance_stores_nothing(self, receiver: Receiver) -> None:
        ds = make_instance()
        data = encode_raw(ds)
        peer = RawPeer(receiver.port)
        peer.send(p_data(pdv(1, 0x03, store_command(1, ds.SOPClassUID, ds.SOPInstanceUID)), pdv(1, 0x00, data[:100])))
        peer.sock.close()
        wait_until(lambda: receiver.listener.association_count() == 0, timeout=10)
        assert _spooled(receiver) == []
        assert not list((receiver.config.spool_dir / ".tmp").iterdir())

    def test_peer_gone_before_the_accept_is_sent_ends_the_association_at_once(self, receiver: Receiver) -> None:
        """A peer that asks and hangs up without waiting: no thread waits out the 60 s network timeout."""
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", receiver.port), timeout=10)
            sock.sendall(associate_rq_contexts("RAWSCU", "INGESTD", {1: MRImageStorage}))
            sock.close()
        wait_until(lambda: receiver.listener.association_count() == 0, timeout=10)

    def test_stopping_aborts_an_association_mid_instance(self, tmp_path: Path) -> None:
        running = start_receiver(make_config(tmp_path))
        ds = make_instance()
        peer = RawPeer(running.port)
        peer.send(p_data(pdv(1, 0x03, store_command(1, ds.SOPClassUID, ds.SOPInstanceUID)), pdv(1, 0x00, b"\x08\x00")))
        stopper = threading.Thread(target=running.listener.stop, kwargs={"grace_seconds": 0.5})
        stopper.start()
        try:
            pdu_type, body = peer.read_pdu()
            assert (pdu_type, body[2]) == (0x07, 0x00)  # A-ABORT from the service user (ingestd)
            assert peer.closed_by_listener()
        finally:
            peer.sock.close()
            stopper.join(timeout=20)
            running.journal.close()
        assert not stopper.is_alive()


@pytest.fixture(scope="module")
def shared_receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    running = start_receiver(make_config(tmp_path_factory.mktemp("fragments")))
    try:
        yield running
    finally:
        running.listener.stop(grace_seconds=2)
        running.journal.close()


def _fragment(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a] or [b""]


@settings(max_examples=40, deadline=None)
@given(
    command_cuts=st.lists(st.integers(0, 10**6), max_size=4),
    data_cuts=st.lists(st.integers(0, 10**6), max_size=12),
    per_pdu=st.integers(1, 6),
    rows=st.integers(2, 64),
)
def test_any_fragmenting_stores_the_instance_byte_identical(
    shared_receiver: Receiver, command_cuts: list[int], data_cuts: list[int], per_pdu: int, rows: int
) -> None:
    """However a peer cuts a C-STORE into fragments and PDUs, the instance is acknowledged and stored as sent."""
    ds = make_instance(rows=rows, fill=rows)
    data = encode_raw(ds)
    command = store_command(1, ds.SOPClassUID, ds.SOPInstanceUID)
    command_parts, data_parts = _fragment(command, command_cuts), _fragment(data, data_cuts)
    items = [pdv(1, 0x03 if i == len(command_parts) - 1 else 0x01, p) for i, p in enumerate(command_parts)]
    items += [pdv(1, 0x02 if i == len(data_parts) - 1 else 0x00, p) for i, p in enumerate(data_parts)]
    peer = RawPeer(shared_receiver.port)
    try:
        for start in range(0, len(items), per_pdu):
            peer.send(p_data(*items[start : start + per_pdu]))
        assert peer.status_of_response() == (0x8001, 0x0000)
        peer.release()
    finally:
        peer.sock.close()
    (path,) = shared_receiver.config.spool_dir.rglob(f"*/{ds.SOPInstanceUID}.dcm")
    assert path.read_bytes().endswith(data)


class TestPynetdicomServes:
    """With a pynetdicom release the data phase was not checked against, pynetdicom serves associations."""

    def test_store_echo_and_release(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(dataphase, "available", lambda: False)
        running = start_receiver(make_config(tmp_path))
        try:
            study = make_study(series=1, per_series=3)
            ae = AE(ae_title="SCANNER")
            ae.add_requested_context(MRImageStorage)
            ae.add_requested_context(VERIFICATION)
            assoc = ae.associate("127.0.0.1", running.port, ae_title="INGESTD")
            assert assoc.is_established
            assert [assoc.send_c_store(ds).Status for ds in study] == [0] * 3
            assert assoc.send_c_echo().Status == 0
            assoc.release()
            assert sorted(_spooled(running)) == sorted(ds.SOPInstanceUID for ds in study)
            wait_until(lambda: running.listener.association_count() == 0, timeout=10)
        finally:
            running.listener.stop(grace_seconds=2)
            running.journal.close()
