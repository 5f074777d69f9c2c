"""Per-stream event log: JSON events with sequence numbers, fanned out to WebSocket and SSE clients.

Each event is serialised once. A bounded ring keeps the recent ones so an SSE client that reconnects
with ``Last-Event-ID`` misses nothing that is still in the ring; each subscriber has its own bounded
queue, and a subscriber that cannot keep up loses its *oldest* events (and is told so by a ``lagged``
event) instead of slowing the stream down for everyone else.

Event types (all carry ``type``, ``stream_id``, ``seq`` and ``time``, the server's Unix time):

``stream_started``, ``prediction``, ``window_restarted``, ``budget_changed``, ``source``, ``warning``,
``error``, ``lagged``, ``stream_ended`` -- see docs/serving.md for their fields.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Event:
    seq: int
    type: str
    data: str  # the JSON text, serialised once

    def sse(self) -> str:
        return f"id: {self.seq}\nevent: {self.type}\ndata: {self.data}\n\n"


class Subscriber:
    """One consumer's queue (a WebSocket sender or an SSE response)."""

    def __init__(self, log: "EventLog", maxsize: int, after_seq: int | None = None) -> None:
        self._log = log
        self.after_seq = after_seq
        """The seq it was asked to start after (None: from the next event)."""
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=maxsize)
        self._stash: list[Event | None] = []
        self.lost = 0

    def put(self, event: Event | None) -> None:
        if self._queue.full():
            try:
                self._queue.get_nowait()
                self.lost += 1
            except asyncio.QueueEmpty:
                pass
        self._queue.put_nowait(event)

    async def get(self) -> Event | None:
        """The next event; None once the stream has ended (or the subscription was closed)."""
        if self._stash:
            return self._stash.pop()
        event = await self._queue.get()
        if self.lost:
            # Tell the consumer it missed events before giving it the next one.
            lost, self.lost = self.lost, 0
            self._stash.append(event)
            return self._log.make("lagged", {"lost_events": lost}, record=False)
        return event

    def drain(self) -> tuple[list[Event], bool]:
        """Without waiting: the events queued so far, and whether the stream's events have ended.
        Events lost to a full queue are a gap in the sequence numbers (no ``lagged`` event)."""
        events: list[Event] = []
        ended = False
        while True:
            try:
                event = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if event is None:
                ended = True
                break
            events.append(event)
        self.lost = 0
        return events, ended

    def close(self) -> None:
        self._log.unsubscribe(self)
        self.put(None)


class EventLog:
    def __init__(self, stream_id: str, maxlen: int = 512, subscriber_queue: int = 1024) -> None:
        self.stream_id = stream_id
        self.seq = 0
        self.ring: deque[Event] = deque(maxlen=maxlen)
        self.subscribers: set[Subscriber] = set()
        self.subscriber_queue = subscriber_queue
        self.ended = False

    def make(self, type_: str, fields: dict[str, Any], record: bool = True) -> Event:
        if record:
            self.seq += 1
        body = {"type": type_, "stream_id": self.stream_id, "seq": self.seq, "time": round(time.time(), 3), **fields}
        return Event(self.seq, type_, json.dumps(body, separators=(",", ":"), allow_nan=False, default=_jsonable))

    def publish(self, type_: str, **fields: Any) -> Event:
        event = self.make(type_, fields)
        self.ring.append(event)
        for subscriber in list(self.subscribers):
            subscriber.put(event)
        return event

    def subscribe(self, after_seq: int | None = None) -> Subscriber:
        """A new subscriber; with ``after_seq`` it first gets the ring's events after that one."""
        subscriber = Subscriber(self, self.subscriber_queue, after_seq)
        if after_seq is not None:
            for event in self.ring:
                if event.seq > after_seq:
                    subscriber.put(event)
        if self.ended:
            subscriber.put(None)
        else:
            self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def end(self) -> None:
        """No more events: every subscriber gets None after what is queued."""
        self.ended = True
        for subscriber in list(self.subscribers):
            subscriber.put(None)
        self.subscribers.clear()


def _jsonable(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
