#!/usr/bin/env python
"""CPU of the server's pulled-stream readers, dozing vs not (``pipelines/serve/sources.py``, ``Dozer``).

Runs N UDP streams of the serving benchmark's camera-like MPEG-TS (``serve_load.py``: 128x128 H.264, 25
fps, a keyframe every 2 s) into the server's own ``SourceReader`` + ``KeyframeSkipper``, half of them
dozing and half not, interleaved in one process -- so both halves share the same machine, load and GIL
at the same moment (these machines are noisy) -- and reads each thread's CPU time from ``/proc``: the
reader threads by half; FFmpeg's UDP receive threads (``udp-rx``, one per stream, which wake for every
datagram whether the reader dozes or not) cannot be told apart by half and are reported for all. No
server and no model: each stream's frame callback plays the windows, 2 s long with a frame every 0.25
s, and an early exit at the window's third frame (``--exit-at``; the demo model's ``auto`` budget
averages 2.7 frames a window), or no exit (``--exit-at 8``).

    python benchmarks/source_readers.py                 # 96 streams, exits at the third frame
    python benchmarks/source_readers.py --exit-at 8     # no early exit: dozing has little to sleep through

The last line holds ``name=value`` pairs: ms of CPU per stream-second in each half, frames decoded per
stream-second (the same in both: dozing leaves nothing out that would have been decoded), the share of
the time the dozing half slept, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve_load import (UdpSender, free_udp_ports, mpegts_bytes, source_frames,  # noqa: E402
                                   thread_cpu_seconds)
from pipelines.serve.sources import (KeyframeSkipper, SourceOptions, SourceReader, open_url,  # noqa: E402
                                     receive_buffer_bytes)
from pipelines.serve.threads import name_os_thread  # noqa: E402

WINDOW_S, FRAMES_PER_WINDOW = 2.0, 8


class PlayedWindows:
    """What a stream session tells its reader (``skip_hint``), played without a server: the frames
    wanted are one every ``WINDOW_S / FRAMES_PER_WINDOW`` from each keyframe (the benchmark's windows
    start on keyframes), none after the exit frame until the next window."""

    def __init__(self, exit_at: int) -> None:
        self.exit_at = exit_at
        self.skip_hint: tuple[float, float] | None = None
        self.window_start: float | None = None

    def on_frame(self, frame) -> bool:  # noqa: ANN001 - a SourceFrame
        t = frame.media_time
        if t is None:
            return True
        if frame.frame.key_frame or self.window_start is None or not 0 <= t - self.window_start < WINDOW_S - 0.002:
            self.window_start = t
        interval = WINDOW_S / FRAMES_PER_WINDOW
        slot = int((t - self.window_start) / interval + 1e-6)
        done = slot + 1 >= min(self.exit_at, FRAMES_PER_WINDOW)
        wanted = self.window_start + (WINDOW_S if done else interval * (slot + 1))
        self.skip_hint = (t, wanted)
        return True


def cpu_by_prefix(prefixes: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds of this process' threads, summed by which prefix their OS name starts with."""
    out = dict.fromkeys(prefixes, 0.0)
    for comm, _, seconds in thread_cpu_seconds(Path(f"/proc/{os.getpid()}")):
        for prefix in prefixes:
            if comm.startswith(prefix):
                out[prefix] += seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=96, help="UDP streams in all, half of them dozing")
    parser.add_argument("--exit-at", type=int, default=3, help="the frame of each window the exit fires at (8: none)")
    parser.add_argument("--settle", type=float, default=9.0,
                        help="seconds before measuring: a reader leaves packets out once it has seen three keyframes")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--manifest", type=Path, default=Path("data/synthetic/manifest.csv"),
                        help="the synthetic test set (make demo writes it)")
    args = parser.parse_args()

    content = source_frames(args.manifest, 25.0)
    ts, duration, fps = mpegts_bytes(content, 25.0, 50)
    ports = free_udp_ports(args.streams)
    sender = UdpSender(ts, duration, ports)

    def send() -> None:
        name_os_thread("udp-send")
        sender.run()

    threading.Thread(target=send, daemon=True).start()
    readers: dict[str, list[SourceReader]] = {"doze": [], "awake": []}
    for i, port in enumerate(ports):
        half = "doze" if i % 2 == 0 else "awake"
        options = SourceOptions(url=f"udp://127.0.0.1:{port}")
        windows = PlayedWindows(args.exit_at)
        # The OS names threads by their first 15 characters: "src:d<port>" / "src:a<port>".
        reader = SourceReader(open_url(options), windows.on_frame, lambda *a: None, name=f"{half[0]}{port}",
                              live=True, follow_clock=False, skipper=KeyframeSkipper(lambda w=windows: w.skip_hint),
                              doze_buffer_bytes=receive_buffer_bytes(options) if half == "doze" else 0)
        reader.start()
        readers[half].append(reader)
    time.sleep(args.settle)

    prefixes = ("src:d", "src:a", "udp-rx")
    cpu0, started = cpu_by_prefix(prefixes), time.monotonic()
    decoded0 = {h: sum(r.frames_decoded for r in rs) for h, rs in readers.items()}
    dozed0 = sum(r.dozer.dozed_s for r in readers["doze"] if r.dozer is not None)
    time.sleep(args.seconds)
    cpu1, elapsed = cpu_by_prefix(prefixes), time.monotonic() - started
    sender.halt.set()
    results = {}
    for half, prefix in (("doze", "src:d"), ("awake", "src:a")):
        n = len(readers[half])
        results[f"{half}_ms_per_stream_s"] = round(1e3 * (cpu1[prefix] - cpu0[prefix]) / elapsed / n, 3)
        results[f"{half}_decoded_per_stream_s"] = round(
            (sum(r.frames_decoded for r in readers[half]) - decoded0[half]) / elapsed / n, 2)
    results["udp_rx_ms_per_stream_s"] = round(1e3 * (cpu1["udp-rx"] - cpu0["udp-rx"]) / elapsed / args.streams, 3)
    dozed = sum(r.dozer.dozed_s for r in readers["doze"] if r.dozer is not None) - dozed0
    results["dozed_share"] = round(dozed / elapsed / len(readers["doze"]), 3)
    results["awake_vs_doze"] = round(results["awake_ms_per_stream_s"] / max(results["doze_ms_per_stream_s"], 1e-9), 3)
    print(f"{args.streams} UDP streams on {os.cpu_count()} CPUs, exit at frame {args.exit_at} of {FRAMES_PER_WINDOW}, "
          f"{args.seconds:g} s measured: the dozing half {results['doze_ms_per_stream_s']:.2f} ms of CPU per "
          f"stream-second, the other {results['awake_ms_per_stream_s']:.2f} ({results['awake_vs_doze']:.2f}x); "
          f"asleep {results['dozed_share']:.0%} of the time; FFmpeg's UDP receive threads "
          f"{results['udp_rx_ms_per_stream_s']:.2f} ms/s per stream on top, in both halves", flush=True)
    print(" ".join(f"{k}={v}" for k, v in results.items()), flush=True)
    os._exit(0)  # the readers are daemon threads blocked in FFmpeg reads


if __name__ == "__main__":
    main()
