"""The ``Recognizer`` deployment: the registered model behind an opportunistic batcher.

Each call is one frame of one stream with that stream's state (:class:`~pipelines.serve.engine.StepRequest`);
:class:`~pipelines.serve.engine.StepBatcher` gathers the calls that arrive while the previous forward
pass runs into the next one, and when frames come faster than ``batch_wait_timeout_s`` apart it waits
that long for company (a lone stream never waits); the pass runs in a thread, so the replica keeps
receiving requests meanwhile. Replicas are stateless with respect to streams; any number of them can
serve, and Serve restarts (or autoscales) them without any stream noticing more than a retry.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray import serve

from pipelines.serve.config import ServeConfig
from pipelines.serve.engine import StepBatcher, StepEngine, StepRequest, StepResult, pass_in_thread

logger = logging.getLogger("ray.serve")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def model_metadata(loaded: Any) -> dict[str, Any]:
    """What the ingress needs to know about the model (no weights)."""
    model = loaded.model
    step_macs = float(model.flops_per_step(loaded.num_frames)[0]) if loaded.num_frames else 0.0
    data = dict(loaded.data)
    warnings = []
    if data.get("coarse_to_fine"):
        warnings.append("the model was trained with frames in coarse-to-fine order (data.coarse_to_fine=true); "
                        "a live stream delivers them in natural order, so expect lower accuracy than reported")
    return {"method": loaded.method, "classes": list(loaded.classes), "num_frames": int(loaded.num_frames),
            "data": data, "input_size": int(model.input_size), "step_macs": step_macs, "exits": loaded.exits,
            "streaming": bool(getattr(model, "streaming", True)), "warnings": warnings}


@serve.deployment(name="Recognizer")
class Recognizer:
    """Loads the model from the MLflow registry once per replica and steps batches of streams."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        from pipelines.registry import load_registered_model

        torch.set_num_threads(config.torch_threads)
        self.config = config
        device = resolve_device(config.device)
        started = time.perf_counter()
        loaded = load_registered_model(config.model_uri, tracking_uri=config.tracking_uri, device=device)
        self.meta = model_metadata(loaded)
        self.meta["model_uri"] = config.model_uri
        for warning in self.meta["warnings"]:
            logger.warning("Recognizer: %s", warning)
        context = serve.get_replica_context()
        self.replica = context.replica_id.to_full_id_str()
        self.engine = StepEngine(loaded.model, device, replica=self.replica, trace=config.trace_model)
        self.meta["runtime"] = self.engine.runtime
        from pipelines.serve.metrics import RecognizerMetrics

        self.metrics = RecognizerMetrics()
        self.batcher = StepBatcher(pass_in_thread(self.engine), config.max_batch_size, config.batch_wait_timeout_s,
                                   observe=self.metrics.observe)
        logger.info("Recognizer %s: %s (%s, %d classes, T=%d) on %s, %s, in %.1f s", self.replica, config.model_uri,
                    loaded.method, len(loaded.classes), loaded.num_frames, device, self.engine.runtime,
                    time.perf_counter() - started)

    async def step(self, request: StepRequest) -> StepResult:
        """One frame of one stream; returns once the batch it joined has been stepped."""
        received = time.time()
        result = await self.batcher.step(request)
        result.extra["received"] = received  # the way here vs the wait for a pass: see StreamSession timing
        return result

    async def info(self) -> dict[str, Any]:
        return dict(self.meta, replica=self.replica)
