"""The error every part of ingestd.deid raises when an instance must be held: `DeidError(HoldCode, reason)`.

Its own module so that the engine (`ingestd.deid.engine`, which re-exports it) and the pixel cleaning it calls
(`ingestd.deid.pixels`) both raise it without importing each other.
"""

from __future__ import annotations

from ingestd.errors import IngestdError
from ingestd.states import HoldCode

__all__ = ["DeidError"]


class DeidError(IngestdError):
    """A data set cannot be de-identified safely; the study is held with `code` and `reason`."""

    def __init__(self, code: HoldCode, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(reason)
