"""Decode speed: our PyAV path against the ffmpeg binary (the physical limit) and torchcodec.

    python benchmarks/decode.py [--synthetic DIR] [--videos N] [--size S] [--repeats R]

All contenders run in one process on one thread, on the same files, producing the same output size
(short side ``S``, bilinear, RGB24, square centre crop), measured side by side in one run:

* ``ours``      -- :func:`pipelines.data.decode.decode_clip` asked for every frame of the video;
* ``ffmpeg``    -- imageio-ffmpeg's binary: ``-threads 1 -filter_threads 1``, scale+crop, rgb24, to null,
                   with the binary's start-up time (``ffmpeg -version``) subtracted;
* ``torchcodec``-- its ``VideoDecoder`` (one FFmpeg thread, its Resize + CenterCrop decoder transforms), if
                   it installs and finds FFmpeg's shared libraries (``apt-get install ffmpeg``).

A second table shows what the product actually does in training: a ``T=16`` clip per video, with
seeking, reported as source-video frames covered per second (the whole video "consumed").
Headline ratios come last as ``name=value`` pairs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av
import numpy as np

from pipelines.data.decode import DecodeConfig, _output_geometry, decode_clip

SHARED_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "videos"


def video_facts(path: Path) -> tuple[int, int, int]:
    """(frames, width, height) by a full count (metadata can be wrong)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        frames = sum(1 for _ in container.demux(stream) if _.size)
    return frames, width, height


def run_ours(path: Path, frames: int, size: int) -> int:
    result = decode_clip(str(path), DecodeConfig(num_frames=frames, size=size, threads=1))
    assert result.usable, result.reason
    return len(np.unique(result.indices))


def run_clip(path: Path, size: int, t: int) -> int:
    result = decode_clip(str(path), DecodeConfig(num_frames=t, size=size, threads=1))
    assert result.usable, result.reason
    return t


def ffmpeg_startup_seconds(repeats: int) -> float:
    """Time to start the ffmpeg binary and exit (exec, dynamic linking): not decoding work, so it is
    subtracted from every ffmpeg timing, which makes the reference faster and the comparison stricter."""
    import imageio_ffmpeg

    exe = imageio_ffmpeg.get_ffmpeg_exe()
    return timed(lambda: subprocess.run([exe, "-v", "error", "-version"], check=True, stdout=subprocess.DEVNULL),
                 max(repeats, 5))


def run_ffmpeg(path: Path, width: int, height: int, size: int) -> int:
    import imageio_ffmpeg

    out_w, out_h = _output_geometry(width, height, size)
    vf = f"scale={out_w}:{out_h}:flags=bilinear,crop={size}:{size}"
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-threads", "1", "-i", str(path),
           "-an", "-vf", vf, "-filter_threads", "1", "-pix_fmt", "rgb24", "-f", "null", "-"]
    subprocess.run(cmd, check=True)
    return 0


