"""The serving app end to end: a real Ray Serve app on loopback, a model from a real MLflow registry
(sqlite in a temporary directory), real encoded video over real sockets -- WebSocket pushes of the
shared videos, MPEG-TS pulled over UDP and TCP from an ffmpeg sender, a file from an HTTP server --
plus replica failures, run-time budget changes, limits, auth, eviction, metrics and the two CLIs.

The model is a small untrained AdaFocusV2 registered with hand-made thresholds, so early exit is
deterministic: budget ``auto`` exits every window at its third frame, ``min`` at the first, ``full``
never. Predictions are checked against the same model run in this process on the same frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import http.server
import itertools
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import av
import numpy as np
import pytest
import requests
import torch

from adaptive import build_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOKEN = "serve-test-token"
T = 4  # frames per window (the registered model's T)
WINDOW_S = 0.8  # one frame every 0.2 s of stream time
CLASSES = ["alpha", "beta", "gamma", "delta"]
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------- fixtures
@contextlib.contextmanager
def _mlflow_store(uri: str) -> Iterator[None]:
    """Point MLflow (tracking and registry) at ``uri`` for a block, then put everything back exactly --
    globals and the environment (``set_tracking_uri`` exports ``MLFLOW_TRACKING_URI`` to every process
    started later, e.g. other tests' training subprocesses)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    environment = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    previous = tracking_utils._tracking_uri, registry_utils._registry_uri  # None when never set
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def registered(tmp_path_factory) -> dict[str, Any]:
    """A small AdaFocusV2 registered as ``models:/serve-test@live`` with deterministic thresholds."""
    import mlflow

    from pipelines.registry import register_model

    root = tmp_path_factory.mktemp("serve-mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    with _mlflow_store(uri):
        experiment = mlflow.create_experiment("serve-tests", artifact_location=(root / "artifacts").as_uri())
        torch.manual_seed(0)
        model = build_model("adafocus_v2", "tiny", num_classes=len(CLASSES), input_size=64, patch_size=32,
                            glance_size=32)
        step = model.step_macs() / 1e9
        exits = {"curve": [
            {"val_gflops": step, "test_gflops": step, "test_accuracy": 0.5, "criterion": "confidence",
             "thresholds": [0.0] * T},  # exit at the first frame
            {"val_gflops": 3 * step, "test_gflops": 3 * step, "test_accuracy": 0.7, "criterion": "confidence",
             "thresholds": [math.inf, math.inf, 0.0, 0.0]},  # exit at the third frame
        ], "budgets": []}
        with mlflow.start_run(experiment_id=experiment):
            register_model(model, method="adafocus_v2", classes=CLASSES, exits=exits,
                           data={"frames": T, "size": 72, "crop_size": 64, "coarse_to_fine": False},
                           registered_name="serve-test", alias="live", num_frames=T)
    return {"tracking_uri": uri, "model_uri": "models:/serve-test@live", "step_gflops": step}


@dataclass
class Server:
    url: str
    ws: str
    config: Any
    registered: dict[str, Any]

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, headers=kw.pop("headers", AUTH), timeout=30, **kw)

    def info(self) -> dict:
        return self.get("/v1/info").json()


@pytest.fixture(scope="module")
def server(ray_session, registered) -> Server:
    from ray import serve

    from pipelines.serve import ServeConfig, start

    port = free_port()
    config = start(ServeConfig(
        port=port, app_name="adastream-test", model_uri=registered["model_uri"],
        tracking_uri=registered["tracking_uri"], auth_token=TOKEN, window_seconds=WINDOW_S,
        max_streams=10, idle_timeout_s=6.0, max_message_bytes=300_000, max_pixels=1920 * 1080,
        max_fps_in=100, max_consecutive_errors=20, sync_interval_s=0.5, ingress_cpus=0.5,
        recognizer_replicas=2, recognizer_cpus=1.0,  # two: losing one is a retry on the other
        reconnect_initial_s=0.3, reconnect_max_s=1.0, open_timeout_s=5.0, read_timeout_s=3.0,
        api_requests_per_s=500, api_burst=1000, step_timeout_s=10.0,
        # Admission control is tested on its own app (test_an_overloaded_replica_...): here the suite's
        # streams share two cores with everything else, and a test's new stream must not be refused
        # because the one before it had just overloaded the replica.
        overload_window_s=0))
    try:
        yield Server(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", config, registered)
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def reference(registered):
    """The registered model in this process, to recompute what the server should have predicted --
    with the eager step, so the server's traced step (trace_model) is checked against it."""
    from pipelines.registry import load_registered_model
    from pipelines.serve.engine import StepEngine
    from pipelines.serve.frames import FrameTransform, ImageDecoder, Preprocess

    with _mlflow_store(registered["tracking_uri"]):
        loaded = load_registered_model(registered["model_uri"], tracking_uri=registered["tracking_uri"])
    return {"engine": StepEngine(loaded.model, trace=False), "transform": FrameTransform(Preprocess(72, 64)),
            "decoder": ImageDecoder()}


# ----------------------------------------------------------------------------------------- helpers
def jpeg_messages(path: Path, count: int, fps: float, start: int = 0) -> list[tuple[float, bytes]]:
    """(pts, ASTS-timestamped JPEG) for ``count`` frames of a video, pts = i / fps."""
    encoder = None
    out = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i < start:
                continue
            if len(out) >= count:
                break
            if encoder is None:
                encoder = av.CodecContext.create("mjpeg", "w")
                encoder.width, encoder.height, encoder.pix_fmt = frame.width, frame.height, "yuvj420p"
                encoder.time_base = fractions.Fraction(1, 1000)
            image = frame.reformat(format="yuvj420p")
            image.pts, image.time_base = len(out), encoder.time_base
            jpeg = b"".join(bytes(p) for p in encoder.encode(image))
            pts = len(out) / fps
            out.append((pts, b"ASTS" + struct.pack(">d", pts) + jpeg))
    return out


class Client:
    """A raw WebSocket client that records every event (and the close code)."""

    def __init__(self, server: Server, stream_id: str, token: str | None = TOKEN, **params: Any) -> None:
        query = "&".join(f"{k}={v}" for k, v in {"token": token, **params}.items() if v is not None)
        self.stream_id = stream_id
        self.url = f"{server.ws}/v1/streams/{stream_id}/ws?{query}"
        self.events: list[dict] = []
        self.close_code: int | None = None
        self.close_reason = ""

    async def __aenter__(self) -> "Client":
        import websockets

        self.ws = await websockets.connect(self.url, proxy=None, max_size=None, open_timeout=30)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        import websockets

        try:
            async for message in self.ws:
                self.events.append(json.loads(message))
        except websockets.exceptions.ConnectionClosed:
            pass
        self.close_code, self.close_reason = self.ws.close_code, self.ws.close_reason or ""

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()
        await asyncio.wait_for(self._reader, 10)

    async def send(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def closed(self, timeout: float = 15) -> int | None:
        await asyncio.wait_for(self._reader, timeout)
        return self.close_code

    async def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 20, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events if predicate(e)]
            if len(found) >= count:
                return found
            if self._reader.done():
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {count} matching events within {timeout}s; got {[e['type'] for e in self.events]}"
                             f" (close {self.close_code} {self.close_reason})")

    def predictions(self) -> list[dict]:
        return [e for e in self.events if e["type"] == "prediction"]


def finals(events: list[dict]) -> list[dict]:
    return [e for e in events if e["type"] == "prediction" and e["final"]]


def check_predictions(events: list[dict], stream_id: str, step_gflops: float) -> None:
    """Schema and bookkeeping of a stream's prediction events."""
    predictions = [e for e in events if e["type"] == "prediction"]
    assert predictions, f"{stream_id}: no predictions"
    assert all(e["stream_id"] == stream_id for e in events)
    for e in predictions:
        assert len(e["top_k"]) == 3 and {p["label"] for p in e["top_k"]} <= set(CLASSES)
        probs = [p["prob"] for p in e["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
        assert len(e["box"]) == 4 and all(0.0 <= v <= 1.0 for v in e["box"])
        assert e["box"][2] > e["box"][0] and e["box"][3] > e["box"][1]
        assert e["gflops"] == pytest.approx((e["step"] + 1) * step_gflops, rel=1e-3)
    # Within a window, steps count up from 0; every window that started has one final event.
    by_window: dict[int, list[dict]] = {}
    for e in predictions:
        by_window.setdefault(e["window"], []).append(e)
    for window, items in by_window.items():
        steps = [e["step"] for e in items if not (e["final"] and e["reason"] in ("duration", "end"))]
        # Runs of 0, 1, 2, ...; a window restarted after a replica loss starts a new run at 0.
        assert steps and all(b == a + 1 or b == 0 for a, b in zip(steps, steps[1:])) and steps[0] == 0, \
            f"{stream_id} window {window}: steps {steps}"
        assert sum(1 for e in items if e["final"]) <= 1
    # Frame numbers grow while one replica serves the stream (after a failover they continue from the
    # directory's record, which can be a moment behind: ``pts`` is what aligns results with video).
    era = 0
    indices: dict[int, list[int]] = {}
    for e in events:
        if e["type"] == "stream_started":
            era += 1
        elif e["type"] == "prediction" and e["latency_ms"] is not None:
            indices.setdefault(era, []).append(e["frame_index"])
    assert all(v == sorted(v) for v in indices.values())


def reference_probs(reference: dict, messages: list[bytes], indices: list[int]) -> list[np.ndarray]:
    """Softmax after each step of a window that saw ``messages[indices]`` (fresh state)."""
    from pipelines.serve.engine import StepRequest
    from pipelines.serve.frames import parse_message

    state = None
    out = []
    for i in indices:
        payload = parse_message(messages[i])
        image = reference["transform"](reference["decoder"].decode(payload.kind, payload.body))
        (result,) = reference["engine"].run([StepRequest("ref", image, state)])
        state = result.state
        z = np.exp(result.logits - result.logits.max())
        out.append(z / z.sum())
    return out


def check_against_reference(reference: dict, events: list[dict], messages: list[tuple[float, bytes]],
                            fps: float, tol: float = 2e-3) -> int:
    """Every step's top-k equals the in-process model on the frames the stream sent (found by pts).
    A restarted window (step back to 0) starts a new run. Returns the number of steps checked."""
    runs: list[list[dict]] = []
    for e in (e for e in events if e["type"] == "prediction" and e["latency_ms"] is not None):
        if not runs or e["step"] == 0 or runs[-1][-1]["window"] != e["window"]:
            runs.append([])
        runs[-1].append(e)
    checked = 0
    payloads = [m for _, m in messages]
    for run in runs:
        indices = [int(round(e["pts"] * fps)) for e in run]
        for e, probs in zip(run, reference_probs(reference, payloads, indices)):
            for p in e["top_k"]:
                assert abs(probs[p["index"]] - p["prob"]) < tol, (e["stream_id"], e["window"], e["step"], p, probs)
            checked += 1
    return checked


# ----------------------------------------------------------------------------------------- tests
def test_health_info_openapi_and_auth(server):
    assert requests.get(server.url + "/healthz", timeout=10).json()["status"] == "ok"
    assert server.get("/v1/info", headers={}).status_code == 401
    assert server.get("/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(server.url + f"/v1/info?token={TOKEN}", timeout=10).status_code == 200
    info = server.info()
    assert info["model"]["classes"] == CLASSES and info["model"]["num_frames"] == T
    assert info["model_runtime"] == "torchscript"  # the Recognizer's step is traced (trace_model=true)
    assert info["budget"]["budget"] == "auto"
    # The session's Ray runs the product's default data plane (tests/conftest.py): HAProxy + gRPC handles.
    expected = os.environ.get("ADASTREAM_TEST_SERVE_PROXY", "haproxy") == "haproxy"
    assert info["data_plane"] == ({"http": "haproxy", "handles": "grpc"} if expected
                                  else {"http": "python_proxy", "handles": "ray_actor_calls"})
    assert info["budget"]["gflops"] == pytest.approx(3 * server.registered["step_gflops"])
    lag = info["event_loop_lag_ms"]  # sampled every 0.1 s since the replica started
    assert lag["p50"] is not None and 0 <= lag["p50"] <= lag["p90"] <= lag["max"]
    spec = server.get("/openapi.json").json()
    for path in ("/v1/streams", "/v1/streams/{stream_id}", "/v1/streams/{stream_id}/events", "/v1/budget"):
        assert path in spec["paths"], path
    assert "post" in spec["paths"]["/v1/streams"] and "delete" in spec["paths"]["/v1/streams/{stream_id}"]

    async def wrong_token() -> int | None:
        async with Client(server, "intruder", token="nope") as client:
            return await client.closed()

    assert asyncio.run(wrong_token()) == 4401


def test_shared_videos_pushed_over_websocket(server, shared_video_paths):
    """All four shared videos at once: H.264 remuxed to MPEG-TS, MPEG-4 (with audio) encoded to H.264
    in MPEG-TS by the client, the 29.97 fps file as JPEG frames, and the 32-frame clip as PNG frames."""
    from pipelines.stream_client import ClientOptions, push

    plan = {"demo.mp4": "ts", "test_mpeg4_audio.avi": "ts", "structuralize_2997fps.mp4": "jpeg",
            "short_32frames.mp4": "png"}
    videos = {p.name: p for p in shared_video_paths}
    assert set(plan) <= set(videos)

    async def run_all():
        # drop_policy=block: the server back-pressures the client rather than dropping frames when the
        # machine is busy, so every window's course is deterministic.
        jobs = [push(str(videos[name]), ClientOptions(server=server.url, stream_id=f"shared-{i}", token=TOKEN,
                                                      format=fmt, speed=2.0, chunk_frames=4, reconnect_s=10,
                                                      drop_policy="block"))
                for i, (name, fmt) in enumerate(plan.items())]
        return await asyncio.gather(*jobs)

    results = asyncio.run(run_all())
    step = server.registered["step_gflops"]
    for (name, fmt), result in zip(plan.items(), results):
        assert result.close_code == 1000, (name, result.close_code, result.close_reason)
        types = [e["type"] for e in result.events]
        assert types[0] == "stream_started" and types[-1] == "stream_ended", (name, types)
        assert "error" not in types, (name, [e for e in result.events if e["type"] == "error"])
        check_predictions(result.events, result.stream_id, step)
        windows = finals(result.events)
        with av.open(str(videos[name])) as container:
            duration = float(container.streams.video[0].duration * container.streams.video[0].time_base)
        assert len(windows) >= int(duration / WINDOW_S) - 1, (name, len(windows), duration)
        exits = [e for e in windows if e["reason"] == "exit"]
        # The "auto" budget exits every window at its third frame (the last one may end first).
        assert all(e["step"] == 2 and e["exited"] for e in exits)
        assert len(exits) >= len(windows) - 1, [(e["window"], e["step"], e["reason"]) for e in windows]
        assert result.events[-1]["counters"]["frames_dropped"] == 0
        assert all(e["pts"] is not None for e in result.predictions)
        ended = result.events[-1]["counters"]
        assert ended["gflops_saved"] == pytest.approx(len(exits) * step, rel=1e-3)
        # Completed-window counters match the final results the client got (frames per window = their ratio).
        assert ended["windows_done"] == len(windows) and ended["exits"] == len(exits)
        assert ended["steps_done"] == sum(e["step"] + 1 for e in windows) == ended["steps"]
        # After an exit the server says from which timestamp on it needs frames again (the next window):
        # an image client leaves the frames before it out; MPEG-TS chunks cannot be thinned.
        assert all(e["next_pts"] >= e["pts"] + 1.5 * WINDOW_S / T for e in exits), [(e["pts"], e["next_pts"]) for e in exits]
        if fmt == "ts":
            assert result.frames_skipped == 0
        elif fmt == "jpeg":  # (the 32-frame PNG clip is sent before its first result comes back)
            assert result.frames_skipped > 0, name


def _sse_thread(server: Server, stream_id: str, sink: list[dict]) -> threading.Thread:
    from pipelines.stream_client import iter_sse

    def follow() -> None:
        with requests.get(f"{server.url}/v1/streams/{stream_id}/events", headers=AUTH, stream=True,
                          timeout=60) as response:
            assert response.status_code == 200
            for event in iter_sse(response.iter_lines(decode_unicode=True)):
                sink.append(event)
                if event["type"] == "stream_ended":
                    return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _ffmpeg_sender(video: Path, url: str) -> subprocess.Popen:
    """The test sender: ffmpeg plays the file in real time (looping) as MPEG-TS to ``url``."""
    import imageio_ffmpeg

    return subprocess.Popen([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-re", "-stream_loop", "-1",
                             "-i", str(video), "-an", "-c:v", "copy", "-f", "mpegts", url],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_pull_mpegts_over_udp_and_tcp_with_reconnect(server, shared_video_paths):
    video = next(p for p in shared_video_paths if p.name == "demo.mp4")
    step = server.registered["step_gflops"]
    # UDP: the server listens, the sender sends datagrams to it.
    udp_port = free_port(socket.SOCK_DGRAM)
    udp_sender = _ffmpeg_sender(video, f"udp://127.0.0.1:{udp_port}?pkt_size=1316")
    tcp_port = free_port()
    tcp_sender = _ffmpeg_sender(video, f"tcp://127.0.0.1:{tcp_port}?listen=1")
    try:
        reply = requests.post(f"{server.url}/v1/streams", headers=AUTH, timeout=30,
                              json={"source": f"udp://127.0.0.1:{udp_port}", "stream_id": "udp-cam"})
        assert reply.status_code == 201, reply.text
        assert reply.headers["Location"].endswith("/v1/streams/udp-cam")
        time.sleep(0.5)  # ffmpeg must be listening before the server connects (it retries anyway)
        reply = requests.post(f"{server.url}/v1/streams", headers=AUTH, timeout=30,
                              json={"source": f"tcp://127.0.0.1:{tcp_port}", "stream_id": "tcp-cam", "top_k": 3})
        assert reply.status_code == 201, reply.text
        assert requests.post(f"{server.url}/v1/streams", headers=AUTH, timeout=30,
                             json={"source": "udp://127.0.0.1:9", "stream_id": "tcp-cam"}).status_code == 409
        udp_events: list[dict] = []
        tcp_events: list[dict] = []
        udp_thread = _sse_thread(server, "udp-cam", udp_events)
        tcp_thread = _sse_thread(server, "tcp-cam", tcp_events)
        _wait(lambda: len(finals(udp_events)) >= 3 and len(finals(tcp_events)) >= 3, 40, "pulled predictions")

        # The TCP source fails (sender killed) and comes back: the stream reconnects by itself.
        tcp_sender.terminate()
        tcp_sender.wait(10)
        _wait(lambda: any(e["type"] == "source" and e["status"] in ("error", "reconnecting") for e in tcp_events),
              15, "the reconnect attempt")
        before = len(finals(tcp_events))
        tcp_sender = _ffmpeg_sender(video, f"tcp://127.0.0.1:{tcp_port}?listen=1")
        _wait(lambda: len(finals(tcp_events)) >= before + 3, 40, "predictions after the source came back")
        connected = [e for e in tcp_events if e["type"] == "source" and e["status"] == "connected"]
        assert len(connected) >= 2

        listing = {s["stream_id"]: s for s in server.get("/v1/streams").json()["streams"]}
        assert listing["udp-cam"]["status"] == "live" and listing["tcp-cam"]["kind"] == "pull"
        status = server.get("/v1/streams/tcp-cam").json()
        assert status["counters"]["steps"] > 0 and status["fps_in"] > 5
        assert set(status["decoder"]) == {"frames_decoded", "packets_left_out", "decode_errors", "decoder_threads",
                                          "catch_ups", "packets_behind", "dozed_s", "dozing_s",
                                          "packets_held", "holds_expired"}
        assert status["decoder"]["frames_decoded"] > 0
        assert status["decoder"]["decoder_threads"] == 1  # a small picture decodes in its reader thread
        for name in ("udp-cam", "tcp-cam"):
            assert requests.delete(f"{server.url}/v1/streams/{name}", headers=AUTH, timeout=30).status_code == 204
        udp_thread.join(20)
        tcp_thread.join(20)
    finally:
        for sender in (udp_sender, tcp_sender):
            sender.kill()
            sender.wait(10)
    for name, events in (("udp-cam", udp_events), ("tcp-cam", tcp_events)):
        assert events[-1]["type"] == "stream_ended" and events[-1]["status"] == "deleted"
        check_predictions(events, name, step)
    assert server.get("/v1/streams/udp-cam").json()["status"] == "deleted"


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Python's file server plus single byte ranges (``Range: bytes=a-b``), as any real HTTP server
    has: FFmpeg seeks in an MP4 over HTTP with range requests."""

    def log_message(self, *args: Any) -> None:
        pass

    def send_head(self):  # noqa: ANN201 - http.server's signature
        spec = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not spec or not spec.startswith("bytes=") or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        first, _, last = spec[6:].partition("-")
        start = int(first) if first else max(0, size - int(last))
        end = min(int(last), size - 1) if first and last else size - 1
        if start >= size:
            self.send_error(416)
            return None
        handle = path.open("rb")
        handle.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self._remaining = end - start + 1
        return handle

    def copyfile(self, source, outputfile):  # noqa: ANN001, ANN201
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        while remaining > 0:
            chunk = source.read(min(65536, remaining))
            if not chunk:
                break
            outputfile.write(chunk)
            remaining -= len(chunk)


def test_pull_file_from_http_server_and_bad_sources(server, shared_video_paths):
    directory = shared_video_paths[0].parent
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_RangeHandler, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        reply = requests.post(f"{server.url}/v1/streams", headers=AUTH, timeout=30,
                              json={"source": f"{base}/short_32frames.mp4", "stream_id": "http-file",
                                    "window_seconds": 0.4, "budget": "full"})
        assert reply.status_code == 201, reply.text
        events: list[dict] = []
        _sse_thread(server, "http-file", events).join(30)
        assert events and events[-1]["type"] == "stream_ended", events[-3:]
        assert any(e["type"] == "source" and e["status"] == "ended" for e in events), \
            [(e["type"], e.get("status"), e.get("message")) for e in events]
        windows = finals(events)
        assert len(windows) >= 2 and all(e["reason"] in ("frames", "duration", "end") for e in windows)
        assert all(not e["exited"] for e in windows)  # budget "full": no early exit
        check_predictions(events, "http-file", server.registered["step_gflops"])

        # A URL that is not a video: the stream fails with the reason; bad requests are refused up front.
        reply = requests.post(f"{server.url}/v1/streams", headers=AUTH, timeout=30,
                              json={"source": f"{base}/README.md", "stream_id": "not-a-video"})
        assert reply.status_code == 201
        failed: list[dict] = []
        _sse_thread(server, "not-a-video", failed).join(30)
        assert failed[-1]["type"] == "stream_ended" and failed[-1]["status"] == "failed"
    finally:
        httpd.shutdown()
    for body, status in [({"source": "ftp://127.0.0.1/x.mp4"}, 422), ({"source": "/no/such/file.mp4"}, 422),
                         ({"source": "udp://127.0.0.1:9", "window_frames": 0}, 422),
                         ({"source": "udp://127.0.0.1:9", "budget": "lots"}, 422),
                         ({"source": "udp://127.0.0.1:9", "stream_id": "bad id!"}, 422),
                         ({"source": "udp://127.0.0.1:9", "surprise": 1}, 422)]:
        reply = requests.post(f"{server.url}/v1/streams", headers=AUTH, json=body, timeout=30)
        assert reply.status_code == status, (body, reply.status_code, reply.text)


def test_budget_changes_at_run_time_globally_and_per_stream(server, shared_video_paths):
    video = next(p for p in shared_video_paths if p.name == "demo.mp4")
    fps = 10.0
    messages = jpeg_messages(video, 100, fps)  # 10 s of stream time: 12 windows of 0.8 s
    recognizer = server.info()["recognizer_replica"]

    async def scenario() -> list[dict]:
        async with Client(server, "budgets") as client:
            sent = 0

            async def window(n_windows: int) -> list[dict]:
                """Send frames until ``n_windows`` more windows have a final result."""
                nonlocal sent
                target = len(finals(client.events)) + n_windows
                while len(finals(client.events)) < target:
                    await client.send(messages[sent][1])
                    sent += 1
                    await asyncio.sleep(0.02)
                    if sent % 8 == 0:
                        await asyncio.sleep(0.3)  # let the worker catch up: decisions follow the budget
                return finals(client.events)[-n_windows:]

            auto = await window(2)
            await client.send(json.dumps({"type": "budget", "budget": "min"}))
            await client.wait_for(lambda e: e["type"] == "budget_changed")
            minimum = await window(2)
            assert requests.patch(f"{server.url}/v1/streams/budgets", headers=AUTH, json={"budget": "full"},
                                  timeout=30).json()["budget"]["budget"] == "full"
            full = await window(2)
            # The server-wide budget does not touch a stream with its own...
            assert requests.put(f"{server.url}/v1/budget", headers=AUTH, json={"budget": "min"},
                                timeout=30).status_code == 200
            still_full = await window(1)
            # ...until the stream goes back to following the server.
            requests.patch(f"{server.url}/v1/streams/budgets", headers=AUTH, json={"budget": None}, timeout=30)
            following = await window(2)
            requests.put(f"{server.url}/v1/budget", headers=AUTH, json={"budget": "auto"}, timeout=30)
            assert requests.put(f"{server.url}/v1/budget", headers=AUTH, json={"budget": 1e-9},
                                timeout=30).status_code == 422
            await client.send(json.dumps({"type": "end"}))
            await client.closed()
            return [auto, minimum, full, still_full, following]

    auto, minimum, full, still_full, following = asyncio.run(scenario())
    assert all(e["exited"] and e["step"] == 2 and e["budget"] == "auto" for e in auto)
    assert all(e["exited"] and e["step"] == 0 and e["budget"] == "min" for e in minimum[-1:])
    assert all(not e["exited"] and e["step"] == T - 1 and e["reason"] == "frames" for e in full[-1:])
    assert still_full[0]["budget"] == "full" and still_full[0]["step"] == T - 1
    assert following[-1]["budget"] == "min" and following[-1]["step"] == 0
    assert server.info()["recognizer_replica"] == recognizer  # no model reload
    assert server.info()["budget"]["budget"] == "auto"


def _tiny_jpeg() -> bytes:
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 16, 16, "yuvj420p"
    encoder.time_base = fractions.Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), dtype=np.uint8), format="rgb24").reformat(
        format="yuvj420p")
    frame.pts, frame.time_base = 0, encoder.time_base
    return b"".join(bytes(p) for p in encoder.encode(frame))


def _huge_jpeg_header(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header claims ``width`` x ``height``."""
    data = bytearray(jpeg)
    i = 2
    while True:
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length


def test_limits_and_malformed_input_leave_other_streams_served(server, shared_video_paths):
    video = next(p for p in shared_video_paths if p.name == "structuralize_2997fps.mp4")
    messages = jpeg_messages(video, 120, 10.0)
    raw_jpeg = messages[0][1][12:]
    tiny_jpeg = _tiny_jpeg()

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with Client(server, "bystander") as good:
            async def keep_sending() -> None:
                for _, data in messages:
                    await good.send(data)
                    await asyncio.sleep(0.1)

            sending = asyncio.create_task(keep_sending())
            await good.wait_for(lambda e: e["type"] == "prediction")
            started = time.time()

            # Malformed frames: refused one by one with an error event; the stream goes on.
            async with Client(server, "malformed", drop_policy="block") as bad:  # every frame gets decoded
                await bad.send(b"definitely not a frame")
                await bad.send(b"\xff\xd8\xff\xe0" + bytes(64))  # JPEG magic, no frame header
                await bad.send(raw_jpeg[: raw_jpeg.index(b"\xff\xda")])  # headers, no image data
                await bad.send(_huge_jpeg_header(raw_jpeg, 20000, 20000))
                await bad.send("{not json")
                for _, data in messages[:12]:
                    await bad.send(data)
                await bad.wait_for(lambda e: e["type"] == "prediction", timeout=20)
                out["malformed"] = [e.get("code") for e in bad.events if e["type"] == "error"]
            # An oversized message closes that stream only.
            async with Client(server, "oversized") as big:
                await big.send(bytes([0xFF, 0xD8, 0xFF]) + bytes(400_000))
                out["oversized"] = await big.closed()
            # Flooding far above the frame-rate limit (tiny valid images: cheap to send and to refuse).
            async with Client(server, "flood") as flood:
                try:
                    for _ in range(3000):
                        await flood.send(tiny_jpeg)
                except Exception:  # noqa: BLE001 - closed mid-flood
                    pass
                out["flood"] = await flood.closed()
            for name in ("malformed", "oversized", "flood"):  # disconnected streams still hold a slot
                assert requests.delete(f"{server.url}/v1/streams/{name}", headers=AUTH, timeout=30).status_code == 204
            # Too many streams: fill up to the limit, then one more.
            open_now = len(server.get("/v1/streams").json()["streams"])
            fillers = [Client(server, f"filler-{i}") for i in range(server.config.max_streams - open_now)]
            for filler in fillers:
                await filler.__aenter__()
                await filler.wait_for(lambda e: e["type"] == "stream_started")
            async with Client(server, "one-too-many") as extra:
                out["too_many"] = (await extra.closed(), extra.close_reason)
            out["too_many_post"] = requests.post(f"{server.url}/v1/streams", headers=AUTH, timeout=30,
                                                 json={"source": "udp://127.0.0.1:9"}).status_code
            for filler in fillers:
                await filler.__aexit__()
                # Disconnected push streams keep their slot until the idle timeout: free them, so the
                # next tests start with room.
                assert requests.delete(f"{server.url}/v1/streams/{filler.stream_id}", headers=AUTH,
                                       timeout=30).status_code == 204
            # The well-behaved stream keeps getting results through all of it.
            await good.wait_for(lambda e: e["type"] == "prediction" and e["final"] and e["time"] > started,
                                count=3, timeout=30)
            out["bystander"] = [e for e in good.predictions() if e["time"] > started]
            sending.cancel()
            await good.send(json.dumps({"type": "end"}))
            await good.closed()
            out["bystander_events"] = good.events
        return out

    out = asyncio.run(scenario())
    assert "unsupported_payload" in out["malformed"] and "bad_message" in out["malformed"]
    assert out["malformed"].count("malformed_frame") >= 2 and "frame_too_large" in out["malformed"]
    assert out["oversized"] == 1009
    assert out["flood"] == 4429
    assert out["too_many"][0] == 1013 and "too many streams" in out["too_many"][1]
    assert out["too_many_post"] == 429
    # Meanwhile the well-behaved stream kept getting results, with no errors.
    assert len(finals(out["bystander"])) >= 3
    assert not [e for e in out["bystander_events"] if e["type"] == "error"]


def _kill_replica(actor_name: str) -> None:
    import ray

    ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)


def test_killed_replicas_lose_no_stream_and_mix_none_up(server, shared_video_paths, reference):
    """Three pushed streams of different videos and a pulled one; the recognizer replica is killed, later
    the ingress replica (which holds the WebSockets and reads the pulled source): every stream keeps
    getting results, each computed on its own frames, and the pulled stream is taken over."""
    from pipelines.stream_client import ClientOptions, iter_sse, push

    udp_port = free_port(socket.SOCK_DGRAM)
    sender = _ffmpeg_sender(next(p for p in shared_video_paths if p.name == "demo.mp4"),
                            f"udp://127.0.0.1:{udp_port}?pkt_size=1316")
    reply = requests.post(f"{server.url}/v1/streams", headers=AUTH, timeout=30,
                          json={"source": f"udp://127.0.0.1:{udp_port}", "stream_id": "kill-pull"})
    assert reply.status_code == 201, reply.text

    fps = 10.0
    names = ["demo.mp4", "structuralize_2997fps.mp4", "test_mpeg4_audio.avi"]
    videos = {p.name: p for p in shared_video_paths}
    streams = {f"kill-{i}": jpeg_messages(videos[name], 110, fps) for i, name in enumerate(names)}
    info = server.info()
    kills: dict[str, float] = {}

    async def paced(messages: list[tuple[float, bytes]]):
        start = time.monotonic()
        for pts, data in messages:
            delay = pts - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            yield data

    live: dict[str, list[dict]] = {sid: [] for sid in streams}

    def results_since(t: float) -> bool:
        return all(any(e["type"] == "prediction" and e["final"] and e["time"] > t for e in events)
                   for events in live.values())

    async def killer() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(1.5)
        kills["recognizer"] = time.time()
        await loop.run_in_executor(None, _kill_replica, info["recognizer_replica"])
        # Every stream gets results again (from a new recognizer replica) before the next blow.
        deadline = time.monotonic() + 30
        while not results_since(kills["recognizer"] + 0.2) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        kills["recovered"] = time.time()
        # Strike the ingress in the middle of the streams' windows, so windows have to restart.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            last = [next((e for e in reversed(events) if e["type"] == "prediction"), None) for events in live.values()]
            if all(e is not None and not e["final"] for e in last):
                break
            await asyncio.sleep(0.01)
        kills["ingress"] = time.time()
        await loop.run_in_executor(None, _kill_replica, info["replica"])

    async def run_all():
        # drop_policy=block: frames the client could not send while a replica was down arrive late,
        # in a burst; with back-pressure none is dropped, so every window can be checked.
        jobs = [push("", ClientOptions(server=server.url, stream_id=sid, token=TOKEN, reconnect_s=60,
                                       drop_policy="block"), on_event=live[sid].append, messages=paced(messages))
                for sid, messages in streams.items()]
        return await asyncio.gather(killer(), *jobs)

    began = time.time()
    try:
        _, *results = asyncio.run(run_all())
        # The pulled stream: adopted by the new ingress replica, which reopened the source.
        def adopted() -> bool:
            try:
                summary = server.get("/v1/streams/kill-pull").json()
                replica = server.info()["replica"]
            except (requests.RequestException, ValueError, KeyError):
                return False
            # Served by the replica that answers (the new one), not the directory's record of the old one.
            return summary.get("owner") == replica != info["replica"] and summary.get("status") == "live" \
                and summary.get("counters", {}).get("steps", 0) > 0

        _wait(adopted, 60, "the pulled stream to be taken over")
        with requests.get(f"{server.url}/v1/streams/kill-pull/events", headers=AUTH, stream=True,
                          timeout=60) as response:
            assert response.status_code == 200, response.text
            pulled = []
            for event in iter_sse(response.iter_lines(decode_unicode=True)):
                pulled.append(event)
                if event["type"] == "prediction" and event["time"] > kills["ingress"]:
                    break
        assert requests.delete(f"{server.url}/v1/streams/kill-pull", headers=AUTH, timeout=30).status_code == 204
    finally:
        sender.kill()
        sender.wait(10)
    assert pulled[0]["type"] == "stream_started" and pulled[0]["resumed"]  # the new replica's history
    assert pulled[0]["seq"] > 1000  # numbering jumped ahead of anything the old replica published
    for r in results:
        times = [(round(e["time"] - began, 2), e["type"], e.get("window"), e.get("step")) for e in r.events
                 if e["type"] != "prediction" or e["final"]]
        print("TIMELINE", r.stream_id, kills["recognizer"] - began, kills["ingress"] - began, times)
    assert server.info()["replica"] != info["replica"]  # Serve replaced the ingress replica
    for sid, events in live.items():  # results resumed after the recognizer's death, before the ingress'
        assert any(e["type"] == "prediction" and e["final"] and kills["recognizer"] < e["time"] < kills["ingress"]
                   for e in events), sid
    total_checked = 0
    for (sid, messages), result in zip(streams.items(), results):
        events = result.events
        assert result.close_code == 1000, (sid, result.close_code, result.close_reason)
        assert events[-1]["type"] == "stream_ended"
        assert result.reconnects >= 1  # the ingress replica's death dropped the connection
        after = [e for e in finals(events) if e["time"] > kills["ingress"] + 0.5]
        assert len(after) >= 2, (sid, "no results after the ingress replica was killed",
                                 [(e["type"], e.get("window"), e.get("step"), e["time"] - kills["ingress"])
                                  for e in events])
        assert any(e["type"] in ("window_restarted", "stream_started") and e.get("resumed", True)
                   for e in events if e["time"] > kills["ingress"])
        check_predictions(events, sid, server.registered["step_gflops"])
        total_checked += check_against_reference(reference, events, messages, fps)
    cut_windows = 0
    for result in results:
        # A window cut short by the ingress' death is restarted with an explicit event; the stream
        # itself says it was resumed (numbering continues: windows, frames, events).
        before = [e for e in result.events if e["time"] < kills["ingress"] and e["type"] == "prediction"]
        cut = {e["window"] for e in before} - {e["window"] for e in before if e["final"]}
        restarted = {e["window"] for e in result.events if e["type"] == "window_restarted"}
        # ...or, when the old replica had finished the window but the result died with the
        # connection, the result is delivered again by the new replica.
        replayed = {e["window"] for e in result.events if e["type"] == "prediction" and e.get("replayed")}
        assert cut <= restarted | replayed, (result.stream_id, cut, restarted, replayed)
        cut_windows += len(cut)
        resumed = [e for e in result.events if e["type"] == "stream_started" and e["time"] > kills["ingress"]]
        assert resumed and resumed[0]["resumed"], result.stream_id
        seqs = [e["seq"] for e in result.events]
        assert seqs == sorted(set(seqs)), "event numbers continue across the replica change"
    assert cut_windows >= 1  # the restart path was exercised
    assert total_checked >= 20
    # The comparison has teeth: another stream's frames would not have matched.
    a, b = list(streams.values())[:2]
    pa, pb = reference_probs(reference, [m for _, m in a], [0]), reference_probs(reference, [m for _, m in b], [0])
    assert np.abs(pa[0] - pb[0]).max() > 1e-2


def test_model_colocated_in_the_ingress(server, shared_video_paths, reference):
    """colocate_model: the same API and results with the model inside the ingress replica (a second app
    on the same Serve instance, under another route prefix)."""
    from ray import serve

    from pipelines.serve import ServeConfig, start
    from pipelines.stream_client import ClientOptions, push

    config = start(ServeConfig(port=server.config.port, app_name="adastream-colocated", route_prefix="/colo",
                               model_uri=server.registered["model_uri"], tracking_uri=server.registered["tracking_uri"],
                               auth_token=TOKEN, window_seconds=WINDOW_S, colocate_model=True, ingress_cpus=0.5,
                               sync_interval_s=0.5))
    try:
        colocated = Server(config.url, config.url.replace("http://", "ws://"), config, server.registered)
        info = colocated.info()
        assert info["replica"] == info["recognizer_replica"]  # one replica does both
        assert info["model_runtime"] == "torchscript"  # results checked against the eager reference below
        video = next(p for p in shared_video_paths if p.name == "test_mpeg4_audio.avi")
        fps = 10.0
        messages = jpeg_messages(video, 30, fps)

        async def frames():
            for _, data in messages:
                yield data

        result = asyncio.run(push("", ClientOptions(server=colocated.url, stream_id="colocated", token=TOKEN,
                                                    drop_policy="block"), messages=frames()))
        assert result.close_code == 1000
        check_predictions(result.events, "colocated", server.registered["step_gflops"])
        assert len(finals(result.events)) >= 3
        assert check_against_reference(reference, result.events, messages, fps) >= 6
    finally:
        serve.delete("adastream-colocated")


def test_an_overloaded_replica_refuses_new_streams_and_serves_its_own(server, shared_video_paths):
    """Admission control (overload.py) on a replica the suite really overloads: three streams push
    every frame to the model (``window_seconds=0``) at 50 fps, more than a stream's steps can follow
    (each waits its turn in a pass, and passes wait up to ``batch_wait_timeout_s`` for company), so
    their frames are dropped for want of compute. New streams then get 503 / close 1013 while the three
    are still served, and are admitted again once the drops have aged out of ``overload_window_s``."""
    from ray import serve

    from pipelines.serve import ServeConfig, start

    config = start(ServeConfig(port=server.config.port, app_name="adastream-admission", route_prefix="/busy",
                               model_uri=server.registered["model_uri"], tracking_uri=server.registered["tracking_uri"],
                               auth_token=TOKEN, colocate_model=True, ingress_cpus=0.5, overload_window_s=2.0,
                               # Only the first sign: on a busy machine the neighbours alone can make
                               # this replica's loop late (the second sign, unit-tested in test_serve.py).
                               overload_loop_lag_ms=60_000))
    busy = Server(config.url, config.url.replace("http://", "ws://"), config, server.registered)
    video = next(p for p in shared_video_paths if p.name == "test_mpeg4_audio.avi")
    messages = jpeg_messages(video, 40, 5.0)
    udp = f"udp://127.0.0.1:{free_port(socket.SOCK_DGRAM)}"

    def admission() -> dict:
        return busy.info()["admission"]

    def create(stream_id: str) -> requests.Response:
        return requests.post(f"{busy.url}/v1/streams", headers=AUTH, timeout=30,
                             json={"source": udp, "stream_id": stream_id})

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {"before": admission()}
        flooders = [Client(busy, f"flood-{i}", window_seconds=0) for i in range(3)]
        for flooder in flooders:
            await flooder.__aenter__()
        stop = asyncio.Event()

        async def flood(client: Client) -> None:
            i = 0
            while not stop.is_set():
                await client.send(messages[i % len(messages)][1][12:])  # untimestamped: every frame is due
                i += 1
                await asyncio.sleep(0.02)

        tasks = [asyncio.create_task(flood(f)) for f in flooders]
        deadline = time.monotonic() + 30
        while not (state := await asyncio.to_thread(admission))["overloaded"] and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        out["overloaded"] = state
        out["post"] = await asyncio.to_thread(create, "refused-pull")
        async with Client(busy, "refused-push") as refused:
            out["push"] = (await refused.closed(), refused.close_reason)
        served_from = time.time()
        await asyncio.gather(*(f.wait_for(lambda e: e["type"] == "prediction" and e["time"] > served_from,
                                          timeout=30) for f in flooders))
        out["served"] = True
        stop.set()
        await asyncio.gather(*tasks)
        for flooder in flooders:
            await flooder.send(json.dumps({"type": "end"}))
            await flooder.closed()
            out.setdefault("dropped", []).append(
                (await asyncio.to_thread(busy.get, f"/v1/streams/{flooder.stream_id}")).json()["counters"]["dropped"])
        deadline = time.monotonic() + 30
        while (state := await asyncio.to_thread(admission))["overloaded"] and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        out["recovered"] = state
        out["post_after"] = await asyncio.to_thread(create, "admitted-pull")
        # Coming back from the overload, the replica lets new streams in one at a time at first.
        async with Client(busy, "ramped-push") as ramped:
            out["ramped"] = (await ramped.closed(), ramped.close_reason)
        deadline = time.monotonic() + 30
        while (await asyncio.to_thread(admission))["overloaded"] and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        async with Client(busy, "admitted-push") as admitted:
            await admitted.wait_for(lambda e: e["type"] == "stream_started")
        return out

    try:
        out = asyncio.run(scenario())
    finally:
        serve.delete("adastream-admission")
    assert out["before"]["overloaded"] is False and out["before"]["limits"]["window_s"] == 2.0
    assert all(d.get("queue_full", 0) > 0 for d in out["dropped"]), out["dropped"]
    assert out["overloaded"]["overloaded"] is True and "for want of compute" in out["overloaded"]["reason"]
    assert out["post"].status_code == 503 and out["post"].headers["Retry-After"] == "2"
    assert "overloaded" in out["post"].json()["detail"]
    assert out["push"][0] == 1013 and "overloaded" in out["push"][1]
    assert out["served"]  # the streams it has are still served
    assert out["recovered"]["overloaded"] is False and out["post_after"].status_code == 201
    assert out["ramped"][0] == 1013 and "coming back from an overload" in out["ramped"][1], out["ramped"]


def test_ingress_replicas_share_streams_and_answer_for_each_other(server, shared_video_paths):
    """ingress_replicas=2: pulled streams spread over both replicas, and whichever replica a request
    lands on answers for every stream, from the moment it was created -- its status, its server-sent events (relayed from the replica
    serving it, in order, to the end), a change of budget and a deletion (202, carried out by the
    owner)."""
    from ray import serve

    from pipelines.serve import ServeConfig, start
    from pipelines.stream_client import iter_sse

    config = start(ServeConfig(port=server.config.port, app_name="adastream-replicas", route_prefix="/replicas",
                               model_uri=server.registered["model_uri"], tracking_uri=server.registered["tracking_uri"],
                               auth_token=TOKEN, window_seconds=WINDOW_S, colocate_model=True, ingress_replicas=2,
                               ingress_cpus=0.25, sync_interval_s=0.5, api_requests_per_s=500, api_burst=1000))
    url = config.url
    video = next(p for p in shared_video_paths if p.name == "demo.mp4")
    try:
        # Serve's proxy routes to a replica only once it has heard of it: wait until both answer.
        answering: set[str] = set()

        def both_answer() -> bool:
            reply = requests.get(f"{url}/v1/info", headers=AUTH, timeout=30)
            if reply.status_code == 200:
                answering.add(reply.json()["replica"])
            return len(answering) == 2

        _wait(both_answer, 90, "both ingress replicas answering")
        # Until both replicas serve a stream. Requests land on either, but not always at once: a CI run
        # saw 20 creations in 0.5 s all land on one replica, right after the previous test deleted its
        # app (the cause was not found; alone, or after that test, it did not happen again). So keep
        # trying for a while, and delete the extra streams a replica takes (each decodes a looping
        # video on these two cores).
        owners: dict[str, str] = {}
        landed: list[str] = []
        deadline = time.monotonic() + 60
        for i in itertools.count():
            reply = requests.post(f"{url}/v1/streams", headers=AUTH, timeout=30,
                                  json={"source": str(video), "stream_id": f"rep-{i}", "loop": True})
            assert reply.status_code == 201, reply.text
            # Known to both replicas at once: the owner records a new stream in the directory before it
            # answers (the next sync would be up to a tick later; until then the other one said 404).
            location = f"{url}/v1/streams/rep-{i}"
            assert [requests.get(location, headers=AUTH, timeout=30).status_code for _ in range(3)] == [200] * 3
            landed.append(reply.json()["owner"])
            if len(owners) >= 2 and landed[-1] in owners.values():
                assert requests.delete(f"{url}/v1/streams/rep-{i}", headers=AUTH, timeout=30).status_code in (202, 204)
            else:
                owners[f"rep-{i}"] = landed[-1]
            if len(set(owners.values())) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert len(set(owners.values())) == 2, f"60 s of creations all landed on one replica: {landed}"

        def listed() -> dict[str, dict]:
            return {s["stream_id"]: s for s in requests.get(f"{url}/v1/streams", headers=AUTH, timeout=30)
                    .json()["streams"]}

        _wait(lambda: all(sid in listed() for sid in owners), 10, "every stream listed by either replica")
        for sid, owner in owners.items():
            assert requests.get(f"{url}/v1/streams/{sid}", headers=AUTH, timeout=30).json()["owner"] == owner

        def decoded(sid: str) -> int:  # the owner's decoder counts, whichever replica answers
            summary = requests.get(f"{url}/v1/streams/{sid}", headers=AUTH, timeout=30).json()
            return (summary.get("decoder") or {}).get("frames_decoded", 0)

        _wait(lambda: all(decoded(sid) > 0 for sid in owners for _ in range(2)), 15, "decoder counts")

        # Server-sent events from the replica that does not serve the stream: relayed.
        target = "rep-0"
        events: list[dict] = []
        relayed = False
        for _ in range(30):
            response = requests.get(f"{url}/v1/streams/{target}/events", headers=AUTH, stream=True, timeout=60)
            assert response.status_code == 200
            lines = response.iter_lines(decode_unicode=True)
            if "relayed" in next(lines):
                relayed = True
                break
            response.close()
        assert relayed, "no events request landed on the other replica"
        reader = threading.Thread(target=lambda: events.extend(iter_sse(lines)), daemon=True)
        reader.start()
        _wait(lambda: sum(e["type"] == "prediction" and e["final"] for e in events) >= 2, 30,
              "window results relayed from the other replica")

        # A change of budget asked at the replica that does not serve the stream. (HAProxy sends a new
        # connection to the replica with fewer: while the relayed events hold one on the other replica,
        # that is the replica serving ``target`` -- so change a stream of the other one.)
        changed = next(sid for sid, owner in owners.items() if owner != owners[target])
        for _ in range(30):
            reply = requests.patch(f"{url}/v1/streams/{changed}", headers=AUTH, json={"budget": "full"}, timeout=30)
            assert reply.status_code in (200, 202), reply.text
            if reply.status_code == 202:
                break
        assert reply.status_code == 202 and reply.json()["owner"] == owners[changed]
        _wait(lambda: listed()[changed]["settings"]["budget"] == "full", 10, "the owner applied the change")
        bad = requests.patch(f"{url}/v1/streams/{changed}", headers=AUTH, json={"budget": "lots"}, timeout=30)
        assert bad.status_code == 422

        # Deleting every stream, wherever the request lands; the relayed events end with the stream.
        for sid in owners:
            assert requests.delete(f"{url}/v1/streams/{sid}", headers=AUTH, timeout=30).status_code in (202, 204)
        reader.join(15)
        assert not reader.is_alive() and events[-1]["type"] == "stream_ended"
        check_predictions(events, target, server.registered["step_gflops"])
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs)), "relayed events out of order or repeated"
        _wait(lambda: all(s["status"] != "live" for sid, s in listed().items() if sid in owners), 10,
              "every stream stopped")
    finally:
        serve.delete("adastream-replicas")


def test_idle_streams_are_evicted(server):
    async def scenario() -> tuple[int | None, float]:
        async with Client(server, "sleepy") as client:
            await client.wait_for(lambda e: e["type"] == "stream_started")
            started = time.monotonic()
            code = await client.closed(timeout=30)
            return code, time.monotonic() - started

    code, waited = asyncio.run(scenario())
    assert code == 4408 and waited >= server.config.idle_timeout_s - 1
    assert server.get("/v1/streams/sleepy").json()["status"] == "evicted"


def test_prometheus_metrics_are_exported(server, ray_session, shared_video_paths):
    """Serve's metrics (through Ray's metrics agent, scraped like Prometheus would) while a stream runs."""
    port = ray_session.nodes()[0]["MetricsExportPort"]
    wanted = ["ray_adastream_frames_total", "ray_adastream_steps_total", "ray_adastream_exits_total",
              "ray_adastream_gflops_spent_total", "ray_adastream_gflops_saved_total",
              "ray_adastream_stream_fps", "ray_adastream_stream_model_fps", "ray_adastream_stream_latency_p50_ms",
              "ray_adastream_stream_latency_p99_ms", "ray_adastream_frame_latency_ms_bucket",
              "ray_adastream_frames_dropped_total", "ray_adastream_windows_total", "ray_adastream_active_streams",
              "ray_adastream_batch_size_bucket", "ray_adastream_overloaded"]
    video = next(p for p in shared_video_paths if p.name == "demo.mp4")
    messages = jpeg_messages(video, 250, 10.0)

    async def scenario() -> str:
        text = ""
        async with Client(server, "metrics-probe") as client:
            await client.send(b"not a frame")  # one dropped frame, for the drop counter
            deadline = time.monotonic() + 45
            for i, (_, data) in enumerate(messages):
                await client.send(data)
                await asyncio.sleep(0.1)
                if i % 20 == 19:
                    text = await asyncio.get_running_loop().run_in_executor(
                        None, lambda: requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
                    if all(name in text for name in wanted) and 'stream="metrics-probe"' in text:
                        break
                if time.monotonic() > deadline:
                    break
            await client.send(json.dumps({"type": "end"}))
            await client.closed()
        return text

    text = asyncio.run(scenario())
    missing = [name for name in wanted if name not in text]
    assert not missing, missing
    probe = [line for line in text.splitlines() if 'stream="metrics-probe"' in line]
    assert any(line.startswith("ray_adastream_frames_dropped_total") and 'reason="malformed"' in line
               for line in probe)
    assert any(line.startswith("ray_adastream_stream_fps") and float(line.rsplit(" ", 1)[1]) > 5 for line in probe)


def test_cli_clients(server, registered, shared_video_paths, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["tracking_uri"], "ADASTREAM_TOKEN": TOKEN}
    short = next(p for p in shared_video_paths if p.name == "short_32frames.mp4")
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "stream_client.py"), str(short),
                           "--server", server.url, "--stream-id", "cli", "--speed", "4"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "[cli w0 step 1" in done.stdout and "GFLOPs" in done.stdout
    # --pull: the server reads the file itself (a server-side path: allowed on loopback).
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "stream_client.py"), str(short), "--pull",
                           "--server", server.url, "--stream-id", "cli-pull"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "[cli-pull w0 step 1" in done.stdout and "stream_ended" in done.stdout, done.stdout
    demo = next(p for p in shared_video_paths if p.name == "demo.mp4")
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "predict.py"), str(demo), "--model",
                           registered["model_uri"], "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["label"] in CLASSES and result["frames_used"] == 3 and result["exited_early"]
    assert result["gflops"] == pytest.approx(3 * registered["step_gflops"], rel=1e-3)
    assert len(result["frame_indices"]) == 3 and result["frame_indices"] == sorted(result["frame_indices"])
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(2000))
    done = subprocess.run([sys.executable, str(REPO / "pipelines" / "predict.py"), str(bad), "--model",
                           registered["model_uri"]], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1 and "cannot use" in done.stderr and "Traceback" not in done.stderr


def test_tokenless_loopback_server_runs_on_serves_python_proxy(registered, shared_video_paths, tmp_path):
    """`python -m pipelines.serve` with no token (the laptop case): its own Ray, loopback only, and
    Serve's Python proxy with actor-call handles (high_throughput=auto stays off without a token,
    because Ray's HAProxy mode would expose the replica's port on all interfaces). The rest of this
    file covers the HAProxy + gRPC data plane that a server with a token runs. It also runs the model's
    step eagerly (trace_model=false on the command line), which the rest does not."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_SERVE_") and k not in ("ADASTREAM_TOKEN", "RAY_ADDRESS")}
    env.update(MLFLOW_TRACKING_URI=registered["tracking_uri"], PYTHONUNBUFFERED="1")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "pipelines.serve", f"port={port}",
                               f"model_uri={registered['model_uri']}", f"window_seconds={WINDOW_S}",
                               "trace_model=false"],
                              cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def up() -> bool:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            return requests.get(url + "/v1/info", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    try:
        _wait(up, 240, "the tokenless server to come up")
        info = requests.get(url + "/v1/info", timeout=10).json()
        assert info["auth"] is False
        assert info["data_plane"] == {"http": "python_proxy", "handles": "ray_actor_calls"}
        assert info["model_runtime"] == "eager"  # trace_model=false from the command line
        short = next(p for p in shared_video_paths if p.name == "short_32frames.mp4")
        done = subprocess.run([sys.executable, str(REPO / "pipelines" / "stream_client.py"), str(short),
                               "--server", url, "--stream-id", "laptop", "--speed", "4"],
                              capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        assert "[laptop w0 step 1" in done.stdout and "GFLOPs" in done.stdout
    finally:
        server.send_signal(2)  # SIGINT: the CLI deletes its app and its Ray shuts down with it
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
