"""structlog configuration: one JSON line per event on stderr (console rendering on a terminal).

Events are nouns with fields. Library loggers (pynetdicom, watchdog) come out in the same format; pynetdicom
stays at WARNING because at DEBUG it logs whole DIMSE messages, query identifiers and all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from typing import Literal

import pydicom.config
import structlog

__all__ = ["configure_logging", "path_digest", "uid_digest"]


def _add_pid(_logger: object, _method: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    event["pid"] = os.getpid()  # receiver processes log to the same stream
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


def quiet_pydicom() -> None:
    """Stop pydicom's validation warnings: they quote header values, which may be PHI.

    ingestd validates the values it uses itself; the de-identifier fails closed on values it cannot handle.
    """
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
