"""Classifiers fC that give a prediction after every frame.

AdaFocusV2 deploys the accumulated max-pooling module of FrameExit as fC
(section 4.1): the per-frame feature vectors z_t = cat(e^G_t, e^L_t) (after
global average pooling, footnote 1) are max-pooled over the frames seen so far
and a linear layer maps the pooled vector to class logits, so

    p_t = SoftMax(W . max(z_1, ..., z_t) + b)                         (Eq. 3)

The same module serves offline clips (``forward`` on ``[B, T, D]`` uses a
cumulative max over T) and streams (``step`` carries the running max).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["AccumulatedMaxPoolClassifier"]


class AccumulatedMaxPoolClassifier(nn.Module):
    """fC: accumulated max-pooling over time + (dropout) + linear.

    Args:
        in_features: D, the size of z_t.
        num_classes: K.
        dropout: dropout before the linear layer (training only).
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def init_pool(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Running max before any frame: -inf, the identity of max."""
        return torch.full((batch_size, self.in_features), float("-inf"), device=device, dtype=dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, T, D]`` -> logits ``[B, T, K]``, the t-th from frames 1..t."""
        pooled = torch.cummax(z, dim=1).values
        return self.fc(self.dropout(pooled))

    def step(self, z_t: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame: ``z_t [B, D]``, running max ``[B, D]`` -> (logits ``[B, K]``, new running max)."""
        pooled = torch.maximum(pooled, z_t)
        return self.fc(self.dropout(pooled)), pooled
