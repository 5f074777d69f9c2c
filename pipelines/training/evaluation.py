"""After training: per-step predictions on the held-out and test splits, early-exit thresholds,
the accuracy-vs-GFLOPs curve, the baselines, patch visualisations and the summary table.

Thresholds are solved on the held-out split (Eq. 12, MSDNet's budgeted procedure) and the curve is
reported on the test split, so the reported accuracy never saw the data its thresholds came from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptive.early_exit import evaluate_exits, thresholds_for_budget, trace_curve
from adaptive.interface import IMAGENET_MEAN, IMAGENET_STD
from pipelines.config import TrainConfig, from_dict
from pipelines.data.dali import AugmentConfig, ClipAugmenter
from pipelines.data.dataset import PipelineConfig, build_clip_dataset, iter_model_batches
from pipelines.data.decode import DecodeConfig
from pipelines.data.manifest import Manifest


@dataclass
class SplitOutputs:
    """Per-step outputs of one model on one split."""

    logits: torch.Tensor  # [N, T, K] float32
    flops: torch.Tensor  # [N, T] float64 multiply-adds per step
    labels: torch.Tensor  # [N]
    video_ids: list[str]
    boxes: torch.Tensor | None = None  # [N, T, 4] normalised xyxy
    frames: np.ndarray | None = None  # uint8 [V, T, H, W, 3] of the first V videos, for pictures

    def accuracy_after(self, t: int) -> float:
        return float((self.logits[:, t - 1].argmax(-1) == self.labels).double().mean())

    @property
    def gflops_per_video(self) -> float:
        return float(self.flops.sum(1).mean()) / 1e9


def eval_decode_config(config: TrainConfig) -> DecodeConfig:
    return DecodeConfig(num_frames=config.data.frames, size=config.data.size, training=False,
                        coarse_to_fine=config.data.coarse_to_fine)


def collect_outputs(model: torch.nn.Module, manifest: Manifest, config: TrainConfig, device: torch.device,
                    keep_frames: int = 0, report: Any = None) -> SplitOutputs:
    """Run the model over one split (evaluation transform) and keep every step's output."""
    augment = ClipAugmenter(AugmentConfig(crop_size=config.data.crop_size, resize_size=config.data.size),
                            training=False, max_batch_size=config.optim.batch_size,
                            device_id=device.index if device.type == "cuda" else None)
    dataset = build_clip_dataset(manifest, PipelineConfig(decode=eval_decode_config(config)), report=report)
    logits, flops, labels, ids, boxes, frames = [], [], [], [], [], []
    model.eval()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)
    with torch.no_grad():
        for batch in iter_model_batches(dataset, augment, config.optim.batch_size):
            out = model(batch["video"])
            logits.append(out.logits.float().cpu())
            flops.append(out.flops.double().cpu())
            labels.append(batch["label"].cpu())
            ids.extend(batch["video_id"])
            if "boxes" in out.extra:
                boxes.append(out.extra["boxes"].float().cpu())
            if sum(len(f) for f in frames) < keep_frames:
                pixels = (batch["video"] * std + mean).clamp(0, 1).mul(255).byte().permute(0, 1, 3, 4, 2)
                frames.append(pixels.cpu().numpy())
    return SplitOutputs(torch.cat(logits), torch.cat(flops), torch.cat(labels), ids,
                        torch.cat(boxes) if boxes else None,
                        np.concatenate(frames)[:keep_frames] if frames else None)


# ------------------------------------------------------------------------------------------ figures


def draw_boxes(frames: np.ndarray, boxes: np.ndarray, colour=(0, 255, 0), width: int = 2) -> np.ndarray:
    """Frames ``[T, H, W, 3]`` with each frame's normalised xyxy box drawn, side by side in one strip."""
    out = frames.copy()
    T, H, W, _ = out.shape
    for t in range(T):
        x0, y0, x1, y1 = boxes[t]
        l, r = int(round(x0 * (W - 1))), int(round(x1 * (W - 1)))
        u, d = int(round(y0 * (H - 1))), int(round(y1 * (H - 1)))
        out[t, u:u + width, l:r + 1] = colour
        out[t, max(d - width + 1, 0):d + 1, l:r + 1] = colour
        out[t, u:d + 1, l:l + width] = colour
        out[t, u:d + 1, max(r - width + 1, 0):r + 1] = colour
    gap = np.full((H, 4, 3), 255, dtype=np.uint8)
    return np.concatenate([np.concatenate([f, gap], axis=1) for f in out], axis=1)


def save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


