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
import logging
import os
import re
import sys
from typing import Any, Literal

import pydicom.config
import structlog

__all__ = ["configure_logging", "hide_member_names", "path_digest", "redact", "redact_value", "uid_digest"]

REDACTED = "[redacted]"
# A UID of four components or more, or a 2.25 UUID-derived one; standalone (not part of a longer dotted word).
_UID = re.compile(r"(?<![\w.])(?:[0-2](?:\.(?:0|[1-9][0-9]*)){3,}|2\.25\.[0-9]{6,})(?![\w.])")
_STANDARD_UID_ROOT = "1.2.840.10008."  # SOP classes, transfer syntaxes: the standard's own, no PHI
# A DICOM person name has components separated by carets: DOE^JOHN, ^JOHN^^DR. It starts where a run of name
# characters starts (the lookbehind): a match can start nowhere else anyway, and without it a long run followed by
# a space and a caret took time quadratic in its length (50,000 characters: 11 s holding the GIL).
_PERSON_NAME = re.compile(r"(?<![^\s\^=\\\"',;:()\[\]{}<>|])[^\s\^=\\\"',;:()\[\]{}<>|]*\^[^\s\"',;:()\[\]{}<>|]*")
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
    return uid if uid.startswith(_STANDARD_UID_ROOT) else uid_digest(uid)


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


def _redact_item(key: Any, value: Any) -> Any:
    if isinstance(key, str) and key.replace("_", "").lower() in _phi_keys() and value is not None:
        return REDACTED
    return redact_value(value)


def redact(_logger: object, _method: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    """structlog processor: the safety net that keeps PHI out of every log line (see the module's docstring)."""
    for key, value in event.items():
        if key not in {"timestamp", "level", "logger", "pid"}:
            event[key] = _redact_item(key, value)
    return event


def configure_logging(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto") -> None:
    """Configure structlog and the standard library's logging once, for the whole process."""
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
    quiet_pydicom()


def uid_digest(uid: str) -> str:
    """How logs and `ingestd status` name an original UID: a digest, so that no original value is shown."""
    return "sha256:" + hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:16]


def path_digest(path: str) -> str:
    """How logs name a dropped file: its path may hold a patient's name (`DOE^JOHN/IM0001`), so a digest.

    The quarantine sidecar and `ingestd status --show-paths` show the path itself to whoever may read the
    state directory; the digest lets a log line be matched to them.
    """
    return "sha256:" + hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


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
