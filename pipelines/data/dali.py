"""The augmentation stage: uint8 clips from the decoder -> normalised ``[B, T, 3, H, W]`` torch tensors.

One DALI pipeline fed through ``external_source``; the same code runs GPU operators on the worker's
device when it has one and DALI's CPU mode (``device_id=None``) otherwise.

Training (AdaFocusV2 appendix A.1, following TSN/TSM): multi-scale random crop -- the crop's width
and height are each ``scales[i] * side`` with the two scale indices at most ``max_distort`` apart and
the position random -- resized to ``crop_size``, then a horizontal flip with probability 0.5 (off for
datasets whose classes depend on direction, e.g. Something-Something), then ImageNet normalisation.
All frames of a clip share one crop and one flip, so motion is preserved. The crop parameters are
drawn in Python from a seeded generator and fed next to the clips, which keeps runs reproducible.

Evaluation: resize the short side to ``resize_size`` and take the centre ``crop_size`` crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from adaptive.interface import IMAGENET_MEAN, IMAGENET_STD  # the models' normalisation, one definition


@dataclass(frozen=True)
class AugmentConfig:
    crop_size: int = 112
    """Model input side (224 in the paper; 112 for the tiny configuration)."""
    resize_size: int = 128
    """Evaluation: short side before the centre crop (256 for a 224 crop in the paper)."""
    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    """Multi-scale crop: candidate crop sides as fractions of the clip's short side (TSN)."""
    max_distort: int = 1
    """Largest allowed difference between the width and height scale indices (TSN)."""
    flip: bool = True
    """Random horizontal flip in training; turn off where direction defines the class."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def sample_crops(batch: int, height: int, width: int, config: AugmentConfig,
                 rng: np.random.Generator) -> np.ndarray:
    """Per-clip training crop windows ``[B, 5]`` float32: ``x, y, w, h`` in pixels and ``flip``."""
    side = min(height, width)
    sizes = [min(side, int(round(side * s))) for s in config.scales]
    pairs = [(i, j) for i in range(len(sizes)) for j in range(len(sizes)) if abs(i - j) <= config.max_distort]
    choice = rng.integers(0, len(pairs), size=batch)
    params = np.empty((batch, 5), dtype=np.float32)
    for b, k in enumerate(choice):
        crop_w, crop_h = sizes[pairs[k][0]], sizes[pairs[k][1]]
        params[b, 0] = rng.integers(0, width - crop_w + 1)
        params[b, 1] = rng.integers(0, height - crop_h + 1)
        params[b, 2] = crop_w
        params[b, 3] = crop_h
    params[:, 4] = rng.random(batch) < 0.5 if config.flip else 0.0
    return params


def _has_cuda() -> bool:
    return torch.cuda.is_available()


class ClipAugmenter:
    """Runs the DALI pipeline on batches of uint8 clips ``[B, T, H, W, 3]``.

    ``device_id=None`` selects DALI's CPU mode; an integer selects that GPU (the Ray Train worker's
    device). ``"auto"`` picks the current CUDA device when there is one.
    """

    def __init__(self, config: AugmentConfig, *, training: bool, max_batch_size: int,
                 device_id: int | None | str = "auto", num_threads: int = 1, seed: int = 0) -> None:
        from nvidia.dali import fn, pipeline_def, types

        if device_id == "auto":
            device_id = torch.cuda.current_device() if _has_cuda() else None
        self.config = config
        self.training = training
        self.device_id = device_id
        self.rng = np.random.default_rng(seed)
        on_gpu = device_id is not None
        mean = [255.0 * m for m in config.mean]
        std = [255.0 * s for s in config.std]

        @pipeline_def(batch_size=max_batch_size, num_threads=num_threads, device_id=device_id,
                      exec_pipelined=False, exec_async=False, prefetch_queue_depth=1, seed=seed)
        def pipeline():
            clips = fn.external_source(name="clips", layout="FHWC", dtype=types.UINT8)
            if on_gpu:
                clips = clips.gpu()
            if training:
                crop = fn.external_source(name="crop", dtype=types.FLOAT)
                # One window per clip: DALI applies a sample's arguments to every frame of the sequence.
                clips = fn.slice(clips, fn.stack(crop[0], crop[1]), fn.stack(crop[2], crop[3]),
                                 axis_names="WH", normalized_anchor=False, normalized_shape=False)
                clips = fn.resize(clips, size=[config.crop_size, config.crop_size], antialias=True)
                mirror = fn.cast(crop[4], dtype=types.INT32)
                out = fn.crop_mirror_normalize(clips, mirror=mirror, mean=mean, std=std,
                                               dtype=types.FLOAT, output_layout="FCHW")
            else:
                clips = fn.resize(clips, resize_shorter=config.resize_size, antialias=True)
                out = fn.crop_mirror_normalize(clips, crop=(config.crop_size, config.crop_size),
                                               crop_pos_x=0.5, crop_pos_y=0.5, mean=mean, std=std,
                                               dtype=types.FLOAT, output_layout="FCHW")
            return out

        self._pipe = pipeline()
        self._pipe.build()
        self._max_batch_size = max_batch_size

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_id) if self.device_id is not None else torch.device("cpu")

    def __call__(self, clips: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 ``[B, T, H, W, 3]`` -> float32 ``[B, T, 3, crop, crop]`` on :attr:`device`."""
        clips = np.ascontiguousarray(clips)
        if clips.ndim != 5 or clips.shape[-1] != 3 or clips.dtype != np.uint8:
            raise ValueError(f"expected uint8 clips [B, T, H, W, 3], got {clips.dtype} {clips.shape}")
        batch = clips.shape[0]
        if batch > self._max_batch_size:
            return torch.cat([self(clips[i:i + self._max_batch_size])
                              for i in range(0, batch, self._max_batch_size)])
        self._pipe.feed_input("clips", clips, layout="FHWC")
        if self.training:
            crops = sample_crops(batch, clips.shape[2], clips.shape[3], self.config, self.rng)
            self._pipe.feed_input("crop", crops)
        (out,) = self._pipe.run()
        return _to_torch(out, self.device)


def _to_torch(batch, device: torch.device) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = batch.as_tensor()
    result = torch.empty(tensor.shape(), dtype=torch.float32, device=device)
    if device.type == "cuda":
        feed_ndarray(tensor, result, cuda_stream=torch.cuda.current_stream(device))
    else:
        feed_ndarray(tensor, result)
    return result
