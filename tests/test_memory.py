"""A dataset several times larger than the object store streams through without OOM or unbounded spilling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_dataset_larger_than_the_object_store(tmp_path):
    from pipelines.data.synthetic import generate_benchmark

    manifest = generate_benchmark(tmp_path / "big", videos=240, frames=32, size=128, seed=9, workers=2)
    store = 100 * 1024 * 1024
    done = subprocess.run([sys.executable, str(REPO / "tests" / "memory_probe.py"), str(manifest), str(store)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["videos"] == 240
    assert result["decoded_bytes"] > 3 * store  # the data really is several times the store
    assert 0 < result["peak_mib"] * 1024 * 1024 <= store  # never more than the store holds
    assert result["spilled_mib"] * 1024 * 1024 < 0.25 * result["decoded_bytes"]  # back-pressure, not spilling
