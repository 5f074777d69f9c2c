"""Synthetic video benchmark with real spatial and temporal redundancy.

The adaptive models in :mod:`adaptive` (AdaFocusV2/V3, AdaFrame, AdaFuse, Ada3D) save compute by
*glancing* at a cheap, low-resolution view of every frame, *focusing* an expensive encoder on one
patch, and *skipping* uninformative frames. Natural datasets are too big for CI, and random noise
has no structure to exploit, so this module renders small videos whose structure is known by
construction (see ``docs/synthetic_benchmark.md`` for the reasoning and measurements):

``appearance`` task
    The class is a luma texture ("glyph") on the face of one small target object. The glyph is made
    of ``cell_px``-wide cells (period ``2 * cell_px``) in a pattern whose every ``2*cell_px``-square
    box average is the same, so a 4x area-downsampled glance sees a flat grey face for *every* class
    -- up to a faint leak at the face's border, which a contrast taper weakens and a random, smooth
    shading of the object buries -- while the object itself is easy to find at low resolution by its
    saturated red ring. Distractor objects carry glyphs of *other* classes behind rings of other
    colours, over a scrolling, cluttered background. The glyph is legible only in a per-video share
    of the frames (10-90 %, written to the manifest); in the other frames the face is blank.

``motion`` task
    The class is the target's trajectory (left->right, right->left, down, up, clockwise, ...). Every
    class comes with its exact time-reversal as another class and the target's appearance is drawn
    from the same distribution for every class, so neither a single frame nor an unordered bag of
    frames can tell a class from its reverse: temporal order is required.

Everything random for video ``i`` is drawn from ``numpy.random.SeedSequence([seed, task, i])``, so
a video's bytes do not depend on the worker count or the order in which workers finish.

Layout written by :func:`generate_benchmark`::

    DIR/videos/<video_id>.mp4   H.264 (libx264), yuv420p, ``fps`` frames/s, ``size`` x ``size``
    DIR/manifest.csv            path,label,split,legible_fraction  (path relative to DIR)
    DIR/classes.json            JSON list of class names; position = label
    DIR/annotations.jsonl       per video: target/distractor boxes per frame, legibility masks
    DIR/benchmark.json          generation parameters (+ encoder, counts); written last
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import multiprocessing as mp
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

__all__ = [
    "APPEARANCE_CLASSES",
    "BenchmarkParams",
    "GENERATOR_VERSION",
    "GlyphSpec",
    "MOTION_CLASSES",
    "ObjectTrack",
    "Scene",
    "TASKS",
    "VideoRecord",
    "assign_labels_and_splits",
    "build_scene",
    "class_names",
    "drift_trajectory",
    "edge_taper",
    "encode_video",
    "generate_benchmark",
    "glyph_pattern",
    "glyph_period_px",
    "legibility_mask",
    "make_video",
    "motion_trajectory",
    "object_shading",
    "pick_h264_encoder",
    "render_background_texture",
    "render_frame",
    "render_frames",
    "render_object_sprites",
    "sample_legible_fraction",
    "shading_basis",
    "write_manifest",
]

GENERATOR_VERSION = 4
"""Bump when the rendering changes, so :func:`generate_benchmark` regenerates old output."""

TASKS = ("appearance", "motion")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                "veryslow", "placebo")

# --------------------------------------------------------------------------------------------------
# Class definitions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlyphSpec:
    """One appearance class: a binary texture of square cells.

    Every cell row alternates on/off along x; ``phases`` (repeated down the rows) says whether a row
    starts "on" (1) or "off" (0). ``transpose`` swaps the roles of rows and columns. This is the only
    family of binary cell patterns whose every 2x2-cell window holds exactly two "on" cells, which is
    what makes a box filter ``2 * cell_px`` wide (4x area downsampling for 2-px cells) return the
    same grey for every class at *any* pixel alignment (docs/synthetic_benchmark.md).
    """

    name: str
    phases: tuple[int, ...]
    transpose: bool = False


APPEARANCE_CLASSES: tuple[GlyphSpec, ...] = (
    GlyphSpec("vstripes", (0,)),
    GlyphSpec("hstripes", (0,), transpose=True),
    GlyphSpec("checker", (0, 1)),
    GlyphSpec("vbricks2", (0, 0, 1, 1)),
    GlyphSpec("hbricks2", (0, 0, 1, 1), transpose=True),
    GlyphSpec("vbricks3", (0, 0, 0, 1, 1, 1)),
    GlyphSpec("hbricks3", (0, 0, 0, 1, 1, 1), transpose=True),
    GlyphSpec("vmixed", (0, 1, 1)),
    GlyphSpec("hmixed", (0, 1, 1), transpose=True),
    GlyphSpec("vbricks4", (0, 0, 0, 0, 1, 1, 1, 1)),
    GlyphSpec("hbricks4", (0, 0, 0, 0, 1, 1, 1, 1), transpose=True),
)
"""Appearance classes in label order; ``--classes C`` uses the first C."""

MOTION_CLASSES: tuple[str, ...] = (
    "left_to_right",
    "right_to_left",
    "top_to_bottom",
    "bottom_to_top",
    "clockwise",
    "counterclockwise",
    "diagonal_down_right",
    "diagonal_up_left",
    "diagonal_down_left",
    "diagonal_up_right",
    "zigzag_right",
    "zigzag_left",
)
"""Motion classes in label order, in pairs (2k, 2k+1) that are exact time-reversals of each other."""

# Ring colours (RGB in [0, 1]). The target's red is the only saturated red in any frame: the
# background and clutter are kept low-chroma, distractor rings use other hues. That is the coarse cue
# a low-resolution glance can see.
TARGET_RING = (0.92, 0.08, 0.08)
DISTRACTOR_RINGS: dict[str, tuple[float, float, float]] = {
    "green": (0.10, 0.75, 0.15),
    "blue": (0.12, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "cyan": (0.10, 0.80, 0.85),
}


# Object shading (see object_shading): control grid size, std and clip of the control values.
SHADING_KNOTS = 6
SHADING_STD = 0.15
SHADING_CLIP = 0.28
# Glyph contrast ramps up over this many cells from the face border (see edge_taper).
TAPER_CELLS = 2.0


def class_names(task: str, classes: int) -> list[str]:
    """The first ``classes`` class names of ``task``; raises ``ValueError`` if there are fewer."""
    if task == "appearance":
        names = [g.name for g in APPEARANCE_CLASSES]
    elif task == "motion":
        names = list(MOTION_CLASSES)
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not 2 <= classes <= len(names):
        raise ValueError(f"task {task!r} defines 2..{len(names)} classes, {classes} requested")
    return names[:classes]


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkParams:
    """Everything that determines the generated bytes (the worker count does not)."""

    videos: int = 2000
    frames: int = 32
    size: int = 128
    seed: int = 0
    task: str = "appearance"
    classes: int = 8
    fps: int = 16
    cell_px: int = 2
    """Glyph cell width in pixels; the glyph averages out under ``2 * cell_px`` box downsampling."""
    crf: int = 18
    """libx264 quality; 18 keeps 2-px luma cells crisp (measured in tests/test_synthetic.py)."""
    preset: str = "veryfast"
    gop: int = 16
    """Keyframe interval in frames (1 s at 16 fps) so decoders can seek inside a video."""
    object_scale: float = 1.8
    """Object width as a multiple of 0.15-0.19 of the frame side: 1.8 gives ~0.27-0.34 (35-44 px at
    128). At 1.0 (20-24 px) the glyph covers so few pixels that from-scratch tiny models on 2 CPU
    cores stayed at chance for hundreds of steps; at 1.8 a full-frame tiny model reached 37 %
    (8 classes) after 100 steps."""
    distractor_glyphs: str = "neutral"
    """Appearance task: ``neutral`` distractors wear glyphs of the defined patterns that are not
    classes here (blank faces when every pattern is a class), so reading the wrong object says
    nothing; ``other_classes`` gives them glyphs of other classes, so reading the wrong object gives a
    confident wrong answer (a much harder relational task: from-scratch tiny models on 2 CPU cores
    do not learn it in minutes)."""

    def validate(self) -> None:
        """Raise ``ValueError`` for parameters that cannot produce a valid benchmark."""
        class_names(self.task, self.classes)  # checks task and class count
        if self.videos < 1:
            raise ValueError("videos must be >= 1")
        if self.frames < 2:
            raise ValueError("frames must be >= 2 (motion needs at least two)")
        if self.size < 64 or self.size % 4:
            raise ValueError("size must be a multiple of 4 and >= 64 (objects are ~0.15*size wide)")
        if self.fps < 1 or self.gop < 1:
            raise ValueError("fps and gop must be >= 1")
        if self.cell_px < 1:
            raise ValueError("cell_px must be >= 1")
        if not 0 <= self.crf <= 51:
            raise ValueError("crf must be in 0..51")
        if self.preset not in X264_PRESETS:
            raise ValueError(f"preset must be one of {X264_PRESETS}")
        if self.distractor_glyphs not in ("neutral", "other_classes"):
            raise ValueError("distractor_glyphs must be 'neutral' or 'other_classes'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def class_names(self) -> list[str]:
        return class_names(self.task, self.classes)

    @property
    def task_id(self) -> int:
        return TASKS.index(self.task)

    def video_id(self, index: int) -> str:
        return f"{self.task}_{index:05d}"


# --------------------------------------------------------------------------------------------------
# Labels and splits
# --------------------------------------------------------------------------------------------------


def assign_labels_and_splits(params: BenchmarkParams) -> list[tuple[int, str]]:
    """``(label, split)`` for every video index: balanced classes, splits stratified by class.

    Labels are ``index % classes`` shuffled by the seed, so class counts differ by at most one; inside
    each class the videos (in index order) are cut 70/15/15 into train/val/test by cumulative
    rounding, so every split is class-balanced too.
    """
    rng = np.random.default_rng([params.seed, params.task_id, 0x5EED])
    labels = rng.permutation(np.arange(params.videos) % params.classes)
    splits = [""] * params.videos
    bounds = np.cumsum(SPLIT_FRACTIONS)
    for c in range(params.classes):
        members = np.flatnonzero(labels == c)
        n = len(members)
        cuts = [int(round(b * n)) for b in bounds[:-1]] + [n]
        for rank, idx in enumerate(members):
            splits[idx] = SPLITS[next(k for k, cut in enumerate(cuts) if rank < cut)]
    return [(int(label), split) for label, split in zip(labels, splits)]


# --------------------------------------------------------------------------------------------------
# Rendering primitives
# --------------------------------------------------------------------------------------------------


def glyph_pattern(spec: GlyphSpec, face_px: int, cell_px: int, phase: tuple[int, int] = (0, 0)
                  ) -> np.ndarray:
    """The ``±1`` texture of ``spec`` on a ``face_px`` square, shifted by ``phase`` = (x, y) px.

    A class is a *texture*, not a template: every object shows it at its own random phase (drawn
    once per object), so what a low-resolution view might pick up at the face's border differs from
    object to object while a full-resolution reader sees the same texture. Returns float32
    ``[face_px, face_px]``.
    """
    ph = np.asarray(spec.phases)
    x = (np.arange(face_px) + phase[0]) // cell_px  # cell column of every pixel
    y = (np.arange(face_px) + phase[1]) // cell_px  # cell row of every pixel
    if spec.transpose:
        x, y = y, x
        cells = (y[:, None] + ph[x[None, :] % len(ph)]) % 2  # column c alternates down y
    else:
        cells = (x[None, :] + ph[y[:, None] % len(ph)]) % 2  # row r alternates along x
    return (cells * 2.0 - 1.0).astype(np.float32)


def glyph_period_px(spec: GlyphSpec, cell_px: int) -> tuple[int, int]:
    """The texture's period (x, y) in pixels; an object's phase is drawn in ``[0, period)``."""
    along, across = 2 * cell_px, len(spec.phases) * cell_px
    return (across, along) if spec.transpose else (along, across)


def edge_taper(face_px: int, taper_px: float) -> np.ndarray:
    """Weights ramping linearly from ~0 at the face border to 1 at ``taper_px`` inside.

    Inside the face the glyph averages out exactly under the box filter; a box that straddles the
    border sees only part of a period and would leak the glyph's edge cells (e.g. a dark first
    column). No finite pattern avoids this entirely; tapering the contrast towards the border
    roughly halves it (docs/synthetic_benchmark.md), and the face shading masks the rest.
    """
    if taper_px <= 0:
        return np.ones((face_px, face_px), np.float32)
    d = np.minimum(np.arange(face_px) + 0.5, face_px - np.arange(face_px) - 0.5)
    w1 = np.clip(d / taper_px, 0.0, 1.0)
    return np.minimum(w1[:, None], w1[None, :]).astype(np.float32)


def shading_basis(size_px: int, knots: int = SHADING_KNOTS) -> np.ndarray:
    """``[size_px, knots]`` linear-interpolation weights from ``knots`` control points to pixels.

    An object's shading in frame t is ``U @ G_t @ U.T`` for a random ``[knots, knots]`` grid
    ``G_t``: smooth "dappled light" with about ``size_px / (knots - 1)`` px correlation length.
    """
    pos = (np.arange(size_px) + 0.5) / size_px * (knots - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, knots - 2)
    frac = pos - i0
    u = np.zeros((size_px, knots), np.float32)
    u[np.arange(size_px), i0] = 1.0 - frac
    u[np.arange(size_px), i0 + 1] = frac
    return u


def object_shading(rng: np.random.Generator, frames: int, size_px: int) -> np.ndarray:
    """Random smooth luma shading over a whole object, ``[frames, size_px, size_px]`` float32.

    Why: a 4x-downsampled object is ~5x5 pixels, and the only class signal left there is the faint
    leak of the glyph's tapered border into the few pixels that straddle it (see edge_taper).
    Shading with about as many degrees of freedom as those pixels and several times the leak's
    amplitude, drifting smoothly over time, buries it; at full resolution it is a slow gradient
    under a crisp 2-px texture and does not hinder reading. It covers the ring too, so the pixels
    that mix ring and face cannot be explained away by a known ring colour.
    """
    width = 3  # temporal smoothing: light drifts rather than flickers
    z = rng.normal(size=(frames + width - 1, SHADING_KNOTS, SHADING_KNOTS))
    z = np.stack([z[t:t + width].mean(0) for t in range(frames)]) * math.sqrt(width)
    grid = np.clip(SHADING_STD * z, -SHADING_CLIP, SHADING_CLIP)
    u = shading_basis(size_px)
    return np.einsum("fk,tkl,gl->tfg", u, grid, u).astype(np.float32)


def render_object_sprites(
    glyph: np.ndarray,
    legible: np.ndarray,
    shading: np.ndarray,
    ring_rgb: Sequence[float],
    ring_px: int,
    face_grey: float,
    contrast: float,
    taper_px: float,
) -> np.ndarray:
    """An opaque object per frame: a coloured square ring around a grey face, both shaded.

    The face shows ``contrast * glyph`` (tapered at the border) in frames where ``legible`` is True
    and is blank otherwise; ``shading`` ``[T, D, D]`` is added everywhere in every frame, so legible
    and blank faces look alike at low resolution. The glyph and the shading change R, G and B
    equally (luma only), so the glyph survives yuv420p's half-resolution chroma and the ring keeps
    its hue; the ring is a chroma cue at least 2 px wide for the same reason. Returns uint8
    ``[T, D, D, 3]`` with ``D = face + 2 * ring_px``.
    """
    face_px = glyph.shape[0]
    d = face_px + 2 * ring_px
    if shading.shape[1:] != (d, d):
        raise ValueError(f"shading must be [T, {d}, {d}], got {shading.shape}")
    inner = slice(ring_px, ring_px + face_px)
    base = np.empty((d, d, 3), np.float32)
    base[:] = np.asarray(ring_rgb, np.float32)
    base[inner, inner, :] = face_grey
    detail = contrast * glyph * edge_taper(face_px, taper_px)
    sprites = base[None] + shading[..., None]
    sprites[:, inner, inner, :] += (legible[:, None, None].astype(np.float32) * detail[None])[..., None]
    return _to_uint8(sprites)


def _to_uint8(x: np.ndarray | np.floating) -> np.ndarray:
    return np.clip(np.asarray(x) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _periodic_noise(rng: np.random.Generator, size: int, min_period: float) -> np.ndarray:
    """Zero-mean, unit-std 1/f noise on a torus with no content finer than ``min_period`` px.

    Periodic so that scrolling (wrapping) never shows a seam; band-limited so the background adds
    low- and mid-frequency clutter but nothing at the glyph's frequency.
    """
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.hypot(fx, fy)
    amp = np.where((f > 0) & (f <= 1.0 / min_period), 1.0 / np.maximum(f, 1e-9), 0.0)
    spectrum = amp * np.exp(2j * np.pi * rng.random(amp.shape))
    noise = np.fft.irfft2(spectrum, s=(size, size))
    noise -= noise.mean()
    return (noise / (noise.std() + 1e-12)).astype(np.float32)


def render_background_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A seamless, low-chroma ``[size, size, 3]`` uint8 texture (periods from 8 px to the frame)."""
    luma = 0.45 + rng.uniform(-0.05, 0.05) + 0.12 * _periodic_noise(rng, size, 8.0)
    # Two weak opponent-colour fields: coloured, but never near the target's saturated red.
    c1 = 0.04 * _periodic_noise(rng, size, 12.0)
    c2 = 0.04 * _periodic_noise(rng, size, 12.0)
    tint = rng.uniform(-0.04, 0.04, size=3).astype(np.float32)
    u = np.array([1.0, -1.0, 0.0], np.float32) / math.sqrt(2.0)
    v = np.array([1.0, 1.0, -2.0], np.float32) / math.sqrt(6.0)
    rgb = luma[..., None] + c1[..., None] * u + c2[..., None] * v + tint
    return _to_uint8(np.clip(rgb, 0.05, 0.95))


