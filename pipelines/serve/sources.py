"""Decoding video sources with PyAV in a background thread: pulled URLs and pushed MPEG-TS chunks.

A :class:`SourceReader` thread opens a container, decodes its first video stream and hands every frame
(as ``av.VideoFrame`` plus its media time) to a callback; the callback runs in the reader thread and
must be cheap and thread-safe (the server's just schedules the frame onto its event loop, where the
window logic decides whether it is converted at all).

Pull sources (``POST /v1/streams``): anything FFmpeg's demuxers and protocols open -- MPEG-TS over
``udp://`` or ``tcp://``, ``http(s)://`` files and HLS playlists, ``rtsp://``, local files. Files are
read at their own frame rate (their timestamps are followed against the wall clock, like ``ffmpeg
-re``); live sources arrive at theirs. When a live source fails, times out or ends, the reader
reconnects with exponential back-off; a file ends the stream at its end (or loops).

Push sources (MPEG-TS chunks over a WebSocket): the chunks go into a :class:`ChunkPipe`, a blocking
file-like object the demuxer reads from, so chunk boundaries can fall anywhere.

Both kinds leave undecoded the packets no wanted frame depends on (:class:`KeyframeSkipper`): after a
window's early exit, the frames up to the last keyframe before the next window -- and they do not
decode ahead of the exit decision: while a frame handed over awaits it, the packets after it are held
undecoded (:meth:`SourceReader._packets`). A pulled live source's reader that falls far behind its
source skips to the live edge instead of decoding the backlog (:class:`CatchUp`).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import av

from pipelines.serve.threads import name_os_thread

logger = logging.getLogger(__name__)

LIVE_SCHEMES = frozenset({"udp", "tcp", "rtp", "rtsp", "rtsps", "srt", "rtmp"})

# Low-latency demuxing: probe little (a live stream has no index to find). Not ``fflags=nobuffer``:
# it throws away the packets read while probing -- the first keyframe with them -- and a stream whose
# keyframes are rare then decodes nothing for a whole GOP (or at all).
LIVE_OPTIONS = {"probesize": "200000", "analyzeduration": "500000"}
# Pushed MPEG-TS: the chunks arrive at the stream's own rate, so every byte probed is latency; the
# H.264 decoder finds its parameters in-band anyway.
PIPE_OPTIONS = {"probesize": "32768", "analyzeduration": "0"}
# UDP: keep reading when the socket buffer overruns (drop packets, like a live receiver must). FFmpeg's
# receive buffer keeps its default size, 7 x 4096 TS packets (5.4 MB; the memory is touched as the
# ring goes round, so a larger one is a larger resident set per stream before long).
UDP_OPTIONS = {"overrun_nonfatal": "1", "buffer_size": "4194304"}
UDP_FIFO_PACKETS = 7 * 4096


class SourceError(RuntimeError):
    """A source that cannot be used at all (not a video, too large): no point reconnecting."""


@dataclass
class SourceOptions:
    url: str
    realtime: bool | None = None
    """Follow timestamps against the wall clock; None = for files (local, HTTP non-HLS), not for live."""
    loop: bool = False
    """Start a file again at its end instead of ending the stream."""
    open_timeout_s: float = 10.0
    read_timeout_s: float = 10.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 10.0
    reconnect_attempts: int = 0
    """Failed (re)connections in a row before giving up; 0 = never give up (the server's idle timeout
    evicts a stream whose source stays away)."""
    max_pixels: int = 3840 * 2160
    av_options: dict[str, str] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme.lower() if "://" in self.url else "file"

    @property
    def is_live(self) -> bool:
        if self.scheme in LIVE_SCHEMES:
            return True
        return self.scheme in ("http", "https") and ".m3u8" in self.url.lower()

    @property
    def real_time_transport(self) -> bool:
        """A live source whose packets arrive as they are sent (not HLS: its segments come in bursts),
        so how late a packet is read says how far behind its source the reader is."""
        return self.scheme in LIVE_SCHEMES

    @property
    def follows_clock(self) -> bool:
        return (not self.is_live) if self.realtime is None else self.realtime


@dataclass
class SourceFrame:
    frame: av.VideoFrame
    media_time: float | None
    """Seconds from the frame's timestamp (None when it has none)."""
    fps: float
    received: float | None = None
    """``time.monotonic()`` when the packet it was decoded from was read (None: when handed over)."""


FrameCallback = Callable[[SourceFrame], bool]
"""Returns False to ask the reader to wait (``block`` drop policy); True to continue."""
StatusCallback = Callable[[str, str, int], None]
"""(status, message, attempt): ``connecting``, ``connected``, ``reconnecting``, ``ended``, ``failed``."""


