"""The interface that training, evaluation and serving use for every adaptive model.

See ``adaptive/README.md`` for the full contract.  In short, a model is an
:class:`AdaptiveVideoModel` (an ``nn.Module``) with:

* ``forward(clip [B, T, 3, H, W]) -> ClipOutput``: ``logits [B, S, K]`` -- the
  prediction after every step (S steps; S == T for the frame-by-frame methods)
  --, ``flops [B, S]`` -- multiply-adds spent *at* each step, so the cost of a
  video that exits after step k is ``flops[b, :k+1].sum()`` -- and ``extra``
  (e.g. ``boxes [B, S, 4]``, normalised xyxy).
* ``loss(clip, labels) -> (loss, logs)``: the method's full training objective
  and a dict of floats to log.
* ``init_state(batch_size, device) -> State`` and
  ``step(frames [B, 3, H, W], state) -> StepOutput(logits [B, K], state, flops [B], extra)``
  for streams.  ``State`` is a plain ``dict[str, Tensor]``, every tensor
  batch-first, so states of many streams can be stacked into one batch,
  split again, serialised and re-created (:func:`stack_states`,
  :func:`split_state`, :func:`state_to_bytes`, :func:`state_from_bytes`).
  Running ``step`` over the T frames of a clip reproduces ``forward``'s
  per-step logits and FLOPs.  Methods that must see the whole clip before
  their first prediction (AdaFocusV3's glance over all frames, Ada3D's
  clip-level selection, AdaFrame's global memory) set ``streaming = False``;
  a server buffers their frames and calls ``forward``.
* ``flops_profile(num_frames) -> FlopsProfile`` and ``flops_per_step(num_frames)``.
* ``num_classes``, ``input_size`` and ``param_groups()`` (per-component
  learning rates, so one generic optimiser builder serves all methods).
* :func:`build_model` ``(name, config)``: the registry
  (``"adafocus_v2"``, ``"full_frame"``, later ``"adafocus_v3"``,
  ``"adafuse"``, ``"adaframe"``, ``"ada3d"``).

Input clips are float tensors ``[B, T, 3, H, W]``, ImageNet-normalised
(:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), ``H == W == model.input_size``,
frames in the order the model should see them (see
:func:`adaptive.sampling.coarse_to_fine_order`).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple

import torch
import torch.nn as nn

from .flops import FlopsProfile

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "State",
    "ClipOutput",
    "StepOutput",
    "AdaptiveVideoModel",
    "register_model",
    "build_model",
    "available_models",
    "config_from_dict",
    "stack_states",
    "split_state",
    "select_state",
    "state_to_bytes",
    "state_from_bytes",
    "normalize_uint8_clip",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

State = dict[str, torch.Tensor]


@dataclass
class ClipOutput:
    """Result of ``model(clip)``.

    logits: ``[B, S, K]`` -- pre-softmax prediction after each step.
    flops: ``[B, S]`` -- multiply-adds spent at each step (not cumulative).
    extra: method-specific tensors, batch-first (``boxes [B, S, 4]`` ...).
    """

    logits: torch.Tensor
    flops: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def final_logits(self) -> torch.Tensor:
        """``[B, K]``: the prediction after all steps (AdaFocusV2 without early exit)."""
        return self.logits[:, -1]

    def cumulative_flops(self) -> torch.Tensor:
        """``[B, S]``: multiply-adds of a video that stops after each step."""
        return self.flops.cumsum(dim=1)


class StepOutput(NamedTuple):
    """Result of ``model.step(frames, state)``; unpacks as ``logits, state, flops, extra``."""

    logits: torch.Tensor  # [B, K]
    state: State
    flops: torch.Tensor  # [B]
    extra: dict[str, torch.Tensor]


class AdaptiveVideoModel(nn.Module):
    """Base class of the adaptive video models (see module docstring)."""

    #: registry name, set by :func:`register_model`
    name: ClassVar[str] = ""
    #: False if the method needs the whole clip before its first prediction
    streaming: ClassVar[bool] = True

    num_classes: int
    input_size: int

    # -- clip API -------------------------------------------------------------
    def forward(self, clip: torch.Tensor) -> ClipOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, clip: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Default objective: mean over steps of the cross-entropy of every p_t."""
        out = self(clip)
        B, S, K = out.logits.shape
        ce = nn.functional.cross_entropy(out.logits.reshape(B * S, K), labels.repeat_interleave(S))
        return ce, {"loss": float(ce.detach())}

    # -- streaming API --------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        raise NotImplementedError(f"{type(self).__name__} is not a streaming model; call forward()")

    def step(self, frames: torch.Tensor, state: State) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__} is not a streaming model; call forward()")

    # -- accounting -----------------------------------------------------------
    def measure_component_macs(self) -> dict[str, int]:  # pragma: no cover - abstract
        """Multiply-adds of each component for one step, measured from the modules (FlopCounterMode)."""
        raise NotImplementedError

    def component_macs(self) -> dict[str, int]:
        """:meth:`measure_component_macs`, measured once (the architecture does not change)."""
        cached = self.__dict__.get("_component_macs_cache")
        if cached is None:
            cached = self.__dict__["_component_macs_cache"] = dict(self.measure_component_macs())
        return dict(cached)

    def step_macs(self) -> int:
        """Multiply-adds of one step (methods whose steps cost the same every time)."""
        return sum(self.component_macs().values())

    def flops_notes(self) -> dict[str, str]:
        """What each component of :meth:`component_macs` covers (shown in reports)."""
        return {}

    def flops_profile(self, num_frames: int) -> FlopsProfile:
        """Per-component and per-step cost; by default every step costs :meth:`step_macs`.
        Methods whose steps differ (e.g. a clip-level first step) override this."""
        return FlopsProfile(components=self.component_macs(), steps=[self.step_macs()] * num_frames,
                            notes=self.flops_notes())

    def flops_per_step(self, num_frames: int) -> torch.Tensor:
        """``[S]`` multiply-adds per step for a ``num_frames`` clip (float64)."""
        return self.flops_profile(num_frames).steps_tensor()

    # -- optimisation ---------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups (``{"name", "params", "lr"}``); default: one group, no lr."""
        return [{"name": "all", "params": [p for p in self.parameters() if p.requires_grad]}]


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------
_REGISTRY: dict[str, tuple[type[AdaptiveVideoModel], type]] = {}


