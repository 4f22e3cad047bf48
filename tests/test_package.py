"""Packaging: one zip per batch, entry names from UIDs only, contents byte-identical, never a half zip."""

from __future__ import annotations

import random
import zipfile
import zlib
from pathlib import Path

import pytest

from ingestd.journal import Outgoing
from ingestd.pipeline.deliver import backoff_seconds
from ingestd.pipeline.package import Compression, write_package


def _outgoing(state: Path, count: int) -> list[Outgoing]:
    items = []
    for index in range(count):
        relative = f"outbox/7/2.25.1/2.25.{100 + index}.dcm"
        path = state / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([index % 256]) * (3 * 2**20 // 2 + index))  # 1.5 MiB: several copy chunks
        items.append(Outgoing(index, "2.25.1", f"2.25.{100 + index}", relative, path.stat().st_size))
    return items


@pytest.mark.parametrize("compression", ["stored", "deflated"])
def test_zip_holds_every_instance_under_its_uids(tmp_path: Path, compression: Compression) -> None:
    items = _outgoing(tmp_path, 3)
    package = write_package(items, tmp_path, tmp_path / "7.zip", compression)
    assert package.entries == 3 and package.size == (tmp_path / "7.zip").stat().st_size
    with zipfile.ZipFile(package.path) as zf:
        assert zf.namelist() == [f"2.25.1/{item.sop_uid}.dcm" for item in items]
        for item in items:
            assert zf.read(f"2.25.1/{item.sop_uid}.dcm") == (tmp_path / item.path).read_bytes()
        method = zipfile.ZIP_STORED if compression == "stored" else zipfile.ZIP_DEFLATED
        assert {info.compress_type for info in zf.infolist()} == {method}
        if compression == "deflated":  # deflated at level 1, the fast one
            info = zf.infolist()[0]
            data = (tmp_path / items[0].path).read_bytes()
            level1 = zlib.compressobj(1, zlib.DEFLATED, -15)
            assert info.compress_size == len(level1.compress(data) + level1.flush())
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_failed_package_leaves_no_zip(tmp_path: Path) -> None:
    items = _outgoing(tmp_path, 2)
    (tmp_path / items[1].path).unlink()
    with pytest.raises(FileNotFoundError):
        write_package(items, tmp_path, tmp_path / "7.zip")
    assert not (tmp_path / "7.zip").exists() and not list(tmp_path.glob(".tmp-*"))


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    rng = random.Random(1)
    waits = [backoff_seconds(attempt, 10, 300, rng) for attempt in range(1, 10)]
    assert 5 <= waits[0] <= 15 and 10 <= waits[1] <= 30
    assert all(150 <= wait <= 450 for wait in waits[6:])


def test_an_entry_over_4_gib_is_zip64_and_reads_back(tmp_path: Path) -> None:
    """An outgoing file over 4 GiB (an encapsulated instance can be; native Pixel Data stops at 4 GiB - 2 by its
    32-bit length) is zipped as ZIP64 and reads back whole. The source is sparse and the zip deflated, so the
    test writes about 20 MB to disk; it takes about 30 s of CPU (zeros through zlib twice)."""
    relative = "outbox/9/2.25.1/2.25.2.dcm"
    path = tmp_path / relative
    path.parent.mkdir(parents=True)
    size = (4 << 30) + 12345
    with path.open("wb") as sparse:
        sparse.truncate(size)
        sparse.seek(size - 5)
        sparse.write(b"TAIL!")
    package = write_package(
        [Outgoing(1, "2.25.1", "2.25.2", relative, size)], tmp_path, tmp_path / "9.zip", compression="deflated"
    )
    with zipfile.ZipFile(package.path) as archive:
        info = archive.getinfo("2.25.1/2.25.2.dcm")
        assert info.file_size == size
        read, tail = 0, b""
        with archive.open(info) as entry:  # the CRC-32 is checked at the end of the entry
            while chunk := entry.read(1 << 22):
                read, tail = read + len(chunk), (tail + chunk)[-5:]
    assert (read, tail) == (size, b"TAIL!")
