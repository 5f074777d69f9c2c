"""Computation accounting in multiply-adds (MACs).

Unit.  The papers report "GFLOPs" meaning billions of *multiply-add*
operations (AdaFocusV3 says so explicitly: "the average number of multiply-add
operations required for processing a video"; ResNet-50 at 224x224 = 4.1
"GFLOPs").  ``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per
multiply-add, so everything here divides its total by 2 and is named ``*macs``.
Reports print ``GFLOPs`` = MACs / 1e9, the papers' convention.

What is counted.  FlopCounterMode counts the operators that carry the
arithmetic -- convolutions, matrix products (linear layers, GRU gates),
attention -- and not element-wise work (batch-norm, activations, pooling,
additions, interpolation).  This is the convention of the papers' counters;
the bilinear crop (4 MACs per patch value, ~0.05 MMACs for 3x64x64) is thus
not included.

Measured, not estimated.  :func:`count_macs` runs the actual module once on a
dummy batch of one under FlopCounterMode.  Models build a :class:`FlopsProfile`
from such measurements (glance per frame, policy per step, local encoder per
patch, classifier per step) and return per-step MACs with every prediction, so
the cost of a video is the exact sum over the steps it actually ran.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "eval_mode", "FlopsProfile", "gflops"]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put ``module`` in eval mode (no batch-norm statistics updates), restoring each submodule's flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Multiply-adds of one call ``fn(*args, **kwargs)`` (no grad; modules put in eval mode)."""
    ctx = eval_mode(fn) if isinstance(fn, nn.Module) else contextlib.nullcontext()
    with ctx, torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    total = counter.get_total_flops()
    assert total % 2 == 0, "FlopCounterMode counts 2 FLOPs per multiply-add"
    return total // 2


def gflops(macs: float | torch.Tensor) -> float | torch.Tensor:
    """MACs -> 'GFLOPs' as the papers report them (billions of multiply-adds)."""
    return macs / 1e9


@dataclass
class FlopsProfile:
    """Per-component and per-step cost of a model, in multiply-adds.

    components: MACs of one call of each component, e.g.
        ``{"glance": ..., "policy": ..., "local": ..., "classifier": ...}``.
    steps: MACs spent at each step of a clip (``len == num_steps``); the cost
        of a video that stops after step k (0-based) is ``sum(steps[:k+1])``.
    notes: free-text provenance (input sizes, what is and is not counted).
    """

    components: dict[str, int]
    steps: list[int]
    notes: dict[str, str] = field(default_factory=dict)
    unit: str = "multiply-adds"

    @property
    def total(self) -> int:
        """MACs of a video that runs every step."""
        return int(sum(self.steps))

    def cumulative(self) -> list[int]:
        out, acc = [], 0
        for s in self.steps:
            acc += s
            out.append(acc)
        return out

    def steps_tensor(self, device=None) -> torch.Tensor:
        return torch.tensor(self.steps, dtype=torch.float64, device=device)

    def table(self) -> str:
        lines = [f"{'component':<20}{'GFLOPs (MACs)':>16}"]
        for name, v in self.components.items():
            lines.append(f"{name:<20}{v / 1e9:>16.5f}")
        lines.append(f"{'per video (all steps)':<20}{self.total / 1e9:>16.5f}")
        return "\n".join(lines)
