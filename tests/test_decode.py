"""PyAV decoding: real third-party videos, frame-exact sampling with seeking, and every kind of bad input."""

from __future__ import annotations

import shutil

import av
import numpy as np
import pytest

from pipelines.data.decode import OK, REPAIRED, SKIPPED, DecodeConfig, decode_clip
from tests.videos import read_index, write_audio_only, write_video


@pytest.mark.parametrize("training", [False, True])
def test_every_shared_video_decodes(shared_video_paths, training):
    for path in shared_video_paths:
        result = decode_clip(str(path), DecodeConfig(num_frames=16, size=112, training=training),
                             rng=np.random.default_rng(0))
        assert result.status == OK, (path.name, result.reason)
        assert result.clip.shape == (16, 112, 112, 3) and result.clip.dtype == np.uint8
        assert np.all(np.diff(result.indices) > 0), path.name
        assert result.clip.std() > 5  # real picture content, not a blank fill


def _full_decode(path, size):
    """Reference: every frame, decoded sequentially, resized and centre-cropped like decode_clip."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        out_w, out_h = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
        ox, oy = (out_w - size) // 2, (out_h - size) // 2
        return [f.to_ndarray(width=out_w, height=out_h, format="rgb24", interpolation="BILINEAR")[
            oy:oy + size, ox:ox + size] for f in container.decode(stream)]


@pytest.mark.parametrize("min_seek_gap", [1, 8, 10**9])
def test_clip_frames_equal_a_full_sequential_decode(shared_video_paths, min_seek_gap):
    """Seeking (forced with a small gap) must land on exactly the frames a full decode gives."""
    for path in shared_video_paths:
        full = _full_decode(path, 64)
        for t in (4, 16):
            result = decode_clip(str(path), DecodeConfig(num_frames=t, size=64, min_seek_gap=min_seek_gap))
            assert result.status == OK, result.reason
            for k in range(t):
                assert np.array_equal(result.clip[k], full[result.indices[k]]), (path.name, t, k)


@pytest.mark.parametrize("bframes", [False, True])
def test_seeking_in_a_long_video_returns_the_requested_frames(tmp_path, bframes):
    path = write_video(tmp_path / "long.mp4", 600, gop=25, bframes=bframes)
    for training in (False, True):
        config = DecodeConfig(num_frames=8, size=64, training=training)
        result = decode_clip(str(path), config, rng=np.random.default_rng(1))
        assert result.status == OK
        assert [read_index(img) for img in result.clip] == result.indices.tolist()
    expected = (np.arange(8) * 75 + 37).tolist()  # segment centres of 600 frames in 8 segments
    assert decode_clip(str(path), DecodeConfig(num_frames=8, size=64)).indices.tolist() == expected


def test_coarse_to_fine_order_reaches_the_clip(tmp_path):
    path = write_video(tmp_path / "v.mp4", 64)
    result = decode_clip(str(path), DecodeConfig(num_frames=8, size=64, coarse_to_fine=True))
    assert [read_index(img) for img in result.clip] == [36, 20, 52, 12, 28, 44, 60, 4]


def test_start_end_window_is_honoured(tmp_path):
    path = write_video(tmp_path / "v.mp4", 100, fps=10)
    result = decode_clip(str(path), DecodeConfig(num_frames=5, size=64), start=2.0, end=4.0)
    got = [read_index(img) for img in result.clip]
    assert got == result.indices.tolist() and min(got) >= 20 and max(got) < 40


def test_training_crop_of_the_long_side_is_shared_by_all_frames(tmp_path):
    path = write_video(tmp_path / "wide.mp4", 20, width=192, height=64)
    result = decode_clip(str(path), DecodeConfig(num_frames=4, size=64, training=True), rng=np.random.default_rng(3))
    assert result.clip.shape == (4, 64, 64, 3)
    assert [read_index(img) for img in result.clip] == result.indices.tolist()


# ----------------------------------------------------------------------------------- bad input


def _skipped(path, config=DecodeConfig(num_frames=8, size=64)):
    result = decode_clip(str(path), config)
    assert result.status == SKIPPED and result.clip is None
    return result.reason


def test_missing_file(tmp_path):
    assert _skipped(tmp_path / "nope.mp4") == "missing file"


def test_zero_byte_file(tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    assert _skipped(tmp_path / "zero.mp4") == "empty file (0 bytes)"


def test_not_a_video(tmp_path):
    (tmp_path / "notes.mp4").write_text("this is a text file, not a video\n" * 50)
    assert "not a readable video" in _skipped(tmp_path / "notes.mp4")
    (tmp_path / "noise.avi").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    assert _skipped(tmp_path / "noise.avi")


def test_audio_only(tmp_path):
    assert _skipped(write_audio_only(tmp_path / "tone.m4a")) == "no video stream (only audio)"


def test_undecodable_codec(tmp_path):
    """A Matroska file whose codec id names no codec FFmpeg knows."""
    path = write_video(tmp_path / "v.mkv", 10, container_format="matroska")
    data = path.read_bytes()
    assert data.count(b"V_MPEG4/ISO/AVC") == 1
    (tmp_path / "alien.mkv").write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_ALIEN/ISO/XYZ"))
    reason = _skipped(tmp_path / "alien.mkv")
    assert "codec" in reason


def test_truncated_mp4_without_index_is_skipped(tmp_path):
    path = write_video(tmp_path / "v.mp4", 50)
    data = path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # the moov index is at the end
    assert _skipped(tmp_path / "cut.mp4")


def test_truncated_stream_is_repaired(tmp_path):
    path = write_video(tmp_path / "v.ts", 100, container_format="mpegts")
    data = path.read_bytes()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[: len(data) // 2])
    result = decode_clip(str(cut), DecodeConfig(num_frames=8, size=64))
    # MPEG-TS has no frame count: the decoder estimates it and repeats the last real frame
    assert result.usable, result.reason
    got = [read_index(img) for img in result.clip]
    assert got == sorted(got) and max(got) < 100


def test_fewer_frames_than_t_repeats_frames(tmp_path):
    path = write_video(tmp_path / "short.mp4", 5)
    result = decode_clip(str(path), DecodeConfig(num_frames=8, size=64))
    assert result.status == REPAIRED and "only 5 frames for a 8-frame clip" in result.reason
    assert [read_index(img) for img in result.clip] == [0, 0, 1, 1, 2, 3, 3, 4]


def test_huge_resolution_is_skipped_over_the_limit_and_resized_under_it(tmp_path):
    path = write_video(tmp_path / "big.mp4", 3, width=1920, height=1088)
    reason = _skipped(path, DecodeConfig(num_frames=2, size=64, max_pixels=1920 * 1080))
    assert "1920x1088 exceeds" in reason
    result = decode_clip(str(path), DecodeConfig(num_frames=2, size=64))
    assert result.status == OK and result.clip.shape == (2, 64, 64, 3)


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "dir.mp4").mkdir()
    assert "directory" in _skipped(tmp_path / "dir.mp4")


def test_uri_paths_are_opened_through_pyarrow(tmp_path, shared_video_paths):
    src = shared_video_paths[0]
    shutil.copy(src, tmp_path / "copy.mp4")
    result = decode_clip(f"file://{tmp_path / 'copy.mp4'}", DecodeConfig(num_frames=4, size=64))
    assert result.status == OK
    assert decode_clip(f"file://{tmp_path / 'gone.mp4'}", DecodeConfig(num_frames=4, size=64)).reason == "missing file"


def test_the_decode_tasks_module_imports_without_torch():
    # Every Ray Data decode worker imports this module: torch and torchvision would cost each one
    # about 5 s of start-up and 600 MB resident, for nothing (decoding is PyAV and numpy).
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys, pipelines.data.dataset; heavy = sorted({'torch', 'torchvision'} & set(sys.modules)); "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
