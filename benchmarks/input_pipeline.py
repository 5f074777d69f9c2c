"""Is the input pipeline the bottleneck? Training steps/s fed by the real pipeline vs from memory.

    python benchmarks/input_pipeline.py [--manifest M] [--videos N] [--frames T] [--batch-size B]

Both contenders run the same training step (the tiny AdaFocusV2's full objective, forward + backward
+ SGD step) on the same videos, side by side in one process:

* ``pipeline`` -- Ray Data decodes with PyAV in Ray tasks, DALI (CPU mode here) augments, exactly as
  in ``pipelines/train.py``;
* ``cached``   -- the same clips decoded and augmented once beforehand, held in memory as tensors.

They alternate (cached, pipeline, cached, pipeline) to share the machine's noise. The report says
where the pipeline's time goes: waiting for Ray Data batches vs DALI. Headline last:
``input_vs_cached=<pipeline steps/s / cached steps/s>`` (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", default="data/synthetic/manifest.csv")
    parser.add_argument("--videos", type=int, default=None,
                        help="training videos per pass (default: the whole train split, one real epoch)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--crop-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from adaptive import build_model
    from pipelines.data.dali import AugmentConfig, ClipAugmenter
    from pipelines.data.dataset import PipelineConfig, build_clip_dataset, iter_model_batches
    from pipelines.data.decode import DecodeConfig
    from pipelines.data.manifest import load_manifest

    if not Path(args.manifest).exists():
        from pipelines.data.synthetic import generate_benchmark

        generate_benchmark(Path(args.manifest).parent)
    manifest = load_manifest(args.manifest).split("train")
    if args.videos is not None:
        manifest.table = manifest.table.iloc[: args.videos].reset_index(drop=True)
    torch.set_num_threads(args.torch_threads)
    ray.init(num_cpus=(os.cpu_count() or 2) + 2, include_dashboard=False, log_to_driver=False)

    torch.manual_seed(0)
    model = build_model("adafocus_v2", "tiny", num_classes=manifest.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    augment = ClipAugmenter(AugmentConfig(crop_size=args.crop_size, resize_size=args.size), training=True,
                            max_batch_size=args.batch_size, device_id=None, seed=0)
    config = PipelineConfig(decode=DecodeConfig(num_frames=args.frames, size=args.size, training=True,
                                                coarse_to_fine=True), shuffle=True, seed=0)

    def step(batch: dict) -> None:
        loss, _ = model.loss(batch["video"], batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    # The cached contender's tensors: the same videos, decoded and augmented once, before timing.
    cached = list(iter_model_batches(build_clip_dataset(manifest, config), augment, args.batch_size))

    def run_cached() -> tuple[float, int, float, float, float]:
        start = time.perf_counter()
        for batch in cached:
            step(batch)
        return time.perf_counter() - start, len(cached), 0.0, 0.0, 0.0

    dali_busy = [0.0]

    def timed_augment(clips):  # runs in iter_model_batches' background thread
        t0 = time.perf_counter()
        video = augment(clips)
        dali_busy[0] += time.perf_counter() - t0
        return video

    def run_pipeline() -> tuple[float, int, float, float, float]:
        """The training job's loop: iter_model_batches (Ray Data -> DALI, prefetched in a thread)."""
        start = time.perf_counter()
        wait = first = 0.0
        steps = 0
        dali_before = dali_busy[0]
        batches = iter_model_batches(build_clip_dataset(manifest, config), timed_augment, args.batch_size)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            waited = time.perf_counter() - t0
            wait += waited
            if steps == 0:
                first = waited  # plan + first decode task + first DALI run: paid once per pass (epoch)
            if batch is None:
                break
            step(batch)
            steps += 1
        return time.perf_counter() - start, steps, wait, dali_busy[0] - dali_before, first

    results: dict[str, list[tuple[float, int, float, float, float]]] = {"cached": [], "pipeline": []}
    for _ in range(args.rounds):
        results["cached"].append(run_cached())
        results["pipeline"].append(run_pipeline())

    def rate(name: str) -> float:
        return sum(r[1] for r in results[name]) / sum(r[0] for r in results[name])

    total = sum(r[0] for r in results["pipeline"])
    wait = sum(r[2] for r in results["pipeline"])
    dali = sum(r[3] for r in results["pipeline"])
    first = sum(r[4] for r in results["pipeline"])
    print(f"{'contender':10s} {'steps/s':>8s} {'videos/s':>9s}")
    for name in ("cached", "pipeline"):
        print(f"{name:10s} {rate(name):8.2f} {rate(name) * args.batch_size:9.1f}")
    print(f"\npipeline time: {100 * wait / total:.0f}% waiting for the next batch (Ray Data decode + DALI, "
          f"which run ahead in a background thread), {100 * (total - wait) / total:.0f}% training step; "
          f"of the wait, the first batch of a pass (planning + first decode) is {100 * first / total:.0f}% "
          f"of the time ({first / args.rounds:.2f} s per pass); DALI was busy {100 * dali / total:.0f}% "
          f"of the time, overlapped with the step")
    print(f"{len(manifest)} videos x {args.frames} frames at {args.size}px, batch {args.batch_size}, "
          f"{args.rounds} rounds, {os.cpu_count()} cores, torch threads {args.torch_threads}")
    print(f"input_vs_cached={rate('pipeline') / rate('cached'):.2f} data_wait_fraction={wait / total:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
