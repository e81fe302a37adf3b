"""COCO -> MindRecord: every box rule counted, exact round trip, bad images, atomicity, the two stages."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from msdet.data import mindrecord as mr
from msdet.data.coco import CocoFormatError, resolve_tree
from msdet.data.meta import mindrecord_files
from msdet.data.mindrecord import BadImageError, convert_tree, read_mindrecord, read_split
from tests.helpers import config, write_params

ROOT = Path(__file__).resolve().parents[1]
CATS = [{"id": 9, "name": "dog", "supercategory": "a"}, {"id": 2, "name": "cat", "supercategory": "a"},
        {"id": 40, "name": "car", "supercategory": "v"}]
CAT, DOG, CAR = 0, 1, 2  # class indices: categories sorted by id (2, 9, 40)

# (image id, width, height, [(bbox xywh, category id, iscrowd)]) -- file order deliberately not by id
TRAIN = [
    (13, 40, 30, [([-20, -5, 10, 3], 9, 0),            # entirely outside -> outside_image
                  ([0, 0, 40, 30], 40, 0)]),           # the whole image
    (10, 64, 48, [([5, 5, 20, 10], 2, 0),
                  ([0, 0, 30, 30], 9, 1),              # crowd
                  ([50, 40, 30, 20], 40, 0)]),         # clipped to (50, 40, 64, 48)
    (11, 50, 40, [([60, 5, 10, 10], 9, 0),             # entirely outside (x1 >= width)
                  ([10, 10, 0.5, 20], 2, 0),           # thinner than min_box_side -> degenerate
                  ([1.5, 2.5, 30, 30.25], 9, 0)]),
    (12, 40, 40, [([0, 0, 10, 10], 2, 1)]),            # only a crowd box -> empty image
    (14, 32, 32, [([-5, -5, 15, 15], 2, 0),            # clipped to (0, 0, 10, 10)
                  ([31.5, 0, 5, 10], 9, 0)]),          # clipped to width 0.5 -> degenerate
    (15, 48, 32, []),                                  # no annotation -> empty image
]
VAL = [
    (20, 40, 40, [([2, 2, 10, 10], 40, 0)]),
    (21, 40, 40, []),
    (22, 40, 40, [([1, 1, 5, 5], 9, 1)]),
]
# What must come back, by image id: boxes x1y1x2y2 and class indices, in annotation-id order.
EXPECTED_TRAIN = {
    10: ([[5, 5, 25, 15], [50, 40, 64, 48]], [CAT, CAR]),
    11: ([[1.5, 2.5, 31.5, 32.75]], [DOG]),
    13: ([[0, 0, 40, 30]], [CAR]),
    14: ([[0, 0, 10, 10]], [CAT]),
}
EXPECTED_VAL = {20: ([[2, 2, 12, 12]], [CAR]), 21: ([], []), 22: ([], [])}
CFG = config("mindrecord", train_shards=2, val_shards=1, workers=1)


def write_split(root: Path, split: str, images: list) -> None:
    (root / split).mkdir(parents=True)
    anns = []
    for iid, w, h, boxes in images:
        rng = np.random.default_rng(iid)
        ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        (root / split / f"{iid:012d}.jpg").write_bytes(buf.tobytes())
        for bbox, cat, crowd in boxes:
            anns.append({"id": 1000 + len(anns), "image_id": iid, "category_id": cat, "bbox": bbox,
                         "area": float(bbox[2] * bbox[3]), "iscrowd": crowd, "segmentation": []})
    data = {"info": {}, "licenses": [], "categories": CATS, "annotations": anns[::-1],
            "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": w, "height": h} for i, w, h, _ in images]}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "coco"
    write_split(root, "train", TRAIN)
    write_split(root, "val", VAL)
    return root


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def check_samples(out: Path, split: str, expected: dict, tree: Path) -> list[dict]:
    samples = list(read_split(out, split))
    assert [s["image_id"] for s in samples] == sorted(expected)
    for s in samples:
        boxes, labels = expected[s["image_id"]]
        assert s["boxes"].dtype == np.float32 and s["boxes"].shape == (len(boxes), 4)
        np.testing.assert_allclose(s["boxes"], np.array(boxes, np.float32).reshape(-1, 4), atol=1e-6)
        assert s["labels"].dtype == np.int32 and s["labels"].tolist() == labels
        raw = (tree / split / f"{s['image_id']:012d}.jpg").read_bytes()
        assert s["image"] == raw
        h, w = cv2.imdecode(np.frombuffer(s["image"], np.uint8), cv2.IMREAD_COLOR).shape[:2]
        assert (s["height"], s["width"]) == (h, w)
    return samples


def test_round_trip_rules_and_stats(tree, tmp_path):
    out = tmp_path / "mr"
    stats = convert_tree(resolve_tree(tree), out, CFG)
    check_samples(out, "train", EXPECTED_TRAIN, tree)
    check_samples(out, "val", EXPECTED_VAL, tree)
    tr, va = stats["train"], stats["val"]
    assert stats["num_classes"] == 3
    assert tr["dropped"] == {"crowd": 2, "outside_image": 2, "degenerate": 2, "empty_image": 2}
    assert (tr["images"], tr["boxes"], tr["clipped_boxes"], tr["skipped_images"]) == (4, 5, 2, 0)
    assert tr["per_class"] == {"cat": 2, "dog": 1, "car": 2}
    assert va["dropped"] == {"crowd": 1, "outside_image": 0, "degenerate": 0, "empty_image": 0}
    assert (va["images"], va["boxes"]) == (3, 1) and va["per_class"] == {"cat": 0, "dog": 0, "car": 1}

    meta = json.loads((out / "meta.json").read_text())
    assert meta["categories"] == [{"id": 2, "name": "cat"}, {"id": 9, "name": "dog"}, {"id": 40, "name": "car"}]
    assert meta["num_classes"] == 3
    assert meta["splits"]["train"] == {"files": ["train.mindrecord0", "train.mindrecord1"], "images": 4, "boxes": 5,
                                       "skipped_files": []}
    assert meta["splits"]["val"] == {"files": ["val.mindrecord0"], "images": 3, "boxes": 1, "skipped_files": []}
    assert set(tr) == {"images", "boxes", "per_class", "dropped", "clipped_boxes", "skipped_images"}
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json", "train.mindrecord0", "train.mindrecord0.db", "train.mindrecord1", "train.mindrecord1.db",
        "val.mindrecord0", "val.mindrecord0.db"]
    # contiguous shards by image id, and each file readable on its own
    assert [s["image_id"] for s in read_mindrecord(out / "train.mindrecord1")] == [13, 14]
    assert [s["image_id"] for s in read_mindrecord(out, "val")] == [20, 21, 22]
    assert [p.name for p in mindrecord_files(out, "train")] == ["train.mindrecord0", "train.mindrecord1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "mr"]


def test_identical_files_with_parallel_workers(tree, tmp_path):
    convert_tree(resolve_tree(tree), tmp_path / "a", CFG)
    convert_tree(resolve_tree(tree), tmp_path / "b", dataclasses.replace(CFG, workers=2))
    a, b = dir_bytes(tmp_path / "a"), dir_bytes(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def test_keep_empty_images_and_min_box_side(tree, tmp_path):
    cfg = dataclasses.replace(CFG, keep_empty_images=True, min_box_side=12.0)
    stats = convert_tree(resolve_tree(tree), tmp_path / "mr", cfg)
    samples = {s["image_id"]: s for s in read_split(tmp_path / "mr", "train")}
    assert sorted(samples) == [10, 11, 12, 13, 14, 15]
    assert samples[12]["boxes"].shape == (0, 4) and samples[15]["labels"].shape == (0,)
    # min side 12 drops (5,5,25,15), (50,40,64,48) and (0,0,10,10) as well
    assert stats["train"]["dropped"] == {"crowd": 2, "outside_image": 2, "degenerate": 5, "empty_image": 0}
    assert samples[10]["boxes"].shape == (0, 4) and samples[11]["labels"].tolist() == [DOG]


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif how == "garbage":
        path.write_bytes(b"this is not an image" * 10)
    elif how == "wrong_size":
        ok, buf = cv2.imencode(".jpg", np.zeros((10, 10, 3), np.uint8))
        path.write_bytes(buf.tobytes())


@pytest.mark.parametrize("how, message", [
    ("missing", "file not found"),
    ("truncated", "truncated JPEG"),
    ("garbage", "cannot be decoded"),
    ("wrong_size", "is 10x10 but its annotation says 50x40"),
])
def test_bad_image_stops_naming_it_and_leaves_no_output(tree, tmp_path, how, message):
    corrupt(tree / "train" / "000000000011.jpg", how)
    with pytest.raises(BadImageError, match=f"000000000011.jpg: {message}.*skip_bad_images"):
        convert_tree(resolve_tree(tree), tmp_path / "mr", CFG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco"]


def test_skip_bad_images_counts_them(tree, tmp_path):
    corrupt(tree / "train" / "000000000011.jpg", "truncated")
    corrupt(tree / "val" / "000000000021.jpg", "missing")
    stats = convert_tree(resolve_tree(tree), tmp_path / "mr", dataclasses.replace(CFG, skip_bad_images=True))
    assert stats["train"]["skipped_images"] == 1 and stats["val"]["skipped_images"] == 1
    meta = json.loads((tmp_path / "mr" / "meta.json").read_text())
    assert meta["splits"]["train"]["skipped_files"] == ["000000000011.jpg: truncated JPEG (no end-of-image marker)"]
    assert meta["splits"]["val"]["skipped_files"] == ["000000000021.jpg: file not found"]
    assert (stats["train"]["images"], stats["train"]["boxes"]) == (3, 4)
    assert stats["train"]["per_class"] == {"cat": 2, "dog": 0, "car": 2}
    expected = {k: v for k, v in EXPECTED_TRAIN.items() if k != 11}
    check_samples(tmp_path / "mr", "train", expected, tree)
    assert [s["image_id"] for s in read_split(tmp_path / "mr", "val")] == [20, 22]


def test_interrupted_conversion_keeps_previous_output(tree, tmp_path, monkeypatch):
    out = tmp_path / "mr"
    out.mkdir()
    (out / "previous.txt").write_text("old")
    (out / "meta.json").write_text("{}")  # a previous output
    closes = []
    original = mr._ShardWriter.close

    def close_then_interrupt(self):
        original(self)
        closes.append(self.path.name)
        if len(closes) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(mr._ShardWriter, "close", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_tree(resolve_tree(tree), out, CFG)
    assert closes == ["train.mindrecord0", "train.mindrecord1"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "previous.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "mr"]


def test_failure_in_val_leaves_no_out_dir(tree, tmp_path):
    corrupt(tree / "val" / "000000000022.jpg", "garbage")
    with pytest.raises(BadImageError, match="000000000022.jpg"):
        convert_tree(resolve_tree(tree), tmp_path / "mr", CFG)
    assert not (tmp_path / "mr").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["coco"]


def test_unknown_category_stops_before_writing(tree, tmp_path):
    path = tree / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(CocoFormatError, match="unknown category id 3"):
        convert_tree(resolve_tree(tree), tmp_path / "mr", CFG)
    assert not (tmp_path / "mr").exists()


def test_writer_sizes_stay_small_for_small_data():
    page, header = mr.writer_sizes(20_000, 2_000_000, 100)
    assert page == 1 << 20 and header <= 1 << 17
    page, header = mr.writer_sizes(900_000, 5_000_000_000, 30_000)
    assert page == 8 << 20 and (1 << 20) <= header <= (16 << 20)


def test_minddataset_reads_all_shards(tree, tmp_path):
    import mindspore.dataset as ds

    convert_tree(resolve_tree(tree), tmp_path / "mr", CFG)
    files = [str(p) for p in mindrecord_files(tmp_path / "mr", "train")]
    dataset = ds.MindDataset(files, columns_list=list(mr.COLUMNS), shuffle=False)
    rows = list(dataset.create_dict_iterator(output_numpy=True, num_epochs=1))
    assert [int(r["image_id"]) for r in rows] == [10, 11, 13, 14]
    np.testing.assert_allclose(rows[0]["boxes"], EXPECTED_TRAIN[10][0])
    assert rows[0]["labels"].tolist() == EXPECTED_TRAIN[10][1]


def run_stage(module: str, params: dict, cwd: Path, monkeypatch) -> None:
    import importlib

    write_params(cwd / "params.yaml", params)
    monkeypatch.chdir(cwd)
    assert importlib.import_module(module).main([]) == 0


SMALL = {"data": {"synthetic": {"num_train": 10, "num_val": 4, "image_size": 96, "num_classes": 5}},
         "mindrecord": {"train_shards": 3, "workers": 1}}


def test_stages_synthetic_then_local_path(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    for cwd in (first, second):
        cwd.mkdir()
        run_stage("stages.download", SMALL, cwd, monkeypatch)
        run_stage("stages.mindrecord", SMALL, cwd, monkeypatch)
    metrics = json.loads((first / "metrics" / "data.json").read_text())
    assert metrics["train"]["images"] == 10 and metrics["val"]["images"] == 4 and metrics["num_classes"] == 5
    assert metrics["train"]["boxes"] == sum(metrics["train"]["per_class"].values()) > 10
    # the whole chain is reproducible to the byte
    assert dir_bytes(first / "data" / "mindrecord") == dir_bytes(second / "data" / "mindrecord")
    assert (first / "metrics" / "data.json").read_bytes() == (second / "metrics" / "data.json").read_bytes()
    # the data statistics and D0's fitted anchors come with the conversion
    assert sorted(p.name for p in (first / "plots" / "data" / "train").iterdir()) == [
        "aspect_ratio.csv", "box_size.csv", "boxes_per_image.csv", "classes.csv", "health.csv"]
    assert dir_bytes(first / "plots" / "data" / "val") == dir_bytes(second / "plots" / "data" / "val")
    fit = json.loads((first / "data" / "mindrecord" / "meta.json").read_text())["d0_anchors"]
    assert fit["input_size"] == 128 and metrics["d0_anchors"]["fit"]["anchor_scale"] == fit["fit"]["anchor_scale"]
    assert 0 <= metrics["d0_anchors"]["default"]["bpr"] <= 1

    # a local COCO tree is used in place through a pointer, and converts to the same records
    third = tmp_path / "third"
    third.mkdir()
    local = {**SMALL, "data": {**SMALL["data"], "source": str(first / "data" / "coco")}}
    run_stage("stages.download", local, third, monkeypatch)
    assert [p.name for p in (third / "data" / "coco").iterdir()] == ["source.json"]
    run_stage("stages.mindrecord", local, third, monkeypatch)
    assert dir_bytes(third / "data" / "mindrecord") == dir_bytes(first / "data" / "mindrecord")


def test_download_stage_never_replaces_a_coco_download(tmp_path, monkeypatch):
    import importlib

    kept = tmp_path / "data" / "coco" / "train2017"
    kept.mkdir(parents=True)
    (kept / "000000000001.jpg").write_bytes(b"x")
    write_params(tmp_path / "params.yaml", SMALL)
    monkeypatch.chdir(tmp_path)
    assert importlib.import_module("stages.download").main([]) == 1
    assert [p.name for p in kept.iterdir()] == ["000000000001.jpg"]


@pytest.mark.parametrize("stage, key", [("stages.download", "data.root"), ("stages.mindrecord", "mindrecord.out_dir")])
def test_stage_refuses_to_replace_a_folder_it_did_not_write(tmp_path, monkeypatch, capsys, stage, key):
    """data.root or mindrecord.out_dir set to a folder of the user's: one line, and the folder is left alone."""
    import importlib

    from msdet.cli import run

    run_stage("stages.download", SMALL, tmp_path, monkeypatch)  # a tree for the mindrecord stage to read
    mine = tmp_path / "my_photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"irreplaceable")
    section, name = key.split(".")
    write_params(tmp_path / "params.yaml", {**SMALL, section: {**SMALL.get(section, {}), name: str(mine)}})
    capsys.readouterr()
    assert run(importlib.import_module(stage).main, []) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {mine}: exists and is not a previous output of this kind (no "
                   f"{'annotations/instances_train.json or source.json' if key == 'data.root' else 'meta.json'} in "
                   f"it); move it away or delete it\n")
    assert [p.name for p in mine.iterdir()] == ["holiday.jpg"]
    assert (mine / "holiday.jpg").read_bytes() == b"irreplaceable"
