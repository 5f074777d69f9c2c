"""Compute budgets -> early-exit thresholds, from what training registered with the model.

Training solved Eq. (12) of the paper (MSDNet's procedure) on the held-out split for a sweep of exit
distributions and stored the resulting accuracy-vs-GFLOPs curve (``exits["curve"]``: thresholds,
held-out and test GFLOPs per video, test accuracy) and any explicitly requested budgets
(``exits["budgets"]``). Serving never re-solves anything: a budget picks one stored set of thresholds,
which is why the budget can change at run time, per stream, without touching the model.

Budgets are given as

* a number: GFLOPs per window (per video in the paper's terms); the most accurate stored thresholds
  whose held-out cost is within it;
* ``full``: no early exit (every window sees all its frames: AdaFocusV2 without the "+");
* ``min``: the cheapest stored thresholds;
* ``auto``: the cheapest thresholds whose accuracy is within ``tolerance`` of the best stored one (the
  knee). By default the tolerance is one standard error of that best accuracy on the held-out split,
  ``sqrt(a (1 - a) / n)`` for ``n`` held-out videos: the cheapest thresholds the split cannot tell apart
  from the best (the "one-standard-error rule" of model selection, Breiman et al. 1984). A fixed
  tolerance would mean different things on different splits: one point is a single video of the demo's
  96 held-out videos -- noise -- and a clear difference on a validation set of 20,000.

"Accurate" means on the held-out split, where the thresholds were solved: choosing among them by
test accuracy would tune on the test split, and the test accuracy reported for the choice would no
longer be an unbiased estimate. Models registered before the held-out accuracy was stored with the
curve fall back to the test accuracy.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from adaptive.early_exit import ExitPolicy

NAMED_BUDGETS = ("full", "min", "auto")


class BudgetError(ValueError):
    """A budget that cannot be met or understood (the API answers 422)."""


@dataclass(frozen=True)
class ExitChoice:
    """One resolved budget: the thresholds and what training measured for them."""

    budget: str
    """The budget as requested (``"1.5"``, ``"auto"``, ...)."""
    thresholds: tuple[float, ...]
    """eta_1..eta_T for the model's T (the last one lets every window exit)."""
    criterion: str = "confidence"
    gflops: float | None = None
    """Held-out GFLOPs per window with these thresholds (None for ``full``: every frame)."""
    accuracy: float | None = None
    """Test accuracy training measured with them."""
    heldout_accuracy: float | None = None
    """Held-out accuracy (the split they were solved on): what budgets are resolved by."""

    def policy(self, window_frames: int) -> ExitPolicy:
        """The exit rule for windows of ``window_frames`` frames (shared, built once per choice and
        window length: streams ask for it at every step).

        Shorter windows use the first thresholds; longer ones repeat the last solved (non-final) one.
        The final step always exits (ExitPolicy sets it), so a window never outlives its frames.
        """
        return _exit_policy(self, window_frames)

    def _build_policy(self, window_frames: int) -> ExitPolicy:
        thr = list(self.thresholds)
        if window_frames <= len(thr):
            thr = thr[:window_frames]
        else:
            filler = thr[-2] if len(thr) >= 2 else math.inf if self.criterion == "confidence" else -math.inf
            thr = thr[:-1] + [filler] * (window_frames - len(thr) + 1)
        return ExitPolicy(torch.tensor(thr, dtype=torch.float64), self.criterion)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "criterion": self.criterion, "gflops": self.gflops,
                "accuracy": self.accuracy, "heldout_accuracy": self.heldout_accuracy,
                "thresholds": [_json_float(v) for v in self.thresholds]}


@functools.lru_cache(maxsize=256)
def _exit_policy(choice: ExitChoice, window_frames: int) -> ExitPolicy:
    return choice._build_policy(window_frames)


def _json_float(v: float) -> float | str:
    # JSON has no infinity; "inf" keeps the event schema parseable by every client.
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


