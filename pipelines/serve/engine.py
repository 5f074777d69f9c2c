"""The model side of serving: one recurrent step for a batch of streams, one frame each.

The reference design is Triton's sequence batcher: requests of many sequences are batched, never two
of the same sequence, and each carries its sequence's state. Here the state travels *with* the request
(:class:`StepRequest.state`, a few KB of numpy arrays: the policy's GRU state, the classifier's pooled
features and the step count) and comes back updated in :class:`StepResult`. A recognizer replica
therefore holds nothing about any stream: batches can mix streams freely, any replica can serve the
next frame of any stream, and a replica that dies loses nothing -- the caller resends the same request
(same frame, same state) elsewhere.

:class:`StepEngine` is plain PyTorch (no Ray), used by the Serve deployment, by ``predict.py`` and as
the in-process baseline of ``benchmarks/serve_load.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np
import torch

from adaptive.interface import State, StepOutput, stack_states
from pipelines.serve.frames import to_model_input
from pipelines.serve.threads import name_os_thread

StateArrays = dict[str, np.ndarray]
StepFunction = Callable[[torch.Tensor, State], StepOutput]

logger = logging.getLogger(__name__)


@dataclass
class StepRequest:
    stream: str
    """Stream id (for bookkeeping and the one-frame-per-stream rule)."""
    frame: np.ndarray
    """uint8 ``[crop, crop, 3]`` RGB: the transformed frame."""
    state: StateArrays | None = None
    """The stream's recurrent state after its previous step in this window; None starts a window."""


@dataclass
class StepResult:
    logits: np.ndarray
    """float32 ``[K]``: the prediction p_t (pre-softmax) after this frame."""
    state: StateArrays
    macs: float
    """Multiply-adds this step spent."""
    box: list[float]
    """The patch the policy chose, normalised ``x1, y1, x2, y2``."""
    batch_size: int = 1
    replica: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def state_to_arrays(state: dict[str, torch.Tensor]) -> list[StateArrays]:
    """A batched model state -> one dict of numpy arrays (batch 1) per stream."""
    host = {k: v.detach().to("cpu").numpy() for k, v in state.items()}
    batch = next(iter(host.values())).shape[0]
    return [{k: v[i:i + 1].copy() for k, v in host.items()} for i in range(batch)]


class _FlatStep(torch.nn.Module):
    """``model.step`` with tensors in and out only (what the tracer records): ``frames, *state`` ->
    ``logits, flops, *state, *extra``, each dict flattened in a fixed key order."""

    def __init__(self, model: torch.nn.Module, state_keys: list[str], extra_keys: list[str]) -> None:
        super().__init__()
        self.model, self.state_keys, self.extra_keys = model, state_keys, extra_keys

    def forward(self, frames: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.step(frames, dict(zip(self.state_keys, state)))
        return (out.logits, out.flops, *(out.state[k] for k in self.state_keys),
                *(out.extra[k] for k in self.extra_keys))


def trace_step(model: torch.nn.Module, device: torch.device, rtol: float = 1e-3,
               atol: float = 1e-4) -> tuple[StepFunction | None, str]:
    """``model.step`` as a TorchScript trace optimised for inference, or None and why not.

    Why: a recurrent step of a small model is dozens of small operators (the demo model: 40
    convolutions, 39 batch norms), and in eager mode Python's dispatch between them costs about as
    much as the arithmetic. ``optimize_for_inference`` also folds the batch norms into the
    convolutions, and the whole pass runs in C++ without taking the GIL back between operators.
    Measured with the demo model on one CPU thread, a whole engine pass (``benchmarks/step_runtime.py``):
    5.9 -> 3.8 ms for 1 frame, 9.1 -> 5.4 ms for 4, 18.1 -> 12.2 ms for 16.

    Why TorchScript although PyTorch deprecates it: on the same model, the bare step for 1 / 4 / 8
    frames took 3.0 / 5.4 / 7.2 ms with ``torch.compile`` against 3.1 / 4.3 / 6.4 ms traced, and
    ``torch.compile`` needs a C++ toolchain and 50 s of compiling per replica start; ``torch.export``'s
    module ran slower than eager.

    A trace records one path through the Python code: a step whose control flow depends on the values
    or the batch size would be traced wrongly. So the trace is checked against the eager step at two
    other batch sizes, from a state an eager step produced; if any output differs, the eager step it is.
    Call after one eager step (which measures the model's MACs: no FLOP counter runs inside a trace).
    """
    size = int(getattr(model, "input_size", 0) or 0)
    if not size:
        return None, "the model has no input_size"
    generator = torch.Generator().manual_seed(0)

    def example(batch: int) -> tuple[torch.Tensor, StepOutput]:
        """Frames and the output of a first step on them, whose state is one past step 0."""
        frames = torch.randn(batch, 3, size, size, generator=generator).to(device)
        return frames, model.step(frames, model.init_state(batch, device))

    try:
        with torch.no_grad():
            frames, first = example(2)
            state = first.state
            state_keys = list(state)
            extra_keys = [k for k, v in first.extra.items() if isinstance(v, torch.Tensor)]
            flat = _FlatStep(model, state_keys, extra_keys).eval()
            with warnings.catch_warnings():
                # TorchScript's deprecation notice (see above) and the tracer's notes on Python values
                # it records as constants (the shape checks); the check below is what decides.
                warnings.simplefilter("ignore")
                traced = torch.jit.optimize_for_inference(
                    torch.jit.trace(flat, (frames, *(state[k] for k in state_keys)), check_trace=False))

            def step(frames: torch.Tensor, state: State) -> StepOutput:
                out = traced(frames, *(state[k] for k in state_keys))
                n = len(state_keys)
                return StepOutput(out[0], dict(zip(state_keys, out[2:2 + n])), out[1],
                                  dict(zip(extra_keys, out[2 + n:])))

            for batch in (1, 3):
                frames, first = example(batch)
                want, got = model.step(frames, first.state), step(frames, first.state)
                pairs = [("logits", want.logits, got.logits), ("flops", want.flops, got.flops)]
                pairs += [(f"state {k}", want.state[k], got.state[k]) for k in state_keys]
                pairs += [(f"extra {k}", want.extra[k], got.extra[k]) for k in extra_keys]
                for name, a, b in pairs:
                    if a.shape != b.shape or not torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol):
                        return None, f"the trace's {name} differs from the eager step's at batch size {batch}"
    except Exception as error:  # noqa: BLE001 - any failure to trace leaves the eager step, which works
        return None, f"tracing failed: {type(error).__name__}: {error}"
    return step, ""


