"""One live stream on the ingress: windows, the per-stream recurrent state, online early exit, events.

Frames arrive (pushed images, frames decoded from pushed MPEG-TS or from a pulled source) and are
*offered*; the :class:`~pipelines.serve.windows.Windower` admits the few the model should see and the
rest are dropped before any conversion. Admitted frames wait in a short queue (``queue_frames``; the
drop policy applies beyond it) for the stream's single worker task, which converts a frame, sends it
with the stream's state to the recognizer (``hub.step``: batched with other streams' frames there),
keeps the returned state, applies the exit rule for the stream's current budget and publishes a
``prediction`` event. Once the rule fires, the window is closed: none of its remaining frames is
converted or stepped -- that is the compute early exit saves -- until the next window starts fresh.
(Pushed images are not even decoded; video frames are, by the source's reader thread, whose
:class:`FrameGate` drops the ones the windows will not use before they reach the event loop.)

One worker per stream means at most one frame of a stream is in flight: the state of step t+1 needs
step t's, and it is what lets the recognizer batch streams without ever mixing two frames of one.

The state lives here, on the ingress, and travels with each request, so a recognizer replica that
dies costs a retry, not the stream. If the ingress replica dies, its streams' records in the
directory let the next replica pick them up; the window that was in progress restarts (there is an
explicit ``window_restarted`` event) because its state died with the replica.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from pipelines.serve.budgets import BudgetError, ExitCatalog, ExitChoice
from pipelines.serve.config import ServeConfig
from pipelines.serve.engine import StateArrays, StepRequest, StepResult
from pipelines.serve.events import EventLog
from pipelines.serve.frames import PayloadError
from pipelines.serve.windows import StreamClock, Windower, WindowSpec

logger = logging.getLogger(__name__)

PUSH = "push"
PULL = "pull"


class Hub(Protocol):
    """What a stream needs from its ingress replica."""

    config: ServeConfig
    catalog: ExitCatalog
    classes: list[str]
    step_macs: float

    async def step(self, request: StepRequest) -> StepResult: ...

    def default_choice(self) -> ExitChoice: ...

    def run_blocking(self, fn: Callable[[], Any]) -> "asyncio.Future[Any]": ...

    def changed(self, session: "StreamSession") -> None: ...


@dataclass
class StreamSettings:
    """Per-stream recognition settings (defaults from :class:`ServeConfig`)."""

    window: WindowSpec
    budget: str | None = None
    """Budget override; None follows the server-wide budget."""
    top_k: int = 3
    emit: str = "steps"
    drop_policy: str = "drop_oldest"
    queue_frames: int = 2
    fps: float | None = None
    """Declared frame rate of pushed images without timestamps: frame i is at i / fps seconds.
    None: their arrival time is their stream time."""

    def to_dict(self) -> dict[str, Any]:
        return {"window_frames": self.window.frames, "window_seconds": self.window.seconds, "budget": self.budget,
                "top_k": self.top_k, "emit": self.emit, "drop_policy": self.drop_policy,
                "queue_frames": self.queue_frames, "fps": self.fps}


@dataclass
class Pending:
    window: int
    slot: int
    frame_index: int
    stream_time: float
    pts: float | None  # the frame's own media timestamp (as the source/client gave it), if any
    received: float  # time.monotonic() when the frame arrived
    produce: Callable[[], np.ndarray] | np.ndarray
    """The model's input, uint8 [crop, crop, 3]: made already (decoded sources), or made by this
    callable in a worker thread (pushed images)."""
    timing: dict[str, float] | None = None  # latency breakdown, filled in by the worker
    handover: "Handover | None" = None
    """The source reader's token for this frame, decided once the worker is done with it."""

    def decided(self) -> None:
        """The stream is done with this frame: its reader may decode on (:class:`Handover`)."""
        if self.handover is not None:
            self.handover.decided = True


