"""An acceptor loop for pynetdicom associations that wakes when a message arrives instead of every 1 ms.

pynetdicom 3.0's `Association._run_reactor` sleeps a fixed 1 ms at the top of every turn, so every C-STORE
request waits up to 1 ms after it has been fully received before its handler runs, even while the
association carries nothing else. This loop does the same checks in the same order, but waits on the DIMSE
message queue's condition for at most that 1 ms, so a request that arrives during the wait is served at
once. Release, abort, a dead DUL thread and the network timeout are still checked at least every 1 ms.

It replaces the reactor of one association (`use_prompt_reactor`, called when the association is
established, before pynetdicom enters its loop) and only for the pynetdicom versions it was written against;
for any other version pynetdicom's own loop runs unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import pynetdicom
from pynetdicom import evt

__all__ = ["REACTOR_VERSIONS", "use_prompt_reactor"]

# The pynetdicom releases whose `Association._run_reactor` this loop mirrors line for line.
REACTOR_VERSIONS = frozenset({"3.0.0", "3.0.1", "3.0.2", "3.0.3", "3.0.4"})

_TURN = 0.001  # seconds: pynetdicom's fixed sleep, here the longest wait for a message

_LOGGER = logging.getLogger("pynetdicom.association")


def use_prompt_reactor(assoc: Any) -> bool:
    """Run this association's acceptor loop with `_run_prompt_reactor`; False if the version is unknown."""
    if pynetdicom.__version__ not in REACTOR_VERSIONS or not hasattr(assoc.dimse, "msg_queue"):
        return False
    assoc._run_reactor = lambda: _run_prompt_reactor(assoc)
    return True


def _wait_for_message(assoc: Any) -> None:
    queue = assoc.dimse.msg_queue
    with queue.not_empty:
        if not queue._qsize():
            queue.not_empty.wait(_TURN)


def _run_prompt_reactor(assoc: Any) -> None:
    """pynetdicom 3.0's `Association._run_reactor`, with `time.sleep(0.001)` replaced by `_wait_for_message`."""
    assoc._is_paused = False
    while not assoc._kill:
        _wait_for_message(assoc)

        # The association may pause the reactor while it sends DIMSE or ACSE messages itself.
        assoc._is_paused = True
        assoc._reactor_checkpoint.wait()
        assoc._is_paused = False

        context_id, msg = assoc.dimse.get_msg(block=False)
        if msg:
            assoc._serve_request(msg, context_id)

        if assoc.is_established and assoc.acse.is_release_requested():
            assoc.acse.send_release(is_response=True)
            _LOGGER.info("Association Released")
            assoc.is_released = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_RELEASED, {})
            assoc.kill()
            return

        if assoc.acse.is_aborted():
            log_msg = "Association Aborted"
            if assoc.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            _LOGGER.info(log_msg)
            assoc.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
            assoc.is_aborted = True
            assoc.is_established = False
            evt.trigger(assoc, evt.EVT_ABORTED, {})
            assoc.kill()
            return

        if not assoc.dul.is_alive():
            assoc.kill()
            return

        if assoc.dul.idle_timer_expired():
            _LOGGER.error("Network timeout reached")
            if assoc.network_timeout_response == "A-RELEASE":
                assoc._is_paused = True
                assoc._reactor_checkpoint.wait()
                assoc.release()
                assoc._is_paused = False
            else:
                assoc.abort()
            assoc.kill()
            return
