"""The Ray Train worker loop: one process per worker, DDP across workers, DALI on the worker's device.

Each epoch: train on this worker's shard of the streaming Ray Dataset, validate on its shard of the
held-out split (accuracy and GFLOPs per video, summed over workers), write a checkpoint atomically
and report. A restarted worker group (``FailureConfig``) or a resumed run (``--resume``) starts from
the last reported checkpoint: model, optimiser, schedule and epoch.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn

from adaptive import build_model
from pipelines.config import TrainConfig, from_dict
from pipelines.data.dali import AugmentConfig, ClipAugmenter
from pipelines.data.dataset import iter_model_batches

STATE_FILE = "state.pt"


class Objective(nn.Module):
    """``forward`` = the method's training loss, so DDP sees (and synchronises) the whole objective."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, clip: torch.Tensor, labels: torch.Tensor):
        return self.model.loss(clip, labels)


def build_method(config: TrainConfig, num_classes: int, method: str | None = None,
                 overrides: dict[str, Any] | None = None) -> nn.Module:
    """The configured model (or the full-frame reference with the same encoders); ``overrides``
    replace fields of the method's config on top of ``model.overrides`` (e.g. a baseline policy)."""
    method = method or config.model.method
    if method == "full_frame" and config.model.method != "full_frame":
        from adaptive.full_frame import FullFrameConfig

        reference = build_model(config.model.method, config.model.preset, num_classes=num_classes,
                                **config.model.overrides)
        return build_model("full_frame", FullFrameConfig.matching(reference.config))
    return build_model(method, config.model.preset, num_classes=num_classes,
                       **{**config.model.overrides, **(overrides or {})})


