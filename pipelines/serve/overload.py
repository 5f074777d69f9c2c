"""Admission control: an ingress replica that cannot serve the streams it has refuses new ones.

``max_streams`` is a fixed guess at a replica's capacity; what a replica can really carry depends on
the sources (pulled streams decode, pushed images do not), the budget (early exits halve the model's
work), the machine and its neighbours. Past that capacity a replica does not slow down gently: the
benchmark (``benchmarks/serve_load.py``) shows every stream's frames queueing for the model and being
dropped, frame latency going from tenths of a second to seconds, and at worst an API that stops
answering -- every stream degraded by the one stream too many. So each replica watches two signs that
it is past its capacity and, while either holds, refuses new streams (HTTP 503 with ``Retry-After``,
WebSocket close 1013) and adopts no orphaned ones; the streams it has keep being served, and a client
that is refused can retry, which behind several replicas may reach a less loaded one:

* **Streams going without compute**: at least ``stream_share`` of its streams (and at least two)
  dropped a sampled frame for want of the model in the last ``window_s`` seconds -- a frame that
  waited for the model while the stream's next one arrived (``queue_full``, see ``queue_frames``), or
  pushed video the decoder could not keep up with (``decoder_backlog``). Counting streams, not frames,
  keeps one client that pushes faster than real time from shutting the door on everyone else.
* **The event loop running late**: its median lag over the last ``window_s`` seconds is above
  ``loop_lag_ms`` (:class:`~pipelines.serve.metrics.LoopLag`): every frame, event and API request of
  the replica waits on that one loop. The default, 200 ms, is a backstop for a replica starved so
  badly that its API would stop answering: in the benchmark the loop's median lag stayed under 5 ms at
  every load sustained and reached 12-55 ms where streams already dropped a tenth to most of their
  frames (which the first sign catches), 200-340 ms only far beyond capacity.

A brief hiccup -- a recognizer replica restarting, a garbage collection -- can close the door for
``window_s`` seconds; refused clients are told to retry after that long.

**Coming back.** The signs show only seconds after a stream starts, and the clients refused during
an overload all come back after the same ``Retry-After``: reopening the door wide would let them all
in at once and overshoot again (the benchmark, retrying refused pulled streams: at 192 pulled
streams on 2 cores the API stopped answering). So for ``2 * window_s`` after either sign last held,
the replica admits at most ``ramp_share`` of its streams (at least one) as new streams per
``window_s``, and the signs can close the door again before the next few come in.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

STARVED_REASONS = ("queue_full", "decoder_backlog", "behind_source")
"""Drop reasons that mean the frame waited for compute (the others are the client's doing)."""


class OverloadGuard:
    """Whether this replica is past its capacity (module docstring). :meth:`observe` is called about
    once a second with the replica's sessions; :meth:`reason` answers at admission time."""

    MIN_STREAMS = 2
    """A replica is judged starved only when at least this many streams went without compute."""

    def __init__(self, window_s: float = 5.0, stream_share: float = 0.25, loop_lag_ms: float = 200.0,
                 ramp_share: float = 0.05) -> None:
        self.window_s = window_s
        self.stream_share = stream_share
        self.loop_lag_ms = loop_lag_ms
        self.ramp_share = ramp_share
        self._signs_at = -math.inf
        """When either sign last held (seen by :meth:`observe` or :meth:`reason`)."""
        self._admitted_at: deque[float] = deque()
        """When new streams were admitted, over the last ``window_s`` seconds."""
        self._starved_at: dict[str, float] = {}
        """Stream -> when its count of frames dropped for want of compute last grew."""
        self._starved_count: dict[str, int] = {}
        self._streams = 0
        self._loop_lag_ms: float | None = None

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    def observe(self, sessions: Iterable[Any], loop_lag_ms: float | None, now: float | None = None) -> None:
        """Take note of the sessions' drop counters (objects with ``id`` and ``counters.dropped``) and of
        the loop's median lag over the last ``window_s`` seconds."""
        now = time.monotonic() if now is None else now
        live = set()
        for session in sessions:
            live.add(session.id)
            dropped = session.counters.dropped
            starved = sum(dropped.get(reason, 0) for reason in STARVED_REASONS)
            if starved > self._starved_count.get(session.id, 0):
                self._starved_at[session.id] = now
            self._starved_count[session.id] = starved
        for gone in set(self._starved_count) - live:
            del self._starved_count[gone]
            self._starved_at.pop(gone, None)
        self._streams = len(live)
        self._loop_lag_ms = loop_lag_ms
        if self.enabled and self._signs(now) is not None:
            self._signs_at = now

    def starved_streams(self, now: float | None = None) -> int:
        """Streams that dropped a frame for want of compute in the last ``window_s`` seconds."""
        now = time.monotonic() if now is None else now
        return sum(1 for at in self._starved_at.values() if now - at <= self.window_s)

    def reason(self, now: float | None = None) -> str | None:
        """Why this replica refuses new streams now, or None if it admits them."""
        if not self.enabled:
            return None
        now = time.monotonic() if now is None else now
        why = self._signs(now)
        if why is not None:
            self._signs_at = now
            return why
        if self.ramping(now):
            allowance = self.ramp_allowance()
            if self._recently_admitted(now) >= allowance:
                return (f"it is coming back from an overload and admits at most {allowance} new streams every "
                        f"{self.window_s:g} s")
        return None

    def ramp_allowance(self) -> int:
        """New streams admitted per ``window_s`` while coming back from an overload."""
        return max(1, math.floor(self.ramp_share * self._streams))

    def admitted(self, now: float | None = None) -> None:
        """A new stream was let in (counted for the ramp after an overload)."""
        now = time.monotonic() if now is None else now
        self._admitted_at.append(now)
        self._recently_admitted(now)

    def _recently_admitted(self, now: float) -> int:
        while self._admitted_at and now - self._admitted_at[0] > self.window_s:
            self._admitted_at.popleft()
        return len(self._admitted_at)

    def _signs(self, now: float) -> str | None:
        starved = self.starved_streams(now)
        if starved >= max(self.MIN_STREAMS, math.ceil(self.stream_share * self._streams)):
            return (f"{starved} of its {self._streams} streams dropped frames for want of compute in the last "
                    f"{self.window_s:g} s")
        if self._loop_lag_ms is not None and self._loop_lag_ms > self.loop_lag_ms:
            return f"its event loop ran {self._loop_lag_ms:.0f} ms late (median over the last {self.window_s:g} s)"
        return None

    def retry_after_s(self) -> int:
        """What to tell a refused client: the time it takes the signs to clear."""
        return max(1, math.ceil(self.window_s))

    def ramping(self, now: float | None = None) -> bool:
        """Whether new streams are let in only a few at a time (coming back from an overload)."""
        now = time.monotonic() if now is None else now
        return self.enabled and now - self._signs_at <= 2 * self.window_s

    def describe(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        why = self.reason(now)
        return {"overloaded": why is not None, "reason": why, "ramping": self.ramping(now),
                "starved_streams": self.starved_streams(now), "streams": self._streams,
                "loop_lag_p50_ms": self._loop_lag_ms,
                "limits": {"window_s": self.window_s, "stream_share": self.stream_share,
                           "loop_lag_ms": self.loop_lag_ms, "ramp_share": self.ramp_share}}
