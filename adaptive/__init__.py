"""adaptive: dynamic video recognition models in plain PyTorch.

One file per method (``adafocus_v2.py``, ``full_frame.py``; AdaFocusV3,
AdaFuse, AdaFrame and Ada3D follow), shared pieces in their own modules:

* ``backbones``  -- torchvision MobileNetV2 / ResNet feature extractors (+ tiny configs, local weights)
* ``cropping``   -- differentiable interpolation-based patch/cube selection (AdaFocusV2 Eq. 4-8)
* ``policies``   -- the recurrent patch policy pi and the random/centre/Gaussian baselines
* ``heads``      -- the accumulated max-pooling classifier fC
* ``early_exit`` -- confidence/entropy exits and the MSDNet-style threshold solver (Eq. 12)
* ``flops``      -- multiply-add accounting measured from the modules
* ``sampling``   -- frame sampling and the coarse-to-fine frame order
* ``interface``  -- the model contract used by training, evaluation and serving

The contract (see ``adaptive/README.md`` and :mod:`adaptive.interface`)::

    model = build_model("adafocus_v2", "tiny")          # or a config dataclass / dict
    out = model(clip)                                    # clip [B, T, 3, H, W], ImageNet-normalised
    out.logits  # [B, T, K] prediction after every frame
    out.flops   # [B, T]    multiply-adds spent at every step (cumsum = cost if exiting there)
    out.extra   # e.g. {"boxes": [B, T, 4] normalised xyxy, "centres": [B, T, 2]}
    loss, logs = model.loss(clip, labels)                # the method's full objective
    state = model.init_state(batch_size, device)         # dict of batch-first tensors
    logits, state, flops, extra = model.step(frames, state)   # frames [B, 3, H, W]

No Ray here: this package must import with torch and torchvision only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Where each public name lives. The package imports its modules on first use (PEP 562), so a
# process that needs only the torch-free ``adaptive.sampling`` -- every Ray Data decode worker --
# does not import torch and torchvision: 5 s and about 600 MB of resident memory (much of it the
# libraries' shared pages) per worker process.
_EXPORTS = {
    "adafocus_v2": ["AdaFocusV2", "AdaFocusV2Config"],
    "backbones": ["BackboneConfig", "build_backbone"],
    "early_exit": ["ExitPolicy", "evaluate_exits", "exit_steps", "geometric_exit_distribution",
                   "solve_thresholds", "thresholds_for_budget", "trace_curve"],
    "flops": ["FlopsProfile", "count_macs"],
    "full_frame": ["FullFrameConfig", "FullFrameModel"],
    "interface": ["IMAGENET_MEAN", "IMAGENET_STD", "AdaptiveVideoModel", "ClipOutput", "State", "StepOutput",
                  "available_models", "build_model", "normalize_uint8_clip", "select_state", "split_state",
                  "stack_states", "state_from_bytes", "state_to_bytes"],
    "sampling": ["coarse_to_fine_order", "uniform_frame_indices"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)

if TYPE_CHECKING:
    from .adafocus_v2 import AdaFocusV2, AdaFocusV2Config
    from .backbones import BackboneConfig, build_backbone
    from .early_exit import (ExitPolicy, evaluate_exits, exit_steps, geometric_exit_distribution,
                             solve_thresholds, thresholds_for_budget, trace_curve)
    from .flops import FlopsProfile, count_macs
    from .full_frame import FullFrameConfig, FullFrameModel
    from .interface import (IMAGENET_MEAN, IMAGENET_STD, AdaptiveVideoModel, ClipOutput, State, StepOutput,
                            available_models, build_model, normalize_uint8_clip, select_state, split_state,
                            stack_states, state_from_bytes, state_to_bytes)
    from .sampling import coarse_to_fine_order, uniform_frame_indices


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

