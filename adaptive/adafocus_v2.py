"""AdaFocusV2: end-to-end adaptive focus for efficient video recognition (section 3).

Per frame v_t (Fig. 2):

    e^G_t = fG(downsample(v_t))                                         (Eq. 1)
    (x_c, y_c) = pi(e^G_1, ..., e^G_t)          patch centre, in [0,1]  (Eq. 4)
    v~_t = bilinear P x P patch of v_t at (x_c, y_c)                    (Eq. 5-6)
    e^L_t = fL(v~_t)                                                    (Eq. 2)
    p_t = fC(cat(e^G_1, e^L_1), ..., cat(e^G_t, e^L_t))                 (Eq. 3)

fG is a light MobileNetV2 on the downsampled frame, fL a ResNet on a patch of
the full-resolution frame, pi a GRU (:mod:`adaptive.policies`), fC the
accumulated max-pooling classifier (:mod:`adaptive.heads`).  Gradients reach pi
through the interpolation (Eq. 7-8), so everything trains in one stage with
the objective of section 3.3:

    L' = 1/T sum_t [ CE(p_t) + CE(FC_G(e^G_t)) + CE(FC_L(e^L_t)) ]     (Eq. 10)
    minimise 1/2 (L' + L'_random)                                        (Eq. 11)

Each training technique is a config switch, for the ablation of Table 6:
``auxiliary_supervision`` (the FC_G / FC_L terms of Eq. 10),
``diversity_augmentation`` (the second pass on random patches, Eq. 11) and
``stop_gradient`` (pi's input is detached, so pi never back-propagates into fG).
With all three off the objective is the naive Eq. (9).

AdaFocusV2+ (section 3.4) is this model plus the confidence-based early exit
of :mod:`adaptive.early_exit`; it needs no extra training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import BackboneConfig, build_backbone
from .cropping import centres_to_boxes, interpolate_crop
from .flops import count_macs, eval_mode
from .heads import AccumulatedMaxPoolClassifier
from .interface import AdaptiveVideoModel, ClipOutput, State, StepOutput, register_model
from .policies import POLICY_KINDS, build_policy

__all__ = ["AdaFocusV2Config", "AdaFocusV2"]


@dataclass
class AdaFocusV2Config:
    """Hyper-parameters of AdaFocusV2.  The defaults are the tiny preset.

    input_size: H = W of the (full-resolution) input frames (224 in the paper).
    glance_size: side of the downsampled frame seen by fG (96 for MN2 in the paper).
    patch_size: P, side of the patch cropped from the full-resolution frame and
        fed to fL (96/128/160 on 224 in the paper).
    glance, local: the encoders fG and fL.
    policy: ``"learned"`` (pi) or a Table 7 baseline: ``"random"``, ``"centre"``, ``"gaussian"``.
    policy_hidden_size: GRU hidden size of pi (2048 in the paper).
    policy_channels: channels after pi's 1x1 conv (64 in the paper).
    gaussian_std: std of the Gaussian baseline policy, normalised units.
    reuse_global_feature: fC sees cat(e^G_t, e^L_t) (the paper's default);
        False: e^L_t only (the setting of Table 7).
    auxiliary_supervision, diversity_augmentation, stop_gradient: section 3.3.
    lr_glance, lr_local, lr_classifier, lr_policy: per-component initial
        learning rates (appendix B.2: 0.001, 0.002, 0.01, 2e-4 with pretrained
        encoders, SGD momentum 0.9, cosine, weight decay 1e-4).
    """

    num_classes: int = 8
    input_size: int = 112
    glance_size: int = 32
    patch_size: int = 48
    glance: BackboneConfig = field(default_factory=BackboneConfig.tiny_mobilenet)
    local: BackboneConfig = field(default_factory=BackboneConfig.tiny_resnet)
    policy: str = "learned"
    policy_hidden_size: int = 256
    policy_channels: int = 64
    gaussian_std: float = 0.25
    reuse_global_feature: bool = True
    classifier_dropout: float = 0.0
    auxiliary_supervision: bool = True
    diversity_augmentation: bool = True
    stop_gradient: bool = True
    lr_glance: float = 0.001
    lr_local: float = 0.002
    lr_classifier: float = 0.01
    lr_policy: float = 2e-4
    weight_decay: float = 1e-4
    policy_teacher_weight: float = 10.0
    """Our extension, not in the paper; active only after ``set_policy_teacher``: the weight of the
    pull of pi's centres toward the teacher's (mean squared error)."""

    @classmethod
    def tiny(cls, **overrides) -> "AdaFocusV2Config":
        """112x112 frames, 48x48 patches (0.43 of the side, the paper's 96/224: on the synthetic
        benchmark, whose objects span ~0.3 of the side, a 0.57 patch so often catches the target by
        chance that random patches came within 2-10 points of the learned policy; README),
        32x32 glance (3.5x downsampling: see BackboneConfig.tiny_mobilenet), MobileNetV2-0.5 truncated at stride 8
        + ResNet-18 at quarter width, GRU 256.  Trains from
        scratch in minutes on 2 CPU cores; learning rates for AdamW from scratch
        (pi at a quarter of the encoders' rate, cf. the paper's 2e-4 vs 1e-3..1e-2).

        fC reads e^L only (``reuse_global_feature=False``, Table 7's setting): a 32 px glance
        cannot read the synthetic benchmark's classes (by construction), and feeding it to fC
        cost accuracy there -- 75.0 % against 93.8 % after 4 epochs, both with the policy
        teacher (adaptive/README.md). fG still runs, for pi."""
        base = dict(lr_glance=2e-3, lr_local=2e-3, lr_classifier=2e-3, lr_policy=5e-4, weight_decay=1e-4,
                    reuse_global_feature=False)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def paper(cls, num_classes: int = 200, patch_size: int = 128,
              glance_weights: str | None = None, local_weights: str | None = None,
              **overrides) -> "AdaFocusV2Config":
        """AdaFocusV2-MN2/RN (section 4.1): 224x224 frames, MobileNetV2 on 96x96,
        ResNet-50 on P x P patches (P = 96/128/160), GRU 2048, 200 classes (ActivityNet)."""
        base = dict(
            num_classes=num_classes,
            input_size=224,
            glance_size=96,
            patch_size=patch_size,
            glance=BackboneConfig.mobilenet_v2(glance_weights),
            local=BackboneConfig.resnet(50, local_weights),
            policy_hidden_size=2048,
            classifier_dropout=0.5,
        )
        base.update(overrides)
        return cls(**base)

    @property
    def patch_fraction(self) -> float:
        return self.patch_size / self.input_size


@register_model("adafocus_v2", AdaFocusV2Config)
class AdaFocusV2(AdaptiveVideoModel):
    """AdaFocusV2 (see module docstring).  ``forward``/``loss``/``step`` follow :mod:`adaptive.interface`."""

    def __init__(self, config: AdaFocusV2Config | None = None) -> None:
        super().__init__()
        cfg = config if config is not None else AdaFocusV2Config()
        if cfg.policy not in POLICY_KINDS:
            raise ValueError(f"policy must be one of {POLICY_KINDS}, got {cfg.policy!r}")
        if not 0 < cfg.patch_size < cfg.input_size:
            raise ValueError("patch_size must be smaller than input_size (Eq. 4: P < H, W)")
        self.config = cfg
        self.num_classes = cfg.num_classes
        self.input_size = cfg.input_size

        self.glance_encoder = build_backbone(cfg.glance)  # fG
        self.local_encoder = build_backbone(cfg.local)  # fL
        c_g, c_l = self.glance_encoder.out_channels, self.local_encoder.out_channels
        self.policy = build_policy(  # pi
            cfg.policy, c_g, self.glance_encoder.feature_hw(cfg.glance_size),
            cfg.policy_hidden_size, cfg.policy_channels, cfg.gaussian_std,
        )
        fused = (c_g if cfg.reuse_global_feature else 0) + c_l
        self.classifier = AccumulatedMaxPoolClassifier(fused, cfg.num_classes, cfg.classifier_dropout)  # fC
        if cfg.auxiliary_supervision:  # FC_G and FC_L of Eq. (10); used for training only
            self.glance_head = nn.Linear(c_g, cfg.num_classes)
            self.local_head = nn.Linear(c_l, cfg.num_classes)
        self._policy_teacher = None

    def set_policy_teacher(self, teacher: nn.Module | None) -> None:
        """Our extension, not in the paper: teach pi where to look with a trained model that can say
        where it sees the class, ``teacher.focus_centres(frames, patch_fraction) -> [N, 2]`` (e.g.
        the peak of the full-frame reference's attention map, :meth:`FullFrameModel.focus_centres`).

        While training with a teacher, the main pass crops at the teacher's centres (teacher
        forcing: fL learns from patches that show the class) and pi regresses onto them with weight
        ``policy_teacher_weight``; the diversity pass stays on random patches. Why: on the synthetic
        benchmark the gradient through the crop (Eq. 7-8) barely points at the object (adaptive/
        README.md). Inference never uses the teacher. It is not a submodule: not saved, not trained."""
        self.__dict__["_policy_teacher"] = teacher

    # ------------------------------------------------------------------ pieces
    def glance(self, frames: torch.Tensor) -> torch.Tensor:
        """Eq. (1): ``frames [N,3,H,W]`` -> glance feature maps e^G ``[N, Cg, h, w]``."""
        s = self.config.glance_size
        if frames.shape[-1] != s or frames.shape[-2] != s:
            frames = F.interpolate(frames, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return self.glance_encoder(frames)

    def local(self, frames: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """Eq. (2), (5)-(6): crop the P x P patch at ``centres [N,2]`` and encode it -> e^L ``[N, Cl]``."""
        patches = interpolate_crop(frames, centres, self.config.patch_size)
        return self.local_encoder(patches).mean(dim=(2, 3))  # global average pooling (footnote 1)

    def fuse(self, e_g: torch.Tensor, e_l: torch.Tensor) -> torch.Tensor:
        """z_t = cat(e^G_t, e^L_t), the input of fC (e^L_t alone without feature reuse)."""
        return torch.cat((e_g, e_l), dim=-1) if self.config.reuse_global_feature else e_l

    def policy_input(self, glance_maps: torch.Tensor) -> torch.Tensor:
        """Stop-gradient (section 3.3): pi learns from the classification loss only through the crop."""
        return glance_maps.detach() if self.config.stop_gradient else glance_maps

    def rollout_policy(self, glance_maps: torch.Tensor) -> torch.Tensor:
        """Run pi over the frames: ``[B, T, Cg, h, w]`` -> centres ``[B, T, 2]``."""
        B, T = glance_maps.shape[:2]
        hidden = self.policy.init_hidden(B, glance_maps.device, glance_maps.dtype)
        centres = []
        for t in range(T):
            c, hidden = self.policy(glance_maps[:, t], hidden)
            centres.append(c)
        return torch.stack(centres, dim=1)

    # ------------------------------------------------------------------ clip API
    def encode(self, clip: torch.Tensor, patch_centres: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """All per-frame quantities of a clip ``[B,T,3,H,W]``: e^G, e^L, centres (pi's), frames.
        ``patch_centres [B,T,2]``: crop there instead of at pi's centres (teacher forcing)."""
        B, T = clip.shape[:2]
        frames = clip.flatten(0, 1)  # [B*T, 3, H, W]
        maps = self.glance(frames)  # Eq. (1), all frames in one batch
        e_g = maps.mean(dim=(2, 3)).view(B, T, -1)
        centres = self.rollout_policy(self.policy_input(maps).view(B, T, *maps.shape[1:]))  # Eq. (4)
        crop_at = centres if patch_centres is None else patch_centres
        e_l = self.local(frames, crop_at.flatten(0, 1)).view(B, T, -1)  # Eq. (2), (5)-(6)
        return {"frames": frames, "e_g": e_g, "e_l": e_l, "centres": centres}

    def forward(self, clip: torch.Tensor) -> ClipOutput:
        B, T = clip.shape[:2]
        enc = self.encode(clip)
        logits = self.classifier(self.fuse(enc["e_g"], enc["e_l"]))  # Eq. (3): p_t for every t
        flops = self.flops_per_step(T).to(device=clip.device, dtype=torch.float64).expand(B, T)
        centres = enc["centres"]
        extra = {"centres": centres, "boxes": centres_to_boxes(centres, self.config.patch_fraction)}
        return ClipOutput(logits=logits, flops=flops, extra=extra)

    def _objective(self, e_g: torch.Tensor, e_l: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eq. (10) (Eq. (9) without auxiliary supervision); all terms averaged over the T frames."""
        B, T = e_g.shape[:2]
        y = labels.repeat_interleave(T)  # frame-wise targets
        logits = self.classifier(self.fuse(e_g, e_l))
        terms = {"ce_fc": F.cross_entropy(logits.flatten(0, 1), y)}
        if self.config.auxiliary_supervision:
            terms["ce_glance"] = F.cross_entropy(self.glance_head(e_g).flatten(0, 1), y)
            terms["ce_local"] = F.cross_entropy(self.local_head(e_l).flatten(0, 1), y)
        terms["total"] = sum(terms.values())
        terms["logits"] = logits
        return terms

    def loss(self, clip: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Training objective: Eq. (11) = 1/2 (L' + L'_random), or L' alone without diversity augmentation;
        with a policy teacher (:meth:`set_policy_teacher`) L' is taken on the teacher's patches and pi's
        pull toward them is added."""
        focus = None
        if self._policy_teacher is not None and self.training:
            B, T = clip.shape[:2]
            with torch.no_grad():
                focus = self._policy_teacher.focus_centres(clip.flatten(0, 1), self.config.patch_fraction)
            focus = focus.to(clip.dtype).view(B, T, 2)
        enc = self.encode(clip, patch_centres=focus)
        main = self._objective(enc["e_g"], enc["e_l"], labels)  # L'
        logs = {k: float(v.detach()) for k, v in main.items() if k not in ("total", "logits")}
        loss = main["total"]
        if self.config.diversity_augmentation:
            # Second pass of fL and fC on random patches (fG's features are reused).
            rand = torch.rand_like(enc["centres"])
            e_l_rand = self.local(enc["frames"], rand.flatten(0, 1)).view_as(enc["e_l"])
            random_pass = self._objective(enc["e_g"], e_l_rand, labels)  # L'_random
            loss = 0.5 * (loss + random_pass["total"])
            logs["ce_fc_random"] = float(random_pass["ce_fc"].detach())
        if focus is not None:
            pull = F.mse_loss(enc["centres"], focus)
            loss = loss + self.config.policy_teacher_weight * pull
            logs["policy_pull"] = float(pull.detach())
        with torch.no_grad():
            pred = main["logits"][:, -1].argmax(-1)
            logs["acc"] = float((pred == labels).float().mean())
            logs["centre_std"] = float(enc["centres"].std()) if enc["centres"].numel() > 1 else 0.0
        logs["loss"] = float(loss.detach())
        return loss, logs

    # ------------------------------------------------------------------ streaming API
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        dtype = next(self.parameters()).dtype
        return {
            "hidden": self.policy.init_hidden(batch_size, device, dtype),  # GRU state of pi
            "pooled": self.classifier.init_pool(batch_size, device, dtype),  # running max of z_t
            "t": torch.zeros(batch_size, dtype=torch.long, device=device),  # frames seen
        }

    def step(self, frames: torch.Tensor, state: State) -> StepOutput:
        """One frame per stream: ``frames [B,3,H,W]``; returns p_t's logits, the new state,
        the MACs spent and ``extra`` = {``centres [B,2]``, ``boxes [B,4]``}."""
        maps = self.glance(frames)  # Eq. (1)
        e_g = maps.mean(dim=(2, 3))
        centres, hidden = self.policy(self.policy_input(maps), state["hidden"])  # Eq. (4)
        e_l = self.local(frames, centres)  # Eq. (2), (5)-(6)
        logits, pooled = self.classifier.step(self.fuse(e_g, e_l), state["pooled"])  # Eq. (3)
        B = frames.shape[0]
        flops = torch.full((B,), float(self.step_macs()), dtype=torch.float64, device=frames.device)
        new_state = {"hidden": hidden, "pooled": pooled, "t": state["t"] + 1}
        extra = {"centres": centres, "boxes": centres_to_boxes(centres, self.config.patch_fraction)}
        return StepOutput(logits, new_state, flops, extra)

    # ------------------------------------------------------------------ accounting
    def measure_component_macs(self) -> dict[str, int]:
        """MACs of each component for one frame, measured with FlopCounterMode."""
        cfg = self.config
        p = next(self.parameters())
        kw = dict(device=p.device, dtype=p.dtype)
        glance_in = torch.zeros(1, 3, cfg.glance_size, cfg.glance_size, **kw)
        macs = {"glance": count_macs(self.glance_encoder, glance_in)}
        with eval_mode(self), torch.no_grad():
            maps = self.glance_encoder(glance_in)
        macs["policy"] = count_macs(self.policy, maps, self.policy.init_hidden(1, p.device, p.dtype))
        macs["local"] = count_macs(self.local_encoder, torch.zeros(1, 3, cfg.patch_size, cfg.patch_size, **kw))
        macs["classifier"] = count_macs(self.classifier.fc, torch.zeros(1, self.classifier.in_features, **kw))
        return macs

    def flops_notes(self) -> dict[str, str]:
        cfg = self.config
        return {
            "glance": f"fG on {cfg.glance_size}x{cfg.glance_size}, per frame",
            "policy": f"pi (1x1 conv + GRU {cfg.policy_hidden_size} + fc), per frame" if cfg.policy == "learned"
            else f"{cfg.policy} policy, no computation",
            "local": f"fL on a {cfg.patch_size}x{cfg.patch_size} patch of the {cfg.input_size}x{cfg.input_size} frame",
            "classifier": "fC linear layer (max-pooling and the training-only FC_G/FC_L not counted)",
        }

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict]:
        cfg = self.config
        groups = [
            ("glance", [self.glance_encoder], cfg.lr_glance),
            ("local", [self.local_encoder], cfg.lr_local),
            ("classifier", [self.classifier] + ([self.glance_head, self.local_head] if cfg.auxiliary_supervision else []),
             cfg.lr_classifier),
            ("policy", [self.policy], cfg.lr_policy),
        ]
        out = []
        for name, modules, lr in groups:
            params = [p for m in modules for p in m.parameters() if p.requires_grad]
            if params:
                out.append({"name": name, "params": params, "lr": lr})
        return out
