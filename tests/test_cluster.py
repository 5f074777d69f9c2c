"""On a real multi-node Ray cluster: `ray job submit` of the training job to a local head plus a
worker node (two raylets on this machine), with one training worker placed on each node."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _env_from_file(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^export ([A-Z_]+)=(.*)$", path.read_text(), flags=re.M))


@pytest.fixture
def two_node_cluster():
    # Ray's socket paths live under the state dir and must stay under 108 bytes: keep it short.
    state = Path(tempfile.mkdtemp(prefix="ars-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run([str(REPO / "cluster" / "start_local_cluster.sh"), "--workers", "1", "--port", "auto",
                            "--dashboard-port", "auto", "--state-dir", str(state)],
                           capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    try:
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        yield {**env, **_env_from_file(state / "local_cluster" / "env.sh")}
    finally:
        subprocess.run([str(REPO / "cluster" / "stop_local_cluster.sh"), "--state-dir", str(state), "--clean"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
        shutil.rmtree(state, ignore_errors=True)


def test_ray_job_submit_trains_on_two_nodes(two_node_cluster, training_set, tmp_path):
    env = two_node_cluster
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = ('{"env_vars": {"MLFLOW_TRACKING_URI": "%s", "RAY_AUTH_MODE": "disabled"}}' % tracking)
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--working-dir", str(REPO), "--runtime-env-json", runtime_env, "--",
         "python", "pipelines/train.py", "--config", "configs/ci.yaml", f"data.manifest={training_set}",
         f"run.storage_path={tmp_path / 'runs'}", "run.name=two-nodes", "run.num_workers=2",
         "run.worker_resources.node_slot=1", "eval.train_full_frame=false", "eval.baselines=[]",
         "eval.trained_baselines=[]"],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "succeeded" in submit.stdout.lower()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("adastream")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`adastream.run_name` = 'two-nodes'")
    nodes = run.data.tags["adastream.adafocus_v2.worker_nodes"].split(",")
    assert len(nodes) == 2 and len(set(nodes)) == 2  # one DDP worker on each node
    assert "val_accuracy" in run.data.metrics
    assert client.get_model_version_by_alias("adastream-adafocus_v2", "demo").run_id == run.info.run_id
