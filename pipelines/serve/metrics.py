"""Prometheus metrics through Ray Serve's metrics API (``ray.serve.metrics``).

Serve adds the ``deployment``, ``replica`` and ``application`` tags and Ray's metrics agent exports
everything on each node's metrics port (``ray start --metrics-export-port``, scraped by Prometheus;
Ray prefixes the names with ``ray_``). Counters are ``*_total``.

Per stream (tag ``stream``): ``adastream_stream_fps`` (frames received per second),
``adastream_stream_model_fps`` (frames the model saw per second), ``adastream_stream_latency_p50_ms``
and ``..._p99_ms`` (frame in -> event out over the last 10 s), ``adastream_frames_total``,
``adastream_steps_total``, ``adastream_frames_dropped_total`` (tag ``reason``),
``adastream_windows_total``, ``adastream_exits_total``, ``adastream_gflops_spent_total``,
``adastream_gflops_saved_total`` (what early exit did not spend: the window's remaining frames).
Replica-wide: ``adastream_frame_latency_ms`` (histogram, for p50/p99 with ``histogram_quantile``),
``adastream_active_streams``, ``adastream_recognizer_retries_total``,
``adastream_event_loop_lag_p50_ms`` and ``..._max_ms`` (:class:`LoopLag`); on the recognizer
``adastream_batch_size`` (histogram) and ``adastream_batch_latency_ms``.

Streams update plain counters as they go; once a second :meth:`ServeMetrics.collect` turns them into
metric updates (deltas for counters) on the event loop and :meth:`ServeMetrics.record` hands those to
Ray in another thread, so neither the per-frame path nor the loop touches the metrics recorder.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


class LoopLag:
    """How late an event loop runs what is due: :meth:`run` sleeps ``interval`` again and again and
    records how much longer each sleep took. On the ingress every stream's frames, steps, events and
    WebSocket messages wait on the one loop, so this is the replica's saturation signal: a lag that
    grows towards the sampling interval (250 ms for the demo) means frames queue and get dropped.
    Over the last ``horizon`` seconds."""

    def __init__(self, interval: float = 0.1, horizon: float = 10.0) -> None:
        self.interval = interval
        self._lags: deque[float] = deque(maxlen=max(1, int(horizon / interval)))

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(self.interval)
            self._lags.append(max(0.0, time.monotonic() - started - self.interval))

    def recent_median_ms(self, seconds: float) -> float | None:
        """The median lag of the samples of the last ``seconds`` (None before the first sample)."""
        count = max(1, int(round(seconds / self.interval)))
        recent = list(self._lags)[-count:]
        return float(np.median(recent)) * 1e3 if recent else None

    def summary(self) -> dict[str, float | None]:
        """p50, p90 and max in ms (None before the first sample)."""
        if not self._lags:
            return {"p50": None, "p90": None, "max": None}
        lags = np.asarray(self._lags) * 1e3
        return {"p50": round(float(np.percentile(lags, 50)), 2), "p90": round(float(np.percentile(lags, 90)), 2),
                "max": round(float(lags.max()), 2)}


@dataclass
class _Published:
    counters: dict[str, float] = field(default_factory=dict)


class ServeMetrics:
    """The ingress replica's metrics (created inside the replica, where Serve's context exists)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        stream = ("stream",)
        self.fps = Gauge("adastream_stream_fps", "Frames received per second, per stream", stream)
        self.model_fps = Gauge("adastream_stream_model_fps", "Frames the model saw per second, per stream", stream)
        self.p50 = Gauge("adastream_stream_latency_p50_ms", "Median frame latency (in -> event), per stream", stream)
        self.p99 = Gauge("adastream_stream_latency_p99_ms", "p99 frame latency (in -> event), per stream", stream)
        self.frames = Counter("adastream_frames", "Frames received", stream)
        self.steps = Counter("adastream_steps", "Frames the model processed", stream)
        self.dropped = Counter("adastream_frames_dropped", "Frames dropped (queue full, rate limit, malformed, ...)",
                               ("stream", "reason"))
        self.windows = Counter("adastream_windows", "Recognition windows started", stream)
        self.exits = Counter("adastream_exits", "Windows that exited early", stream)
        self.spent = Counter("adastream_gflops_spent", "GFLOPs (multiply-adds) spent by the model", stream)
        self.saved = Counter("adastream_gflops_saved", "GFLOPs early exit did not spend", stream)
        self.retries = Counter("adastream_recognizer_retries", "Steps resent after a recognizer replica was lost")
        self.latency = Histogram("adastream_frame_latency_ms", "Frame latency: arrival -> prediction event",
                                 LATENCY_BOUNDARIES_MS)
        self.active = Gauge("adastream_active_streams", "Streams on this ingress replica")
        self.lag_p50 = Gauge("adastream_event_loop_lag_p50_ms", "Median event loop lag over the last 10 s")
        self.lag_max = Gauge("adastream_event_loop_lag_max_ms", "Largest event loop lag over the last 10 s")
        self.overloaded = Gauge("adastream_overloaded", "1 while this ingress replica refuses new streams "
                                                        "because it cannot serve the ones it has")
        self.refused = Counter("adastream_streams_refused", "New streams refused (max_streams, overloaded)",
                               ("reason",))
        self._published: dict[str, _Published] = {}

    def collect(self, sessions: Iterable[Any], loop_lag: LoopLag | None = None) -> list[tuple[Callable, tuple]]:
        """Every stream's counters and gauges to push (call about once a second), read off the sessions
        where they live (the event loop: they are not thread-safe), as calls for :meth:`record` to make."""
        calls: list[tuple[Callable, tuple]] = []
        sessions = list(sessions)
        calls.append((self.active.set, (float(len(sessions)),)))
        lag = loop_lag.summary() if loop_lag is not None else {}
        if lag.get("p50") is not None:
            calls += [(self.lag_p50.set, (float(lag["p50"]),)), (self.lag_max.set, (float(lag["max"]),))]
        live = set()
        for s in sessions:
            live.add(s.id)
            tags = {"stream": s.id}
            calls += [(self.fps.set, (float(s.fps_in.rate()), tags)),
                      (self.model_fps.set, (float(s.fps_model.rate()), tags))]
            pct = s.latency_percentiles()
            if pct["p50"] is not None:
                calls += [(self.p50.set, (float(pct["p50"]), tags)), (self.p99.set, (float(pct["p99"]), tags))]
            calls += [(self.latency.observe, (value,)) for value in s.new_latencies]
            s.new_latencies.clear()
            c = s.counters
            seen = self._published.setdefault(s.id, _Published()).counters
            current = {"frames": c.frames_received, "steps": c.steps, "windows": c.windows, "exits": c.exits,
                       "spent": c.gflops_spent, "saved": c.gflops_saved, "retries": c.retries,
                       **{f"dropped:{k}": v for k, v in c.dropped.items()}}
            for key, value in current.items():
                delta = value - seen.get(key, 0)
                if delta <= 0:
                    continue
                seen[key] = value
                if key.startswith("dropped:"):
                    calls.append((self.dropped.inc, (delta, {"stream": s.id, "reason": key.split(":", 1)[1]})))
                elif key == "retries":
                    calls.append((self.retries.inc, (delta,)))
                else:
                    calls.append((getattr(self, key).inc, (delta, tags)))
        for gone in set(self._published) - live:
            # A stream that ended reads 0 fps rather than its last rate forever.
            calls += [(self.fps.set, (0.0, {"stream": gone})), (self.model_fps.set, (0.0, {"stream": gone}))]
            del self._published[gone]
        return calls

    @staticmethod
    def record(calls: list[tuple[Callable, tuple]]) -> None:
        """Make the calls :meth:`collect` gathered -- in a worker thread, not on the event loop: each
        enters Ray's C++ core, which lets go of the GIL and takes it back, and with a hundred streams
        that is a thousand waits for the GIL a second, behind every decoding thread of the process."""
        for call, args in calls:
            call(*args)


class RecognizerMetrics:
    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.batch_size = Histogram("adastream_batch_size", "Streams per forward pass", BATCH_BOUNDARIES)
        self.batch_latency = Histogram("adastream_batch_latency_ms", "Forward pass time per batch",
                                       LATENCY_BOUNDARIES_MS)
        self.frames = Counter("adastream_recognizer_frames", "Frames stepped by this recognizer replica")

    def observe(self, batch_size: int, latency_ms: float) -> None:
        self.batch_size.observe(float(batch_size))
        self.batch_latency.observe(latency_ms)
        self.frames.inc(float(batch_size))
