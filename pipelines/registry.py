"""Putting a trained model into the MLflow model registry, and getting it back out safely.

What is registered is the PyTorch flavour of :class:`ExportedVideoModel` (``forward(clip) -> per-step
logits``, with a signature), so ``mlflow.pytorch`` users can load it. Next to it, inside the same
model artifact, go ``weights.pt`` (a plain state dict) and ``adastream.json`` (method, model config,
class names, early-exit thresholds). :func:`load_registered_model` rebuilds the model from those with
``torch.load(..., weights_only=True)``: serving and ``predict.py`` never unpickle code from a registry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from adaptive import build_model

WEIGHTS_FILE = "weights.pt"
META_FILE = "adastream.json"


class ExportedVideoModel(nn.Module):
    """The registered module: clips ``[B, T, 3, H, W]`` -> per-step logits ``[B, T, K]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.model(clip).logits


@dataclass
class LoadedModel:
    model: nn.Module
    method: str
    classes: list[str]
    exits: dict[str, Any] = field(default_factory=dict)
    """``{"curve": [{"test_gflops", "thresholds", "criterion", ...}], "budgets": [...]}``."""
    num_frames: int = 8
    data: dict[str, Any] = field(default_factory=dict)


def register_model(model: nn.Module, *, method: str, classes: list[str], exits: dict, data: dict,
                   registered_name: str, alias: str | None, num_frames: int) -> Any:
    """Log the model to the active MLflow run and register it; returns MLflow's ModelInfo."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    size = model.input_size
    example = torch.zeros(1, num_frames, 3, size, size)
    with torch.no_grad():
        logits = ExportedVideoModel(model)(example)
    signature = infer_signature(example.numpy(), logits.numpy())
    meta = {"method": method, "config": dataclasses.asdict(model.config), "classes": classes,
            "exits": exits, "num_frames": num_frames, "data": data}
    with tempfile.TemporaryDirectory() as directory:
        weights = Path(directory) / WEIGHTS_FILE
        torch.save(model.state_dict(), weights)
        (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=1))
        info = mlflow.pytorch.log_model(
            ExportedVideoModel(model), name="model", signature=signature, serialization_format="pickle",
            registered_model_name=registered_name,
            extra_files=[str(weights), str(Path(directory) / META_FILE)],
            code_paths=[str(Path(__file__).resolve().parents[1] / "adaptive")],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    if alias and info.registered_model_version is not None:
        mlflow.MlflowClient().set_registered_model_alias(registered_name, alias, info.registered_model_version)
    return info


def load_registered_model(model_uri: str, *, tracking_uri: str | None = None,
                          device: str | torch.device = "cpu") -> LoadedModel:
    """``models:/<name>@<alias>``, ``models:/<name>/<version>`` or ``runs:/<run>/model`` -> model."""
    import mlflow

    if tracking_uri:
        # models:/ URIs resolve through the global registry URI only. mlflow.set_tracking_uri also
        # exports MLFLOW_TRACKING_URI to every process started later: keep the environment as it was.
        before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    meta_path = next(local.rglob(META_FILE), None)
    weights_path = next(local.rglob(WEIGHTS_FILE), None)
    if meta_path is None or weights_path is None:
        raise FileNotFoundError(f"{model_uri} is not an AdaStream model (no {META_FILE}/{WEIGHTS_FILE})")
    meta = json.loads(meta_path.read_text())
    return build_loaded(meta, torch.load(weights_path, map_location="cpu", weights_only=True), device)


def build_loaded(meta: dict, state_dict: dict, device: str | torch.device = "cpu") -> LoadedModel:
    model = build_model(meta["method"], meta["config"])
    model.load_state_dict(state_dict)
    return LoadedModel(model.to(device).eval(), meta["method"], list(meta["classes"]), meta.get("exits", {}),
                       int(meta.get("num_frames", 8)), meta.get("data", {}))
