"""structlog configuration: one JSON line per event on stderr (console rendering on a terminal).

Events are named `<step>.<noun>` (`receive.instance_stored`, `deliver.archived`) with the fixed keys listed in
docs/logging.md; a test holds the code to that catalogue. Library loggers (pynetdicom, watchdog, urllib3) and
Python warnings come out through the same pipeline; pynetdicom stays at WARNING because at DEBUG it logs whole
DIMSE messages, identifiers and all.

The code never logs a header value, an original UID or a dropped file's path (they are named by digests). The
redaction processor is the safety net behind that rule, for library messages and exception texts: a key named
like a PHI attribute loses its value, DICOM UIDs (other than the standard's own) become digests, and
person-name-like values (`DOE^JOHN`) are blanked.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import sys
import threading
from collections.abc import Iterable
from typing import Any, Literal

import pydicom.config
import structlog

from ingestd.eventbuffer import EventBuffer

__all__ = [
    "configure_logging",
    "event_buffer",
    "hide_labels",
    "hide_member_names",
    "path_digest",
    "redact",
    "redact_value",
    "uid_digest",
    "use_digest_key",
]

REDACTED = "[redacted]"
# A UID of four components or more, or a 2.25 UUID-derived one; standalone (not part of a longer dotted word).
_UID = re.compile(r"(?<![\w.])(?:[0-2](?:\.(?:0|[1-9][0-9]*)){3,}|2\.25\.[0-9]{6,})(?![\w.])")
_STANDARD_UID_ROOT = "1.2.840.10008."  # SOP classes, transfer syntaxes: the standard's own, no PHI
# A DICOM person name has components separated by carets: DOE^JOHN, ^JOHN^^DR. It starts where a run of name
# characters starts (the lookbehind): a match can start nowhere else anyway, and without it a long run followed by
# a space and a caret took time quadratic in its length (50,000 characters: 11 s holding the GIL).
_PERSON_NAME = re.compile(r"(?<![^\s\^=\\\"',;:()\[\]{}<>|])[^\s\^=\\\"',;:()\[\]{}<>|]*\^[^\s\"',;:()\[\]{}<>|]*")
_SOP_CLASS_KEYS = frozenset({"sop_class_uid"})
# Network addresses (`host=0.0.0.0`, `peer=2.1.0.7`) are shown as they are: an IPv4 address can look like a UID.
_ADDRESS_KEYS = frozenset({"host", "peer", "address", "bind"})
_HOST_NAME = re.compile(r"(?=[^.]*[A-Za-z])[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,20}")
_BARE_UID = re.compile(r"[0-9.]{1,64}")
_EXTRA_PHI_KEYS = frozenset(
    {"patient", "patientname", "patientid", "birthdate", "accession", "dataset", "header", "headers", "value"}
)


def _add_pid(_logger: object, _method: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    event["pid"] = os.getpid()  # receiver processes log to the same stream
    return event


@functools.cache
def _phi_keys() -> frozenset[str]:
    """Normalised names (lower case, no `_`) of the attributes PS3.15 Table E.1-1 lists, and a few more."""
    from pydicom.datadict import keyword_for_tag  # noqa: PLC0415 - only when logging is configured

    from ingestd.deid.table import load_table  # noqa: PLC0415 - the table is large; load it once, late

    keywords = {keyword_for_tag(tag) for tag in load_table().tags()}
    return frozenset(k.lower() for k in keywords if k) | _EXTRA_PHI_KEYS


def _uid_to_digest(match: re.Match[str]) -> str:
    uid = match.group(0)
    if uid.startswith(_STANDARD_UID_ROOT) or _is_ipv4_with_port(match):
        return uid
    return uid_digest(uid)


def _is_ipv4_with_port(match: re.Match[str]) -> bool:
    """`0.0.0.0:104` in a message (`cannot listen on 0.0.0.0:104`): an address and its port, not a UID."""
    rest = match.string[match.end() : match.end() + 2]
    if len(rest) < 2 or rest[0] != ":" or not rest[1].isdigit():
        return False
    try:
        return isinstance(ipaddress.ip_address(match.group(0)), ipaddress.IPv4Address)
    except ValueError:
        return False


def redact_value(value: Any) -> Any:
    """`value` with UIDs digested and person names blanked, through lists, tuples and dicts."""
    if isinstance(value, str):
        if "." in value:
            value = _UID.sub(_uid_to_digest, value)
        if "^" in value:
            value = _PERSON_NAME.sub(REDACTED, value)
        return value
    if isinstance(value, dict):
        return {key: _redact_item(key, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(item) for item in value]
    return value


def _is_address(value: str) -> bool:
    """An IP address (`0.0.0.0`, `::1`) or a host name (`pacs.example.org`); not a UID that merely looks like one."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return _HOST_NAME.fullmatch(value) is not None and len(value) <= 253
    return True


