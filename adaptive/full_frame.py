"""The non-adaptive reference: the same encoders on whole frames (the paper's TSM+ idea).

Per frame, fG sees the downsampled frame (as in AdaFocusV2), fL sees the
*whole* full-resolution frame instead of a patch, and the same accumulated
max-pooling classifier fC gives p_t after every frame:

    p_t = fC(cat(fG(down(v_1)), fL(v_1)), ..., cat(fG(down(v_t)), fL(v_t)))

It differs from AdaFocusV2 only in having no policy and no crop, so the ratio
of their costs is what the policy (and, for AdaFocusV2+, the early exit) earns.
Trained with the frame-wise cross-entropy plus, optionally, the same auxiliary
heads as Eq. (10).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import BackboneConfig, build_backbone
from .cropping import centres_on
from .flops import count_macs
from .heads import AccumulatedMaxPoolClassifier
from .interface import AdaptiveVideoModel, ClipOutput, State, StepOutput, register_model

__all__ = ["FullFrameConfig", "FullFrameModel"]


@dataclass
class FullFrameConfig:
    """Hyper-parameters of the full-frame reference (fields as in :class:`AdaFocusV2Config`)."""

    num_classes: int = 8
    input_size: int = 112
    glance_size: int = 32
    glance: BackboneConfig = field(default_factory=BackboneConfig.tiny_mobilenet)
    local: BackboneConfig = field(default_factory=BackboneConfig.tiny_resnet)
    use_glance: bool = True
    classifier_dropout: float = 0.0
    auxiliary_supervision: bool = True
    lr_glance: float = 0.001
    lr_local: float = 0.002
    lr_classifier: float = 0.01
    weight_decay: float = 1e-4

    @classmethod
    def tiny(cls, **overrides) -> "FullFrameConfig":
        base = dict(lr_glance=2e-3, lr_local=2e-3, lr_classifier=2e-3)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def paper(cls, num_classes: int = 200, **overrides) -> "FullFrameConfig":
        base = dict(num_classes=num_classes, input_size=224, glance_size=96,
                    glance=BackboneConfig.mobilenet_v2(), local=BackboneConfig.resnet(50),
                    classifier_dropout=0.5)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def matching(cls, adafocus_config, **overrides) -> "FullFrameConfig":
        """The reference with the same encoders, sizes and learning rates as an AdaFocusV2 config.
        It keeps fG even where AdaFocusV2's fC reads e^L only: AdaFocusV2 runs fG anyway (for pi),
        and the reference's fG is where AdaFocusV2's starts (``model.init_from_full_frame``)."""
        c = adafocus_config
        base = dict(num_classes=c.num_classes, input_size=c.input_size, glance_size=c.glance_size,
                    glance=c.glance, local=c.local, use_glance=True,
                    classifier_dropout=c.classifier_dropout,
                    auxiliary_supervision=c.auxiliary_supervision, lr_glance=c.lr_glance,
                    lr_local=c.lr_local, lr_classifier=c.lr_classifier, weight_decay=c.weight_decay)
        base.update(overrides)
        return cls(**base)


@register_model("full_frame", FullFrameConfig)
class FullFrameModel(AdaptiveVideoModel):
    """fG on the glance + fL on the whole frame + accumulated max-pooling fC."""

    def __init__(self, config: FullFrameConfig | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else FullFrameConfig()
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.input_size = cfg.input_size
        self.glance_encoder = build_backbone(cfg.glance) if cfg.use_glance else None
        self.local_encoder = build_backbone(cfg.local)
        c_g = self.glance_encoder.out_channels if cfg.use_glance else 0
        c_l = self.local_encoder.out_channels
        self.classifier = AccumulatedMaxPoolClassifier(c_g + c_l, cfg.num_classes, cfg.classifier_dropout)
        if cfg.auxiliary_supervision:
            self.local_head = nn.Linear(c_l, cfg.num_classes)
            if cfg.use_glance:
                self.glance_head = nn.Linear(c_g, cfg.num_classes)

    def features(self, frames: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``frames [N,3,H,W]`` -> (e^G ``[N,Cg]`` or None, e^L ``[N,Cl]``)."""
        e_g = None
        if self.glance_encoder is not None:
            s = self.config.glance_size
            small = frames if frames.shape[-1] == s else F.interpolate(
                frames, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            e_g = self.glance_encoder(small).mean(dim=(2, 3))
        e_l = self.local_encoder(frames).mean(dim=(2, 3))
        return e_g, e_l

    @torch.no_grad()
    def focus_centres(self, frames: torch.Tensor, patch_fraction: float) -> torch.Tensor:
        """Where this model looks: the peak of fL's activation-based attention map (Zagoruyko &
        Komodakis 2017: the sum over channels of the squared activations) on its stride-16 feature
        map (the last map if fL has no finer stage), as the centre parameters ``[N, 2]`` in [0, 1]
        of a patch of ``patch_fraction`` of the side (the inverse of AdaFocusV2's Eq. 4).
        ``frames [N,3,H,W]``. Used to teach AdaFocusV2's policy where to look.

        Why this map: on the synthetic benchmark a patch centred on its peak holds the whole
        target in 92 % of test frames with a 7-epoch reference and 52 % with a 3-epoch one, against
        62 % and 30 % for the peak of the predicted class's activation map (CAM) on the last,
        stride-32 map, and 24 % for random patches (adaptive/README.md). It needs no class: the
        target draws fL's strongest activations whether or not its glyph is legible in the frame."""
        stages = self.local_encoder.stage_outputs(frames)
        maps = stages[-2] if len(stages) > 1 else stages[-1]  # ResNet: layer3, stride 16
        attention = maps.float().pow(2).sum(dim=1)  # [N, h, w]
        h, w = attention.shape[-2:]
        peak = attention.flatten(1).argmax(dim=1)
        middle = torch.stack((((peak % w).to(frames.dtype) + 0.5) / w, ((peak // w).to(frames.dtype) + 0.5) / h), 1)
        return centres_on(middle, patch_fraction)

    def _fuse(self, e_g, e_l):
        return e_l if e_g is None else torch.cat((e_g, e_l), dim=-1)

    def forward(self, clip: torch.Tensor) -> ClipOutput:
        B, T = clip.shape[:2]
        e_g, e_l = self.features(clip.flatten(0, 1))
        z = self._fuse(e_g, e_l).view(B, T, -1)
        logits = self.classifier(z)
        flops = self.flops_per_step(T).to(device=clip.device).expand(B, T)
        return ClipOutput(logits=logits, flops=flops, extra={})

    def loss(self, clip: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        B, T = clip.shape[:2]
        y = labels.repeat_interleave(T)
        e_g, e_l = self.features(clip.flatten(0, 1))
        logits = self.classifier(self._fuse(e_g, e_l).view(B, T, -1))
        terms = {"ce_fc": F.cross_entropy(logits.flatten(0, 1), y)}
        if self.config.auxiliary_supervision:
            terms["ce_local"] = F.cross_entropy(self.local_head(e_l), y)
            if e_g is not None:
                terms["ce_glance"] = F.cross_entropy(self.glance_head(e_g), y)
        loss = sum(terms.values())
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs["loss"] = float(loss.detach())
        logs["acc"] = float((logits[:, -1].argmax(-1) == labels).float().mean())
        return loss, logs

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        dtype = next(self.parameters()).dtype
        return {
            "pooled": self.classifier.init_pool(batch_size, device, dtype),
            "t": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def step(self, frames: torch.Tensor, state: State) -> StepOutput:
        e_g, e_l = self.features(frames)
        logits, pooled = self.classifier.step(self._fuse(e_g, e_l), state["pooled"])
        flops = torch.full((frames.shape[0],), float(self.step_macs()), dtype=torch.float64, device=frames.device)
        return StepOutput(logits, {"pooled": pooled, "t": state["t"] + 1}, flops, {})

    def measure_component_macs(self) -> dict[str, int]:
        cfg = self.config
        p = next(self.parameters())
        kw = dict(device=p.device, dtype=p.dtype)
        macs = {}
        if self.glance_encoder is not None:
            macs["glance"] = count_macs(self.glance_encoder, torch.zeros(1, 3, cfg.glance_size, cfg.glance_size, **kw))
        macs["local"] = count_macs(self.local_encoder, torch.zeros(1, 3, cfg.input_size, cfg.input_size, **kw))
        macs["classifier"] = count_macs(self.classifier.fc, torch.zeros(1, self.classifier.in_features, **kw))
        return macs

    def flops_notes(self) -> dict[str, str]:
        return {"local": f"fL on the whole {self.config.input_size}x{self.config.input_size} frame"}

    def param_groups(self) -> list[dict]:
        cfg = self.config
        heads = [m for m in (getattr(self, "glance_head", None), getattr(self, "local_head", None)) if m is not None]
        groups = [
            ("glance", [self.glance_encoder] if self.glance_encoder is not None else [], cfg.lr_glance),
            ("local", [self.local_encoder], cfg.lr_local),
            ("classifier", [self.classifier] + heads, cfg.lr_classifier),
        ]
        return [{"name": n, "params": [p for m in ms for p in m.parameters()], "lr": lr}
                for n, ms, lr in groups if ms]
