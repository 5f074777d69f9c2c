"""The real streaming path end to end: manifest -> Ray Data (PyAV in Ray tasks) -> DALI (CPU) -> tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.data.dali import AugmentConfig, ClipAugmenter
from pipelines.data.dataset import PipelineConfig, build_clip_dataset, iter_model_batches
from pipelines.data.decode import DecodeConfig, decode_clip
from pipelines.data.manifest import load_manifest
from pipelines.data.report import remote_report
from tests.conftest import REPO
from tests.videos import read_index, write_video

pytestmark = pytest.mark.slow


def test_synthetic_set_through_ray_data_and_dali(ray_session, synthetic_set):
    manifest = load_manifest(synthetic_set)
    train = manifest.split("train")
    assert len(train) > 0
    report = remote_report()
    config = PipelineConfig(decode=DecodeConfig(num_frames=8, size=64, training=True), shuffle=True, seed=1)
    dataset = build_clip_dataset(train, config, report=report)
    augment = ClipAugmenter(AugmentConfig(crop_size=56, resize_size=64), training=True, max_batch_size=4,
                            device_id=None, seed=0)
    labels_by_id = dict(zip(train.table["video_id"], train.table["label"]))
    seen = []
    for batch in iter_model_batches(dataset, augment, batch_size=4):
        video = batch["video"]
        assert video.dtype == torch.float32 and video.shape[1:] == (8, 3, 56, 56)
        assert video.shape[0] == len(batch["video_id"]) <= 4
        assert batch["label"].tolist() == [labels_by_id[v] for v in batch["video_id"]]
        assert -3 < video.mean() < 3 and video.std() > 0.1  # normalised pixels, not zeros
        for indices in batch["frame_indices"]:
            assert np.all(np.diff(indices) > 0)  # temporal order kept
        seen.extend(batch["video_id"])
    assert sorted(seen) == sorted(train.table["video_id"])  # every video exactly once
    assert ray_session.get(report.counts.remote()) == {"ok": len(train), "repaired": 0, "skipped": 0}


def test_eval_stream_is_deterministic_and_matches_direct_decode(ray_session, synthetic_set):
    val = load_manifest(synthetic_set).split("val")
    config = PipelineConfig(decode=DecodeConfig(num_frames=8, size=64, coarse_to_fine=True))
    rows = {}
    for batch in build_clip_dataset(val, config).iter_batches(batch_size=8, batch_format="numpy"):
        for vid, clip, idx in zip(batch["video_id"], batch["clip"], batch["frame_indices"]):
            rows[vid] = (clip, idx)
    assert set(rows) == set(val.table["video_id"])
    for vid, path in zip(val.table["video_id"], val.table["path"]):
        direct = decode_clip(path, config.decode)
        assert np.array_equal(rows[vid][0], direct.clip) and np.array_equal(rows[vid][1], direct.indices)


def test_shared_videos_and_broken_files_through_ray(ray_session, shared_video_paths, tmp_path):
    """Real third-party videos stream through; broken ones are skipped, named and counted, not fatal."""
    barcode = write_video(tmp_path / "barcode.mp4", 120, gop=10)
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.avi").write_text("not a video")
    rows = [(str(p), i % 2) for i, p in enumerate(shared_video_paths)]
    rows += [(str(barcode), 1), (str(tmp_path / "zero.mp4"), 0), (str(tmp_path / "text.avi"), 1),
             (str(tmp_path / "missing.mp4"), 0)]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "m.csv", index=False)
    (tmp_path / "classes.json").write_text(json.dumps(["even", "odd"]))
    manifest = load_manifest(tmp_path / "m.csv")
    report = remote_report()
    dataset = build_clip_dataset(manifest, PipelineConfig(decode=DecodeConfig(num_frames=16, size=96)), report=report)
    augment = ClipAugmenter(AugmentConfig(crop_size=84, resize_size=96), training=False, max_batch_size=8,
                            device_id=None)
    got = {}
    for batch in iter_model_batches(dataset, augment, batch_size=3):
        assert batch["video"].shape[1:] == (16, 3, 84, 84)
        for vid, label, idx in zip(batch["video_id"], batch["label"].tolist(), batch["frame_indices"]):
            got[vid] = (label, idx)
    expected = {Path(p).stem: label for p, label in rows[: len(shared_video_paths) + 1]}
    assert {vid: label for vid, (label, _) in got.items()} == expected
    assert got["barcode"][1].tolist() == (np.arange(16) * 7.5 + 3.75).astype(int).tolist()
    counts = ray_session.get(report.counts.remote())
    assert counts == {"ok": len(shared_video_paths) + 1, "repaired": 0, "skipped": 3}
    reasons = {Path(i.path).name: i.reason for i in ray_session.get(report.skipped.remote())}
    assert reasons["zero.mp4"] == "empty file (0 bytes)" and reasons["missing.mp4"] == "missing file"
    assert "not a readable video" in reasons["text.avi"]


def test_blocks_stay_small_and_nothing_is_materialised(ray_session, synthetic_set):
    manifest = load_manifest(synthetic_set)
    config = PipelineConfig(decode=DecodeConfig(num_frames=8, size=64), target_block_bytes=4 * 8 * 64 * 64 * 3)
    dataset = build_clip_dataset(manifest, config)
    sizes = [len(b["label"]) for b in dataset.iter_batches(batch_size=None, batch_format="numpy")]
    assert sum(sizes) == len(manifest) and max(sizes) <= 4


def _doctor(*args):
    return subprocess.run([sys.executable, str(REPO / "pipelines" / "check_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_data_doctor_on_shared_videos_and_broken_files(shared_video_paths, tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    listing = [f"{p} 0" for p in shared_video_paths] + [f"{tmp_path / 'zero.mp4'} 1", f"{tmp_path / 'gone.mp4'} 1"]
    (tmp_path / "list.txt").write_text("\n".join(listing) + "\n")
    done = _doctor(tmp_path / "list.txt", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert sorted(e["path"] for e in report["ok"]) == sorted(map(str, shared_video_paths))
    assert {e["path"]: e["reason"] for e in report["skipped"]} == {
        str(tmp_path / "zero.mp4"): "empty file (0 bytes)", str(tmp_path / "gone.mp4"): "missing file"}
    table = _doctor(tmp_path / "list.txt", "--format", "mmaction")
    assert table.returncode == 0
    assert f"{len(shared_video_paths)} of {len(listing)} videos usable" in table.stdout


def test_data_doctor_through_ray_matches_local(synthetic_set):
    local = _doctor(synthetic_set, "--json", "--split", "test")
    ray_run = _doctor(synthetic_set, "--json", "--split", "test", "--ray")
    assert local.returncode == 0 and ray_run.returncode == 0, ray_run.stderr
    assert json.loads(local.stdout) == json.loads(ray_run.stdout)
    assert len(json.loads(local.stdout)["ok"]) > 0


def test_data_doctor_fails_clearly_when_nothing_is_usable(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\nnothing.mp4,0\n")
    done = _doctor(tmp_path / "m.csv")
    assert done.returncode == 1 and "none of the 1 videos" in done.stderr
    bad = _doctor(tmp_path / "absent.csv")
    assert bad.returncode == 2 and "cannot read manifest" in bad.stderr


def test_background_batches_keep_order_raise_errors_and_stop_when_abandoned():
    """iter_model_batches' prefetch thread: same items in order, the producer's error reaches the
    consumer, a consumer that stops early stops the producer (and closes its source), and the
    producer starts before the first batch is asked for."""
    import threading

    from pipelines.data.dataset import BackgroundIterator

    assert list(BackgroundIterator(iter(range(7)), depth=2)) == list(range(7))

    def failing():
        yield 1
        raise ValueError("corrupt block")

    items = BackgroundIterator(failing(), depth=2)
    assert next(items) == 1
    with pytest.raises(ValueError, match="corrupt block"):
        next(items)

    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    items = BackgroundIterator(endless(), depth=2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    assert closed.wait(5), "the producer kept running after the consumer left"

    closed.clear()
    items = BackgroundIterator(endless(), depth=2)
    assert next(items) == 0
    del items  # dropped without close(), e.g. by an exception in the consumer's loop
    assert closed.wait(5), "the producer kept running after its iterator was dropped"

    # It starts at once, not at the first next(): the training job makes the next epoch's iterator
    # before validating, so that epoch's start-up overlaps the validation.
    started = threading.Event()

    def source():
        started.set()
        yield "first batch"

    items = BackgroundIterator(source(), depth=2)
    assert started.wait(5), "the producer waited for the first next()"
    assert list(items) == ["first batch"]
