"""Run a registered model on one video file, offline: the prediction, the frames used and the GFLOPs.

    python pipelines/predict.py VIDEO                       # the demo model, the "auto" budget
    python pipelines/predict.py VIDEO --budget full         # no early exit: all T frames
    python pipelines/predict.py VIDEO --budget 0.05 --model models:/adastream-adafocus_v2/3 --json

The video goes through exactly the training evaluation path -- ``decode_clip`` samples T frames
(segment centres, the model's frame order) resized to the registered ``size``, the DALI evaluation
stage centre-crops ``crop_size`` and normalises -- and the model then reads the clip frame by frame
with ``model.step``, stopping as soon as the early-exit rule for the budget fires (AdaFocusV2+,
section 3.4). Prints the top-k prediction, which frames it used (step, source frame index, the patch
it looked at) and the GFLOPs spent against those of all T frames.

Exit status: 0 on success, 1 if the video cannot be used (the reason is printed), 2 if the model
cannot be loaded or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MODEL = "models:/adastream-adafocus_v2@demo"


@dataclass
class StepTrace:
    step: int
    frame_index: int
    top1: str
    prob: float
    box: list[float]
    gflops: float


@dataclass
class Prediction:
    video: str
    label: str
    prob: float
    top_k: list[dict[str, Any]]
    exited_early: bool
    frames_used: int
    frames_total: int
    frame_indices: list[int]
    gflops: float
    gflops_all_frames: float
    budget: dict[str, Any]
    decode_status: str
    decode_note: str = ""
    steps: list[StepTrace] = field(default_factory=list)


class VideoError(RuntimeError):
    """The video cannot be used (the message says why)."""


def predict(loaded: Any, video: str, budget: str | None = "auto", top_k: int = 5) -> Prediction:
    """Early-exit prediction for one video with a :class:`pipelines.registry.LoadedModel`."""
    import numpy as np
    import torch

    from pipelines.data.dali import AugmentConfig, ClipAugmenter
    from pipelines.data.decode import DecodeConfig, decode_clip
    from pipelines.serve.budgets import ExitCatalog

    model = loaded.model
    data = loaded.data or {}
    frames = int(data.get("frames") or loaded.num_frames)
    size = int(data.get("size") or model.input_size)
    crop = int(data.get("crop_size") or model.input_size)
    decoded = decode_clip(str(video), DecodeConfig(num_frames=frames, size=size,
                                                   coarse_to_fine=bool(data.get("coarse_to_fine", False))))
    if not decoded.usable:
        raise VideoError(decoded.reason or "no usable frames")
    augmenter = ClipAugmenter(AugmentConfig(crop_size=crop, resize_size=size), training=False, max_batch_size=1,
                              device_id=None)
    device = next(model.parameters()).device
    clip = augmenter(decoded.clip[None]).to(device)  # [1, T, 3, crop, crop]
    choice = ExitCatalog.from_exits(loaded.exits or {}, frames).resolve(budget)
    policy = choice.policy(frames)

    steps: list[StepTrace] = []
    spent = 0.0
    with torch.inference_mode():
        state = model.init_state(1, device)
        for t in range(frames):
            logits, state, flops, extra = model.step(clip[:, t], state)
            spent += float(flops[0])
            probs = torch.softmax(logits[0].double(), dim=-1)
            best = int(probs.argmax())
            box = extra.get("boxes")
            steps.append(StepTrace(t, int(decoded.indices[t]), _label(loaded.classes, best),
                                   round(float(probs[best]), 5),
                                   [round(float(v), 4) for v in box[0]] if box is not None else [],
                                   round(spent / 1e9, 6)))
            if bool(policy.should_exit(logits, t).item()):
                break
    order = np.argsort(-probs.cpu().numpy())[:top_k]
    full = float(model.flops_per_step(frames).sum())
    return Prediction(
        video=str(video), label=_label(loaded.classes, int(order[0])), prob=round(float(probs[order[0]]), 5),
        top_k=[{"label": _label(loaded.classes, int(i)), "index": int(i), "prob": round(float(probs[i]), 5)}
               for i in order],
        exited_early=len(steps) < frames, frames_used=len(steps), frames_total=frames,
        frame_indices=[s.frame_index for s in steps], gflops=round(spent / 1e9, 6),
        gflops_all_frames=round(full / 1e9, 6), budget=choice.to_dict(), decode_status=decoded.status,
        decode_note=decoded.reason, steps=steps)


def _label(classes: list[str], index: int) -> str:
    return classes[index] if 0 <= index < len(classes) else str(index)


def render(result: Prediction, model_uri: str) -> str:
    lines = [f"video:      {result.video}" + (f"  ({result.decode_status}: {result.decode_note})"
                                               if result.decode_note else "")]
    b = result.budget
    cost = f"{b['gflops']:.4g} GFLOPs/window on the held-out split" if b.get("gflops") is not None else "every frame"
    lines.append(f"model:      {model_uri}")
    lines.append(f"budget:     {b['budget']} -> {cost}")
    lines.append(f"prediction: {result.label} ({result.prob:.3f})   top-{len(result.top_k)}: "
                 + " | ".join(f"{p['label']} {p['prob']:.3f}" for p in result.top_k))
    how = "early exit" if result.exited_early else "all frames"
    lines.append(f"frames:     {result.frames_used} of {result.frames_total} ({how}); source frame indices "
                 f"{result.frame_indices}")
    saved = 1 - result.gflops / result.gflops_all_frames if result.gflops_all_frames else 0.0
    lines.append(f"GFLOPs:     {result.gflops:.4f} (all {result.frames_total} frames: "
                 f"{result.gflops_all_frames:.4f}; saved {saved:.0%})")
    for s in result.steps:
        lines.append(f"  step {s.step + 1}: frame {s.frame_index:5d}  {s.top1} {s.prob:.3f}  patch "
                     f"({', '.join(f'{v:.2f}' for v in s.box)})  {s.gflops:.4f} GFLOPs so far")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("video", help="a video file (any container/codec PyAV decodes)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model URI (default {DEFAULT_MODEL})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                                               "sqlite:///mlflow.db)")
    parser.add_argument("--budget", default="auto", help="GFLOPs per video, full, min or auto (default)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    video = Path(args.video)
    if not video.exists():
        print(f"predict: no such file: {video}", file=sys.stderr)
        return 1
    from pipelines.serve.config import DEFAULT_TRACKING_URI, absolute_tracking_uri

    tracking = absolute_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    try:
        import torch

        from pipelines.registry import load_registered_model

        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        loaded = load_registered_model(args.model, tracking_uri=tracking, device=args.device)
    except Exception as error:  # noqa: BLE001 - MLflow raises many kinds; all mean "no model"
        print(f"predict: cannot load {args.model} from {tracking}: {type(error).__name__}: {error}\n"
              f"  (train and register one with `python pipelines/train.py`, or pass --model/--tracking-uri)",
              file=sys.stderr)
        return 2
    try:
        result = predict(loaded, str(video), args.budget, args.top_k)
    except VideoError as error:
        print(f"predict: cannot use {video}: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # a bad budget
        print(f"predict: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(result) | {"model": args.model}))
    else:
        print(render(result, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
