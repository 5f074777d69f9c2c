#!/usr/bin/env python
"""Load test of the live server: how many concurrent 25 fps streams it sustains, with early exit and
without, their frame latency, and what Ray Serve adds per frame over calling the model in-process.

    python benchmarks/serve_load.py                        # the demo model (sqlite:///mlflow.db)
    python benchmarks/serve_load.py --tracking-uri sqlite:////path/mlflow.db --budget 0.03
    python benchmarks/serve_load.py --transports pull      # only the MPEG-TS-over-UDP capacity search
    python benchmarks/serve_load.py --quick                # shorter trials, coarser search (~8-11 min)

What the streams show (``--source``): by default the test videos of ``data/synthetic`` back to back,
resampled to ``--fps`` -- the demo model's own domain, where its early-exit thresholds were solved. On
footage from another domain the model is rarely confident and seldom exits (on ``demo.mp4``, a real
clip the demo model never saw, 2 of 68 windows exited early in one run), so the early-exit comparison
says nothing there; pass ``--source ../shared/videos/demo.mp4`` to see it.

What runs: a local Ray with the serving app (one Recognizer replica, or the model in the ingress with
``--colocate``; one ingress replica more than cores, up to 4, ``--ingress-replicas``) on loopback, and
in this process the load generators, over real sockets:

* ``pull``: one UDP port per stream; a sender thread plays the content as H.264 in MPEG-TS (looped,
  each stream at a different point of it) to every port at its real rate, and the server is asked to
  read ``udp://127.0.0.1:PORT`` (``POST /v1/streams``): the camera -> server path of a deployment,
  decoded by the server (PyAV) frame by frame;
* ``push``: one WebSocket per stream (through Serve's HTTP proxy) carrying timestamped JPEGs,
  predictions coming back as events. Like ``pipelines/stream_client.py``, the generator leaves out the
  frames the server said it will not use (before the ``next_pts`` of its latest event: between two
  sampled frames, and after an exit until the next window); ``--push-send-all`` sends all of them.
  The one-stream latency trials always send every frame.

The server cuts recognition windows of ``--window-seconds`` (default 2 s: the demo model's training
clips are 32 frames at 16 fps) and feeds the model ``T`` frames per window; with early exit a window
stops at its first confident frame.

* **Sustained streams**, for the ``--budget`` (early exit) and for ``full`` (no exit): the largest N
  for which, over ``--duration`` seconds after a warm-up, every stream is decoded at its own rate
  (pull: >= 80 % of it, as UDP is paced by bytes), at most ``--max-drop`` of the frames the windows
  sample are dropped, the median frame latency stays under the sampling interval (the server keeps
  up) and the load generator keeps its schedule. Found by doubling N, then bisecting to within 10 %;
  between trials the server is given time to stop the previous trial's streams and go quiet. The
  server runs with its admission control as deployed by default: a replica past its capacity refuses
  new streams (503, WebSocket close 1013). A refused pulled stream is asked for again after the
  server's ``Retry-After``, as ``stream_client.py --pull`` does, for up to ``--admission-wait`` s (a
  burst of new streams trips the guard for a few seconds; the warm-up starts once the last stream is
  in); a trial with streams still refused after that, or a refused pushed stream, is not sustained
  (``--no-admission``: every stream admitted, to see how the server fails without it).
* **Server CPU per stream** (proxy + replicas, from /proc) where both budgets ran sustained: a
  capacity ratio that does not depend on what else the machine runs (on a shared machine the
  wall-clock search above measures the neighbours too).
* **Frame latency**: p50/p99 of the server's per-frame latency (frame received or decoded by the
  ingress -> prediction event) at the sustained N.
* **Live accuracy** (a labelled ``manifest.csv`` source): of the windows whose stepped frames all
  showed one video (each step's event echoes its frame's ``pts``, which says which content frame was
  sent -- pushed, or decoded from the pulled MPEG-TS), the share whose final top-1 label is that
  video's -- with early exit and without, so the capacity gained can be weighed against the accuracy
  kept. Windows that span two videos have no single right answer and are not judged. Pushed: every
  stream; pulled: ``--pull-judged-streams`` of them (read as server-sent events, each step's).
* **Serve vs in-process**: one pushed stream; the server's per-frame latency p50 against the same
  work done directly in this process -- JPEG decode, the input transform and one ``model.step`` of
  batch 1 with the stream's state -- paced like for like (``*_vs_paced``, the goal's ratio): one call
  per sampling interval, the process waking at the stream's frame rate in between, as the server does
  for the stream. Measured for the default layout (a separate Recognizer) and with ``colocate_model``
  (the model inside the ingress replica, one hop less), in ``--latency-rounds`` rounds that each run
  the in-process baseline and both layouts one after the other: the headline is the median of the
  rounds' ratios, with the worst beside it. Each round also times the app's call to a recognizer that
  does nothing (same request, same reply size, same Serve and data plane): the floor of the separate
  layout's hop, which no change to the app's code removes. The best case (``*_vs_direct``), calls back
  to back with hot caches, is much faster on a small shared machine than the same call at a stream's
  pace, and is printed too. Events carry a latency breakdown (queue, decode, step, model, send,
  transport) and the batch size, so the benchmark also prints Serve's overhead over the work as timed
  inside the server (``*_vs_work``). The rounds run on the fresh server, before the capacity
  searches (one camera's latency on an idle server); after the searches, one more trial of the main
  layout beside the paced baseline (``*_vs_paced_after_load``) shows whether the server came back as
  fast from minutes of overload.

Everything shares the machine (the generators too), so absolute numbers are this machine's, and
noisy when other work runs; the ratios are the point. Headline figures come last as ``name=value``.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import io
import os
import secrets
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av
import numpy as np
import requests

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"


HTTP = requests.Session()
"""The benchmark's HTTP client; carries the server's token (a random one, set in main)."""


def log(message: str) -> None:
    print(message, flush=True)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


CPU_PARTS = ("proxy", "ingress", "sources", "model", "recognizer")


def thread_cpu_seconds(process: Path) -> Iterator[tuple[str, int, float]]:
    """(OS thread name, thread id, CPU seconds used so far) for each thread of ``/proc/<pid>``; a thread
    that ends meanwhile is left out."""
    for task in (process / "task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        yield comm, int(task.name), (int(fields[11]) + int(fields[12])) / _TICKS


def serve_cpu_seconds() -> dict[tuple[str, int], float]:
    """CPU seconds used so far by every thread of the processes that do per-stream work, keyed by (part,
    thread id). The parts: Serve's HTTP proxy (the Python ProxyActor, and HAProxy where
    ``high_throughput`` runs it); the ingress replica, less its source reader threads (demuxing and
    decoding pulled streams and pushed MPEG-TS, with FFmpeg's own threads: ``src:*``, ``av:*``,
    ``udp-rx``) as ``sources``; the forward passes (the ``model`` thread, in the recognizer replica or
    with ``colocate_model`` in the ingress); the rest of the recognizer replica (receiving requests,
    batching, Ray) as ``recognizer``. CPU time is what a stream costs whatever
    else runs on the machine, so it measures capacity robustly where wall-clock limits are noisy. By
    thread, so a replica that Serve restarts in between (an overloaded one can fail its health check)
    counts from zero instead of making the difference negative."""
    total: dict[tuple[str, int], float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            is_haproxy = (entry / "comm").read_bytes().strip().endswith(b"haproxy")
            if is_haproxy or b"ProxyActor" in cmdline:
                part = "proxy"
            elif b"ServeReplica:adastream-bench" in cmdline and b"StreamDirectory" not in cmdline:
                part = "recognizer" if b"Recognizer" in cmdline else "ingress"  # (the directory: bookkeeping)
            else:
                continue
            for comm, tid, seconds in thread_cpu_seconds(entry):
                thread_part = part
                if comm == "model":
                    thread_part = "model"
                elif part == "ingress" and (comm.startswith(("src:", "av:")) or comm == "udp-rx"):
                    thread_part = "sources"
                total[(thread_part, tid)] = seconds
        except (OSError, IndexError, ValueError):
            continue
    return total


def cpu_per_stream(before: dict[tuple[str, int], float], after: dict[tuple[str, int], float], streams: int,
                   seconds: float) -> dict[str, float]:
    """ms of CPU per second of one stream, by part (see :func:`serve_cpu_seconds`)."""
    used = dict.fromkeys(CPU_PARTS, 0.0)
    for key, value in after.items():
        used[key[0]] += value - before.get(key, 0.0)
    return {k: round(1e3 * v / (streams * seconds), 2) for k, v in used.items()}


# ------------------------------------------------------------------------------------------ frames
def source_frames(source: Path, fps: float, max_seconds: float = 30.0,
                  labels: list[int | None] | None = None) -> list[np.ndarray]:
    """RGB frames of the streams' content, resampled to ``fps``: a video file, or the test split of a
    synthetic benchmark (``manifest.csv``), its videos played one after another, each for its own
    duration -- the demo model's own domain, where its early-exit thresholds were calibrated.
    ``labels``, if given, receives each frame's class index from the manifest (None for a plain file)."""
    if source.suffix == ".csv":
        import csv

        with open(source) as f:
            videos = [(source.parent / r["path"], int(r["label"])) for r in csv.DictReader(f) if r["split"] == "test"]
    else:
        videos = [(source, None)]
    frames: list[np.ndarray] = []
    for path, label in videos:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or 25)
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        # nearest-in-time resampling from the video's own rate to ``fps``
        count = int(round(len(decoded) / rate * fps))
        frames += [decoded[min(len(decoded) - 1, int(i * rate / fps))] for i in range(count)]
        if labels is not None:
            labels += [label] * count
        if len(frames) >= max_seconds * fps:
            break
    if not frames:
        raise SystemExit(f"serve_load: no frames in {source}")
    return frames


