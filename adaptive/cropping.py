"""Differentiable interpolation-based patch selection (AdaFocusV2, section 3.2).

The policy outputs continuous, normalised centre coordinates ``u in [0, 1]^d``.
Eq. (4) keeps the patch inside the frame: with a frame of side ``L`` and a
patch of side ``S`` (pixels), the centre in pixels is

    c = S/2 + u * (L - S)            in [S/2, L - S/2]                  (Eq. 4)

so ``u = 0`` puts the patch against the left/top edge and ``u = 1`` against the
right/bottom edge.  Pixel ``j`` of the ``P``-pixel output patch sits at the
frame location

    x_j = c - S/2 + (j + 1/2) * S/P                                       (Eq. 5)

(the patch's pixel-centre grid; with ``S == P`` the offsets are the paper's
``o_ij``).  Frame pixel ``k`` covers ``[k, k+1)`` and holds its value at
``k + 1/2``; the value at ``x_j`` is the bilinear (trilinear for 3-D cubes)
interpolation of the surrounding pixels, Eq. (6).  Because ``x_j`` is an
affine function of ``u``, ``d patch / d u = (L - S) * d patch / d x`` (Eq. 7-8),
which autograd derives through ``F.grid_sample``.

With ``align_corners=False`` the normalised grid coordinate of a frame location
``x`` is ``2 x / L - 1``; this convention is exactly the pixel-centre
convention above, so an integer-aligned crop (``c - S/2`` an integer and
``S == P``) reproduces the frame's pixels bit for bit.

Everything is written for ``d`` spatial dimensions: ``d = 2`` for frames
``[N, C, H, W]`` (AdaFocusV2 patches) and ``d = 3`` for clips
``[N, C, T, H, W]`` (AdaFocusV3 cubes, trilinear).  Coordinates and sizes are
always in ``(x, y[, t])`` order, i.e. (width, height[, time]) -- the reverse of
the tensor's axis order, the same as ``grid_sample``'s grid.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "centres_to_pixels",
    "interpolate_crop",
    "interpolate_crop_reference",
    "centres_to_boxes",
    "centres_on",
]


def _per_axis(value: float | Sequence[float], d: int) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * d
    value = [float(v) for v in value]
    if len(value) != d:
        raise ValueError(f"expected {d} sizes in (x, y[, t]) order, got {value}")
    return value


def centres_to_pixels(
    centres: torch.Tensor, frame_size: Sequence[float], crop_size: Sequence[float]
) -> torch.Tensor:
    """Eq. (4): normalised centres ``[N, d]`` -> centres in pixels, patch kept inside the frame."""
    L = centres.new_tensor(frame_size)
    S = centres.new_tensor(crop_size)
    return S / 2 + centres * (L - S)


def _sample_positions(
    centres: torch.Tensor, frame_size: list[float], crop_size: list[float], out_size: list[int]
) -> list[torch.Tensor]:
    """Eq. (5): for every axis, the frame locations ``[N, P]`` of the patch's pixel centres."""
    c = centres_to_pixels(centres, frame_size, crop_size)  # [N, d]
    positions = []
    for a in range(centres.shape[1]):
        P, S = out_size[a], crop_size[a]
        j = torch.arange(P, dtype=centres.dtype, device=centres.device)
        positions.append(c[:, a : a + 1] - S / 2 + (j + 0.5) * (S / P))  # [N, P]
    return positions


