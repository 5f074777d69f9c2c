"""Early exit on per-step predictions: AdaFocusV2+ (section 3.4) and after.

A model gives a prediction p_t after every step t = 1..T.  The video exits at
the first t whose prediction is reliable enough:

* ``"confidence"`` (AdaFocusV2+): exit when ``max_j p_tj >= eta_t``;
* ``"entropy"`` (AdaFocusV3): exit when ``-sum_j p_tj log p_tj <= eta_t``;

and always at the last step (a zero confidence threshold / infinite entropy
threshold at t = T).  Its output is p_t and its cost the MACs of steps 1..t.

The thresholds solve Eq. (12),

    maximise Acc(eta_1, eta_2, ... | D)  s.t.  FLOPs(eta_1, eta_2, ... | D) <= B,

by the budgeted-classification procedure of MSDNet that the paper follows: fix
a target exit distribution ``q_k  ~  p^k`` (k = 1..T), then walk the steps; at
step k take, among the held-out samples that have not exited yet, the
``floor(N q_k)`` most confident ones and set eta_k to the confidence of the
last of them; those samples (and any others at or above eta_k) exit at k.
Sweeping ``p`` traces the whole accuracy-vs-GFLOPs curve; for a budget B, pick
the ``p`` with the best held-out accuracy whose held-out cost is <= B.

Everything works on saved outputs -- logits ``[N, T, K]`` and per-step MACs
``[T]`` or ``[N, T]`` (not cumulative) -- in plain torch, on any device.
Internally a criterion is turned into a *score* (higher = more certain:
confidence, or minus entropy) and a threshold on it; public thresholds are
in the criterion's own units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

__all__ = [
    "CRITERIA",
    "exit_scores",
    "ExitPolicy",
    "exit_steps",
    "ExitResult",
    "evaluate_exits",
    "geometric_exit_distribution",
    "solve_thresholds",
    "CurvePoint",
    "trace_curve",
    "thresholds_for_budget",
    "default_p_grid",
    "evaluate_fixed_steps",
    "evaluate_random_exits",
]

CRITERIA = ("confidence", "entropy")


def exit_scores(logits: torch.Tensor, criterion: str = "confidence") -> torch.Tensor:
    """``logits [..., K]`` -> certainty score ``[...]`` (higher = more certain)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    if criterion == "confidence":
        return logp.max(dim=-1).values.exp()  # max_j p_j
    if criterion == "entropy":
        return (logp.exp() * logp).sum(dim=-1)  # -H(p)
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")


def _to_score_threshold(thresholds: torch.Tensor, criterion: str) -> torch.Tensor:
    return thresholds if criterion == "confidence" else -thresholds


def _from_score_threshold(tau: torch.Tensor, criterion: str) -> torch.Tensor:
    return tau if criterion == "confidence" else -tau


