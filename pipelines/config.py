"""Typed configuration of the training job: dataclasses with defaults that run, YAML files for named
experiments, and ``key=value`` overrides of any field from the command line.

    python pipelines/train.py                                   # the embedded default (tiny demo)
    python pipelines/train.py --config configs/synthetic_tiny.yaml optim.epochs=3 model.patch_size=48

Precedence: defaults < YAML file < command-line overrides. ``model.*`` keys other than ``method`` and
``preset`` are fields of the method's own config dataclass (e.g. ``AdaFocusV2Config``) and are checked
when the model is built.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adaptive.interface import config_from_dict


@dataclass
class SyntheticConfig:
    """The synthetic benchmark generated when the manifest is missing (see pipelines/make_benchmark.py)."""

    generate_if_missing: bool = True
    videos: int = 640
    frames: int = 32
    size: int = 128
    task: str = "appearance"
    classes: int = 8
    seed: int = 0


@dataclass
class DataConfig:
    manifest: str = "data/synthetic/manifest.csv"
    format: str = "auto"
    data_root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    """Held-out split: per-epoch validation and the early-exit threshold solver."""
    test_split: str = "test"
    """Reported split for the final accuracy-vs-GFLOPs curve (falls back to val when empty)."""
    frames: int = 8
    """T: frames sampled per video."""
    size: int = 128
    """Decode short side S (clips are S x S)."""
    crop_size: int = 112
    """Model input side (training multi-scale crop / evaluation centre crop)."""
    coarse_to_fine: bool = False
    """FrameExit's middle-first frame order (AdaFocusV2 Table 6). Off by default: a model that serves
    live streams sees frames in arrival order, so it should be trained in that order."""
    crop_scales: list[float] | None = None
    """Training crops: candidate crop sides as fractions of the short side, resized to ``crop_size``
    (TSN's multi-scale crop, AdaFocusV2 appendix A.1: ``[1.0, 0.875, 0.75, 0.66]``). None: the
    evaluation scale only (``crop_size / size``), i.e. random translations -- for classes defined
    by a texture's scale, like the synthetic benchmark's glyphs, which scale jitter turns into
    other patterns (the demo's full-frame reference learned faster without it)."""
    flip: bool = True
    """Random horizontal flip in training (turn off for direction-defined classes)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    method: str = "adafocus_v2"
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    """Fields of the method's config dataclass (``num_classes`` is set from the dataset)."""
    init_from_full_frame: bool = True
    """When the encoders have no pretrained weight files (the tiny preset): train the full-frame
    reference first (``eval.train_full_frame``) and start the model's glance and local encoders from
    its weights -- our stand-in for the paper's ImageNet initialisation (section 4.1). Encoders
    given weight files (``overrides.glance.weights`` ...) keep them."""
    policy_teacher: bool | str = "auto"
    """Our extension, not in the paper: the trained full-frame reference teaches the policy where to
    look (the peak of its attention map; ``AdaFocusV2.set_policy_teacher``). ``auto``: whenever the
    reference is trained (``eval.train_full_frame``) and the method has a policy to teach (in the
    demo it measured +20 points of test accuracy, README); ``true``: required (an error where it
    cannot be); ``false``: the paper's method as published (the paper configs)."""


@dataclass
class OptimConfig:
    """AdaFocusV2 appendix B.2: SGD, momentum 0.9, cosine annealing, per-component learning rates
    (taken from the model's ``param_groups()``), weight decay; mixed precision on GPU."""

    epochs: int = 12
    batch_size: int = 16
    """Per worker."""
    optimizer: str = "auto"
    """``sgd`` (appendix B.2, for ImageNet-initialised backbones), ``adamw`` (networks trained from
    scratch: at the paper's fine-tuning rates SGD barely moves them), or ``auto``: AdamW for the
    ``tiny`` preset, SGD otherwise."""
    momentum: float = 0.9
    lr_scale: float = 1.0
    """Multiplies every component's learning rate (linear scaling with the global batch)."""
    warmup_epochs: float = 0.25
    amp: str = "auto"
    """``auto`` (bf16 autocast on CUDA), ``on`` or ``off``."""
    grad_clip: float = 0.0


@dataclass
class RunConfig:
    name: str | None = None
    """Run name; default ``<method>-<timestamp>``. ``--resume NAME`` continues that run."""
    experiment: str = "adastream"
    storage_path: str = "runs"
    """Checkpoints and Ray Train state; shared storage (s3://, NFS) on a multi-node cluster."""
    num_workers: int = 1
    use_gpu: str = "auto"
    """``auto``: use GPUs when the cluster has them."""
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    """Worker failures Ray Train recovers from (restoring the last checkpoint)."""
    seed: int = 0
    ray_address: str | None = None
    """None: connect to the cluster when running under ``ray job submit``, else start a local one."""
    local_num_cpus: int | None = None
    """Logical CPUs of a locally started Ray (default: cores + 2 x workers, so decode tasks always fit)."""
    object_store_memory: int | None = None
    tracking_uri: str | None = None
    """MLflow tracking URI; default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` here."""
    registered_model: str = "adastream-{method}"
    model_alias: str = "demo"
    worker_resources: dict[str, float] = field(default_factory=dict)
    """Extra custom resources per train worker (placement across nodes)."""
    crash_after_epoch: int | None = None
    """Fault injection for recovery tests: the last worker dies (once) during the following epoch."""


@dataclass
class EvalConfig:
    baselines: list[str] = field(default_factory=lambda: ["random", "centre", "gaussian"])
    """Patch-policy baselines evaluated with the trained weights (Table 7)."""
    budgets_gflops: list[float] = field(default_factory=list)
    """Extra GFLOPs/video budgets to solve thresholds for (the curve is always traced)."""
    trained_baselines: list[str] = field(default_factory=list)
    """Patch policies to train as models of their own -- same recipe, epochs and starting weights,
    no policy teacher -- and report beside the learned policy (the baselines of the paper's
    Table 7, which the benchmark trains too), e.g. ``[random]``. Unlike ``baselines`` (the trained
    model's weights with another policy), these show what the policy earns over never learning
    where to look. Each costs one more training run, which is why the demo (11 minutes) has none."""
    train_full_frame: bool = True
    """Also train the non-adaptive full-frame model on the same data, as the reference."""
    full_frame_epochs: int | None = 8
    """Epochs of the full-frame reference (None: as many as the model's). It starts the encoders and
    teaches the policy (``model.init_from_full_frame``, ``model.policy_teacher``), so it must be good:
    on the demo, 4 epochs gave 47-58 % and runs of the model that varied from 67 to 98 %."""
    visualise_videos: int = 4


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"optim.epochs": 6, ...}`` for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


class ConfigError(ValueError):
    pass


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from nested dicts; unknown keys are an error naming the section."""
    try:
        return config_from_dict(TrainConfig, values or {})
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error)) from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "overrides":
            _merge(base[key], value)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.epochs=3"`` -> ``{"optim": {"epochs": 3}}`` (values parsed as YAML scalars/lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    parts = key.strip().split(".")
    # model.<field of the method's config> is shorthand for model.overrides.<field>
    if parts[0] == "model" and len(parts) >= 2 and parts[1] not in {f.name for f in dataclasses.fields(ModelConfig)}:
        parts = ["model", "overrides", *parts[1:]]
    nested: dict[str, Any] = {}
    cursor = nested
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    values = TrainConfig().to_dict()
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _merge(values, loaded)
    for text in overrides or []:
        _merge(values, parse_override(text))
    return from_dict(values)