def plot_curve(curve: list[dict], references: dict[str, tuple[float, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    xs = [p["test_gflops"] for p in curve]
    ys = [100 * p["test_accuracy"] for p in curve]
    ax.plot(xs, ys, "-o", ms=3, color="black", label="AdaFocusV2+ (early exit, test)")
    markers = iter(["s", "D", "^", "v", "P", "X"])
    for name, (gflops, accuracy) in references.items():
        ax.scatter([gflops], [100 * accuracy], marker=next(markers, "o"), s=50, label=name, zorder=3)
    ax.set_xlabel("GFLOPs / video (multiply-adds)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ analysis


@dataclass
class Evaluation:
    """Everything the run reports at the end; ``to_dict`` is JSON-ready."""

    steps_table: dict[str, dict[str, float]] = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)
    budgets: list[dict] = field(default_factory=list)
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    headline: dict[str, float] = field(default_factory=dict)
    heldout_videos: int = 0
    """Videos of the split the thresholds were solved on."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def accuracy_by_steps(outputs: SplitOutputs) -> dict[str, float]:
    T = outputs.logits.shape[1]
    steps = sorted({t for t in (1, 2, 4) if t < T} | {T})
    row = {f"t={t}" if t < T else f"t={T} (all)": outputs.accuracy_after(t) for t in steps}
    row["gflops_per_video"] = outputs.gflops_per_video
    return row


def analyse(model_outputs: dict[str, SplitOutputs], baselines: dict[str, SplitOutputs],
            full_frame: SplitOutputs | None, budgets_gflops: list[float],
            trained_baselines: dict[str, SplitOutputs] | None = None) -> Evaluation:
    """Tables and curve from the collected outputs (``model_outputs`` has ``val`` and ``test``;
    ``baselines``: the model's weights with another policy; ``trained_baselines``: models trained
    with another policy)."""
    val, test = model_outputs["val"], model_outputs["test"]
    result = Evaluation(heldout_videos=int(val.labels.shape[0]))
    result.steps_table["learned policy"] = accuracy_by_steps(test)
    for name, outputs in (trained_baselines or {}).items():
        result.steps_table[f"{name} policy, trained"] = accuracy_by_steps(outputs)
    for name, outputs in baselines.items():
        result.steps_table[f"{name} patches"] = accuracy_by_steps(outputs)
    points = trace_curve(val.logits, val.labels, val.flops, test.logits, test.labels, test.flops)
    for point in points:
        result.curve.append({"p": point.p, "val_accuracy": point.heldout.accuracy,
                             "val_gflops": point.heldout.gflops, "test_accuracy": point.test.accuracy,
                             "test_gflops": point.test.gflops, "thresholds": point.policy.to_dict()})
    for budget in budgets_gflops:
        try:
            chosen = thresholds_for_budget(val.logits, val.labels, val.flops, budget * 1e9)
        except ValueError as error:
            result.budgets.append({"budget_gflops": budget, "error": str(error)})
            continue
        on_test = evaluate_exits(test.logits, test.labels, test.flops, chosen.policy)
        result.budgets.append({"budget_gflops": budget, "thresholds": chosen.policy.to_dict(),
                               "val_accuracy": chosen.heldout.accuracy, "val_gflops": chosen.heldout.gflops,
                               "test_accuracy": on_test.accuracy, "test_gflops": on_test.gflops})
    all_frames = {"accuracy": test.accuracy_after(test.logits.shape[1]), "gflops": test.gflops_per_video}
    result.references["AdaFocusV2 (all frames)"] = all_frames
    result.headline["adafocus_accuracy"] = all_frames["accuracy"]
    result.headline["adafocus_gflops"] = all_frames["gflops"]
    if full_frame is not None:
        reference = {"accuracy": full_frame.accuracy_after(full_frame.logits.shape[1]),
                     "gflops": full_frame.gflops_per_video}
        result.references["full-frame model"] = reference
        result.headline["full_frame_accuracy"] = reference["accuracy"]
        result.headline["full_frame_gflops"] = reference["gflops"]
        matching = [p for p in result.curve if p["test_accuracy"] >= reference["accuracy"]]
        result.headline["flops_ratio_at_full_acc"] = (
            min(p["test_gflops"] for p in matching) / reference["gflops"] if matching else float("nan"))
    return result


def summary_table(evaluation: Evaluation) -> str:
    lines = ["Accuracy after t frames (test split), Table 7 form:"]
    columns = list(next(iter(evaluation.steps_table.values())).keys())
    widths = {c: max(12, len(c) + 2) for c in columns}
    lines.append(f"  {'policy':22s}" + "".join(f"{c:>{widths[c]}s}" for c in columns))
    for name, row in evaluation.steps_table.items():
        lines.append(f"  {name:22s}" + "".join(
            f"{row[c]:{widths[c]}.3f}" if c == "gflops_per_video" else f"{100 * row[c]:{widths[c] - 1}.1f}%"
            for c in columns))
    if any(name.endswith("trained") for name in evaluation.steps_table):
        lines.append("  (trained: a model trained with that patch policy; patches: this model's weights with it)")
    lines.append("Reference models (test split):")
    for name, ref in evaluation.references.items():
        lines.append(f"  {name:30s} accuracy {100 * ref['accuracy']:5.1f}%   {ref['gflops']:.3f} GFLOPs/video")
    lines.append("AdaFocusV2+ early exit (thresholds solved on the held-out split, evaluated on test):")
    shown = evaluation.curve[:: max(1, len(evaluation.curve) // 8)] + evaluation.curve[-1:]
    printed = set()
    for point in sorted(shown, key=lambda p: p["test_gflops"]):
        line = f"  {point['test_gflops']:.3f} GFLOPs/video -> accuracy {100 * point['test_accuracy']:5.1f}%"
        if line not in printed:  # budgets that end at the same point once
            printed.add(line)
            lines.append(line)
    for budget in evaluation.budgets:
        if "error" in budget:
            lines.append(f"  budget {budget['budget_gflops']} GFLOPs: {budget['error']}")
        else:
            lines.append(f"  budget {budget['budget_gflops']} GFLOPs: accuracy {100 * budget['test_accuracy']:.1f}% "
                         f"at {budget['test_gflops']:.3f} GFLOPs/video")
    if evaluation.headline:
        lines.append(" ".join(f"{k}={v:.4g}" for k, v in evaluation.headline.items()))
    return "\n".join(lines)


def evaluate_run(config_dict: dict, job: dict, checkpoints: dict[str, Any], splits: dict[str, Manifest],
                 report: Any = None) -> dict[str, Any]:
    """Run inside a Ray task (GPU when the cluster has one): every model's outputs on the splits."""
    from pipelines.training.worker import build_method, load_state

    config = from_dict(config_dict)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    torch.set_num_threads(max(1, int(config.run.cpus_per_worker)))

    def load(method: str, checkpoint, **overrides) -> torch.nn.Module:
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
        model = build_method(config, job["num_classes"], method, overrides)
        missing, unexpected = model.load_state_dict(state["model"], strict=not overrides)
        return model.to(device)

    outputs: dict[str, Any] = {"model": {}, "baselines": {}, "trained_baselines": {}, "full_frame": None}
    model = load(job["method"], checkpoints["model"])
    for name, manifest in splits.items():
        keep = config.eval.visualise_videos if name == "test" else 0
        outputs["model"][name] = collect_outputs(model, manifest, config, device, keep_frames=keep, report=report)
    # The model's weights with another policy, and the models trained with one.
    baselines = [("baselines", policy, checkpoints["model"]) for policy in config.eval.baselines]
    baselines += [("trained_baselines", policy, checkpoint)
                  for policy, checkpoint in (checkpoints.get("trained_baselines") or {}).items()]
    for kind, policy, checkpoint in baselines:
        baseline = load(job["method"], checkpoint, policy=policy)
        torch.manual_seed(config.run.seed)  # random/Gaussian patches: the same draws every run
        outputs[kind][policy] = collect_outputs(baseline, splits["test"], config, device)
    if checkpoints.get("full_frame") is not None:
        reference = load("full_frame", checkpoints["full_frame"])
        outputs["full_frame"] = collect_outputs(reference, splits["test"], config, device)
    return outputs


def write_artifacts(evaluation: Evaluation, outputs: dict[str, Any], directory: Path, title: str) -> list[Path]:
    """Curve PNG + JSON, thresholds, patch pictures; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    (directory / "evaluation.json").write_text(json.dumps(evaluation.to_dict(), indent=1))
    written.append(directory / "evaluation.json")
    # val_accuracy: the server resolves budgets by the split the thresholds were solved on, never by
    # the test split (pipelines/serve/budgets.py).
    thresholds = {"curve": [{"test_gflops": p["test_gflops"], "val_gflops": p["val_gflops"],
                             "val_accuracy": p["val_accuracy"], "test_accuracy": p["test_accuracy"],
                             **p["thresholds"]} for p in evaluation.curve],
                  "budgets": evaluation.budgets,
                  # How many videos the held-out accuracies are measured on: what a difference between
                  # two of them means (the server's `auto` budget allows one standard error).
                  "heldout_videos": evaluation.heldout_videos}
    (directory / "thresholds.json").write_text(json.dumps(thresholds, indent=1))
    written.append(directory / "thresholds.json")
    references = {name: (ref["gflops"], ref["accuracy"]) for name, ref in evaluation.references.items()}
    for name, row in evaluation.steps_table.items():
        if name != "learned policy":
            references[name] = (row["gflops_per_video"], row[list(row)[-2]])
    plot_curve(evaluation.curve, references, directory / "accuracy_vs_gflops.png", title)
    written.append(directory / "accuracy_vs_gflops.png")
    test = outputs["model"]["test"]
    if test.frames is not None and test.boxes is not None:
        pictures = directory / "patches"
        pictures.mkdir(exist_ok=True)
        for i in range(len(test.frames)):
            path = pictures / f"{test.video_ids[i]}.png"
            save_png(draw_boxes(test.frames[i], test.boxes[i].numpy()), path)
            written.append(path)
    return written