def optimizer_name(config: TrainConfig) -> str:
    name = config.optim.optimizer
    if name == "auto":
        return "adamw" if config.model.preset == "tiny" else "sgd"
    if name not in ("sgd", "adamw"):
        raise ValueError(f"optim.optimizer must be sgd, adamw or auto, not {name!r}")
    return name


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The model's per-component learning rates (fG, fL, fC, pi; AdaFocusV2 appendix B.2) with SGD +
    momentum, or AdamW for networks trained from scratch (see ``OptimConfig.optimizer``)."""
    weight_decay = getattr(getattr(model, "config", None), "weight_decay", 1e-4)
    groups = []
    for group in model.param_groups():
        group = dict(group)
        group["lr"] = group.get("lr", 0.01) * config.optim.lr_scale
        groups.append(group)
    if optimizer_name(config) == "adamw":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=config.optim.momentum, weight_decay=weight_decay)


def cosine_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    total = max(1, config.optim.epochs * steps_per_epoch)
    warmup = int(config.optim.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_state_atomically(path: str, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: a reader never sees half a file."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".state-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_state(directory: str) -> dict[str, Any]:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


ENCODERS = ("glance_encoder.", "local_encoder.")


def copy_encoders(source: dict[str, torch.Tensor], model: nn.Module) -> int:
    """Load the glance and local encoder weights of ``source`` (a full-frame model's state dict) into
    ``model``; every encoder tensor of ``model`` must be there with the same shape. Returns the count."""
    own = {k: v for k, v in model.state_dict().items() if k.startswith(ENCODERS)}
    missing = [k for k in own if k not in source or source[k].shape != own[k].shape]
    if not own or missing:
        raise ValueError(f"the full-frame reference's encoders do not fit this model ({len(missing)} of "
                         f"{len(own)} tensors missing or of another shape, e.g. {missing[:3]})")
    model.load_state_dict({k: source[k] for k in own}, strict=False)
    return len(own)


def say(message: str) -> None:
    """One line on the worker's stdout, which Ray streams to the driver once.

    Ray Train patches ``print`` in its workers to log through its logger, and also prints when
    ``sys.stdout`` is wrapped (as it is in Ray workers), so a plain ``print`` reached the driver twice."""
    stream = sys.__stdout__ or sys.stdout
    stream.write(message + "\n")
    stream.flush()


class Progress:
    """A text progress bar and throughput line, printed by rank 0 every few seconds."""

    def __init__(self, label: str, total: int, every: float = 5.0) -> None:
        self.label, self.total, self.every = label, max(total, 1), every
        self.start = self.last = time.perf_counter()

    def update(self, done: int, wait: float, loss: float, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        filled = min(20, int(20 * done / self.total))
        bar = "#" * filled + "." * (20 - filled)
        say(f"[{self.label}] [{bar}] {done}/{self.total} videos  {done / elapsed:.1f} videos/s  "
            f"data wait {100 * wait / elapsed:.0f}%  loss {loss:.3f}")


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def _maybe_crash(job: dict[str, Any], epoch: int, rank: int, world: int) -> None:
    """Fault injection for the recovery tests (``run.crash_after_epoch``): once, in the epoch after
    the given one, the last worker dies mid-epoch like an OOM-killed process would. It waits past
    two controller polls first so that the previous epoch's checkpoint is registered, as it would be
    for any worker that fails a while after its last report."""
    crash = job.get("crash_after_epoch")
    if crash is None or epoch != crash + 1 or rank != world - 1 or os.path.exists(job["crash_marker"]):
        return
    time.sleep(5.0)
    open(job["crash_marker"], "w").close()
    os._exit(1)


def _gather_node_ids() -> list[str]:
    """The Ray node id of every worker, in rank order."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        nodes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(nodes, node)
        return [str(n) for n in nodes]
    return [node]


def _autocast(device: torch.device, amp: str):
    if amp == "on" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    config = from_dict(loop_config["config"])
    job = loop_config["job"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(config.run.cpus_per_worker)))
    torch.manual_seed(config.run.seed)

    model = build_method(config, job["num_classes"], job["method"], job.get("model_overrides"))
    optimizer = make_optimizer(model, config)
    batch_size = config.optim.batch_size
    train_videos = int(job["train_videos"])
    steps_per_epoch = max(1, math.ceil(train_videos / world / batch_size))
    scheduler = cosine_schedule(optimizer, config, steps_per_epoch)
    epochs = int(job.get("epochs", config.optim.epochs))

    objective = ray.train.torch.prepare_model(
        Objective(model), parallel_strategy_kwargs={"find_unused_parameters": True})
    model = model.to(device)
    on_gpu = device.type == "cuda"
    augment_config = AugmentConfig(crop_size=config.data.crop_size, resize_size=config.data.size,
                                   scales=tuple(config.data.crop_scales or [config.data.crop_size / config.data.size]),
                                   flip=config.data.flip)
    augment_train = ClipAugmenter(augment_config, training=True, max_batch_size=batch_size,
                                  device_id=device.index if on_gpu else None, seed=config.run.seed + 7919 * rank)
    augment_eval = ClipAugmenter(augment_config, training=False, max_batch_size=batch_size,
                                 device_id=device.index if on_gpu else None)
    nodes = _gather_node_ids()
    mlflow_client = None
    if rank == 0 and job.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        mlflow_client = MlflowClient(job["tracking_uri"])
        # Where the workers ran: checked by the multi-node test, useful when debugging placement.
        mlflow_client.set_tag(job["mlflow_run_id"], f"adastream.{job['label']}.worker_nodes", ",".join(nodes))

    if job.get("teacher_checkpoint") is not None:
        if not hasattr(model, "set_policy_teacher"):
            raise ValueError(f"model.policy_teacher: {job['method']} has no policy to teach")
        teacher = build_method(config, job["num_classes"], "full_frame")
        with job["teacher_checkpoint"].as_directory() as directory:
            teacher.load_state_dict(load_state(directory)["model"])
        model.set_policy_teacher(teacher.to(device).eval())
        if rank == 0:
            say(f"[{job['label']}] the full-frame reference teaches the policy where to look")

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and job.get("init_checkpoint") is not None:
        with job["init_checkpoint"].as_directory() as directory:
            copied = copy_encoders(load_state(directory)["model"], model)
        if rank == 0:
            say(f"[{job['label']}] {copied} encoder tensors taken from the full-frame reference")
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
        if rank == 0:
            say(f"[{job['label']}] resuming from the checkpoint of epoch {start_epoch}")
            if mlflow_client is not None:
                mlflow_client.log_metric(job["mlflow_run_id"], job.get("metric_prefix", "") + "resumed_at_epoch",
                                         start_epoch, step=start_epoch)

    def train_batches():
        return iter_model_batches(ray.train.get_dataset_shard("train"), augment_train, batch_size)

    next_batches = None
    for epoch in range(start_epoch, epochs):
        # ---- train on this worker's shard
        objective.train()
        progress = Progress(f"{job['label']} epoch {epoch + 1}/{epochs}", math.ceil(train_videos / world))
        seen = 0
        loss_sum = 0.0
        wait = 0.0
        started = time.perf_counter()
        batches = next_batches if next_batches is not None else train_batches()
        next_batches = None
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - t0
            if batch is None:
                break
            with _autocast(device, config.optim.amp):
                loss, _logs = objective(batch["video"], batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            n = len(batch["label"])
            seen += n
            loss_sum += float(loss.detach()) * n
            if rank == 0:
                progress.update(seen, wait, loss_sum / seen)
            _maybe_crash(job, epoch, rank, world)
        train_time = time.perf_counter() - started
        if epoch + 1 < epochs:
            # The next epoch's input starts now (plan, first decode tasks, first DALI batches): that
            # start-up then overlaps validation and the checkpoint instead of stalling its first step.
            next_batches = train_batches()

        # ---- validate on this worker's shard of the held-out split
        objective.eval()
        correct = 0.0
        count = 0.0
        macs = 0.0
        with torch.no_grad(), _autocast(device, config.optim.amp):
            for batch in iter_model_batches(ray.train.get_dataset_shard("val"), augment_eval, batch_size):
                out = model(batch["video"])
                correct += float((out.logits[:, -1].argmax(-1) == batch["label"]).sum())
                count += len(batch["label"])
                macs += float(out.flops.sum())
        totals = _all_reduce([seen, loss_sum, wait, train_time, correct, count, macs], device)
        seen_all, loss_all, wait_all, time_all, correct_all, count_all, macs_all = totals
        metrics = {
            "epoch": epoch,
            "train_loss": loss_all / max(seen_all, 1),
            "train_videos": seen_all,
            "videos_per_s": seen_all / max(time_all / world, 1e-9),
            "data_wait_fraction": wait_all / max(time_all, 1e-9),
            "val_accuracy": correct_all / max(count_all, 1),
            "val_gflops_per_video": macs_all / max(count_all, 1) / 1e9,
            "val_videos": count_all,
            "lr": optimizer.param_groups[0]["lr"],
        }
        if rank == 0:
            say(f"[{job['label']}] epoch {epoch + 1}/{epochs}: loss {metrics['train_loss']:.3f}  "
                f"val acc {metrics['val_accuracy']:.3f}  {metrics['val_gflops_per_video']:.3f} GFLOPs/video  "
                f"{metrics['videos_per_s']:.1f} videos/s  data wait {100 * metrics['data_wait_fraction']:.0f}%")
            if mlflow_client is not None:
                prefix = job.get("metric_prefix", "")
                for key, value in metrics.items():
                    if key != "epoch":
                        mlflow_client.log_metric(job["mlflow_run_id"], prefix + key, float(value), step=epoch)
            with tempfile.TemporaryDirectory() as directory:
                save_state_atomically(os.path.join(directory, STATE_FILE), {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch,
                })
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
