"""The DALI augmentation stage in CPU mode (device_id=None): exact transforms, one crop per clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.data.dali import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, ClipAugmenter, sample_crops


def _normalise(clips: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(clips.astype(np.float32) / 255.0).permute(0, 1, 4, 2, 3)
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1)


@pytest.fixture(scope="module")
def clips():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (3, 4, 64, 64, 3), dtype=np.uint8)


def test_eval_is_resize_then_centre_crop(clips):
    augment = ClipAugmenter(AugmentConfig(crop_size=56, resize_size=64), training=False, max_batch_size=4,
                            device_id=None)
    out = augment(clips)
    assert out.shape == (3, 4, 3, 56, 56) and out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, _normalise(clips[:, :, 4:60, 4:60]), atol=1e-5, rtol=0)


def test_eval_resizes_when_clip_is_larger_than_resize_size(clips):
    augment = ClipAugmenter(AugmentConfig(crop_size=28, resize_size=32), training=False, max_batch_size=4,
                            device_id=None)
    flat = np.broadcast_to(clips[:, :, :1, :1], clips.shape).copy()  # constant frames survive resizing
    out = augment(flat)
    assert out.shape == (3, 4, 3, 28, 28)
    torch.testing.assert_close(out, _normalise(flat[:, :, :28, :28]), atol=1e-4, rtol=0)


def test_training_crop_and_flip_are_shared_by_all_frames_of_a_clip():
    # every frame of a clip identical: with one crop window per clip the outputs stay identical
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (2, 1, 64, 64, 3), dtype=np.uint8)
    clips = np.repeat(frame, 6, axis=1)
    augment = ClipAugmenter(AugmentConfig(crop_size=32), training=True, max_batch_size=2, device_id=None, seed=0)
    for _ in range(5):
        out = augment(clips)
        assert out.shape == (2, 6, 3, 32, 32)
        assert torch.equal(out, out[:, :1].expand_as(out))


def test_training_crops_vary_and_follow_the_multiscale_grid():
    config = AugmentConfig()
    params = sample_crops(2000, 128, 128, config, np.random.default_rng(0))
    sizes = {int(128 * s) for s in config.scales}
    assert set(params[:, 2].astype(int)) == sizes and set(params[:, 3].astype(int)) == sizes
    index = {size: i for i, size in enumerate(sorted(sizes, reverse=True))}
    distort = np.abs(np.vectorize(index.get)(params[:, 2].astype(int)) - np.vectorize(index.get)(params[:, 3].astype(int)))
    assert distort.max() == config.max_distort
    assert np.all(params[:, 0] + params[:, 2] <= 128) and np.all(params[:, 1] + params[:, 3] <= 128)
    assert 0.4 < params[:, 4].mean() < 0.6
    assert not sample_crops(500, 128, 128, AugmentConfig(flip=False), np.random.default_rng(0))[:, 4].any()


def test_training_flip_mirrors_the_crop():
    """With the crop fixed to the whole frame, output is the (possibly mirrored) normalised clip."""
    rng = np.random.default_rng(2)
    clips = rng.integers(0, 256, (8, 2, 32, 32, 3), dtype=np.uint8)
    augment = ClipAugmenter(AugmentConfig(crop_size=32, scales=(1.0,)), training=True, max_batch_size=8,
                            device_id=None, seed=4)
    out = augment(clips)
    ref = _normalise(clips)
    flipped = [torch.allclose(o, r.flip(-1), atol=1e-4) for o, r in zip(out, ref)]
    plain = [torch.allclose(o, r, atol=1e-4) for o, r in zip(out, ref)]
    assert all(f or p for f, p in zip(flipped, plain))
    assert any(flipped) and any(plain)


def test_batches_larger_than_the_pipeline_and_bad_input(clips):
    augment = ClipAugmenter(AugmentConfig(crop_size=56, resize_size=64), training=False, max_batch_size=2,
                            device_id=None)
    assert augment(clips).shape[0] == 3
    with pytest.raises(ValueError, match="uint8 clips"):
        augment(clips.astype(np.float32))
