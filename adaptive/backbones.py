"""Frame encoders: torchvision MobileNetV2 and ResNet as feature-map extractors.

AdaFocusV2 (section 4.1) uses MobileNetV2 as the glance (global) encoder fG and
ResNet-50 as the local encoder fL.  Both come from torchvision here; the
classification heads are dropped and the modules return feature maps
``[N, C, h, w]`` together with their channel count ``out_channels``.

Pretrained weights are never downloaded: a backbone may load an ImageNet state
dict that the user already has on disk (``BackboneConfig.weights``), read with
``torch.load(path, map_location="cpu", weights_only=True)``.  The key names are
torchvision's (``features.*`` for MobileNetV2; ``conv1``/``bn1``/``layer1..4``
for ResNet), so a file saved from ``torchvision.models.resnet50().state_dict()``
loads as is; classifier keys (``classifier.*``, ``fc.*``) are ignored.  A file
saved from the extractor itself (``encoder.state_dict()``, e.g. a trained
truncated glance encoder) loads too.

Tiny configuration (trains in minutes on 2 CPU cores):

* glance ``BackboneConfig.tiny_mobilenet()``: MobileNetV2, width multiplier 0.5,
  truncated after the stride-8 stage and closed by a 1x1 conv to 128
  channels -- the tiny counterpart of MobileNetV2's final 1280-channel layer.
  On a 32x32 glance of a 112x112 frame it gives 4x4 maps (the paper's 96 px
  glance gives 3x3).  The glance is 3.5x smaller than the frame, not the
  paper's 2.3x, because the synthetic benchmark's class texture survives a
  2-2.5x downsampling (docs/synthetic_benchmark.md, "Limits"): at 48 px the
  glance alone reads the class and the patch has nothing left to add.
* local ``BackboneConfig.tiny_resnet()``: ResNet-18 at a quarter of the width
  (BasicBlocks 2-2-2-2, stage widths 16/32/64/128 instead of 64/128/256/512),
  torchvision's 7x7-stride-2 stem and max-pool, output stride 32: 11.1 MMACs
  on a 64x64 patch, 35.8 MMACs on a whole 112x112 frame.

Both knobs (``width_mult``, ``output_stride``/``layers``) are ordinary
arguments, so the paper's configuration is the same code with other numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

__all__ = [
    "BackboneConfig",
    "FeatureExtractor",
    "MobileNetV2Features",
    "ResNetFeatures",
    "build_backbone",
    "load_local_weights",
]


@dataclass
class BackboneConfig:
    """How to build one frame encoder.

    arch: ``"mobilenet_v2"`` or ``"resnet"``.
    width_mult: MobileNetV2 width multiplier (torchvision's ``width_mult``).
    output_stride: MobileNetV2 only -- truncate the network after the stage with
        this total stride (8, 16 or 32).
    out_channels: MobileNetV2 only -- channels of the closing 1x1 conv; ``None``
        keeps torchvision's (1280 at output stride 32; none when truncated).
    layers, block, base_width: ResNet only -- blocks per stage, ``"basic"`` or
        ``"bottleneck"``, and the width of the first stage (64 in torchvision;
        stages are base_width x 1, 2, 4, 8).
    weights: optional path of a local state dict (torchvision key names).
    """

    arch: str = "mobilenet_v2"
    width_mult: float = 1.0
    output_stride: int = 32
    out_channels: int | None = None
    layers: tuple[int, ...] = (3, 4, 6, 3)
    block: str = "bottleneck"
    base_width: int = 64
    weights: str | None = None

    # ---- presets -------------------------------------------------------------
    @classmethod
    def mobilenet_v2(cls, weights: str | None = None) -> "BackboneConfig":
        """torchvision MobileNetV2 (1.0), 1280-channel output (the paper's fG)."""
        return cls(arch="mobilenet_v2", width_mult=1.0, output_stride=32, weights=weights)

    @classmethod
    def resnet(cls, depth: int = 50, weights: str | None = None) -> "BackboneConfig":
        """torchvision ResNet-18/34/50 (the paper's fL is ResNet-50)."""
        table = {
            18: ((2, 2, 2, 2), "basic"),
            34: ((3, 4, 6, 3), "basic"),
            50: ((3, 4, 6, 3), "bottleneck"),
        }
        if depth not in table:
            raise ValueError(f"ResNet depth must be one of {sorted(table)}, got {depth}")
        layers, block = table[depth]
        return cls(arch="resnet", layers=layers, block=block, base_width=64, weights=weights)

    @classmethod
    def tiny_mobilenet(cls) -> "BackboneConfig":
        return cls(arch="mobilenet_v2", width_mult=0.5, output_stride=8, out_channels=128)

    @classmethod
    def tiny_resnet(cls) -> "BackboneConfig":
        return cls(arch="resnet", layers=(2, 2, 2, 2), block="basic", base_width=16)


class FeatureExtractor(nn.Module):
    """Base class: ``forward(images [N,3,H,W]) -> feature maps [N, out_channels, h, w]``."""

    out_channels: int
    output_stride: int

    def feature_hw(self, input_hw: int | Sequence[int]) -> tuple[int, int]:
        """Spatial size of the feature maps for an input of ``input_hw`` pixels (measured)."""
        if isinstance(input_hw, int):
            input_hw = (input_hw, input_hw)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                p = next(self.parameters())
                y = self(torch.zeros(1, 3, *input_hw, dtype=p.dtype, device=p.device))
        finally:
            self.train(was_training)
        return int(y.shape[-2]), int(y.shape[-1])

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps after each stage, finest first; the last is ``forward(x)``. Encoders
        without stages return that one map."""
        return [self(x)]


def load_local_weights(module: nn.Module, path: str, ignore_prefixes: Sequence[str] = ()) -> list[str]:
    """Load a local state dict (``weights_only=True``) into ``module``.

    Keys that start with one of ``ignore_prefixes`` (e.g. the classifier) are
    dropped; every remaining parameter/buffer of ``module`` must be present and
    of the right shape.  Returns the list of dropped keys.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    dropped = [k for k in state if any(k.startswith(p) for p in ignore_prefixes)]
    for k in dropped:
        del state[k]
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not any(k.startswith(p) for p in ignore_prefixes)]
    if missing or unexpected:
        raise RuntimeError(
            f"weights file {path!r} does not match the backbone: "
            f"missing={list(missing)[:8]} unexpected={list(unexpected)[:8]}"
        )
    return dropped


def _is_own_state_dict(module: nn.Module, path: str) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)
    own = module.state_dict()
    return set(own) == set(state) and all(own[k].shape == state[k].shape for k in own)