class ChunkPipe(io.RawIOBase):
    """A byte pipe: the event loop writes pushed chunks, the demuxer thread reads them (blocking)."""

    def __init__(self, max_buffered: int = 16 * 1024 * 1024) -> None:
        super().__init__()
        self._buffer = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self.max_buffered = max_buffered

    def readable(self) -> bool:
        return True

    def feed(self, data: bytes) -> bool:
        """Append a chunk; False when the decoder is so far behind that the buffer is full (dropped)."""
        with self._cond:
            if self._eof:
                return False
            if len(self._buffer) + len(data) > self.max_buffered:
                return False
            self._buffer += data
            self._cond.notify()
            return True

    @property
    def exhausted(self) -> bool:
        return self._eof and not self._buffer

    def finish(self) -> None:
        """No more chunks: the demuxer sees the end of the stream once the buffer is drained."""
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def readinto(self, target: Any) -> int:
        with self._cond:
            while not self._buffer and not self._eof:
                self._cond.wait()
            n = min(len(target), len(self._buffer))
            target[:n] = self._buffer[:n]
            del self._buffer[:n]
            return n

    @property
    def buffered(self) -> int:
        return len(self._buffer)


class KeyframeSkipper:
    """Leaves undecoded the packets that no wanted frame depends on.

    After a window's early exit a stream wants no frame until the next window, yet H.264 without
    B-frames (how cameras encode) makes every frame a reference for the next, so a decoder must decode
    them all -- unless a keyframe comes first: decoding can start afresh there. So when the stream's
    next wanted frame (``wanted()``: the media time of the last frame offered and the one from which
    frames are wanted again, :attr:`StreamSession.skip_hint`) is not before the next keyframe, the
    packets up to that keyframe are not decoded at all.

    When the next keyframe comes is predicted from the keyframes seen: only for a source with a
    regular keyframe interval (two equal intervals in a row; fixed-GOP encoders, as cameras are), and
    only if that keyframe is due at the latest with the wanted frame (a camera whose GOP is as long as
    the window -- 50 frames at 25 fps, a common camera default, and 2 s windows -- restarts decoding at
    each window's first frame). A keyframe that fails to come forgets the interval until it is regular
    again; the frames up to the next keyframe then cannot be decoded and are left out too (a window
    samples a later frame). Sources whose frames are reordered (B-frames) always decode everything.
    Used by one reader thread.
    """

    TOLERANCE_S = 0.002
    """Timestamps' rounding: a keyframe due this close after the wanted frame counts as at it."""

    def __init__(self, wanted: Callable[[], tuple[float, float] | None],
                 left_out: Callable[[float], None] | None = None) -> None:
        self.wanted = wanted
        self.left_out = left_out
        """Called with each packet's media time once it is left out -- by the reader, after it handed
        over the frames the decoder still held, so frames and packets are reported in order."""
        self.packets_left_out = 0
        self.reset()

    def reset(self) -> None:
        """A new connection: a new clock and a new decoder."""
        self.gop: float | None = None
        self.last_key: float | None = None
        self.intervals: deque[float] = deque(maxlen=2)
        self.skipping = False  # packets were left out: nothing decodes cleanly before a keyframe
        self.due: float | None = None  # the keyframe the current skipping counts on
        self.last_time: float | None = None
        self.reorders = False

    def _keyframe(self, t: float) -> None:
        if self.last_key is not None and t > self.last_key:
            self.intervals.append(t - self.last_key)
            a, b = (self.intervals[0], self.intervals[-1]) if len(self.intervals) == 2 else (0.0, -1.0)
            self.gop = b if abs(a - b) <= 0.05 * b else None
        self.last_key = t

    def decode(self, t: float, keyframe: bool, reordered: bool) -> bool:
        """Whether to decode the packet of media time ``t``; a packet left out is counted (and reported
        to ``left_out`` by the reader)."""
        if self.last_time is not None and t <= self.last_time:
            # A discontinuity (a looping or restarted source): a new clock, the same encoder -- the
            # interval holds, the keyframes are to be found again.
            self.last_key, self.due = None, None
        self.last_time = t
        self.reorders = self.reorders or reordered
        if keyframe:
            self._keyframe(t)
            self.skipping = False
        elif self.skipping:
            if self.gop is not None and self.due is not None and t > self.due + 0.5 * self.gop:
                self.gop = None  # the keyframe counted on did not come: the interval is not regular
                self.intervals.clear()
            return self._leave_out(t)
        if self.reorders or self.gop is None or self.last_key is None:
            return True
        hint = self.wanted()
        if hint is None or not hint[0] < t < hint[1]:
            return True
        due = self.last_key + self.gop * (int((t - self.last_key) / self.gop) + 1)
        if due > hint[1] + self.TOLERANCE_S:
            return True
        self.skipping, self.due = True, due
        return self._leave_out(t)

    def _leave_out(self, t: float) -> bool:
        self.packets_left_out += 1
        return False

    def pass_over(self) -> None:
        """A packet :meth:`decode` passed that is left out all the same (:class:`CatchUp`): nothing
        decodes cleanly before the next keyframe, so the packets up to it are left out here too."""
        self.skipping, self.due = True, None


