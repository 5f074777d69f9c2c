"""Small datasets as tensors in memory, decoded by the same code path as the streaming pipeline.

For benchmarks and unit-scale experiments that want the real generated videos without Ray: every
clip goes through :func:`pipelines.data.dataset.decode_rows` (hence ``decode_clip``), exactly as in
a Ray Data task.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipelines.data.dataset import decode_manifest_locally
from pipelines.data.decode import DecodeConfig
from pipelines.data.manifest import load_manifest


def load_clips(manifest_path: str | Path, split: str | None, num_frames: int, size: int, *,
               training: bool = False, coarse_to_fine: bool = False, workers: int | None = None,
               format: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one split into ``(uint8 [N, T, size, size, 3], int64 labels [N])``.

    Skipped videos are left out (the data doctor names them). ``split=None`` takes every row.
    """
    manifest = load_manifest(manifest_path, format)
    if split is not None:
        manifest = manifest.split(split)
    config = DecodeConfig(num_frames=num_frames, size=size, training=training, coarse_to_fine=coarse_to_fine)
    clips, labels = [], []
    for batch in decode_manifest_locally(manifest, config, keep_skipped=False,
                                         workers=workers or min(4, os.cpu_count() or 1)):
        clips.append(batch["clip"])
        labels.append(batch["label"])
    if not clips:
        raise ValueError(f"{manifest_path}: no usable video in split {split!r}")
    return torch.from_numpy(np.concatenate(clips)), torch.from_numpy(np.concatenate(labels))
