"""The self-pipe that signal handlers use to wake the daemon's and the receivers' main loops."""

from __future__ import annotations

import os
import signal
import threading

from ingestd.wakeup import Wakeup


def _signal_self(times: int) -> None:
    for _ in range(times):
        os.kill(os.getpid(), signal.SIGUSR1)


def test_wait_times_out_without_a_call() -> None:
    wakeup = Wakeup()
    try:
        assert not wakeup.wait(timeout=0.05)
    finally:
        wakeup.close()


def test_a_call_before_the_wait_is_kept_and_taken_once() -> None:
    wakeup = Wakeup()
    try:
        for _ in range(3):
            wakeup.notify()
        assert wakeup.wait(timeout=1)
        assert not wakeup.wait(timeout=0.05)
    finally:
        wakeup.close()


def test_bursts_of_signals_always_wake_the_waiter() -> None:
    """Signals arriving in quick succession (as PR_SET_PDEATHSIG sends them) never leave the waiter stuck."""
    wakeup = Wakeup()
    previous = signal.signal(signal.SIGUSR1, lambda *_: wakeup.notify())
    try:
        for _ in range(300):
            burst = threading.Thread(target=_signal_self, args=(4,))
            burst.start()
            assert wakeup.wait(timeout=10)
            burst.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        wakeup.close()


def test_a_full_pipe_still_means_a_pending_call() -> None:
    wakeup = Wakeup()
    try:
        for _ in range(200_000):  # more than a pipe holds: notify must not block or raise
            wakeup.notify()
        assert wakeup.wait(timeout=1)
    finally:
        wakeup.close()
