"""The ``Ingress`` deployment: the HTTP / WebSocket API (FastAPI), stream sessions, limits and auth.

Endpoints (all under the app's route prefix; OpenAPI at ``/openapi.json``, docs at ``/docs``):

=======================================  =====================================================================
``WS   /v1/streams/{id}/ws``             push: JPEG/PNG frames or H.264-in-MPEG-TS chunks in, JSON events out
``POST /v1/streams``                     pull: open a source URL (udp/tcp MPEG-TS, http(s) files, HLS, rtsp, files)
``GET  /v1/streams``                     every stream, with status and counters
``GET  /v1/streams/{id}``                one stream
``PATCH /v1/streams/{id}``               change its budget (or top-k / emit) while it runs
``GET  /v1/streams/{id}/events``         server-sent events (``Last-Event-ID`` replays recent ones)
``DELETE /v1/streams/{id}``              stop it
``GET|PUT /v1/budget``                   the server-wide default budget (changes apply at once, no reload)
``GET  /v1/info``                        the model, its budgets, the limits
``GET  /healthz``                        liveness (no token)
=======================================  =====================================================================

WebSocket close codes: 1000 normal (stream ended), 1009 message too big, 1013 too many streams or the
replica is overloaded (try again later), 4400 bad request (bad id / parameters / too many malformed
frames), 4401 missing or wrong token, 4408 evicted after the idle timeout, 4409 replaced by a newer
connection for the same stream (or the id is a pull stream), 4429 frame rate far above the limit.
HTTP: 401, 404, 409, 413, 422, 429, 503 (overloaded, with ``Retry-After``) with a JSON ``detail``.

Everything a stream does happens in its :class:`~pipelines.serve.stream.StreamSession`; this module
wires transports to sessions and enforces the limits before any work is spent.

(No ``from __future__ import annotations`` here: FastAPI must see the real parameter types of the
class-based routes Serve rewrites, e.g. ``websocket: WebSocket``.)
"""


import asyncio
import hmac
import json
import logging
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

import av
import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipelines.serve.budgets import BudgetError, ExitCatalog, ExitChoice
from pipelines.serve.config import ConfigError, ServeConfig
from pipelines.serve.engine import StepBatcher, StepRequest, StepResult
from pipelines.serve.events import Event, Subscriber
from pipelines.serve.frames import (MPEGTS, FrameTransform, ImageDecoder, PayloadError, Preprocess,
                                    image_dimensions, parse_message)
from pipelines.serve.overload import OverloadGuard
from pipelines.serve.sources import (ChunkPipe, KeyframeSkipper, SourceFrame, SourceOptions, SourceReader,
                                     open_pipe, open_url, receive_buffer_bytes)
from pipelines.serve.stream import PULL, PUSH, FrameGate, Handover, StreamSession, TokenBucket, parse_settings

logger = logging.getLogger("ray.serve")

CLOSE_NORMAL = 1000
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_IDLE = 4408
CLOSE_CONFLICT = 4409
CLOSE_RATE_LIMITED = 4429

STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

api = FastAPI(
    title="AdaStream live recognition",
    version="1.0",
    description="Adaptive video recognition on live streams: AdaFocusV2 with online early exit, served by Ray "
                "Serve. Push frames over WebSocket or let the server pull a source; predictions come back as "
                "JSON events (WebSocket or server-sent events). See docs/serving.md.",
)
bearer = HTTPBearer(auto_error=False, description="The server's token (required when it listens beyond loopback)")


# ----------------------------------------------------------------------------------------- schemas
class BudgetBody(BaseModel):
    budget: str | float | None = Field(
        None, description="GFLOPs per window, 'full' (no early exit), 'min', 'auto'; null: the server default",
        examples=["auto", 0.05, "full"])


class StreamCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field(..., description="A URL PyAV/FFmpeg can open: udp://, tcp://, rtsp://, http(s):// "
                                         "(files and HLS .m3u8), or a server-side path",
                        examples=["udp://127.0.0.1:5000", "https://example.com/live/index.m3u8"])
    stream_id: str | None = Field(None, description="Default: a random id", pattern=STREAM_ID.pattern)
    budget: str | float | None = None
    window_frames: int | None = Field(None, ge=1, description="Default: the model's T")
    window_seconds: float | None = Field(None, ge=0, description="0: consecutive frames")
    top_k: int | None = Field(None, ge=1, le=100)
    emit: str | None = Field(None, description="'steps' or 'windows'")
    drop_policy: str | None = Field(None, description="'drop_oldest', 'drop_newest' or 'block'")
    realtime: bool | None = Field(None, description="Follow the source's timestamps against the clock; "
                                                    "default: for files, not for live sources")
    loop: bool = Field(False, description="Play a file again at its end")
    options: dict[str, str] = Field(default_factory=dict, description="Extra FFmpeg options for av.open")


class StreamPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    budget: str | float | None = Field(None, description="New budget; null follows the server default")
    top_k: int | None = Field(None, ge=1, le=100)
    emit: str | None = None


class StreamInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    stream_id: str
    kind: str
    status: str
    counters: dict[str, Any] = Field(default_factory=dict)


class StreamList(BaseModel):
    streams: list[dict[str, Any]]