class ArrivalClock:
    """How far behind its live source a reader is, from the packets' timestamps and when they were read.

    The smallest (wall - media time) seen is a packet read the moment it arrived, so ``wall = media time
    + that offset`` predicts when a packet arrives; one read later than that waited in a buffer, and
    the reader is that much behind its source. Used by one reader thread."""

    DRIFT = 0.001
    """The best offset seen is forgotten at this rate (s/s): the source's clock drifts against ours."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new connection: arrival is measured afresh."""
        self.offset: float | None = None
        self.offset_at = 0.0
        self.last_media: float | None = None

    def packet(self, media_time: float, now: float) -> bool:
        """Every packet read; False when its timestamp starts a new media clock (a reconnect, a loop, a
        discontinuity), which is then measured afresh."""
        last, self.last_media = self.last_media, media_time
        same_clock = last is None or last - 1.0 <= media_time <= last + 5.0
        if not same_clock:
            self.offset = None
        offset = now - media_time
        if self.offset is None or offset < self.offset:
            self.offset = offset
        else:
            self.offset += self.DRIFT * (now - self.offset_at)
        self.offset_at = now
        return same_clock

    def lag(self, media_time: float, now: float) -> float:
        """Seconds the packet of ``media_time``, read ``now``, waited after it arrived (0 if unknown)."""
        return 0.0 if self.offset is None else (now - media_time) - self.offset


class CatchUp:
    """Skips a pulled live source's backlog instead of decoding it, once its reader is far behind.

    A reader starved of CPU (a burst of new streams, each decoding every frame until it has learnt its
    keyframe interval; a machine past its capacity) falls behind its source, the backlog waiting in the
    receive buffer -- FFmpeg's UDP ring holds minutes of a low-bitrate camera. Reading on, it would
    decode all of it, every prediction minutes late, and stay a runnable thread wanting the GIL and a
    core until it had caught up: 240 pulled streams started at once on 2 cores kept their replicas'
    event loops from running for up to 78 s. So a reader more than ``max_lag_s`` behind leaves packets
    out, undecoded, until a keyframe at most half that behind: it reaches the live edge after
    demuxing the backlog, not decoding it. Keyframes still teach the :class:`KeyframeSkipper` the
    interval. Each stretch skipped is reported once it is over (the stream counts its sampling slots as
    dropped, ``behind_source``). Used by one reader thread."""

    def __init__(self, max_lag_s: float) -> None:
        self.max_lag_s = max_lag_s
        self.episodes = 0
        self.packets = 0
        """Packets left out while catching up, over all episodes."""
        self.reset()

    def reset(self) -> None:
        """A new connection or media clock: the stretch being skipped is over."""
        self.active = False
        self.first: float | None = None  # media time of the first packet of the stretch
        self.last: float | None = None  # the last packet seen in it, or the keyframe that ended it
        self.worst_lag = 0.0

    def behind(self, media_time: float, lag: float, keyframe: bool) -> bool:
        """Whether to leave this packet out to catch up (``lag``: :meth:`ArrivalClock.lag`)."""
        if self.active and keyframe and lag <= self.max_lag_s / 2:
            self.active, self.last = False, media_time  # the stretch ends where decoding resumes
            return False
        if not self.active:
            if lag <= self.max_lag_s:
                return False
            self.active, self.episodes = True, self.episodes + 1
            self.first, self.worst_lag = media_time, 0.0
        self.worst_lag = max(self.worst_lag, lag)
        self.left_out(media_time)
        return True

    def left_out(self, media_time: float) -> None:
        """A packet of the stretch (left out here, or by the skipper: after a packet left out nothing
        decodes before the next keyframe, so only keyframes come to :meth:`behind` meanwhile)."""
        self.last = media_time
        self.packets += 1

    def take_stretch(self, ended: bool = False) -> tuple[float, float] | None:
        """The stretch skipped, once it is over (or ``ended``: the connection is): (media seconds, the
        most the reader was behind); None if there is none to report."""
        if (self.active and not ended) or self.first is None or self.last is None:
            return None
        stretch = (max(0.0, self.last - self.first), self.worst_lag)
        self.reset()
        return stretch