# torchvision MobileNetV2 `features` index after which the total stride is 8/16/32.
_MBV2_CUT = {8: 7, 16: 14, 32: 19}


class MobileNetV2Features(FeatureExtractor):
    """torchvision MobileNetV2 ``features``, optionally truncated and re-closed.

    Weights are loaded into the full torchvision network *before* truncation, so
    a torchvision state dict always matches.
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        output_stride: int = 32,
        out_channels: int | None = None,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if output_stride not in _MBV2_CUT:
            raise ValueError(f"output_stride must be one of {sorted(_MBV2_CUT)}, got {output_stride}")
        full = tv_mobilenet_v2(weights=None, width_mult=width_mult)
        layers = list(full.features.children())[: _MBV2_CUT[output_stride]]
        channels = _last_channels(layers)
        if out_channels is not None and out_channels != channels:
            # A closing 1x1 conv-BN-ReLU6, like MobileNetV2's last layer.
            layers.append(
                nn.Sequential(
                    nn.Conv2d(channels, out_channels, 1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU6(inplace=True),
                )
            )
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.out_channels = channels
        self.output_stride = output_stride
        if weights is not None:
            if _is_own_state_dict(self, weights):
                # a file saved from this very extractor (e.g. a trained glance encoder)
                load_local_weights(self, weights)
            else:
                # a torchvision MobileNetV2 state dict: load into the full network, whose
                # modules ``self.features`` shares, before the truncated tail is dropped
                load_local_weights(full, weights, ignore_prefixes=("classifier.",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _last_channels(layers: list[nn.Module]) -> int:
    for layer in reversed(layers):
        if hasattr(layer, "out_channels"):
            return int(layer.out_channels)
        convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
        if convs:
            return int(convs[-1].out_channels)
    raise ValueError("no convolution found")


class ResNetFeatures(FeatureExtractor):
    """torchvision-style ResNet body (stem + 4 stages), no pooling/fc.

    Module names follow torchvision (``conv1``, ``bn1``, ``layer1``..``layer4``)
    so its state dicts load when ``base_width == 64``.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        block: str = "bottleneck",
        base_width: int = 64,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        for i, n in enumerate(layers):
            stages.append(self._make_layer(block_cls, base_width * 2**i, n, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = base_width * 8 * block_cls.expansion
        self.output_stride = 32
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if weights is not None:
            load_local_weights(self, weights, ignore_prefixes=("fc.",))

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage_outputs(x)[-1]

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of ``layer1`` .. ``layer4`` (output strides 4, 8, 16, 32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            outputs.append(x)
        return outputs


def build_backbone(cfg: BackboneConfig) -> FeatureExtractor:
    """Build the encoder described by ``cfg``."""
    if cfg.arch == "mobilenet_v2":
        return MobileNetV2Features(cfg.width_mult, cfg.output_stride, cfg.out_channels, cfg.weights)
    if cfg.arch == "resnet":
        return ResNetFeatures(cfg.layers, cfg.block, cfg.base_width, cfg.weights)
    raise ValueError(f"unknown backbone arch {cfg.arch!r} (expected 'mobilenet_v2' or 'resnet')")