@dataclass
class Counters:
    frames_received: int = 0
    frames_sampled: int = 0
    steps: int = 0
    windows: int = 0
    """Windows begun (their first frame stepped)."""
    windows_done: int = 0
    """Windows that published their final result (exit, all T frames, or cut short); with
    ``steps_done``, the steps those windows took, a rate over an interval gives frames per window
    without counting windows that straddle the interval's ends."""
    steps_done: int = 0
    exits: int = 0
    restarts: int = 0
    retries: int = 0
    errors: int = 0
    skipped_after_exit: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    gflops_spent: float = 0.0
    gflops_saved: float = 0.0

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    @property
    def frames_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {"frames_received": self.frames_received, "frames_sampled": self.frames_sampled,
                "steps": self.steps, "windows": self.windows, "windows_done": self.windows_done,
                "steps_done": self.steps_done, "exits": self.exits, "restarts": self.restarts,
                "retries": self.retries, "errors": self.errors, "skipped_after_exit": self.skipped_after_exit,
                "frames_dropped": self.frames_dropped, "dropped": dict(self.dropped),
                "gflops_spent": round(self.gflops_spent, 6), "gflops_saved": round(self.gflops_saved, 6)}


class RateMeter:
    """Events per second over a sliding window (for per-stream fps)."""

    def __init__(self, horizon: float = 2.0) -> None:
        self.horizon = horizon
        self.ticks: deque[tuple[float, int]] = deque()  # (time, events counted at that time)
        self.total = 0  # events in ``ticks``

    def tick(self, now: float, count: int = 1) -> None:
        """``count`` events up to ``now`` (more than one: events counted in bulk, e.g. frames a source
        reader skipped since its last report)."""
        self.ticks.append((now, count))
        self.total += count
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self.ticks and self.ticks[0][0] < now - self.horizon:
            self.total -= self.ticks.popleft()[1]

    def rate(self, now: float | None = None) -> float:
        self._trim(time.monotonic() if now is None else now)
        if len(self.ticks) < 2:
            return 0.0
        # The first tick's events happened before the span measured from it.
        return (self.total - self.ticks[0][1]) / max(self.ticks[-1][0] - self.ticks[0][0], 1e-6)


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class StepFailed(RuntimeError):
    pass


def _retriable(error: BaseException) -> bool:
    """Errors that mean "this replica is gone or busy", after which the same request can be resent."""
    import ray.exceptions as rex

    if isinstance(error, (asyncio.TimeoutError, TimeoutError, ConnectionError)):
        return True
    if isinstance(error, rex.RayTaskError):
        return isinstance(getattr(error, "cause", None), (rex.RayActorError, rex.ActorUnavailableError))
    if isinstance(error, (rex.RayActorError, rex.ActorUnavailableError, rex.ObjectLostError)):
        return True
    try:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

        return isinstance(error, (BackPressureError, DeploymentUnavailableError, RayServeException))
    except ImportError:  # pragma: no cover
        return False


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - float(np.max(logits))
    e = np.exp(z)
    return e / e.sum()


