"""Is the input pipeline the bottleneck? Training steps/s fed by the real pipeline vs from memory.

    python benchmarks/input_pipeline.py [--manifest M] [--videos N] [--frames T] [--batch-size B]

Both contenders run the same training step (the tiny AdaFocusV2's full objective, forward + backward
+ SGD step) on the same videos, side by side in one process:

* ``pipeline`` -- Ray Data decodes with PyAV in Ray tasks, DALI (CPU mode here) augments, exactly as
  in ``pipelines/train.py``;
* ``cached``   -- the same clips decoded and augmented once beforehand, held in memory as tensors.

Both run the training job's epoch loop (``pipelines/training/worker.py``): an epoch of training steps,
then a validation pass over the held-out split (from memory for ``cached``, through the pipeline for
``pipeline``). Like the job, ``pipeline`` starts the next epoch's input (Ray Data's plan, the first
decode tasks and DALI batches) before validating, so that start-up overlaps validation; the first
epoch of a block pays it in full, as a job's first epoch does. Only training time counts, as in the
job's ``videos_per_s``. The contenders alternate in blocks of ``--epochs`` epochs (cached, pipeline,
cached, ...) to share the machine's noise. The report says where the pipeline's time goes: waiting
for Ray Data batches vs DALI, and the first batch of an epoch with and without the early start.
Headline last: ``input_vs_cached=<pipeline steps/s / cached steps/s>`` (goal >= 0.9).
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
    parser.add_argument("--crop-scales", type=float, nargs="+", default=None,
                        help="training crop scales, as data.crop_scales (default: the job's, crop-size / size)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="blocks per contender")
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs per block (default 4: each of the job's Ray Train runs, the full-frame "
                             "reference's and the model's, is 4 or more epochs and pays the input start-up once)")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from adaptive import build_model
    from pipelines.data.dali import AugmentConfig, ClipAugmenter
    from pipelines.data.dataset import PipelineConfig, build_clip_dataset, for_split, iter_model_batches
    from pipelines.data.decode import DecodeConfig
    from pipelines.data.manifest import load_manifest

    if not Path(args.manifest).exists():
        from pipelines.data.synthetic import generate_benchmark

        generate_benchmark(Path(args.manifest).parent)
    full_manifest = load_manifest(args.manifest)
    manifest = full_manifest.split("train")
    val_manifest = full_manifest.split("val")
    if args.videos is not None:
        manifest.table = manifest.table.iloc[: args.videos].reset_index(drop=True)
        val_manifest.table = val_manifest.table.iloc[: max(1, args.videos // 5)].reset_index(drop=True)
    torch.set_num_threads(args.torch_threads)
    ray.init(num_cpus=(os.cpu_count() or 2) + 2, include_dashboard=False, log_to_driver=False)

    torch.manual_seed(0)
    model = build_model("adafocus_v2", "tiny", num_classes=manifest.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scales = tuple(args.crop_scales or [args.crop_size / args.size])
    augment = ClipAugmenter(AugmentConfig(crop_size=args.crop_size, resize_size=args.size, scales=scales), training=True,
                            max_batch_size=args.batch_size, device_id=None, seed=0)
    config = PipelineConfig(decode=DecodeConfig(num_frames=args.frames, size=args.size, training=True,
                                                coarse_to_fine=True), shuffle=True, seed=0)
    augment_eval = ClipAugmenter(AugmentConfig(crop_size=args.crop_size, resize_size=args.size), training=False,
                                 max_batch_size=args.batch_size, device_id=None, seed=0)
    train_data = build_clip_dataset(manifest, config)
    val_data = build_clip_dataset(val_manifest, for_split(config, training=False))

    def step(batch: dict) -> None:
        loss, _ = model.loss(batch["video"], batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def validate(batches) -> None:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                model(batch["video"])
        model.train()

    # The cached contender's tensors: the same videos, decoded and augmented once, before timing.
    cached = list(iter_model_batches(train_data, augment, args.batch_size))
    cached_val = list(iter_model_batches(val_data, augment_eval, args.batch_size))

    Epoch = tuple[float, int, float, float, float, bool]  # time, steps, wait, DALI busy, first wait, early start

    def run_cached() -> list[Epoch]:
        epochs = []
        for _ in range(args.epochs):
            start = time.perf_counter()
            for batch in cached:
                step(batch)
            epochs.append((time.perf_counter() - start, len(cached), 0.0, 0.0, 0.0, False))
            validate(cached_val)
        return epochs

    dali_busy = [0.0]

    def timed_augment(clips):  # runs in iter_model_batches' background thread
        t0 = time.perf_counter()
        video = augment(clips)
        dali_busy[0] += time.perf_counter() - t0
        return video

    def run_pipeline() -> list[Epoch]:
        """The training job's loop: iter_model_batches (Ray Data -> DALI, prefetched in a thread), the
        next epoch's iterator made before validation."""
        epochs = []
        batches, early = iter_model_batches(train_data, timed_augment, args.batch_size), False
        for epoch in range(args.epochs):
            start = time.perf_counter()
            wait = first = 0.0
            steps = 0
            dali_before = dali_busy[0]
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                waited = time.perf_counter() - t0
                wait += waited
                if steps == 0:
                    first = waited
                if batch is None:
                    break
                step(batch)
                steps += 1
            epochs.append((time.perf_counter() - start, steps, wait, dali_busy[0] - dali_before, first, early))
            if epoch + 1 < args.epochs:
                batches, early = iter_model_batches(train_data, timed_augment, args.batch_size), True
            validate(iter_model_batches(val_data, augment_eval, args.batch_size))
        return epochs

    results: dict[str, list[Epoch]] = {"cached": [], "pipeline": []}
    for _ in range(args.rounds):
        results["cached"] += run_cached()
        results["pipeline"] += run_pipeline()

    def rate(name: str) -> float:
        return sum(r[1] for r in results[name]) / sum(r[0] for r in results[name])

    total = sum(r[0] for r in results["pipeline"])
    wait = sum(r[2] for r in results["pipeline"])
    dali = sum(r[3] for r in results["pipeline"])
    cold = [r[4] for r in results["pipeline"] if not r[5]]
    warm = [r[4] for r in results["pipeline"] if r[5]]
    print(f"{'contender':10s} {'steps/s':>8s} {'videos/s':>9s}")
    for name in ("cached", "pipeline"):
        print(f"{name:10s} {rate(name):8.2f} {rate(name) * args.batch_size:9.1f}")
    print(f"\npipeline training time: {100 * wait / total:.0f}% waiting for the next batch (Ray Data decode + "
          f"DALI, which run ahead in a background thread), {100 * (total - wait) / total:.0f}% training step; "
          f"the first batch of an epoch took {np.mean(cold):.2f} s when the epoch's input started with it "
          f"({len(cold)} epochs) and {np.mean(warm) if warm else float('nan'):.2f} s when it started before the "
          f"previous validation ({len(warm)} epochs); DALI was busy {100 * dali / total:.0f}% of the time, "
          f"overlapped with the step")
    print(f"{len(manifest)} train + {len(val_manifest)} validation videos x {args.frames} frames at {args.size}px, "
          f"batch {args.batch_size}, {args.rounds} blocks of {args.epochs} epochs per contender, {os.cpu_count()} "
          f"cores, torch threads {args.torch_threads}")
    print(f"input_vs_cached={rate('pipeline') / rate('cached'):.2f} data_wait_fraction={wait / total:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