class Dozer:
    """How long a live source's reader may sleep while it leaves packets out until a keyframe.

    After a window's early exit the reader leaves out every packet up to the next window's keyframe
    (:class:`KeyframeSkipper`), yet it still wakes for each as it arrives -- and for a UDP source
    FFmpeg's receive thread hands it each datagram, the GIL changing hands each time: with 96 pulled
    streams whose windows exit at their third frame, a fifth of the readers' CPU
    (``benchmarks/source_readers.py``: 3.85 ms/s per stream awake, 3.10 dozing). So the reader sleeps
    instead, until shortly before the keyframe is due, and what arrived meanwhile waits in the receive
    buffer to be read (and left out) in one go.

    When the keyframe arrives is estimated from the packets seen (:class:`ArrivalClock`). Dozing is
    safe only within what the buffer holds: at most ``BUFFER_SHARE`` of ``buffer_bytes`` at the
    stream's measured video bitrate (a quarter: audio and container overhead, bitrate peaks), and
    never while the reader is behind its source. Used by one reader thread.
    """

    MARGIN_S = 0.1
    """Wake this long before the keyframe is due: reading the backlog takes a moment."""
    MIN_S = 0.05
    MAX_S = 2.0
    MAX_LAG_S = 0.5
    """A reader further behind its source than this reads on to catch up."""
    BUFFER_SHARE = 0.25
    RATE_SPAN_S = 2.0
    """Media time over which the bitrate is measured (no dozing before the first measurement)."""

    def __init__(self, buffer_bytes: int) -> None:
        self.buffer_bytes = buffer_bytes
        self.arrival = ArrivalClock()
        self.dozed_s = 0.0
        self.asleep_since: float | None = None
        """When the nap in progress began (None: awake). What arrived since waits unread, uncounted."""
        self.reset()

    def reset(self) -> None:
        """A new connection (or media clock): arrival and bitrate are measured afresh."""
        self.arrival.reset()
        self._reset_rate()

    def _reset_rate(self) -> None:
        self.rate: float | None = None  # video bytes per media second
        self.span_start: float | None = None
        self.span_bytes = 0

    def packet(self, media_time: float, size: int, now: float) -> None:
        """Every packet read (left out or not): its arrival and its size."""
        self.asleep_since = None
        if not self.arrival.packet(media_time, now):
            self._reset_rate()  # a new media clock: a reconnect, a loop, a discontinuity
        if self.span_start is None:
            self.span_start, self.span_bytes = media_time, 0
        self.span_bytes += size
        if media_time - self.span_start >= self.RATE_SPAN_S:
            self.rate = self.span_bytes / (media_time - self.span_start)
            self.span_start, self.span_bytes = media_time, 0

    def nap(self, media_time: float, due: float, now: float) -> float:
        """Seconds to sleep after the packet of ``media_time`` (just passed to :meth:`packet`), when
        nothing is wanted before the keyframe at ``due``; 0 = read on."""
        if self.arrival.offset is None or self.rate is None:
            return 0.0
        lag = self.arrival.lag(media_time, now)
        if lag > self.MAX_LAG_S:
            return 0.0
        room = self.BUFFER_SHARE * self.buffer_bytes / max(self.rate, 1.0)
        nap = min(due - media_time - lag - self.MARGIN_S, room, self.MAX_S)
        if nap < self.MIN_S:
            return 0.0
        self.dozed_s += nap
        self.asleep_since = now
        return nap

    def asleep_for(self, now: float) -> float:
        """How long the nap in progress has lasted: that much of the source waits unread (0: awake)."""
        since = self.asleep_since
        return max(0.0, now - since) if since is not None else 0.0