def _redact_item(key: Any, value: Any) -> Any:
    if key in _SOP_CLASS_KEYS and isinstance(value, str) and _BARE_UID.fullmatch(value):
        return value  # a SOP class, private ones included, is not PHI: it names what a lab must configure
    if key in _ADDRESS_KEYS and isinstance(value, str) and _is_address(value):
        return value  # where ingestd listens or a peer connects from: configuration and network, not a study
    if isinstance(key, str) and key.replace("_", "").lower() in _phi_keys() and value is not None:
        return REDACTED
    return redact_value(value)


def redact(_logger: object, _method: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    """structlog processor: the safety net that keeps PHI out of every log line (see the module's docstring)."""
    for key, value in event.items():
        if key not in {"timestamp", "level", "logger", "pid"}:
            event[key] = _redact_item(key, value)
    return event


_events: EventBuffer | None = None  # the recent events per batch, once logging is configured


def event_buffer() -> EventBuffer | None:
    """The recent log events of each batch this process logged (the web page's study page shows them); None until
    `configure_logging` (a command that does not log, a test that does not configure logging)."""
    return _events


def configure_logging(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto") -> None:
    """Configure structlog and the standard library's logging once, for the whole process; the events that name a
    batch are kept, redacted as logged, in `event_buffer()` (bounded: `ingestd.eventbuffer`)."""
    global _events  # noqa: PLW0603 - one buffer per process, behind its one log handler
    if _events is None:
        _events = EventBuffer()
    numeric = logging.getLevelNamesMapping()[level.upper()]
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _add_pid,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            _events.capture,  # after the redaction: the page shows what the log line says, nothing more
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    logging.getLogger("pynetdicom").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("watchdog").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("urllib3").setLevel(max(numeric, logging.INFO))
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_failure
    quiet_pydicom()


def _log_thread_failure(args: threading.ExceptHookArgs) -> None:
    """A thread's uncaught exception (a library's thread, watchdog's say) as a log line, not raw text on stderr."""
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    log = structlog.get_logger("ingestd.daemon")
    try:
        raise args.exc_value  # log.exception takes the exception being handled, with its traceback
    except BaseException:
        log.exception("daemon.thread_failed", thread=args.thread.name if args.thread is not None else None)


def uid_digest(uid: str) -> str:
    """How logs and `ingestd status` name an original UID: a digest, so that no original value is shown."""
    return "sha256:" + hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:16]


_digest_key = secrets.token_bytes(32)  # until `use_digest_key`: digests that match nothing outside this process


def use_digest_key(key: bytes) -> None:
    """Key `path_digest` (and the member names `hide_member_names` digests) with the installation's key.

    The daemon, `ingestd import` and `ingestd status` load it from the state directory (`ingestd.digestkey`).
    """
    global _digest_key  # noqa: PLW0603 - one key per process, set once the state directory is known
    _digest_key = key


def path_digest(path: str) -> str:
    """How logs name a dropped file: its path may hold a patient's name (`DOE^JOHN/IM0001`), so a digest.

    An HMAC-SHA-256 under the installation's secret (`digest.key` in the state directory), not a bare hash: a
    bare hash of `DOE^JOHN_MRN123` is recovered by hashing guesses. The quarantine sidecar and `ingestd status
    --show-paths` show the path itself to whoever may read the state directory; the digest lets a log line be
    matched to them (`ingestd status` uses the same key).
    """
    digest = hmac.new(_digest_key, path.encode("utf-8", "surrogateescape"), hashlib.sha256)
    return "sha256:" + digest.hexdigest()[:16]


def hide_labels(text: str, labels: Iterable[str]) -> str:
    """`text` (a URI, a reason) with each of `labels` (XNAT labels: letters, digits, `_`, `-`) as its digest.

    For the labels a rule without `anonymize` builds from raw identifying values (`{PatientID}`): XNAT gets them
    as they are, the logs a keyed digest of each.
    """
    for label in sorted({label for label in labels if label}, key=len, reverse=True):
        pattern = rf"(?<![A-Za-z0-9_-]){re.escape(label)}(?![A-Za-z0-9_-])"
        text = re.sub(pattern, path_digest(label), text)
    return text


_QUOTED_MEMBER = re.compile(r"member ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")")


def hide_member_names(reason: str) -> str:
    """A reason without the archive member names it may quote (`member 'DOE^JOHN/1.dcm'`): their digests."""
    return _QUOTED_MEMBER.sub(lambda match: f"member {path_digest(match.group(1)[1:-1])}", reason)


def quiet_pydicom() -> None:
    """Stop pydicom's validation warnings: they quote header values, which may be PHI.

    ingestd validates the values it uses itself; the de-identifier fails closed on values it cannot handle.
    """
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