class StreamSession:
    """A stream's windows, state and counters on this ingress replica (see module docstring)."""

    def __init__(self, hub: Hub, stream_id: str, kind: str, settings: StreamSettings, *,
                 source: dict[str, Any] | None = None, resume: dict[str, Any] | None = None) -> None:
        """``source``: the pull request's body (``{"source": url, ...}``); ``resume``: the directory's
        record of this stream when another replica served it before (numbering continues from it)."""
        self.hub = hub
        self.id = stream_id
        self.kind = kind
        self.settings = settings
        self.source = source or {}
        self.created = time.time()
        self.status = "starting"
        self.status_message = ""
        self.counters = Counters()
        self.events = EventLog(stream_id, hub.config.event_buffer)
        # Event numbers continue across replicas, so an SSE client's Last-Event-ID stays meaningful.
        self.events.seq = int((resume or {}).get("seq", 0))
        self.first_seq = self.events.seq
        self.clock = StreamClock(max_gap=5.0)
        self.timestamped = False  # the latest frame carried its own timestamp (next_pts is in those)
        self.arrival_clock = StreamClock(max_gap=math.inf)
        self.fps_in = RateMeter()
        self.fps_model = RateMeter()
        self.latencies: deque[tuple[float, float]] = deque(maxlen=4096)  # (monotonic time, ms)
        self.new_latencies: list[float] = []  # not yet published as metrics
        self.last_activity = time.monotonic()
        self.connected = False  # a push client is attached (or a pull source is being read)
        self.closed = False
        self.frame_offset = 0  # frame indices continue across an ingress restart
        # (media time of the last frame offered, media time from which frames are wanted): read by
        # source reader threads (FrameGate) without a lock -- the tuple is replaced, never mutated.
        self.skip_hint: tuple[float, float] | None = None
        self._last_media: float | None = None

        self._override: ExitChoice | None = None
        if settings.budget is not None:
            self._override = hub.catalog.resolve(settings.budget)  # raises BudgetError (-> 422)

        # Window processing state (owned by the worker task).
        first_window, restarted = self._resume_point(resume)
        self.windower = Windower(settings.window, first_window)
        self.window = first_window - 1
        self.window_steps = 0
        self.window_macs = 0.0
        self.window_final = True
        self.state: StateArrays | None = None
        self.last_prediction: dict[str, Any] | None = None
        # The last window result ({"seq", "fields"}): kept in the directory record, so a client whose
        # connection died before that event reached it gets it again from the next replica.
        self.last_final: dict[str, Any] | None = (resume or {}).get("last_final")

        self.pending: deque[Pending] = deque()
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._in_step = False
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"stream-{stream_id}")
        self.on_close: list[Callable[["StreamSession"], None]] = []

        self.events.publish("stream_started", kind=kind, window_frames=settings.window.frames,
                            window_seconds=settings.window.seconds, budget=self.choice.to_dict(),
                            source=self.source.get("source"), resumed=resume is not None)
        if restarted is not None:
            self.counters.restarts += 1
            self.events.publish("window_restarted", window=restarted["window"], lost_steps=restarted["steps"],
                                reason="the replica serving this stream was lost; the window's recurrent "
                                       "state is re-created from scratch")
        client_after = (resume or {}).get("client_after")
        if self.last_final and client_after is not None and client_after < self.last_final["seq"]:
            # The previous replica published this window's result, but the client never saw it.
            self.events.publish("prediction", **dict(self.last_final["fields"], replayed=True))

    # ------------------------------------------------------------------ resumption
    def _resume_point(self, record: dict[str, Any] | None) -> tuple[int, dict | None]:
        """(first window index, the record of a window that has to restart or None)."""
        if not record:
            return 0, None
        self.frame_offset = int(record.get("frames", 0))
        last_time = record.get("stream_time")
        if last_time is not None:
            self.clock.continue_from(float(last_time))
        window = int(record.get("window", -1))
        if window < 0:
            return 0, None
        if not record.get("final", False):
            # The window was in progress (the record may be a moment behind on its steps): its
            # recurrent state died with the replica, so it starts again from its first frame.
            return window, {"window": window, "steps": int(record.get("steps", 0))}
        return window + 1, None

    def count_left_out(self, frames: int, last_media: float | None = None) -> None:
        """Frames a source reader left out on its own (not decoded, :class:`FrameGate`): received all
        the same, so the counters, the input fps, the idle timer and the stream's clock (``last_media``:
        the media time of the last of them) stay current."""
        if last_media is not None and self.timestamped:
            self.clock(last_media)
        now = time.monotonic()
        self.counters.frames_received += frames
        self.fps_in.tick(now, frames)
        self.last_activity = now

    def count_behind(self, seconds: float, behind_s: float, source_fps: float) -> None:
        """The source reader skipped ``seconds`` of its live source to catch up with it, having fallen
        up to ``behind_s`` behind (:class:`~pipelines.serve.sources.CatchUp`). Its frames were counted as
        received (left out); the sampling slots they held are counted as sampled and dropped for want
        of compute (``behind_source``), whether or not their windows would have exited before them."""
        interval = self.windower.spec.interval
        slots = max(1, round(seconds / interval if interval > 0 else seconds * source_fps))
        self.counters.frames_sampled += slots
        self.counters.drop("behind_source", slots)
        if not self.closed:
            self.events.publish("warning", code="behind_source", skipped_s=round(seconds, 2),
                                behind_s=round(behind_s, 2),
                                message=f"the server fell {behind_s:.1f} s behind the source and skipped "
                                        f"{seconds:.1f} s of it to catch up")

    # ------------------------------------------------------------------ budget
    @property
    def choice(self) -> ExitChoice:
        return self._override if self._override is not None else self.hub.default_choice()

    def set_budget(self, budget: str | None) -> ExitChoice:
        """Per-stream budget (None: follow the server's). Applies from the next frame; raises BudgetError."""
        self._override = None if budget is None else self.hub.catalog.resolve(budget)
        self.settings.budget = budget
        self.events.publish("budget_changed", budget=self.choice.to_dict(), scope="stream")
        self.hub.changed(self)
        return self.choice

    # ------------------------------------------------------------------ frames in
    def stream_time(self, media_time: float | None, index: int) -> float:
        if media_time is not None:
            return self.clock(media_time)
        if self.settings.fps:
            return self.clock(index / self.settings.fps)
        return self.arrival_clock(time.monotonic())

    def offer(self, produce: Callable[[], np.ndarray] | np.ndarray, media_time: float | None = None,
              received: float | None = None, *, skipped: int = 0, previous_media: float | None = None,
              handover: "Handover | None" = None) -> bool:
        """A frame arrived; returns True if the model will see it (it was admitted and queued).

        ``produce``: the model's input (:attr:`Pending.produce`), or what makes it once the model is to
        see the frame; ``skipped``: frames a source reader left out just before this one
        (:class:`FrameGate`), counted here; ``previous_media``: the media time of the frame just before
        this one, if it was left out; ``handover``: the reader's token for this frame, decided once the
        stream knows which frames it wants after it (at once, unless the frame is queued)."""
        queued = self._offer(produce, media_time, received, skipped, previous_media, handover)
        if not queued and handover is not None:
            handover.decided = True
        return queued

    def _offer(self, produce: Callable[[], np.ndarray] | np.ndarray, media_time: float | None, received: float | None,
               skipped: int, previous_media: float | None, handover: "Handover | None") -> bool:
        now = time.monotonic()
        received = now if received is None else received
        self.counters.frames_received += skipped
        index = self.frame_offset + self.counters.frames_received
        self.counters.frames_received += 1
        self.last_activity = now
        self.fps_in.tick(now, 1 + skipped)
        if self.closed:
            return False
        previous = None
        if previous_media is not None and media_time is not None:
            # The clock runs through the frames left out too: a timestamp reset right after some (a
            # source that loops or restarts) then continues one frame after the last frame received,
            # not the last one offered -- which would shift every later window off the source's
            # keyframes, and a KeyframeSkipper could leave out nothing any more.
            previous = self.clock(previous_media)
        t = self.stream_time(media_time, index)
        self.timestamped = media_time is not None
        admission = self.windower.admit(t, previous if previous is not None and previous < t else None)
        self._last_media = media_time
        self._refresh_skip_hint()
        if admission is None:
            return False
        self.counters.frames_sampled += 1
        if len(self.pending) >= self.settings.queue_frames and self.settings.drop_policy != "block":
            if self.settings.drop_policy == "drop_newest":
                self.counters.drop("queue_full")
                return False
            self.pending.popleft().decided()  # drop_oldest: stay live
            self.counters.drop("queue_full")
        self.pending.append(Pending(admission.window, admission.slot, index, t, media_time, received, produce,
                                    handover=handover))
        self._drained.clear()
        if len(self.pending) >= self.settings.queue_frames:
            self._room.clear()
        self._wakeup.set()
        return True

    @property
    def busy(self) -> bool:
        """Frames are waiting or being stepped: the stream is not idle, whatever its source does
        (a blocked client, a recognizer being replaced)."""
        return bool(self.pending) or self._in_step

    def has_room(self) -> bool:
        return len(self.pending) < self.settings.queue_frames

    async def wait_for_room(self) -> None:
        while not self.has_room() and not self.closed:
            self._room.clear()
            await self._room.wait()

    # ------------------------------------------------------------------ worker
    async def _run(self) -> None:
        try:
            while not self.closed:
                while not self.pending and not self.closed:
                    self._drained.set()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                if self.closed:
                    break
                item = self.pending.popleft()
                self._room.set()
                self._in_step = True
                try:
                    await self._process(item)
                finally:
                    self._in_step = False
                    self.last_activity = time.monotonic()
                    item.decided()  # after the skip hint took in the step's result
        except asyncio.CancelledError:
            pass
        except Exception:  # pragma: no cover - a bug; keep the replica serving the other streams
            logger.exception("stream %s: worker failed", self.id)
            self.events.publish("error", code="internal_error", message="the stream's worker failed")
            self.status = "failed"

    async def _process(self, item: Pending) -> None:
        if item.window != self.window:
            self._end_window("duration")
            self._begin_window(item.window)
        if self.window_final:
            self.counters.skipped_after_exit += 1  # queued before the exit was known
            return
        picked = time.monotonic()
        try:
            produce = item.produce
            image = produce if isinstance(produce, np.ndarray) else await self.hub.run_blocking(produce)
        except PayloadError as error:
            self.counters.drop("malformed")
            self.counters.errors += 1
            self.events.publish("error", code=error.code, message=str(error), frame_index=item.frame_index)
            return
        decoded = time.monotonic()
        request = StepRequest(self.id, image, self.state)
        sent_wall = time.time()
        try:
            result = await self._step(request)
        except StepFailed as error:
            self.counters.errors += 1
            self.events.publish("error", code="recognizer_failed", window=self.window,
                                message=f"the recognizer failed on this window ({error}); the next window "
                                        f"starts fresh")
            self.window_final = True
            self.windower.close(self.window)
            self._refresh_skip_hint()
            self.hub.changed(self)
            return
        if self.closed:
            return  # the stream was closed while the step ran: nothing is published after stream_ended
        # Where a frame's latency went: waiting for the stream's worker, decode + transform, the step
        # (batching, the trip to the recognizer and back, the forward pass), of which the forward pass,
        # and of which the way there: handing over -> the pass began (router, gRPC, the batch queue),
        # and of that the transport alone: handing over -> the recognizer received it (the two
        # processes' wall clocks, so exact when they share a machine).
        item.timing = {"queue": round(1e3 * (picked - item.received), 2), "decode": round(1e3 * (decoded - picked), 2),
                       "step": round(1e3 * (time.monotonic() - decoded), 2),
                       "model": result.extra.get("compute_ms"),
                       "send": round(1e3 * (result.extra["began"] - sent_wall), 2) if "began" in result.extra else None,
                       "transport": round(1e3 * (result.extra["received"] - sent_wall), 2) if "received" in result.extra else None}
        self._after_step(item, result)

    async def _step(self, request: StepRequest) -> StepResult:
        config = self.hub.config
        deadline = time.monotonic() + config.failover_timeout_s
        attempt = 0
        while True:
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for returns a result that arrives
                # together with a cancellation and drops the cancellation.
                async with asyncio.timeout(config.step_timeout_s):
                    return await self.hub.step(request)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - classified below
                if not _retriable(error) or time.monotonic() > deadline or self.closed:
                    raise StepFailed(f"{type(error).__name__}: {error}") from error
                attempt += 1
                self.counters.retries += 1
                if attempt == 1:
                    self.events.publish("warning", code="recognizer_unavailable",
                                        message=f"recognizer replica unavailable ({type(error).__name__}); "
                                                f"resending the frame with the stream's state")
                await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))

    def _begin_window(self, window: int) -> None:
        self.window = window
        self.window_steps = 0
        self.window_macs = 0.0
        self.window_final = False
        self.state = None  # every window starts from the model's initial state
        self.last_prediction = None
        self.counters.windows += 1
        self.hub.changed(self)

    def _end_window(self, reason: str) -> None:
        """Close a window whose frames stopped before T steps or an exit (its time ran out, the stream
        ended): publish its result -- the last prediction -- as final."""
        if self.window_final or self.window_steps == 0 or self.last_prediction is None:
            self.window_final = True
            return
        self.window_final = True
        self._count_done()
        final = dict(self.last_prediction, final=True, exited=False, reason=reason, latency_ms=None, timing_ms=None)
        event = self.events.publish("prediction", **final)
        self.last_final = {"seq": event.seq, "fields": final}
        self.hub.changed(self)

    def _count_done(self) -> None:
        self.counters.windows_done += 1
        self.counters.steps_done += self.window_steps

    def _after_step(self, item: Pending, result: StepResult) -> None:
        now = time.monotonic()
        self.state = result.state
        self.window_steps += 1
        self.window_macs += result.macs
        self.counters.steps += 1
        self.counters.gflops_spent += result.macs / 1e9
        self.fps_model.tick(now)
        step = self.window_steps - 1
        choice = self.choice
        frames = self.settings.window.frames
        policy = choice.policy(frames)
        probs = softmax(result.logits)
        exited = policy.exits(result.logits, step) and self.window_steps < frames
        final = exited or self.window_steps >= frames
        reason = ("exit" if exited else "frames") if final else None
        if final:
            self.window_final = True
            self._count_done()
            self.windower.close(item.window)
            self._refresh_skip_hint()
            if exited:
                self.counters.exits += 1
                saved = (frames - self.window_steps) * self.hub.step_macs / 1e9
                self.counters.gflops_saved += saved
            self.state = None
            self.hub.changed(self)
        latency = (now - item.received) * 1e3
        self.latencies.append((now, latency))
        self.new_latencies.append(latency)
        k = min(self.settings.top_k, probs.shape[0])
        top = np.argsort(-probs)[:k]
        classes = self.hub.classes
        prediction = {
            "window": item.window, "step": step, "frame_index": item.frame_index,
            "stream_time": round(item.stream_time, 3),
            "pts": None if item.pts is None else round(item.pts, 4),
            "top_k": [{"label": classes[i] if i < len(classes) else str(i), "index": int(i),
                       "prob": round(float(probs[i]), 5)} for i in top],
            "exited": exited, "final": final, "reason": reason, "box": result.box,
            "gflops": round(self.window_macs / 1e9, 6), "stream_gflops": round(self.counters.gflops_spent, 6),
            "budget": choice.budget, "latency_ms": round(latency, 2), "timing_ms": item.timing,
            "batch_size": result.batch_size, "next_pts": self.next_wanted_pts(),
        }
        self.last_prediction = prediction
        if self.settings.emit == "steps" or final:
            event = self.events.publish("prediction", **prediction)
            if final:
                self.last_final = {"seq": event.seq, "fields": prediction}

    def next_wanted_pts(self) -> float | None:
        """The media timestamp from which the next frame will be used (see ``Windower.wanted_from``), in
        the timestamps the source sends; None if unknown (frames without timestamps, frame-count
        windows)."""
        t = self.windower.wanted_from()
        offset = self.clock.offset
        if t is None or offset is None or not self.timestamped:
            return None  # stream time from arrival or frame counts: a client could not match it
        return round(t - offset, 4)

    def _refresh_skip_hint(self) -> None:
        """Tell this stream's source reader which frames it may leave out (:class:`FrameGate`)."""
        wanted = self.next_wanted_pts()
        last = self._last_media
        self.skip_hint = None if wanted is None or last is None else (last, wanted)

    # ------------------------------------------------------------------ lifecycle
    def set_status(self, status: str, message: str = "") -> None:
        self.status, self.status_message = status, message
        self.hub.changed(self)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every queued frame has been processed."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    WORKER_STOP_S = 5.0

    async def close(self, reason: str, status: str = "ended") -> None:
        """End the stream: finish the current window, publish ``stream_ended``, stop the worker."""
        if self.closed:
            return
        self.closed = True
        self._worker.cancel()
        # The worker also checks ``closed`` whenever it wakes: a cancellation lost somewhere in the
        # libraries under a step (seen under load: the worker went back to waiting for frames, and a
        # DELETE waited for it for ever) still ends it. And a DELETE never waits long for it.
        self._wakeup.set()
        interrupted = False
        try:
            done, _ = await asyncio.wait({self._worker}, timeout=self.WORKER_STOP_S)
            if not done:
                logger.warning("stream %s: its worker did not stop within %.0f s; closing without it", self.id,
                               self.WORKER_STOP_S)
        except asyncio.CancelledError:
            interrupted = True  # whoever closes went away (a DELETE's client): close all the same, then say so
        for item in self.pending:
            item.decided()
        self._end_window("end")
        if self.status not in ("failed",):
            self.status = status
        self.status_message = self.status_message or reason
        self.events.publish("stream_ended", reason=reason, status=self.status, counters=self.counters.to_dict())
        self.events.end()
        self._room.set()
        for callback in self.on_close:
            callback(self)
        if interrupted:
            raise asyncio.CancelledError

    # ------------------------------------------------------------------ reporting
    LATENCY_HORIZON_S = 10.0

    def latency_percentiles(self) -> dict[str, float | None]:
        """p50/p99 frame latency (arrival -> event) over the last 10 s of results: what the stream
        experiences now, not an average over its whole life. Results older than that are forgotten
        here. Called for every stream every second (metrics, the directory's records), so it is plain
        Python over the few dozen values of the horizon: ``np.percentile`` costs more than that in
        overhead alone."""
        since = time.monotonic() - self.LATENCY_HORIZON_S
        while self.latencies and self.latencies[0][0] < since:
            self.latencies.popleft()
        if not self.latencies:
            return {"p50": None, "p99": None, "count": 0}
        values = sorted(ms for _, ms in self.latencies)
        return {"p50": round(_quantile(values, 0.50), 2), "p99": round(_quantile(values, 0.99), 2),
                "count": len(values)}

    def summary(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "stream_id": self.id, "kind": self.kind, "status": self.status, "message": self.status_message,
            "connected": self.connected, "source": self.source.get("source"), "created": round(self.created, 3),
            "idle_s": round(now - self.last_activity, 3), "settings": self.settings.to_dict(),
            "budget": self.choice.to_dict(), "window": self.window, "window_steps": self.window_steps,
            "fps_in": round(self.fps_in.rate(now), 2), "fps_model": round(self.fps_model.rate(now), 2),
            "latency_ms": self.latency_percentiles(), "counters": self.counters.to_dict(),
            "events": {"last_seq": self.events.seq}, "as_of": round(time.time(), 3),
        }

    def record(self, owner: str) -> dict[str, Any]:
        """What the directory keeps so another replica can take the stream over."""
        return {"stream_id": self.id, "kind": self.kind, "owner": owner, "source": self.source,
                "settings": self.settings.to_dict(), "window": self.window, "steps": self.window_steps,
                "final": self.window_final, "frames": self.frame_offset + self.counters.frames_received,
                "stream_time": self.clock.last, "status": self.status, "message": self.status_message,
                "connected": self.connected, "counters": self.counters.to_dict(), "updated": time.time(),
                "closed": self.closed, "last_final": self.last_final,
                # For GET /v1/streams answered by another replica:
                "latency_ms": self.latency_percentiles(), "fps_in": round(self.fps_in.rate(time.monotonic()), 2)}