class StepEngine:
    """Runs ``model.step`` for a list of requests, batching them (one frame per stream per pass).

    ``trace``: run the step as a TorchScript trace (:func:`trace_step`) when it reproduces the eager
    step; ``runtime`` says which one runs (``torchscript`` or ``eager``) and ``runtime_note`` why eager.
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", replica: str = "",
                 trace: bool = True) -> None:
        if not getattr(model, "streaming", True):
            # Whole-clip methods (AdaFrame, AdaFocusV3, Ada3D) need a buffering engine that calls
            # forward() at the end of a window; they plug in here when they arrive.
            raise NotImplementedError(f"{type(model).__name__} is not a streaming model; "
                                      "the live server needs model.step()")
        self.model = model.eval()
        self.device = torch.device(device)
        self.replica = replica
        self._fresh: dict[str, torch.Tensor] = {k: v.to("cpu") for k, v in model.init_state(1, self.device).items()}
        self._step_function: StepFunction = self.model.step
        self.runtime, self.runtime_note = "eager", "not asked to trace"
        self._warm_up()
        if trace:
            traced, self.runtime_note = trace_step(self.model, self.device)
            if traced is None:
                logger.warning("StepEngine: running %s eagerly: %s", type(model).__name__, self.runtime_note)
            else:
                self._step_function, self.runtime = traced, "torchscript"
                self._warm_up()

    def _warm_up(self) -> None:
        """Throw-away steps, so the first streams do not pay for lazy initialisation (allocator, kernel
        selection, FLOP counting, TorchScript's profiling runs)."""
        size = int(getattr(self.model, "input_size", 0) or 0)
        if not size:
            return
        for batch in (1, 2, 1):
            self.run([StepRequest(f"warm-up-{i}", np.zeros((size, size, 3), dtype=np.uint8)) for i in range(batch)])

    @torch.inference_mode()
    def run(self, requests: list[StepRequest]) -> list[StepResult]:
        """Results in request order. Requests of the same stream go to successive passes, in order
        (the server never sends two at once; this keeps the engine correct if someone else does)."""
        results: list[StepResult | None] = [None] * len(requests)
        remaining = list(range(len(requests)))
        carried: dict[str, StateArrays] = {}
        while remaining:
            seen: set[str] = set()
            this_pass, later = [], []
            for i in remaining:
                (later if requests[i].stream in seen else this_pass).append(i)
                seen.add(requests[i].stream)
            batch = [requests[i] for i in this_pass]
            states = [carried.get(r.stream, r.state) for r in batch]
            for i, result in zip(this_pass, self._step(batch, states)):
                results[i] = result
                carried[requests[i].stream] = result.state
            remaining = later
        return [r for r in results if r is not None]

    def _step(self, batch: list[StepRequest], states: list[StateArrays | None]) -> list[StepResult]:
        started = time.perf_counter()
        frames = to_model_input(np.stack([r.frame for r in batch]), self.device)  # stack copies
        state = stack_states([self._state_tensors(s) for s in states])
        out = self._step_function(frames, state)
        logits = out.logits.float().to("cpu").numpy()
        macs = out.flops.to("cpu").numpy()
        boxes = out.extra.get("boxes")
        boxes = boxes.float().to("cpu").numpy() if boxes is not None else np.full((len(batch), 4), np.nan)
        new_states = state_to_arrays(out.state)
        compute_ms = round((time.perf_counter() - started) * 1e3, 3)
        began = time.time() - compute_ms / 1e3
        return [StepResult(logits=logits[i].copy(), state=new_states[i], macs=float(macs[i]),
                           box=[round(float(v), 4) for v in boxes[i]], batch_size=len(batch), replica=self.replica,
                           extra={"compute_ms": compute_ms, "began": began})
                for i in range(len(batch))]

    def _state_tensors(self, state: StateArrays | None) -> dict[str, torch.Tensor]:
        if state is None:
            return {k: v.to(self.device) for k, v in self._fresh.items()}
        if state.keys() != self._fresh.keys():
            raise ValueError(f"state keys {sorted(state)} do not match the model's {sorted(self._fresh)}")
        # torch.tensor copies: arrays that came through Ray's object store are read-only.
        return {k: torch.tensor(np.asarray(v), device=self.device) for k, v in state.items()}


def pass_in_thread(engine: StepEngine) -> Callable[[list[StepRequest]], Awaitable[list[StepResult]]]:
    """A pass function for :class:`StepBatcher`: ``engine.run`` in a thread of its own, so the event
    loop keeps receiving requests (they form the next batch) while a pass runs."""
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model", initializer=name_os_thread,
                                initargs=("model",))

    async def run(requests: list[StepRequest]) -> list[StepResult]:
        return await asyncio.get_running_loop().run_in_executor(thread, engine.run, requests)

    return run