# --------------------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------------------


def drift_trajectory(
    rng: np.random.Generator, frames: int, lo: float, hi: float, speed: tuple[float, float]
) -> np.ndarray:
    """Smooth random drift of a centre inside ``[lo, hi]^2``, reflecting at the borders.

    Returns float ``[frames, 2]`` (x, y). The heading turns a little every frame so the object
    wanders rather than moving on a ruler; the policy has to track it.
    """
    pos = rng.uniform(lo, hi, size=2)
    heading = rng.uniform(0.0, 2.0 * math.pi)
    v = rng.uniform(*speed)
    out = np.empty((frames, 2))
    for t in range(frames):
        out[t] = pos
        heading += rng.normal(0.0, 0.25)
        step = v * np.array([math.cos(heading), math.sin(heading)])
        pos = pos + step
        for k in range(2):  # reflect at the walls and turn around
            if pos[k] < lo:
                pos[k] = 2 * lo - pos[k]
                heading = math.pi - heading if k == 0 else -heading
            elif pos[k] > hi:
                pos[k] = 2 * hi - pos[k]
                heading = math.pi - heading if k == 0 else -heading
    return out


def _linear_path(rng: np.random.Generator, t: np.ndarray, lo: float, hi: float,
                 direction: tuple[int, int]) -> np.ndarray:
    """Constant-speed path along ``direction`` (each component -1, 0, +1) covering 60-100 % of the
    allowed range on the moving axes; the static axis is placed uniformly."""
    span = hi - lo
    xy = np.empty((len(t), 2))
    for k in range(2):
        if direction[k] == 0:
            xy[:, k] = rng.uniform(lo, hi)
        else:
            length = rng.uniform(0.6, 1.0) * span
            start = rng.uniform(lo, hi - length)
            xy[:, k] = start + length * t
            if direction[k] < 0:
                xy[:, k] = start + length * (1.0 - t)
    return xy