class SourceReader(threading.Thread):
    """Decodes one source in a daemon thread until :meth:`stop` (see module docstring)."""

    def __init__(self, opener: Callable[[], Any], on_frame: FrameCallback, on_status: StatusCallback, *,
                 name: str, live: bool, follow_clock: bool, loop: bool = False, max_pixels: int = 3840 * 2160,
                 reconnect_initial_s: float = 0.5, reconnect_max_s: float = 10.0, reconnect_attempts: int = 0,
                 reconnect: bool = True, exhausted: Callable[[], bool] | None = None,
                 skipper: KeyframeSkipper | None = None, frame_threads_min_pixels: int = 1280 * 720,
                 doze_buffer_bytes: int = 0, max_lag_s: float = 0.0,
                 on_behind: Callable[[float, float, float], None] | None = None,
                 awaited_decision: Callable[[], object | None] | None = None, hold_max_s: float = 0.0) -> None:
        super().__init__(name=f"source-{name}", daemon=True)
        self._opener = opener
        self._on_frame = on_frame
        self._on_status = on_status
        self.live = live
        self.follow_clock = follow_clock
        self.loop = loop
        self.max_pixels = max_pixels
        self.reconnect = reconnect
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.reconnect_attempts = reconnect_attempts
        self.exhausted = exhausted
        """For pushed chunks: True once the client has finished and everything was read."""
        self.skipper = skipper
        """Leaves out packets no wanted frame depends on (None: decode every packet)."""
        self.frame_threads_min_pixels = frame_threads_min_pixels
        """Sources at least this large decode in FFmpeg's frame threads, smaller ones in this thread."""
        self.dozer = Dozer(doze_buffer_bytes) if live and skipper is not None and doze_buffer_bytes > 0 else None
        """Sleeps through the packets left out after an exit (None: reads each as it arrives)."""
        self.catch_up = CatchUp(max_lag_s) if live and skipper is not None and max_lag_s > 0 else None
        """Skips to the live edge when the reader falls more than ``max_lag_s`` behind (None: never)."""
        self.arrival = self.dozer.arrival if self.dozer is not None else ArrivalClock()
        self._on_behind = on_behind
        """Called (in this thread) with each stretch skipped to catch up: (media seconds, the most the
        reader was behind, the source's frame rate)."""
        self._awaited_decision = awaited_decision if skipper is not None and hold_max_s > 0 else None
        """While a frame handed over awaits its stream's decision which frames it wants next, something
        that stands for that decision (None: none is awaited): the packets read meanwhile are held back
        undecoded (:meth:`_packets`)."""
        self.hold_max_s = hold_max_s
        self._held: deque[tuple[Any, float]] = deque()
        """Packets read and held back, each with when it was read."""
        self._given_up: object | None = None  # the decision a hold expired waiting for
        self.packets_held = 0
        self.holds_expired = 0
        """Holds given up after ``hold_max_s`` without a decision (the reader decoded on)."""
        self._read_at = 0.0  # when the packet being decoded was read
        self._fps = 25.0
        self._halt = threading.Event()
        self._clock: tuple[float, float] | None = None  # (wall, media) anchor for pacing files
        self.attempt_frames = 0
        self.decode_errors = 0
        self.frames_decoded = 0
        self.decoder_threads = 0
        """Threads decoding the current connection (1: this one; more: FFmpeg's frame threads); 0
        until its first frame."""
        self.errors: list[str] = []

    def stats(self) -> dict[str, int]:
        """What the decoder did: frames decoded, packets left undecoded (after early exits), packets
        that failed to decode; and the threads it decodes in."""
        return {"frames_decoded": self.frames_decoded, "decode_errors": self.decode_errors,
                "packets_left_out": self.skipper.packets_left_out if self.skipper is not None else 0,
                "decoder_threads": self.decoder_threads,
                "packets_held": self.packets_held, "holds_expired": self.holds_expired,
                "catch_ups": self.catch_up.episodes if self.catch_up is not None else 0,
                "packets_behind": self.catch_up.packets if self.catch_up is not None else 0,
                "dozed_s": round(self.dozer.dozed_s, 3) if self.dozer is not None else 0.0,
                "dozing_s": round(self.dozer.asleep_for(time.monotonic()), 3) if self.dozer is not None else 0.0}

    def stop(self) -> None:
        self._halt.set()

    @property
    def stopped(self) -> bool:
        return self._halt.is_set()

    def run(self) -> None:
        name_os_thread("src:" + self.name.removeprefix("source-"))
        failures = 0
        delay = self.reconnect_initial_s
        status = "connecting"
        while not self._halt.is_set():
            self._on_status(status, "", failures)
            status = "reconnecting"
            self.attempt_frames = 0
            error_message = None
            try:
                self._read_once()
            except SourceError as error:
                self._report_catch_up(ended=True)
                self._on_status("failed", str(error), failures)
                return
            except Exception as error:  # noqa: BLE001 - any FFmpeg/OS error of a source means: retry
                error_message = _describe(error)
                self.errors.append(error_message)
                logger.info("source %s: %s", self.name, error_message)
            self._report_catch_up(ended=True)
            if self._halt.is_set():
                return
            if self.exhausted is not None and self.exhausted():
                self._on_status("ended", "the client finished the stream", failures)
                return
            if error_message is None and not self.live and not self.loop:
                self._on_status("ended", "end of file", failures)
                return
            if not self.reconnect:
                self._on_status("failed" if error_message else "ended", error_message or "end of stream", failures)
                return
            if error_message:
                self._on_status("error", error_message, failures)
            if self.attempt_frames and (self.live or error_message is None):
                # A live source that delivered and then dropped, or a looping file: start over.
                failures, delay = 0, self.reconnect_initial_s
                if error_message is None:
                    continue
            else:
                # Files that fail mid-way count as failures too, so a corrupt file cannot loop forever.
                failures += 1
                limit = self.reconnect_attempts or (0 if self.live else 3)
                if limit and failures >= limit:
                    self._on_status("failed", f"gave up after {failures} failed attempts"
                                    + (f": {error_message}" if error_message else ""), failures)
                    return
            self._halt.wait(delay)
            delay = min(delay * 2, self.reconnect_max_s)

    # A live source joined mid-GOP has no decodable picture until its next keyframe, and a lossy one
    # (UDP) has corrupt packets now and then: skip those, unless nothing decodes for this many packets.
    MAX_UNDECODABLE_PACKETS = 1000

    def _read_once(self) -> None:
        """Open and decode until the end or an error, counting frames in ``attempt_frames``."""
        with self._opener() as container:
            if not container.streams.video:
                raise SourceError("the source has no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            if ctx.width and ctx.height and ctx.width * ctx.height > self.max_pixels:
                raise SourceError(f"resolution {ctx.width}x{ctx.height} exceeds the limit of {self.max_pixels} pixels")
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 25.0
            self._fps = fps
            size = f"{ctx.width}x{ctx.height}" if ctx.width else "size from the first keyframe"
            self._on_status("connected", f"{ctx.name} {size} @ {fps:.3g} fps", 0)
            self._clock = None  # a new connection starts a new media clock
            skipper = self.skipper
            if skipper is not None:
                skipper.reset()
            undecodable = 0
            decoding = True  # False while packets are left out
            dozer, arrival, catch_up = self.dozer, self.arrival, self.catch_up
            if dozer is not None:
                dozer.reset()
            else:
                arrival.reset()
            self.decoder_threads = 0
            threads_chosen = False
            time_base = (stream.time_base.numerator, stream.time_base.denominator) if stream.time_base else None
            for packet, now in self._packets(container.demux(stream), time_base):
                if self._halt.is_set():
                    break
                self._read_at = now
                if skipper is not None and packet.pts is not None and time_base is not None:
                    reordered = bool(ctx.has_b_frames) or (packet.dts is not None and packet.dts != packet.pts)
                    packet_time = media_seconds(packet.pts, *time_base)
                    if dozer is not None:
                        dozer.packet(packet_time, packet.size, now)
                    elif catch_up is not None:
                        arrival.packet(packet_time, now)
                    wanted = skipper.decode(packet_time, packet.is_keyframe, reordered)
                    if catch_up is not None:
                        if wanted and catch_up.behind(packet_time, arrival.lag(packet_time, now), packet.is_keyframe):
                            skipper.pass_over()
                            wanted = False
                        elif catch_up.active:
                            catch_up.left_out(packet_time)
                        elif catch_up.first is not None:
                            self._report_catch_up()  # the stretch ended at this packet
                    if not wanted:
                        if decoding and not self._drain(stream, fps):
                            return
                        decoding = False
                        if skipper.left_out is not None:
                            skipper.left_out(packet_time)
                        if dozer is not None and skipper.due is not None and not self._held:
                            nap = dozer.nap(packet_time, skipper.due, time.monotonic())
                            if nap and self._halt.wait(nap):
                                return
                        continue
                    decoding = True
                if not threads_chosen:
                    # The decoder's threads are chosen before it opens, by the picture size: from the
                    # probe, or from the first keyframe when the probe did not reach one (a live source
                    # joined between keyframes: nothing decodes before its next keyframe anyway).
                    pixels = ctx.width * ctx.height or (_keyframe_pixels(ctx, packet) if packet.is_keyframe else 0)
                    if not pixels and not packet.is_keyframe and undecodable < self.UNSIZED_PACKETS:
                        undecodable += 1
                        continue
                    self._choose_threads(stream, pixels)
                    threads_chosen = True
                try:
                    frames = packet.decode()
                except av.error.FFmpegError as error:
                    undecodable += 1
                    self.decode_errors += 1
                    if undecodable > self.MAX_UNDECODABLE_PACKETS:
                        raise SourceError(f"nothing decodes ({_describe(error)})") if not self.live else error
                    continue
                if frames and not self.decoder_threads:
                    self.decoder_threads = ctx.thread_count  # FFmpeg's choice is known once it decodes
                for frame in frames:
                    undecodable = 0
                    if not self._deliver(frame, fps):
                        return

    def _packets(self, packets: Iterator[Any], time_base: tuple[int, int] | None) -> Iterator[tuple[Any, float]]:
        """The demuxer's packets in order, each with when it was read -- held back, undecoded, while a
        frame handed over awaits its stream's decision which frames it wants next.

        Why: a reader that decodes ahead of the decision decodes every frame up to it. In a stream that
        exits early those are wasted once the decision says "exit" -- about one frame per exit on an
        idle server, but all of them once decisions come late, and they come late exactly when the
        server is short of CPU: the readers then decode three times as many frames (69 % against 20 %
        in the sixteenth set's collapse at 208 pulled streams), which makes the decisions later still.
        Held back, the packets are decoded after the decision, or left out by the
        :class:`KeyframeSkipper` after an exit, so the frames decoded no longer grow with the server's
        lateness. Reading goes on meanwhile: the source is drained as it arrives (a TCP sender is not
        throttled, the :class:`ArrivalClock` sees every packet as it comes) and a frame's latency counts
        from when its packet was read. A hold ends at the first packet read after the decision, or
        once it spans ``hold_max_s`` of media time (then the reader decodes on)."""
        held = self._held
        held.clear()
        awaited_decision = self._awaited_decision
        for packet in packets:
            if self._halt.is_set():
                return
            held.append((packet, time.monotonic()))
            while held:
                awaited = awaited_decision() if awaited_decision is not None else None
                if awaited is not None and awaited is not self._given_up:
                    if self._may_hold(held, time_base):
                        break
                    self._given_up = awaited  # decode on; hold again for the next frame's decision
                    self.holds_expired += 1
                yield held.popleft()
            self.packets_held += bool(held)  # the packet just read is held back
        while held:  # the source ended: there is nothing left to wait for
            yield held.popleft()

    def _may_hold(self, held: deque[tuple[Any, float]], time_base: tuple[int, int] | None) -> bool:
        first, last = held[0][0].pts, held[-1][0].pts
        if time_base is None or first is None or last is None:
            return False
        return abs(media_seconds(last - first, *time_base)) <= self.hold_max_s  # abs: a timestamp reset

    # Packets to wait for a keyframe that gives the picture size before decoding without it -- in
    # frame threads, as for a keyframe that does not give it (10 s at 25 fps; a source whose demuxer
    # flags no keyframes).
    UNSIZED_PACKETS = 250

    def _choose_threads(self, stream: Any, pixels: int) -> None:
        if not pixels or pixels >= self.frame_threads_min_pixels:
            # A large picture (or an unknown one): FFmpeg's frame threads decode several frames at
            # once, so one stream keeps its frame rate beyond what one core decodes.
            stream.thread_type = "AUTO"
        else:
            # A small picture decodes in this thread, the GIL released (PyAV). Frame threads cost more
            # CPU than they save here: with 96 pulled 128x128 streams on 2 cores they spent 2.9 ms/s
            # per stream whether the stream decoded all 25 frames a second or, after early exits, 8
            # from its keyframes -- each restart at a keyframe wakes and flushes them all -- against
            # 3.9 (exits) and 7.1 ms/s (all) for the whole reader decoding in its own thread. They
            # also hold each frame back a few frames.
            stream.codec_context.thread_count = 1

    def _report_catch_up(self, ended: bool = False) -> None:
        """Hand over the stretch skipped to catch up, once it is over (or ``ended``: the connection)."""
        if self.catch_up is None:
            return
        stretch = self.catch_up.take_stretch(ended=ended)
        if stretch is not None and self._on_behind is not None:
            self._on_behind(stretch[0], stretch[1], self._fps)

    def _drain(self, stream: Any, fps: float) -> bool:
        """Before packets are left out: hand over the frames the decoder still holds (frame threads
        delay each by a few packets) -- now, in order, not after the next keyframe behind frames left
        out -- and reset it, as decoding restarts at that keyframe. False when asked to stop."""
        try:
            frames = stream.codec_context.decode(None)
        except av.error.FFmpegError:
            frames = []
        stream.codec_context.flush_buffers()
        for frame in frames:
            frame.time_base = stream.time_base  # frames drained without a packet carry none
            if not self._deliver(frame, fps):
                return False
        return True

    def _deliver(self, frame: av.VideoFrame, fps: float) -> bool:
        """Hand one frame over (pacing files to their clock); False when asked to stop."""
        if self._halt.is_set():
            return False
        if frame.width * frame.height > self.max_pixels:
            raise SourceError(f"frame of {frame.width}x{frame.height} exceeds the limit of {self.max_pixels} pixels")
        media_time = float(frame.time) if frame.time is not None else None
        if self.follow_clock and media_time is not None:
            # Decode at the source's own rate: a file is played, not slurped.
            now = time.monotonic()
            if self._clock is None or media_time < self._clock[1]:
                self._clock = (now, media_time)
            wall0, media0 = self._clock
            ahead = (media_time - media0) - (now - wall0)
            if ahead > 0:
                if self._halt.wait(ahead):
                    return False
            elif ahead < -1.0:
                self._clock = (now, media_time)  # fell far behind: do not rush to catch up
        self.attempt_frames += 1
        self.frames_decoded += 1
        # A file paced to its clock is received when its time comes; anything else when it was read.
        received = time.monotonic() if self.follow_clock else self._read_at
        while not self._on_frame(SourceFrame(frame, media_time, fps, received)):
            if self._halt.wait(0.01):  # ``block`` policy: wait for room
                return False
        return True


def media_seconds(pts: int, num: int, den: int) -> float:
    """A timestamp in seconds exactly as PyAV computes a frame's (``frame.time``, bit for bit: the skip
    hints a packet's time is compared with are frames' times). Not ``pts * packet.time_base``: PyAV's
    time bases are Fractions, whose arithmetic costs 5 us a packet in Python (this, 0.2) under the GIL
    every other reader and the event loop wait for -- a third of the readers' Python time in a profile
    of 64 pulled streams."""
    return float(pts) * num / den


def _keyframe_pixels(ctx: Any, packet: Any) -> int:
    """Width x height of a keyframe's picture, decoded aside in a decoder of its own (0 if it does not
    decode): the stream's decoder cannot change its threads once it has opened."""
    try:
        aside = av.CodecContext.create(ctx.name, "r")
        if ctx.extradata:
            aside.extradata = ctx.extradata
        aside.thread_count = 1
        frames = aside.decode(packet) + aside.decode(None)
    except (av.error.FFmpegError, ValueError):  # no decoder of that name, or the keyframe does not decode
        return 0
    return max((frame.width * frame.height for frame in frames), default=0)


def open_url(options: SourceOptions) -> Callable[[], Any]:
    """An opener for a pull source URL (or local path) with the timeouts and live-stream options."""
    av_options = dict(options.av_options)
    if options.is_live:
        av_options = {**LIVE_OPTIONS, **av_options}
    if options.scheme == "udp":
        av_options = {**UDP_OPTIONS, **av_options}
    if options.scheme in ("rtsp", "rtsps"):
        av_options.setdefault("rtsp_transport", "tcp")

    # UDP and TCP cameras get FFmpeg's own read timeout, not PyAV's: PyAV enforces its timeouts in an
    # interrupt callback that takes the GIL, and FFmpeg calls it before every read from the network
    # -- for a UDP source, every datagram. With 96 UDP streams in one process that cost 0.6-1.2 ms of
    # CPU per stream-second of receiving and demuxing alone (a quarter to a third of it; 3 % of a whole
    # reader's CPU once it dozes, docs/serving.md, tenth set). (The generic ``rw_timeout`` does not
    # reach UDP reads: the udp protocol sets its own from its ``timeout``.) Other protocols, whose
    # options differ or do not reach nested connections (HLS segments), keep PyAV's read timeout;
    # PyAV's callback bounds the opening for all.
    native = {"udp": "timeout", "tcp": "rw_timeout"}.get(options.scheme)
    if native:
        av_options.setdefault(native, str(max(1, round(options.read_timeout_s * 1e6))))

    def opener() -> Any:
        return av.open(options.url, mode="r", options=av_options, metadata_errors="ignore",
                       timeout=(options.open_timeout_s, None if native else options.read_timeout_s))

    return opener


def receive_buffer_bytes(options: SourceOptions) -> int:
    """What a pull source's receive buffer holds while its reader dozes (:class:`Dozer`); 0 where that
    is not known to be safe. UDP: FFmpeg's receive thread fills its ring (``fifo_size`` TS packets,
    in the URL or the options) whether or not the reader reads. TCP and the others: 0 -- a kernel
    buffer fills up and then throttles the sender, which a camera may take for a dead client."""
    if options.scheme != "udp":
        return 0
    query = parse_qs(urlsplit(options.url).query)
    fifo = query.get("fifo_size", [options.av_options.get("fifo_size", UDP_FIFO_PACKETS)])[-1]
    try:
        return max(0, int(fifo)) * 188
    except ValueError:
        return 0


def open_pipe(pipe: ChunkPipe) -> Callable[[], Any]:
    """An opener for pushed MPEG-TS chunks."""

    def opener() -> Any:
        return av.open(pipe, mode="r", format="mpegts", options=dict(PIPE_OPTIONS), metadata_errors="ignore")

    return opener


def _describe(error: Exception) -> str:
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"
