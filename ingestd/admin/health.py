"""`ingestd health`: is the daemon running and answering? Exit 0 or 1, for Docker's HEALTHCHECK and monitoring.

Without HTTP, and whatever the configuration file says now about the metrics endpoint or the listener (it may
have been edited since the daemon started): the daemon records where it serves in its journal as it starts
(`ingestd.metrics.DaemonRecord`), and health reads that record. Healthy when

1. a daemon holds the state directory's lock (`ingestd.lock`, taken for as long as it runs);
2. the journal reads, and holds the record of that daemon (same pid): it has started every service;
3. its main loop's heartbeat is newer than its start and than `STALE_SECONDS`: the loop writes it every few
   seconds, and only while every worker thread runs and none is wedged (a dead or wedged worker ends the daemon);
4. its DICOM listener, where the record says it listens, answers a C-ECHO from `INGESTD_HEALTH` (or, when
   `listener.allowed_calling_aets` lacks that title, from the first allowed one).
"""

from __future__ import annotations

import time

from ingestd.config import Config
from ingestd.journal import Journal
from ingestd.metrics import DAEMON_RECORD, DaemonRecord
from ingestd.statedir import lock_holder
from ingestd.states import StudyState

__all__ = ["HEALTH_AE_TITLE", "STALE_SECONDS", "check_health", "print_health", "started_problem"]

HEALTH_AE_TITLE = "INGESTD_HEALTH"
# The main loop beats every 5 s at most (less with a short stop_timeout_seconds); a reload may hold it up to a
# minute (daemon.RELOAD_SECONDS). Twice that without a beat: the loop hangs.
STALE_SECONDS = 120.0
_VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"


def started_problem(record: DaemonRecord | None, holder: int, heartbeat: float | None, now: float) -> str | None:
    """What is wrong with the daemon `holder` (the lock's pid; 0: unknown) by its record and heartbeat, at `now`."""
    if record is None or (holder and record.pid != holder):
        return f"the daemon (pid {holder or '?'}) is starting: not every service runs yet"
    if record.stopping_since is not None:
        return f"the daemon (pid {record.pid}) is stopping (for {max(0.0, now - record.stopping_since):.0f} s)"
    if heartbeat is None or heartbeat < record.started_at:
        return f"the daemon (pid {record.pid}) started its services, but its main loop has not beaten yet"
    if now - heartbeat > STALE_SECONDS:
        return (
            f"the daemon's main loop (pid {record.pid}) has not beaten for {now - heartbeat:.0f} s "
            f"(at most every few seconds while every worker runs): it hangs"
        )
    return None


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host  # noqa: S104 - wildcard


def _echo_problem(host: str, port: int, called: str, calling: str, timeout: float) -> str | None:
    from pynetdicom import AE  # noqa: PLC0415 - only when there is a listener to ask

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(_VERIFICATION_SOP_CLASS)
    assoc = ae.associate(_local(host), port, ae_title=called)
    answered = assoc.is_established and assoc.send_c_echo().Status == 0
    if assoc.is_established:
        assoc.release()
    return None if answered else f"no C-ECHO answer from {called}@{_local(host)}:{port} (as {calling})"


def check_health(config: Config, timeout: float, now: float) -> tuple[bool, str]:
    """(healthy, the line to print) for the daemon on `config.state_dir`."""
    try:
        holder = lock_holder(config.state_dir)
    except OSError as exc:
        return False, f"unhealthy: cannot open {config.state_dir / 'ingestd.lock'}: {exc.strerror}"
    if holder is None:
        return False, f"unhealthy: no daemon runs on {config.state_dir}"
    try:
        journal = Journal(config.journal_path, read_only=True)
        try:
            held = len(journal.batches((StudyState.HELD,)))
            text = journal.meta(DAEMON_RECORD)
            beat = journal.meta("heartbeat")
        finally:
            journal.close()
    except Exception as exc:  # noqa: BLE001 - any failure to read the journal is unhealthy
        return False, f"unhealthy: the journal cannot be read: {type(exc).__name__}"
    record = None if text is None else DaemonRecord.from_json(text)
    try:
        heartbeat = None if beat is None else float(beat)
    except ValueError:
        heartbeat = None
    problem = started_problem(record, holder, heartbeat, now)
    if problem is None and record is not None and record.listener is not None:
        host, port, called = record.listener
        allowed = config.listener.allowed_calling_aets
        calling = HEALTH_AE_TITLE if not allowed or HEALTH_AE_TITLE in allowed else allowed[0]
        problem = _echo_problem(host, port, called, calling, timeout)
    if problem is not None:
        return False, f"unhealthy: {problem}"
    assert record is not None  # noqa: S101 - no problem: the record was found
    answers = [] if record.listener is None else [f"C-ECHO answered on port {record.listener[1]}"]
    answers.append(f"metrics at {record.metrics}" if record.metrics else "metrics not served")
    return True, f"healthy: daemon running (pid {record.pid}), journal readable ({held} held), {', '.join(answers)}"


def print_health(config: Config, timeout: float) -> int:
    """`ingestd health`: print one line, healthy or unhealthy and why; exit status 0 or 1."""
    healthy, line = check_health(config, timeout, time.time())
    print(line)
    return 0 if healthy else 1
