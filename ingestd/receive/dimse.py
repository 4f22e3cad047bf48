"""The DIMSE and upper-layer wire format the data phase speaks (PS3.7, PS3.8), as pure functions.

`parse_command` reads a command set, `encode_response` writes a response's, `p_data_tf` wraps a command set in
P-DATA-TF PDUs and `_abort_pdu`/`_RELEASE_RP` are the A-ABORT and A-RELEASE-RP PDUs. No sockets here: the data
phase that uses them is `ingestd.receive.dataphase`.
"""

from __future__ import annotations

from dataclasses import dataclass

# DIMSE command fields (PS3.7 §9.3, §E.1)
C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
RESPONSE_BIT = 0x8000
NO_DATA_SET = 0x0101

SUCCESS = 0x0000
UNRECOGNIZED_OPERATION = 0x0211

# A-ABORT sources and reasons (PS3.8 §9.3.8)
_SERVICE_USER = 0x00
_SERVICE_PROVIDER = 0x02
_UNRECOGNIZED_PDU = 0x01
_UNEXPECTED_PDU = 0x02
_INVALID_PARAMETER = 0x06

_RELEASE_RP = b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"


class ProtocolError(Exception):
    """The peer broke the upper layer protocol; the association is aborted with `reason` (PS3.8 Table 9-26)."""

    def __init__(self, message: str, reason: int = _INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Command:
    """The parts of a DIMSE command set the data phase acts on."""

    field: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    has_data_set: bool


def parse_command(raw: bytes | bytearray) -> Command:
    """Read a command set (group 0000, always Implicit VR Little Endian, PS3.7 §6.3.1)."""
    values: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    while offset < end:
        if end - offset < 8:
            raise ProtocolError("the command set ends inside an element header")
        group = int.from_bytes(raw[offset : offset + 2], "little")
        element = int.from_bytes(raw[offset + 2 : offset + 4], "little")
        length = int.from_bytes(raw[offset + 4 : offset + 8], "little")
        offset += 8
        if group != 0x0000 or length > end - offset:
            raise ProtocolError(f"the command set has a malformed element ({group:04X},{element:04X})")
        values[element] = bytes(raw[offset : offset + length])
        offset += length
    try:
        field = int.from_bytes(values[0x0100], "little")
        message_id = int.from_bytes(values.get(0x0110) or values[0x0120], "little")
    except KeyError:
        raise ProtocolError("the command set lacks its Command Field or Message ID") from None
    data_set_type = values.get(0x0800)
    return Command(
        field=field,
        message_id=message_id,
        sop_class_uid=_uid_value(values.get(0x0002) or values.get(0x0003) or b""),
        sop_instance_uid=_uid_value(values.get(0x1000) or values.get(0x1001) or b""),
        has_data_set=data_set_type is not None and int.from_bytes(data_set_type, "little") != NO_DATA_SET,
    )


def _uid_value(raw: bytes) -> str:
    # Latin-1 maps every byte to one character and back, so whatever the peer sent is echoed exactly.
    return raw.rstrip(b"\x00 ").decode("latin-1")


def _element(element: int, value: bytes) -> bytes:
    return b"\x00\x00" + element.to_bytes(2, "little") + len(value).to_bytes(4, "little") + value


def _uid_bytes(value: str) -> bytes:
    raw = value.encode("latin-1")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_response(field: int, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes:
    """The command set of a response without a data set, Implicit VR Little Endian, elements in tag order."""
    elements = []
    if sop_class_uid:
        elements.append(_element(0x0002, _uid_bytes(sop_class_uid)))
    elements.append(_element(0x0100, field.to_bytes(2, "little")))
    elements.append(_element(0x0120, message_id.to_bytes(2, "little")))
    elements.append(_element(0x0800, NO_DATA_SET.to_bytes(2, "little")))
    elements.append(_element(0x0900, status.to_bytes(2, "little")))
    if sop_instance_uid:
        elements.append(_element(0x1000, _uid_bytes(sop_instance_uid)))
    body = b"".join(elements)
    return _element(0x0000, len(body).to_bytes(4, "little")) + body


def p_data_tf(context_id: int, command: bytes, max_pdu_length: int = 0) -> bytes:
    """P-DATA-TF PDUs carrying a command set: one PDU, unless the peer's maximum PDU length calls for more."""
    fragment = len(command) if not max_pdu_length else max(1, max_pdu_length - 6)
    pdus = []
    for start in range(0, len(command), fragment):
        piece = command[start : start + fragment]
        control = 0x03 if start + fragment >= len(command) else 0x01
        item = (len(piece) + 2).to_bytes(4, "big") + bytes((context_id, control)) + piece
        pdus.append(b"\x04\x00" + len(item).to_bytes(4, "big") + item)
    return b"".join(pdus)


def _abort_pdu(source: int, reason: int) -> bytes:
    return b"\x07\x00\x00\x00\x00\x04\x00\x00" + bytes((source, reason))
