"""Send a video file or network stream to the AdaStream server in real time and print live predictions.

    python pipelines/stream_client.py VIDEO.mp4                         # push over WebSocket, real time
    python pipelines/stream_client.py udp://127.0.0.1:5000 --server http://gpu-box:8000 --token $TOKEN
    python pipelines/stream_client.py VIDEO.avi --format jpeg --speed 2 --budget 0.05
    python pipelines/stream_client.py rtsp://camera/stream --pull       # the server reads the source itself

Push mode (default) decodes/demuxes SOURCE locally (anything PyAV opens) and sends it over the stream's
WebSocket at its own frame rate (``--speed`` scales it; 0 = as fast as possible):

* ``--format ts`` sends H.264 in MPEG-TS chunks -- the H.264 packets are remuxed without re-encoding,
  other codecs are encoded to H.264 (libx264) first;
* ``--format jpeg`` / ``png`` sends one image per frame, each with its media timestamp;
* ``auto`` (default): ``ts`` for H.264 sources, ``jpeg`` otherwise.

The server answers with JSON events; predictions are printed one line each (``--json``: raw events).
If the connection drops (a server replica restarted), the client reconnects with the same stream id
and carries on; the server tells if a window had to restart. ``--pull`` asks the server to open
SOURCE itself (``POST /v1/streams``) and prints its server-sent events instead.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import struct
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator
from urllib.parse import urlencode, urlsplit, urlunsplit

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av

TIMESTAMP_MAGIC = b"ASTS"  # see pipelines/serve/frames.py
RECONNECT_CLOSE_CODES = {1001, 1006, 1011, 1012, 1013, 1014}  # going away / abnormal / restart / overloaded


@dataclass
class ClientOptions:
    server: str = "http://127.0.0.1:8000"
    stream_id: str | None = None
    token: str | None = None
    format: str = "auto"
    speed: float = 1.0
    budget: str | None = None
    window_frames: int | None = None
    window_seconds: float | None = None
    top_k: int | None = None
    emit: str | None = None
    drop_policy: str | None = None
    """``block``: the server reads no faster than the model keeps up (no frame dropped); default
    ``drop_oldest`` keeps a live stream live."""
    max_frames: int | None = None
    reconnect_s: float = 60.0
    """How long to keep trying to reconnect after the connection dropped, or to start a pulled stream
    while the server answers that it is overloaded (503)."""
    chunk_frames: int = 1
    """MPEG-TS: send a chunk every this many frames."""
    send_all: bool = False
    """Images: send every frame, even those the server said it will not use (``next_pts``)."""


@dataclass
class PushResult:
    stream_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    frames_sent: int = 0
    frames_skipped: int = 0
    """Image frames left out because the server would not use them (before its ``next_pts``)."""
    reconnects: int = 0
    close_code: int | None = None
    close_reason: str = ""

    @property
    def predictions(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == "prediction"]


# ------------------------------------------------------------------------------------------ sources
def _video_stream(container: Any) -> Any:
    if not container.streams.video:
        raise ValueError("the source has no video stream")
    return container.streams.video[0]


def choose_format(source: str, requested: str) -> str:
    if requested != "auto":
        return requested
    with av.open(source, metadata_errors="ignore") as container:
        codec = _video_stream(container).codec_context.name
    return "ts" if codec == "h264" else "jpeg"


class _Collector:
    """A write-only file object the MPEG-TS muxer writes into; ``take()`` returns what it wrote."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def ts_chunks(source: str, max_frames: int | None = None, chunk_frames: int = 1) -> Iterator[tuple[float, bytes]]:
    """(media time, MPEG-TS bytes) for SOURCE: H.264 remuxed as is, anything else encoded with libx264."""
    out = _Collector()
    with av.open(source, metadata_errors="ignore") as src:
        stream = _video_stream(src)
        copy = stream.codec_context.name == "h264"
        with av.open(out, "w", format="mpegts") as dst:
            rate = stream.average_rate or stream.guessed_rate or fractions.Fraction(25)
            encoded = 0
            if copy:
                target = dst.add_stream_from_template(stream)
            else:
                target = dst.add_stream("libx264", rate=rate)
                target.width, target.height = stream.codec_context.width, stream.codec_context.height
                target.pix_fmt = "yuv420p"
                target.options = {"preset": "ultrafast", "tune": "zerolatency", "g": "25"}
            frames = 0
            pending = 0
            start: float | None = None
            for packet in src.demux(stream):
                if packet.dts is None and packet.pts is None and packet.size == 0:
                    continue
                if copy:
                    if packet.size == 0:
                        continue
                    media = float(packet.pts * packet.time_base) if packet.pts is not None else None
                    packet.stream = target
                    dst.mux(packet)
                    produced = 1
                else:
                    produced = 0
                    media = None
                    for frame in packet.decode():
                        media = float(frame.time) if frame.time is not None else media
                        image = frame.reformat(format="yuv420p")
                        # Encoder timestamps count frames at the stream's rate.
                        image.pts, image.time_base = encoded, fractions.Fraction(1) / rate
                        encoded += 1
                        for out_packet in target.encode(image):
                            dst.mux(out_packet)
                        produced += 1
                frames += produced
                pending += produced
                if start is None and media is not None:
                    start = media
                if pending >= chunk_frames and out.buffer:
                    yield (media if media is not None else 0.0), out.take()
                    pending = 0
                if max_frames is not None and frames >= max_frames:
                    break
            if not copy:
                for out_packet in target.encode(None):
                    dst.mux(out_packet)
        tail = out.take()
        if tail:
            yield float("inf"), tail  # the end: send at once


