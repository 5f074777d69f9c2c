"""Frame sampling and ordering shared by the frame-by-frame methods.

AdaFocusV2 re-orders the input frames "following the sampling policy in [21]"
(FrameExit, section 4.1; ablated in Table 6): frames are visited coarse to
fine, so the first few steps already cover the whole video and an early exit
has seen its beginning, middle and end.  :func:`coarse_to_fine_order` gives
that order for T uniformly sampled frames: the middle frame first, then the
quarter points, then the eighths, ...  The data pipeline calls it to permute the frame indices it
decodes; the models only see frames in the order given.
"""

from __future__ import annotations

__all__ = ["coarse_to_fine_order", "uniform_frame_indices", "reorder"]


def coarse_to_fine_order(num_frames: int) -> list[int]:
    """Permutation of ``range(num_frames)``: middle first, then quarters, eighths, ...

    Clip position ``i`` covers the segment ``[i/T, (i+1)/T)`` of the video.  The
    dyadic points ``(2k+1) / 2^d`` are visited by increasing depth ``d``, left to
    right, each mapped to the position whose segment holds it (skipped if
    already taken).  Same definition as ``pipelines.data.sampling``.

    >>> coarse_to_fine_order(8)
    [4, 2, 6, 1, 3, 5, 7, 0]
    >>> coarse_to_fine_order(5)
    [2, 1, 3, 0, 4]
    """
    if num_frames < 0:
        raise ValueError("num_frames must be >= 0")
    order: list[int] = []
    used = [False] * num_frames
    depth = 1
    while len(order) < num_frames:
        for k in range(2 ** (depth - 1)):
            position = min((2 * k + 1) * num_frames // 2**depth, num_frames - 1)
            if not used[position]:
                used[position] = True
                order.append(position)
        depth += 1
        if 2 ** (depth - 1) > 4 * num_frames:  # unreachable in practice; keeps the loop finite
            order.extend(i for i in range(num_frames) if not used[i])
            break
    return order


def uniform_frame_indices(video_frames: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames uniformly spread over a ``video_frames``-frame video
    (the centre of each of ``num_frames`` equal segments, TSN-style test sampling)."""
    if video_frames <= 0 or num_frames <= 0:
        raise ValueError("video_frames and num_frames must be positive")
    seg = video_frames / num_frames
    return [min(video_frames - 1, int(seg * i + seg / 2)) for i in range(num_frames)]


def reorder(indices: list[int], order: str = "coarse_to_fine") -> list[int]:
    """Apply a named frame order (``"coarse_to_fine"`` or ``"sequential"``) to sampled indices."""
    if order == "sequential":
        return list(indices)
    if order == "coarse_to_fine":
        return [indices[i] for i in coarse_to_fine_order(len(indices))]
    raise ValueError(f"unknown frame order {order!r}")
