"""The errors ingestd raises. Each message is written for the lab admin who reads it."""

from __future__ import annotations


class IngestdError(Exception):
    """Base of every error ingestd raises on purpose."""


class ConfigError(IngestdError):
    """The configuration file is missing, unreadable or invalid."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(problems))


class SpoolError(IngestdError):
    """An instance could not be stored durably; the sender must be told it failed."""


class SpoolFullError(SpoolError):
    """The spool's file system has less free space than the configured floor."""


class InvalidInstanceError(IngestdError):
    """The data is not a DICOM instance ingestd can file (unparsable, or UIDs missing or malformed)."""


class IncompleteDataSetError(InvalidInstanceError):
    """A data set is cut short or does not parse to its end (an element runs past it, a sequence has no end)."""


class UnsafeArchiveError(IngestdError):
    """An archive in a drop folder is hostile or absurd (escaping paths, bomb ratios, too many members)."""


class ListenerError(IngestdError):
    """The DICOM listener cannot start (port taken, TLS files unreadable)."""
