"""A read-only, seekable stream of known size that pydicom's writer copies a value from in chunks.

The streamed path's window on the spooled file (`ingestd.deid.stream`) and the cleaned frames
(`ingestd.deid.pixels`) are both written this way, so neither value is copied whole into memory a second time.
Subclasses give `read`; the rest is here.
"""

from __future__ import annotations

import io
import os

__all__ = ["SeekableReader"]


class SeekableReader(io.BufferedIOBase):
    """`size` bytes, read from `_pos` on by the subclass's `read`."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)
