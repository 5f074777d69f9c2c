"""The training job: Ray Data -> DALI -> Ray Train (DDP), tracked in MLflow.

    python pipelines/train.py                                    # embedded default: the tiny demo
    python pipelines/train.py --config configs/synthetic_tiny.yaml optim.epochs=3 run.num_workers=2
    ray job submit --working-dir . -- python pipelines/train.py --config configs/NAME.yaml
    python pipelines/train.py --resume RUN_NAME                  # continue a stopped run

With no arguments it generates the synthetic benchmark if missing, starts a local Ray instance,
trains the tiny AdaFocusV2 (and the full-frame reference on the same data), evaluates, solves the
early-exit thresholds on the held-out split, logs everything to MLflow and registers the model as
``models:/adastream-adafocus_v2@demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (also under `ray job submit --working-dir .`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from pipelines.config import ConfigError, TrainConfig, load_config
from pipelines.data.dataset import PipelineConfig, build_clip_dataset
from pipelines.data.decode import DecodeConfig
from pipelines.data.manifest import Manifest, load_manifest
from pipelines.data.report import remote_report

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Any config field can be overridden as key=value, e.g. optim.epochs=3")
    parser.add_argument("--config", help="experiment YAML (see configs/)")
    parser.add_argument("--method", help="model to train (adafocus_v2, full_frame, ...)")
    parser.add_argument("--resume", metavar="RUN_NAME", help="continue the stopped run of this name")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    return args, args.overrides


# --------------------------------------------------------------------------------------------- data


def _older_synthetic_benchmark(manifest_path: Path) -> bool:
    """True if ``manifest_path`` belongs to a synthetic benchmark made by an older generator (its
    ``benchmark.json`` says so); data without that file is the user's and is never touched."""
    from pipelines.data.synthetic import GENERATOR_VERSION

    try:
        meta = json.loads((manifest_path.parent / "benchmark.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("generator_version") != GENERATOR_VERSION


def ensure_dataset(config: TrainConfig) -> Manifest:
    manifest_path = Path(config.data.manifest)
    local = "://" not in config.data.manifest
    missing = local and not manifest_path.exists()
    if (missing or (local and _older_synthetic_benchmark(manifest_path))) and config.data.synthetic.generate_if_missing:
        from pipelines.data.synthetic import generate_benchmark

        synthetic = config.data.synthetic
        why = "" if missing else " (the one there was made by an older generator)"
        print(f"generating the synthetic benchmark into {manifest_path.parent}{why} ...", flush=True)
        generate_benchmark(manifest_path.parent, videos=synthetic.videos, frames=synthetic.frames,
                           size=synthetic.size, seed=synthetic.seed, task=synthetic.task, classes=synthetic.classes)
    return load_manifest(config.data.manifest, config.data.format, data_root=config.data.data_root)


def split_manifests(manifest: Manifest, config: TrainConfig) -> dict[str, Manifest]:
    splits = {"train": manifest.split(config.data.train_split), "val": manifest.split(config.data.val_split),
              "test": manifest.split(config.data.test_split)}
    if len(splits["train"]) == 0:
        raise SystemExit(f"{config.data.manifest}: no videos in the training split {config.data.train_split!r}")
    if len(splits["val"]) == 0:
        raise SystemExit(f"{config.data.manifest}: no videos in the held-out split {config.data.val_split!r}")
    if len(splits["test"]) == 0:
        print(f"note: no {config.data.test_split!r} split; reporting on the held-out split", flush=True)
        splits["test"] = splits["val"]
    return splits


def pipeline_config(config: TrainConfig, training: bool) -> PipelineConfig:
    decode = DecodeConfig(num_frames=config.data.frames, size=config.data.size, training=training,
                          coarse_to_fine=config.data.coarse_to_fine)
    return PipelineConfig(decode=decode, shuffle=training, seed=None if training else config.run.seed)


# --------------------------------------------------------------------------------------------- ray


def start_ray(config: TrainConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)  # `ray job submit` sets RAY_ADDRESS for the driver
        return
    cores = os.cpu_count() or 2
    # More logical CPUs than cores: Train workers hold theirs for the whole run, and the decode
    # tasks of Ray Data must always find a free slot or the job waits forever.
    num_cpus = config.run.local_num_cpus or cores + int(2 * config.run.num_workers * config.run.cpus_per_worker) + 2
    # The dashboard also serves the state API, which Ray Train's placement-group cleaner polls (without
    # it every poll logs a warning); it listens on 127.0.0.1:8265 only.
    ray.init(num_cpus=num_cpus, include_dashboard=True, object_store_memory=config.run.object_store_memory)


def use_gpu(config: TrainConfig) -> bool:
    import ray

    if config.run.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return str(config.run.use_gpu).lower() in ("true", "1", "yes", "on")


def fit(config: TrainConfig, job: dict[str, Any], run_name: str, datasets: dict[str, Any], gpu: bool):
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.training.worker import train_loop_per_worker

    resources = {"CPU": config.run.cpus_per_worker, **config.run.worker_resources}
    if gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=config.run.num_workers, use_gpu=gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path(config),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )
    return trainer.fit()


def policy_teacher(config: TrainConfig) -> bool:
    """Resolve ``model.policy_teacher`` (``auto`` / true / false) against the rest of the config."""
    from adaptive.interface import model_class

    setting = config.model.policy_teacher
    if isinstance(setting, str) and setting.lower() != "auto":
        raise ConfigError(f"model.policy_teacher must be auto, true or false, not {setting!r}")
    try:
        teachable = hasattr(model_class(config.model.method), "set_policy_teacher")
    except KeyError as error:
        raise ConfigError(str(error)) from None
    possible = config.eval.train_full_frame and config.model.method != "full_frame" and teachable
    if isinstance(setting, str):
        return possible
    if setting and not possible:
        raise ConfigError("model.policy_teacher needs the full-frame reference (eval.train_full_frame=true) "
                          "and a method with a policy; set model.policy_teacher=false to train without it")
    return bool(setting)


def initialise_from_reference(config: TrainConfig) -> bool:
    """``model.init_from_full_frame`` applies: no weight file is configured for either encoder."""
    if not config.model.init_from_full_frame:
        return False
    overrides = config.model.overrides
    return not any(isinstance(overrides.get(name), dict) and overrides[name].get("weights")
                   for name in ("glance", "local"))


def storage_path(config: TrainConfig) -> str:
    path = config.run.storage_path
    return path if "://" in path else str(Path(path).resolve())


# --------------------------------------------------------------------------------------------- mlflow


def tracking_uri(config: TrainConfig) -> str:
    uri = config.run.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Workers may run in another directory: pin the local store to an absolute path.
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def start_mlflow_run(config: TrainConfig, run_name: str, resume: bool) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(config))
    experiment = mlflow.set_experiment(config.run.experiment)
    if resume:
        found = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`adastream.run_name` = '{run_name}'",
                                   output_format="list")
        if found:
            mlflow.start_run(run_id=found[0].info.run_id)
            return found[0].info.run_id
    run = mlflow.start_run(run_name=run_name, tags={"adastream.run_name": run_name,
                                                     "adastream.method": config.model.method})
    params = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in config.flat().items()}
    items = list(params.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))
    return run.info.run_id


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        config = load_config(args.config, overrides)
    except (ConfigError, OSError, yaml.YAMLError) as error:
        print(f"train: bad configuration: {error}", file=sys.stderr)
        return 2
    if args.method:
        config.model.method = args.method
    try:
        config.model.policy_teacher = policy_teacher(config)  # logged and saved as resolved
    except ConfigError as error:
        print(f"train: bad configuration: {error}", file=sys.stderr)
        return 2
    if args.resume:
        config.run.name = args.resume
    run_name = config.run.name or f"{config.model.method}-{datetime.now():%Y%m%d-%H%M%S}"
    config.run.name = run_name
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return 0
    started = time.perf_counter()

    import ray
    import torch

    from pipelines.registry import register_model
    from pipelines.training.evaluation import analyse, evaluate_run, summary_table, write_artifacts

    manifest = ensure_dataset(config)
    splits = split_manifests(manifest, config)
    start_ray(config)
    gpu = use_gpu(config)
    run_id = start_mlflow_run(config, run_name, resume=bool(args.resume))
    import mlflow

    out_dir = Path(storage_path(config)) / run_name / "report" if "://" not in config.run.storage_path \
        else Path("outputs") / run_name
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (out_dir / "classes.json").write_text(json.dumps(manifest.classes, indent=1))
    mlflow.log_artifact(str(out_dir / "config.yaml"))
    mlflow.log_artifact(str(out_dir / "classes.json"))
    print(f"run {run_name}: {len(splits['train'])} train / {len(splits['val'])} held-out / {len(splits['test'])} test "
          f"videos, {manifest.num_classes} classes, {config.run.num_workers} worker(s) on "
          f"{'GPU' if gpu else 'CPU'}; MLflow run {run_id} at {tracking_uri(config)}", flush=True)

    report = remote_report()
    datasets = {"train": build_clip_dataset(splits["train"], pipeline_config(config, True), report=report),
                "val": build_clip_dataset(splits["val"], pipeline_config(config, False), report=report)}
    job = {"num_classes": manifest.num_classes, "train_videos": len(splits["train"]), "method": config.model.method,
           "label": config.model.method, "mlflow_run_id": run_id, "tracking_uri": tracking_uri(config),
           "epochs": config.optim.epochs, "metric_prefix": "",
           "crash_after_epoch": config.run.crash_after_epoch,
           "crash_marker": str(out_dir / ".crashed-once")}
    checkpoints = {"model": None, "full_frame": None}
    if config.eval.train_full_frame and config.model.method != "full_frame":
        # The reference trains first: with model.init_from_full_frame its encoders start the model.
        reference_job = dict(job, method="full_frame", label="full_frame", metric_prefix="full_frame/",
                             epochs=config.eval.full_frame_epochs or config.optim.epochs, crash_after_epoch=None)
        reference = fit(config, reference_job, f"{run_name}-full-frame", datasets, gpu)
        checkpoints["full_frame"] = reference.checkpoint
        if reference.checkpoint is not None and initialise_from_reference(config):
            job["init_checkpoint"] = reference.checkpoint
            print("the model's encoders start from the full-frame reference's (model.init_from_full_frame)",
                  flush=True)
        if reference.checkpoint is not None and config.model.policy_teacher:
            job["teacher_checkpoint"] = reference.checkpoint
            print("the full-frame reference teaches the policy where to look (model.policy_teacher)", flush=True)
    result = fit(config, job, run_name, datasets, gpu)
    checkpoints["model"] = result.checkpoint
    if result.checkpoint is None:
        print(f"train: the run produced no checkpoint ({result.error})", file=sys.stderr)
        return 1
    checkpoints["trained_baselines"] = {}
    for policy in config.eval.trained_baselines:
        # The same recipe and starting weights with a fixed patch policy and no teacher: what the
        # learned policy earns over never learning where to look (Table 7's baselines).
        baseline_job = {k: v for k, v in job.items() if k != "teacher_checkpoint"}
        baseline_job.update(label=f"{policy}_policy", metric_prefix=f"{policy}_policy/",
                            model_overrides={"policy": policy}, crash_after_epoch=None)
        baseline = fit(config, baseline_job, f"{run_name}-{policy}-policy", datasets, gpu)
        if baseline.checkpoint is None:
            print(f"train: the {policy}-policy baseline produced no checkpoint ({baseline.error})", file=sys.stderr)
            return 1
        checkpoints["trained_baselines"][policy] = baseline.checkpoint

    print("evaluating: per-step predictions on the held-out and test splits, baselines ...", flush=True)
    evaluate = ray.remote(evaluate_run).options(num_cpus=config.run.cpus_per_worker, num_gpus=1 if gpu else 0)
    outputs = ray.get(evaluate.remote(config.to_dict(), job, checkpoints,
                                      {"val": splits["val"], "test": splits["test"]}, report))
    evaluation = analyse(outputs["model"], outputs["baselines"], outputs["full_frame"], config.eval.budgets_gflops,
                         trained_baselines=outputs["trained_baselines"])
    files = write_artifacts(evaluation, outputs, out_dir, f"{config.model.method} on {Path(config.data.manifest).parent.name}")
    data_report = ray.get(report.to_dict.remote())
    (out_dir / "data_report.json").write_text(json.dumps(data_report, indent=1))
    files.append(out_dir / "data_report.json")
    table = summary_table(evaluation)
    (out_dir / "summary.txt").write_text(table + "\n")
    files.append(out_dir / "summary.txt")
    for path in files:
        mlflow.log_artifact(str(path), artifact_path="patches" if path.parent.name == "patches" else None)
    metrics = {f"test_{k}": float(v) for k, v in evaluation.headline.items() if v == v}
    for name, row in evaluation.steps_table.items():
        key = re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")  # MLflow metric names: no commas
        metrics.update({f"test_acc_{key}_{c.split(' ')[0].replace('=', '')}": float(v)
                        for c, v in row.items() if c.startswith("t=")})
    metrics["skipped_videos"] = float(data_report["counts"]["skipped"])
    metrics["repaired_videos"] = float(data_report["counts"]["repaired"])
    mlflow.log_metrics(metrics)

    from pipelines.training.worker import build_method, load_state

    model = build_method(config, manifest.num_classes)
    with result.checkpoint.as_directory() as directory:
        model.load_state_dict(load_state(directory)["model"])
    registered = config.run.registered_model.format(method=config.model.method)
    exits = json.loads((out_dir / "thresholds.json").read_text())
    info = register_model(model, method=config.model.method, classes=manifest.classes, exits=exits,
                          data={"frames": config.data.frames, "size": config.data.size,
                                "crop_size": config.data.crop_size, "coarse_to_fine": config.data.coarse_to_fine},
                          registered_name=registered, alias=config.run.model_alias, num_frames=config.data.frames)
    mlflow.end_run()

    print()
    print(f"data: {data_report['counts']['ok']} ok, {data_report['counts']['repaired']} repaired, "
          f"{data_report['counts']['skipped']} skipped"
          + "".join(f"\n  {i['status']} {i['path']}: {i['reason']}" for i in data_report["issues"]))
    print(table)
    print(f"\nregistered models:/{registered}@{config.run.model_alias} (version {info.registered_model_version}); "
          f"MLflow run {run_id}; artifacts in {out_dir}; {time.perf_counter() - started:.0f} s")
    torch.set_num_threads(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
