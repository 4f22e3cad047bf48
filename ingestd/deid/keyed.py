"""Keyed, deterministic replacements: UIDs, pseudonyms and date offsets derived from a project's secret.

HMAC-SHA-256 under the profile's key, with a distinct prefix per purpose so that a UID, a pseudonym and a
date offset derived from the same original value are unrelated. The same key and value always give the same
result (across instances, studies and restarts); another key gives an unrelated one.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import date, timedelta

__all__ = ["date_offset_days", "pseudonym", "remap_uid", "shift_da", "shift_dt"]


def _mac(key: bytes, purpose: bytes, value: str) -> bytes:
    return hmac.new(key, purpose + b"\x00" + value.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def remap_uid(key: bytes, uid: str) -> str:
    """`2.25.` and the decimal value of a UUID (version 8, RFC 9562) made of the first 128 bits of the HMAC."""
    raw = bytearray(_mac(key, b"uid", uid.strip("\x00 "))[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: custom
    raw[8] = (raw[8] & 0x3F) | 0x80  # variant RFC 9562
    return "2.25." + str(int.from_bytes(raw, "big"))


def pseudonym(key: bytes, value: str, length: int = 16) -> str:
    """Upper-case hexadecimal pseudonym of `value`, `length` characters (at most 64)."""
    return _mac(key, b"text", value.strip("\x00 ")).hex().upper()[: max(1, min(length, 64))]


def date_offset_days(key: bytes, patient: str, low: int, high: int) -> int:
    """Whole days to move this patient's dates into the past, in [low, high], the same on every call."""
    span = high - low + 1
    return low + int.from_bytes(_mac(key, b"date", patient.strip("\x00 "))[:8], "big") % span


def shift_da(value: str, days: int) -> str:
    """Move a DA value (YYYYMMDD, or the YYYYMM / YYYY precisions) `days` into the past.

    Raises ValueError for anything that is not such a date (the caller holds the study).
    """
    text = value.strip()
    if not text.isdigit() or len(text) not in (4, 6, 8):
        raise ValueError("not a DA value")
    year, month, day = int(text[:4]), int(text[4:6] or 1), int(text[6:8] or 1)
    moved = date(year, month, day) - timedelta(days=days)
    return f"{moved:%Y%m%d}"[: len(text)]


def shift_dt(value: str, days: int) -> str:
    """Move a DT value's date part `days` into the past; the time of day, fraction and offset stay.

    Raises ValueError for anything that is not a DT value.
    """
    text = value.strip()
    sign = max(text.find("+"), text.find("-"))
    body, zone = (text[:sign], text[sign:]) if sign > 0 else (text, "")
    if zone and (len(zone) != 5 or not zone[1:].isdigit()):
        raise ValueError("not a DT value")
    date_part, rest = body[:8], body[8:]
    if len(date_part) < 8:
        return shift_da(date_part, days) + rest + zone
    whole = rest.split(".", 1)
    if not all(part.isdigit() for part in whole if part) or len(whole[0]) > 6:
        raise ValueError("not a DT value")
    return shift_da(date_part, days) + rest + zone
