"""Decoding one clip from one video file with PyAV.

``decode_clip`` is the single code path that training, evaluation, the in-memory loader and the data
doctor all use. It

* opens local paths and any URI pyarrow can open (``s3://``, ``gs://``, ...);
* samples ``T`` frame indices (segment-based, see :mod:`pipelines.data.sampling`) inside the
  manifest's ``[start, end)`` window;
* seeks to the keyframe before a target instead of decoding through long gaps, learning the file's
  keyframe interval as it goes, so a 16-frame clip from a two-hour video costs ~16 GOPs, not the film;
* converts and resizes only the frames it keeps, inside swscale (short side -> ``size``), then crops
  the long side to a square so every clip in a dataset has the fixed shape ``[T, size, size, 3]``;
* never raises on bad input: it returns a :class:`ClipResult` whose ``status`` is ``ok``,
  ``repaired`` (usable, with the repair named in ``reason``) or ``skipped`` (``clip`` is None).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from pipelines.data.sampling import frame_window, sample_clip_indices

OK = "ok"
REPAIRED = "repaired"
SKIPPED = "skipped"


@dataclass(frozen=True)
class DecodeConfig:
    """How clips are cut from videos. Defaults suit the synthetic benchmark and the tiny models."""

    num_frames: int = 16
    """T: frames per clip."""
    size: int = 128
    """Short side after resizing; clips are ``size x size`` (long side cropped)."""
    training: bool = False
    """Random offset per segment and random long-side crop (training) vs centres (evaluation)."""
    coarse_to_fine: bool = False
    """Re-order the sampled frames middle-first (FrameExit's policy, AdaFocusV2 Table 6)."""
    max_pixels: int = 7680 * 4320
    """Videos with more pixels per frame than this (8K) are skipped rather than decoded."""
    min_seek_gap: int = 48
    """Seek when the next target is further ahead than this many frames (or the learned GOP)."""
    threads: int = 1
    """Decoder threads per video; Ray parallelises across videos, so one is usually right."""
    interpolation: str = "BILINEAR"
    """swscale interpolation for the resize (``FAST_BILINEAR``, ``BILINEAR``, ``AREA``, ``BICUBIC``)."""


@dataclass
class VideoInfo:
    width: int = 0
    height: int = 0
    fps: float = 0.0
    num_frames: int = 0
    codec: str = ""
    duration: float = 0.0


@dataclass
class ClipResult:
    """One decoded clip, or the reason there is none."""

    status: str
    reason: str = ""
    clip: np.ndarray | None = None  # uint8 [T, size, size, 3]
    indices: np.ndarray | None = None  # int64 [T]: source frame index of each clip frame
    info: VideoInfo = field(default_factory=VideoInfo)

    @property
    def usable(self) -> bool:
        return self.clip is not None


_UNSEEKABLE_FORMATS = frozenset({"avi"})


class _Skip(Exception):
    """Internal: the video cannot give a clip, for the reason in the message."""


def _open(path: str) -> Any:
    """Open a container from a local path or a pyarrow-supported URI."""
    if "://" in path:
        import pyarrow.fs as pa_fs

        filesystem, inner = pa_fs.FileSystem.from_uri(path)
        handle = filesystem.open_input_file(inner)
        return av.open(handle, mode="r", metadata_errors="ignore")
    if not os.path.exists(path):
        raise _Skip("missing file")
    if os.path.isdir(path):
        raise _Skip("is a directory, not a video file")
    if os.path.getsize(path) == 0:
        raise _Skip("empty file (0 bytes)")
    return av.open(path, mode="r", metadata_errors="ignore")


def _video_info(container: Any, stream: Any) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    else:
        duration = 0.0
    num_frames = int(stream.frames or 0)
    if num_frames <= 0 and duration > 0 and fps > 0:
        # Containers like WebM/MKV store no frame count: estimate it; the decode loop corrects an
        # over-estimate by repeating the last real frame (reported as a repair).
        num_frames = int(round(duration * fps))
    ctx = stream.codec_context
    return VideoInfo(width=ctx.width, height=ctx.height, fps=fps, num_frames=num_frames,
                     codec=ctx.name or "", duration=duration)


def _count_frames(container: Any, stream: Any) -> int:
    """Count the video packets when the container tells nothing (demux only, no decoding)."""
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0, any_frame=False, backward=True, stream=stream)
    return count


def _output_geometry(width: int, height: int, size: int) -> tuple[int, int]:
    """Scaled (width, height) with the short side equal to ``size``."""
    if width <= height:
        return size, max(size, int(round(height * size / width)))
    return max(size, int(round(width * size / height))), size


