"""Early exit (AdaFocusV2+, section 3.4): exit rule and the MSDNet-style threshold solver (Eq. 12),
on constructed logits whose right answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from adaptive.early_exit import (
    CRITERIA,
    ExitPolicy,
    default_p_grid,
    evaluate_exits,
    evaluate_fixed_steps,
    evaluate_random_exits,
    exit_scores,
    exit_steps,
    geometric_exit_distribution,
    solve_thresholds,
    thresholds_for_budget,
    trace_curve,
)


def binary_logits(conf: list[list[float]]) -> torch.Tensor:
    """[N, T, 2] logits whose softmax gives class 0 with probability conf[n][t] (>= 0.5)."""
    c = torch.tensor(conf, dtype=torch.float64)
    a = torch.log(c / (1 - c))
    return torch.stack((a, torch.zeros_like(a)), dim=-1)


STEP0 = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.52]
STEP1 = [0.99, 0.99, 0.99, 0.6, 0.9, 0.8, 0.7, 0.95, 0.65, 0.75]
STEP2 = [0.6] * 10


def constructed():
    logits = binary_logits([[a, b, c] for a, b, c in zip(STEP0, STEP1, STEP2)])
    labels = torch.zeros(10, dtype=torch.long)
    labels[3] = 1  # sample 3 is always predicted wrong
    return logits, labels


def test_scores():
    logits = binary_logits([[0.8, 0.5]])
    s = exit_scores(logits, "confidence")
    torch.testing.assert_close(s, torch.tensor([[0.8, 0.5]], dtype=torch.float64))
    h = -exit_scores(logits, "entropy")
    torch.testing.assert_close(h[0, 1], torch.tensor(math.log(2), dtype=torch.float64))


def test_geometric_distribution():
    q = geometric_exit_distribution(2.0, 4)
    torch.testing.assert_close(q.sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(q[1:] / q[:-1], torch.full((3,), 2.0, dtype=torch.float64))


def test_solver_fills_each_quota_with_the_most_confident_remaining():
    logits, labels = constructed()
    policy = solve_thresholds(logits, [0.3, 0.5, 0.2])
    # step 1: quota 3 -> eta_1 = 3rd highest confidence; step 2: quota 5 among the 7 left -> 5th highest
    torch.testing.assert_close(policy.thresholds, torch.tensor([0.85, 0.7, 0.0], dtype=torch.float64))
    steps = exit_steps(logits, policy)
    assert steps.tolist() == [0, 0, 0, 2, 1, 1, 1, 1, 2, 1]
    res = evaluate_exits(logits, labels, torch.tensor([1.0, 2.0, 3.0]), policy)
    assert res.accuracy == pytest.approx(0.9)
    assert res.mean_macs == pytest.approx((3 * 1 + 5 * 3 + 2 * 6) / 10)
    assert res.exit_fraction == pytest.approx([0.3, 0.5, 0.2])
    # per-sample step costs [N, T] are accepted too
    per_sample = torch.tensor([[1.0, 2.0, 3.0]]).repeat(10, 1)
    per_sample[3] *= 2
    assert evaluate_exits(logits, labels, per_sample, policy).mean_macs == pytest.approx(3.6)


def test_entropy_criterion_equivalent_for_two_classes():
    logits, labels = constructed()
    conf = solve_thresholds(logits, [0.3, 0.5, 0.2], "confidence")
    ent = solve_thresholds(logits, [0.3, 0.5, 0.2], "entropy")
    assert ent.thresholds[-1] == math.inf
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    assert ent.thresholds[0].item() == pytest.approx(h(0.85))
    assert torch.equal(exit_steps(logits, conf), exit_steps(logits, ent))


def test_zero_quota_and_last_step():
    logits, _ = constructed()
    policy = solve_thresholds(logits, [0.0, 0.0, 1.0])
    assert policy.thresholds[0] == math.inf and policy.thresholds[-1] == 0.0
    assert exit_steps(logits, policy).tolist() == [2] * 10
    everyone_first = solve_thresholds(logits, [1.0, 0.0, 0.0])
    assert exit_steps(logits, everyone_first).tolist() == [0] * 10


def test_streaming_decisions_match_offline_exits():
    logits, _ = constructed()
    policy = solve_thresholds(logits, [0.3, 0.5, 0.2])
    offline = exit_steps(logits, policy)
    done = torch.full((10,), -1)
    for t in range(3):
        fire = policy.should_exit(logits[:, t], t) & (done < 0)
        done[fire] = t
    assert torch.equal(done, offline)
    assert ExitPolicy.from_dict(policy.to_dict()).thresholds.tolist() == policy.thresholds.tolist()


def test_the_numpy_decision_for_one_prediction_is_the_torch_one():
    """``ExitPolicy.exits`` (one prediction, NumPy: the server's event loop) decides as ``should_exit``,
    for both criteria, on random logits at thresholds set where the scores fall."""
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 4, 6, generator=generator)
    for criterion in CRITERIA:
        scores = exit_scores(logits, criterion)
        # Thresholds between the two middle scores of each step: half the samples exit at each step.
        median = scores.quantile(0.5, dim=0)
        policy = ExitPolicy(median if criterion == "confidence" else -median, criterion)
        for t in range(5):  # past the last step too (clamped, as should_exit does)
            step = logits[:, min(t, 3)]
            want = policy.should_exit(step, t).tolist()
            assert [policy.exits(row.numpy(), t) for row in step] == want
            if t < 3:
                assert 0 < sum(want) < len(want)


def test_budget_selects_the_known_optimum():
    """Easy half: confident and right at step 1; hard half: unsure and wrong at step 1, right at step 2.
    With a budget of 1.5 (half exit after 1 step, half after 2) the optimum is 100% accuracy."""
    easy = [[0.9 + 0.01 * i, 0.9] for i in range(5)]
    hard = [[0.6 + 0.01 * i, 0.9] for i in range(5)]
    logits = binary_logits(easy + hard)
    logits[5:, 0] = logits[5:, 0].flip(-1)  # hard samples predict class 1 at step 1 (wrong)
    labels = torch.zeros(10, dtype=torch.long)
    best = thresholds_for_budget(logits, labels, [1.0, 1.0], budget_macs=1.5)
    assert best.heldout.accuracy == 1.0 and best.heldout.mean_macs == pytest.approx(1.5)
    assert exit_steps(logits, best.policy).tolist() == [0] * 5 + [1] * 5
    cheaper = thresholds_for_budget(logits, labels, [1.0, 1.0], budget_macs=1.2)
    assert cheaper.heldout.mean_macs <= 1.2 and cheaper.heldout.accuracy == pytest.approx(0.7)
    with pytest.raises(ValueError):
        thresholds_for_budget(logits, labels, [1.0, 1.0], budget_macs=0.5)


def test_curve_spans_cheapest_to_full_cost():
    logits, labels = constructed()
    curve = trace_curve(logits, labels, [1.0, 1.0, 1.0], logits, labels, [1.0, 1.0, 1.0])
    costs = [c.heldout.mean_macs for c in curve]
    assert costs == sorted(costs)
    assert costs[-1] == pytest.approx(3.0)  # large p: everybody runs every step
    assert costs[0] < 1.5  # small p: nearly everybody exits after the first step
    assert len(curve) == len(default_p_grid())


def test_fixed_and_random_exit_baselines():
    logits, labels = constructed()
    fixed = evaluate_fixed_steps(logits, labels, [1.0, 1.0, 1.0], 2)
    assert fixed.mean_macs == 2.0 and fixed.exit_fraction == [0.0, 1.0, 0.0]
    rnd = evaluate_random_exits(logits, labels, [1.0, 1.0, 1.0], [0.0, 0.0, 1.0])
    assert rnd.mean_macs == 3.0 and rnd.accuracy == pytest.approx(0.9)