@dataclass
class ExitPolicy:
    """Thresholds eta_1..eta_T in the criterion's units (last one always lets everything exit)."""

    thresholds: torch.Tensor
    criterion: str = "confidence"
    _score_thresholds: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}")
        self.thresholds = torch.as_tensor(self.thresholds, dtype=torch.float64).clone()
        self.thresholds[-1] = 0.0 if self.criterion == "confidence" else math.inf
        self._score_thresholds = tuple(float(v) for v in _to_score_threshold(self.thresholds, self.criterion))

    @property
    def num_steps(self) -> int:
        return int(self.thresholds.numel())

    def should_exit(self, logits_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """Streaming decision: ``logits_t [B, K]`` at 0-based step(s) ``t`` -> bool ``[B]``."""
        tau = _to_score_threshold(self.thresholds.to(logits_t.device), self.criterion)
        t = torch.as_tensor(t, device=logits_t.device).clamp(max=self.num_steps - 1)
        return exit_scores(logits_t, self.criterion) >= tau[t]

    def exits(self, logits: np.ndarray, t: int) -> bool:
        """:meth:`should_exit` for one prediction (``logits [K]`` at 0-based step ``t``), in NumPy.

        For a live server's event loop, which decides after every frame of every stream: a handful of
        small torch operators there cost more than the arithmetic, and freeing their tensors can wait
        for the GIL behind every decoding thread of the process."""
        z = np.asarray(logits, dtype=np.float64)
        logp = z - z.max()
        logp -= np.log(np.exp(logp).sum())  # log_softmax
        score = float(np.exp(logp.max())) if self.criterion == "confidence" else float((np.exp(logp) * logp).sum())
        return score >= self._score_thresholds[min(t, len(self._score_thresholds) - 1)]

    def to_dict(self) -> dict:
        return {"criterion": self.criterion, "thresholds": [float(v) for v in self.thresholds]}

    @classmethod
    def from_dict(cls, d: dict) -> "ExitPolicy":
        return cls(torch.tensor(d["thresholds"], dtype=torch.float64), d.get("criterion", "confidence"))


def exit_steps(logits: torch.Tensor, policy: ExitPolicy) -> torch.Tensor:
    """0-based exit step of every sample, ``[N]``: the first t whose score passes eta_t."""
    scores = exit_scores(logits, policy.criterion)  # [N, T]
    T = scores.shape[1]
    if T != policy.num_steps:
        raise ValueError(f"logits have {T} steps, policy has {policy.num_steps}")
    tau = _to_score_threshold(policy.thresholds.to(scores.device), policy.criterion)
    passed = scores >= tau
    passed[:, -1] = True
    return passed.double().argmax(dim=1)  # first True


def _step_macs(step_flops: torch.Tensor | Sequence[float], N: int, T: int, device) -> torch.Tensor:
    f = torch.as_tensor(step_flops, dtype=torch.float64, device=device)
    if f.dim() == 1:
        f = f.expand(N, T)
    if f.shape != (N, T):
        raise ValueError(f"step FLOPs must be [T] or [N, T] = [{N}, {T}], got {tuple(f.shape)}")
    return f


@dataclass
class ExitResult:
    """Outcome of exiting a set of samples: accuracy, mean MACs per video, exit histogram."""

    accuracy: float
    mean_macs: float
    exit_fraction: list[float]
    steps: torch.Tensor = field(repr=False)

    @property
    def gflops(self) -> float:
        return self.mean_macs / 1e9

    @property
    def mean_steps(self) -> float:
        return float(self.steps.double().mean() + 1)


def _result_from_steps(logits: torch.Tensor, labels: torch.Tensor, step_flops, steps: torch.Tensor) -> ExitResult:
    N, T, _ = logits.shape
    f = _step_macs(step_flops, N, T, logits.device).cumsum(dim=1)
    idx = torch.arange(N, device=logits.device)
    pred = logits[idx, steps].argmax(dim=-1)
    acc = float((pred == labels.to(pred.device)).double().mean()) if N else float("nan")
    macs = float(f[idx, steps].mean()) if N else float("nan")
    hist = torch.bincount(steps, minlength=T).double() / max(N, 1)
    return ExitResult(acc, macs, hist.tolist(), steps)


def evaluate_exits(logits: torch.Tensor, labels: torch.Tensor, step_flops, policy: ExitPolicy) -> ExitResult:
    """Accuracy and mean MACs/video when every sample exits by ``policy``.

    step_flops: MACs spent at each step, ``[T]`` or ``[N, T]`` (not cumulative).
    """
    return _result_from_steps(logits, labels, step_flops, exit_steps(logits, policy))


def geometric_exit_distribution(p: float, num_steps: int) -> torch.Tensor:
    """MSDNet's target exit distribution: share of step k proportional to p^k, k = 1..T."""
    k = torch.arange(1, num_steps + 1, dtype=torch.float64)
    w = torch.exp(k * math.log(p))
    return w / w.sum()


def solve_thresholds(logits: torch.Tensor, exit_distribution: torch.Tensor | Sequence[float],
                     criterion: str = "confidence") -> ExitPolicy:
    """MSDNet's procedure: thresholds so that about ``floor(N q_k)`` held-out samples exit at step k.

    At step k, the not-yet-exited samples are sorted by certainty; eta_k is the
    score of the ``floor(N q_k)``-th (no one exits at k when the quota is 0 or
    not enough samples remain); every remaining sample with a score >= eta_k
    exits at k.  The last threshold lets everyone exit.
    """
    scores = exit_scores(logits, criterion)  # [N, T]
    N, T = scores.shape
    q = torch.as_tensor(exit_distribution, dtype=torch.float64)
    if q.numel() != T:
        raise ValueError(f"exit distribution has {q.numel()} steps, logits have {T}")
    tau = torch.full((T,), math.inf, dtype=torch.float64)
    exited = torch.zeros(N, dtype=torch.bool, device=scores.device)
    for k in range(T - 1):
        quota = math.floor(N * float(q[k]) + 1e-9)
        remaining = (~exited).nonzero().squeeze(1)
        if quota > 0 and remaining.numel() >= quota:
            ranked = scores[remaining, k].sort(descending=True).values
            tau[k] = float(ranked[quota - 1])
        exited |= scores[:, k] >= tau[k].item()
    thresholds = _from_score_threshold(tau, criterion)
    return ExitPolicy(thresholds, criterion)  # __post_init__ sets the last threshold


def default_p_grid(n: int = 120) -> list[float]:
    """Values of p for sweeping the curve: log-spaced over [0.02, 50] (1 = uniform exits)."""
    return torch.logspace(math.log10(0.02), math.log10(50.0), n, dtype=torch.float64).tolist()


@dataclass
class CurvePoint:
    p: float
    policy: ExitPolicy
    heldout: ExitResult
    test: ExitResult


def trace_curve(logits_heldout: torch.Tensor, labels_heldout: torch.Tensor, flops_heldout,
                logits_test: torch.Tensor, labels_test: torch.Tensor, flops_test,
                ps: Sequence[float] | None = None, criterion: str = "confidence") -> list[CurvePoint]:
    """Solve thresholds on the held-out set for every p and evaluate them on both sets.

    Returns the points sorted by held-out cost.
    """
    T = logits_heldout.shape[1]
    points = []
    for p in ps if ps is not None else default_p_grid():
        policy = solve_thresholds(logits_heldout, geometric_exit_distribution(p, T), criterion)
        points.append(CurvePoint(p, policy,
                                 evaluate_exits(logits_heldout, labels_heldout, flops_heldout, policy),
                                 evaluate_exits(logits_test, labels_test, flops_test, policy)))
    points.sort(key=lambda c: (c.heldout.mean_macs, -c.heldout.accuracy))
    return points


def thresholds_for_budget(logits: torch.Tensor, labels: torch.Tensor, step_flops, budget_macs: float,
                          ps: Sequence[float] | None = None, criterion: str = "confidence") -> CurvePoint:
    """Eq. (12) for one budget: the swept p with the best held-out accuracy whose
    held-out mean MACs/video is <= ``budget_macs`` (ties: cheaper first).

    Raises ``ValueError`` if even the cheapest thresholds exceed the budget.
    """
    T = logits.shape[1]
    best = None
    for p in ps if ps is not None else default_p_grid():
        policy = solve_thresholds(logits, geometric_exit_distribution(p, T), criterion)
        res = evaluate_exits(logits, labels, step_flops, policy)
        if res.mean_macs <= budget_macs and (
            best is None or (res.accuracy, -res.mean_macs) > (best.heldout.accuracy, -best.heldout.mean_macs)
        ):
            best = CurvePoint(p, policy, res, res)
    if best is None:
        raise ValueError(f"no thresholds meet the budget of {budget_macs:.4g} MACs/video")
    return best


def evaluate_fixed_steps(logits: torch.Tensor, labels: torch.Tensor, step_flops, num_steps: int) -> ExitResult:
    """Baseline of Fig. 9: every video stops after the same number of steps."""
    N, T, _ = logits.shape
    steps = torch.full((N,), min(num_steps, T) - 1, dtype=torch.long, device=logits.device)
    return _result_from_steps(logits, labels, step_flops, steps)


def evaluate_random_exits(logits: torch.Tensor, labels: torch.Tensor, step_flops,
                          exit_fraction: Sequence[float], generator: torch.Generator | None = None) -> ExitResult:
    """Baseline of Fig. 9: random exits with a given exit distribution (e.g. AdaFocusV2+'s)."""
    N = logits.shape[0]
    q = torch.as_tensor(exit_fraction, dtype=torch.float64)
    steps = torch.multinomial(q / q.sum(), N, replacement=True, generator=generator).to(logits.device)
    return _result_from_steps(logits, labels, step_flops, steps)