def encode_frames(frames: list[np.ndarray], count: int, size: int | None, fps: float) -> list[tuple[float, bytes]]:
    """(pts, raw JPEG) for ``count`` of ``frames`` (looped), scaled to a short side of ``size``."""
    encoder = av.CodecContext.create("mjpeg", "w")
    height, width = frames[0].shape[:2]
    if size:
        scale = size / min(width, height)
        width, height = int(round(width * scale / 2) * 2), int(round(height * scale / 2) * 2)
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuvj420p"
    encoder.time_base = fractions.Fraction(1, 1000)
    # High-quality JPEG (mean error ~2.6/255 on the synthetic frames, against ~9 at the encoder's
    # default): the demo model reads a 2-px texture, which default-quality JPEG smears.
    encoder.options = {"qmin": "1", "qmax": "2"}
    out = []
    for i in range(count):
        frame = av.VideoFrame.from_ndarray(frames[i % len(frames)], format="rgb24")
        frame = frame.reformat(width=width, height=height, format="yuvj420p")
        frame.pts, frame.time_base = i, encoder.time_base
        out.append((i / fps, b"".join(bytes(p) for p in encoder.encode(frame))))
    return out


def stamped(pts: float, jpeg: bytes) -> bytes:
    return b"ASTS" + struct.pack(">d", pts) + jpeg


# ------------------------------------------------------------------------------------------ in-process
def direct_latency(loaded: Any, frames: list[tuple[float, bytes]], window_frames: int, repeats: int,
                   interval: float = 0.0, tick: float = 0.0, trace: bool = True) -> list[float]:
    """Per-frame time of the work the server does for a sampled frame, done directly: decode the JPEG,
    transform, one model step (batch 1) carrying the state from the previous step of the window.

    ``interval`` = 0: calls back to back (caches hot, the direct call's best case). ``interval`` > 0:
    paced like a live stream's sampled frames, one call per ``interval`` seconds; ``tick`` > 0 wakes the
    process at the stream's frame rate in between (what a process reading a 25 fps stream does, and
    what the server does for the frames it does not sample) instead of sleeping the whole interval."""
    import torch

    from pipelines.serve.engine import StepEngine, StepRequest
    from pipelines.serve.frames import FrameTransform, ImageDecoder, Preprocess

    torch.set_num_threads(1)  # as the recognizer replica (torch_threads=1)
    engine = StepEngine(loaded.model, trace=trace)  # as the server's (ServeConfig.trace_model)
    transform = FrameTransform(Preprocess.from_data(loaded.data, loaded.model.input_size))
    decoder = ImageDecoder()
    times = []
    state = None
    due = time.perf_counter()
    for i in range(repeats):
        _, jpeg = frames[i % len(frames)]
        if interval:
            due += interval
            while (now := time.perf_counter()) < due:
                time.sleep(min(tick, due - now) if tick else due - now)
        started = time.perf_counter()
        image = transform(decoder.decode("jpeg", jpeg))
        (result,) = engine.run([StepRequest("direct", image, state)])
        times.append((time.perf_counter() - started) * 1e3)
        state = None if (i + 1) % window_frames == 0 else result.state
    return times[5:]  # the first calls warm caches


# ------------------------------------------------------------------------------------------ load
@dataclass
class StreamStats:
    stream_id: str
    events: list[dict] = field(default_factory=list)
    sent_at: dict[float, float] = field(default_factory=dict)  # pts -> monotonic send time
    client_latency: list[float] = field(default_factory=list)
    closed: bool = False
    wanted_pts: float | None = None  # the server's next_pts: it uses no earlier frame
    close_code: int | None = None
    close_reason: str = ""


@dataclass
class Trial:
    streams: int
    budget: str
    sustained: bool
    reason: str
    server_p50: float
    server_p99: float
    client_p50: float
    client_p99: float
    sampled: int
    dropped: int
    steps: int
    """Steps of the windows that ended during the measurement (``windows``), so steps / windows is the
    frames per window."""
    windows: int
    exits: int
    schedule_lag_s: float
    transport: str = "push"
    cpu_ms_per_stream_s: float = float("nan")
    """Server CPU (proxy + replicas) per second of one stream, over the measured period."""
    cpu_parts: dict[str, float] = field(default_factory=dict)
    """The same by part (see :func:`serve_cpu_seconds`)."""
    loop_lag_ms: dict[str, Any] = field(default_factory=dict)
    """The ingress' event loop lag over the last 10 s of the trial (``/v1/info``): p50, p90, max."""
    breakdown: dict[str, float] = field(default_factory=dict)
    """Median latency parts (push): queue (waiting for the stream's worker), decode, step."""
    decoded_share: float = float("nan")
    """Pull: the share of the frames received that the server decoded (the rest were left undecoded
    after early exits, :class:`~pipelines.serve.sources.KeyframeSkipper`)."""
    dozed_share: float = float("nan")
    """Pull: the share of the time the server's readers slept through packets they left out instead of
    waking for each (:class:`~pipelines.serve.sources.Dozer`)."""
    latencies: list[float] = field(default_factory=list, repr=False)
    """The server's per-frame latencies (push), for pooling the one-stream trials of several rounds."""
    windows_judged: int = 0
    """Labelled content: the windows that ended during the measurement whose stepped frames all showed
    one video (a window that spans two videos has no single right answer); pulled: of the streams
    watched (``--pull-judged-streams``)."""
    windows_correct: int = 0
    """Of those, the windows whose final top-1 label was that video's."""
    admitted_on_retry: int = 0
    """Pull: streams refused at first (admission control, 503) and admitted when asked again."""

    @property
    def live_accuracy(self) -> float:
        return self.windows_correct / self.windows_judged if self.windows_judged else float("nan")

    def row(self) -> str:
        ok = "yes" if self.sustained else f"no ({self.reason})"
        return (f"{self.transport:4s} {self.budget:>6s} {self.streams:5d}  {ok:28s} server p50 "
                f"{self.server_p50:7.1f} ms p99 {self.server_p99:7.1f} ms | CPU {self.cpu_ms_per_stream_s:5.1f} "
                f"ms/stream/s | steps {self.steps:6d} windows {self.windows:5d} exits {self.exits:5d} "
                f"dropped {self.dropped}/{self.sampled} | loop lag p50 {self.loop_lag_ms.get('p50')} "
                f"max {self.loop_lag_ms.get('max')} ms"
                + (f" | decoded {self.decoded_share:.0%}" if self.decoded_share == self.decoded_share else "")
                + (f" dozed {self.dozed_share:.0%}" if self.dozed_share == self.dozed_share else "")
                + (f" | live accuracy {self.live_accuracy:.1%} of {self.windows_judged} windows"
                   if self.windows_judged else "")
                + (f" | {self.admitted_on_retry} admitted on retry" if self.admitted_on_retry else ""))


