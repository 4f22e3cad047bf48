"""`ingestd status --filter KEY=VALUE[,KEY=VALUE]`: which batches a person asks to see.

Keys: `state`, `reason` (the hold code), `source` (calling AE title, `drop:<folder>` or the folder's name,
`import`), `rule`, `modality`, `kind` (`dicom`: studies' batches; `files`: attachment sets), and `older-than` /
`newer-than` (an age since the batch's first instance arrived: `90s`, `30m`, `2h`, `3d`, `1w`). Values of one key
are alternatives (`state=held,routed` or `state=held,state=routed`, also across repeated `--filter` options);
different keys must all hold. Mistakes are refused with the valid keys
or values and a did-you-mean, as `check-rules` does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ingestd.errors import IngestdError
from ingestd.states import BatchKind, HoldCode, StudyState

__all__ = ["FILTER_KEYS", "FilterError", "StudyFilter", "parse_age", "parse_filters"]

FILTER_KEYS = ("state", "reason", "source", "rule", "modality", "kind", "older-than", "newer-than")
_AGE_KEYS = ("older-than", "newer-than")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# `2h`, `2 h`, `2 hours`, `3days`: the unit's first letter counts (`min` and `minutes` are minutes).
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|secs?|seconds?|m|mins?|minutes?|h|hours?|d|days?|w|weeks?)")


class FilterError(IngestdError):
    """A `--filter` the command cannot apply: says what is wrong and what is valid."""


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    from ingestd.rules.names import did_you_mean  # noqa: PLC0415 - only when a filter is wrong

    return did_you_mean(word, tuple(candidates))


def parse_age(text: str, key: str = "age") -> float:
    """`90s`, `30m`, `2h`, `3d`, `1w` in seconds; FilterError for anything else."""
    match = _AGE.fullmatch(text.strip().lower())
    if match is None:
        raise FilterError(f"--filter {key}={text}: an age is a number and a unit (s, m, h, d, w), e.g. 30m, 2h or 3d")
    return float(match.group(1)) * _UNITS[match.group(2)[0]]


@dataclass(frozen=True, slots=True)
class StudyFilter:
    """The filters given, by key: alternatives within a key, every key must hold (`ages`: both bounds)."""

    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    older_than: float | None = None
    newer_than: float | None = None
    given: tuple[str, ...] = ()  # the filters as typed, for the heading and JSON

    def __bool__(self) -> bool:
        return bool(self.values) or self.older_than is not None or self.newer_than is not None

    def matches(self, study: Mapping[str, Any]) -> bool:
        """Whether a study of `ingestd.status.status_data` passes every filter."""
        age = float(study.get("age_seconds") or 0)
        if self.older_than is not None and not age > self.older_than:
            return False
        if self.newer_than is not None and not age < self.newer_than:
            return False
        return all(any(_matches(key, value, study) for value in values) for key, values in self.values.items())


def _matches(key: str, value: str, study: Mapping[str, Any]) -> bool:
    if key == "state":
        return bool(study["state"] == value)
    if key == "reason":
        return bool(study["hold_code"] == value)
    if key == "rule":
        return bool(study["rule"] == value)
    if key == "kind":
        return bool(study.get("kind", BatchKind.DICOM) == value)
    if key == "modality":
        return value.upper() in (m.upper() for m in study["modalities"])
    name = str(study["source_name"])  # key == "source"
    wanted = value.lower()
    return wanted in (name.lower(), name.split(":", 1)[-1].lower(), str(study["source"]).lower())


def _checked(key: str, value: str) -> str:
    """The value as compared: states and hold codes must be ones ingestd knows."""
    known: tuple[str, ...] = ()
    if key == "state":
        known = tuple(StudyState)
    elif key == "reason":
        known = tuple(HoldCode)
    elif key == "kind":
        known = tuple(BatchKind)
    if known and value not in known:
        lowered = value.lower()
        if lowered in known:
            return lowered
        noun = {"state": "state", "reason": "hold code", "kind": "kind of batch"}[key]
        raise FilterError(
            f"--filter {key}={value}: no such {noun}{_did_you_mean(value, known)}; one of: {', '.join(known)}"
        )
    if not value:
        raise FilterError(f"--filter {key}=: give a value")
    return value


def parse_filters(texts: Iterable[str]) -> StudyFilter:
    """The filters of repeated `--filter KEY=VALUE[,KEY=VALUE]` options; FilterError naming the valid keys."""
    values: dict[str, list[str]] = {}
    ages: dict[str, float] = {}
    given: list[str] = []
    for text in texts:
        given.append(text)
        key: str | None = None
        for raw in text.split(","):
            part = raw.strip()
            if not part:
                continue
            if "=" in part:
                key, _, value = part.partition("=")
                key = key.strip().lower().replace("_", "-")
                if key not in FILTER_KEYS:
                    raise FilterError(
                        f"--filter {part}: no such key '{key}'{_did_you_mean(key, FILTER_KEYS)};"
                        f" the keys are {', '.join(FILTER_KEYS)}"
                    )
            elif key is None:
                raise FilterError(f"--filter {text}: write KEY=VALUE, one of the keys {', '.join(FILTER_KEYS)}")
            else:
                value = part  # `state=held,routed`: another value of the same key
            value = value.strip()
            if key in _AGE_KEYS:
                ages[key] = parse_age(value, key)
            else:
                values.setdefault(key, []).append(_checked(key, value))
    return StudyFilter(
        values={key: tuple(dict.fromkeys(found)) for key, found in values.items()},
        older_than=ages.get("older-than"),
        newer_than=ages.get("newer-than"),
        given=tuple(given),
    )
