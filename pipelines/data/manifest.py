"""Dataset manifests: every supported format is read into one table.

The table (a :class:`pandas.DataFrame`) has one row per video and these columns:

=============  =======  ==========================================================
``video_id``   str      unique id (file stem unless the format names one)
``path``       str      local path or any URI pyarrow can open (``s3://``, ``gs://``)
``label``      int64    class index into :attr:`Manifest.classes`
``class_name`` str      the class's name
``start``      float64  optional start time in seconds (NaN: from the beginning)
``end``        float64  optional end time in seconds (NaN: to the end)
``split``      str      ``train`` / ``val`` / ``test`` or ``""`` when unknown
=============  =======  ==========================================================

Supported formats (``load_manifest(..., format=...)``):

``mmaction``  mmaction2 video list: ``relative/path.mp4 <label>`` per line, paths under ``data_root``.
``kinetics``  Kinetics CSV ``label,youtube_id,time_start,time_end[,split]`` with header; files are
              ``{youtube_id}_{start:06d}_{end:06d}.mp4`` under ``data_root`` (optionally in a folder
              per class); classes are the sorted label names.
``ssv2``      Something-Something v2: ``labels.json`` (template -> index) plus a train/validation
              JSON list of ``{"id", "template"}``; the template's ``[brackets]`` are removed before
              the lookup; files are ``{id}.webm`` under ``data_root``.
``folder``    ``root/<class>/<video>`` with classes sorted by name.
``table``     our own CSV or Parquet with columns ``path,label[,start,end][,split]``; ``label`` is an
              index (with a ``classes.json`` next to the table) or a class name.

The class map is saved with every dataset (:meth:`Manifest.save`) as ``classes.json``: a JSON list of
class names whose position is the label.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow.csv as pa_csv
import pyarrow.fs as pa_fs
import pyarrow.parquet as pa_parquet

COLUMNS = ("video_id", "path", "label", "class_name", "start", "end", "split")
FORMATS = ("mmaction", "kinetics", "ssv2", "folder", "table")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")


class ManifestError(ValueError):
    """A manifest that cannot be read, with the file and line that are wrong."""


@dataclass
class Manifest:
    """A table of videos plus the class map that gives the labels their names."""

    table: pd.DataFrame
    classes: list[str]

    def __len__(self) -> int:
        return len(self.table)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> "Manifest":
        """The rows of one split (``train``/``val``/``test``); same class map."""
        rows = self.table[self.table["split"] == name].reset_index(drop=True)
        return Manifest(rows, self.classes)

    def save(self, directory: str | Path) -> Path:
        """Write ``manifest.parquet`` and ``classes.json`` into ``directory``; returns the table path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "classes.json").write_text(json.dumps(self.classes, indent=1))
        path = directory / "manifest.parquet"
        self.table.to_parquet(path, index=False)
        return path


# --------------------------------------------------------------------------- filesystem helpers


def _is_uri(path: str) -> bool:
    return "://" in path


def join_path(root: str | None, relative: str) -> str:
    """Join a manifest's relative path onto its data root (local path or URI)."""
    if root is None or _is_uri(relative) or Path(relative).is_absolute():
        return relative
    if _is_uri(root):
        return posixpath.join(root, relative)
    return str(Path(root) / relative)


def read_bytes(path: str) -> bytes:
    """Read a whole (small) file from a local path or any URI pyarrow supports."""
    if not _is_uri(path):
        return Path(path).read_bytes()
    filesystem, inner = pa_fs.FileSystem.from_uri(path)
    with filesystem.open_input_stream(inner) as stream:
        return stream.read()


def _read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def _exists(path: str) -> bool:
    if not _is_uri(path):
        return Path(path).exists()
    filesystem, inner = pa_fs.FileSystem.from_uri(path)
    return filesystem.get_file_info(inner).type != pa_fs.FileType.NotFound


def _parent(path: str) -> str:
    return posixpath.dirname(path) if _is_uri(path) else str(Path(path).parent)


# --------------------------------------------------------------------------- table construction


def _make_table(
    paths: Sequence[str],
    labels: Sequence[int],
    classes: Sequence[str],
    *,
    video_ids: Sequence[str] | None = None,
    starts: Sequence[float] | None = None,
    ends: Sequence[float] | None = None,
    splits: Sequence[str] | str = "",
) -> pd.DataFrame:
    n = len(paths)
    labels_arr = np.asarray(labels, dtype=np.int64)
    if n and (labels_arr.min() < 0 or labels_arr.max() >= len(classes)):
        bad = int(labels_arr[(labels_arr < 0) | (labels_arr >= len(classes))][0])
        raise ManifestError(f"label {bad} is outside the class map of {len(classes)} classes")
    if video_ids is None:
        video_ids = [posixpath.splitext(posixpath.basename(str(p)))[0] for p in paths]
    nan = np.full(n, np.nan)
    table = pd.DataFrame(
        {
            "video_id": pd.Series(video_ids, dtype=str),
            "path": pd.Series(paths, dtype=str),
            "label": labels_arr,
            "class_name": pd.Series([classes[i] for i in labels_arr], dtype=str),
            "start": np.asarray(starts if starts is not None else nan, dtype=np.float64),
            "end": np.asarray(ends if ends is not None else nan, dtype=np.float64),
            "split": pd.Series([splits] * n if isinstance(splits, str) else list(splits), dtype=str),
        },
        columns=list(COLUMNS),
    )
    return table


