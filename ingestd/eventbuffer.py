"""The daemon's recent log events per batch, for the web page's study page: a bounded buffer in memory.

`ingestd.logs.configure_logging` puts `EventBuffer.capture` into the log pipeline after the redaction processor
and the formatting of exceptions, just before the renderer: what it keeps is what the log line says, nothing more
(digests, never an original UID, a path or a header value). Only events with a `batch_id` field are kept, the last
`per_batch` of each batch, for the `batches` batches most recently named; long values are cut. So the buffer
holds at most `per_batch * batches` events of bounded size, whatever the daemon does: 10,000 events, measured at
about 3 MiB as the daemon's events are and 7 MiB when every event carries long values (ASCII: the log's values are
digests, codes, numbers and messages). Nothing is written anywhere: a restart starts it empty (the log itself has
the rest).

Events logged by the receiver processes (`listener.processes` > 1) stay in theirs; the study page shows those the
daemon's own process logs (assembling, routing, delivering, the page's actions).
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BATCHES", "FIELDS_CHARS", "PER_BATCH", "VALUE_CHARS", "EventBuffer", "RecordedEvent"]

PER_BATCH = 50  # events kept per batch (the newest)
BATCHES = 200  # batches kept (those most recently named in an event)
VALUE_CHARS = 300  # a field's value is cut to this many characters (a traceback, a long reason)
FIELDS_CHARS = 600  # an event's fields, as one text, are cut to this many characters
_COMMON = frozenset({"timestamp", "level", "event", "logger", "pid", "batch_id", "receiver"})


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """One log event of a batch as its log line has it: `at` the line's (ISO, UTC) timestamp; `fields` the other
    keys with their values, sorted by key, as one text (`key=value, key=value`)."""

    at: str
    level: str
    event: str
    fields: str


def _text(value: Any, limit: int = VALUE_CHARS) -> str:
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, (int, float, bool)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."  # ASCII: a text stays one byte a character


def _batch_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit() and len(value) <= 12:
        return int(value)
    return None


class EventBuffer:
    """The recent events of each batch, bounded (`per_batch` per batch, `batches` batches); thread-safe."""

    def __init__(self, per_batch: int = PER_BATCH, batches: int = BATCHES) -> None:
        self.per_batch = per_batch
        self.batches = batches
        self._events: OrderedDict[int, deque[RecordedEvent]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, event: Mapping[str, Any]) -> None:
        """Keep `event` (a processed event dict) if it names a batch (`batch_id`)."""
        batch_id = _batch_id(event.get("batch_id"))
        if batch_id is None:
            return
        fields = ", ".join(
            f"{key}={_text(value)}"
            for key, value in sorted(event.items(), key=lambda item: str(item[0]))
            if key not in _COMMON and value is not None
        )
        recorded = RecordedEvent(
            at=_text(event.get("timestamp") or "", 40),
            level=_text(event.get("level") or "", 20),
            event=_text(event.get("event"), 80),
            fields=_text(fields, FIELDS_CHARS),
        )
        with self._lock:
            kept = self._events.get(batch_id)
            if kept is None:
                kept = self._events[batch_id] = deque(maxlen=self.per_batch)
                while len(self._events) > self.batches:
                    self._events.popitem(last=False)  # the batch named longest ago
            else:
                self._events.move_to_end(batch_id)
            kept.append(recorded)

    def events(self, batch_id: int) -> list[RecordedEvent]:
        """The kept events of `batch_id`, newest first."""
        with self._lock:
            return list(reversed(self._events.get(batch_id, ())))

    def __len__(self) -> int:
        """How many events are kept, over every batch."""
        with self._lock:
            return sum(len(kept) for kept in self._events.values())

    def capture(self, _logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """structlog processor: keep the event (as the log line will have it) and pass it on unchanged."""
        with contextlib.suppress(Exception):  # the buffer never stops a log line
            self.add(event)
        return event