class _FrameIndexer:
    """Maps decoded frames to frame indices from their timestamps (robust across seeks)."""

    def __init__(self, stream: Any, fps: float) -> None:
        self.time_base = stream.time_base or Fraction(1, 1)
        self.start = stream.start_time or 0
        self.fps = fps

    def __call__(self, frame: Any, fallback: int) -> int:
        """The frame's index from its timestamp (``fallback`` when it has none)."""
        pts = frame.pts if frame.pts is not None else frame.dts
        if pts is None or self.fps <= 0:
            return fallback
        return int(math.floor(float((pts - self.start) * self.time_base) * self.fps + 0.5))

    def pts_of(self, index: int) -> int:
        return int(self.start + math.floor(index / self.fps / self.time_base))


def decode_clip(path: str, config: DecodeConfig, *, start: float | None = None, end: float | None = None,
                rng: np.random.Generator | None = None) -> ClipResult:
    """Decode one ``[T, size, size, 3]`` uint8 clip; never raises for a bad video."""
    try:
        return _decode_clip(path, config, start, end, rng)
    except _Skip as reason:
        return ClipResult(SKIPPED, str(reason))
    except FileNotFoundError:
        return ClipResult(SKIPPED, "missing file")
    except av.error.FFmpegError as error:
        return ClipResult(SKIPPED, f"not a readable video: {_describe(error)}")
    except (OSError, ValueError, RuntimeError, MemoryError) as error:
        return ClipResult(SKIPPED, f"{type(error).__name__}: {error}")


def _describe(error: Exception) -> str:
    text = getattr(error, "strerror", None) or str(error)
    return text.split(": '")[0] if isinstance(text, str) else str(error)


def _decode_clip(path: str, config: DecodeConfig, start: float | None, end: float | None,
                 rng: np.random.Generator | None) -> ClipResult:
    with _open(path) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            raise _Skip("no video stream" + (f" (only {', '.join(kinds)})" if kinds else ""))
        stream = container.streams.video[0]
        if stream.codec_context is None or not stream.codec_context.name:
            raise _Skip("video stream with an unknown codec")
        try:
            av.Codec(stream.codec_context.name, "r")
        except Exception:
            raise _Skip(f"no decoder for codec {stream.codec_context.name!r}") from None
        info = _video_info(container, stream)
        if info.width <= 0 or info.height <= 0:
            raise _Skip("video stream without a frame size")
        if info.width * info.height > config.max_pixels:
            raise _Skip(f"resolution {info.width}x{info.height} exceeds the limit of {config.max_pixels} pixels")
        if info.num_frames <= 0:
            info.num_frames = _count_frames(container, stream)
            if info.num_frames <= 0:
                raise _Skip("no video frames")
        if info.fps <= 0:
            info.fps = info.num_frames / info.duration if info.duration > 0 else 25.0

        stream.thread_type = "AUTO" if config.threads > 1 else "SLICE"
        stream.codec_context.thread_count = config.threads

        if rng is None and config.training:
            rng = np.random.default_rng()
        indices = sample_clip_indices(info.num_frames, info.fps, config.num_frames, training=config.training,
                                      start=start, end=end, coarse_to_fine=config.coarse_to_fine, rng=rng)
        out_w, out_h = _output_geometry(info.width, info.height, config.size)
        # Crop the long side to a square; the same window for every frame of the clip.
        slack_x, slack_y = out_w - config.size, out_h - config.size
        if config.training:
            offset_x = int(rng.integers(0, slack_x + 1)) if slack_x else 0
            offset_y = int(rng.integers(0, slack_y + 1)) if slack_y else 0
        else:
            offset_x, offset_y = slack_x // 2, slack_y // 2

        # One reformatter per video: it keeps its swscale context between frames, where
        # ``frame.to_ndarray(width=...)`` would build a new one (filter tables and all) every frame.
        reformatter = VideoReformatter()
        interpolation = Interpolation[config.interpolation]

        def convert(frame: Any) -> np.ndarray:
            image = reformatter.reformat(frame, width=out_w, height=out_h, format="rgb24",
                                         interpolation=interpolation).to_ndarray()
            return image[offset_y:offset_y + config.size, offset_x:offset_x + config.size]

        decoded, last_frame, last_index, repairs = _decode_targets(container, stream, info, np.unique(indices),
                                                                   convert, config)
        if last_frame is None:
            raise _Skip("no decodable frames")
        # Targets past the real end (a frame count that over-estimated, a truncated file) show the
        # last frame that decoded.
        missing = sorted({int(t) for t in indices} - set(decoded))
        if missing:
            tail = (last_index, convert(last_frame))
            for target in missing:
                decoded[target] = tail
            repairs.append(f"video ended at frame {last_index + 1} of {info.num_frames} expected; "
                           f"last frame repeated for {len(missing)} sampled frames")

    first, last = frame_window(info.num_frames, info.fps, start, end)
    if last - first < config.num_frames:
        repairs.append(f"only {last - first} frames for a {config.num_frames}-frame clip; frames repeated")
    clip = np.stack([decoded[int(t)][1] for t in indices])
    used = np.array([decoded[int(t)][0] for t in indices], dtype=np.int64)
    return ClipResult(REPAIRED if repairs else OK, "; ".join(repairs), clip, used, info)