def register_model(name: str, config_cls: type) -> Callable[[type[AdaptiveVideoModel]], type[AdaptiveVideoModel]]:
    """Class decorator: ``@register_model("adafocus_v2", AdaFocusV2Config)``."""

    def deco(cls: type[AdaptiveVideoModel]) -> type[AdaptiveVideoModel]:
        if name in _REGISTRY and _REGISTRY[name][0] is not cls:
            raise ValueError(f"model {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = (cls, config_cls)
        return cls

    return deco


def available_models() -> list[str]:
    _import_builtin_models()
    return sorted(_REGISTRY)


def model_class(name: str) -> type[AdaptiveVideoModel]:
    """The class registered as ``name`` (to ask what a method supports without building it)."""
    _import_builtin_models()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; available: {sorted(_REGISTRY)}")
    return _REGISTRY[name][0]


def _import_builtin_models() -> None:
    # importing the modules runs their @register_model decorators
    from . import adafocus_v2, full_frame  # noqa: F401


def config_from_dict(config_cls: type, values: dict[str, Any]) -> Any:
    """Build a (possibly nested) config dataclass from a plain dict (e.g. parsed YAML): the class's
    defaults with ``values`` merged in (see :func:`replace_fields`). Unknown keys raise."""
    return replace_fields(config_cls(), values)


def build_model(name: str, config: Any = None, **overrides: Any) -> AdaptiveVideoModel:
    """Build a registered model.

    ``config`` may be ``None`` (the config class's defaults, i.e. the tiny
    preset), the name of a preset classmethod (``"tiny"``, ``"paper"``), a dict
    of fields, or a config instance; ``overrides`` replace single fields.
    """
    cls, config_cls = model_class(name), _REGISTRY[name][1]
    if config is None:
        cfg = config_cls()
    elif isinstance(config, str):
        preset = getattr(config_cls, config, None)
        if preset is None or not callable(preset):
            raise ValueError(f"{config_cls.__name__} has no preset {config!r}")
        cfg = preset()
    elif isinstance(config, dict):
        cfg = config_from_dict(config_cls, config)
    else:
        cfg = config
    if overrides:
        cfg = replace_fields(cfg, overrides)
    return cls(cfg)


def replace_fields(config: Any, overrides: dict[str, Any]) -> Any:
    """``dataclasses.replace`` that merges dicts into nested config dataclasses, so that
    ``{"local": {"weights": path}}`` changes one field of the local encoder's config and keeps the
    others (e.g. the tiny preset's); list values for tuple fields become tuples. Unknown keys raise."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown {type(config).__name__} fields: {sorted(unknown)}")
    changes = {}
    for key, value in overrides.items():
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = replace_fields(current, value)
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        changes[key] = value
    return dataclasses.replace(config, **changes)


# ---------------------------------------------------------------------------
# state utilities (a server batches many streams)
# ---------------------------------------------------------------------------
def stack_states(states: list[State]) -> State:
    """Concatenate the states of several streams/batches along the batch dimension."""
    if not states:
        raise ValueError("no states to stack")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError(f"states have different keys: {sorted(keys)} vs {sorted(s.keys())}")
    return {k: torch.cat([s[k] for s in states], dim=0) for k in keys}


def split_state(state: State) -> list[State]:
    """Split a batched state into one state (batch size 1) per stream."""
    batch = _batch_size(state)
    return [{k: v[i : i + 1] for k, v in state.items()} for i in range(batch)]


def select_state(state: State, index: torch.Tensor | list[int]) -> State:
    """Keep the streams ``index`` (e.g. those that have not exited yet)."""
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index, dtype=torch.long)
    return {k: v.index_select(0, index.to(v.device)) for k, v in state.items()}


def _batch_size(state: State) -> int:
    sizes = {v.shape[0] for v in state.values()}
    if len(sizes) != 1:
        raise ValueError(f"state tensors disagree on the batch size: {sizes}")
    return sizes.pop()


def state_to_bytes(state: State) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    return buf.getvalue()


def state_from_bytes(data: bytes, device: torch.device | str | None = None) -> State:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return {k: v.to(device) if device is not None else v for k, v in state.items()}


def normalize_uint8_clip(clip: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., H, W, 3]`` (decoder layout) -> ImageNet-normalised float ``[..., 3, H, W]``."""
    x = clip.to(torch.float32).div_(255.0)
    x = x.movedim(-1, -3)
    mean = x.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std
