"""The training job end to end: real Ray Train, Ray Data, DALI (CPU), MLflow store and registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.config import ConfigError, load_config
from pipelines.training.worker import (build_method, copy_encoders, cosine_schedule, load_state, make_optimizer,
                                      save_state_atomically)
from tests.conftest import REPO, run_train

pytestmark = pytest.mark.slow

FAST = ["eval.train_full_frame=false", "eval.baselines=[]", "eval.trained_baselines=[]"]


def _mlflow(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")


def _runs(client, name):
    experiment = client.get_experiment_by_name("adastream")
    return client.search_runs([experiment.experiment_id], f"tags.`adastream.run_name` = '{name}'")


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def test_demo_configuration_end_to_end_and_mlflow_contents(training_set, tmp_path):
    # The demo configuration (shortened by ci.yaml): the policy teacher (explicit here, the default
    # anyway) and a model trained with random patches run through Ray Train too.
    done = run_train(["--config", str(REPO / "configs" / "ci.yaml"), f"data.manifest={training_set}",
                      "run.name=e2e", "model.policy_teacher=true"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Accuracy after t frames" in done.stdout and "flops_ratio_at_full_acc=" in done.stdout
    assert "videos/s" in done.stdout + done.stderr  # progress / throughput lines
    assert "teaches the policy where to look" in done.stdout + done.stderr
    assert "random policy, trained" in done.stdout  # a baseline model trained with random patches

    client = _mlflow(tmp_path)
    (run,) = _runs(client, "e2e")
    params = run.data.params
    assert params["optim.epochs"] == "1" and params["data.frames"] == "4" and params["model.method"] == "adafocus_v2"
    assert params["model.policy_teacher"] == "True"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert len(history) == 1 and 0.0 <= history[0].value <= 1.0
    for key in ("train_loss", "val_gflops_per_video", "videos_per_s", "data_wait_fraction",
                "full_frame/val_accuracy", "random_policy/val_accuracy", "test_acc_random_policy_trained_t1",
                "test_adafocus_accuracy", "test_full_frame_gflops", "skipped_videos"):
        assert key in run.data.metrics, key
    assert run.data.metrics["val_gflops_per_video"] < run.data.metrics["full_frame/val_gflops_per_video"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "classes.json", "accuracy_vs_gflops.png", "thresholds.json", "data_report.json",
            "summary.txt", "evaluation.json", "patches"} <= artifacts
    assert len(client.list_artifacts(run.info.run_id, "patches")) == 2
    local = Path(client.download_artifacts(run.info.run_id, "thresholds.json", str(tmp_path)))
    thresholds = json.loads(local.read_text())
    curve = thresholds["curve"]
    assert curve and all(len(p["thresholds"]) == 4 for p in curve)
    held_out = int(run.data.metrics["val_videos"])
    assert thresholds["heldout_videos"] == held_out > 0  # what the serving `auto` budget's tolerance uses

    version = client.get_model_version_by_alias("adastream-adafocus_v2", "demo")
    assert version.run_id == run.info.run_id
    from pipelines.registry import load_registered_model

    loaded = load_registered_model("models:/adastream-adafocus_v2@demo", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert loaded.classes == json.loads((training_set.parent / "classes.json").read_text())
    clip = torch.zeros(2, 4, 3, 112, 112)
    assert loaded.model(clip).logits.shape == (2, 4, len(loaded.classes))
    assert loaded.exits["curve"]


def test_killed_worker_is_recovered_from_the_last_checkpoint(training_set, tmp_path):
    done = run_train(["--config", str(REPO / "configs" / "ci.yaml"), f"data.manifest={training_set}",
                      "run.name=crash", "optim.epochs=2", "run.crash_after_epoch=0", "run.max_failures=1", *FAST],
                     tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "runs" / "crash" / "report" / ".crashed-once").exists()  # the worker did die
    client = _mlflow(tmp_path)
    run_id = _runs(client, "crash")[0].info.run_id
    assert [m.value for m in client.get_metric_history(run_id, "resumed_at_epoch")] == [1]
    history = client.get_metric_history(run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [0, 1]  # epoch 0 once (not retrained), then epoch 1


def test_resume_continues_a_stopped_run_with_the_same_state(training_set, tmp_path):
    args = ["--config", str(REPO / "configs" / "ci.yaml"), f"data.manifest={training_set}", "optim.epochs=2",
            "run.max_failures=0", *FAST]
    stopped = run_train(args + ["run.name=stop", "run.crash_after_epoch=0"], tmp_path)
    assert stopped.returncode != 0
    checkpoints = _checkpoints(tmp_path / "runs" / "stop")
    assert len(checkpoints) == 1
    saved = load_state(str(checkpoints[0]))
    assert saved["epoch"] == 0

    resumed = run_train(args + ["--resume", "stop"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    (run,) = _runs(_mlflow(tmp_path), "stop")  # the same MLflow run continued
    assert [m.value for m in _mlflow(tmp_path).get_metric_history(run.info.run_id, "resumed_at_epoch")] == [1]
    final = load_state(str(_checkpoints(tmp_path / "runs" / "stop")[-1]))
    assert final["epoch"] == 1
    assert final["scheduler"]["last_epoch"] == 2 * saved["scheduler"]["last_epoch"]  # steps continued, not restarted


def test_model_encoders_start_from_the_full_frame_reference():
    config = load_config(None, ["model.overrides={input_size: 64, glance_size: 32, patch_size: 32}"])
    torch.manual_seed(0)
    reference = build_method(config, 3, "full_frame")
    model = build_method(config, 3)
    copied = copy_encoders(reference.state_dict(), model)
    mine = model.state_dict()
    assert copied == sum(k.startswith(("glance_encoder.", "local_encoder.")) for k in mine) > 0
    for key, value in reference.state_dict().items():
        if key.startswith(("glance_encoder.", "local_encoder.")):
            assert torch.equal(mine[key], value)
    untouched = [k for k in mine if k.startswith(("policy.", "classifier."))]
    assert untouched and not any(k in reference.state_dict() and torch.equal(mine[k], reference.state_dict()[k])
                                 for k in untouched)
    other = build_method(load_config(None, ["model.overrides={input_size: 64, glance_size: 32, patch_size: 32, "
                                            "local: {base_width: 8}}"]), 3)
    with pytest.raises(ValueError, match="do not fit"):
        copy_encoders(reference.state_dict(), other)


def test_checkpoint_round_trip_restores_model_optimizer_and_schedule(tmp_path):
    from adaptive import build_model

    config = load_config(None, ["optim.epochs=2"])
    torch.manual_seed(0)
    model = build_model("adafocus_v2", "tiny", num_classes=3, input_size=64, glance_size=32, patch_size=32)
    optimizer = make_optimizer(model, config)
    scheduler = cosine_schedule(optimizer, config, steps_per_epoch=3)
    clip, labels = torch.randn(2, 2, 3, 64, 64), torch.tensor([0, 2])
    for _ in range(2):
        loss, _ = model.loss(clip, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    path = tmp_path / "state.pt"
    save_state_atomically(str(path), {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "scheduler": scheduler.state_dict(), "epoch": 0})
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left behind
    state = load_state(str(tmp_path))
    twin = build_model("adafocus_v2", "tiny", num_classes=3, input_size=64, glance_size=32, patch_size=32)
    twin_opt = make_optimizer(twin, config)
    twin_sched = cosine_schedule(twin_opt, config, steps_per_epoch=3)
    twin.load_state_dict(state["model"])
    twin_opt.load_state_dict(state["optimizer"])
    twin_sched.load_state_dict(state["scheduler"])
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)
    assert twin_sched.last_epoch == 2 and twin_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    # one more identical step keeps them identical: momentum buffers came back too
    for m, o in ((model, optimizer), (twin, twin_opt)):
        torch.manual_seed(1)
        loss, _ = m.loss(clip, labels)
        o.zero_grad()
        loss.backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_config_overrides_and_errors(tmp_path):
    (tmp_path / "exp.yaml").write_text("optim: {epochs: 9}\ndata: {frames: 12}\n")
    config = load_config(tmp_path / "exp.yaml", ["data.frames=5", "model.patch_size=48", "eval.baselines=[centre]"])
    assert (config.optim.epochs, config.data.frames, config.model.overrides, config.eval.baselines) == (
        9, 5, {"patch_size": 48}, ["centre"])
    config = load_config(None, ["model.init_from_full_frame=false", "model.policy_teacher=true"])
    assert (config.model.init_from_full_frame, config.model.policy_teacher, config.model.overrides) == (
        False, True, {})  # ModelConfig's own fields, not the method's overrides
    with pytest.raises(ConfigError, match="epoch"):
        load_config(None, ["optim.epoch=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["optim.epochs"])
    done = run_train(["optim.epochz=1"], tmp_path, timeout=60)
    assert done.returncode == 2 and "bad configuration" in done.stderr
    done = run_train(["model.policy_teacher=true", "eval.train_full_frame=false"], tmp_path, timeout=60)
    assert done.returncode == 2 and "policy_teacher needs the full-frame reference" in done.stderr


def test_policy_teacher_auto_follows_the_reference():
    """model.policy_teacher=auto (the default) is on exactly when the full-frame reference is trained
    for a method with a policy; the paper configs turn it off; nonsense is a config error."""
    from pipelines.train import policy_teacher

    assert policy_teacher(load_config(None)) is True
    assert policy_teacher(load_config(None, ["eval.train_full_frame=false"])) is False
    assert policy_teacher(load_config(None, ["model.method=full_frame"])) is False
    assert policy_teacher(load_config(None, ["model.policy_teacher=false"])) is False
    for name in ("kinetics_paper", "ssv2_paper"):
        assert policy_teacher(load_config(REPO / "configs" / f"{name}.yaml")) is False
    with pytest.raises(ConfigError, match="auto, true or false"):
        policy_teacher(load_config(None, ["model.policy_teacher=sometimes"]))
