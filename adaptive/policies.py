"""Patch policies pi: where to look in frame t, given the glance features so far.

Every policy has the same recurrent interface so the models can swap them:

    hidden = policy.init_hidden(batch_size, device)        # [B, hidden_size] (may be [B, 0])
    centres, hidden = policy(glance_maps, hidden)           # centres [B, 2] in [0, 1], (x, y)

``centres`` are in the normalised Eq. (4) parametrisation of
:mod:`adaptive.cropping`.

* :class:`RecurrentPatchPolicy` -- the learned policy of AdaFocusV1/V2
  (appendix B.1): glance feature maps -> 1x1 conv to 64 channels -> flatten ->
  one-layer GRU (hidden size 2048 in the paper) -> Linear(2) -> sigmoid.
  The stop-gradient technique of section 3.3 (detaching pi's input so that pi
  does not back-propagate into fG) is applied by the model, which owns fG.
* :class:`FixedPatchPolicy` -- the pre-defined baselines of Table 7: random
  patches, centre patches, patches drawn from a Gaussian centred on the frame.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["RecurrentPatchPolicy", "FixedPatchPolicy", "build_policy", "POLICY_KINDS"]

POLICY_KINDS = ("learned", "random", "centre", "gaussian")


class RecurrentPatchPolicy(nn.Module):
    """pi(e^G_1, ..., e^G_t) -> (x_c, y_c), appendix B.1.

    Args:
        in_channels: channels of the glance feature maps e^G_t.
        feature_hw: their spatial size (h, w); the 1x1-conv output is flattened.
        hidden_size: GRU hidden size (2048 in the paper).
        reduced_channels: channels after the 1x1 conv (64 in the paper).
    """

    def __init__(
        self,
        in_channels: int,
        feature_hw: tuple[int, int],
        hidden_size: int = 2048,
        reduced_channels: int = 64,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, reduced_channels, 1), nn.ReLU(inplace=True))
        self.gru = nn.GRUCell(reduced_channels * feature_hw[0] * feature_hw[1], hidden_size)
        self.fc = nn.Linear(hidden_size, 2)

    def init_hidden(self, batch_size: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

    def forward(self, glance_maps: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.reduce(glance_maps).flatten(1)  # 1x1 conv to 64 channels, vectorised
        hidden = self.gru(z, hidden)  # aggregates e^G_1..e^G_t
        centres = torch.sigmoid(self.fc(hidden))  # (x~_c, y~_c), Eq. (4) normalised
        return centres, hidden


class FixedPatchPolicy(nn.Module):
    """Pre-defined patch policies (Table 7 baselines); no parameters, no state.

    kind: ``"random"`` (uniform over valid centres), ``"centre"`` (frame centre)
    or ``"gaussian"`` (centre + N(0, gaussian_std^2) in normalised units,
    clamped to the frame).  Randomness uses the global torch RNG, or
    ``generator`` if given, one ``[B, 2]`` draw per step.
    """

    def __init__(self, kind: str = "random", gaussian_std: float = 0.25,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if kind not in ("random", "centre", "gaussian"):
            raise ValueError(f"unknown fixed policy {kind!r}")
        self.kind = kind
        self.gaussian_std = gaussian_std
        self.generator = generator
        self.hidden_size = 0

    def init_hidden(self, batch_size: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(batch_size, 0, device=device, dtype=dtype)

    def forward(self, glance_maps: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = glance_maps.shape[0]
        kw = dict(device=glance_maps.device, dtype=glance_maps.dtype)
        if self.kind == "centre":
            centres = torch.full((B, 2), 0.5, **kw)
        elif self.kind == "random":
            centres = torch.rand(B, 2, generator=self.generator, **kw)
        else:
            noise = torch.randn(B, 2, generator=self.generator, **kw)
            centres = (0.5 + self.gaussian_std * noise).clamp(0.0, 1.0)
        return centres, hidden


def build_policy(kind: str, in_channels: int, feature_hw: tuple[int, int], hidden_size: int,
                 reduced_channels: int = 64, gaussian_std: float = 0.25) -> nn.Module:
    if kind == "learned":
        return RecurrentPatchPolicy(in_channels, feature_hw, hidden_size, reduced_channels)
    if kind in ("random", "centre", "gaussian"):
        return FixedPatchPolicy(kind, gaussian_std)
    raise ValueError(f"policy must be one of {POLICY_KINDS}, got {kind!r}")
