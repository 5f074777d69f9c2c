"""Encoding small test videos whose frames say which frame they are.

Each frame carries its index as a 10-bit barcode of horizontal stripes (white = 1), so after any
decode, resize or crop that keeps the full height we can read back which source frame we got.
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

BITS = 10


def index_frame(index: int, width: int, height: int) -> np.ndarray:
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    stripe = height / BITS
    for bit in range(BITS):
        if (index >> bit) & 1:
            frame[int(bit * stripe):int((bit + 1) * stripe)] = 255
    return frame


def read_index(image: np.ndarray) -> int:
    """The frame index from a decoded (possibly resized/cropped along the width) image."""
    grey = np.asarray(image, dtype=np.float32).mean(axis=(1, 2))
    stripe = len(grey) / BITS
    value = 0
    for bit in range(BITS):
        centre = grey[int((bit + 0.3) * stripe):int((bit + 0.7) * stripe) + 1].mean()
        value |= int(centre > 127) << bit
    return value


def write_video(path: str | Path, num_frames: int, *, width: int = 96, height: int = 64, fps: int = 25,
                codec: str = "libx264", gop: int = 12, container_format: str | None = None,
                bframes: bool = True) -> Path:
    """Encode ``num_frames`` barcode frames; returns the path."""
    path = Path(path)
    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18", "bf": "2" if bframes else "0",
                              "keyint": str(gop), "min-keyint": str(gop), "scenecut": "0"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: str | Path, seconds: float = 0.5) -> Path:
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = int(16000 * seconds)
        t = np.arange(samples) / 16000
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, samples, frame_size):
            chunk = tone[:, start:start + frame_size]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
            frame.sample_rate = 16000
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
