"""Which frames of a video a clip is made of.

Segment-based sampling (TSN; the frame sampling AdaFocusV2 section 4 follows): the frames in the
clip's time window are split into ``T`` equal segments and one frame is taken from each; in training
at a random offset inside its segment, in evaluation at the segment's centre. A video with fewer than
``T`` frames repeats frames to fill the clip (reported as a repair by the decoder).

Optionally the sampled frames are re-ordered coarse-to-fine (the deterministic policy of FrameExit
that AdaFocusV2 adopts, Table 6 "frame sampling policy from [21]"): the middle frame first, then the
quarter points, then the eighths, and so on, so that a model that stops after ``t`` frames has seen
frames spread over the whole video rather than only its beginning.
"""

from __future__ import annotations

import math

import numpy as np

from adaptive.sampling import coarse_to_fine_order as _model_order


def frame_window(num_frames: int, fps: float, start: float | None = None, end: float | None = None) -> tuple[int, int]:
    """The ``[first, last)`` frame range of the time window ``[start, end)`` seconds.

    NaN or None means "from the beginning" / "to the end". A window that lies outside the video is
    clipped to it; an empty intersection falls back to the whole video (the decoder reports it).
    """
    first = 0
    last = num_frames
    if start is not None and not math.isnan(start) and fps > 0:
        first = min(max(int(math.floor(start * fps)), 0), num_frames)
    if end is not None and not math.isnan(end) and fps > 0:
        last = min(max(int(math.ceil(end * fps)), 0), num_frames)
    if last <= first:
        return 0, num_frames
    return first, last


def segment_indices(first: int, last: int, num_samples: int, *, training: bool,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """``num_samples`` frame indices from ``[first, last)``, one per equal segment, ascending.

    Training draws a uniform offset inside each segment; evaluation takes each segment's centre.
    With fewer frames than samples every frame is used and frames repeat (nearest-earlier).
    """
    if num_samples <= 0:
        raise ValueError("num_samples must be positive")
    length = last - first
    if length <= 0:
        raise ValueError(f"empty frame window [{first}, {last})")
    if length < num_samples:
        # Spread the repeats evenly: frame k of the clip shows frame floor(k * length / T).
        return first + (np.arange(num_samples) * length) // num_samples
    segment = length / num_samples
    starts = np.arange(num_samples) * segment
    if training:
        if rng is None:
            rng = np.random.default_rng()
        offsets = rng.random(num_samples) * segment
    else:
        offsets = np.full(num_samples, segment / 2.0)
    indices = first + np.floor(starts + offsets).astype(np.int64)
    return np.minimum(indices, last - 1)


def coarse_to_fine_order(num_samples: int) -> np.ndarray:
    """A permutation of ``range(num_samples)``: middle first, then quarters, eighths, ...

    The model library owns the definition (:func:`adaptive.sampling.coarse_to_fine_order`), so the
    order the data path produces is the order the models were designed for. ``T=8`` gives
    ``[4, 2, 6, 1, 3, 5, 7, 0]``.
    """
    return np.asarray(_model_order(num_samples), dtype=np.int64)


def sample_clip_indices(num_frames: int, fps: float, num_samples: int, *, training: bool,
                        start: float | None = None, end: float | None = None,
                        coarse_to_fine: bool = False, rng: np.random.Generator | None = None) -> np.ndarray:
    """Frame indices of one clip, in the order the model sees them."""
    first, last = frame_window(num_frames, fps, start, end)
    indices = segment_indices(first, last, num_samples, training=training, rng=rng)
    if coarse_to_fine:
        indices = indices[coarse_to_fine_order(num_samples)]
    return indices
