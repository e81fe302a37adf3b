"""The embedded synthetic set: deterministic bytes, exact COCO schema, shapes that differ by class."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from msdet.data import synthetic
from msdet.data.synthetic import CATEGORIES, generate_synthetic, make_image
from tests.helpers import config

# the generator's widest setting: all 6 classes, log-uniform sizes, any rotation
CFG = config("data.synthetic", num_train=12, num_val=5, image_size=112, seed=11, num_classes=6,
             size_sampling="log_uniform", max_rotation_deg=180.0)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "coco"
    generate_synthetic(root, CFG, workers=1)
    return root


def test_same_seed_same_bytes_even_in_parallel(tree, tmp_path):
    again = tmp_path / "again"
    summary = generate_synthetic(again, CFG, workers=2)
    a, b = tree_bytes(tree), tree_bytes(again)
    assert len(a) == CFG.num_train + CFG.num_val + 2
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert summary["train"]["images"] == 12 and summary["val"]["images"] == 5


def test_different_seed_different_data(tree, tmp_path):
    other = tmp_path / "other"
    generate_synthetic(other, dataclasses.replace(CFG, seed=12), workers=1)
    a, b = tree_bytes(tree), tree_bytes(other)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a) == len(a)


def test_coco_schema_loads_in_pycocotools(tree):
    for split, count in (("train", CFG.num_train), ("val", CFG.num_val)):
        raw = json.loads((tree / "annotations" / f"instances_{split}.json").read_text())
        assert set(raw) == {"info", "licenses", "images", "annotations", "categories"}
        coco = COCO(str(tree / "annotations" / f"instances_{split}.json"))
        assert len(coco.getImgIds()) == count == len(list((tree / split).glob("*.jpg")))
        assert len(coco.getAnnIds()) == len(raw["annotations"]) > count
        assert sorted(coco.getCatIds()) == [c["id"] for c in CATEGORIES]
        for img in coco.loadImgs(coco.getImgIds()):
            assert set(img) >= {"id", "file_name", "width", "height"}
            pixels = cv2.imread(str(tree / split / img["file_name"]))
            assert pixels.shape == (img["height"], img["width"], 3)
        for ann in coco.loadAnns(coco.getAnnIds()):
            assert set(ann) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd", "segmentation"}
            assert ann["iscrowd"] == 0
            img = coco.imgs[ann["image_id"]]
            mask = coco.annToMask(ann)
            # area and box describe the drawn polygon
            assert ann["area"] == pytest.approx(mask.sum(), rel=0.2, abs=6)
            x, y, w, h = ann["bbox"]
            poly = np.array(ann["segmentation"][0]).reshape(-1, 2)
            assert np.allclose([*poly.min(0), *(poly.max(0) - poly.min(0))], ann["bbox"], atol=0.03)
            ys, xs = np.nonzero(mask)
            assert x - 1 <= xs.min() and xs.max() + 1 <= x + w + 1 and y - 1 <= ys.min() and ys.max() + 1 <= y + h + 1
            assert 0 <= x and 0 <= y and x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
    train = json.loads((tree / "annotations" / "instances_train.json").read_text())
    val = json.loads((tree / "annotations" / "instances_val.json").read_text())
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}


def test_categories_non_contiguous_and_many():
    ids = [c["id"] for c in CATEGORIES]
    assert len(ids) >= 5 and len(set(c["name"] for c in CATEGORIES)) == len(ids)
    assert ids == sorted(ids) and ids != list(range(ids[0], ids[0] + len(ids)))


def test_object_counts_sizes_overlap_and_aspect(tree):
    coco = COCO(str(tree / "annotations" / "instances_train.json"))
    non_square = 0
    for img_id, img in coco.imgs.items():
        w, h, s = img["width"], img["height"], CFG.image_size
        non_square += w != h
        assert 0.75 * s - 1 <= w <= 1.25 * s + 1 and 0.75 * s - 1 <= h <= 1.25 * s + 1
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        assert CFG.min_objects <= len(anns) <= CFG.max_objects
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)
        side = boxes[:, 2:].max(axis=1) / min(w, h)
        assert np.all(side >= CFG.min_object_frac - 0.01) and np.all(side <= CFG.max_object_frac + 0.01)
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
        for i in range(len(xyxy)):
            for j in range(i):
                lt, rb = np.maximum(xyxy[i, :2], xyxy[j, :2]), np.minimum(xyxy[i, 2:], xyxy[j, 2:])
                inter = np.prod(np.clip(rb - lt, 0, None))
                union = np.prod(boxes[i, 2:]) + np.prod(boxes[j, 2:]) - inter
                assert inter / union < synthetic.MAX_PAIR_IOU + 0.01
    assert 0 < non_square < len(coco.imgs)


def _shape_features(mask: np.ndarray) -> np.ndarray:
    """Stretch- and rotation-tolerant shape descriptors: solidity, extent in the min-area rectangle, holes."""
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    outer = max(contours, key=cv2.contourArea)
    area = float(mask.sum())
    (_, _), (rw, rh), _ = cv2.minAreaRect(outer)
    holes = float(np.sum(hierarchy[0, :, 3] >= 0) > 0)
    return np.array([area / cv2.contourArea(cv2.convexHull(outer)), area / (rw * rh), holes])


def test_classes_differ_in_shape_not_colour():
    """Shape descriptors separate the classes; the object colour does not."""
    cfg = dataclasses.replace(CFG, image_size=128, min_object_frac=0.3, max_object_frac=0.6, max_objects=3)
    feats, colours, labels = [], [], []
    for i in range(48):
        data, w, h, objects = make_image(cfg, "train", i)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        obj = objects[-1]  # drawn last: fully visible
        poly = np.array(obj["segmentation"][0]).reshape(-1, 2)
        mask = np.zeros((h * 4, w * 4), np.uint8)
        cv2.fillPoly(mask, [np.round(poly * 4).astype(np.int32)], 1)
        feats.append(_shape_features(mask))
        inner = cv2.erode(cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST), np.ones((3, 3), np.uint8))
        colours.append(img[inner > 0].mean(axis=0) if inner.any() else np.zeros(3))
        labels.append(obj["category_id"])
    feats, colours, labels = np.array(feats), np.array(colours), np.array(labels)
    assert len(set(labels.tolist())) >= 5

    def nearest_centroid_accuracy(x: np.ndarray) -> float:
        x = (x - x.mean(0)) / (x.std(0) + 1e-9)
        cats = np.unique(labels)
        cent = np.stack([x[labels == c].mean(0) for c in cats])
        pred = cats[np.argmin(((x[:, None] - cent[None]) ** 2).sum(-1), axis=1)]
        return float((pred == labels).mean())

    assert nearest_centroid_accuracy(feats) >= 0.9
    assert nearest_centroid_accuracy(colours) <= 0.6


def test_objects_are_visible_against_the_background(tree):
    coco = COCO(str(tree / "annotations" / "instances_train.json"))
    contrast = []
    for img_id, img in coco.imgs.items():
        pixels = cv2.imread(str(tree / "train" / img["file_name"])).astype(np.float32)
        top = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))[-1]
        mask = coco.annToMask(top)
        inner = cv2.erode(mask, np.ones((3, 3), np.uint8))
        band = cv2.dilate(mask, np.ones((5, 5), np.uint8)) - cv2.dilate(mask, np.ones((3, 3), np.uint8))
        if inner.any() and band.any():
            contrast.append(np.linalg.norm(pixels[inner > 0].mean(0) - pixels[band > 0].mean(0)))
    assert np.median(contrast) > 60 and np.mean(np.array(contrast) > 30) >= 0.8


def test_failed_generation_leaves_previous_tree(tree, tmp_path, monkeypatch):
    root = tmp_path / "coco"
    root.mkdir()
    (root / "old.txt").write_text("previous")
    (root / "source.json").write_text('{"path": "/elsewhere"}')  # a previous output: a pointer

    def broken(cfg, split, index):
        if split == "val":
            raise RuntimeError("boom")
        return make_image(cfg, split, index)

    monkeypatch.setattr(synthetic, "make_image", broken)
    with pytest.raises(RuntimeError, match="boom"):
        generate_synthetic(root, CFG, workers=1)
    assert sorted(p.name for p in root.iterdir()) == ["old.txt", "source.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco"]


def test_class_count_rotation_and_size_sampling_knobs(tmp_path):
    cfg = dataclasses.replace(CFG, num_train=40, num_val=1, num_classes=4, max_rotation_deg=0.0,
                              size_sampling="uniform", min_object_frac=0.1, max_object_frac=0.5)
    generate_synthetic(tmp_path / "c", cfg, workers=1)
    raw = json.loads((tmp_path / "c" / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in raw["categories"]] == [c["id"] for c in CATEGORIES[:4]]
    used = {a["category_id"] for a in raw["annotations"]}
    assert used == {c["id"] for c in CATEGORIES[:4]}
    square = CATEGORIES[1]["id"]
    for a in raw["annotations"]:
        if a["category_id"] == square:  # unrotated: the square fills its box
            assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3], rel=0.02)
    # uniform sides between 0.1 and 0.5 of the image: mean near 0.3, where log-uniform would give ~0.25
    imgs = {i["id"]: min(i["width"], i["height"]) for i in raw["images"]}
    sides = np.array([max(a["bbox"][2:]) / imgs[a["image_id"]] for a in raw["annotations"]])
    assert 0.1 - 0.01 <= sides.min() and sides.max() <= 0.5 + 0.01
    assert 0.27 < sides.mean() < 0.33