def torchcodec_runner():
    """A decode function with torchcodec, or the reason it is unavailable."""
    try:
        from torchcodec.decoders import VideoDecoder
        VideoDecoder(str(next(iter(sorted(SHARED_VIDEOS.glob("*.mp4"))))), num_ffmpeg_threads=1)
    except Exception as error:  # not installed, or FFmpeg shared libraries missing
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"

    from torchcodec.transforms import CenterCrop, Resize

    def run(path: Path, width: int, height: int, size: int) -> int:
        out_w, out_h = _output_geometry(width, height, size)
        # torchcodec's own in-decoder transforms (FFmpeg filters): the same resize + crop as ours
        decoder = VideoDecoder(str(path), num_ffmpeg_threads=1, dimension_order="NHWC",
                               transforms=[Resize((out_h, out_w)), CenterCrop((size, size))])
        count = 0
        try:
            for start in range(0, len(decoder), 64):
                count += decoder.get_frames_in_range(start, min(start + 64, len(decoder))).data.shape[0]
        except RuntimeError:  # the container's frame count was one too many; what decoded counts
            pass
        return count

    return run, ""


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def collect_files(synthetic: Path | None, limit: int) -> dict[str, list[Path]]:
    sets = {"shared": sorted(p for p in SHARED_VIDEOS.glob("*") if p.suffix in {".mp4", ".avi", ".mkv", ".webm"})}
    if synthetic is not None:
        sets["synthetic"] = sorted((synthetic / "videos").glob("*.mp4"))[:limit]
    return sets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", type=Path, default=Path("data/synthetic"),
                        help="synthetic benchmark folder (generated with defaults if missing)")
    parser.add_argument("--videos", type=int, default=40, help="synthetic videos to time")
    parser.add_argument("--size", type=int, default=128, help="output short side")
    parser.add_argument("--clip-frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="best of R runs per file and contender")
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    if not (args.synthetic / "manifest.csv").exists():
        from pipelines.data.synthetic import generate_benchmark
        generate_benchmark(args.synthetic)
    torchcodec, why_not = torchcodec_runner()
    startup = ffmpeg_startup_seconds(args.repeats)

    totals: dict[tuple[str, str], list[float]] = {}
    rows = []
    for set_name, files in collect_files(args.synthetic, args.videos).items():
        for path in files:
            frames, width, height = video_facts(path)
            contenders = {
                "ours": lambda: run_ours(path, frames, args.size),
                "ffmpeg": lambda: run_ffmpeg(path, width, height, args.size),
                "ours_clip": lambda: run_clip(path, args.size, args.clip_frames),
            }
            if torchcodec is not None:
                contenders["torchcodec"] = lambda: torchcodec(path, width, height, args.size)
            for name, fn in contenders.items():
                seconds = timed(fn, args.repeats)
                if name == "ffmpeg":
                    seconds = max(seconds - startup, 1e-6)
                totals.setdefault((set_name, name), [0.0, 0])
                totals[(set_name, name)][0] += seconds
                totals[(set_name, name)][1] += frames
                if set_name == "shared":
                    rows.append((path.name, f"{width}x{height}", frames, name, frames / seconds))

    print(f"{'file':28s} {'size':>9s} {'frames':>6s} {'decoder':>10s} {'frames/s':>10s}")
    for name, dims, frames, contender, fps in rows:
        print(f"{name:28s} {dims:>9s} {frames:6d} {contender:>10s} {fps:10.0f}")
    print()
    print(f"{'set':10s} {'decoder':>10s} {'frames/s':>10s}   (ours_clip: video frames covered/s by a "
          f"{args.clip_frames}-frame clip)")
    for (set_name, name), (seconds, frames) in sorted(totals.items()):
        print(f"{set_name:10s} {name:>10s} {frames / seconds:10.0f}")
    print(f"\nffmpeg start-up subtracted from each ffmpeg run: {startup * 1000:.1f} ms")
    if torchcodec is None:
        print(f"torchcodec: unavailable ({why_not})")

    def rate(set_name: str, name: str) -> float:
        seconds, frames = totals[(set_name, name)]
        return frames / seconds

    headline = {}
    for set_name in sorted({s for s, _ in totals}):
        headline[f"decode_vs_ffmpeg_{set_name}"] = rate(set_name, "ours") / rate(set_name, "ffmpeg")
        if torchcodec is not None:
            headline[f"decode_vs_torchcodec_{set_name}"] = rate(set_name, "ours") / rate(set_name, "torchcodec")
        headline[f"clip_coverage_vs_ffmpeg_{set_name}"] = rate(set_name, "ours_clip") / rate(set_name, "ffmpeg")
    all_ours = sum(totals[(s, "ours")][1] for s in {s for s, _ in totals}) / sum(
        totals[(s, "ours")][0] for s in {s for s, _ in totals})
    all_ffmpeg = sum(totals[(s, "ffmpeg")][1] for s in {s for s, _ in totals}) / sum(
        totals[(s, "ffmpeg")][0] for s in {s for s, _ in totals})
    headline["decode_vs_ffmpeg"] = all_ours / all_ffmpeg
    print()
    print(" ".join(f"{k}={v:.2f}" for k, v in headline.items()))


if __name__ == "__main__":
    main()
