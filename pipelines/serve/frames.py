"""Frames in: what a pushed message holds, decoding it with PyAV, and the model's input transform.

The transform is the training evaluation transform, step for step: swscale (bilinear) resizes the short
side to ``data["size"]`` and the long side is centre-cropped to a square (as
:func:`pipelines.data.decode.decode_clip`), then the centre ``crop_size`` square is taken (as the DALI
evaluation stage, whose short-side resize is a no-op on a square of that size) and the pixels are
ImageNet-normalised. Only frames the model will see are converted; the rest are never resized.

Pushed messages are sniffed by their first bytes (no framing protocol needed):

* JPEG (``FF D8 FF``) and PNG (``89 50 4E 47``) are single images;
* MPEG-TS (sync byte ``0x47`` every 188 bytes) is a chunk of an H.264 (or any PyAV-decodable) stream;
* ``ASTS`` + big-endian float64 seconds + a JPEG/PNG image gives that image a media timestamp, so a
  client can push faster or slower than real time and the windows still follow stream time.

Image sizes are read from the JPEG SOF / PNG IHDR header *before* decoding, so an oversized image is
refused without spending the decode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import torch
from av.video.reformatter import Interpolation, VideoReformatter

from adaptive.interface import normalize_uint8_clip

JPEG = "jpeg"
PNG = "png"
MPEGTS = "mpegts"
TIMESTAMP_MAGIC = b"ASTS"
TS_PACKET = 188


class PayloadError(ValueError):
    """A pushed message that is not a usable frame; ``code`` names the problem for the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Payload:
    kind: str  # JPEG, PNG or MPEGTS
    body: bytes
    timestamp: float | None = None  # media time in seconds, when the client gave one


def sniff(data: bytes) -> str | None:
    """The kind of a pushed message from its first bytes, or None."""
    if data[:3] == b"\xff\xd8\xff":
        return JPEG
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return PNG
    if data[:1] == b"\x47" and (len(data) < 2 * TS_PACKET or data[TS_PACKET] == 0x47):
        return MPEGTS
    return None


def parse_message(data: bytes) -> Payload:
    """A binary WebSocket message -> :class:`Payload`; raises :class:`PayloadError` for anything else."""
    timestamp = None
    if data[:4] == TIMESTAMP_MAGIC:
        if len(data) < 12:
            raise PayloadError("malformed_frame", "timestamped frame shorter than its 12-byte header")
        (timestamp,) = struct.unpack(">d", data[4:12])
        if not np.isfinite(timestamp):
            raise PayloadError("malformed_frame", "timestamp is not a finite number")
        data = data[12:]
    kind = sniff(data)
    if kind is None:
        raise PayloadError("unsupported_payload",
                           "binary message is neither a JPEG/PNG image nor an MPEG-TS chunk (see docs/serving.md)")
    if kind == MPEGTS and timestamp is not None:
        raise PayloadError("malformed_frame", "MPEG-TS chunks carry their own timestamps; send them bare")
    return Payload(kind, data, timestamp)


def image_dimensions(kind: str, data: bytes) -> tuple[int, int]:
    """(width, height) from the header of a JPEG or PNG; raises :class:`PayloadError` if there is none."""
    if kind == PNG:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise PayloadError("malformed_frame", "PNG without an IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if kind == JPEG:
        return _jpeg_dimensions(data)
    raise ValueError(f"not an image kind: {kind}")


# Start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_dimensions(data: bytes) -> tuple[int, int]:
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise PayloadError("malformed_frame", "JPEG marker structure is broken")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if length < 2:
            raise PayloadError("malformed_frame", "JPEG segment with an invalid length")
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                break
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            if width == 0 or height == 0:
                raise PayloadError("malformed_frame", "JPEG with a zero frame size")
            return int(width), int(height)
        if marker == 0xDA:  # start of scan before any SOF
            break
        i += 2 + length
    raise PayloadError("malformed_frame", "JPEG without a frame header (truncated or not a JPEG)")


class ImageDecoder:
    """Decodes single JPEG/PNG images with PyAV's codecs. One per stream (codec contexts are not
    thread-safe); frames come out as ``av.VideoFrame`` so they share the video path's transform."""

    def __init__(self) -> None:
        self._contexts: dict[str, Any] = {}

    def decode(self, kind: str, data: bytes) -> av.VideoFrame:
        context = self._contexts.get(kind)
        if context is None:
            context = self._contexts[kind] = av.CodecContext.create("mjpeg" if kind == JPEG else "png", "r")
        try:
            frames = context.decode(av.Packet(data))
        except av.error.FFmpegError as error:
            # A failed decode can leave the context mid-frame: start the next image on a fresh one.
            self._contexts.pop(kind, None)
            raise PayloadError("malformed_frame", f"undecodable {kind.upper()}: {error.strerror or error}") from None
        if not frames:
            self._contexts.pop(kind, None)
            raise PayloadError("malformed_frame", f"{kind.upper()} produced no picture (truncated?)")
        return frames[-1]


@dataclass(frozen=True)
class Preprocess:
    """The model's input geometry, from the registered model's ``data`` section."""

    size: int = 128
    """Short side after resizing (the decode ``size`` of training)."""
    crop_size: int = 112
    """Centre crop fed to the model (``crop_size`` of training, == model.input_size)."""
    interpolation: str = "BILINEAR"

    @classmethod
    def from_data(cls, data: dict, input_size: int) -> "Preprocess":
        crop = int(data.get("crop_size") or input_size)
        return cls(size=int(data.get("size") or crop), crop_size=crop)


def output_geometry(width: int, height: int, size: int) -> tuple[int, int]:
    """Scaled (width, height) with the short side equal to ``size`` (as the training decoder)."""
    if width <= height:
        return size, max(size, int(round(height * size / width)))
    return max(size, int(round(width * size / height))), size


class FrameTransform:
    """``av.VideoFrame`` (any size, any pixel format) -> uint8 ``[crop, crop, 3]`` RGB.

    Keeps one swscale context per input geometry (rebuilding it every frame costs more than the
    resize). Not thread-safe: one per stream, used by one thread at a time.
    """

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess
        self._reformatter = VideoReformatter()
        self._interpolation = Interpolation[preprocess.interpolation]

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        p = self.preprocess
        out_w, out_h = output_geometry(frame.width, frame.height, p.size)
        image = self._reformatter.reformat(frame, width=out_w, height=out_h, format="rgb24",
                                           interpolation=self._interpolation).to_ndarray()
        # decode_clip's square: centre of the long side.
        y0, x0 = (out_h - p.size) // 2, (out_w - p.size) // 2
        # DALI's evaluation crop: centre ``crop_size`` of the square.
        offset = (p.size - p.crop_size) // 2
        y0, x0 = y0 + offset, x0 + offset
        return np.ascontiguousarray(image[y0:y0 + p.crop_size, x0:x0 + p.crop_size])


def to_model_input(images: np.ndarray | list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> ImageNet-normalised float ``[B, 3, H, W]`` on ``device``."""
    batch = torch.from_numpy(np.stack(images) if isinstance(images, list) else images)
    return normalize_uint8_clip(batch.to(device, non_blocking=True))
