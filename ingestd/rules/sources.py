"""The files and variables a rules file refers to: profile keys and lookup tables. This module does the I/O.

Messages name files, rows and variables, never key material and never a value from a lookup table (those
are original patient identifiers).
"""

from __future__ import annotations

import csv
import io
import os
import re
import secrets
import stat
from pathlib import Path

from ingestd.errors import IngestdError

__all__ = ["MIN_KEY_CHARS", "NewKeyError", "read_env_key", "read_key_file", "read_table", "write_new_key"]

MIN_KEY_CHARS = 32
TABLE_HEADER = ("original", "new")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_TABLE_PROBLEMS = 5
# What a rules file may make ingestd read (check-rules, and a reload inside the running daemon): a key is 64
# characters; a table of 100,000 subjects is about 4 MB.
MAX_KEY_FILE_BYTES = 64 * 1024
MAX_TABLE_BYTES = 32 * 1024 * 1024


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """The bytes of the regular file at `path` if it holds at most `limit` of them, else None; raises OSError
    (a FIFO or a device is refused without being read: /dev/zero never ends)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not wait for a writer
    with os.fdopen(descriptor, "rb") as file:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(0, "not a regular file")
        data = file.read(limit + 1)
    return data if len(data) <= limit else None


class NewKeyError(IngestdError):
    """`ingestd new-key` could not create the key file."""


def read_key_file(path: Path) -> bytes:
    """Read a key from a file that only its owner may read; raise ValueError saying what to fix."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ValueError(f"key file {path} does not exist (create one with: ingestd new-key {path})") from None
    except OSError as exc:
        raise ValueError(f"key file {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"key file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise ValueError(f"key file {path} may be read or written by group or others: chmod 600 {path}")
    try:
        data = _read_bounded(path, MAX_KEY_FILE_BYTES)
        if data is None:
            raise ValueError(f"key file {path} is larger than {MAX_KEY_FILE_BYTES // 1024} KiB: not a key")
        text = data.decode("utf-8")
    except OSError as exc:
        raise ValueError(f"key file {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"key file {path} is not text (ingestd new-key writes 64 hex characters)") from None
    key = text.strip()
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(
            f"key file {path} holds fewer than {MIN_KEY_CHARS} characters (ingestd new-key writes a good key)"
        )
    return key.encode()


def read_env_key(name: str) -> bytes:
    """Read a key from the environment variable `name`; raise ValueError saying what to fix."""
    if not _ENV_NAME.match(name):
        raise ValueError(f"'{name}' is not an environment variable name")
    value = os.environ.get(name)
    if value is None:
        raise ValueError(f"environment variable {name} is not set; it must hold the key ({MIN_KEY_CHARS}+ characters)")
    key = value.strip()
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"environment variable {name} holds fewer than {MIN_KEY_CHARS} characters; a key needs more")
    return key.encode()


def read_table(path: Path) -> dict[str, str]:
    """Read a lookup table: UTF-8 CSV, the header row `original,new`, then one `original,new` pair a row.

    Cells are stripped of surrounding spaces; blank rows are skipped. Raise ValueError listing the problems
    by row number (never a cell's content).
    """
    try:
        data = _read_bounded(path, MAX_TABLE_BYTES)
        if data is None:
            raise ValueError(f"lookup table {path} is larger than {MAX_TABLE_BYTES // 2**20} MiB")
        text = data.decode("utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"lookup table {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"lookup table {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"lookup table {path} is not UTF-8 text") from None
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    table: dict[str, str] = {}
    first_row: dict[str, int] = {}
    problems: list[str] = []
    header_seen = False
    try:
        for row in rows:
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            if header_seen:
                problems += _table_row(rows.line_num, cells, table, first_row)
            elif tuple(cell.lower() for cell in cells) != TABLE_HEADER:
                problems.append(f"row {rows.line_num}: the first row must be the header: original,new")
            header_seen = True
    except csv.Error:
        problems.append(f"row {rows.line_num}: not valid CSV")
    if not header_seen:
        problems.append("the table is empty: it needs the header row original,new")
    if problems:
        shown = "; ".join(problems[:_MAX_TABLE_PROBLEMS])
        more = len(problems) - _MAX_TABLE_PROBLEMS
        raise ValueError(f"lookup table {path}: {shown}" + (f"; and {more} more" if more > 0 else ""))
    return table


def _table_row(number: int, cells: list[str], table: dict[str, str], first_row: dict[str, int]) -> list[str]:
    if len(cells) != 2:
        return [f"row {number}: expected 2 columns (original,new), found {len(cells)}"]
    if not cells[0] or not cells[1]:
        return [f"row {number}: a cell is empty"]
    if cells[0] in table:
        return [f"row {number}: its original value is already on row {first_row[cells[0]]}"]
    table[cells[0]] = cells[1]
    first_row[cells[0]] = number
    return []


def write_new_key(path: Path) -> None:
    """Write 32 random bytes as 64 hex characters and a newline to a new file of mode 0600; never overwrite."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise NewKeyError(f"{path} already exists; a key is never overwritten (move it away first)") from None
    except OSError as exc:
        raise NewKeyError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(descriptor, 0o600)
        data = (secrets.token_hex(32) + "\n").encode()
        while data:
            data = data[os.write(descriptor, data) :]
        os.fsync(descriptor)
    except OSError as exc:
        os.close(descriptor)
        path.unlink(missing_ok=True)
        raise NewKeyError(f"cannot write {path}: {exc.strerror}") from None
    os.close(descriptor)
