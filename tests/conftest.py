"""Shared fixtures: one local Ray instance per test session, real encoded videos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Local tests only: Ray 2.60 enables token auth by default. Never set this on a shared cluster.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The serving app's data plane for a server with a token (ServeConfig.high_throughput=auto), as
# `pipelines.serve.app.start` would start its own Ray: HAProxy + gRPC handles. The session's Ray must
# start with it; every test server has a token. ADASTREAM_TEST_SERVE_PROXY=python tests Serve's Python
# proxy instead.
if os.environ.get("ADASTREAM_TEST_SERVE_PROXY", "haproxy") == "haproxy":
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_VIDEOS = REPO.parent / "shared" / "videos"


def shared_videos() -> list[Path]:
    """The real third-party videos in ../shared/videos (mixed codecs, containers, sizes, rates)."""
    return sorted(p for p in SHARED_VIDEOS.glob("*") if p.suffix in {".mp4", ".avi", ".mkv", ".webm"})


@pytest.fixture(scope="session")
def shared_video_paths() -> list[Path]:
    videos = shared_videos()
    if not videos:
        pytest.fail(f"no videos in {SHARED_VIDEOS}: the suite needs the shared third-party videos")
    return videos


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session.

    More logical CPUs than the machine has cores, so Ray Train workers never leave Ray Data's decode
    tasks without a CPU slot (with 2 cores and two 1-CPU workers the job would wait forever).
    """
    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             object_store_memory=1024 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory) -> Path:
    """A small appearance-task synthetic benchmark (real H.264 files); returns its manifest path."""
    from pipelines.data.synthetic import generate_benchmark

    out = tmp_path_factory.mktemp("synthetic")
    return Path(generate_benchmark(out, videos=48, frames=16, size=64, seed=3, task="appearance", workers=2))


@pytest.fixture(scope="session")
def training_set(tmp_path_factory) -> Path:
    """A synthetic set at the tiny models' resolution (128 px decode, 112 px crops) for training runs."""
    from pipelines.data.synthetic import generate_benchmark

    out = tmp_path_factory.mktemp("training-set")
    return Path(generate_benchmark(out, videos=48, frames=16, size=128, seed=5, task="appearance", workers=2))


def run_train(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """``python pipelines/train.py ARGS`` in ``cwd`` (its own local Ray and MLflow store)."""
    import subprocess
    import sys

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("RAY_ADDRESS", None)  # its own local Ray, never a cluster another test started
    full_env.pop("MLFLOW_TRACKING_URI", None)  # its own MLflow store in cwd
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full_env)