def image_frames(source: str, kind: str = "jpeg", max_frames: int | None = None) -> Iterator[tuple[float, bytes]]:
    """(media time, timestamped JPEG/PNG message) per decoded frame of SOURCE."""
    encoder = None
    with av.open(source, metadata_errors="ignore") as container:
        stream = _video_stream(container)
        start = None
        for i, frame in enumerate(container.decode(stream)):
            if max_frames is not None and i >= max_frames:
                break
            media = float(frame.time) if frame.time is not None else i / 25.0
            start = media if start is None else start
            if encoder is None:
                encoder = av.CodecContext.create("mjpeg" if kind == "jpeg" else "png", "w")
                encoder.width, encoder.height = frame.width, frame.height
                encoder.pix_fmt = "yuvj420p" if kind == "jpeg" else "rgb24"
                encoder.time_base = fractions.Fraction(1, 1000)
            image = frame.reformat(format=encoder.pix_fmt)
            image.pts, image.time_base = i, encoder.time_base
            data = b"".join(bytes(p) for p in encoder.encode(image))
            yield media, TIMESTAMP_MAGIC + struct.pack(">d", media - start) + data


def paced(items: Iterator[tuple[float, bytes]], speed: float) -> AsyncIterator[bytes]:
    """Yield items at their media time (scaled by ``speed``; 0 = no pacing)."""

    async def generate() -> AsyncIterator[bytes]:
        wall0 = None
        media0 = None
        for media, data in items:
            if speed > 0 and media != float("inf"):
                now = time.monotonic()
                if wall0 is None or media0 is None:
                    wall0, media0 = now, media
                delay = (media - media0) / speed - (now - wall0)
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
            yield data

    return generate()


# ------------------------------------------------------------------------------------------ push
def message_pts(data: bytes) -> float | None:
    """The timestamp of a timestamped image message (``ASTS`` + big-endian double); None otherwise
    (MPEG-TS chunks, which cannot be thinned: later frames are predicted from earlier ones)."""
    if isinstance(data, bytes) and data[:4] == TIMESTAMP_MAGIC and len(data) >= 12:
        return struct.unpack(">d", data[4:12])[0]
    return None


def ws_url(options: ClientOptions, stream_id: str, after: int | None = None, window: int | None = None,
           open_window: int | None = None, open_steps: int | None = None) -> str:
    """The stream's WebSocket URL; on reconnection with what the client has seen so far (``after``:
    the last event, ``window``: the last window whose result arrived, ``open_window`` / ``open_steps``:
    a later window whose steps arrived without its result), so the server continues exactly there."""
    parts = urlsplit(options.server)
    scheme = "wss" if parts.scheme == "https" else "ws"
    query = {k: v for k, v in {"token": options.token, "budget": options.budget,
                                "window_frames": options.window_frames, "window_seconds": options.window_seconds,
                                "top_k": options.top_k, "emit": options.emit, "drop_policy": options.drop_policy,
                                "after": after, "window": window, "open_window": open_window,
                                "open_steps": open_steps}.items()
             if v is not None}
    path = parts.path.rstrip("/") + f"/v1/streams/{stream_id}/ws"
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