# --------------------------------------------------------------------------- the five readers


def read_mmaction_list(path: str, data_root: str | None = None, split: str = "",
                       classes: Sequence[str] | None = None) -> Manifest:
    """mmaction2's ``VideoDataset`` list: ``relative/path.mp4 <label>`` per line.

    The class names come from ``classes`` (or a ``classes.json``/``classes.txt`` beside the list);
    without one, class ``i`` is named ``"i"``.
    """
    paths, labels = [], []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # The path may contain spaces: the label is the last whitespace-separated field.
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise ManifestError(f"{path}:{lineno}: expected '<path> <integer label>', got {line!r}")
        paths.append(join_path(data_root, parts[0]))
        labels.append(int(parts[1]))
    if classes is None:
        classes = _sidecar_classes(_parent(path))
    if classes is None:
        classes = [str(i) for i in range(max(labels, default=-1) + 1)]
    return Manifest(_make_table(paths, labels, list(classes), splits=split), list(classes))


def read_kinetics_csv(path: str, data_root: str | None = None, split: str | None = None,
                      classes: Sequence[str] | None = None) -> Manifest:
    """The Kinetics annotation CSV (``label,youtube_id,time_start,time_end[,split]``).

    Files are ``{youtube_id}_{start:06d}_{end:06d}.mp4`` under ``data_root``, either directly or in
    a folder named after the class (both layouts exist in the wild; the flat one is tried first).
    Classes are the sorted label names unless ``classes`` gives the full list (a validation CSV
    must use the training set's class list).
    """
    frame = pd.read_csv(io.StringIO(_read_text(path)), dtype={"youtube_id": str})
    missing = {"label", "youtube_id", "time_start", "time_end"} - set(frame.columns)
    if missing:
        raise ManifestError(f"{path}: Kinetics CSV lacks columns {sorted(missing)}")
    classes = list(classes) if classes is not None else sorted(frame["label"].astype(str).unique())
    index = {name: i for i, name in enumerate(classes)}
    names = frame["label"].astype(str)
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ManifestError(f"{path}: labels not in the class map: {unknown[:5]}")
    starts = frame["time_start"].astype(float)
    ends = frame["time_end"].astype(float)
    stems = [f"{yid}_{int(s):06d}_{int(e):06d}" for yid, s, e in zip(frame["youtube_id"], starts, ends)]
    paths = []
    for stem, name in zip(stems, names):
        flat = join_path(data_root, f"{stem}.mp4")
        nested = join_path(data_root, f"{name}/{stem}.mp4")
        # Files are trimmed to [time_start, time_end] already in the released dataset, so the
        # times are kept for reference only and not applied again at decode time.
        paths.append(nested if data_root and not _is_uri(flat) and not Path(flat).exists()
                     and Path(nested).exists() else flat)
    if split is not None:
        splits: Sequence[str] | str = split
    elif "split" in frame.columns:
        splits = [_normalise_split(s) for s in frame["split"].astype(str)]
    else:
        splits = ""
    labels = [index[n] for n in names]
    return Manifest(_make_table(paths, labels, classes, video_ids=stems, splits=splits), classes)


def read_ssv2(labels_json: str, list_json: str, data_root: str | None = None, split: str = "") -> Manifest:
    """Something-Something v2: ``labels.json`` maps template -> index; the list has ``id``/``template``."""
    label_map = json.loads(_read_text(labels_json))
    classes = [name for name, _ in sorted(label_map.items(), key=lambda kv: int(kv[1]))]
    entries = json.loads(_read_text(list_json))
    paths, labels, ids = [], [], []
    for entry in entries:
        template = entry["template"].replace("[", "").replace("]", "")
        if template not in label_map:
            raise ManifestError(f"{list_json}: video {entry['id']}: template {template!r} not in {labels_json}")
        ids.append(str(entry["id"]))
        paths.append(join_path(data_root, f"{entry['id']}.webm"))
        labels.append(int(label_map[template]))
    return Manifest(_make_table(paths, labels, classes, video_ids=ids, splits=split), classes)


