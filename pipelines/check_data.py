"""The data doctor: decode every video of a manifest through the training code path and say which are usable.

    python pipelines/check_data.py MANIFEST [--format auto|mmaction|kinetics|ssv2|folder|table]
                                   [--data-root DIR] [--split NAME] [--frames T] [--size S] [--json] [--ray]

Every entry goes through :func:`pipelines.data.dataset.decode_rows`, the function the Ray Data decode
tasks run, with the same :class:`~pipelines.data.decode.DecodeConfig`. By default it runs in local
processes (no cluster needed); ``--ray`` runs the very same Ray Data pipeline the trainer uses.

Prints a table of usable (ok / repaired) and skipped videos with reasons, or with ``--json`` one JSON
object ``{"ok": [{"path": ...}, ...], "skipped": [{"path": ..., "reason": ...}, ...]}``. Exits 0 when
at least one video is usable, 1 when none is, 2 when the manifest itself cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a script: make the repository importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data.dataset import PipelineConfig, build_clip_dataset, decode_manifest_locally
from pipelines.data.decode import OK, REPAIRED, SKIPPED, DecodeConfig
from pipelines.data.manifest import FORMATS, Manifest, ManifestError, load_manifest

STATUS_COLUMNS = ["path", "status", "reason"]


def check_manifest(manifest: Manifest, decode: DecodeConfig, *, use_ray: bool = False,
                   workers: int | None = None) -> list[dict]:
    """``[{"path", "status", "reason"}]`` for every row of the manifest, in manifest order."""
    if use_ray:
        batches = _ray_batches(manifest, decode)
    else:
        batches = decode_manifest_locally(manifest, decode, keep_skipped=True, workers=workers or os.cpu_count() or 1)
    by_path = {}
    for batch in batches:
        for path, status, reason in zip(batch["path"], batch["status"], batch["reason"]):
            by_path[str(path)] = {"path": str(path), "status": str(status), "reason": str(reason)}
    return [by_path[p] for p in manifest.table["path"] if p in by_path]


def _ray_batches(manifest: Manifest, decode: DecodeConfig) -> Iterator[dict]:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    dataset = build_clip_dataset(manifest, PipelineConfig(decode=decode), keep_skipped=True)
    yield from dataset.select_columns(STATUS_COLUMNS).iter_batches(batch_size=256, batch_format="numpy")


def render_table(results: list[dict]) -> str:
    width = min(max((len(r["path"]) for r in results), default=4), 70)
    lines = [f"{'status':9s} {'path':{width}s} reason", f"{'-' * 9} {'-' * width} {'-' * 6}"]
    order = {OK: 0, REPAIRED: 1, SKIPPED: 2}
    for r in sorted(results, key=lambda r: (order.get(r["status"], 3), r["path"])):
        path = r["path"] if len(r["path"]) <= width else "..." + r["path"][-(width - 3):]
        lines.append(f"{r['status']:9s} {path:{width}s} {r['reason']}")
    usable = sum(r["status"] != SKIPPED for r in results)
    repaired = sum(r["status"] == REPAIRED for r in results)
    lines.append(f"\n{usable} of {len(results)} videos usable ({repaired} repaired), "
                 f"{len(results) - usable} skipped")
    return "\n".join(lines)


def to_json(results: list[dict]) -> dict:
    ok = []
    for r in results:
        if r["status"] == SKIPPED:
            continue
        entry = {"path": r["path"]}
        if r["status"] == REPAIRED:
            entry["repaired"] = r["reason"]
        ok.append(entry)
    skipped = [{"path": r["path"], "reason": r["reason"]} for r in results if r["status"] == SKIPPED]
    return {"ok": ok, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", help="manifest file, SSv2 list, or a folder-per-class root")
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    parser.add_argument("--data-root", default=None, help="root that relative video paths are under")
    parser.add_argument("--labels-json", default=None, help="SSv2 labels.json (default: beside the list)")
    parser.add_argument("--split", default=None, help="check only this split")
    parser.add_argument("--frames", type=int, default=DecodeConfig.num_frames, help="T frames per clip")
    parser.add_argument("--size", type=int, default=DecodeConfig.size, help="short side after resizing")
    parser.add_argument("--workers", type=int, default=None, help="local decode processes (default: all cores)")
    parser.add_argument("--ray", action="store_true", help="run through the Ray Data pipeline")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    try:
        manifest = load_manifest(args.manifest, args.format, data_root=args.data_root,
                                 labels_json=args.labels_json)
    except (ManifestError, OSError, ValueError, KeyError) as error:
        print(f"check_data: cannot read manifest {args.manifest}: {error}", file=sys.stderr)
        return 2
    if args.split is not None:
        manifest = manifest.split(args.split)
    if len(manifest) == 0:
        print(f"check_data: {args.manifest} lists no videos" + (f" in split {args.split!r}" if args.split else ""),
              file=sys.stderr)
        return 1

    decode = DecodeConfig(num_frames=args.frames, size=args.size)
    results = check_manifest(manifest, decode, use_ray=args.ray, workers=args.workers)
    if args.json:
        print(json.dumps(to_json(results), indent=1))
    else:
        print(render_table(results))
    if not any(r["status"] != SKIPPED for r in results):
        print(f"check_data: none of the {len(results)} videos in {args.manifest} is usable", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
