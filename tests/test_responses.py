"""The hand-encoded C-STORE success response is byte for byte what pynetdicom would send."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from ingestd.receive.responses import encode_store_success

uids = (
    st.lists(st.integers(0, 10**12), min_size=2, max_size=8)
    .map(lambda parts: ".".join(map(str, parts)))
    .filter(lambda uid: len(uid) <= 64)
)


@given(message_id=st.integers(0, 0xFFFF), sop_class=uids, sop_instance=uids)
def test_matches_pynetdicom(message_id: int, sop_class: str, sop_instance: str) -> None:
    """For any message ID and UIDs (odd and even lengths), the bytes equal pynetdicom's encoding."""
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    pdata = list(message.encode_msg(1, 16384))
    theirs = b"".join(value[1:] for p in pdata for _context, value in p.presentation_data_value_list)
    assert encode_store_success(message_id, sop_class, sop_instance) == theirs
