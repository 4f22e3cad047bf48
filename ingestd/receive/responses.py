"""A fast path for the one DIMSE message ingestd sends most: the C-STORE success response.

pynetdicom builds every response as a pydicom Dataset, encodes it twice (once to measure the group length)
and spends about a third of a receiver's Python time per instance doing so. A successful C-STORE-RSP is a
fixed, small command set (PS3.7 Table 9.3-2, Implicit VR Little Endian), so it is encoded here directly
and handed to the association's DUL as one P-DATA. Anything else (a failure status, an error comment, any
other message) goes through pynetdicom unchanged. `tests/test_responses.py` checks the bytes against
pynetdicom's own encoding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

__all__ = ["encode_store_success", "use_fast_store_responses"]

_COMMAND_FIELD = b"\x00\x00\x00\x01\x02\x00\x00\x00\x01\x80"  # (0000,0100) US 0x8001 C-STORE-RSP
_NO_DATA_SET = b"\x00\x00\x00\x08\x02\x00\x00\x00\x01\x01"  # (0000,0800) US 0x0101
_SUCCESS = b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00"  # (0000,0900) US 0x0000


def _uid(element: bytes, value: str) -> bytes:
    raw = value.encode("ascii")
    if len(raw) % 2:
        raw += b"\x00"
    return b"\x00\x00" + element + len(raw).to_bytes(4, "little") + raw


def encode_store_success(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The command set of a C-STORE-RSP with status Success, Implicit VR Little Endian."""
    body = b"".join(
        (
            _uid(b"\x02\x00", sop_class_uid),
            _COMMAND_FIELD,
            b"\x00\x00\x20\x01\x02\x00\x00\x00" + message_id.to_bytes(2, "little"),
            _NO_DATA_SET,
            _SUCCESS,
            _uid(b"\x00\x10", sop_instance_uid),
        )
    )
    return b"\x00\x00\x00\x00\x04\x00\x00\x00" + len(body).to_bytes(4, "little") + body


def _is_plain_success(primitive: Any) -> bool:
    return (
        type(primitive) is C_STORE
        and primitive.MessageIDBeingRespondedTo is not None
        and primitive.Status == 0x0000
        and primitive.AffectedSOPClassUID is not None
        and primitive.AffectedSOPInstanceUID is not None
        and primitive.ErrorComment is None
        and primitive.OffendingElement is None
    )


def use_fast_store_responses(assoc: Any) -> None:
    """Send this association's C-STORE success responses through `encode_store_success`."""
    dimse = assoc.dimse
    original: Callable[[Any, int], None] = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if not _is_plain_success(primitive):
            original(primitive, context_id)
            return
        pdata = P_DATA()
        command = encode_store_success(
            primitive.MessageIDBeingRespondedTo,
            str(primitive.AffectedSOPClassUID),
            str(primitive.AffectedSOPInstanceUID),
        )
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        dimse.dul.send_pdu(pdata)

    dimse.send_msg = send_msg