def _decode_targets(container: Any, stream: Any, info: VideoInfo, targets: np.ndarray, convert: Any,
                    config: DecodeConfig) -> tuple[dict[int, tuple[int, np.ndarray]], Any, int, list[str]]:
    """Decode the frames at ``targets`` (sorted, unique).

    Returns ``{target: (source index, image)}``, the last decoded frame, its index, and the repairs.
    """
    index_of = _FrameIndexer(stream, info.fps)
    frames: dict[int, tuple[int, np.ndarray]] = {}
    last_frame = None
    repairs: list[str] = []
    keyframe_gap = 0  # largest keyframe interval seen; seeking to a target closer than this wastes work
    last_keyframe = -1
    position = -1  # index of the last decoded frame
    base = 0  # index of the first frame since the last (re)start of decoding
    decoded_since_start = 0
    budget = 2 * info.num_frames + 1000  # bounds the work on streams whose timestamps never advance
    total_decoded = 0
    # AVI timestamps are frame counters that packed B-frames leave out of order: seek by them and
    # the frame after the seek cannot be placed. Other containers lose seeking the same way below.
    can_seek = container.format.name not in _UNSEEKABLE_FORMATS
    previous_pts = None
    frame_iter = None
    target_i = 0
    planned = -1  # the target whose seek-or-decode decision has been made
    try:
        while target_i < len(targets):
            target = int(targets[target_i])
            far = target - position > max(config.min_seek_gap, keyframe_gap)
            if frame_iter is None or (planned != target and can_seek and far):
                seeking = can_seek and far
                previous_pts = None
                if seeking:
                    container.seek(index_of.pts_of(target), stream=stream, backward=True, any_frame=False)
                frame_iter = container.decode(stream)
                decoded_since_start = 0
                base = -1 if seeking else 0  # after a seek, the first frame's timestamp tells where we are
            planned = target
            frame = next(frame_iter, None)
            if frame is None:
                break
            total_decoded += 1
            if total_decoded > budget:
                repairs.append("decoding stopped: timestamps do not advance")
                break
            if base < 0:
                base = index_of(frame, max(position, 0))
                if base <= target:
                    # The seek landed on the last keyframe before the target, so the next keyframe
                    # lies beyond it: seeking again over a shorter distance would land here too.
                    keyframe_gap = max(keyframe_gap, target - base + 1)
                if base > target:
                    # The seek landed past the target (a broken index): decode from the start instead.
                    can_seek = False
                    container.seek(0, stream=stream, backward=True, any_frame=False)
                    frame_iter = container.decode(stream)
                    decoded_since_start = 0
                    base = 0
                    continue
            if frame.pts is not None:
                if previous_pts is not None and frame.pts <= previous_pts:
                    can_seek = False
                previous_pts = frame.pts
            # Frames are counted in decode (presentation) order rather than read from each timestamp:
            # AVI and other containers carry timestamps that are out of order or have holes.
            index = base + decoded_since_start
            decoded_since_start += 1
            if frame.key_frame:
                if last_keyframe >= 0 and index > last_keyframe:
                    keyframe_gap = max(keyframe_gap, index - last_keyframe)
                last_keyframe = index
            position = index
            last_frame = frame
            image = None
            while target_i < len(targets) and index >= int(targets[target_i]):
                if image is None:
                    image = convert(frame)
                frames[int(targets[target_i])] = (index, image)
                target_i += 1
    except av.error.FFmpegError as error:
        if not frames:
            raise _Skip(f"undecodable video stream ({info.codec}): {_describe(error)}") from None
        repairs.append(f"decoding failed after frame {position} ({_describe(error)}); last frame repeated")
    return frames, last_frame, position, repairs
