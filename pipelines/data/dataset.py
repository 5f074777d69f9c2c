"""The streaming data path: manifest -> Ray Data (PyAV decode in tasks) -> DALI -> model batches.

::

    manifest rows ──► blocks of a few rows ──► map_batches(decode_batch) ──► clips uint8 [T,S,S,3]
                                               (PyAV in Ray tasks, one CPU each)          │
    Train worker: iter_batches ──► ClipAugmenter (DALI, worker's GPU or CPU) ──► [B,T,3,H,W] float

Nothing materialises the dataset: Ray Data streams blocks through the decode tasks with bounded
object-store use, each block holding about ``target_block_bytes`` of decoded clips. Every video's
fate (ok, repaired, skipped with a reason) goes to an optional :class:`~pipelines.data.report.DataReport`
actor, and skipped videos are dropped inside the same task that found them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np

from pipelines.data.decode import ClipResult, DecodeConfig, decode_clip
from pipelines.data.manifest import Manifest

ROW_COLUMNS = ("video_id", "path", "label", "start", "end")


@dataclass(frozen=True)
class PipelineConfig:
    decode: DecodeConfig = DecodeConfig()
    target_block_bytes: int = 64 * 1024 * 1024
    """Decoded bytes per Ray Data block (the manifest is cut into blocks of this many clips' worth)."""
    shuffle: bool = False
    """Shuffle the video order (a new order every epoch)."""
    seed: int | None = None
    """Seed for the shuffle and the training samplers (None: fresh randomness every epoch)."""
    decode_cpus: float = 1.0
    """CPUs reserved by each decode task."""
    stream_rows: int = 8
    """A decode task hands on its clips every this many videos instead of once at the end of its
    block, so the first batch of an epoch waits for a few videos, not for a whole block."""


def clip_bytes(decode: DecodeConfig) -> int:
    return decode.num_frames * decode.size * decode.size * 3


def decode_rows(rows: dict[str, np.ndarray], decode: DecodeConfig, *, keep_skipped: bool = False,
                seed: int | None = None, report: Any = None) -> dict[str, np.ndarray] | None:
    """Decode a batch of manifest rows (columnar numpy) into clips.

    This is the function Ray Data runs in its tasks and the data doctor runs on every entry.
    ``keep_skipped`` keeps a row (with an all-zero clip) for each skipped video, for the doctor;
    the training stream drops them here. ``report`` is a :class:`DataReport` actor handle or None.
    Returns None when no row is kept.
    """
    n = len(rows["path"])
    results: list[ClipResult] = []
    for i in range(n):
        rng = None
        if decode.training:
            # A seeded run gives each video its own stream; unseeded runs draw fresh offsets each epoch.
            rng = np.random.default_rng(None if seed is None else [seed, zlib.crc32(str(rows["video_id"][i]).encode())])
        start = rows["start"][i] if "start" in rows else None
        end = rows["end"][i] if "end" in rows else None
        results.append(decode_clip(str(rows["path"][i]), decode, start=start, end=end, rng=rng))
    if report is not None:
        report.add.remote([{"path": str(rows["path"][i]), "status": r.status, "reason": r.reason}
                           for i, r in enumerate(results)])
    keep = [i for i, r in enumerate(results) if keep_skipped or r.usable]
    if not keep:
        return None
    blank = np.zeros((decode.num_frames, decode.size, decode.size, 3), dtype=np.uint8)
    return {
        "clip": np.stack([results[i].clip if results[i].usable else blank for i in keep]),
        "frame_indices": np.stack([results[i].indices if results[i].usable
                                   else np.full(decode.num_frames, -1, dtype=np.int64) for i in keep]),
        "label": np.asarray(rows["label"], dtype=np.int64)[keep],
        "video_id": np.asarray(rows["video_id"], dtype=object)[keep],
        "path": np.asarray(rows["path"], dtype=object)[keep],
        "status": np.array([results[i].status for i in keep], dtype=object),
        "reason": np.array([results[i].reason for i in keep], dtype=object),
    }


def build_clip_dataset(manifest: Manifest, config: PipelineConfig, *, report: Any = None,
                       keep_skipped: bool = False):
    """A lazy, streaming Ray Dataset of decoded clips for one manifest (typically one split).

    Columns: ``clip`` uint8 ``[T,S,S,3]``, ``frame_indices`` int64 ``[T]`` (source frame of each clip
    frame), ``label``, ``video_id``, ``path``, ``status``, ``reason``.
    """
    import ray.data

    table = manifest.table[list(ROW_COLUMNS)]
    if len(table) == 0:
        raise ValueError("the manifest has no videos")
    if config.shuffle:
        table = table.sample(frac=1.0, random_state=config.seed).reset_index(drop=True)
    rows_per_block = max(1, config.target_block_bytes // clip_bytes(config.decode))
    chunks = [table.iloc[i:i + rows_per_block] for i in range(0, len(table), rows_per_block)]
    # Decoding is the expensive step: give it at least a few blocks per CPU even for small sets.
    if len(chunks) < 4 * _cluster_cpus() and len(table) > len(chunks):
        per = max(1, len(table) // (4 * _cluster_cpus()))
        chunks = [table.iloc[i:i + per] for i in range(0, len(table), per)]
    ds = ray.data.from_pandas(chunks)
    if config.shuffle:
        ds = ds.randomize_block_order(seed=config.seed)
    return ds.map_batches(
        _decode_block,
        batch_size=None,  # one task decodes one block, so output blocks stay ~target_block_bytes
        batch_format="numpy",
        num_cpus=config.decode_cpus,
        fn_kwargs={"decode": config.decode, "keep_skipped": keep_skipped, "seed": config.seed, "report": report,
                   "stream_rows": config.stream_rows},
    )


def _decode_block(rows: dict[str, np.ndarray], *, stream_rows: int, **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data's view of :func:`decode_rows`, streaming ``stream_rows`` videos at a time; a slice
    whose videos were all skipped yields nothing (an empty batch would lose the clip column's
    tensor type)."""
    n = len(rows["path"])
    step = max(1, stream_rows)
    for start in range(0, n, step):
        batch = decode_rows({k: v[start:start + step] for k, v in rows.items()}, **kwargs)
        if batch is not None:
            yield batch


def _cluster_cpus() -> int:
    import ray

    try:
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    except Exception:  # Ray not initialised yet: Ray Data will start it with its own defaults
        return 2


def iter_model_batches(dataset, augmenter, batch_size: int, *, drop_last: bool = False,
                       prefetch_batches: int = 2, local_shuffle_buffer_size: int | None = None,
                       background: bool = True) -> Iterator[dict[str, Any]]:
    """Batches for the model: ``video`` float ``[B,T,3,H,W]`` on the augmenter's device, ``label``,
    ``video_id``. ``dataset`` is a Ray Dataset or a Ray Train dataset shard (``DataIterator``).

    With ``background`` (the default) a thread starts fetching Ray Data batches and running the DALI
    stage as soon as this is called, and keeps up to ``prefetch_batches`` ahead of the consumer, so
    augmentation overlaps the training step instead of adding to it (DALI and PyTorch both release
    the GIL while they compute), and an epoch's start-up (planning, the first decode tasks) can
    overlap other work if the iterator is made early. Errors in the thread are raised by ``next``;
    ``close()`` stops the thread.
    """
    raw_batches = dataset.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                       prefetch_batches=prefetch_batches,
                                       local_shuffle_buffer_size=local_shuffle_buffer_size)
    model_batches = (_to_model_batch(batch, augmenter) for batch in raw_batches if len(batch["label"]))
    if not background:
        return model_batches
    return BackgroundIterator(model_batches, max(1, prefetch_batches))


def _to_model_batch(batch: dict[str, np.ndarray], augmenter) -> dict[str, Any]:
    import torch

    video = augmenter(batch["clip"])
    return {
        "video": video,
        "label": torch.tensor(batch["label"], dtype=torch.int64, device=video.device),
        "video_id": list(batch["video_id"]),
        "frame_indices": batch["frame_indices"],
    }


_END = object()


class BackgroundIterator:
    """Run ``items`` in a daemon thread, started at once, ``depth`` items ahead; ``next`` re-raises
    the thread's errors; ``close()`` (or dropping the iterator) stops the thread and closes ``items``."""

    def __init__(self, items: Iterator[Any], depth: int) -> None:
        import queue
        import threading

        self._buffer: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._finished = False
        # The thread holds the buffer and the event, not this object, so dropping it runs __del__.
        self._thread = threading.Thread(target=_produce, args=(items, self._buffer, self._stop),
                                        name="model-batches", daemon=True)
        self._thread.start()

    def __iter__(self) -> "BackgroundIterator":
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        item = self._buffer.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._finished = True
        self._stop.set()
        self._thread.join(timeout=10)

    def __del__(self) -> None:
        self._stop.set()  # an abandoned iterator must not keep its producer (and its Ray Data iterator) alive


def _produce(items: Iterator[Any], buffer, stop) -> None:
    """BackgroundIterator's thread: ``items`` into ``buffer`` until done or ``stop`` is set."""
    import queue

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in items:
            if not put(item):
                return
        put(_END)
    except BaseException as error:  # handed to the consumer, which raises it
        put(error)
    finally:
        close = getattr(items, "close", None)
        if stop.is_set() and close is not None:
            close()  # the consumer left early: release the Ray Data iterator


def for_split(config: PipelineConfig, training: bool) -> PipelineConfig:
    """The same pipeline with training-time (random) or evaluation-time (centre) sampling."""
    return replace(config, decode=replace(config.decode, training=training), shuffle=training and config.shuffle)


def decode_manifest_locally(manifest: Manifest, decode: DecodeConfig, *, keep_skipped: bool = True,
                            workers: int = 1, chunk: int = 8) -> Iterator[dict[str, np.ndarray]]:
    """Run :func:`decode_rows` over a manifest without Ray (same function, local processes)."""
    table = manifest.table[list(ROW_COLUMNS)]
    batches = [{c: part[c].to_numpy() for c in ROW_COLUMNS}
               for part in (table.iloc[i:i + chunk] for i in range(0, len(table), chunk))]
    if workers <= 1:
        for rows in batches:
            batch = decode_rows(rows, decode, keep_skipped=keep_skipped)
            if batch is not None:
                yield batch
        return
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor(workers) as pool:
        for batch in pool.map(partial(decode_rows, decode=decode, keep_skipped=keep_skipped), batches):
            if batch is not None:
                yield batch

