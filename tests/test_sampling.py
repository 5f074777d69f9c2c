"""Segment-based sampling arithmetic and the coarse-to-fine order."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.sampling import coarse_to_fine_order, frame_window, sample_clip_indices, segment_indices


def test_eval_takes_segment_centres():
    assert segment_indices(0, 100, 4, training=False).tolist() == [12, 37, 62, 87]
    assert segment_indices(10, 18, 8, training=False).tolist() == list(range(10, 18))


def test_training_draws_one_frame_inside_each_segment():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        idx = segment_indices(0, 100, 4, training=True, rng=rng)
        assert all(25 * k <= i < 25 * (k + 1) for k, i in enumerate(idx))
        seen.update(idx.tolist())
    assert len(seen) > 60  # offsets really vary across the whole segment


def test_training_is_deterministic_for_a_seed():
    a = segment_indices(0, 1000, 16, training=True, rng=np.random.default_rng(5))
    b = segment_indices(0, 1000, 16, training=True, rng=np.random.default_rng(5))
    assert a.tolist() == b.tolist()


def test_short_video_repeats_frames_in_order():
    idx = segment_indices(0, 3, 8, training=True, rng=np.random.default_rng(0))
    assert idx.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert segment_indices(0, 1, 4, training=False).tolist() == [0, 0, 0, 0]


def test_time_window_bounds():
    assert frame_window(300, 30.0, 1.0, 2.0) == (30, 60)
    assert frame_window(300, 30.0, None, 2.0) == (0, 60)
    assert frame_window(300, 30.0, float("nan"), float("nan")) == (0, 300)
    assert frame_window(300, 30.0, 5.0, 99.0) == (150, 300)  # clipped to the video
    assert frame_window(300, 30.0, 20.0, 30.0) == (0, 300)  # outside the video: whole video
    idx = sample_clip_indices(300, 30.0, 5, training=False, start=1.0, end=2.0)
    assert idx.min() >= 30 and idx.max() < 60


@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 12, 16, 32])
def test_coarse_to_fine_is_a_permutation_that_starts_in_the_middle(t):
    order = coarse_to_fine_order(t)
    assert sorted(order.tolist()) == list(range(t))
    assert order[0] == t // 2


def test_coarse_to_fine_spreads_early_frames():
    assert coarse_to_fine_order(8).tolist() == [4, 2, 6, 1, 3, 5, 7, 0]
    order = coarse_to_fine_order(16)
    # the first four frames seen cover all four quarters of the clip
    assert sorted(i // 4 for i in order[:4]) == [0, 1, 2, 3]


def test_coarse_to_fine_reorders_sampled_indices():
    plain = sample_clip_indices(80, 25.0, 8, training=False)
    ordered = sample_clip_indices(80, 25.0, 8, training=False, coarse_to_fine=True)
    assert ordered.tolist() == plain[coarse_to_fine_order(8)].tolist()