def _base_motion_path(kind: str, rng: np.random.Generator, t: np.ndarray, lo: float,
                      hi: float) -> np.ndarray:
    """The forward member of each reversal pair (``t`` runs 0 -> 1)."""
    span = hi - lo
    if kind == "horizontal":
        return _linear_path(rng, t, lo, hi, (1, 0))
    if kind == "vertical":
        return _linear_path(rng, t, lo, hi, (0, 1))
    if kind == "diag_main":
        return _linear_path(rng, t, lo, hi, (1, 1))
    if kind == "diag_anti":
        return _linear_path(rng, t, lo, hi, (-1, 1))
    if kind == "circle":
        # Image y points down, so increasing angle is clockwise on screen.
        r = rng.uniform(0.25, 0.45) * span
        cx, cy = rng.uniform(lo + r, hi - r, size=2)
        theta0 = rng.uniform(0.0, 2.0 * math.pi)
        sweep = rng.uniform(1.5, 2.0) * math.pi
        theta = theta0 + sweep * t
        return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)
    if kind == "zigzag":
        amp = rng.uniform(0.12, 0.2) * span
        xy = _linear_path(rng, t, lo, hi, (1, 0))
        xy[:, 1] = rng.uniform(lo + amp, hi - amp)
        periods = rng.uniform(1.5, 2.5)
        phase = rng.uniform(0.0, 1.0)
        tri = 2.0 * np.abs(2.0 * ((periods * t + phase) % 1.0) - 1.0) - 1.0  # triangle wave in [-1, 1]
        xy[:, 1] += amp * tri
        return xy
    raise ValueError(kind)