@dataclass
class ExitCatalog:
    """The stored threshold sets of one registered model, and budget resolution over them."""

    num_frames: int
    points: list[ExitChoice] = field(default_factory=list)
    tolerance: float | None = None
    """``auto``'s tolerance (accuracy, 0.01 = one point); None: one standard error (module docstring)."""
    heldout_videos: int | None = None
    """Size of the split the thresholds were solved on (registered with them since the one-standard-
    error rule; older registrations fall back to a tolerance of one point)."""

    @classmethod
    def from_exits(cls, exits: dict, num_frames: int, tolerance: float | None = None) -> "ExitCatalog":
        points = []
        for entry in exits.get("curve", []):
            points.append(_point(entry, entry.get("val_gflops", entry.get("test_gflops")), entry))
        for entry in exits.get("budgets", []):
            if "thresholds" in entry and "error" not in entry:
                # Solved for an explicit budget: its held-out cost is within budget_gflops by construction.
                points.append(_point(entry["thresholds"], entry.get("budget_gflops", entry.get("test_gflops")),
                                     entry))
        points = [p for p in points if len(p.thresholds) >= 1]
        points.sort(key=lambda p: (p.gflops if p.gflops is not None else math.inf,
                                   -(p.heldout_accuracy or p.accuracy or 0.0)))
        heldout_videos = exits.get("heldout_videos")
        return cls(num_frames=num_frames, points=points, tolerance=tolerance,
                   heldout_videos=int(heldout_videos) if heldout_videos else None)

    @property
    def has_exits(self) -> bool:
        return bool(self.points)

    def full(self) -> ExitChoice:
        never = math.inf
        return ExitChoice("full", tuple([never] * self.num_frames), "confidence")

    def resolve(self, budget: str | float | None) -> ExitChoice:
        """A budget (see module docstring) -> :class:`ExitChoice`; raises :class:`BudgetError`."""
        text = "auto" if budget is None else str(budget).strip().lower()
        if text in ("full", "none", "off", "inf"):
            return self.full()
        if not self.points:
            if text == "auto":
                return self.full()  # a model registered without thresholds still serves, without exits
            raise BudgetError("this model was registered without early-exit thresholds; only 'full' is available")
        if text == "min":
            return _named(self.points[0], "min")
        score = self._selection_accuracy()
        if text == "auto":
            best = max(score(p) for p in self.points)
            good = [p for p in self.points if score(p) >= best - self.auto_tolerance() - 1e-12]
            return _named(min(good, key=lambda p: p.gflops if p.gflops is not None else math.inf), "auto")
        try:
            gflops = float(text)
        except ValueError:
            raise BudgetError(f"budget must be GFLOPs per window (a number) or one of {NAMED_BUDGETS}, "
                              f"got {budget!r}") from None
        if not math.isfinite(gflops) or gflops <= 0:
            raise BudgetError(f"budget must be a positive number of GFLOPs, got {budget!r}")
        within = [p for p in self.points if p.gflops is not None and p.gflops <= gflops + 1e-12]
        if not within:
            raise BudgetError(f"no stored thresholds meet {gflops:g} GFLOPs per window; the cheapest need "
                              f"{self.points[0].gflops:.4g}")
        chosen = max(within, key=lambda p: (score(p), -(p.gflops or 0.0)))
        return _named(chosen, _format_budget(gflops))

    def auto_tolerance(self) -> float:
        """How far below the best accuracy ``auto`` may go: the configured tolerance, else one standard
        error of the best held-out accuracy, else (older registrations) one point."""
        if self.tolerance is not None:
            return self.tolerance
        if self.heldout_videos and self.points and self._by_heldout():
            best = max(p.heldout_accuracy for p in self.points)
            return math.sqrt(best * (1.0 - best) / self.heldout_videos)
        return 0.01

    def _by_heldout(self) -> bool:
        """Whether every point carries its held-out accuracy (older registrations do not)."""
        return all(p.heldout_accuracy is not None for p in self.points)

    def _selection_accuracy(self) -> Any:
        """The accuracy budgets are resolved by: held-out, or test for older registrations (see the
        module docstring)."""
        if self._by_heldout():
            return lambda p: p.heldout_accuracy
        return lambda p: p.accuracy or 0.0

    def describe(self) -> dict[str, Any]:
        return {"num_frames": self.num_frames, "named": list(NAMED_BUDGETS),
                "auto_tolerance": self.auto_tolerance() if self.points else None,
                "heldout_videos": self.heldout_videos,
                "curve": [{"gflops": p.gflops, "accuracy": p.accuracy, "heldout_accuracy": p.heldout_accuracy}
                          for p in self.points]}


def _format_budget(gflops: float) -> str:
    return f"{gflops:g}"


def _named(point: ExitChoice, name: str) -> ExitChoice:
    return ExitChoice(name, point.thresholds, point.criterion, point.gflops, point.accuracy, point.heldout_accuracy)


def _point(thresholds: dict, gflops: Any, entry: dict) -> ExitChoice:
    values = tuple(float(v) for v in thresholds.get("thresholds", []))
    accuracy, heldout = entry.get("test_accuracy"), entry.get("val_accuracy")
    return ExitChoice("", values, thresholds.get("criterion", "confidence"),
                      float(gflops) if gflops is not None else None,
                      float(accuracy) if accuracy is not None else None,
                      float(heldout) if heldout is not None else None)