async def push(source: str, options: ClientOptions, on_event: Callable[[dict], None] | None = None,
               messages: AsyncIterator[bytes] | None = None) -> PushResult:
    """Push SOURCE (or the given ``messages``) to the server; returns every event received.

    Reconnects with the same stream id when the connection drops, resuming the event feed after the
    last event seen. Ends by sending ``{"type": "end"}`` and waiting for ``stream_ended``.
    """
    import websockets

    stream_id = options.stream_id or f"client-{uuid.uuid4().hex[:8]}"
    result = PushResult(stream_id)
    if messages is None:
        fmt = choose_format(source, options.format)
        items = ts_chunks(source, options.max_frames, options.chunk_frames) if fmt == "ts" \
            else image_frames(source, fmt, options.max_frames)
        messages = paced(items, options.speed)
    last_seq: int | None = None
    last_window: int | None = None  # the last window whose result arrived (told to the server on reconnect)
    open_window: int | None = None  # a later window whose steps arrived, but not (yet) its result
    open_steps = 0
    ended = asyncio.Event()
    source_done = False
    pending: bytes | None = None
    wanted_pts: float | None = None  # the server uses no frame before this timestamp (its next_pts)

    def handle(text: str) -> None:
        nonlocal last_seq, last_window, open_window, open_steps, wanted_pts
        event = json.loads(text)
        last_seq = event.get("seq", last_seq)
        if event.get("type") == "prediction":
            wanted_pts = event.get("next_pts")
            if event.get("final"):
                if last_window is None or event["window"] >= last_window:
                    last_window = event["window"]
                if open_window is not None and open_window <= last_window:
                    open_window, open_steps = None, 0
            elif last_window is None or event["window"] > last_window:
                open_window, open_steps = event["window"], event.get("step", 0) + 1
        result.events.append(event)
        if on_event is not None:
            on_event(event)
        if event.get("type") == "stream_ended":
            ended.set()

    deadline = None
    while True:
        wanted_pts = None  # a (new) replica says again what it needs
        try:
            async with websockets.connect(ws_url(options, stream_id, last_seq, last_window, open_window,
                                                 open_steps or None), max_size=None,
                                          open_timeout=30) as ws:
                deadline = None

                async def receive() -> None:
                    async for text in ws:
                        if isinstance(text, str):
                            handle(text)

                receiver = asyncio.create_task(receive())
                try:
                    if not source_done:
                        if pending is not None:
                            await ws.send(pending)
                            pending = None
                        async for data in messages:
                            pts = None if options.send_all or wanted_pts is None else message_pts(data)
                            if pts is not None and pts < wanted_pts:
                                result.frames_skipped += 1  # the server would drop it unseen
                                continue
                            pending = data
                            await ws.send(data)
                            pending = None
                            result.frames_sent += 1
                            if receiver.done():
                                break
                        else:
                            source_done = True
                    if source_done:
                        await ws.send(json.dumps({"type": "end"}))
                        await asyncio.wait_for(asyncio.shield(receiver), timeout=120)
                finally:
                    if not receiver.done():
                        receiver.cancel()
                    try:
                        await receiver
                    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - closing
                        pass
                result.close_code, result.close_reason = ws.close_code, ws.close_reason or ""
        except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as error:
            code = getattr(getattr(error, "rcvd", None), "code", None)
            result.close_code = code if code is not None else 1006
            result.close_reason = str(error)
        if ended.is_set() or (result.close_code is not None and result.close_code not in RECONNECT_CLOSE_CODES):
            return result
        # Dropped (a replica restarted, the network blinked): reconnect and carry on with the same id.
        now = time.monotonic()
        deadline = deadline or now + options.reconnect_s
        if now > deadline:
            return result
        result.reconnects += 1
        await asyncio.sleep(0.5)


# ------------------------------------------------------------------------------------------ pull
def pull(source: str, options: ClientOptions, on_event: Callable[[dict], None]) -> dict[str, Any]:
    """Ask the server to read SOURCE itself, then follow its events until the stream ends."""
    import requests

    headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
    body = {k: v for k, v in {"source": source, "stream_id": options.stream_id, "budget": options.budget,
                              "window_frames": options.window_frames, "window_seconds": options.window_seconds,
                              "top_k": options.top_k, "emit": options.emit,
                              "drop_policy": options.drop_policy}.items() if v is not None}
    base = options.server.rstrip("/")
    deadline = time.monotonic() + options.reconnect_s
    while True:
        reply = requests.post(f"{base}/v1/streams", json=body, headers=headers, timeout=30)
        # 503: the replica that answered is overloaded and says when to retry (another replica may
        # answer then); or the proxy in front has no replica to send it to.
        if reply.status_code != 503 or time.monotonic() > deadline:
            break
        retry_after = reply.headers.get("Retry-After", "")
        wait = float(retry_after) if retry_after.isdigit() else 5.0
        print(f"server unavailable (503), retrying in {wait:g} s: {reply.text[:200]}", file=sys.stderr)
        time.sleep(wait)
    if reply.status_code != 201:
        raise RuntimeError(f"server refused the stream ({reply.status_code}): {reply.text}")
    stream_id = reply.json()["stream_id"]
    with requests.get(f"{base}/v1/streams/{stream_id}/events", headers=headers, stream=True, timeout=None) as sse:
        for event in iter_sse(sse.iter_lines(decode_unicode=True)):
            on_event(event)
            if event.get("type") == "stream_ended":
                break
    return reply.json()