_MOTION_KIND = ("horizontal", "vertical", "circle", "diag_main", "diag_anti", "zigzag")


def motion_trajectory(label: int, rng: np.random.Generator, frames: int, lo: float,
                      hi: float) -> np.ndarray:
    """Centre trajectory ``[frames, 2]`` for motion class ``label`` (index into MOTION_CLASSES).

    Odd labels are the even label's path played backwards, drawn from the same distribution, so a
    class and its reverse visit exactly the same positions with the same statistics; only the order
    differs. A small smooth wobble keeps paths from being perfectly straight.
    """
    t = np.linspace(0.0, 1.0, frames)
    path = _base_motion_path(_MOTION_KIND[label // 2], rng, t, lo, hi)
    wobble = rng.uniform(0.0, 1.5, size=2)[None, :] * np.sin(
        2 * math.pi * (rng.uniform(0.5, 1.5, size=2)[None, :] * t[:, None] + rng.random(2)[None, :]))
    path = np.clip(path + wobble, lo, hi)
    return path[::-1].copy() if label % 2 else path


def legibility_mask(rng: np.random.Generator, frames: int, fraction: float) -> np.ndarray:
    """Boolean ``[frames]`` with ``max(1, round(fraction * frames))`` True entries in a few runs.

    The legible frames are the top ranks of a smoothed random signal, so they come in temporally
    coherent stretches (an object turning towards the camera and away), not as salt-and-pepper.
    """
    k = int(np.clip(round(fraction * frames), 1, frames))
    width = max(1, frames // 6)
    z = np.convolve(rng.normal(size=frames + width), np.ones(width) / width, mode="valid")[:frames]
    mask = np.zeros(frames, bool)
    mask[np.argsort(-z, kind="stable")[:k]] = True
    return mask


def sample_legible_fraction(rng: np.random.Generator) -> float:
    """Per-video difficulty: hard (10-30 % legible), medium (30-60 %) or easy (60-90 %), equally."""
    lo, hi = ((0.1, 0.3), (0.3, 0.6), (0.6, 0.9))[int(rng.integers(3))]
    return float(rng.uniform(lo, hi))


# --------------------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------------------


@dataclass
class ObjectTrack:
    """One ringed object over the whole video."""

    sprites: np.ndarray
    """uint8 ``[T, D, D, 3]``: the object as drawn in each frame (glyph or blank face, shading)."""
    top_left: np.ndarray
    """int ``[T, 2]`` (x, y) of the sprite's top-left pixel per frame."""
    legible: np.ndarray
    """bool ``[T]``: frames that show the glyph."""
    glyph: str
    phase: tuple[int, int]
    """The glyph texture's (x, y) shift in pixels (see :func:`glyph_pattern`)."""
    ring: str
    ring_px: int

    @property
    def size(self) -> int:
        return int(self.sprites.shape[1])

    @property
    def face_px(self) -> int:
        return self.size - 2 * self.ring_px


@dataclass
class Shape:
    """A flat-coloured clutter shape that drifts and wraps around the frame."""

    mask: np.ndarray
    colour: np.ndarray
    origin: np.ndarray
    velocity: np.ndarray


@dataclass
class Scene:
    """All random choices for one video; rendering a scene is deterministic."""

    size: int
    frames: int
    label: int
    background: np.ndarray
    """uint8 ``[2S, 2S, 3]``: the periodic texture tiled 2x2, so a scroll is one slice."""
    bg_offsets: np.ndarray
    """int ``[T, 2]`` (x, y) scroll offsets per frame, in ``[0, S)``."""
    shapes: list[Shape]
    distractors: list[ObjectTrack]
    target: ObjectTrack
    legible_fraction: float


def _geometry(size: int, cell_px: int, scale: float = 1.0) -> tuple[int, tuple[int, int]]:
    """Ring width and the range of face sizes (in cells) so objects are ~(0.15-0.19) * scale * size wide.

    At size 128, scale 1: a 3-px ring around a 14-18 px face (7-9 cells of 2 px), i.e. 20-24 px objects.
    """
    ring_px = max(2, round(size / 48))
    lo = max(3, math.ceil((0.15 * scale * size - 2 * ring_px) / cell_px))
    hi = max(lo, math.floor((0.19 * scale * size - 2 * ring_px) / cell_px))
    return ring_px, (lo, hi)


def _make_object(
    rng: np.random.Generator,
    params: BenchmarkParams,
    glyph_spec: GlyphSpec,
    ring_name: str,
    ring_rgb: Sequence[float],
    centres: Callable[[float, float], np.ndarray],
    legible: np.ndarray,
) -> ObjectTrack:
    """Draw an object's look (size, texture phase, grey, contrast, shading, ring tint) and place it.

    ``centres(lo, hi)`` returns the ``[T, 2]`` centre trajectory; ``[lo, hi]`` keeps the whole
    object inside the central 80 % of the frame, which an evaluation centre crop of 0.875 * size
    always keeps.
    """
    ring_px, (n_lo, n_hi) = _geometry(params.size, params.cell_px, params.object_scale)
    face_px = int(rng.integers(n_lo, n_hi + 1)) * params.cell_px
    period = glyph_period_px(glyph_spec, params.cell_px)
    phase = (int(rng.integers(period[0])), int(rng.integers(period[1])))
    glyph = glyph_pattern(glyph_spec, face_px, params.cell_px, phase)
    # Grey, contrast and shading share the [0, 1] range: 0.53 + 0.28 + 0.22 barely clips.
    face_grey = float(rng.uniform(0.47, 0.53))
    contrast = float(rng.uniform(0.18, 0.22))
    tint = np.clip(np.asarray(ring_rgb) + rng.uniform(-0.04, 0.04, size=3), 0.0, 1.0)
    shading = object_shading(rng, params.frames, face_px + 2 * ring_px)
    sprites = render_object_sprites(glyph, legible, shading, tint, ring_px, face_grey, contrast,
                                    taper_px=TAPER_CELLS * params.cell_px)
    d = sprites.shape[1]
    lo, hi = 0.1 * params.size + d / 2, 0.9 * params.size - d / 2
    top_left = np.rint(centres(lo, hi) - d / 2).astype(np.int64)
    return ObjectTrack(sprites=sprites, top_left=top_left, legible=legible, glyph=glyph_spec.name,
                       phase=phase, ring=ring_name, ring_px=ring_px)


def _make_shapes(rng: np.random.Generator, size: int) -> list[Shape]:
    """4-8 muted rectangles/ellipses of 0.05-0.3 * size drifting at up to 1.5 px/frame."""
    shapes = []
    for _ in range(int(rng.integers(4, 9))):
        h, w = (rng.uniform(0.05, 0.3, size=2) * size).astype(int) + 2
        if rng.random() < 0.5:
            mask = np.ones((h, w), bool)
        else:
            yy, xx = np.mgrid[0:h, 0:w]
            mask = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 <= 1.0
        grey = rng.uniform(0.15, 0.8)
        colour = _to_uint8(np.clip(grey + rng.uniform(-0.06, 0.06, size=3), 0, 1))
        shapes.append(Shape(mask=mask, colour=colour, origin=rng.uniform(0, size, size=2),
                            velocity=rng.uniform(-1.5, 1.5, size=2) * size / 128))
    return shapes


def build_scene(params: BenchmarkParams, index: int, label: int) -> Scene:
    """Draw every random choice of video ``index`` (class ``label``).

    Independent child seeds per component mean that, in the motion task, changing only ``label``
    changes only the target's trajectory: background, clutter, distractors and the target's look are
    bit-identical across classes (tests/test_synthetic.py checks this).
    """
    ss = np.random.SeedSequence([params.seed, params.task_id, index])
    rng_bg, rng_shapes, rng_look, rng_path, rng_distract = (np.random.default_rng(s) for s in ss.spawn(5))
    s, n_t = params.size, params.frames
    names = params.class_names

    texture = render_background_texture(rng_bg, s)
    velocity = rng_bg.uniform(-1.5, 1.5, size=2) * s / 128
    bg_offsets = np.mod(np.rint(np.arange(n_t)[:, None] * velocity[None, :]), s).astype(np.int64)

    shapes = _make_shapes(rng_shapes, s)
    speed = (0.4 * s / 128, 1.2 * s / 128)

    def drift(rng: np.random.Generator) -> Callable[[float, float], np.ndarray]:
        return lambda lo, hi: drift_trajectory(rng, n_t, lo, hi, speed)

    def moving_like(cls: int, rng: np.random.Generator) -> Callable[[float, float], np.ndarray]:
        return lambda lo, hi: motion_trajectory(cls, rng, n_t, lo, hi)

    if params.task == "appearance":
        legible = legibility_mask(rng_look, n_t, sample_legible_fraction(rng_look))
        target = _make_object(rng_look, params, APPEARANCE_CLASSES[label], "red", TARGET_RING,
                              drift(rng_path), legible)
        legible_fraction = float(legible.mean())
    else:
        # The look (glyph, size, grey, legibility, shading) is drawn without the label: the class
        # lives only in the path.
        glyph = APPEARANCE_CLASSES[int(rng_look.integers(len(APPEARANCE_CLASSES)))]
        legible = legibility_mask(rng_look, n_t, sample_legible_fraction(rng_look))
        target = _make_object(rng_look, params, glyph, "red", TARGET_RING,
                              moving_like(label, rng_path), legible)
        legible_fraction = 1.0  # the class (the motion) is visible in every frame

    distractors = []
    ring_names = list(DISTRACTOR_RINGS)
    for _ in range(int(rng_distract.integers(2, 5))):
        ring = ring_names[int(rng_distract.integers(len(ring_names)))]
        mask = legibility_mask(rng_distract, n_t, float(rng_distract.uniform(0.1, 0.9)))
        if params.task == "appearance":
            if params.distractor_glyphs == "other_classes":
                # A glyph of another class: reading the wrong object gives a confident wrong answer.
                pool = [APPEARANCE_CLASSES[c] for c in range(len(names)) if c != label]
            else:
                # A pattern of the same family that is no class here: looking there says nothing.
                pool = list(APPEARANCE_CLASSES[len(names):])
            if pool:
                spec = pool[int(rng_distract.integers(len(pool)))]
            else:  # every pattern is a class: a neutral distractor shows a blank face
                spec = APPEARANCE_CLASSES[0]
                mask = np.zeros_like(mask)
            path = drift(rng_distract)
        else:
            # Distractors move like random classes, so "something moves left" says nothing.
            spec = APPEARANCE_CLASSES[int(rng_distract.integers(len(APPEARANCE_CLASSES)))]
            path = moving_like(int(rng_distract.integers(len(names))), rng_distract)
        distractors.append(_make_object(rng_distract, params, spec, ring, DISTRACTOR_RINGS[ring],
                                        path, mask))

    return Scene(size=s, frames=n_t, label=label, background=np.tile(texture, (2, 2, 1)),
                 bg_offsets=bg_offsets, shapes=shapes, distractors=distractors, target=target,
                 legible_fraction=legible_fraction)


# --------------------------------------------------------------------------------------------------
# Frame composition
# --------------------------------------------------------------------------------------------------


def _paste(frame: np.ndarray, patch: np.ndarray, x: int, y: int, mask: np.ndarray | None = None) -> None:
    """Copy ``patch`` into ``frame`` at top-left (x, y), clipped to the frame (in place)."""
    h, w = patch.shape[:2]
    s_h, s_w = frame.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, s_w), min(y + h, s_h)
    if x0 >= x1 or y0 >= y1:
        return
    src = patch[y0 - y:y1 - y, x0 - x:x1 - x]
    if mask is None:
        frame[y0:y1, x0:x1] = src
    else:
        frame[y0:y1, x0:x1][mask[y0 - y:y1 - y, x0 - x:x1 - x]] = src[mask[y0 - y:y1 - y, x0 - x:x1 - x]]


def render_frame(scene: Scene, t: int) -> np.ndarray:
    """Frame ``t`` of ``scene`` as uint8 ``[S, S, 3]`` RGB: background, clutter, distractors, target.

    The target is drawn last, so it is never occluded; illegibility comes only from its blank face.
    """
    s = scene.size
    ox, oy = scene.bg_offsets[t]
    frame = scene.background[oy:oy + s, ox:ox + s].copy()
    for shape in scene.shapes:
        h, w = shape.mask.shape
        # Wrap around a (s + w) x (s + h) torus so shapes leave one edge and re-enter at the other.
        x = int(np.rint((shape.origin[0] + shape.velocity[0] * t) % (s + w))) - w
        y = int(np.rint((shape.origin[1] + shape.velocity[1] * t) % (s + h))) - h
        colour_patch = np.broadcast_to(shape.colour, (h, w, 3))
        _paste(frame, colour_patch, x, y, shape.mask)
    for obj in (*scene.distractors, scene.target):
        x, y = obj.top_left[t]
        _paste(frame, obj.sprites[t], int(x), int(y))
    return frame


def render_frames(scene: Scene) -> Iterator[np.ndarray]:
    """All frames of ``scene`` in order (a generator, so a video is never held in memory twice)."""
    for t in range(scene.frames):
        yield render_frame(scene, t)


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def pick_h264_encoder() -> str:
    """The H.264 encoder this PyAV build offers: ``libx264`` (expected) or another H.264 encoder."""
    import av

    for name in ("libx264", "libopenh264", "h264"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 -- PyAV raises different types across versions
            continue
    raise RuntimeError("this PyAV build has no H.264 encoder (libx264/libopenh264); "
                       "install the PyAV wheel from PyPI, which bundles libx264")


def encode_video(frames: Iterable[np.ndarray], path: str | Path, params: BenchmarkParams,
                 encoder: str | None = None) -> None:
    """Encode RGB uint8 frames to an H.264/yuv420p ``.mp4`` at ``path`` (atomically).

    One x264 thread per video: the parallelism is across videos, and single-threaded x264 without
    MB-tree, with ``+bitexact`` muxing, makes the bytes reproducible. ``+faststart`` puts the index
    first so readers on object stores (s3://) can start decoding without fetching the tail.
    """
    import av

    path = Path(path)
    encoder = encoder or pick_h264_encoder()
    tmp = path.with_name(f".{path.name}.tmp")
    # mbtree=0: with MB-tree on, the bundled libx264 gave different bytes (and pixels) for the same
    # input depending on what the process had encoded before; without it, output is reproducible.
    options = {"preset": params.preset, "crf": str(params.crf), "threads": "1",
               "x264-params": "mbtree=0"}
    if encoder == "libopenh264":  # no crf; a generous bitrate keeps fine luma detail
        options = {"b": str(40 * params.size * params.size), "threads": "1"}
    with av.open(str(tmp), "w", format="mp4",
                 options={"movflags": "+faststart", "fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=Fraction(params.fps), options=options)
        stream.width = stream.height = params.size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = params.gop
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# One video, the whole benchmark
# --------------------------------------------------------------------------------------------------


@dataclass
class VideoRecord:
    """What the manifest and the annotations need to know about one generated video."""

    index: int
    path: str
    label: int
    split: str
    legible_fraction: float
    annotation: dict[str, Any] = field(default_factory=dict)


def _track_annotation(obj: ObjectTrack) -> dict[str, Any]:
    return {
        "glyph": obj.glyph,
        "ring": obj.ring,
        "size": obj.size,
        "ring_px": obj.ring_px,
        "phase": list(obj.phase),
        "top_left": obj.top_left.tolist(),
        "legible": obj.legible.astype(int).tolist(),
    }


def make_video(params: BenchmarkParams, index: int, label: int, split: str, out_dir: str | Path,
               encoder: str | None = None) -> VideoRecord:
    """Build, render and encode video ``index`` into ``out_dir/videos``; returns its record."""
    scene = build_scene(params, index, label)
    rel = f"videos/{params.video_id(index)}.mp4"
    encode_video(render_frames(scene), Path(out_dir) / rel, params, encoder)
    annotation = {
        "path": rel,
        "label": label,
        "class": params.class_names[label],
        "target": _track_annotation(scene.target),
        "distractors": [_track_annotation(d) for d in scene.distractors],
    }
    return VideoRecord(index=index, path=rel, label=label, split=split,
                       legible_fraction=scene.legible_fraction, annotation=annotation)


def _make_video_task(task: tuple[dict[str, Any], int, int, str, str, str]) -> VideoRecord:
    """Pool entry point (top-level so it pickles by reference)."""
    params_dict, index, label, split, out_dir, encoder = task
    return make_video(BenchmarkParams(**params_dict), index, label, split, out_dir, encoder)


def write_manifest(records: Sequence[VideoRecord], out_dir: str | Path) -> Path:
    """``manifest.csv`` (``path,label,split,legible_fraction``) in index order; returns its path."""
    path = Path(out_dir) / "manifest.csv"
    tmp = path.with_name(".manifest.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["path", "label", "split", "legible_fraction"])
        for r in sorted(records, key=lambda r: r.index):
            writer.writerow([r.path, r.label, r.split, f"{r.legible_fraction:.4f}"])
    os.replace(tmp, path)
    return path


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _is_complete(out_dir: Path, params: BenchmarkParams) -> bool:
    """True if ``out_dir`` holds a finished benchmark generated with exactly ``params``."""
    meta_path = out_dir / "benchmark.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("generator_version") != GENERATOR_VERSION or meta.get("params") != params.to_dict():
        return False
    manifest = out_dir / "manifest.csv"
    if not manifest.is_file() or not (out_dir / "classes.json").is_file():
        return False
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    return len(rows) == params.videos and all((out_dir / r["path"]).is_file() for r in rows)


_OWN_VIDEO = re.compile(r"^(appearance|motion)_\d{5,}\.mp4$")


def generate_benchmark(
    out_dir: str | Path,
    videos: int = 2000,
    frames: int = 32,
    size: int = 128,
    seed: int = 0,
    task: str = "appearance",
    classes: int = 8,
    fps: int = 16,
    *,
    cell_px: int = 2,
    crf: int = 18,
    preset: str = "veryfast",
    gop: int = 16,
    object_scale: float = 1.8,
    distractor_glyphs: str = "neutral",
    workers: int | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Generate the synthetic benchmark into ``out_dir``; returns the path of ``manifest.csv``.

    Skips all work when ``out_dir/benchmark.json`` records the same parameters (and generator
    version) and every listed video exists; otherwise (or with ``force``) regenerates, first
    removing ``benchmark.json`` so an interrupted run is never mistaken for a finished one.
    ``workers`` defaults to ``os.cpu_count()``; it does not change the output.
    """
    params = BenchmarkParams(videos=videos, frames=frames, size=size, seed=seed, task=task,
                             classes=classes, fps=fps, cell_px=cell_px, crf=crf, preset=preset,
                             gop=gop, object_scale=object_scale, distractor_glyphs=distractor_glyphs)
    params.validate()
    out = Path(out_dir)
    log = log or (lambda _msg: None)
    if not force and _is_complete(out, params):
        log(f"{out}: up to date ({params.videos} {params.task} videos), nothing to do")
        return out / "manifest.csv"

    encoder = pick_h264_encoder()
    video_dir = out / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").unlink(missing_ok=True)
    for stale in video_dir.iterdir():  # only files this generator names; never user files
        if _OWN_VIDEO.match(stale.name) or stale.name.endswith(".mp4.tmp"):
            stale.unlink()

    assignments = assign_labels_and_splits(params)
    tasks = [(params.to_dict(), i, label, split, str(out), encoder)
             for i, (label, split) in enumerate(assignments)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    start = time.perf_counter()
    records: list[VideoRecord] = []
    step = max(1, len(tasks) // 10)
    if workers == 1:
        records = _collect(map(_make_video_task, tasks), len(tasks), step, start, log)
    else:
        # spawn, not fork: the caller may hold threads (Ray, torch) that a forked child would inherit
        # in a broken state. Workers only import numpy and av, so start-up costs well under a second.
        # An executor (not mp.Pool) so that a worker dying at start-up -- e.g. a caller script
        # without an ``if __name__ == "__main__":`` guard -- raises BrokenProcessPool, never hangs.
        chunk = max(1, min(16, len(tasks) // (workers * 8)))
        try:
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                records = _collect(pool.map(_make_video_task, tasks, chunksize=chunk),
                                   len(tasks), step, start, log)
        except BrokenProcessPool as exc:
            raise RuntimeError(
                "a benchmark worker process died; if you called generate_benchmark from a script, "
                "put the call under `if __name__ == \"__main__\":` (worker processes are spawned "
                "and re-import the main module), or pass workers=1") from exc
    elapsed = time.perf_counter() - start

    records.sort(key=lambda r: r.index)
    manifest = write_manifest(records, out)
    _write_json(out / "classes.json", params.class_names)
    with open(out / ".annotations.jsonl.tmp", "w") as f:
        for r in records:
            f.write(json.dumps(r.annotation, separators=(",", ":")) + "\n")
    os.replace(out / ".annotations.jsonl.tmp", out / "annotations.jsonl")

    import av

    counts = {split: sum(r.split == split for r in records) for split in SPLITS}
    _write_json(out / "benchmark.json", {
        "generator_version": GENERATOR_VERSION,
        "params": params.to_dict(),
        "classes": params.class_names,
        "encoder": encoder,
        "pix_fmt": "yuv420p",
        "pyav_version": av.__version__,
        # Flipping left/right swaps motion classes (left_to_right <-> right_to_left, cw <-> ccw);
        # the appearance glyphs are flip-invariant textures.
        "hflip_safe": params.task == "appearance",
        "split_counts": counts,
        "mean_legible_fraction": float(np.mean([r.legible_fraction for r in records])),
        "workers": workers,
        "generation_seconds": round(elapsed, 2),
    })
    log(f"{out}: wrote {len(records)} videos in {elapsed:.1f} s with {workers} worker(s) ({encoder})")
    return manifest


def _collect(results: Iterable[VideoRecord], total: int, step: int, start: float,
             log: Callable[[str], None]) -> list[VideoRecord]:
    records = []
    for n, record in enumerate(results, 1):
        records.append(record)
        if n % step == 0 or n == total:
            log(f"  {n}/{total} videos ({time.perf_counter() - start:.1f} s)")
    return records