def read_folder(root: str, split: str = "", extensions: Iterable[str] = VIDEO_EXTENSIONS) -> Manifest:
    """``root/<class>/<video>``: one folder per class, classes sorted by name (local paths)."""
    base = Path(root)
    if not base.is_dir():
        raise ManifestError(f"{root}: not a directory")
    extensions = tuple(e.lower() for e in extensions)
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for video in sorted((base / name).rglob("*")):
            if video.is_file() and video.suffix.lower() in extensions:
                paths.append(str(video))
                labels.append(label)
    ids = [str(Path(p).relative_to(base).with_suffix("")).replace("/", "__") for p in paths]
    return Manifest(_make_table(paths, labels, classes, video_ids=ids, splits=split), classes)


def read_table(path: str, data_root: str | None = None, classes: Sequence[str] | None = None) -> Manifest:
    """Our own CSV/Parquet: ``path,label[,start,end][,split]``.

    Relative paths are taken relative to ``data_root`` or, by default, the table's own folder.
    Integer labels index ``classes`` (default: the ``classes.json`` beside the table); string labels
    are class names (sorted to make the class map when none is given).
    """
    if path.endswith(".parquet"):
        data = read_bytes(path)
        frame = pa_parquet.read_table(io.BytesIO(data)).to_pandas()
    else:
        frame = pa_csv.read_csv(io.BytesIO(read_bytes(path))).to_pandas()
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise ManifestError(f"{path}: table lacks columns {sorted(missing)}")
    root = data_root if data_root is not None else _parent(path)
    if classes is None:
        classes = _sidecar_classes(_parent(path))
    if pd.api.types.is_integer_dtype(frame["label"]):
        labels = frame["label"].to_numpy()
        if classes is None:
            classes = [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
    else:
        names = frame["label"].astype(str)
        if classes is None:
            classes = sorted(names.unique())
        index = {n: i for i, n in enumerate(classes)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise ManifestError(f"{path}: labels not in the class map: {unknown[:5]}")
        labels = np.array([index[n] for n in names])
    paths = [join_path(root, str(p)) for p in frame["path"]]
    ids = [str(v) for v in frame["video_id"]] if "video_id" in frame.columns else None
    starts = frame["start"].astype(float).to_numpy() if "start" in frame.columns else None
    ends = frame["end"].astype(float).to_numpy() if "end" in frame.columns else None
    splits = [_normalise_split(s) for s in frame["split"].astype(str)] if "split" in frame.columns else ""
    table = _make_table(paths, labels, list(classes), video_ids=ids, starts=starts, ends=ends, splits=splits)
    return Manifest(table, list(classes))


# --------------------------------------------------------------------------- dispatch


def detect_format(path: str) -> str:
    """Guess a manifest's format from its name and first line."""
    if not _is_uri(path) and Path(path).is_dir():
        return "folder"
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "table"
    if lower.endswith(".json"):
        return "ssv2"
    first = next((line for line in _read_text(path).splitlines() if line.strip()), "")
    header = [h.strip() for h in first.split(",")]
    if {"label", "youtube_id"} <= set(header):
        return "kinetics"
    if {"path", "label"} <= set(header):
        return "table"
    return "mmaction"


def load_manifest(path: str | Path, format: str = "auto", *, data_root: str | None = None,
                  split: str | None = None, labels_json: str | None = None,
                  classes: Sequence[str] | None = None) -> Manifest:
    """Read any supported manifest into a :class:`Manifest`.

    ``split`` assigns a split to every row (formats that carry a split column keep theirs when
    ``split`` is None). For ``ssv2``, ``path`` is the train/validation list and ``labels_json`` the
    template map (default: ``labels.json`` beside the list).
    """
    path = str(path)
    if format != "auto" and format not in FORMATS:
        raise ManifestError(f"unknown manifest format {format!r}; choose one of {', '.join(FORMATS)}")
    if not _exists(path):
        raise ManifestError(f"{path}: no such manifest")
    if format == "auto":
        format = detect_format(path)
    if format == "mmaction":
        return read_mmaction_list(path, data_root, split or "", classes)
    if format == "kinetics":
        return read_kinetics_csv(path, data_root, split, classes)
    if format == "ssv2":
        labels_json = labels_json or join_path(_parent(path), "labels.json")
        return read_ssv2(labels_json, path, data_root or _parent(path), split or "")
    if format == "folder":
        return read_folder(path, split or "")
    manifest = read_table(path, data_root, classes)
    if split is not None:
        manifest.table["split"] = split
    return manifest


def _sidecar_classes(directory: str) -> list[str] | None:
    """A ``classes.json`` (list) or ``classes.txt`` (one per line) saved beside a manifest."""
    for name in ("classes.json", "classes.txt"):
        candidate = join_path(directory, name)
        if _exists(candidate):
            text = _read_text(candidate)
            return json.loads(text) if name.endswith(".json") else [l.strip() for l in text.splitlines() if l.strip()]
    return None


def _normalise_split(value: str) -> str:
    value = value.strip().lower()
    return {"validation": "val", "valid": "val", "training": "train", "testing": "test", "nan": ""}.get(value, value)