class StepBatcher:
    """Opportunistic batching of step requests on an event loop: a pass takes every request that queued
    while the previous pass ran (up to ``max_batch_size``), so batches grow with the load and a lone
    stream never waits for company.

    Why not ``@serve.batch``: Ray Serve's batch queue (Ray 2.60) forms the next batch as soon as one
    request is queued and parks it behind the running one (``max_concurrent_batches``), so with a
    wait of 0 every pass holds a single frame however many are waiting -- measured: 60 pushed streams
    had batches of 1-3 frames and waited 220 ms in front of a recognizer that was idle 40 % of the
    time. Here a batch is cut only when a pass can start.

    ``run`` does the pass (:func:`pass_in_thread`, so that the loop keeps receiving requests meanwhile).
    Requests whose caller gave up (cancelled) are left out of the pass.

    ``wait_s`` > 0: when requests come more often than that (a moving average of the time between
    them), a pass that could start waits for company until its oldest request has waited ``wait_s``
    (or the batch is full). A forward pass of a small model costs nearly as much for one frame as for
    a few (the demo model on one CPU thread: about 5 ms for 1 frame, 8-9 ms for 3), so where frames
    arrive one at a time -- many streams after early exits -- this turns passes of one into passes of
    several for a little latency. A lone stream, or a few, never waits; under a load that keeps the
    model busy, requests queue during the running pass anyway and nothing waits either.
    """

    GAP_SMOOTHING = 0.1
    """Weight of the newest gap in the moving average of the time between requests."""

    def __init__(self, run: Callable[[list[StepRequest]], Awaitable[list[StepResult]]], max_batch_size: int,
                 wait_s: float = 0.0, observe: Callable[[int, float], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.run = run
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.observe = observe
        self.gap_s: float | None = None
        """Moving average of the time between requests."""
        self._last_arrival: float | None = None
        self._queue: deque[tuple[StepRequest, asyncio.Future[StepResult], float]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def step(self, request: StepRequest) -> StepResult:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        now = time.monotonic()
        if self._last_arrival is not None:
            gap = now - self._last_arrival
            self.gap_s = gap if self.gap_s is None else self.gap_s + self.GAP_SMOOTHING * (gap - self.gap_s)
        self._last_arrival = now
        future: asyncio.Future[StepResult] = loop.create_future()
        self._queue.append((request, future, now))
        assert self._arrived is not None
        self._arrived.set()
        return await future

    def _company_expected(self) -> bool:
        return self.wait_s > 0 and self.gap_s is not None and self.gap_s < self.wait_s

    def _cut(self) -> list[tuple[StepRequest, asyncio.Future[StepResult]]]:
        batch = []
        while self._queue and len(batch) < self.max_batch_size:
            request, future, _ = self._queue.popleft()
            if not future.done():  # a caller that gave up (timeout, stream closed) costs no compute
                batch.append((request, future))
        return batch

    async def _serve(self) -> None:
        assert self._arrived is not None
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if len(self._queue) < self.max_batch_size and self._company_expected():
                deadline = self._queue[0][2] + self.wait_s
                while len(self._queue) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except asyncio.TimeoutError:
                        break
            batch = self._cut()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await self.run([request for request, _ in batch])
            except asyncio.CancelledError:
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as error:  # noqa: BLE001 - the batch's callers get the error, the batcher lives on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            if self.observe is not None:
                self.observe(len(batch), (time.perf_counter() - started) * 1e3)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