class Handover:
    """A frame a source reader handed to its stream (:class:`FrameGate`), ``decided`` once the stream
    knows which frames it wants after it -- when its step's result is in (an exit, or the next slot), or
    at once for a frame the windows do not use. Until then the reader holds the packets that follow
    undecoded (:meth:`~pipelines.serve.sources.SourceReader._packets`). Set on the event loop, read by
    the reader thread: a plain flag, set after the skip hint."""

    __slots__ = ("decided",)

    def __init__(self) -> None:
        self.decided = False


class FrameGate:
    """Lets a source reader thread leave out the frames its stream will not use, without a trip to the
    event loop for each one.

    At 25 fps and 8 frames per 2 s window the model uses 4 frames a second -- after an early exit none
    until the next window -- yet a decoder hands over all 25 (H.264 frames depend on each other, so
    every one is decoded). Each would wake the event loop that serves every stream, only for the
    window logic to count and drop it. The session publishes ``skip_hint`` after every frame offered
    and every exit: (the media time of the last frame it was offered, the media time from which it
    wants frames again -- its ``next_pts``). Frames strictly between the two
    are counted here and reported with the next frame that goes through, with the timestamp of the
    frame just before it (the windower estimates the source's frame interval from it).

    Always go through: frames without a timestamp, frames at or before the last one offered (a
    timestamp reset or a discontinuity: the session's clock sorts them out), and one frame every
    ``HEARTBEAT_S`` whatever the hint (the stream's counters, fps and idle timer stay current). A
    hint a few frames stale only lets more through. Used by one reader thread only.
    """

    HEARTBEAT_S = 0.5

    def __init__(self, session: "StreamSession") -> None:
        self.session = session
        self.handover: Handover | None = None
        """The last frame passed that the stream may use."""
        self.skipped = 0
        self.last_media: float | None = None  # the last frame seen, left out or not
        self.last_left_out = False  # whether that frame was left out
        self.passed_at = -math.inf
        self.passed_media: float | None = None  # media time of the last frame through or count reported

    def check(self, media_time: float | None, now: float) -> tuple[int, float | None, Handover | None] | None:
        """None: leave this frame out (it is counted). Otherwise (frames left out since the last one
        that went through, the media time of the frame just before this one if it was left out, the
        frame's :class:`Handover` if the stream may use it -- None for a heartbeat)."""
        hint = self.session.skip_hint
        before, self.last_media = self.last_media, media_time
        after_left_out, self.last_left_out = self.last_left_out, True
        unwanted = hint is not None and media_time is not None and hint[0] < media_time < hint[1]
        if unwanted and now - self.passed_at < self.HEARTBEAT_S:
            self.skipped += 1
            return None
        self.passed_at, self.passed_media = now, media_time
        self.last_left_out = False
        skipped, self.skipped = self.skipped, 0
        if not unwanted:
            self.handover = Handover()
        return skipped, (before if after_left_out else None), None if unwanted else self.handover

    def awaited(self) -> Handover | None:
        """The last frame passed the stream may use, while its decision is not in (None otherwise)."""
        handover = self.handover
        return handover if handover is not None and not handover.decided else None

    def leave_out(self, media_time: float | None, now: float) -> int:
        """A frame left out before decoding (:class:`~pipelines.serve.sources.KeyframeSkipper`): counted
        like the frames this gate leaves out. No frame goes through while packets are left undecoded,
        so once per heartbeat this returns the frames left out so far (and forgets them) for the reader
        to report on their own; 0 otherwise. The heartbeat is in media time too: a reader that dozed
        (:class:`~pipelines.serve.sources.Dozer`) reads a second or more of packets at once on waking,
        which would otherwise wait uncounted until the next frame goes through."""
        self.skipped += 1
        self.last_media, self.last_left_out = media_time, True
        by_media = (media_time is not None and self.passed_media is not None
                    and media_time - self.passed_media >= self.HEARTBEAT_S)
        if now - self.passed_at < self.HEARTBEAT_S and not by_media:
            return 0
        self.passed_at, self.passed_media = now, media_time
        return self.flush()

    def flush(self) -> int:
        """Frames left out and not reported yet (when the source ends or reconnects)."""
        skipped, self.skipped = self.skipped, 0
        return skipped


