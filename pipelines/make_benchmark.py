"""Generate the synthetic video benchmark (real H.264 .mp4 files and a manifest).

    python pipelines/make_benchmark.py --out data/synthetic                  # 2000 appearance videos
    python pipelines/make_benchmark.py --out data/synthetic_motion --task motion

Writes ``DIR/videos/<video_id>.mp4``, ``DIR/manifest.csv`` (``path,label,split,legible_fraction``),
``DIR/classes.json``, ``DIR/annotations.jsonl`` and ``DIR/benchmark.json``. Running it again with the
same parameters does nothing (``--force`` regenerates). What the two tasks are and why they are built
this way: ``docs/synthetic_benchmark.md`` and :mod:`pipelines.data.synthetic`.

From Python::

    from pipelines.make_benchmark import generate_benchmark
    manifest_csv = generate_benchmark("data/synthetic", videos=200, frames=16)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

try:
    from pipelines.data.synthetic import APPEARANCE_CLASSES, MOTION_CLASSES, TASKS, generate_benchmark
except ModuleNotFoundError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pipelines.data.synthetic import APPEARANCE_CLASSES, MOTION_CLASSES, TASKS, generate_benchmark

__all__ = ["generate_benchmark", "main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate the synthetic H.264 benchmark for adaptive video recognition.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--videos", type=int, default=2000, help="number of videos")
    parser.add_argument("--frames", type=int, default=32, help="frames per video")
    parser.add_argument("--size", type=int, default=128, help="frame side in pixels (square, multiple of 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed; same seed -> same bytes")
    parser.add_argument("--task", choices=TASKS, default="appearance",
                        help="appearance: class = fine glyph on a small moving object; "
                             "motion: class = the object's trajectory")
    parser.add_argument("--classes", type=int, default=8,
                        help=f"number of classes (appearance <= {len(APPEARANCE_CLASSES)}, "
                             f"motion <= {len(MOTION_CLASSES)})")
    parser.add_argument("--fps", type=int, default=16, help="frame rate written to the files")
    parser.add_argument("--cell", type=int, default=2,
                        help="glyph cell width in pixels (the glyph averages out under "
                             "2*cell box downsampling)")
    parser.add_argument("--crf", type=int, default=18, help="libx264 constant rate factor")
    parser.add_argument("--preset", default="veryfast", help="libx264 preset")
    parser.add_argument("--gop", type=int, default=16, help="keyframe interval in frames")
    parser.add_argument("--distractors", choices=("neutral", "other_classes"), default="neutral",
                        help="glyphs on distractor objects: non-class patterns (default) or other classes' "
                             "(a much harder relational task)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (does not change the output)")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    parser.add_argument("--quiet", action="store_true", help="only print the manifest path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    start = time.perf_counter()
    try:
        manifest = generate_benchmark(
            args.out, videos=args.videos, frames=args.frames, size=args.size, seed=args.seed,
            task=args.task, classes=args.classes, fps=args.fps, cell_px=args.cell, crf=args.crf,
            preset=args.preset, gop=args.gop, distractor_glyphs=args.distractors, workers=args.workers, force=args.force, log=log,
        )
    except ValueError as exc:  # bad parameters: a clear message, not a traceback
        print(f"make_benchmark: error: {exc}", file=sys.stderr)
        return 2
    log(f"manifest: {manifest}  (total {time.perf_counter() - start:.1f} s)")
    if args.quiet:
        print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
