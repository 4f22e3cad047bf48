"""Packaging: one zip per routed batch, written instance by instance so that memory stays flat.

Entry names come from the outgoing (new) UIDs only: `<SeriesInstanceUID>/<SOPInstanceUID>.dcm`. Each file is
copied into the archive in 1 MiB chunks (zip64 always on, so a 5 GB study is as ordinary as a small one);
the zip is written to a temporary name, fsync'd and renamed, so a crash never leaves a half zip under the
final name. The result records size, entry count and SHA-256 for the delivery step and the journal.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ingestd.journal import Outgoing
from ingestd.spool import fsync_dir

__all__ = ["Compression", "Package", "write_package"]

Compression = Literal["stored", "deflated"]
_CHUNK = 1 << 20
_METHODS = {"stored": zipfile.ZIP_STORED, "deflated": zipfile.ZIP_DEFLATED}


@dataclass(frozen=True, slots=True)
class Package:
    path: Path
    size: int
    entries: int
    sha256: str


def entry_name(item: Outgoing) -> str:
    """The zip entry of an outgoing instance: its (new) series and SOP Instance UIDs."""
    return f"{item.series_uid}/{item.sop_uid}.dcm"


def write_package(
    outgoing: Sequence[Outgoing],
    state_dir: Path,
    target: Path,
    compression: Compression = "stored",
    progress: Callable[[], None] | None = None,
) -> Package:
    """Write the batch's outgoing instances (paths relative to `state_dir`) into the zip at `target`.

    `progress`, if given, is called before each entry (the deliverer's sign of life while a big study is zipped).
    """
    temp = target.with_name(f".tmp-{target.name}")
    temp.unlink(missing_ok=True)
    method = _METHODS[compression]
    try:
        with zipfile.ZipFile(temp, "w", compression=method, allowZip64=True, compresslevel=1 if method else None) as zf:
            for item in outgoing:
                if progress is not None:
                    progress()
                info = zipfile.ZipInfo(entry_name(item), date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = method
                if method == zipfile.ZIP_DEFLATED:
                    # ZipFile.open(ZipInfo) ignores the archive's compresslevel before Python 3.13 (level 6 then,
                    # 4x slower than level 1 for 7 % more bytes: bench/README.md).
                    info._compresslevel = 1  # type: ignore[attr-defined]
                info.external_attr = 0o640 << 16
                with (state_dir / item.path).open("rb") as source, zf.open(info, "w", force_zip64=True) as sink:
                    while chunk := source.read(_CHUNK):
                        sink.write(chunk)
        digest = hashlib.sha256()
        with temp.open("rb") as written:
            while chunk := written.read(_CHUNK):
                digest.update(chunk)
            os.fsync(written.fileno())
        os.replace(temp, target)
        fsync_dir(target.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return Package(path=target, size=target.stat().st_size, entries=len(outgoing), sha256=digest.hexdigest())