def _quantile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolated linearly between the closest ranks (as
    ``np.percentile``'s default does)."""
    position = q * (len(ordered) - 1)
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def parse_settings(config: ServeConfig, num_frames: int, *, window_frames: int | None = None,
                   window_seconds: float | None = None, budget: str | float | None = None, top_k: int | None = None,
                   emit: str | None = None, drop_policy: str | None = None, fps: float | None = None) -> StreamSettings:
    """Per-stream settings from request parameters over the server defaults; raises ValueError."""
    frames = window_frames if window_frames is not None else (config.window_frames or num_frames)
    seconds = window_seconds if window_seconds is not None else config.window_seconds
    if frames <= 0 or frames > 4 * num_frames:
        raise ValueError(f"window_frames must be in 1..{4 * num_frames} (the model was trained on {num_frames})")
    if seconds < 0 or seconds > 3600:
        raise ValueError("window_seconds must be in 0..3600")
    emit = emit or config.emit
    if emit not in ("steps", "windows"):
        raise ValueError("emit must be 'steps' or 'windows'")
    drop_policy = drop_policy or config.drop_policy
    if drop_policy not in ("drop_oldest", "drop_newest", "block"):
        raise ValueError("drop_policy must be drop_oldest, drop_newest or block")
    top_k = top_k if top_k is not None else config.top_k
    if not 1 <= top_k <= 100:
        raise ValueError("top_k must be in 1..100")
    if fps is not None and not 0 < fps <= 1000:
        raise ValueError("fps must be in (0, 1000]")
    return StreamSettings(window=WindowSpec(int(frames), float(seconds)),
                          budget=None if budget is None else str(budget), top_k=int(top_k), emit=emit,
                          drop_policy=drop_policy, queue_frames=config.queue_frames, fps=fps)


__all__ = ["StreamSession", "StreamSettings", "FrameGate", "Handover", "parse_settings", "Hub", "PUSH", "PULL",
           "BudgetError", "TokenBucket", "RateMeter"]