def iter_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parse a text/event-stream into the JSON objects of its ``data:`` fields."""
    data: list[str] = []
    for line in lines:
        if line is None:
            continue
        if line == "":
            if data:
                yield json.loads("\n".join(data))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield json.loads("\n".join(data))


# ------------------------------------------------------------------------------------------ output
def format_event(event: dict[str, Any]) -> str | None:
    kind = event.get("type")
    sid = event.get("stream_id")
    if kind == "prediction":
        top = " | ".join(f"{p['label']} {p['prob']:.3f}" for p in event["top_k"])
        flags = ("EXIT" if event["exited"] else "final") if event["final"] else ""
        box = ",".join(f"{v:.2f}" for v in event.get("box") or [])
        return (f"[{sid} w{event['window']} step {event['step'] + 1} frame {event['frame_index']} "
                f"t={event['stream_time']:.2f}s] {top}  {flags:5s} {event['gflops']:.4f} GFLOPs  box=({box})")
    if kind in ("window_restarted", "warning", "error", "source", "budget_changed", "stream_started",
                "stream_ended", "lagged"):
        rest = {k: v for k, v in event.items() if k not in ("type", "stream_id", "seq", "time")}
        return f"[{sid}] {kind}: {json.dumps(rest)}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a video file or a network stream URL (anything PyAV opens)")
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--stream-id")
    parser.add_argument("--token", help="the server's token (or $ADASTREAM_TOKEN)")
    parser.add_argument("--format", choices=["auto", "ts", "jpeg", "png"], default="auto")
    parser.add_argument("--speed", type=float, default=1.0, help="playback speed; 0 = as fast as possible")
    parser.add_argument("--budget", help="GFLOPs per window, full, min or auto")
    parser.add_argument("--window-frames", type=int)
    parser.add_argument("--window-seconds", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--emit", choices=["steps", "windows"])
    parser.add_argument("--drop-policy", choices=["drop_oldest", "drop_newest", "block"])
    parser.add_argument("--max-frames", type=int)
    parser.add_argument("--pull", action="store_true", help="let the server read SOURCE itself")
    parser.add_argument("--json", action="store_true", help="print raw JSON events")
    parser.add_argument("--send-all", action="store_true",
                        help="images: send every frame, also those the server said it will not use")
    args = parser.parse_args(argv)
    import os

    options = ClientOptions(server=args.server, stream_id=args.stream_id,
                            token=args.token or os.environ.get("ADASTREAM_TOKEN"), format=args.format,
                            speed=args.speed, budget=args.budget, window_frames=args.window_frames,
                            window_seconds=args.window_seconds, top_k=args.top_k, emit=args.emit,
                            drop_policy=args.drop_policy, max_frames=args.max_frames, send_all=args.send_all)

    def show(event: dict[str, Any]) -> None:
        text = json.dumps(event) if args.json else format_event(event)
        if text:
            print(text, flush=True)

    try:
        if args.pull:
            pull(args.source, options, show)
            return 0
        if "://" not in args.source and not Path(args.source).exists():
            print(f"stream_client: no such file: {args.source}", file=sys.stderr)
            return 2
        result = asyncio.run(push(args.source, options, show))
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, RuntimeError, av.error.FFmpegError) as error:
        print(f"stream_client: {error}", file=sys.stderr)
        return 1
    if result.close_code not in (1000, None):
        print(f"stream_client: the server closed the stream ({result.close_code}: {result.close_reason})",
              file=sys.stderr)
        return 1
    windows = {(e["window"]) for e in result.predictions if e.get("final")}
    print(f"stream_client: {result.frames_sent} messages sent ({result.frames_skipped} frames left out: the server "
          f"would not have used them), {len(windows)} windows recognised, "
          f"{result.reconnects} reconnects", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
