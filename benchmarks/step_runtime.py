#!/usr/bin/env python
"""The live server's forward pass, eager vs TorchScript (``pipelines/serve/engine.py``, ``trace_step``).

Times ``StepEngine.run`` -- what a serving replica does per batch: stack the frames, normalise, one
recurrent step, hand back each stream's state -- for batches of 1 to 16 streams, the eager step and the
traced one side by side: rounds alternate between the two, and each takes the median of its rounds (the
machines here are noisy). Then a sequence of mixed batch sizes, as a server under changing load sends
them (a trace serves every batch size; this checks it stays fast when they alternate).

    python benchmarks/step_runtime.py                       # the demo's registered model (make demo)
    python benchmarks/step_runtime.py --model runs:/<run>/model --threads 2

The last line holds ``name=value`` pairs: ms per pass for each batch size and runtime, and the speed-ups.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.registry import load_registered_model  # noqa: E402
from pipelines.serve.config import absolute_tracking_uri  # noqa: E402
from pipelines.serve.engine import StepEngine, StepRequest  # noqa: E402


def time_passes(engine: StepEngine, batches: list[list[StepRequest]]) -> list[float]:
    """ms per pass, each batch once, in order."""
    times = []
    for batch in batches:
        started = time.perf_counter()
        engine.run(batch)
        times.append((time.perf_counter() - started) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/adastream-adafocus_v2@demo")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--passes", type=int, default=40, help="passes per round and batch size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's torch_threads)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    loaded = load_registered_model(args.model, tracking_uri=absolute_tracking_uri(args.tracking_uri))
    engines = {"eager": StepEngine(loaded.model, trace=False), "traced": StepEngine(loaded.model, trace=True)}
    if engines["traced"].runtime != "torchscript":
        print(f"the trace was refused: {engines['traced'].runtime_note}")
        return 1
    size = int(loaded.model.input_size)
    rng = np.random.default_rng(0)

    def batch(n: int, tag: str) -> list[StepRequest]:
        # Streams part-way through a window: a state from an earlier step, as most passes carry.
        frames = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        first = engines["eager"].run([StepRequest(f"{tag}{i}", frames[i]) for i in range(n)])
        return [StepRequest(f"{tag}{i}", frames[i], first[i].state) for i in range(n)]

    print(f"{args.model} ({loaded.method}, {size}x{size} frames), {args.threads} torch thread(s), "
          f"{args.rounds} alternating rounds of {args.passes} passes per batch size; median ms per pass")
    pairs: dict[str, float] = {}
    for n in args.batch_sizes:
        requests = batch(n, "s")
        medians: dict[str, list[float]] = {"eager": [], "traced": []}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                medians[name].append(statistics.median(time_passes(engine, [requests] * args.passes)))
        eager, traced = statistics.median(medians["eager"]), statistics.median(medians["traced"])
        print(f"  batch {n:3d}: eager {eager:7.2f} ms  traced {traced:7.2f} ms  -> {eager / traced:.2f}x")
        pairs.update({f"eager_ms_b{n}": round(eager, 3), f"traced_ms_b{n}": round(traced, 3),
                      f"speedup_b{n}": round(eager / traced, 3)})

    # Mixed batch sizes, one sequence for both runtimes.
    sizes = rng.integers(1, max(args.batch_sizes) + 1, args.passes * 4)
    pool = batch(int(max(sizes)), "m")
    sequence = [pool[:n] for n in sizes]
    totals: dict[str, list[float]] = {"eager": [], "traced": []}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            totals[name].append(sum(time_passes(engine, sequence)))
    eager, traced = statistics.median(totals["eager"]), statistics.median(totals["traced"])
    print(f"  {len(sequence)} passes of mixed sizes (1-{max(sizes)}, mean {sizes.mean():.1f}): eager {eager:.0f} ms, "
          f"traced {traced:.0f} ms -> {eager / traced:.2f}x")
    pairs["speedup_mixed"] = round(eager / traced, 3)
    print(" ".join(f"{k}={v}" for k, v in pairs.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