async def run_trial(base_url: str, n: int, budget: str, frames: list[tuple[float, bytes]], fps: float,
                    warmup: float, duration: float, limits: dict[str, float], tag: str,
                    send_all: bool = False, stagger_s: float = 0.0, labels: list[int | None] | None = None) -> Trial:
    """``n`` pushed streams. Like independent cameras, stream j shows the content from its own point
    (j / n of the way through) and starts ``j / n`` of ``stagger_s`` (one recognition window) after
    the first, so neither the streams' sampled frames nor their windows line up: with every stream in
    step, every sampling slot would be a burst of n frames, and with early exit every window's first
    frames too (the streams exit within the first few slots and send nothing until their next window
    begins), and the latency would measure the burst, not the load. Pulled streams are spread the
    same way by where they join the source: at its next keyframe. ``labels`` (one per frame of
    ``frames``): count how many windows' final prediction was right (:attr:`Trial.live_accuracy`)."""
    import websockets

    ws_base = base_url.replace("http://", "ws://")
    stats = [StreamStats(f"{tag}-{budget}-{n}-{i}") for i in range(n)]
    connections = []
    cpu_from = 0.0

    async def reader(ws: Any, s: StreamStats) -> None:
        try:
            async for text in ws:
                event = json.loads(text)
                now = time.monotonic()
                s.events.append(event)
                if event.get("type") == "prediction":
                    s.wanted_pts = event.get("next_pts")
                if event.get("type") == "prediction" and event.get("latency_ms") is not None:
                    sent = s.sent_at.get(round(event.get("pts") or -1.0, 4))
                    if sent is not None:
                        s.client_latency.append((now - sent) * 1e3)
        except websockets.exceptions.ConnectionClosed:
            pass
        s.closed = True
        s.close_code, s.close_reason = ws.close_code, ws.close_reason or ""

    try:
        for s in stats:
            ws = await websockets.connect(f"{ws_base}/v1/streams/{s.stream_id}/ws?budget={budget}", proxy=None,
                                          additional_headers={k: v for k, v in HTTP.headers.items() if k == "Authorization"},
                                          max_size=None, open_timeout=60, compression=None)
            connections.append((ws, asyncio.create_task(reader(ws, s))))
    except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as error:
        # An overloaded server that stops accepting connections has not sustained this load.
        for ws, task in connections:
            await ws.close()
            task.cancel()
        await asyncio.sleep(5.0)
        return Trial(n, budget, False, f"connections refused ({type(error).__name__})", float("nan"),
                     float("nan"), float("nan"), float("nan"), 0, 0, 0, 0, 0, 0.0)
    total = warmup + duration
    ticks = int(total * fps)
    interval = 1.0 / fps
    starts = [int(j * stagger_s * fps) // n for j in range(n)]
    offsets = [(j * len(frames)) // n for j in range(n)]
    started = time.monotonic()
    lag = 0.0
    measure_from = None
    for tick in range(ticks):
        due = started + tick * interval
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        else:
            lag = max(lag, now - due) if tick * interval > warmup else lag
        if measure_from is None and tick * interval >= warmup:
            measure_from = time.time()
            cpu_from = serve_cpu_seconds()
        for j, (ws, _) in enumerate(connections):
            local = tick - starts[j]
            if local < 0:
                continue
            pts = local * interval
            jpeg = frames[(local + offsets[j]) % len(frames)][1]
            if not send_all and stats[j].wanted_pts is not None and pts < stats[j].wanted_pts:
                continue  # as pipelines/stream_client.py does: the server would drop it unseen
            stats[j].sent_at[round(pts, 4)] = time.monotonic()
            try:
                await ws.send(stamped(pts, jpeg))
            except websockets.exceptions.ConnectionClosed:
                pass
    cpu_parts = cpu_per_stream(cpu_from, serve_cpu_seconds(), n, time.time() - measure_from) \
        if measure_from is not None else {}
    ingress_lag = await asyncio.get_running_loop().run_in_executor(None, loop_lag, base_url)
    await asyncio.sleep(1.0)  # let the last sampled frames come back
    for ws, task in connections:
        try:
            await ws.send(json.dumps({"type": "end"}))
        except websockets.exceptions.ConnectionClosed:
            pass
    for ws, task in connections:
        try:
            await asyncio.wait_for(task, 30)
        except asyncio.TimeoutError:
            task.cancel()
        await ws.close()

    breakdown: dict[str, list[float]] = {}
    for s in stats:
        for e in s.events:
            if e.get("type") == "prediction" and e.get("timing_ms") and measure_from and e["time"] >= measure_from:
                for k, v in e["timing_ms"].items():
                    breakdown.setdefault(k, []).append(v)
                breakdown.setdefault("batch", []).append(e.get("batch_size") or 0)
    server_lat, client_lat = [], []
    sampled = steps = windows = exits = judged = correct = 0
    drops: dict[str, int] = {}  # frames dropped, by reason
    for j, s in enumerate(stats):
        measured = [e for e in s.events if e.get("type") == "prediction" and e.get("latency_ms") is not None
                    and measure_from is not None and e["time"] >= measure_from]
        server_lat += [e["latency_ms"] for e in measured]
        client_lat += s.client_latency[-len(measured):] if measured else []
        # The windows that ended in the interval (cut short by their duration too, but not by the end of
        # the stream) and the steps they took: a window's final result says how many (step + 1).
        done = [e for e in s.events if e.get("type") == "prediction" and e.get("final") and e.get("reason") != "end"
                and measure_from is not None and e["time"] >= measure_from]
        windows += len(done)
        steps += sum(e["step"] + 1 for e in done)
        exits += sum(1 for e in done if e["exited"])
        if labels:
            # The frame sent at ``pts`` was content frame ``local + offsets[j]`` (looped).
            right, of = judge_windows(s.events, done, labels, lambda pts, j=j: int(round(pts * fps)) + offsets[j])
            correct, judged = correct + right, judged + of
        ended = next((e for e in reversed(s.events) if e.get("type") == "stream_ended"), None)
        if ended:
            sampled += ended["counters"]["frames_sampled"]
            for reason, count in ended["counters"]["dropped"].items():
                drops[reason] = drops.get(reason, 0) + count
    p50, p99 = percentile(server_lat, 50), percentile(server_lat, 99)
    reasons = judge(limits, p50=p50, p99=p99, sampled=sampled, dropped=drops, have_results=bool(server_lat))
    # Admission control (ServeConfig.overload_window_s): a replica past its capacity closes new streams
    # with 1013 before they start.
    refused = [s for s in stats if s.close_code == 1013 and not any(e.get("type") == "stream_started" for e in s.events)]
    if refused:
        reasons.append(f"{len(refused)} streams refused ({refused[0].close_reason})")
    if lag > max(0.5, 5 * interval):
        reasons.append(f"generator {lag:.1f} s behind")
    return Trial(n, budget, not reasons, "; ".join(reasons), p50, p99, percentile(client_lat, 50),
                 percentile(client_lat, 99), sampled, sum(drops.values()), steps, windows, exits, lag,
                 cpu_ms_per_stream_s=sum(cpu_parts.values()) if cpu_parts else float("nan"), cpu_parts=cpu_parts,
                 loop_lag_ms=ingress_lag, breakdown={k: round(percentile(v, 50), 2) for k, v in breakdown.items()},
                 latencies=server_lat, windows_judged=judged, windows_correct=correct)


def judge_windows(events: list[dict], done: list[dict], labels: list[int | None],
                  content_index: Callable[[float], int]) -> tuple[int, int]:
    """(right, judged) of the windows ``done`` (final prediction events): a window is judged when every
    frame it stepped showed one video, and right when its final top-1 label is that video's. The server
    echoes each step's ``pts`` (``emit=steps``); ``content_index`` says which frame of the content
    (``labels``, looped) was sent at that ``pts``."""
    shown: dict[int, set] = {}
    for e in events:
        if e.get("type") == "prediction" and e.get("pts") is not None:
            shown.setdefault(e["window"], set()).add(labels[content_index(e["pts"]) % len(labels)])
    right = judged = 0
    for e in done:
        truth = shown.get(e["window"], set())
        if len(truth) == 1 and None not in truth and e.get("top_k"):
            judged += 1
            right += e["top_k"][0]["index"] == next(iter(truth))
    return right, judged


def judge(limits: dict[str, float], *, p50: float, p99: float, sampled: int, dropped: dict[str, int],
          have_results: bool) -> list[str]:
    """Why a trial is not sustained (empty: it is). The server keeps up when the median frame is done
    before the next one is due (latency p50 under the sampling interval) and the sampled frames are not
    dropped; p99 is only a criterion if asked for, because on a shared machine it measures the neighbours."""
    reasons = []
    if not have_results:
        reasons.append("no results")
    total = sum(dropped.values())
    if sampled and total > limits["max_drop"] * sampled:
        why = ", ".join(f"{count} {reason}" for reason, count in sorted(dropped.items(), key=lambda kv: -kv[1])
                        if count)
        reasons.append(f"{total} of {sampled} sampled frames dropped: {why}")
    if p50 > limits["max_p50_ms"]:
        reasons.append(f"p50 {p50:.0f} ms")
    if limits.get("max_p99_ms") and p99 > limits["max_p99_ms"]:
        reasons.append(f"p99 {p99:.0f} ms")
    return reasons


# ------------------------------------------------------------------------------------------ pull load
def mpegts_bytes(frames: list[np.ndarray], fps: float, gop: int = 50) -> tuple[bytes, float, float]:
    """The frames as H.264 in MPEG-TS as a live camera sends them -- a keyframe every ``gop`` frames
    exactly (no scene-cut keyframes), no B-frames; a receiver joining mid-stream decodes from the next
    keyframe -- its duration in seconds and rate."""
    buffer = io.BytesIO()
    rate = fractions.Fraction(fps).limit_denominator(1001)
    with av.open(buffer, "w", format="mpegts") as dst:
        out = dst.add_stream("libx264", rate=rate)
        out.height, out.width = frames[0].shape[:2]
        out.pix_fmt = "yuv420p"
        out.options = {"preset": "veryfast", "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "0",
                       "crf": "18"}
        for i, rgb in enumerate(frames):
            image = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            image.pts, image.time_base = i, 1 / rate
            for packet in out.encode(image):
                dst.mux(packet)
        for packet in out.encode(None):
            dst.mux(packet)
    return buffer.getvalue(), len(frames) / float(rate), float(rate)


def first_frame_time(ts: bytes) -> float:
    """The media time of the MPEG-TS's first frame (a muxer may start its clock above zero), from which
    the server's ``pts`` of a pulled frame says which frame of the content it was."""
    with av.open(io.BytesIO(ts), format="mpegts") as container:
        return float(next(container.decode(video=0)).time)


class EventWatcher(threading.Thread):
    """A pulled stream's server-sent events, gathered until the stream ends (or the server stops
    answering): what the push trials read from their WebSockets."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True, name="event-watcher")
        self.url = url
        self.events: list[dict] = []
        self.error = ""

    def run(self) -> None:
        from pipelines.stream_client import iter_sse

        try:
            with requests.get(self.url, headers=dict(HTTP.headers), stream=True, timeout=(30, 120)) as response:
                if response.status_code != 200:
                    self.error = f"HTTP {response.status_code}"
                    return
                for event in iter_sse(response.iter_lines(decode_unicode=True)):
                    self.events.append(event)
                    if event.get("type") == "stream_ended":
                        return
        except (requests.RequestException, ValueError) as error:
            self.error = type(error).__name__


class UdpSender(threading.Thread):
    """Plays an MPEG-TS file, looped, to many UDP ports at its real rate (1316-byte datagrams, paced
    by bytes), each port at its own offset into the file so the streams are not in lock-step."""

    def __init__(self, ts: bytes, duration: float, ports: list[int]) -> None:
        super().__init__(daemon=True, name="udp-sender")
        self.datagrams = [ts[i:i + 1316] for i in range(0, len(ts), 1316)]
        self.rate = len(self.datagrams) / duration
        self.ports = ports
        self.halt = threading.Event()
        self.late = 0.0

    def run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        n = len(self.datagrams)
        offsets = [(j * n) // max(len(self.ports), 1) for j in range(len(self.ports))]
        started = time.monotonic()
        k = 0
        while not self.halt.is_set():
            due = started + k / self.rate
            now = time.monotonic()
            if due > now:
                time.sleep(min(due - now, 0.05))
                continue
            self.late = max(self.late, now - due) if k > self.rate * 2 else self.late
            for port, offset in zip(self.ports, offsets):
                sock.sendto(self.datagrams[(k + offset) % n], ("127.0.0.1", port))
            k += 1
        sock.close()


def free_udp_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def loop_lag(base_url: str) -> dict[str, Any]:
    """The ingress' event loop lag (p50, p90, max in ms over its last 10 s): whether the one loop every
    stream shares was keeping up; {} if it cannot be read."""
    try:
        return HTTP.get(f"{base_url}/v1/info", timeout=30).json().get("event_loop_lag_ms") or {}
    except (requests.RequestException, ValueError):
        return {}


def admission_open(base_url: str, replicas: int, attempts: int = 20) -> bool:
    """Whether every ingress replica admits new streams freely (not overloaded, not coming back from an
    overload): ``GET /v1/info`` until each of ``replicas`` has answered (the proxy picks one per
    request), or ``attempts`` answers."""
    seen: set[str] = set()
    for _ in range(attempts):
        try:
            info = HTTP.get(f"{base_url}/v1/info", timeout=10).json()
        except (requests.RequestException, ValueError):
            return False
        admission = info.get("admission") or {}
        if admission.get("overloaded") or admission.get("ramping"):
            return False
        seen.add(info.get("replica", ""))
        if len(seen) >= replicas:
            return True
    return True


def _summaries(base_url: str) -> dict[str, dict]:
    return {s["stream_id"]: s for s in HTTP.get(f"{base_url}/v1/streams", timeout=30).json()["streams"]}


async def run_pull_trial(base_url: str, n: int, budget: str, ts: tuple[bytes, float, float],
                         args: argparse.Namespace, tag: str, labels: list[int | None] | None = None,
                         ts_start: float = 0.0) -> Trial:
    """``n`` streams pulled over UDP from one looped MPEG-TS (``ts``: bytes, duration, rate), each
    joining it at its own point. ``labels`` (one per frame of the TS, whose first frame is at media
    time ``ts_start``): up to ``--pull-judged-streams`` of the streams, spread over those points, send
    every step's event (``emit=steps``; the rest only window results), read as server-sent events,
    and their windows' final predictions are judged (:attr:`Trial.live_accuracy`)."""
    loop = asyncio.get_running_loop()
    ports = free_udp_ports(n)
    ids = [f"{tag}-{budget}-{n}-{i}" for i in range(n)]
    k = args.pull_judged_streams if labels else 0
    watched = ids[::max(1, n // k)][:k] if k else []
    watchers = [EventWatcher(f"{base_url}/v1/streams/{sid}/events") for sid in watched]
    sender = UdpSender(ts[0], ts[1], ports)
    sender.start()

    refused: dict[str, str] = {}  # stream -> why (admission control: 503 from a replica past its capacity)
    retried: set[str] = set()  # streams admitted only after a 503

    def create() -> None:
        # Like ``stream_client.py --pull``, a refused stream is asked for again after the server's
        # Retry-After, for up to ``--admission-wait`` s: a burst of new streams can trip a replica's
        # admission control for a few seconds, and a stream admitted a little later is sustained all
        # the same. The warm-up starts once the last stream is in.
        pending = list(zip(ids, ports))
        give_up = time.monotonic() + args.admission_wait
        while pending:
            retry_after, again = 0.0, []
            for sid, port in pending:
                reply = HTTP.post(f"{base_url}/v1/streams", timeout=60, json={
                    "source": f"udp://127.0.0.1:{port}", "stream_id": sid, "budget": budget,
                    "emit": "steps" if sid in watched else "windows"})
                if reply.status_code == 503:
                    refused[sid] = reply.json().get("detail", "")
                    retry_after = max(retry_after, float(reply.headers.get("Retry-After") or 1.0))
                    again.append((sid, port))
                    continue
                reply.raise_for_status()
                if refused.pop(sid, None) is not None:
                    retried.add(sid)
            pending = again
            if pending and time.monotonic() + retry_after > give_up:
                break
            time.sleep(retry_after)
        for watcher in watchers:
            if watcher.url.rsplit("/", 2)[-2] not in refused:
                watcher.start()

    def delete() -> None:
        for sid in ids:
            try:
                HTTP.delete(f"{base_url}/v1/streams/{sid}", timeout=30)
            except requests.RequestException as error:
                log(f"    (could not delete {sid}: {error})")

    unresponsive = ""
    before: dict[str, dict] = {}
    after: dict[str, dict] = {}
    cpu_parts: dict[str, float] = {}
    lag: dict[str, Any] = {}
    try:
        await loop.run_in_executor(None, create)
        await asyncio.sleep(args.pull_warmup)
        before = await loop.run_in_executor(None, _summaries, base_url)
        cpu_from, measured_from, judge_from = serve_cpu_seconds(), time.monotonic(), time.time()
        await asyncio.sleep(args.duration)
        cpu_parts = cpu_per_stream(cpu_from, serve_cpu_seconds(), n, time.monotonic() - measured_from)
        judge_until = time.time()
        after = await loop.run_in_executor(None, _summaries, base_url)
        lag = await loop.run_in_executor(None, loop_lag, base_url)
    except (requests.RequestException, ValueError, KeyError) as error:
        # An overloaded server whose API stops answering has not sustained this load.
        unresponsive = f"API unresponsive ({type(error).__name__})"
    finally:
        sender.halt.set()
        await loop.run_in_executor(None, delete)
        sender.join(5)
        for watcher in watchers:  # their streams have ended: each gets its stream_ended
            if watcher.ident is not None:
                await loop.run_in_executor(None, watcher.join, 15)
    if unresponsive:
        await asyncio.sleep(5.0)  # let the server drain before the next trial
        return Trial(n, budget, False, unresponsive, float("nan"), float("nan"), float("nan"), float("nan"),
                     0, 0, 0, 0, 0, sender.late)

    sampled = steps = windows = exits = 0
    drops: dict[str, int] = {}  # frames dropped, by reason
    p50s, p99s, fps = [], [], []
    missing = stale = received = decoded = 0
    not_live: dict[str, int] = {}  # why a stream was not live: its status (and message), or not listed
    dozed = span = 0.0
    for sid in ids:
        if sid in refused:
            continue
        a, b = before.get(sid), after.get(sid)
        if a is None or b is None or b["status"] != "live":
            missing += 1
            if b is None:
                why = "not listed at the end"
            elif a is None:
                why = f"not listed at the start ({b['status']} at the end)"
            else:
                why = b["status"] + (f": {b['message']}" if b.get("message") else "")
            not_live[why] = not_live.get(why, 0) + 1
            continue
        # With several ingress replicas, a stream another replica serves is reported as of its owner's
        # last sync to the directory (about a window behind: a window's result makes the record due);
        # an overloaded owner can fall so far behind that the second snapshot is hardly newer than the
        # first, or older (its counters would seem to run backwards).
        interval = (b.get("as_of") or 0) - (a.get("as_of") or 0)
        if interval < args.duration / 2:
            stale += 1
            continue
        ca, cb = a["counters"], b["counters"]
        sampled += cb["frames_sampled"] - ca["frames_sampled"]
        received += cb["frames_received"] - ca["frames_received"]
        decoded += b.get("decoder", {}).get("frames_decoded", 0) - a.get("decoder", {}).get("frames_decoded", 0)
        dozed += b.get("decoder", {}).get("dozed_s", 0.0) - a.get("decoder", {}).get("dozed_s", 0.0)
        span += interval
        for reason, count in cb["dropped"].items():
            drops[reason] = drops.get(reason, 0) + count - ca["dropped"].get(reason, 0)
        # Windows that ended in the interval and their steps: begun-window counts would miscount the
        # windows that straddle its ends (with 2 s windows and 5 s trials, by up to a third).
        steps += cb["steps_done"] - ca["steps_done"]
        windows += cb["windows_done"] - ca["windows_done"]
        exits += cb["exits"] - ca["exits"]
        # Over the interval between the two snapshots (see above). A reader dozing through packets it
        # leaves out (Dozer) has not counted what arrived since it fell asleep -- up to a second and a
        # half at 25 fps and 2 s windows, which would read as a reader falling behind: that source time
        # is added back (the frames are in the receive buffer, counted when it wakes).
        asleep = b.get("decoder", {}).get("dozing_s", 0.0) - a.get("decoder", {}).get("dozing_s", 0.0)
        fps.append((cb["frames_received"] - ca["frames_received"] + asleep * ts[2]) / interval)
        if b["latency_ms"]["p50"] is not None:
            p50s.append(b["latency_ms"]["p50"])
            p99s.append(b["latency_ms"]["p99"])
    p50 = float(np.median(p50s)) if p50s else float("nan")
    p99 = max(p99s) if p99s else float("nan")
    right = judged = 0
    for watcher in watchers:
        if watcher.error:
            log(f"    (the events of {watcher.url.rsplit('/', 2)[-2]}: {watcher.error})")
        # The windows that ended in the measured interval (not cut short by the stream's end).
        done = [e for e in watcher.events if e.get("type") == "prediction" and e.get("final")
                and e.get("reason") != "end" and judge_from <= e["time"] <= judge_until]
        r, j = judge_windows(watcher.events, done, labels or [], lambda pts: int(round((pts - ts_start) * ts[2])))
        right, judged = right + r, judged + j
    reasons = judge(limits_of(args), p50=p50, p99=p99, sampled=sampled, dropped=drops, have_results=bool(p50s))
    if refused:
        reasons.append(f"{len(refused)} streams refused for {args.admission_wait:g} s "
                       f"({next(iter(refused.values()))})")
    if missing:
        reasons.append(f"{missing} streams not live ("
                       + ", ".join(f"{count} {why}" for why, count in sorted(not_live.items())) + ")")
    if stale:
        reasons.append(f"{stale} streams' counters not refreshed by their replica")
    # UDP is paced by bytes, so over a few seconds a stream can run a little under its frame rate;
    # a decoder that cannot keep up falls well below (and loses datagrams).
    if fps and min(fps) < 0.8 * ts[2]:
        reasons.append(f"decoded {min(fps):.1f} fps")
    if sender.late > 1.0:
        reasons.append(f"sender {sender.late:.1f} s behind")
    return Trial(n, budget, not reasons, "; ".join(reasons), p50, p99, float("nan"), float("nan"), sampled,
                 sum(drops.values()), steps, windows, exits, sender.late, cpu_ms_per_stream_s=sum(cpu_parts.values()),
                 cpu_parts=cpu_parts, loop_lag_ms=lag, decoded_share=decoded / received if received else float("nan"),
                 dozed_share=dozed / span if span else float("nan"), windows_judged=judged, windows_correct=right,
                 admitted_on_retry=len(retried))


def limits_of(args: argparse.Namespace) -> dict[str, float]:
    return {"max_p50_ms": args.max_p50_ms, "max_p99_ms": args.max_p99_ms or 0.0, "max_drop": args.max_drop}


async def capacity(base_url: str, budget: str, transport: str, media: dict[str, Any], args: argparse.Namespace,
                   trials: list[Trial]) -> Trial | None:
    """Largest sustained N: double from ``--start-streams``, then bisect to within ``--resolution``."""
    best: Trial | None = None
    low, high = 0, None
    n = args.start_streams
    await settle(base_url, replicas=args.ingress_replicas)  # the previous search may have ended overloaded
    while True:
        tag = f"t{len(trials)}"
        if transport == "pull":
            trial = await run_pull_trial(base_url, n, budget, media["ts"], args, tag, labels=media["labels"],
                                         ts_start=media["ts_start"])
        else:
            trial = await run_trial(base_url, n, budget, media["jpeg"], args.fps, args.warmup, args.duration,
                                    limits_of(args), tag=tag, send_all=args.push_send_all,
                                    stagger_s=args.window_seconds, labels=media["labels"])
        trial.transport = transport
        trials.append(trial)
        log("  " + trial.row())
        if trial.sustained:
            best, low = trial, n
        else:
            high = n
        if high is None:
            if n >= args.max_streams:
                break
            n = min(n * 2, args.max_streams)
        else:
            if high - low <= max(1, int(args.resolution * high)):
                break
            n = (low + high) // 2
            if n == low:
                break
        await settle(base_url, replicas=args.ingress_replicas)
    return best


async def settle(base_url: str, timeout: float = 90.0, replicas: int = 1) -> None:
    """Before the next trial: wait until the server has stopped every stream of the previous one, its
    event loop is quiet again and admission control has reopened fully on every ingress replica -- an
    overloaded trial can leave streams and work behind for a while, and a replica that refused
    streams lets new ones in a few at a time for a while after; the next trial would otherwise be
    charged with both."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout

    def quiet() -> bool:
        try:
            streams = HTTP.get(f"{base_url}/v1/streams", timeout=10).json()["streams"]
        except (requests.RequestException, ValueError, KeyError):
            return False
        if any(s.get("status") in ("starting", "live", "connecting", "reconnecting", "disconnected") for s in streams):
            return False
        if (loop_lag(base_url).get("p90") or 0.0) >= 20.0:
            return False
        return admission_open(base_url, replicas)

    while time.monotonic() < deadline and not await loop.run_in_executor(None, quiet):
        await asyncio.sleep(1.0)
    await asyncio.sleep(1.0)


async def single_stream_latency(base_url: str, frames: list[tuple[float, bytes]], args: argparse.Namespace,
                                budget: str) -> Trial:
    return await run_trial(base_url, 1, budget, frames, args.fps, args.warmup, args.latency_duration,
                           {"max_p50_ms": 1e9, "max_drop": 1.0}, tag="latency", send_all=True)


def _probe_request(loaded: Any, frames: list[tuple[float, bytes]]) -> Any:
    """A request as the app sends it mid-window: a transformed frame and the state after one step."""
    from pipelines.serve.engine import StepEngine, StepRequest
    from pipelines.serve.frames import FrameTransform, ImageDecoder, Preprocess

    image = FrameTransform(Preprocess.from_data(loaded.data, loaded.model.input_size))(
        ImageDecoder().decode("jpeg", frames[0][1]))
    (first,) = StepEngine(loaded.model).run([StepRequest("probe", image, None)])
    return StepRequest("probe", image, first.state)


def hop_probe_app() -> Any:
    """The floor under a separate Recognizer's hop: the ingress -> recognizer call of the app, with the
    same request (a transformed frame and a stream state) and a reply of the same size (the state), to
    a deployment that does no work. Same Serve, same data plane, same pacing as a stream's sampled
    frames; what it takes is what no change to the app's own code can remove from that layout."""
    from ray import serve

    # No CPU reservation: it does no work, and the apps under test hold the logical CPUs of a small Ray.
    @serve.deployment(name="NoopRecognizer", ray_actor_options={"num_cpus": 0})
    class NoopRecognizer:
        async def step(self, request: Any) -> Any:
            return request.state

    @serve.deployment(name="HopProbe", ray_actor_options={"num_cpus": 0})
    class HopProbe:
        def __init__(self, recognizer: Any) -> None:
            self.recognizer = recognizer

        async def measure(self, request: Any, calls: int, interval: float, tick: float) -> list[float]:
            times = []
            due = time.perf_counter()
            for _ in range(calls):
                due += interval
                while (now := time.perf_counter()) < due:
                    await asyncio.sleep(min(tick, due - now))
                started = time.perf_counter()
                await self.recognizer.step.remote(request)
                times.append((time.perf_counter() - started) * 1e3)
            return times[5:]

    return HopProbe.bind(NoopRecognizer.bind())


@dataclass
class LatencyRound:
    paced: list[float]
    """In-process decode + transform + step, paced like the stream."""
    trials: dict[str, Trial]
    """One pushed stream per layout ("separate", "colocated")."""
    hop: list[float]
    """The no-op recognizer call (``hop_probe_app``)."""

    def ratio(self, layout: str) -> float:
        return self.trials[layout].server_p50 / percentile(self.paced, 50)


async def latency_rounds(urls: dict[str, str], probe: Any, probe_request: Any, loaded: Any,
                         args: argparse.Namespace, frames: list[tuple[float, bytes]]) -> list[LatencyRound]:
    """The latency comparison, side by side: each round measures the in-process baseline, one stream
    through every layout and the no-op hop, one after the other, so the ratios of a round share the
    machine's state of the moment (on a small shared machine the same call takes noticeably longer
    in one minute than in the next)."""
    T = loaded.num_frames
    calls = 5 + int(args.latency_duration / args.sampling_interval)
    rounds = []
    for r in range(args.latency_rounds):
        paced = direct_latency(loaded, frames, T, calls, interval=args.sampling_interval, tick=1 / args.fps,
                               trace=args.trace_model)
        trials = {layout: await single_stream_latency(url, frames, args, "full") for layout, url in urls.items()}
        hop = await probe.measure.remote(probe_request, calls, args.sampling_interval, 1 / args.fps)
        rounds.append(LatencyRound(paced, trials, hop))
        log(f"  round {r + 1}: in-process paced p50 {percentile(paced, 50):.2f} ms; "
            + "; ".join(f"{layout} {t.server_p50:.2f} ms ({t.server_p50 / percentile(paced, 50):.2f}x)"
                        for layout, t in trials.items())
            + f"; no-op recognizer call {percentile(hop, 50):.2f} ms")
    return rounds


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models:/adastream-adafocus_v2@demo")
    parser.add_argument("--tracking-uri", default=None, help="default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    parser.add_argument("--budget", default="auto", help="the early-exit budget to compare with 'full'")
    parser.add_argument("--transports", default="pull,push", help="capacity searches to run: pull, push or both")
    parser.add_argument("--source", type=Path, default=None,
                        help="what the streams show: a video file, or a synthetic benchmark's manifest.csv (its "
                             "test videos back to back); default data/synthetic/manifest.csv, the demo model's "
                             "own domain, if it exists, else ../shared/videos/demo.mp4")
    parser.add_argument("--fps", type=float, default=25.0, help="frames per second of every stream")
    parser.add_argument("--gop", type=int, default=50,
                        help="pull: frames from one keyframe to the next (default 50, a common camera setting: 2 s "
                             "at 25 fps); the server leaves undecoded the frames after an exit up to the keyframe "
                             "before the next window")
    parser.add_argument("--push-send-all", action="store_true",
                        help="push: send all 25 frames a second, ignoring the server's next_pts (which says "
                             "from which timestamp on it will use a frame again)")
    parser.add_argument("--window-seconds", type=float, default=2.0)
    parser.add_argument("--frame-size", type=int, default=None, help="push: short side of the JPEGs (default: the source's size)")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--pull-warmup", type=float, default=7.0,
                        help="pulled streams: a stream's reader learns the source's keyframe interval from its "
                             "first three keyframes (4-6 s at the default --gop) before it leaves frames undecoded "
                             "after exits; hours-long camera streams run in that state, so it is what is measured")
    parser.add_argument("--pull-judged-streams", type=int, default=8,
                        help="pulled streams whose windows are judged (live accuracy, labelled content): they send "
                             "every step's event, the rest only window results; 0: none")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--latency-duration", type=float, default=10.0,
                        help="seconds of each one-stream latency trial (after the warm-up)")
    parser.add_argument("--latency-rounds", type=int, default=3,
                        help="rounds of the latency comparison (in-process, each layout, the no-op hop)")
    parser.add_argument("--start-streams", type=int, default=4)
    parser.add_argument("--max-streams", type=int, default=1024,
                        help="the search stops here (352 pushed streams with early exit were sustained on 2 cores)")
    parser.add_argument("--max-p50-ms", type=float, default=None,
                        help="sustained only if the median frame latency stays under this (default: the sampling "
                             "interval, window-seconds / T)")
    parser.add_argument("--max-p99-ms", type=float, default=None, help="also require this p99 (default: none)")
    parser.add_argument("--max-drop", type=float, default=0.02, help="largest share of sampled frames dropped")
    parser.add_argument("--colocate", action="store_true", help="run the capacity search with colocate_model=true")
    parser.add_argument("--ingress-replicas", type=int, default=min(4, (os.cpu_count() or 1) + 1),
                        help="ingress replicas of the capacity search (ServeConfig.ingress_replicas): processes "
                             "that share the streams' decoding, WebSockets and event loops; default one more "
                             "than cores, up to 4, as docs/serving.md advises for pulled streams (on 2 cores, 2 "
                             "replicas failed 320 pulled streams with exit, 3 sustained 352)")
    parser.add_argument("--high-throughput", action=argparse.BooleanOptionalAction, default=True,
                        help="Ray Serve's HAProxy ingress and gRPC handles (ServeConfig.high_throughput, the "
                             "default); --no-high-throughput: Serve's Python proxy and actor-call handles")
    parser.add_argument("--admission-wait", type=float, default=30.0,
                        help="pull: how long a stream refused by admission control (503) is asked for again "
                             "after the server's Retry-After, as stream_client.py does, before the trial counts it "
                             "refused (0: never)")
    parser.add_argument("--admission", action=argparse.BooleanOptionalAction, default=True,
                        help="admission control (ServeConfig.overload_window_s, on by default): a replica past "
                             "its capacity refuses new streams, and a trial with refused streams is not "
                             "sustained; --no-admission: every stream is admitted, to see how the server fails")
    parser.add_argument("--trace-model", action=argparse.BooleanOptionalAction, default=True,
                        help="the model's step as a TorchScript trace (ServeConfig.trace_model, the default), in "
                             "the server and the in-process baseline; --no-trace-model: eager")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--resolution", type=float, default=0.1,
                        help="stop bisecting the sustained N when the bracket is within this share of it")
    parser.add_argument("--quick", action="store_true",
                        help="short trials and a coarser search (20 %%): a few minutes, noisier numbers")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.latency_rounds < 1:
        parser.error("--latency-rounds must be at least 1")
    if args.quick:
        args.warmup, args.pull_warmup, args.duration, args.latency_duration = 3.0, 6.0, 5.0, 6.0
        args.resolution = max(args.resolution, 0.2)
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if args.source is None:
        own_domain = Path(__file__).resolve().parents[1] / "data" / "synthetic" / "manifest.csv"
        args.source = own_domain if own_domain.exists() else SHARED_VIDEOS / "demo.mp4"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t_start = time.time()

    from pipelines.registry import load_registered_model
    from pipelines.serve import ServeConfig, start
    from pipelines.serve.budgets import ExitCatalog
    from pipelines.serve.config import DEFAULT_TRACKING_URI, absolute_tracking_uri

    tracking = absolute_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    try:
        loaded = load_registered_model(args.model, tracking_uri=tracking)
    except Exception as error:  # noqa: BLE001
        log(f"serve_load: cannot load {args.model} from {tracking} ({error}); run `make demo` first")
        return 2
    T = loaded.num_frames
    args.sampling_interval = args.window_seconds / T
    if args.max_p50_ms is None:
        args.max_p50_ms = 1e3 * args.sampling_interval
    catalog = ExitCatalog.from_exits(loaded.exits, T)
    choice = catalog.resolve(args.budget)
    # What the budget costs in accuracy, as training measured it: the early-exit figures below are only
    # worth as much as the accuracy they keep.
    all_frames = max(catalog.points, key=lambda p: p.gflops or 0.0) if catalog.points else None
    accuracy_note = ""
    if choice.accuracy is not None and all_frames is not None and all_frames.accuracy is not None:
        accuracy_note = (f", test accuracy {choice.accuracy:.1%} against {all_frames.accuracy:.1%} with all frames"
                         + (f" (held-out {choice.heldout_accuracy:.1%}; auto allows {100 * catalog.auto_tolerance():.1f} "
                            f"points below the best held-out accuracy)" if choice.heldout_accuracy is not None else ""))
    step_gflops = float(loaded.model.flops_per_step(T)[0]) / 1e9
    log(f"model {args.model}: {loaded.method}, {len(loaded.classes)} classes, T={T}, {step_gflops:.4f} GFLOPs "
        f"per frame; budget {args.budget} -> "
        + (f"{choice.gflops:.4f} GFLOPs/window on the held-out split" if choice.gflops is not None else "all frames")
        + accuracy_note)
    content_labels: list[int | None] = []
    content = source_frames(args.source, args.fps, labels=content_labels)
    # Both transports show the same content, so their frames per window (the model's own saving) agree.
    media = {"jpeg": encode_frames(content, len(content), args.frame_size, args.fps),
             "ts": mpegts_bytes(content, args.fps, args.gop), "labels": content_labels}
    media["ts_start"] = first_frame_time(media["ts"][0])
    h, w = content[0].shape[:2]
    log(f"stream content: {args.source} ({len(content)} frames, {w}x{h}, {len(content) / args.fps:.0f} s looped)")
    log(f"push: {len(media['jpeg'])} JPEG frames, "
        f"{np.mean([len(f) for _, f in media['jpeg']]) / 1024:.1f} KiB each, {args.fps:g} fps per stream; "
        f"pull: H.264 in MPEG-TS over UDP at {args.fps:g} fps, a keyframe every {args.gop} frames, "
        f"{len(media['ts'][0]) / media['ts'][1] / 1024:.0f} KiB/s per stream")
    log(f"windows of {args.window_seconds:g} s: the model sees a frame every {args.window_seconds / T * 1e3:.0f} ms "
        f"(at most {T / args.window_seconds:.1f} steps/s per stream)")

    # The in-process baseline's best case: back to back, caches hot -- on this kind of machine the same
    # call is much faster that way than at a stream's pace, so the ratio against it is printed too. The
    # like-for-like baseline (paced as the stream) is measured in every latency round, beside the server.
    direct = direct_latency(loaded, media["jpeg"], T, 205, trace=args.trace_model)
    log(f"in-process: decode + transform + model.step (batch 1), back to back p50 {percentile(direct, 50):.2f} ms "
        f"p99 {percentile(direct, 99):.2f} ms")

    # A token, as a real deployment has one (and the high-throughput data plane requires it).
    token = secrets.token_urlsafe(16)
    HTTP.headers["Authorization"] = f"Bearer {token}"

    def serve_config(colocate: bool, prefix: str = "/") -> ServeConfig:
        replicas = args.ingress_replicas if prefix == "/" else 1
        return ServeConfig(port=args.port, model_uri=args.model, tracking_uri=tracking,
                           app_name="adastream-bench" + ("-colocated" if colocate else ""), route_prefix=prefix,
                           window_seconds=args.window_seconds, max_streams=4 * args.max_streams,
                           max_fps_in=10 * args.fps, api_requests_per_s=10000, api_burst=10000, idle_timeout_s=120,
                           emit="steps", colocate_model=colocate, auth_token=token,
                           ingress_replicas=replicas,
                           # Ray's logical CPUs (one per core here) must hold both layouts' replicas at
                           # once for the latency rounds, or the second layout never starts.
                           ingress_cpus=min(0.5, max(1, (os.cpu_count() or 2) - 1) / (args.ingress_replicas + 1)),
                           high_throughput="true" if args.high_throughput else "false", trace_model=args.trace_model,
                           overload_window_s=ServeConfig.overload_window_s if args.admission else 0.0)

    config = start(serve_config(args.colocate))
    base = config.url
    # Serve's proxy routes to a replica only once it has heard of it: until then every stream of the
    # first trials would land on one ingress replica.
    answering: set[str] = set()
    deadline = time.monotonic() + 120
    while len(answering) < args.ingress_replicas and time.monotonic() < deadline:
        answering.add(HTTP.get(base + "/v1/info", timeout=30).json()["replica"])
        time.sleep(0.1)
    if len(answering) < args.ingress_replicas:
        log(f"serve_load: only {len(answering)} of {args.ingress_replicas} ingress replicas answered within 2 min")
    info = HTTP.get(base + "/v1/info", timeout=30).json()
    log(f"serving at {base} ({'model in the ingress' if args.colocate else 'separate Recognizer'}, step "
        f"{info.get('model_runtime')}); {args.ingress_replicas} ingress replica(s), e.g. {info['replica']}; "
        f"recognizer {info['recognizer_replica']}")

    from ray import serve

    # Per-frame latency of one stream through both layouts (the separate Recognizer, and colocate_model:
    # the model inside the ingress, one hop less), side by side with the in-process baseline and the
    # no-op hop -- first, on the fresh server, as one camera on an idle server sees it. The capacity
    # searches follow, with the other layout and the probe gone; then one more trial of the main layout
    # shows whether the server came back from them as fast (a server that ran overloaded for minutes
    # may not: its forward pass took 11.6 ms after the twelfth set's searches, 4.4 in a fresh Recognizer).
    other = start(serve_config(not args.colocate, "/other"))
    serve.run(hop_probe_app(), name="adastream-bench-hop", route_prefix=None, blocking=False)
    main_layout, other_layout = ("colocated", "separate") if args.colocate else ("separate", "colocated")
    probe_request = _probe_request(loaded, media["jpeg"])
    log(f"one pushed stream, no exit, {args.latency_rounds} rounds (in-process paced, then "
        f"{main_layout}, {other_layout}, the no-op recognizer call):")

    trials: list[Trial] = []
    after_load: tuple[Trial, list[float]] | None = None

    async def run_all() -> tuple[list[LatencyRound], dict[str, Any]]:
        # One event loop for all of it: the probe's handle binds Serve's router to the loop it first
        # runs on, and a handle whose loop has ended logs an error at the next controller update.
        nonlocal after_load
        loop = asyncio.get_running_loop()
        try:
            rounds = await latency_rounds({main_layout: base, other_layout: other.url},
                                          serve.get_app_handle("adastream-bench-hop"), probe_request, loaded, args,
                                          media["jpeg"])
            for app in ("adastream-bench-hop", other.app_name):
                await loop.run_in_executor(None, serve.delete, app)
            out: dict[str, Any] = {}
            for transport in transports:
                for budget in (args.budget, "full"):
                    log(f"capacity, {transport}, budget {budget}:")
                    out[(transport, budget)] = await capacity(base, budget, transport, media, args, trials)
            if transports:
                await settle(base, replicas=args.ingress_replicas)
                paced_after = direct_latency(loaded, media["jpeg"], T,
                                             5 + int(args.latency_duration / args.sampling_interval),
                                             interval=args.sampling_interval, tick=1 / args.fps, trace=args.trace_model)
                after_load = (await single_stream_latency(base, media["jpeg"], args, "full"), paced_after)
                log(f"one pushed stream after the capacity searches ({main_layout}): "
                    f"{after_load[0].server_p50:.2f} ms, in-process paced {percentile(paced_after, 50):.2f} ms "
                    f"({after_load[0].server_p50 / percentile(paced_after, 50):.2f}x); forward pass "
                    f"{after_load[0].breakdown.get('model')} ms")
            return rounds, out
        finally:
            await serve.shutdown_async()

    rounds, results = asyncio.run(run_all())
    import ray

    ray.shutdown()
    for r in rounds:
        trials.extend(r.trials.values())
    paced = [v for r in rounds for v in r.paced]
    hop = [v for r in rounds for v in r.hop]
    pooled = {layout: [v for r in rounds for v in r.trials[layout].latencies] for layout in (main_layout, other_layout)}
    ratios = {layout: sorted(r.ratio(layout) for r in rounds) for layout in pooled}
    breakdown = {layout: {k: round(float(np.median([r.trials[layout].breakdown.get(k, float("nan")) for r in rounds])), 2)
                          for k in rounds[0].trials[layout].breakdown} for layout in pooled}
    server_p50 = {layout: percentile(v, 50) for layout, v in pooled.items()}
    server_p99 = {layout: percentile(v, 99) for layout, v in pooled.items()}
    latency_ratio = float(np.median(ratios["separate"]))
    colocated_ratio = float(np.median(ratios["colocated"]))
    best_ratio = server_p50["separate"] / percentile(direct, 50)
    colocated_best_ratio = server_p50["colocated"] / percentile(direct, 50)
    headline: dict[str, Any] = {"budget_gflops": choice.gflops, "budget_test_accuracy": choice.accuracy,
                                "all_frames_test_accuracy": all_frames.accuracy if all_frames else None}
    log("")
    for transport in transports:
        exit_best: Trial | None = results[(transport, args.budget)]
        full_best: Trial | None = results[(transport, "full")]
        n_exit = exit_best.streams if exit_best else 0
        n_full = full_best.streams if full_best else 0
        ratio = n_exit / n_full if n_full else (float("inf") if n_exit else float("nan"))
        log(f"{transport}: sustained streams {n_exit} with early exit (budget {args.budget}), {n_full} without "
            f"-> {ratio:.2f}x (goal >= 2x)")
        if exit_best:
            log(f"  at {n_exit} streams with exit: server frame latency p50 {exit_best.server_p50:.1f} ms, "
                f"p99 {exit_best.server_p99:.1f} ms; {exit_best.steps / max(exit_best.windows, 1):.2f} frames "
                f"per window ({exit_best.exits} of {exit_best.windows} windows exited early)"
                + (f"; {exit_best.decoded_share:.0%} of the frames received decoded"
                   if exit_best.decoded_share == exit_best.decoded_share else "")
                + (f"; readers dozed {exit_best.dozed_share:.0%} of the time"
                   if exit_best.dozed_share == exit_best.dozed_share else ""))
        if full_best:
            log(f"  at {n_full} streams without exit: p50 {full_best.server_p50:.1f} ms, p99 "
                f"{full_best.server_p99:.1f} ms; {full_best.steps / max(full_best.windows, 1):.2f} frames per window")
        if (exit_best and exit_best.windows_judged) or (full_best and full_best.windows_judged):
            # Early exit is only worth the accuracy it keeps: the same content, live, with and without.
            log("  live accuracy (final top-1 of the windows whose frames showed one video): "
                + ", ".join(f"{t.live_accuracy:.1%} of {t.windows_judged} windows {label}"
                            for label, t in (("with exit", exit_best), ("without", full_best)) if t))
            headline.update({f"{transport}_live_accuracy_{label}": round(t.live_accuracy, 4) if t else None
                             for label, t in (("exit", exit_best), ("full", full_best))})
        # CPU per stream where both budgets ran sustained, at about the same N (the one the no-exit search
        # reached): a capacity ratio that does not depend on what else the machine runs.
        common = min(n_exit, n_full)
        cpu: dict[str, Trial | None] = {}
        for b in (args.budget, "full"):
            candidates = [t for t in trials if t.transport == transport and t.budget == b and t.sustained]
            cpu[b] = min(candidates, key=lambda t: (abs(t.streams - common), -t.streams), default=None)
        exit_cpu, full_cpu = cpu[args.budget], cpu["full"]
        cpu_ratio = (full_cpu.cpu_ms_per_stream_s / exit_cpu.cpu_ms_per_stream_s) if exit_cpu and full_cpu \
            else float("nan")
        if exit_cpu and full_cpu:
            log(f"  server CPU per stream: {exit_cpu.cpu_ms_per_stream_s:.1f} ms/s with exit ({exit_cpu.streams} "
                f"streams), {full_cpu.cpu_ms_per_stream_s:.1f} ms/s without ({full_cpu.streams} streams) -> "
                f"{cpu_ratio:.2f}x the streams per core with early exit ({1e3 / exit_cpu.cpu_ms_per_stream_s:.0f} "
                f"vs {1e3 / full_cpu.cpu_ms_per_stream_s:.0f} per fully used core)")
            # Where it goes: early exit shrinks the per-step parts (model, recognizer, the ingress' share);
            # the sources' part is every frame's receiving and demuxing, and decoding up to the exit.
            for part in CPU_PARTS:
                log(f"    {part:10s} {exit_cpu.cpu_parts.get(part, float('nan')):6.2f} ms/s with exit, "
                    f"{full_cpu.cpu_parts.get(part, float('nan')):6.2f} without")
            headline.update({f"{transport}_cpu_{part}_{label}": t.cpu_parts.get(part) for part in ("sources", "model")
                             for label, t in (("exit", exit_cpu), ("full", full_cpu))})
        # The same at each budget's own capacity: at equal streams the exit budget runs its server less
        # loaded, with smaller batches and the replicas' fixed costs shared by fewer steps.
        at_capacity = float("nan")
        if exit_best and full_best and exit_best.cpu_ms_per_stream_s > 0 and full_best.cpu_ms_per_stream_s > 0:
            at_capacity = full_best.cpu_ms_per_stream_s / exit_best.cpu_ms_per_stream_s
            log(f"  at each one's capacity: {exit_best.cpu_ms_per_stream_s:.1f} ms/s with exit ({exit_best.streams} "
                f"streams), {full_best.cpu_ms_per_stream_s:.1f} without ({full_best.streams}) -> {at_capacity:.2f}x")
        # The model's own saving bounds the capacity ratio: per-frame work (decoding every frame of a
        # pulled stream, messages, events) does not shrink with exit, per-step work does.
        frames_ratio = float("nan")
        if exit_best and full_best and exit_best.steps and full_best.windows:
            frames_ratio = (full_best.steps / full_best.windows) / (exit_best.steps / max(exit_best.windows, 1))
            log(f"  the model's own saving: {frames_ratio:.2f}x fewer frames per window with exit; the server turned "
                f"it into {ratio:.2f}x the streams ({ratio / frames_ratio:.0%} of it)")
        headline.update({f"{transport}_streams_exit": n_exit, f"{transport}_streams_full": n_full,
                         f"{transport}_exit_vs_full": round(ratio, 3),
                         f"{transport}_frames_ratio": round(frames_ratio, 3),
                         f"{transport}_cpu_capacity_ratio": round(cpu_ratio, 3),
                         f"{transport}_cpu_ratio_at_capacity": round(at_capacity, 3),
                         f"{transport}_latency_p50_ms": round(exit_best.server_p50, 1) if exit_best else None,
                         f"{transport}_latency_p99_ms": round(exit_best.server_p99, 1) if exit_best else None})
        if transport == "pull" and exit_best:
            headline["pull_decoded_share_exit"] = round(exit_best.decoded_share, 3)
            headline["pull_dozed_share_exit"] = round(exit_best.dozed_share, 3)
    log(f"latency parts (p50, ms, median of the rounds): separate Recognizer {breakdown['separate']}; model in "
        f"the ingress {breakdown['colocated']}; in-process decode + step {percentile(paced, 50):.2f} paced, "
        f"{percentile(direct, 50):.2f} back to back")
    # Serve's own share: the latency over the work itself (decode + forward pass) as timed inside the
    # server -- immune to the forward pass running slower there because the machine is busy.
    work = {layout: breakdown[layout].get("decode", float("nan")) + breakdown[layout].get("model", float("nan"))
            for layout in pooled}
    log(f"Serve's overhead per frame: {server_p50['separate'] - work['separate']:.2f} ms with a separate Recognizer "
        f"({server_p50['separate'] / work['separate']:.2f}x the work), "
        f"{server_p50['colocated'] - work['colocated']:.2f} ms with the model in the ingress "
        f"({server_p50['colocated'] / work['colocated']:.2f}x); the call to a recognizer that does nothing takes "
        f"{percentile(hop, 50):.2f} ms (p99 {percentile(hop, 99):.2f}): "
        f"{1 + percentile(hop, 50) / percentile(paced, 50):.2f}x the in-process work is the floor of a separate "
        f"Recognizer here")
    log(f"per-frame latency, one stream, median of {len(rounds)} rounds' ratios (each round side by side): Serve "
        f"{latency_ratio:.2f}x in-process paced like the stream ({', '.join(f'{v:.2f}' for v in ratios['separate'])}; "
        f"goal <= 1.3x), with the model in the ingress {colocated_ratio:.2f}x "
        f"({', '.join(f'{v:.2f}' for v in ratios['colocated'])}). Pooled p50: Serve {server_p50['separate']:.2f} ms "
        f"(p99 {server_p99['separate']:.2f}), model in the ingress {server_p50['colocated']:.2f} ms "
        f"(p99 {server_p99['colocated']:.2f}), in-process paced {percentile(paced, 50):.2f} ms; against the "
        f"back-to-back best case ({percentile(direct, 50):.2f} ms): {best_ratio:.2f}x and {colocated_best_ratio:.2f}x. "
        f"Client round trip through the WebSocket p50 "
        f"{float(np.median([r.trials['separate'].client_p50 for r in rounds])):.2f} ms")
    log(f"total {time.time() - t_start:.0f} s on {os.cpu_count()} CPUs (load generators included)")
    headline.update({"serve_latency_ms": round(server_p50["separate"], 2),
                     "colocated_latency_ms": round(server_p50["colocated"], 2),
                     "paced_latency_ms": round(percentile(paced, 50), 2),
                     "direct_latency_ms": round(percentile(direct, 50), 2),
                     "noop_hop_ms": round(percentile(hop, 50), 2),
                     "serve_vs_work": round(server_p50["separate"] / work["separate"], 3),
                     "colocated_vs_work": round(server_p50["colocated"] / work["colocated"], 3),
                     "serve_vs_direct": round(best_ratio, 3), "colocated_vs_direct": round(colocated_best_ratio, 3),
                     "separate_floor_vs_paced": round(1 + percentile(hop, 50) / percentile(paced, 50), 3),
                     "serve_vs_paced": round(latency_ratio, 3), "serve_vs_paced_worst": round(ratios["separate"][-1], 3),
                     "colocated_vs_paced": round(colocated_ratio, 3),
                     "colocated_vs_paced_worst": round(ratios["colocated"][-1], 3)})
    if after_load:
        trials.append(after_load[0])
        headline[f"{main_layout}_vs_paced_after_load"] = round(after_load[0].server_p50 / percentile(after_load[1], 50), 3)
    if args.json:
        args.json.write_text(json.dumps({"headline": headline,
                                         "trials": [{k: v for k, v in t.__dict__.items() if k != "latencies"}
                                                    for t in trials],
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    log(" ".join(f"{k}={v}" for k, v in headline.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
