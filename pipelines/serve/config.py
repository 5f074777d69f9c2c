"""Configuration of the serving app: one dataclass whose defaults run, YAML files, ``key=value`` overrides.

    python -m pipelines.serve                                   # defaults: the demo model on 127.0.0.1:8000
    python -m pipelines.serve --config serve.yaml budget=1.5 max_streams=128
    python -m pipelines.serve host=0.0.0.0 auth_token=$(cat token)   # beyond loopback a token is required

Precedence: defaults < YAML file < environment (``ADASTREAM_TOKEN``, ``MLFLOW_TRACKING_URI``) <
command-line overrides. Per-stream settings (budget, window, top-k, ...) are defaults here and can be
overridden by each stream (``POST /v1/streams`` body or WebSocket query parameters).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_MODEL_URI = "models:/adastream-adafocus_v2@demo"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # what pipelines/train.py writes when MLFLOW_TRACKING_URI is unset
TOKEN_ENV = "ADASTREAM_TOKEN"

EMIT_MODES = ("steps", "windows")
DROP_POLICIES = ("drop_oldest", "drop_newest", "block")


class ConfigError(ValueError):
    """A configuration that cannot run (unknown key, bad value, missing token beyond loopback)."""


@dataclass
class ServeConfig:
    """Everything the serving app needs; the defaults serve the demo model on loopback."""

    # -- model --------------------------------------------------------------------------------------
    model_uri: str = DEFAULT_MODEL_URI
    """``models:/<name>@<alias>``, ``models:/<name>/<version>`` or ``runs:/<run>/model``."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the working dir."""
    device: str = "auto"
    """``auto`` (CUDA when the recognizer replica has a GPU), ``cpu`` or ``cuda[:N]``."""

    # -- HTTP ---------------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "adastream"
    route_prefix: str = "/"
    auth_token: str | None = None
    """Bearer token for every API call and WebSocket; required when ``host`` is not a loopback address."""

    # -- recognition (per-stream defaults) --------------------------------------------------------
    budget: str = "auto"
    """Default compute budget: GFLOPs per window (``"1.5"``), ``full`` (no early exit), ``min`` (the
    cheapest thresholds) or ``auto`` (the cheapest point of the curve within ``auto_tolerance`` of the
    best held-out accuracy). Changeable at run time (``PUT /v1/budget``, per stream ``PATCH``)."""
    auto_tolerance: float | None = None
    """``auto``: how far below the best held-out accuracy (0.01 = one point); None = one standard error
    of it on the held-out split (``pipelines/serve/budgets.py``)."""
    window_frames: int = 0
    """Frames the model sees per recognition window; 0 = the model's training T."""
    window_seconds: float = 2.0
    """Window duration D: the model gets one frame every D / window_frames seconds of stream time, as
    training spread T frames over a clip. 0 = windows of consecutive frames (every frame is used)."""
    top_k: int = 3
    emit: str = "steps"
    """``steps``: an event after every frame the model sees; ``windows``: only each window's result."""

    # -- batching and replicas ------------------------------------------------------------------------
    max_batch_size: int = 32
    """At most this many streams (one frame each) in one forward pass."""
    batch_wait_timeout_s: float = 0.05
    """Batching is opportunistic (a pass takes whatever queued while the previous one ran); on top, when
    frames arrive more often than this (about 5 streams or more at 4 steps/s), a pass waits for company
    until its oldest frame has waited this long. Measured at 40 pulled streams on 2 cores: the forward
    passes' CPU fell by half with early exit and by 44 % without, for about 40 ms more latency at the
    median. A lone stream never waits. 0 = never wait (see :class:`~pipelines.serve.engine.StepBatcher`)."""
    colocate_model: bool = False
    """Run the model inside the ingress replica instead of a separate Recognizer deployment: one hop
    less per frame (lower latency, less CPU) on a single CPU machine, but the model no longer scales
    (or moves to GPUs) on its own, and an ingress failure takes the model with it."""
    high_throughput: str | bool = "auto"
    """Ray Serve's high-throughput data plane (Ray >= 2.55): HAProxy instead of the Python HTTP proxy,
    handing each WebSocket straight to the ingress replica's own HTTP server (no actor call per message),
    and gRPC between deployments (``RAY_SERVE_ENABLE_HA_PROXY=1``, ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``).
    Ray then binds the replica's HTTP port and HAProxy's stats and metrics ports on all interfaces, so
    the mode needs a token: ``auto`` = on when a token is set, ``true`` = on (a token is required),
    ``false`` = off. They are environment variables that Ray's processes read when they start, so
    :func:`pipelines.serve.app.start` sets them only for a Ray it starts itself; on a running cluster set
    them on every node before ``ray start`` (``ray_cluster.yaml`` does; ``cluster/start_local_cluster.sh`` passes
    them through from its environment)."""
    recognizer_replicas: int = 1
    recognizer_max_replicas: int = 0
    """> recognizer_replicas turns on Serve autoscaling between the two."""
    recognizer_cpus: float = 1.0
    recognizer_gpus: float = 0.0
    torch_threads: int = 1
    trace_model: bool = True
    """Run the model's recurrent step as a TorchScript trace optimised for inference (1.5-1.8x faster
    passes for the demo model on a CPU, and no GIL taken between operators); a trace that does not
    reproduce the eager step at other batch sizes is refused and the step runs eagerly
    (``pipelines/serve/engine.py``, ``trace_step``; GET /v1/info says which runs). The trace holds a
    frozen copy of the weights beside the model's own."""
    ingress_replicas: int = 1
    """Ingress replicas (processes) sharing the streams: each decodes its own pulled sources and holds
    its own WebSockets, so more of them spread the per-frame work over more cores (and nodes); for
    pulled streams, one more than the node's cores (each replica's threads share one GIL; measured in
    docs/serving.md, "Configuration and deployment"). A client request lands on any replica; one about
    a stream another replica serves is answered from the stream directory (status), forwarded (PATCH,
    DELETE: 202) or relayed (server-sent events)."""
    ingress_cpus: float = 0.5
    step_timeout_s: float = 20.0
    """A step that takes longer is retried (its replica is presumed lost)."""
    failover_timeout_s: float = 60.0
    """How long a stream keeps retrying a lost recognizer before it fails."""

    # -- streams --------------------------------------------------------------------------------------
    max_streams: int = 64
    """Concurrent streams per ingress replica; more get 429 / WebSocket close 1013."""
    idle_timeout_s: float = 60.0
    """Streams without a frame (or a connected client) for this long are evicted."""
    overload_window_s: float = 5.0
    """Admission control (``pipelines/serve/overload.py``): an ingress replica past its capacity refuses
    new streams (503 / WebSocket close 1013) while, within the last this many seconds, at least
    ``overload_stream_share`` of its streams dropped frames for want of compute or its event loop ran
    more than ``overload_loop_lag_ms`` late (median). 0 turns it off (``max_streams`` still applies)."""
    overload_stream_share: float = 0.25
    overload_loop_lag_ms: float = 200.0
    overload_ramp_share: float = 0.05
    """For ``2 * overload_window_s`` after either sign last held, a replica admits at most this share of
    its streams (at least one) as new streams per ``overload_window_s``: the signs show only seconds
    after a stream starts, so clients that all come back after ``Retry-After`` would otherwise pile on
    at once and overshoot again."""
    queue_frames: int = 2
    """Sampled frames waiting for the model per stream; beyond it ``drop_policy`` applies."""
    drop_policy: str = "drop_oldest"
    """``drop_oldest`` (stay live), ``drop_newest``, or ``block`` (pull sources read no faster than the
    model; WebSocket clients are back-pressured)."""
    event_buffer: int = 512
    """Recent events kept per stream, replayed to SSE clients that send ``Last-Event-ID``."""

    # -- limits -----------------------------------------------------------------------------------------
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest WebSocket message (one image or one video chunk); larger closes with 1009."""
    max_pixels: int = 3840 * 2160
    """Largest frame (width x height) accepted from any source."""
    max_fps_in: float = 120.0
    """Frames per second a WebSocket client may push; the excess is dropped, twice the rate closes 4429."""
    max_consecutive_errors: int = 50
    """Malformed frames in a row before a WebSocket is closed with 4400."""
    api_requests_per_s: float = 20.0
    api_burst: int = 40
    """HTTP API rate limit per client address (token bucket); beyond it 429."""

    # -- pull sources -----------------------------------------------------------------------------------
    allowed_schemes: list[str] = field(default_factory=lambda: [
        "udp", "tcp", "rtp", "rtsp", "rtsps", "srt", "http", "https", "file"])
    allow_local_files: bool | None = None
    """Let ``POST /v1/streams`` open server-side paths; None = only when listening on loopback."""
    open_timeout_s: float = 10.0
    read_timeout_s: float = 10.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 10.0
    reconnect_attempts: int = 0
    """Failed (re)connections in a row before a pull stream gives up; 0 = until the idle timeout."""
    frame_threads_min_pixels: int = 1280 * 720
    """Sources (pulled, and pushed MPEG-TS) with pictures at least this large (width x height) decode
    in FFmpeg's frame threads, several frames at once, so that one stream can need more than a core;
    smaller ones decode in their reader thread, which costs far less CPU per stream (see
    ``pipelines/serve/sources.py``). 0 = frame threads for every source."""
    max_source_lag_s: float = 2.0
    """A pulled live source's reader (``udp``, ``tcp``, ``rtp``, ``rtsp``, ``srt``, ``rtmp``: not files,
    not HLS, whose segments arrive in bursts) that falls more than this far behind its source skips to
    the live edge -- leaves the backlog undecoded up to a keyframe at most half as far behind -- rather
    than decode stale frames; the stream counts the sampling slots skipped as dropped
    (``behind_source``) and says so in a ``warning`` event (``sources.CatchUp``). 0 = never skip (also
    for ``drop_policy`` ``block``)."""
    hold_for_decision_s: float = 1.0
    """After a source's reader hands a frame to its stream it holds the packets that follow, undecoded,
    until the stream has decided which frames it wants next (the frame's exit decision), at most this
    long in media time: after an exit they are then left out, where a reader that decoded ahead would
    have decoded every frame up to the late decision (``sources.SourceReader``). 0 = decode ahead."""

    # -- fault tolerance -----------------------------------------------------------------------------------
    sync_interval_s: float = 1.0
    """How often an ingress replica records its streams in the directory (for failover)."""

    # ------------------------------------------------------------------------------------------------
    def resolved(self) -> "ServeConfig":
        """A copy with the environment applied (token, tracking URI made absolute) and validated."""
        out = dataclasses.replace(self, allowed_schemes=list(self.allowed_schemes))
        if out.auth_token is None and os.environ.get(TOKEN_ENV):
            out.auth_token = os.environ[TOKEN_ENV]
        out.tracking_uri = absolute_tracking_uri(out.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                                 or DEFAULT_TRACKING_URI)
        out.validate()
        return out

    def validate(self) -> None:
        if not is_loopback(self.host) and not self.auth_token:
            raise ConfigError(f"listening on {self.host} (beyond loopback) requires a token: set auth_token "
                              f"or ${TOKEN_ENV}")
        if str(self.high_throughput).lower() not in ("auto", "true", "false"):
            raise ConfigError(f"high_throughput must be auto, true or false, got {self.high_throughput!r}")
        if str(self.high_throughput).lower() == "true" and not self.auth_token:
            raise ConfigError("high_throughput=true requires a token: Ray's HAProxy mode binds the ingress "
                              f"replica's HTTP port on all interfaces; set auth_token or ${TOKEN_ENV}")
        if self.emit not in EMIT_MODES:
            raise ConfigError(f"emit must be one of {EMIT_MODES}, got {self.emit!r}")
        if self.drop_policy not in DROP_POLICIES:
            raise ConfigError(f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")
        positive = ("max_batch_size", "max_streams", "queue_frames", "max_message_bytes", "max_pixels",
                    "max_fps_in", "top_k", "recognizer_replicas", "ingress_replicas", "torch_threads", "event_buffer")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("max_source_lag_s", "hold_for_decision_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.frame_threads_min_pixels < 0:
            raise ConfigError(f"frame_threads_min_pixels must be >= 0, got {self.frame_threads_min_pixels!r}")
        if (self.overload_window_s < 0 or not 0 < self.overload_stream_share <= 1 or self.overload_loop_lag_ms <= 0
                or not 0 < self.overload_ramp_share <= 1):
            raise ConfigError("overload_window_s must be >= 0, overload_stream_share and overload_ramp_share in "
                              "(0, 1] and overload_loop_lag_ms positive")
        if self.window_frames < 0 or self.window_seconds < 0:
            raise ConfigError("window_frames and window_seconds must be >= 0")

    @property
    def wants_high_throughput(self) -> bool:
        """Whether a Ray started for this config should run Serve's high-throughput data plane."""
        mode = str(self.high_throughput).lower()
        return mode == "true" or (mode == "auto" and bool(self.auth_token))

    @property
    def local_files_allowed(self) -> bool:
        return is_loopback(self.host) if self.allow_local_files is None else self.allow_local_files

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}{self.route_prefix.rstrip('/')}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` relative to *this* process's directory, so replicas find the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    if "://" not in uri and uri:
        return str(Path(uri).resolve())
    return uri


def _coerce(name: str, value: Any) -> Any:
    kinds = {f.name: f.type for f in dataclasses.fields(ServeConfig)}
    if name not in kinds:
        raise ConfigError(f"unknown ServeConfig field {name!r}")
    if name == "budget" and value is not None:
        return str(value)  # "1.5" and 1.5 mean the same budget
    return value


def load_serve_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                      **values: Any) -> ServeConfig:
    """Defaults < YAML ``path`` < ``values`` < ``key=value`` ``overrides``."""
    merged: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        merged.update(loaded)
    merged.update(values)
    for text in overrides or []:
        if "=" not in text:
            raise ConfigError(f"override {text!r} is not key=value")
        key, raw = text.split("=", 1)
        merged[key.strip()] = yaml.safe_load(raw) if raw != "" else None
    try:
        return ServeConfig(**{k: _coerce(k, v) for k, v in merged.items()})
    except TypeError as error:
        raise ConfigError(str(error)) from None