def interpolate_crop(
    x: torch.Tensor,
    centres: torch.Tensor,
    crop_size: float | Sequence[float],
    out_size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Crop a patch/cube around continuous centres by bilinear/trilinear interpolation.

    Args:
        x: ``[N, C, H, W]`` (d=2) or ``[N, C, T, H, W]`` (d=3).
        centres: ``[N, d]`` in ``[0, 1]``, (x, y[, t]) order, Eq. (4) parametrisation.
            Differentiable: gradients flow to ``centres`` (Eq. 7-8) and to ``x``.
        crop_size: side(s) of the patch in input pixels, (x, y[, t]) order.
        out_size: side(s) of the output in pixels; defaults to ``crop_size``
            (the paper's case: the patch is taken at full resolution).

    Returns:
        ``[N, C, P_h, P_w]`` or ``[N, C, P_t, P_h, P_w]``.
    """
    d = centres.shape[1]
    if x.dim() != d + 2:
        raise ValueError(f"centres have {d} coordinates but x has {x.dim() - 2} spatial dims")
    frame_size = [float(s) for s in reversed(x.shape[2:])]  # (W, H[, T])
    crop = _per_axis(crop_size, d)
    out = [int(round(v)) for v in _per_axis(out_size if out_size is not None else crop_size, d)]
    for a in range(d):
        if not 0 < crop[a] <= frame_size[a]:
            raise ValueError(f"crop size {crop[a]} must be in (0, {frame_size[a]}] along axis {a}")
    positions = _sample_positions(centres.to(x.dtype), frame_size, crop, out)
    # Pixel-centre convention == grid_sample(align_corners=False): g = 2 x / L - 1.
    g = [2 * p / L - 1 for p, L in zip(positions, frame_size)]
    N = centres.shape[0]
    if d == 2:
        gx, gy = g
        grid = torch.stack(
            (gx[:, None, :].expand(N, out[1], out[0]), gy[:, :, None].expand(N, out[1], out[0])), dim=-1
        )
    elif d == 3:
        gx, gy, gt = g
        shape = (N, out[2], out[1], out[0])
        grid = torch.stack(
            (
                gx[:, None, None, :].expand(shape),
                gy[:, None, :, None].expand(shape),
                gt[:, :, None, None].expand(shape),
            ),
            dim=-1,
        )
    else:
        raise ValueError(f"only 2-D patches and 3-D cubes are supported, got d={d}")
    # Eq. (6): bilinear ("bilinear" on a 5-D input is trilinear).  The sample
    # points stay within [1/2, L - 1/2] by Eq. (4); "border" only guards rounding.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def interpolate_crop_reference(
    x: torch.Tensor, centres: torch.Tensor, crop_size: float, out_size: int | None = None
) -> torch.Tensor:
    """Eq. (5)-(6) written out literally for 2-D frames (slow; used to test :func:`interpolate_crop`).

    The four neighbours of ``(x_ij, y_ij)`` are gathered and mixed with the
    weights ``(floor(x)-x+1)(floor(y)-y+1)``, ``(x-floor(x))(floor(y)-y+1)``, ...
    """
    N, C, H, W = x.shape
    S = float(crop_size)
    P = int(out_size if out_size is not None else round(S))
    px, py = _sample_positions(centres.to(x.dtype), [float(W), float(H)], [S, S], [P, P])
    # values live at pixel centres k + 1/2, so the lattice coordinate is x - 1/2
    X = (px - 0.5)[:, None, :].expand(N, P, P)  # [N, P(rows), P(cols)]
    Y = (py - 0.5)[:, :, None].expand(N, P, P)
    x0, y0 = torch.floor(X), torch.floor(Y)
    wx1, wy1 = X - x0, Y - y0  # weights of the right / lower neighbour
    wx0, wy0 = x0 - X + 1, y0 - Y + 1

    def pixel(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        yy = yy.long().clamp(0, H - 1)
        xx = xx.long().clamp(0, W - 1)
        flat = (yy * W + xx).reshape(N, 1, P * P).expand(N, C, P * P)
        return x.reshape(N, C, H * W).gather(2, flat).reshape(N, C, P, P)

    m00, m01 = pixel(y0, x0), pixel(y0, x0 + 1)
    m10, m11 = pixel(y0 + 1, x0), pixel(y0 + 1, x0 + 1)
    w = lambda a, b: (a * b)[:, None]  # noqa: E731
    return m00 * w(wx0, wy0) + m01 * w(wx1, wy0) + m10 * w(wx0, wy1) + m11 * w(wx1, wy1)


def centres_to_boxes(centres: torch.Tensor, crop_fraction: float | Sequence[float]) -> torch.Tensor:
    """Normalised centres ``[..., d]`` -> normalised boxes ``[..., 2d]`` (x0, y0[, t0], x1, y1[, t1]).

    ``crop_fraction`` is the patch side divided by the frame side, per axis.
    """
    d = centres.shape[-1]
    f = centres.new_tensor(_per_axis(crop_fraction, d))
    lo = centres * (1 - f)  # Eq. (4) in normalised units: c/L - S/(2L)
    return torch.cat((lo, lo + f), dim=-1)


def centres_on(points: torch.Tensor, crop_fraction: float | Sequence[float]) -> torch.Tensor:
    """The inverse of Eq. (4): the centre parameters ``[..., d]`` in [0, 1] that put the middle of a
    crop of ``crop_fraction`` on the normalised ``points [..., d]`` (clamped where the crop would
    leave the frame)."""
    f = torch.tensor(_per_axis(crop_fraction, points.shape[-1]), dtype=torch.float64)  # as Python floats would
    half, rest = (f / 2).to(points), (1 - f).to(points)
    return ((points - half) / rest).clamp(0, 1)
