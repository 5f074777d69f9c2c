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
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np
import torch

from adaptive.interface import stack_states
from pipelines.serve.frames import to_model_input
from pipelines.serve.threads import name_os_thread

StateArrays = dict[str, np.ndarray]


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


class StepEngine:
    """Runs ``model.step`` for a list of requests, batching them (one frame per stream per pass)."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", replica: str = "") -> None:
        if not getattr(model, "streaming", True):
            # Whole-clip methods (AdaFrame, AdaFocusV3, Ada3D) need a buffering engine that calls
            # forward() at the end of a window; they plug in here when they arrive.
            raise NotImplementedError(f"{type(model).__name__} is not a streaming model; "
                                      "the live server needs model.step()")
        self.model = model.eval()
        self.device = torch.device(device)
        self.replica = replica
        self._fresh: dict[str, torch.Tensor] = {k: v.to("cpu") for k, v in model.init_state(1, self.device).items()}
        self._warm_up()

    def _warm_up(self) -> None:
        """One throw-away step, so the first stream does not pay for lazy initialisation (allocator,
        kernel selection, FLOP counting)."""
        size = int(getattr(self.model, "input_size", 0) or 0)
        if size:
            self.run([StepRequest("warm-up", np.zeros((size, size, 3), dtype=np.uint8))])

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
        out = self.model.step(frames, state)
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