# ----------------------------------------------------------------------------------------- helpers
class StreamError(Exception):
    """An API error with an HTTP status and a WebSocket close code."""

    def __init__(self, status: int, close_code: int, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.status, self.close_code, self.detail = status, close_code, detail
        self.retry_after_s = retry_after_s

    def http(self) -> HTTPException:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return HTTPException(self.status, self.detail, headers=headers)


def serve_data_plane() -> dict[str, str]:
    """How requests reach this replica and its handles, as Serve in this process runs them
    (``ServeConfig.high_throughput``): operators can check that the mode took effect."""
    from ray.serve._private import constants

    return {"http": "haproxy" if getattr(constants, "RAY_SERVE_ENABLE_HA_PROXY", False) else "python_proxy",
            "handles": "grpc" if getattr(constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", False) else "ray_actor_calls"}


def check_exposure(config: ServeConfig, data_plane: dict[str, str]) -> None:
    """Refuse to serve without a token behind Ray's HAProxy: that mode serves the ingress replica on
    all interfaces, whatever ``config.host`` says (a Ray started by someone else may run it)."""
    if data_plane["http"] == "haproxy" and not config.auth_token:
        raise ConfigError("this Ray runs Serve with HAProxy (RAY_SERVE_ENABLE_HA_PROXY=1), which exposes the "
                          "ingress replica's HTTP port on all interfaces: set auth_token or $ADASTREAM_TOKEN")


def _close_reason(text: str) -> str:
    # A close frame's reason is at most 123 bytes.
    data = text.encode()[:120]
    return data.decode(errors="ignore")


class _PushChannel:
    """One WebSocket attached to a push stream: its decoders and its MPEG-TS demuxer thread."""

    def __init__(self, websocket: WebSocket, session: StreamSession, transform: FrameTransform) -> None:
        self.websocket = websocket
        self.session = session
        self.transform = transform
        self.images = ImageDecoder()
        self.pipe: ChunkPipe | None = None
        self.reader: SourceReader | None = None
        self.bucket = TokenBucket(session.hub.config.max_fps_in, session.hub.config.max_fps_in)
        self.rate_drops: list[float] = []
        self.consecutive_errors = 0
        self.close_code: int | None = None
        self.close_reason = ""

    def finish_input(self) -> None:
        """No more chunks: the demuxer decodes what it has, then ends."""
        if self.pipe is not None:
            self.pipe.finish()

    def stop(self) -> None:
        self.finish_input()
        if self.reader is not None:
            self.reader.stop()


# Helpers the routes use must exist before the class: @serve.ingress freezes (pickles) the FastAPI app,
# routes and the globals they see, while the class is being defined.
def _merge_client_view(record: dict[str, Any] | None, after: int | None, seen_window: int | None,
                       open_window: int | None = None, open_steps: int | None = None) -> dict[str, Any] | None:
    """A reconnecting client knows what it saw (``after``: its last event; ``window``: the last window
    whose result it got; ``open_window`` / ``open_steps``: a window it saw steps of but not the result),
    which can be newer than the directory's record (synced a moment behind): numbering continues after
    what the client saw, a window it saw finish is not restarted, and a window it saw in progress is
    restarted -- with a ``window_restarted`` event -- even when the record had not heard of it yet."""
    if record is None and after is None and seen_window is None and open_window is None:
        return None
    merged = dict(record or {"kind": PUSH, "window": -1, "steps": 0, "final": True, "seq": 0})
    merged["client_after"] = after
    if after is not None:
        merged["seq"] = max(int(merged.get("seq", 0)), after)
    if seen_window is not None and seen_window >= int(merged.get("window", -1)):
        merged.update(window=seen_window, final=True, steps=0)
    if open_window is not None and open_window > int(merged.get("window", -1)) \
            and (seen_window is None or open_window > seen_window):
        # The previous replica had started this window (the client got some of its steps) after its
        # last report to the directory: its recurrent state is lost, so the window restarts.
        merged.update(window=open_window, final=False, steps=max(0, int(open_steps or 0)))
    elif open_window is not None and open_window == int(merged.get("window", -1)) and not merged.get("final"):
        merged["steps"] = max(int(merged.get("steps", 0)), int(open_steps or 0))
    return merged


def _remote_summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("stream_id", "kind", "status", "message", "connected", "settings", "window", "counters", "owner",
            "owner_alive", "latency_ms", "fps_in")
    summary = {k: record.get(k) for k in keys}
    if "decoder" in record:
        summary["decoder"] = record["decoder"]
    summary["source"] = (record.get("source") or {}).get("source")
    summary["as_of"] = record.get("updated")  # when the owner reported these counters
    return summary


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""Of every server-sent-events response: no caching, no buffering by proxies in between."""


async def _sse(subscriber: Any, request: Request) -> AsyncIterator[str]:
    """Server-sent events until the stream ends or the client leaves; a comment every 15 s keeps
    proxies from closing an idle connection."""
    try:
        yield ": adastream events\n\n"
        while True:
            try:
                event = await asyncio.wait_for(subscriber.get(), timeout=15)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                yield ": keep-alive\n\n"
                continue
            if event is None:
                return
            yield event.sse()
    finally:
        subscriber.close()


async def _relayed_sse(directory: DeploymentHandle, stream_id: str, after: int, request: Request) -> AsyncIterator[str]:
    """Server-sent events of a stream another ingress replica serves, as its owner forwards them to the
    directory (a tenth of a second later than from the owner itself). Ends with the stream, or when
    the directory no longer knows it."""
    yield ": adastream events (relayed from the ingress replica serving the stream)\n\n"
    failures = 0
    while True:
        try:
            reply = await asyncio.wait_for(directory.watch.remote(stream_id, after, 10.0), timeout=20)
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the directory restarts: try again, then give up
            failures += 1
            if failures > 5:
                return
            await asyncio.sleep(1.0)
            continue
        if reply is None:
            return
        for seq, type_, data in reply["events"]:
            after = seq
            yield Event(seq, type_, data).sse()
        if reply["ended"]:
            return
        if not reply["events"]:
            if await request.is_disconnected():
                return
            yield ": keep-alive\n\n"


def _unusable_frame(message: str) -> np.ndarray:
    """What a decoded frame that cannot be converted becomes: the stream counts it malformed."""
    raise PayloadError("bad_frame", message)


def _int(value: Any, default: int | None = None) -> int | None:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise StreamError(400, CLOSE_BAD_REQUEST, f"not an integer: {value!r}") from None


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise StreamError(400, CLOSE_BAD_REQUEST, f"not a number: {value!r}") from None


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """HTTP/WebSocket front of the app; owns the stream sessions of this replica."""

    async def __init__(self, config: ServeConfig, recognizer: DeploymentHandle | None,
                       directory: DeploymentHandle) -> None:
        self.config = config
        self.recognizer = recognizer
        self.directory = directory
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()
        check_exposure(config, serve_data_plane())
        self.loop = asyncio.get_running_loop()
        if recognizer is not None:
            self.meta = await asyncio.wait_for(recognizer.info.remote(), timeout=600)
        else:
            self.meta = await self.loop.run_in_executor(None, self._load_local_model)
        self.classes: list[str] = self.meta["classes"]
        self.step_macs: float = self.meta["step_macs"]
        self.num_frames: int = self.meta["num_frames"]
        self.preprocess = Preprocess.from_data(self.meta["data"], self.meta["input_size"])
        self.catalog = ExitCatalog.from_exits(self.meta["exits"], self.num_frames, config.auto_tolerance)
        self._default = self.catalog.resolve(config.budget)
        self._budget_version = 0  # of the server-wide budget in the directory, last set or applied here
        for warning in self.meta.get("warnings", []):
            logger.warning("Ingress: %s", warning)
        self.sessions: dict[str, StreamSession] = {}
        self.finished: dict[str, tuple[float, StreamSession]] = {}  # ended streams, kept for GET/SSE a while
        self.channels: dict[str, _PushChannel] = {}
        self.readers: dict[str, SourceReader] = {}
        self.api_buckets: dict[str, TokenBucket] = {}
        self.executor = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                           thread_name_prefix="frames")
        self._dirty: set[str] = set()
        self._removed: set[str] = set()
        self._sync_wakeup = asyncio.Event()
        from pipelines.serve.metrics import LoopLag, ServeMetrics

        self.metrics = ServeMetrics()
        self._metrics_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self._metrics_job: Any = None
        self.loop_lag = LoopLag()
        self.overload = OverloadGuard(config.overload_window_s, config.overload_stream_share,
                                      config.overload_loop_lag_ms, config.overload_ramp_share)
        # Streams of this replica that clients of other replicas watch (server-sent events relayed
        # through the directory): their subscription here (``after_seq``: where the forwarding began).
        self._relays: dict[str, Subscriber] = {}
        self._relay_lock = asyncio.Lock()
        self._tasks = [self.loop.create_task(self._sync_loop()), self.loop.create_task(self._housekeeping_loop()),
                       self.loop.create_task(self.loop_lag.run()), self.loop.create_task(self._relay_loop())]

    def _load_local_model(self) -> dict[str, Any]:
        """``colocate_model``: the model lives in this replica (see ServeConfig.colocate_model)."""
        import torch

        from pipelines.registry import load_registered_model
        from pipelines.serve.engine import StepEngine, pass_in_thread
        from pipelines.serve.recognizer import model_metadata, resolve_device

        torch.set_num_threads(self.config.torch_threads)
        device = resolve_device(self.config.device)
        loaded = load_registered_model(self.config.model_uri, tracking_uri=self.config.tracking_uri, device=device)
        self.local_engine = StepEngine(loaded.model, device, replica=self.replica, trace=self.config.trace_model)
        # Same cross-stream batching as the Recognizer, in this process; the pass runs in a thread so
        # the WebSockets keep flowing meanwhile.
        self.local_batcher = StepBatcher(pass_in_thread(self.local_engine), self.config.max_batch_size,
                                         self.config.batch_wait_timeout_s)
        return dict(model_metadata(loaded), model_uri=self.config.model_uri, replica=self.replica,
                    runtime=self.local_engine.runtime)

    # ================================================================ Hub interface (for sessions)
    async def step(self, request: StepRequest) -> StepResult:
        if self.recognizer is None:
            return await self.local_batcher.step(request)
        return await self.recognizer.step.remote(request)

    def default_choice(self) -> ExitChoice:
        return self._default

    def run_blocking(self, fn: Callable[[], Any]) -> "asyncio.Future[Any]":
        return self.loop.run_in_executor(self.executor, fn)

    def changed(self, session: StreamSession) -> None:
        self._dirty.add(session.id)
        self._sync_wakeup.set()

    # ================================================================ auth and limits
    def _authorized(self, token: str | None) -> bool:
        expected = self.config.auth_token
        if not expected:
            return True
        return token is not None and hmac.compare_digest(token.encode(), expected.encode())

    def _guard(self, request: Request, credentials: HTTPAuthorizationCredentials | None,
               token: str | None) -> None:
        """Token check, then the per-client rate limit (401 before 429: strangers learn nothing)."""
        supplied = credentials.credentials if credentials is not None else token
        if not self._authorized(supplied):
            raise HTTPException(401, "missing or invalid token", headers={"WWW-Authenticate": "Bearer"})
        client = request.client.host if request.client else "?"
        bucket = self.api_buckets.get(client)
        if bucket is None:
            if len(self.api_buckets) > 10000:
                self.api_buckets.clear()  # bound the memory a scan of many addresses could take
            bucket = self.api_buckets[client] = TokenBucket(self.config.api_requests_per_s, self.config.api_burst)
        if not bucket.take():
            raise HTTPException(429, "too many requests; slow down", headers={"Retry-After": "1"})

    def _check_capacity(self) -> None:
        """Admission of a new stream: the fixed limit, then whether this replica is past its capacity
        (``overload.py``)."""
        if len(self.sessions) >= self.config.max_streams:
            self.metrics.refused.inc(1.0, {"reason": "max_streams"})
            raise StreamError(429, CLOSE_TRY_AGAIN, f"too many streams (the limit is {self.config.max_streams})")
        why = self.overload.reason()
        if why is not None:
            self.metrics.refused.inc(1.0, {"reason": "overloaded"})
            retry = self.overload.retry_after_s()
            raise StreamError(503, CLOSE_TRY_AGAIN, f"overloaded: {why}; retry in {retry} s", retry_after_s=retry)
        self.overload.admitted()  # counted once it passes (a request that then fails validation counts too)

    # ================================================================ sessions
    def _new_session(self, stream_id: str, kind: str, settings: Any, source: dict | None,
                     resume: dict | None) -> StreamSession:
        session = StreamSession(self, stream_id, kind, settings, source=source, resume=resume)
        self.sessions[stream_id] = session
        self.finished.pop(stream_id, None)
        session.on_close.append(self._forget)
        self.changed(session)
        return session

    def _forget(self, session: StreamSession) -> None:
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            self.finished[session.id] = (time.monotonic(), session)
            self._removed.add(session.id)
            self._dirty.discard(session.id)
            self._sync_wakeup.set()
        reader = self.readers.pop(session.id, None)
        if reader is not None:
            reader.stop()

    async def _claim(self, stream_id: str) -> dict | None:
        """The directory's record of a stream this replica is about to serve (None if new or unknown)."""
        try:
            return await asyncio.wait_for(self.directory.claim.remote(stream_id, self.replica), timeout=5)
        except Exception as error:  # noqa: BLE001 - the directory is an optimisation for failover only
            logger.warning("directory unavailable (%s); stream %s starts without its history", error, stream_id)
            return None

    def _settings(self, **values: Any) -> Any:
        try:
            return parse_settings(self.config, self.num_frames, **values)
        except ValueError as error:
            raise StreamError(422, CLOSE_BAD_REQUEST, str(error)) from None

    def _on_source_frame(self, session: StreamSession, transform: FrameTransform, gate: FrameGate,
                         frame: SourceFrame) -> bool:
        """Called in a reader thread for every decoded frame; schedules the ones the stream may use onto
        the event loop (the gate counts the others there, in the thread)."""
        if session.closed:
            return True
        if session.settings.drop_policy == "block" and not session.has_room():
            return False  # the reader waits and offers this frame again
        now = time.monotonic()
        passed = gate.check(frame.media_time, now)
        if passed is None:
            return True
        received = frame.received if frame.received is not None else now
        # Converted here, in the reader thread, so the decoded picture is freed here too. Freeing an
        # ``av.VideoFrame`` releases the GIL and takes it back (PyAV frees it ``nogil``); on the event
        # loop that is one wait for the GIL per frame, behind every reader thread that wants it, and
        # with 120 pulled streams per replica warming up at once the loop fell behind those waits and
        # stopped answering for a minute (``py-spy``: the loop thread in the frame's dealloc, waiting
        # for the GIL). It also spares the frame a trip through the frames pool.
        try:
            image: np.ndarray | Callable[[], np.ndarray] = transform(frame.frame)
        except (av.error.FFmpegError, ValueError) as error:
            image = partial(_unusable_frame, f"the decoded frame cannot be converted: {error}")
        self.loop.call_soon_threadsafe(self._offer_decoded, session, image, frame.media_time, received, *passed)
        return True

    def _skipper(self, session: StreamSession, gate: FrameGate) -> KeyframeSkipper:
        """Leaves undecoded the packets after an exit that no wanted frame needs (see sources.py)."""
        return KeyframeSkipper(lambda: session.skip_hint, partial(self._on_left_out, session, gate))

    def _on_left_out(self, session: StreamSession, gate: FrameGate, media_time: float) -> None:
        """Called in a reader thread for every packet its KeyframeSkipper leaves undecoded: the gate
        counts it; once per heartbeat the count goes to the stream, as no frame does meanwhile."""
        frames = gate.leave_out(media_time, time.monotonic())
        if frames:
            self.loop.call_soon_threadsafe(session.count_left_out, frames, media_time)

    def _on_behind(self, session: StreamSession, seconds: float, behind_s: float, fps: float) -> None:
        """Called in a reader thread for each stretch it skipped to catch up with its live source."""
        self.loop.call_soon_threadsafe(session.count_behind, seconds, behind_s, fps)

    @staticmethod
    def _offer_decoded(session: StreamSession, image: np.ndarray | Callable[[], np.ndarray], media_time: float | None,
                       received: float, skipped: int, previous_media: float | None,
                       handover: Handover | None) -> None:
        session.offer(image, media_time=media_time, received=received, skipped=skipped,
                      previous_media=previous_media, handover=handover)

    def _on_source_status(self, session: StreamSession, gate: FrameGate, status: str, message: str,
                          attempt: int) -> None:
        self.loop.call_soon_threadsafe(self._source_status, session, status, message, attempt, gate.flush())

    def _source_status(self, session: StreamSession, status: str, message: str, attempt: int,
                       skipped: int = 0) -> None:
        session.counters.frames_received += skipped
        if session.closed:
            return
        session.events.publish("source", status=status, message=message, attempt=attempt)
        if status == "connected":
            session.connected = True
            session.set_status("live", message)
            session.last_activity = time.monotonic()
        elif status in ("connecting", "reconnecting", "error"):
            session.connected = False
            session.set_status("connecting" if status == "connecting" else "reconnecting", message)
        elif status in ("ended", "failed"):
            session.connected = False
            if session.kind == PULL:
                self.loop.create_task(self._finish(session, message or status,
                                                   "ended" if status == "ended" else "failed"))
            elif status == "failed":
                session.events.publish("error", code="undecodable_stream",
                                       message=f"the pushed MPEG-TS stream cannot be decoded: {message}")

    async def _finish(self, session: StreamSession, reason: str, status: str) -> None:
        await session.drain()
        if status == "failed":
            session.status = "failed"
        await session.close(reason, status)

    def _start_reader(self, session: StreamSession, options: SourceOptions) -> None:
        transform = FrameTransform(self.preprocess)
        gate = FrameGate(session)
        reader = SourceReader(open_url(options), partial(self._on_source_frame, session, transform, gate),
                              partial(self._on_source_status, session, gate), name=session.id, live=options.is_live,
                              follow_clock=options.follows_clock, loop=options.loop,
                              max_pixels=self.config.max_pixels,
                              reconnect_initial_s=options.reconnect_initial_s,
                              reconnect_max_s=options.reconnect_max_s,
                              reconnect_attempts=options.reconnect_attempts,
                              skipper=self._skipper(session, gate),
                              frame_threads_min_pixels=self.config.frame_threads_min_pixels,
                              doze_buffer_bytes=receive_buffer_bytes(options),
                              max_lag_s=(self.config.max_source_lag_s if options.real_time_transport
                                         and session.settings.drop_policy != "block" else 0.0),
                              on_behind=partial(self._on_behind, session),
                              awaited_decision=gate.awaited, hold_max_s=self.config.hold_for_decision_s)
        self.readers[session.id] = reader
        reader.start()

    def _source_options(self, body: dict[str, Any]) -> SourceOptions:
        cfg = self.config
        url = body["source"]
        options = SourceOptions(url=url, realtime=body.get("realtime"), loop=bool(body.get("loop", False)),
                                open_timeout_s=cfg.open_timeout_s, read_timeout_s=cfg.read_timeout_s,
                                reconnect_initial_s=cfg.reconnect_initial_s, reconnect_max_s=cfg.reconnect_max_s,
                                reconnect_attempts=cfg.reconnect_attempts, max_pixels=cfg.max_pixels,
                                av_options=dict(body.get("options") or {}))
        scheme = options.scheme
        if scheme not in cfg.allowed_schemes:
            raise StreamError(422, CLOSE_BAD_REQUEST, f"source scheme {scheme!r} is not allowed "
                                                      f"(allowed: {', '.join(cfg.allowed_schemes)})")
        if scheme == "file":
            if not cfg.local_files_allowed:
                raise StreamError(422, CLOSE_BAD_REQUEST, "server-side files are not allowed on this server")
            path = Path(urlsplit(url).path if url.startswith("file://") else url)
            if not path.is_file():
                raise StreamError(422, CLOSE_BAD_REQUEST, f"no such file on the server: {path}")
        return options

    # ================================================================ background work
    async def _sync_loop(self) -> None:
        """Report streams to the directory: changed ones promptly, all of them every few seconds."""
        interval = self.config.sync_interval_s
        last_full = 0.0
        while True:
            try:
                await asyncio.wait_for(self._sync_wakeup.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
            await asyncio.sleep(0.05)  # coalesce a burst of changes into one call
            self._sync_wakeup.clear()
            now = time.monotonic()
            full = now - last_full > 5 * interval
            ids = list(self.sessions) if full else [s for s in self._dirty if s in self.sessions]
            removed = list(self._removed)
            self._dirty.clear()
            self._removed.clear()
            records = [self._record(self.sessions[s]) for s in ids]
            if removed and self._relays:
                await self._relay_once()  # a watched stream's last events before its record goes
            if not await self._report(records, removed):  # retried on the next tick
                self._dirty.update(ids)
                self._removed.update(removed)
                continue
            if full:
                last_full = now

    async def _report(self, records: list[dict[str, Any]], removed: list[str], adopt_orphans: bool = True) -> bool:
        """Report streams to the directory and act on its reply; False if it could not be reached.
        Orphans are adopted by the sync loop alone (``adopt_orphans``): two adoptions of one orphan
        running at once would both start it."""
        try:
            reply = await asyncio.wait_for(self.directory.sync.remote(self.replica, records, removed),
                                           timeout=max(5.0, self.config.sync_interval_s * 3))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - the directory is an optimisation for failover only
            logger.warning("directory sync failed (%s)", error)
            return False
        await self._apply_directory(reply, adopt_orphans)
        return True

    async def _record_now(self, session: StreamSession) -> None:
        """Put a new stream's record in the directory before answering for it: the client's next request
        (its events, at the ``Location`` just returned) may reach another replica, which knows the
        stream only from the directory -- and the sync loop reports it only a tick later (it answered
        404 to nearly every such request). On failure the sync loop reports it as usual (it is marked
        changed)."""
        await self._report([self._record(session)], [], adopt_orphans=False)

    async def _apply_directory(self, reply: dict[str, Any], adopt_orphans: bool = True) -> None:
        for stream_id in reply.get("delete", []):
            session = self.sessions.get(stream_id)
            if session is not None:
                await self._delete(session)
        for stream_id, fields in reply.get("patch", {}).items():
            session = self.sessions.get(stream_id)
            if session is not None:
                try:
                    self._apply_patch(session, fields)
                except (BudgetError, ValueError) as error:  # checked by the replica that took the request
                    logger.warning("ignored a change of stream %s: %s", stream_id, error)
        for stream_id in reply.get("lost", []):
            # Another replica took the stream over (a push client reconnected there, or this replica
            # missed its heartbeats and its pull streams were adopted): this copy is stale.
            session = self.sessions.get(stream_id)
            if session is not None and (session.kind == PULL or not session.connected):
                await session.close("taken over by another ingress replica", "moved")
        self._update_relays(reply.get("watched", {}))
        # Only a newer server-wide budget than this replica last set or applied: a reply computed
        # before this replica's own PUT must not undo it.
        budget, version = reply.get("budget"), int(reply.get("budget_version", 0))
        if budget is not None and version > self._budget_version:
            self._budget_version = version
            try:
                if budget != self._default.budget:
                    self._set_default(self.catalog.resolve(budget), publish=True)
            except BudgetError:
                pass
        for record in reply.get("orphans", []) if adopt_orphans else []:
            if (record["stream_id"] in self.sessions or len(self.sessions) >= self.config.max_streams
                    or self.overload.reason() is not None):  # a less loaded replica may take it
                continue
            self.overload.admitted()  # an adopted stream is a new one here (the ramp after an overload)
            await self._adopt(record)

    async def _adopt(self, record: dict[str, Any]) -> None:
        """Take over a pull stream whose ingress replica is gone."""
        previous = await self._claim(record["stream_id"])
        if previous is None or previous.get("claimed_by"):
            return
        # Event numbers jump ahead: the record is up to a sync behind, and an SSE client's
        # Last-Event-ID must not hide the new replica's first events.
        previous = dict(previous, seq=int(previous.get("seq", 0)) + 1000)
        settings_dict = dict(previous.get("settings") or {})
        try:
            settings = parse_settings(self.config, self.num_frames,
                                      window_frames=settings_dict.get("window_frames"),
                                      window_seconds=settings_dict.get("window_seconds"),
                                      budget=settings_dict.get("budget"), top_k=settings_dict.get("top_k"),
                                      emit=settings_dict.get("emit"), drop_policy=settings_dict.get("drop_policy"))
            options = self._source_options(previous["source"])
            session = self._new_session(previous["stream_id"], PULL, settings, previous["source"], previous)
        except (StreamError, BudgetError, ValueError, KeyError) as error:
            logger.warning("cannot adopt stream %s: %s", record.get("stream_id"), error)
            return
        # A warning, not info: a failover is what an operator wants to see in the replica's log (the
        # server logs at WARNING by default), and an overloaded replica that misses its heartbeats
        # for ``stale_after_s`` has its streams adopted while it still runs.
        logger.warning("adopted pull stream %s from %s (its last record is %.0f s old)", session.id,
                       previous.get("owner"), time.time() - float(previous.get("updated") or 0.0))
        self._start_reader(session, options)

    RELAY_INTERVAL_S = 0.1
    """How often the events of watched streams go to the directory: the extra delay of a server-sent
    event relayed to a client of another ingress replica."""

    def _update_relays(self, watched: dict[str, int]) -> None:
        """Forward the events of exactly the streams of this replica somebody watches elsewhere, from
        the seq wanted (again from an earlier one, when a watcher asked for it)."""
        for stream_id in [s for s, sub in self._relays.items() if s not in watched or watched[s] < sub.after_seq]:
            self._relays.pop(stream_id).close()
        for stream_id, after in watched.items():
            session = self.sessions.get(stream_id) or self._finished(stream_id)
            if session is not None and stream_id not in self._relays:
                self._relays[stream_id] = session.events.subscribe(after_seq=int(after))

    async def _relay_once(self) -> None:
        async with self._relay_lock:
            events: dict[str, list[tuple[int, str, str]]] = {}
            starts: dict[str, int] = {}
            ended: list[str] = []
            for stream_id, subscriber in list(self._relays.items()):
                batch, done = subscriber.drain()
                if batch:
                    events[stream_id] = [(e.seq, e.type, e.data) for e in batch]
                    starts[stream_id] = subscriber.after_seq
                if done:
                    ended.append(stream_id)
                    self._relays.pop(stream_id).close()
            if not events and not ended:
                return
            try:
                watched = await asyncio.wait_for(self.directory.relay.remote(self.replica, events, ended, starts),
                                                 timeout=5)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the watchers see a gap; the stream goes on
                logger.info("relaying events failed (%s)", error)
                return
            self._update_relays(watched)

    async def _relay_loop(self) -> None:
        while True:
            await asyncio.sleep(self.RELAY_INTERVAL_S)
            if self._relays:
                try:
                    await self._relay_once()
                except asyncio.CancelledError:
                    raise
                except Exception:  # pragma: no cover - never let the relay die
                    logger.exception("relaying events failed")

    def _publish_metrics(self, now: float) -> None:
        """Read the metrics here, on the loop, and hand them to Ray in the metrics thread (see
        ``ServeMetrics.record``); while the last second's are still being handed over, the counts wait
        for the next second (counters are pushed as the difference since the last push)."""
        job = self._metrics_job
        if job is not None:
            if not job.done():
                return
            if job.exception() is not None:
                logger.warning("publishing metrics failed: %s", job.exception())
        calls = self.metrics.collect(self.sessions.values(), self.loop_lag)
        calls.append((self.metrics.overloaded.set, (1.0 if self.overload.reason(now) is not None else 0.0,)))
        self._metrics_job = self._metrics_pool.submit(self.metrics.record, calls)

    async def _housekeeping_loop(self) -> None:
        """Once a second: metrics, idle eviction, forgetting ended streams."""
        while True:
            await asyncio.sleep(1.0)
            try:
                now = time.monotonic()
                self.overload.observe(self.sessions.values(),
                                      self.loop_lag.recent_median_ms(self.config.overload_window_s), now)
                self._publish_metrics(now)
                for session in list(self.sessions.values()):
                    if now - session.last_activity > self.config.idle_timeout_s and not session.busy:
                        await self._evict(session)
                for stream_id, (ended, _) in list(self.finished.items()):
                    if now - ended > max(60.0, self.config.idle_timeout_s):
                        del self.finished[stream_id]
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - never let housekeeping die
                logger.exception("housekeeping failed")

    async def _evict(self, session: StreamSession) -> None:
        channel = self.channels.get(session.id)
        if channel is not None:
            channel.close_code, channel.close_reason = CLOSE_IDLE, "idle timeout"
        await session.close(f"evicted after {self.config.idle_timeout_s:g} s without frames", "evicted")

    async def _delete(self, session: StreamSession) -> None:
        channel = self.channels.get(session.id)
        if channel is not None:
            channel.close_code, channel.close_reason = CLOSE_NORMAL, "stream deleted"
        await session.close("deleted", "deleted")

    def _set_default(self, choice: ExitChoice, publish: bool) -> None:
        self._default = choice
        if publish:
            for session in self.sessions.values():
                if session.settings.budget is None:
                    session.events.publish("budget_changed", budget=choice.to_dict(), scope="server")

    # ================================================================ HTTP API
    @api.get("/healthz", tags=["service"], summary="Liveness (no token needed)")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "streams": len(self.sessions)}

    @api.get("/v1/info", tags=["service"], summary="The model, its budgets and the server's limits")
    async def info(self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                   token: str | None = Query(None, description="Alternative to the Authorization header")) -> dict:
        self._guard(request, credentials, token)
        cfg = self.config
        return {
            "model": {k: self.meta[k] for k in ("model_uri", "method", "classes", "num_frames", "data",
                                                "input_size", "step_macs", "warnings")},
            "model_runtime": self.meta.get("runtime"),
            "budget": self._default.to_dict(), "budgets": self.catalog.describe(),
            "defaults": {"window_frames": cfg.window_frames or self.num_frames, "window_seconds": cfg.window_seconds,
                         "top_k": cfg.top_k, "emit": cfg.emit, "drop_policy": cfg.drop_policy},
            "limits": {"max_streams": cfg.max_streams, "max_message_bytes": cfg.max_message_bytes,
                       "max_pixels": cfg.max_pixels, "max_fps_in": cfg.max_fps_in,
                       "api_requests_per_s": cfg.api_requests_per_s, "idle_timeout_s": cfg.idle_timeout_s},
            "auth": bool(cfg.auth_token), "replica": self.replica, "recognizer_replica": self.meta.get("replica"),
            "data_plane": serve_data_plane(),
            "streams": len(self.sessions), "event_loop_lag_ms": self.loop_lag.summary(),
            "admission": self.overload.describe(),
        }

    @api.get("/v1/budget", tags=["budget"], summary="The server-wide default budget")
    async def get_budget(self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                         token: str | None = Query(None)) -> dict:
        self._guard(request, credentials, token)
        return {"budget": self._default.to_dict(), "budgets": self.catalog.describe()}

    @api.put("/v1/budget", tags=["budget"], summary="Change the server-wide budget (streams without their own "
                                                     "budget switch at their next frame; no model reload)")
    async def put_budget(self, body: BudgetBody, request: Request,
                         credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                         token: str | None = Query(None)) -> dict:
        self._guard(request, credentials, token)
        try:
            choice = self.catalog.resolve(self.config.budget if body.budget is None else body.budget)
        except BudgetError as error:
            raise HTTPException(422, str(error)) from None
        self._set_default(choice, publish=True)
        try:
            version = await asyncio.wait_for(self.directory.set_budget.remote(choice.budget), timeout=5)
            self._budget_version = max(self._budget_version, int(version))
        except Exception as error:  # noqa: BLE001 - other replicas learn it on a later change
            logger.warning("could not record the budget in the directory: %s", error)
        return {"budget": choice.to_dict()}

    @api.post("/v1/streams", status_code=201, tags=["streams"], response_model=StreamInfo,
              summary="Start a pull stream: the server reads the source at its own rate",
              responses={409: {"description": "stream id in use"}, 422: {"description": "bad source or settings"},
                         429: {"description": "too many streams or requests"},
                         503: {"description": "this replica is overloaded: retry after Retry-After seconds"}})
    async def create_stream(self, body: StreamCreate, request: Request, response: Response,
                            credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                            token: str | None = Query(None)) -> dict:
        self._guard(request, credentials, token)
        try:
            stream_id = body.stream_id or uuid.uuid4().hex[:12]
            if stream_id in self.sessions:
                raise StreamError(409, CLOSE_CONFLICT, f"stream {stream_id!r} exists")
            self._check_capacity()
            settings = self._settings(window_frames=body.window_frames, window_seconds=body.window_seconds,
                                      budget=body.budget, top_k=body.top_k, emit=body.emit,
                                      drop_policy=body.drop_policy)
            options = self._source_options(body.model_dump())
            previous = await self._claim(stream_id)
            if previous is not None and previous.get("claimed_by"):
                raise StreamError(409, CLOSE_CONFLICT, f"stream {stream_id!r} is served by another replica")
            session = self._new_session(stream_id, PULL, settings, body.model_dump(exclude={"stream_id"}), None)
        except StreamError as error:
            raise error.http() from None
        except BudgetError as error:
            raise HTTPException(422, str(error)) from None
        self._start_reader(session, options)
        await self._record_now(session)
        response.headers["Location"] = f"{self.config.route_prefix.rstrip('/')}/v1/streams/{stream_id}"
        return self._summary(session)

    @api.get("/v1/streams", tags=["streams"], response_model=StreamList, summary="Every stream")
    async def list_streams(self, request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                           token: str | None = Query(None)) -> dict:
        self._guard(request, credentials, token)
        streams = {s.id: self._summary(s) for s in self.sessions.values()}
        try:
            records = await asyncio.wait_for(self.directory.all.remote(), timeout=2)
        except Exception:  # noqa: BLE001 - the local streams are still worth answering with
            records = []
        for record in records:
            # This replica's own streams are listed from the sessions themselves (the directory may
            # still hold one that has just ended).
            if record.get("owner") == self.replica or record.get("closed"):
                continue
            if record["stream_id"] not in streams:
                streams[record["stream_id"]] = _remote_summary(record)
        return {"streams": list(streams.values())}

    @api.get("/v1/streams/{stream_id}", tags=["streams"], response_model=StreamInfo,
             summary="A stream's status and counters", responses={404: {"description": "no such stream"}})
    async def get_stream(self, stream_id: str, request: Request,
                         credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                         token: str | None = Query(None)) -> dict:
        self._guard(request, credentials, token)
        session = self.sessions.get(stream_id) or self._finished(stream_id)
        if session is not None:
            return self._summary(session)
        record = await self._remote_record(stream_id)
        if record is None:
            raise HTTPException(404, f"no stream {stream_id!r}")
        return _remote_summary(record)

    @api.patch("/v1/streams/{stream_id}", tags=["streams"], response_model=StreamInfo,
               summary="Change a running stream's budget (or top-k / emit) without interrupting it",
               responses={202: {"description": "another ingress replica serves the stream and applies the change "
                                                "within a second"}, 404: {"description": "no such stream"},
                          422: {"description": "bad budget or emit"}})
    async def patch_stream(self, stream_id: str, body: StreamPatch, request: Request,
                           credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                           token: str | None = Query(None)) -> dict:
        self._guard(request, credentials, token)
        fields = body.model_dump(exclude_unset=True)
        if "budget" in fields and fields["budget"] is not None:
            fields["budget"] = str(fields["budget"])
        try:
            if "emit" in fields and fields["emit"] not in ("steps", "windows"):
                raise ValueError("emit must be 'steps' or 'windows'")
            if fields.get("budget") is not None:
                self.catalog.resolve(fields["budget"])
            session = self.sessions.get(stream_id)
            if session is not None:
                self._apply_patch(session, fields)
                return self._summary(session)
        except (BudgetError, ValueError) as error:
            raise HTTPException(422, str(error)) from None
        # Another ingress replica serves it: the change reaches it with its next sync.
        try:
            requested = await asyncio.wait_for(self.directory.request_patch.remote(stream_id, fields), timeout=5)
        except Exception as error:  # noqa: BLE001
            raise HTTPException(503, f"cannot reach the stream directory: {error}") from None
        record = await self._remote_record(stream_id) if requested else None
        if record is None:
            raise HTTPException(404, f"no stream {stream_id!r}")
        return JSONResponse(_remote_summary(record), status_code=202)

    @staticmethod
    def _apply_patch(session: StreamSession, fields: dict[str, Any]) -> None:
        if "budget" in fields:
            session.set_budget(None if fields["budget"] is None else str(fields["budget"]))
        if fields.get("top_k"):
            session.settings.top_k = int(fields["top_k"])
        if fields.get("emit") in ("steps", "windows"):
            session.settings.emit = fields["emit"]

    @api.delete("/v1/streams/{stream_id}", status_code=204, tags=["streams"], summary="Stop a stream",
                responses={202: {"description": "another ingress replica will stop it"}})
    async def delete_stream(self, stream_id: str, request: Request,
                            credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                            token: str | None = Query(None)) -> Response:
        self._guard(request, credentials, token)
        session = self.sessions.get(stream_id)
        if session is not None:
            await self._delete(session)
            return Response(status_code=204)
        try:
            requested = await asyncio.wait_for(self.directory.request_delete.remote(stream_id), timeout=5)
        except Exception:  # noqa: BLE001
            requested = False
        if requested:
            return Response(status_code=202)
        raise HTTPException(404, f"no stream {stream_id!r}")

    @api.get("/v1/streams/{stream_id}/events", tags=["streams"],
             summary="Server-sent events of a stream (text/event-stream; Last-Event-ID replays recent events)",
             response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
    async def stream_events(self, stream_id: str, request: Request,
                            credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                            token: str | None = Query(None),
                            after: int | None = Query(None, description="Replay events after this seq"),
                            last_event_id: str | None = Header(None)) -> StreamingResponse:
        self._guard(request, credentials, token)
        session = self.sessions.get(stream_id) or self._finished(stream_id)
        if after is None and last_event_id and last_event_id.isdigit():
            after = int(last_event_id)
        if session is None:
            if await self._remote_record(stream_id) is None:
                raise HTTPException(404, f"no stream {stream_id!r}")
            # Another ingress replica serves it: its events come relayed through the directory.
            return StreamingResponse(_relayed_sse(self.directory, stream_id, after or 0, request),
                                     media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        subscriber = session.events.subscribe(after_seq=after if after is not None else 0)
        return StreamingResponse(_sse(subscriber, request), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    def _summary(self, session: StreamSession) -> dict[str, Any]:
        return session.summary() | {"owner": self.replica} | self._decoder(session)

    def _record(self, session: StreamSession) -> dict[str, Any]:
        """What the directory keeps of a stream (:meth:`StreamSession.record`)."""
        return session.record(self.replica) | {"seq": session.events.seq} | self._decoder(session)

    def _decoder(self, session: StreamSession) -> dict[str, Any]:
        """A decoding stream's decoder counts, for its summary."""
        reader = self.readers.get(session.id)
        return {"decoder": reader.stats()} if reader is not None else {}

    def _finished(self, stream_id: str) -> StreamSession | None:
        entry = self.finished.get(stream_id)
        return entry[1] if entry else None

    async def _remote_record(self, stream_id: str) -> dict | None:
        try:
            return await asyncio.wait_for(self.directory.get.remote(stream_id), timeout=2)
        except Exception:  # noqa: BLE001
            return None

    # ================================================================ WebSocket push
    @api.websocket("/v1/streams/{stream_id}/ws")
    async def push(self, websocket: WebSocket, stream_id: str) -> None:
        """Push frames of stream ``stream_id``; query parameters: token, budget, window_frames,
        window_seconds, fps, top_k, emit, drop_policy, and on reconnection ``after`` (the last event
        seq seen), ``window`` (the last window whose result was seen) and ``open_window`` /
        ``open_steps`` (a later window whose steps were seen, but not its result). Close codes: module
        docstring."""
        await websocket.accept()
        params = websocket.query_params
        header = websocket.headers.get("authorization", "")
        supplied = header[7:] if header.lower().startswith("bearer ") else params.get("token")
        if not self._authorized(supplied):
            await websocket.close(CLOSE_UNAUTHORIZED, "missing or invalid token")
            return
        try:
            existing = self.sessions.get(stream_id)
            # A reconnecting client gets what it missed after its last seen event (``after``), if asked;
            # a new stream replays its opening events (stream_started, window_restarted).
            after = _int(params.get("after"))
            session = await self._attach_push(stream_id, params)
            if after is None:
                after = existing.events.seq if existing is session else session.first_seq
        except StreamError as error:
            await websocket.close(error.close_code, _close_reason(error.detail))
            return
        except BudgetError as error:
            await websocket.close(CLOSE_BAD_REQUEST, _close_reason(str(error)))
            return
        previous = self.channels.get(stream_id)
        if previous is not None:
            previous.close_code, previous.close_reason = CLOSE_CONFLICT, "replaced by a newer connection"
            previous.stop()
            try:
                await previous.websocket.close(CLOSE_CONFLICT, "replaced by a newer connection")
            except Exception:  # noqa: BLE001 - it may be gone already
                pass
        channel = _PushChannel(websocket, session, FrameTransform(self.preprocess))
        self.channels[stream_id] = channel
        session.connected = True
        session.set_status("live")
        subscriber = session.events.subscribe(after_seq=after)
        sender = self.loop.create_task(self._send_events(channel, subscriber))
        try:
            await self._receive_frames(channel)
        finally:
            subscriber.close()
            channel.stop()
            if self.channels.get(stream_id) is channel:
                del self.channels[stream_id]
                session.connected = False
                if not session.closed:
                    session.set_status("disconnected", "waiting for the client to reconnect")
            try:
                await asyncio.wait_for(sender, timeout=5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                sender.cancel()
            if channel.close_code is not None:
                try:
                    await websocket.close(channel.close_code, _close_reason(channel.close_reason))
                except Exception:  # noqa: BLE001 - already closed
                    pass

    async def _attach_push(self, stream_id: str, params: Any) -> StreamSession:
        if not STREAM_ID.match(stream_id):
            raise StreamError(400, CLOSE_BAD_REQUEST, "stream id must be 1-128 of [A-Za-z0-9_.-]")
        session = self.sessions.get(stream_id)
        if session is not None:
            if session.kind != PUSH:
                raise StreamError(409, CLOSE_CONFLICT, "this id is a pull stream")
            if params.get("budget") is not None:
                session.set_budget(params["budget"])
            # A reconnecting client: the stream continues with its state. Claimed again all the same:
            # the client may have been on another replica meanwhile, and the directory lets a stream
            # change hands only through a claim (that replica's copy is then reported lost to it).
            await self._claim(stream_id)
            return session
        self._check_capacity()
        try:
            settings = parse_settings(self.config, self.num_frames,
                                      window_frames=_int(params.get("window_frames")),
                                      window_seconds=_float(params.get("window_seconds")),
                                      budget=params.get("budget"), top_k=_int(params.get("top_k")),
                                      emit=params.get("emit"), drop_policy=params.get("drop_policy"),
                                      fps=_float(params.get("fps")))
        except ValueError as error:
            raise StreamError(400, CLOSE_BAD_REQUEST, str(error)) from None
        previous = await self._claim(stream_id)
        if previous is not None and previous.get("kind") != PUSH:
            raise StreamError(409, CLOSE_CONFLICT, "this id is a pull stream")
        if previous is not None and previous.get("settings") and params.get("budget") is None:
            settings.budget = previous["settings"].get("budget")
        return self._new_session(stream_id, PUSH, settings, None,
                                 _merge_client_view(previous, _int(params.get("after")), _int(params.get("window")),
                                                    _int(params.get("open_window")), _int(params.get("open_steps"))))

    async def _send_events(self, channel: _PushChannel, subscriber: Any) -> None:
        websocket = channel.websocket
        try:
            while True:
                event = await subscriber.get()
                if event is None:
                    # The stream ended (deleted, evicted, finished): close unless the receive side does.
                    if channel.close_code is None:
                        channel.close_code, channel.close_reason = CLOSE_NORMAL, "stream ended"
                    await websocket.close(channel.close_code, _close_reason(channel.close_reason))
                    return
                await websocket.send_text(event.data)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the client went away; the receive loop notices too
            return

    async def _receive_frames(self, channel: _PushChannel) -> None:
        cfg = self.config
        session = channel.session
        websocket = channel.websocket
        while not session.closed and channel.close_code is None:
            if session.settings.drop_policy == "block":
                await session.wait_for_room()  # back-pressure: the client's sends wait in TCP buffers
            try:
                message = await websocket.receive()
            except Exception:  # noqa: BLE001 - closed under us
                return
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                await self._control(channel, message.get("text") or "")
                continue
            if len(data) > cfg.max_message_bytes:
                session.counters.drop("too_large")
                channel.close_code = CLOSE_TOO_BIG
                channel.close_reason = f"message of {len(data)} bytes exceeds the limit of {cfg.max_message_bytes}"
                session.events.publish("error", code="message_too_big", message=channel.close_reason)
                return
            now = time.monotonic()
            if not channel.bucket.take(now):
                # Over the limit: drop. A client that keeps at it (another second's worth of frames
                # dropped within two seconds) is cut off, so it cannot keep the replica busy.
                session.counters.drop("rate_limited")
                channel.rate_drops = [t for t in channel.rate_drops if t > now - 2.0] + [now]
                if len(channel.rate_drops) >= cfg.max_fps_in:
                    channel.close_code = CLOSE_RATE_LIMITED
                    channel.close_reason = f"sustained frame rate far above the limit of {cfg.max_fps_in:g} fps"
                    session.events.publish("error", code="rate_limited", message=channel.close_reason)
                    return
                continue
            try:
                self._accept_frame(channel, data, now)
                channel.consecutive_errors = 0
            except PayloadError as error:
                channel.consecutive_errors += 1
                session.counters.drop("malformed" if error.code != "frame_too_large" else "too_large")
                session.counters.errors += 1
                session.events.publish("error", code=error.code, message=str(error))
                if channel.consecutive_errors >= cfg.max_consecutive_errors:
                    channel.close_code = CLOSE_BAD_REQUEST
                    channel.close_reason = f"{channel.consecutive_errors} unusable messages in a row"
                    return

    def _accept_frame(self, channel: _PushChannel, data: bytes, received: float) -> None:
        """One binary message: an image is offered (decoded later, only if sampled); an MPEG-TS chunk goes
        to the stream's demuxer thread."""
        payload = parse_message(data)
        session = channel.session
        if payload.kind == MPEGTS:
            self._feed_ts(channel, payload.body)
            return
        width, height = image_dimensions(payload.kind, payload.body)
        if width * height > self.config.max_pixels:
            raise PayloadError("frame_too_large", f"{width}x{height} exceeds the limit of "
                                                  f"{self.config.max_pixels} pixels")
        decode = channel.images.decode
        transform = channel.transform

        def produce(kind: str = payload.kind, body: bytes = payload.body) -> Any:
            return transform(decode(kind, body))

        session.offer(produce, media_time=payload.timestamp, received=received)

    def _feed_ts(self, channel: _PushChannel, body: bytes) -> None:
        session = channel.session
        if channel.pipe is None:
            channel.pipe = ChunkPipe()
            transform = FrameTransform(self.preprocess)
            pipe = channel.pipe
            gate = FrameGate(session)
            channel.reader = SourceReader(open_pipe(pipe), partial(self._on_source_frame, session, transform, gate),
                                          partial(self._on_source_status, session, gate), name=f"{session.id}-ts",
                                          live=True, follow_clock=False, max_pixels=self.config.max_pixels,
                                          reconnect_initial_s=0.0, reconnect_max_s=0.0, reconnect_attempts=20,
                                          exhausted=lambda: pipe.exhausted, skipper=self._skipper(session, gate),
                                          frame_threads_min_pixels=self.config.frame_threads_min_pixels,
                                          awaited_decision=gate.awaited, hold_max_s=self.config.hold_for_decision_s)
            channel.reader.start()
        if not channel.pipe.feed(body):
            session.counters.drop("decoder_backlog")
            session.events.publish("warning", code="decoder_backlog",
                                   message="the MPEG-TS decoder is behind; a chunk was dropped")
        session.last_activity = time.monotonic()

    async def _control(self, channel: _PushChannel, text: str) -> None:
        """Text messages: ``{"type": "budget", "budget": ...}``, ``{"type": "config", "top_k": .., "emit": ..}``,
        ``{"type": "end"}`` (finish the stream), ``{"type": "ping"}``."""
        session = channel.session
        try:
            message = json.loads(text)
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except ValueError:
            session.events.publish("error", code="bad_message", message="text messages must be JSON objects")
            return
        kind = message.get("type")
        if kind == "budget":
            try:
                budget = message.get("budget")
                session.set_budget(None if budget is None else str(budget))
            except BudgetError as error:
                session.events.publish("error", code="bad_budget", message=str(error))
        elif kind == "config":
            if isinstance(message.get("top_k"), int) and 1 <= message["top_k"] <= 100:
                session.settings.top_k = message["top_k"]
            if message.get("emit") in ("steps", "windows"):
                session.settings.emit = message["emit"]
        elif kind == "end":
            channel.finish_input()
            if channel.reader is not None:
                await asyncio.get_running_loop().run_in_executor(None, channel.reader.join, 30)
                # The reader's last frames were handed over with call_soon_threadsafe; a round trip
                # through the loop's queue lets them be offered before the queue is drained.
                await asyncio.sleep(0)
            await session.drain()
            channel.close_code, channel.close_reason = CLOSE_NORMAL, "stream finished by the client"
            await session.close("finished by the client", "ended")
        elif kind == "ping":
            session.events.publish("pong")
        else:
            session.events.publish("error", code="bad_message", message=f"unknown message type {kind!r}")


__all__ = ["Ingress", "api", "CLOSE_NORMAL", "CLOSE_TOO_BIG", "CLOSE_TRY_AGAIN", "CLOSE_BAD_REQUEST",
           "CLOSE_UNAUTHORIZED", "CLOSE_IDLE", "CLOSE_CONFLICT", "CLOSE_RATE_LIMITED"]
