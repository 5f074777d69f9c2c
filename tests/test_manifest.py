"""Every manifest format reads into the same table, with the right labels, classes and paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.data.manifest import COLUMNS, ManifestError, detect_format, load_manifest


def _check_table(manifest, n):
    assert list(manifest.table.columns) == list(COLUMNS)
    assert len(manifest) == n
    assert manifest.table["label"].dtype == np.int64
    for label, name in zip(manifest.table["label"], manifest.table["class_name"]):
        assert manifest.classes[label] == name


def test_mmaction_list_with_spaces_and_sidecar_classes(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps(["jump", "run", "swim"]))
    (tmp_path / "train.txt").write_text("a/x.mp4 2\n\n# comment\nb/with space.mp4 0\n")
    manifest = load_manifest(tmp_path / "train.txt", data_root="/data/root", split="train")
    _check_table(manifest, 2)
    assert detect_format(str(tmp_path / "train.txt")) == "mmaction"
    assert manifest.table["path"].tolist() == ["/data/root/a/x.mp4", "/data/root/b/with space.mp4"]
    assert manifest.table["class_name"].tolist() == ["swim", "jump"]
    assert manifest.table["video_id"].tolist() == ["x", "with space"]
    assert set(manifest.table["split"]) == {"train"}
    assert manifest.table["start"].isna().all()


def test_mmaction_list_rejects_bad_line(tmp_path):
    (tmp_path / "l.txt").write_text("a.mp4 1\nb.mp4 notalabel\n")
    with pytest.raises(ManifestError, match=r"l.txt:2"):
        load_manifest(tmp_path / "l.txt", "mmaction")


def test_kinetics_csv(tmp_path):
    (tmp_path / "k.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "riding a bike,abc-123_X,10,20,train\n"
        "abseiling,zzz,0,10,validate\n"
        "riding a bike,q1,5,15,validation\n")
    (tmp_path / "riding a bike").mkdir()
    (tmp_path / "riding a bike" / "q1_000005_000015.mp4").write_bytes(b"x")
    manifest = load_manifest(tmp_path / "k.csv", data_root=str(tmp_path))
    assert detect_format(str(tmp_path / "k.csv")) == "kinetics"
    _check_table(manifest, 3)
    assert manifest.classes == ["abseiling", "riding a bike"]  # sorted
    assert manifest.table["label"].tolist() == [1, 0, 1]
    assert manifest.table["video_id"].tolist() == ["abc-123_X_000010_000020", "zzz_000000_000010", "q1_000005_000015"]
    # flat layout by default, the class folder where the file is there
    assert manifest.table["path"][0] == str(tmp_path / "abc-123_X_000010_000020.mp4")
    assert manifest.table["path"][2] == str(tmp_path / "riding a bike" / "q1_000005_000015.mp4")
    assert manifest.table["split"].tolist() == ["train", "validate", "val"]


def test_kinetics_validation_uses_training_class_list(tmp_path):
    (tmp_path / "val.csv").write_text("label,youtube_id,time_start,time_end\nb,x,0,10\n")
    manifest = load_manifest(tmp_path / "val.csv", classes=["a", "b", "c"])
    assert manifest.table["label"].tolist() == [1]
    with pytest.raises(ManifestError, match="not in the class map"):
        load_manifest(tmp_path / "val.csv", classes=["a"])


def test_something_something_v2(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps(
        {"Pushing something from left to right": "1", "Holding something": "0"}))
    (tmp_path / "validation.json").write_text(json.dumps([
        {"id": "42", "template": "Pushing [something] from left to right", "label": "pushing a cup"},
        {"id": "7", "template": "Holding [something]"}]))
    manifest = load_manifest(tmp_path / "validation.json", data_root="/ssv2/videos", split="val")
    _check_table(manifest, 2)
    assert manifest.classes == ["Holding something", "Pushing something from left to right"]
    assert manifest.table["label"].tolist() == [1, 0]
    assert manifest.table["path"].tolist() == ["/ssv2/videos/42.webm", "/ssv2/videos/7.webm"]
    (tmp_path / "bad.json").write_text(json.dumps([{"id": "1", "template": "Unknown [thing]"}]))
    with pytest.raises(ManifestError, match="not in"):
        load_manifest(tmp_path / "bad.json", "ssv2", labels_json=str(tmp_path / "labels.json"))


def test_folder_per_class(tmp_path):
    for cls, names in {"zebra": ["1.mp4", "2.MKV"], "apple": ["a.avi", "notes.txt"]}.items():
        (tmp_path / cls).mkdir()
        for name in names:
            (tmp_path / cls / name).write_bytes(b"")
    manifest = load_manifest(tmp_path)
    _check_table(manifest, 3)
    assert manifest.classes == ["apple", "zebra"]
    assert manifest.table["label"].tolist() == [0, 1, 1]
    assert all(Path(p).suffix.lower() != ".txt" for p in manifest.table["path"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_own_table_with_times_and_splits(tmp_path, suffix):
    frame = pd.DataFrame({"path": ["v/a.mp4", "/abs/b.mp4"], "label": [1, 0], "start": [1.5, None],
                          "end": [3.0, None], "split": ["train", "validation"]})
    path = tmp_path / f"m{suffix}"
    frame.to_csv(path, index=False) if suffix == ".csv" else frame.to_parquet(path)
    (tmp_path / "classes.json").write_text(json.dumps(["neg", "pos"]))
    manifest = load_manifest(path)
    _check_table(manifest, 2)
    assert manifest.table["path"].tolist() == [str(tmp_path / "v/a.mp4"), "/abs/b.mp4"]
    assert manifest.table["class_name"].tolist() == ["pos", "neg"]
    assert manifest.table["start"][0] == 1.5 and np.isnan(manifest.table["start"][1])
    assert manifest.table["split"].tolist() == ["train", "val"]


def test_own_table_with_class_names_as_labels(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\nx.mp4,dog\ny.mp4,cat\nz.mp4,dog\n")
    manifest = load_manifest(tmp_path / "m.csv")
    assert manifest.classes == ["cat", "dog"]
    assert manifest.table["label"].tolist() == [1, 0, 1]


def test_label_outside_class_map_is_an_error(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps(["only"]))
    (tmp_path / "m.csv").write_text("path,label\nx.mp4,3\n")
    with pytest.raises(ManifestError, match="outside the class map"):
        load_manifest(tmp_path / "m.csv")


def test_save_round_trip_keeps_class_map(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,split\nx.mp4,dog,train\ny.mp4,cat,val\n")
    manifest = load_manifest(tmp_path / "m.csv")
    saved = manifest.save(tmp_path / "out")
    again = load_manifest(saved)
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog"]
    assert again.classes == manifest.classes
    assert again.table["label"].tolist() == manifest.table["label"].tolist()
    assert again.split("val").table["path"].tolist() == [str(tmp_path / "y.mp4")]


def test_missing_manifest_and_unknown_format(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "nope.csv")
    (tmp_path / "m.csv").write_text("path,label\n")
    with pytest.raises(ManifestError, match="unknown manifest format"):
        load_manifest(tmp_path / "m.csv", "tfrecord")
