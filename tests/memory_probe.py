"""Stream a dataset several times larger than the object store through the training data path.

Run as a script by tests/test_memory.py (it needs its own Ray instance with a small object store).
Prints one JSON line: videos seen, decoded bytes, object store capacity, peak use and spilled bytes.
"""

from __future__ import annotations

import json
import re
import sys
import time

import ray
from ray._private.internal_api import memory_summary

from pipelines.data.dali import AugmentConfig, ClipAugmenter
from pipelines.data.dataset import PipelineConfig, build_clip_dataset, clip_bytes, iter_model_batches
from pipelines.data.decode import DecodeConfig
from pipelines.data.manifest import load_manifest


def _mib(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def main(manifest_path: str, store_bytes: int) -> None:
    ray.init(num_cpus=4, object_store_memory=store_bytes, include_dashboard=False, log_to_driver=False)
    manifest = load_manifest(manifest_path)
    config = PipelineConfig(decode=DecodeConfig(num_frames=32, size=128, training=True), shuffle=True,
                            target_block_bytes=8 * 1024 * 1024)
    dataset = build_clip_dataset(manifest, config)
    augment = ClipAugmenter(AugmentConfig(), training=True, max_batch_size=8, device_id=None)
    address = ray.get_runtime_context().gcs_address  # this instance, whatever else runs on the machine
    seen, peak = 0, 0.0
    for batch in iter_model_batches(dataset, augment, batch_size=8):
        seen += len(batch["label"])
        time.sleep(0.05)  # a consumer slower than the decoders: the stream must apply back-pressure
        stats = memory_summary(address=address, stats_only=True)
        peak = max(peak, _mib(r"Plasma memory usage ([\d.]+) MiB", stats))
    stats = memory_summary(address=address, stats_only=True)
    print(json.dumps({"videos": seen, "decoded_bytes": seen * clip_bytes(config.decode),
                      "store_bytes": store_bytes, "peak_mib": peak,
                      "spilled_mib": _mib(r"Spilled ([\d.]+) MiB", stats)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
