"""Your own data: COCO JSON, Pascal VOC and YOLO txt -> one normalised COCO tree (msdet/data/own.py, images.py).

The fixtures are written here: a handful of tiny images (an RGB JPEG, a grayscale PNG, an RGBA PNG, a JPEG
whose EXIF orientation rotates it, a crowded JPEG with more than 16 boxes) with the same
boxes written in each of the three formats.
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from msdet.config import ConfigError, OwnDataConfig, SplitSpec, load_params
from msdet.data.coco import CocoFormatError, resolve_tree, validate_tree
from msdet.data.images import plan_image, probe, write_image
from msdet.data.meta import gt_rows
from msdet.data.own import DatasetError, assign_splits, convert_own
from tests.helpers import config, write_params

NAMES = ["cat", "dog", "bird"]
# name -> (split, (width, height) as displayed, [(class index, x1, y1, x2, y2)], kind)
CROWD = [(k % 3, 4 * (k % 5) + 1, 4 * (k // 5) + 1, 4 * (k % 5) + 4, 4 * (k // 5) + 4) for k in range(20)]
CONTENT = {
    "a.jpg": ("train", (64, 48), [(0, 4, 6, 30, 40), (1, 33, 2, 60, 20)], "rgb"),
    "b.png": ("train", (40, 56), [(2, 5, 5, 35, 50)], "gray"),
    "c.png": ("train", (48, 48), [(1, 10, 12, 40, 44)], "rgba"),
    "d.jpg": ("train", (40, 64), [(0, 2, 30, 38, 62)], "exif6"),
    "e.jpg": ("train", (32, 32), CROWD, "rgb"),
    "f.jpg": ("val", (56, 40), [(2, 8, 4, 50, 36)], "rgb"),
    "g.jpg": ("val", (48, 64), [(0, 3, 3, 45, 30), (2, 6, 34, 40, 60)], "rgb"),
}
COLORS = [(40, 200, 90), (200, 60, 40), (30, 90, 220)]


def displayed_image(name: str) -> np.ndarray:
    """The picture as seen (BGR): a textured background with each box filled in its class colour."""
    _, (w, h), boxes, _ = CONTENT[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    blocks = rng.integers(60, 120, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = np.ascontiguousarray(blocks.repeat(8, 0).repeat(8, 1)[:h, :w])  # 8x8 blocks: JPEG keeps them
    for c, x1, y1, x2, y2 in boxes:
        img[y1:y2, x1:x2] = COLORS[c]
    return img


def encoded(name: str) -> bytes:
    """The file bytes. exif6: the pixels stored rotated 90 degrees counter-clockwise, with EXIF orientation 6
    ("rotate 90 CW to display"), as a phone held upright writes them."""
    from PIL import Image

    img, kind = displayed_image(name), CONTENT[name][3]
    rgb = img[:, :, ::-1]
    buf = io.BytesIO()
    if kind == "gray":
        Image.fromarray(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)).save(buf, "PNG")
    elif kind == "rgba":
        alpha = np.full(img.shape[:2], 255, np.uint8)
        alpha[:4] = 0  # a transparent band
        Image.fromarray(np.dstack([rgb, alpha])).save(buf, "PNG")
    elif kind == "exif6":
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    else:
        Image.fromarray(rgb).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pool")
    for name in CONTENT:
        (root / name).write_bytes(encoded(name))
    return root


def coco_dict(names: list[str], size_of=None) -> dict:
    ids = {n: i for i, n in enumerate(sorted(CONTENT), 1)}
    images, anns = [], []
    for n in names:
        _, (w, h), boxes, _ = CONTENT[n]
        w, h = size_of(n) if size_of else (w, h)
        images.append({"id": ids[n], "file_name": n, "width": w, "height": h})
        for c, x1, y1, x2, y2 in boxes:
            anns.append({"id": 100 + len(anns), "image_id": ids[n], "category_id": c + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": i, "name": n} for i, n in enumerate(NAMES, 1)]}


def split_names(split: str) -> list[str]:
    return [n for n, v in CONTENT.items() if v[0] == split]


def write_coco(pool: Path, root: Path, with_val: bool = True) -> OwnDataConfig:
    """Roboflow-like: each split a folder holding its images and _annotations.coco.json."""
    specs = {}
    for split in ("train", "val") if with_val else ("train",):
        names = split_names(split) + ([] if with_val else split_names("val"))
        d = root / split
        d.mkdir(parents=True)
        for n in names:
            shutil.copy(pool / n, d / n)
        (d / "_annotations.coco.json").write_text(json.dumps(coco_dict(names)))
        specs[split] = SplitSpec(images=str(d), annotations=str(d / "_annotations.coco.json"))
    return config("data.own", format="coco", workers=1, **specs)


def write_voc(pool: Path, root: Path) -> OwnDataConfig:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for n, (_, (w, h), boxes, _) in CONTENT.items():
        shutil.copy(pool / n, root / "JPEGImages" / n)
        objects = "".join(f"<object><name>{NAMES[c]}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin>"
                          f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                          for c, x1, y1, x2, y2 in boxes)
        (root / "Annotations" / f"{Path(n).stem}.xml").write_text(
            f"<annotation><filename>{n}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth>"
            f"</size>{objects}</annotation>")
    for split in ("train", "val"):
        (root / "ImageSets/Main" / f"{split}.txt").write_text("".join(f"{Path(n).stem}\n" for n in split_names(split)))
    return config("data.own", format="voc", path=str(root), names=list(NAMES), workers=1)


def write_yolo(pool: Path, root: Path, nested: bool = True) -> OwnDataConfig:
    """ultralytics layout (images/{train,val}, labels/{train,val}, data.yaml), or flat images/ labels/."""
    for n, (split, (w, h), boxes, _) in CONTENT.items():
        sub = split if nested else "."
        (root / "images" / sub).mkdir(parents=True, exist_ok=True)
        (root / "labels" / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(pool / n, root / "images" / sub / n)
        (root / "labels" / sub / f"{Path(n).stem}.txt").write_text("".join(
            f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}\n"
            for c, x1, y1, x2, y2 in boxes))
    if nested:
        (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val",
                                                        "names": dict(enumerate(NAMES))}))
        return config("data.own", format="yolo", path=str(root / "data.yaml"), workers=1)
    return config("data.own", format="yolo", path=str(root), names=list(NAMES), workers=1)


def tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "conversion.json"}


# --------------------------------------------------------------------------------------------------
# the three formats agree


@pytest.fixture(scope="module")
def converted(pool, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for fmt, writer in (("coco", write_coco), ("voc", write_voc), ("yolo", write_yolo)):
        src = tmp_path_factory.mktemp(f"src_{fmt}")
        out[fmt] = tmp_path_factory.mktemp(f"out_{fmt}") / "coco"
        convert_own(writer(pool, src), out[fmt])
    return out


def test_three_formats_give_the_same_tree(converted):
    trees = {fmt: tree_files(root) for fmt, root in converted.items()}
    assert trees["voc"] == trees["coco"] and trees["yolo"] == trees["coco"]
    assert sorted(trees["coco"]) == ["annotations/instances_train.json", "annotations/instances_val.json",
                                     "train/a.jpg", "train/b.png", "train/c.png", "train/d.jpg", "train/e.jpg",
                                     "val/f.jpg", "val/g.jpg"]


def test_tree_holds_the_boxes_as_drawn(converted, pool):
    root = converted["yolo"]
    summary = validate_tree(resolve_tree(root))
    assert summary == {"train": {"images": 5, "annotations": 25}, "val": {"images": 2, "annotations": 3}}
    train = json.loads((root / "annotations/instances_train.json").read_text())
    assert train["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
    by_name = {im["file_name"]: im for im in train["images"]}
    for name in split_names("train"):
        _, (w, h), boxes, _ = CONTENT[name]
        im = by_name[name]
        assert (im["width"], im["height"]) == (w, h)
        got = sorted((a["category_id"] - 1, *a["bbox"]) for a in train["annotations"] if a["image_id"] == im["id"])
        assert got == sorted((c, x1, y1, x2 - x1, y2 - y1) for c, x1, y1, x2, y2 in boxes)
    # plain JPEG and 8-bit grayscale PNG are copied byte for byte
    assert (root / "train/a.jpg").read_bytes() == (pool / "a.jpg").read_bytes()
    assert (root / "train/b.png").read_bytes() == (pool / "b.png").read_bytes()
    report = json.loads((root / "conversion.json").read_text())["counts"]
    assert report["exif_rotated"] == 1 and report["pixel_format"] == 1 and report["reencoded"] == 2
    assert report["copied"] == 5 and report["boxes"] == 28 and report["dropped_outside_image"] == 0


def test_exif_rotation_is_baked_into_the_pixels(converted):
    """Stored as the pipeline reads it (orientation ignored), d.jpg is the upright picture its boxes fit."""
    data = np.fromfile(str(converted["coco"] / "train/d.jpg"), np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert img.shape == (64, 40, 3)
    error = np.abs(img.astype(int) - displayed_image("d.jpg")).mean()
    assert error < 8 and error < np.abs(img.astype(int) - displayed_image("d.jpg")[::-1, ::-1]).mean() / 3
    _, x1, y1, x2, y2 = CONTENT["d.jpg"][2][0]
    assert np.abs(img[y1 + 3:y2 - 3, x1 + 3:x2 - 3].reshape(-1, 3).mean(0) - COLORS[0]).max() < 6


def test_alpha_png_becomes_what_imread_color_gives(converted, pool):
    out = cv2.imread(str(converted["coco"] / "train/c.png"), cv2.IMREAD_UNCHANGED)
    assert out.shape == (48, 48, 3)
    np.testing.assert_array_equal(out, cv2.imread(str(pool / "c.png"), cv2.IMREAD_COLOR))


def test_roboflow_umbrella_category_is_left_out(pool, tmp_path):
    def umbrella(coco):
        coco["categories"] = [{"id": 0, "name": "pets", "supercategory": "none"}] + [
            dict(c, supercategory="pets") for c in coco["categories"]]

    cfg = _coco_with(pool, tmp_path / "src", umbrella)
    val = json.loads(Path(cfg.val.annotations).read_text())
    val["categories"] = json.loads(Path(cfg.train.annotations).read_text())["categories"]
    Path(cfg.val.annotations).write_text(json.dumps(val))
    convert_own(cfg, tmp_path / "out")
    cats = json.loads((tmp_path / "out/annotations/instances_val.json").read_text())["categories"]
    assert cats == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]


def test_flat_yolo_without_val_is_split_deterministically(pool, tmp_path):
    cfg = write_yolo(pool, tmp_path / "src", nested=False)
    cfg = dataclasses.replace(cfg, val_fraction=0.3, split_seed=5)
    a = convert_own(cfg, tmp_path / "a")
    b = convert_own(cfg, tmp_path / "b")
    assert tree_files(tmp_path / "a") == tree_files(tmp_path / "b")
    assert (a["counts"]["train_images"], a["counts"]["val_images"]) == (5, 2) == (b["counts"]["train_images"],
                                                                                  b["counts"]["val_images"])
    assert json.loads((tmp_path / "a/annotations/instances_val.json").read_text())["categories"][0]["name"] == "cat"


def test_assign_splits_fraction_and_seed():
    from msdet.data.own import Item

    def items():
        return [Item(Path(f"{k}.jpg"), f"{k:02d}.jpg", None, k, None, np.zeros((0, 4)), np.zeros(0, np.int64),
                     np.zeros(0, bool)) for k in range(40)]

    picks = []
    for seed in (0, 0, 1):
        its = items()
        assign_splits(its, 0.25, seed)
        picks.append(sorted(it.name for it in its if it.split == "val"))
    assert len(picks[0]) == 10 and picks[0] == picks[1] and picks[0] != picks[2]


# --------------------------------------------------------------------------------------------------
# real photos


def _jpeg(img: np.ndarray, **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95, **save)
    return buf.getvalue()


def test_cmyk_jpeg_and_16bit_png_become_8bit_bgr(tmp_path):
    from PIL import Image

    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[:, :16], rgb[:, 16:] = (200, 30, 60), (20, 180, 90)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
    (tmp_path / "cmyk.jpg").write_bytes(buf.getvalue())
    deep = (np.arange(24 * 32 * 3).reshape(24, 32, 3) * 83 % 65536).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    for name, expect in (("cmyk.jpg", rgb[:, :, ::-1]), ("deep.png", (deep >> 8).astype(np.uint8))):
        plan = plan_image(probe(tmp_path / name), "apply", 2048)
        assert plan.reencode and plan.reasons == ("pixel_format",), name
        write_image(tmp_path / name, tmp_path / "out" / name, plan)
        out = cv2.imread(str(tmp_path / "out" / name), cv2.IMREAD_UNCHANGED)
        assert out.dtype == np.uint8 and out.shape == (24, 32, 3), name
        inner = np.r_[0:12, 20:32]  # away from the colour edge, where JPEG rings
        assert np.abs(out[:, inner].astype(int) - expect[:, inner]).max() <= 3, name


def test_large_photo_is_decoded_reduced_and_downscaled(tmp_path):
    img = np.zeros((4000, 6000, 3), np.uint8)
    img[1000:3000, 1500:4500] = 255
    (tmp_path / "big.jpg").write_bytes(cv2.imencode(".jpg", img)[1].tobytes())
    plan = plan_image(probe(tmp_path / "big.jpg"), "apply", 2048)
    assert (plan.width, plan.height, plan.out_width, plan.out_height) == (6000, 4000, 2048, 1365)
    assert plan.flags & cv2.IMREAD_REDUCED_COLOR_2 == cv2.IMREAD_REDUCED_COLOR_2  # DCT-scaled decode
    write_image(tmp_path / "big.jpg", tmp_path / "small.jpg", plan)
    out = cv2.imread(str(tmp_path / "small.jpg"), cv2.IMREAD_GRAYSCALE)
    assert out.shape == (1365, 2048)
    rows = np.flatnonzero(out[:, 1024] > 127)
    assert abs(rows[0] - 1000 * 1365 / 4000) <= 2 and abs(rows[-1] + 1 - 3000 * 1365 / 4000) <= 2


def test_downscaled_boxes_follow(pool, tmp_path):
    cfg = dataclasses.replace(write_coco(pool, tmp_path / "src"), max_image_side=32)
    convert_own(cfg, tmp_path / "out")
    train = json.loads((tmp_path / "out/annotations/instances_train.json").read_text())
    a = next(im for im in train["images"] if im["file_name"] == "a.jpg")
    assert (a["width"], a["height"]) == (32, 24)
    boxes = sorted(x["bbox"] for x in train["annotations"] if x["image_id"] == a["id"])
    assert boxes == [[2.0, 3.0, 13.0, 17.0], [16.5, 1.0, 13.5, 9.0]]
    assert cv2.imread(str(tmp_path / "out/train/a.jpg")).shape == (24, 32, 3)


def test_size_disagreeing_with_the_json(pool, tmp_path):
    cfg = write_coco(pool, tmp_path / "src")
    path = Path(cfg.train.annotations)
    coco = json.loads(path.read_text())
    coco["images"][3]["width"], coco["images"][3]["height"] = 64, 40  # d.jpg: the stored grid, not the view
    path.write_text(json.dumps(coco))
    report = convert_own(cfg, tmp_path / "out")
    assert report["counts"]["size_mismatch"] == 1
    assert "ignores the EXIF orientation" in report["warnings"][0] and "image id 4" in report["warnings"][0]
    train = json.loads((tmp_path / "out/annotations/instances_train.json").read_text())
    assert [(im["width"], im["height"]) for im in train["images"] if im["id"] == 4] == [(40, 64)]
    with pytest.raises(DatasetError, match=r"image id 4 \(d.jpg\): the annotation says 64x40, the image file is "
                                           r"40x64.*strict: false"):
        convert_own(dataclasses.replace(cfg, strict=True), tmp_path / "out2")


def test_exif_ignore_keeps_the_stored_grid(pool, tmp_path):
    cfg = dataclasses.replace(write_coco(pool, tmp_path / "src"), exif_orientation="ignore")
    report = convert_own(cfg, tmp_path / "out")
    assert report["counts"]["exif_rotated"] == 0 and report["counts"]["size_mismatch"] == 1
    assert (tmp_path / "out/train/d.jpg").read_bytes() == (pool / "d.jpg").read_bytes()


# --------------------------------------------------------------------------------------------------
# crowded images and the ground-truth padding


def test_gt_rows_rule():
    assert [gt_rows(0, n) for n in (0, 1, 8, 9, 20, 93)] == [8, 8, 8, 16, 24, 96]
    assert gt_rows(16, 20) == 16


def test_crowded_image_sets_the_padding_and_caps_are_reported(converted, tmp_path):
    from msdet.data.mindrecord import convert_tree
    from msdet.data.pipeline import resolve_max_gt_boxes

    stats = convert_tree(resolve_tree(converted["voc"]), tmp_path / "mr", config("mindrecord", workers=1),
                         gt_caps={"d0": 0, "nanodet": 16})
    assert stats["gt_padding"] == {"max_boxes_per_image": 20,
                                   "d0": {"max_gt_boxes": 24, "boxes_over_cap": 0, "images_over_cap": 0},
                                   "nanodet": {"max_gt_boxes": 16, "boxes_over_cap": 4, "images_over_cap": 1}}
    assert resolve_max_gt_boxes(0, tmp_path / "mr") == 24
    assert resolve_max_gt_boxes(12, tmp_path / "mr") == 12


# --------------------------------------------------------------------------------------------------
# errors name the problem and write nothing


def _coco_with(pool: Path, root: Path, edit) -> OwnDataConfig:
    cfg = write_coco(pool, root)
    path = Path(cfg.train.annotations)
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))
    return cfg


def _expect_error(cfg: OwnDataConfig, out: Path, pattern: str) -> None:
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("old")
    with pytest.raises(CocoFormatError, match=pattern):
        convert_own(cfg, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing half-written
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_error_unknown_category_id(pool, tmp_path):
    cfg = _coco_with(pool, tmp_path / "src", lambda c: c["annotations"][2].update(category_id=9))
    _expect_error(cfg, tmp_path / "o" / "coco", r"_annotations.coco.json: annotation id 102 has unknown category id 9")


def test_error_duplicate_image_id(pool, tmp_path):
    cfg = _coco_with(pool, tmp_path / "src", lambda c: c["images"][1].update(id=1))
    _expect_error(cfg, tmp_path / "o" / "coco", r"duplicate image id 1")


def test_error_annotation_points_at_missing_file(pool, tmp_path):
    cfg = _coco_with(pool, tmp_path / "src", lambda c: c["images"][2].update(file_name="nope.png"))
    _expect_error(cfg, tmp_path / "o" / "coco", r"image id 3 \(nope.png\): .*nope.png: image file not found")


@pytest.mark.parametrize("box,what", [([10, 10, 0, 5], "non-positive size"), ([70, 10, 5, 5], "outside the image")])
def test_bad_boxes_dropped_or_refused(pool, tmp_path, box, what):
    cfg = _coco_with(pool, tmp_path / "src", lambda c: c["annotations"][0].update(bbox=box))
    report = convert_own(cfg, tmp_path / "dropped")
    key = "dropped_degenerate" if "size" in what else "dropped_outside_image"
    assert report["counts"][key] == 1 and report["counts"]["boxes"] == 27
    _expect_error(dataclasses.replace(cfg, strict=True), tmp_path / "o" / "coco",
                  rf"annotation id 100: box .* {what} \(64x48\)")


def test_box_over_the_border_is_clipped(pool, tmp_path):
    cfg = _coco_with(pool, tmp_path / "src", lambda c: c["annotations"][0].update(bbox=[-6, 40, 30, 30]))
    report = convert_own(dataclasses.replace(cfg, strict=True), tmp_path / "out")
    assert report["counts"]["clipped_boxes"] == 1
    train = json.loads((tmp_path / "out/annotations/instances_train.json").read_text())
    assert [0.0, 40.0, 24.0, 8.0] in [a["bbox"] for a in train["annotations"] if a["image_id"] == 1]


@pytest.mark.parametrize("label, text, pattern", [
    ("train/ghost.txt", "0 0.5 0.5 0.1 0.1\n", r"labels/train/ghost.txt: label file for a missing image"),
    ("val/g.txt", "0 0.5 0.5 0.1 0.1\n3 0.5 0.5 0.2 0.2\n",
     r"labels/val/g.txt:2: class index 3 is beyond the 3 names"),
    ("val/f.txt", "1 0.5 0.5 0.2\n", r"labels/val/f.txt:1: expected 'class cx cy w h', got 4 fields"),
])
def test_error_yolo_label_is_named(pool, tmp_path, label, text, pattern):
    cfg = write_yolo(pool, tmp_path / "src")
    (tmp_path / "src/labels" / label).write_text(text)
    _expect_error(cfg, tmp_path / "o" / "coco", pattern)


def test_error_voc_unknown_class_and_missing_image(pool, tmp_path):
    cfg = write_voc(pool, tmp_path / "src")
    xml = tmp_path / "src/Annotations/g.xml"
    xml.write_text(xml.read_text().replace("<name>bird</name>", "<name>horse</name>"))
    _expect_error(cfg, tmp_path / "o1" / "coco", r"Annotations/g.xml: object #2: unknown category 'horse'")
    xml.write_text(xml.read_text().replace("<name>horse</name>", "<name>bird</name>"))
    (tmp_path / "src/JPEGImages/f.jpg").unlink()
    _expect_error(cfg, tmp_path / "o2" / "coco", r"Annotations/f.xml: .*JPEGImages/f.jpg: image file not found")
    lst = tmp_path / "src/ImageSets/Main/val.txt"
    lst.write_text(lst.read_text() + "zzz\n")
    _expect_error(cfg, tmp_path / "o3" / "coco", r"ImageSets/Main/val.txt:3: zzz: no Annotations/zzz.xml")


def test_error_empty_split(pool, tmp_path):
    cfg = dataclasses.replace(write_coco(pool, tmp_path / "src", with_val=False), val_fraction=0.0)
    _expect_error(cfg, tmp_path / "o" / "coco", r"the val split is empty \(data.own.val_fraction is 0")


def test_params_own_block_is_validated(tmp_path):
    def load(own: dict):
        return load_params(write_params(tmp_path / "p.yaml", {"data": {"source": "own", "own": own}}))

    assert load({"format": "voc", "path": "/x"}).data.own.path == "/x"
    with pytest.raises(ConfigError, match=r"format coco needs 'data.own.train.images' and"):
        load({"format": "coco"})
    with pytest.raises(ConfigError, match=r"'data.own.format' = 'labelme' is not one of"):
        load({"format": "labelme"})
    with pytest.raises(ConfigError, match=r"'data.own.names' must be distinct"):
        load({"format": "yolo", "path": "/x", "names": ["a", "a"]})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) data.own.train.labels"):
        load({"format": "coco", "train": {"labels": "x"}})


def test_download_stage_converts_or_prints_one_line(pool, tmp_path, capsys):
    from stages.download import main

    cfg = write_yolo(pool, tmp_path / "src")
    own = {"format": "yolo", "path": cfg.path, "workers": 1}
    write_params(tmp_path / "p.yaml", {"data": {"source": "own", "root": str(tmp_path / "coco"), "own": own}})
    assert main(["--params", str(tmp_path / "p.yaml")]) == 0
    assert validate_tree(resolve_tree(tmp_path / "coco"))["val"] == {"images": 2, "annotations": 3}
    (tmp_path / "src/labels/val/g.txt").write_text("7 0.5 0.5 0.1 0.1\n")
    assert main(["--params", str(tmp_path / "p.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "g.txt:1: class index 7" in err and err.count("\n") == 1
    assert validate_tree(resolve_tree(tmp_path / "coco"))["val"] == {"images": 2, "annotations": 3}  # untouched


# --------------------------------------------------------------------------------------------------
# paths from annotation files stay inside their data set's folder


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry below ``root``: a file's bytes, a link's target, a folder's marker."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = f"-> {p.readlink()}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def _stage_params(tmp_path: Path, cfg: OwnDataConfig) -> Path:
    own = {k: v for k, v in dataclasses.asdict(cfg).items() if k in ("format", "path", "train", "val", "names")}
    return write_params(tmp_path / "p.yaml", {"data": {"source": "own", "root": str(tmp_path / "repo/data/coco"),
                                                       "own": {**own, "workers": 1}}})


def _run_download(params: Path, capsys) -> tuple[int, str]:
    from stages.download import main

    code = main(["--params", str(params)])
    return code, capsys.readouterr().err


def _edit_coco(pool, src, name):
    return _coco_with(pool, src, lambda c: c["images"][0].update(file_name=name))


def _edit_voc(pool, src, name):
    cfg = write_voc(pool, src)
    xml = src / "Annotations/a.xml"
    xml.write_text(xml.read_text().replace("<filename>a.jpg</filename>", f"<filename>{name}</filename>"))
    return cfg


def _edit_yolo_yaml(pool, src, name):
    cfg = write_yolo(pool, src)
    spec = yaml.safe_load((src / "data.yaml").read_text())
    (src / "data.yaml").write_text(yaml.safe_dump({**spec, "train": name}))
    return cfg


def _edit_yolo_list(pool, src, name):
    cfg = write_yolo(pool, src)
    (src / "train.txt").write_text(f"images/train/a.jpg\n{name}\n")
    spec = yaml.safe_load((src / "data.yaml").read_text())
    (src / "data.yaml").write_text(yaml.safe_dump({**spec, "train": "train.txt"}))
    return cfg


# (writer, the hostile entry relative to the data set, the message); {victim} is an image outside it
TRAVERSALS = {
    "coco-dotdot": (_edit_coco, "../../victim.jpg",
                    r"_annotations.coco.json: image id 1: file_name '../../victim.jpg' leads outside its folder"),
    "coco-absolute": (_edit_coco, "{victim}", r"image id 1: file_name '/.*/victim.jpg' is an absolute path"),
    "voc-dotdot": (_edit_voc, "../../victim.jpg",
                   r"Annotations/a.xml: <filename>: '../../victim.jpg' leads outside its folder"),
    "voc-absolute": (_edit_voc, "{victim}", r"Annotations/a.xml: <filename>: '/.*/victim.jpg' is an absolute path"),
    "yolo-yaml-dotdot": (_edit_yolo_yaml, "../../outside/images",
                         r"data.yaml: train: '../../outside/images' leads outside its folder"),
    "yolo-yaml-absolute": (_edit_yolo_yaml, "{outside}", r"data.yaml: train: '/.*/outside/images' leads outside"),
    "yolo-list-dotdot": (_edit_yolo_list, "../victim.jpg", r"train.txt:2: '../victim.jpg' leads outside its folder"),
    "yolo-list-absolute": (_edit_yolo_list, "{victim}", r"train.txt:2: '/.*/victim.jpg' leads outside its folder"),
}


@pytest.mark.parametrize("case", sorted(TRAVERSALS))
def test_annotation_path_leaving_the_data_set_is_refused(pool, tmp_path, capsys, case):
    writer, entry, pattern = TRAVERSALS[case]
    shutil.copy(pool / "a.jpg", tmp_path / "victim.jpg")
    (tmp_path / "outside/images").mkdir(parents=True)
    shutil.copy(pool / "a.jpg", tmp_path / "outside/images/x.jpg")
    src = tmp_path / "ds" / "set"
    cfg = writer(pool, src, entry.format(victim=tmp_path / "victim.jpg", outside=tmp_path / "outside/images"))
    params = _stage_params(tmp_path, cfg)
    before = snapshot(tmp_path)
    code, err = _run_download(params, capsys)
    assert code == 1 and err.count("\n") == 1 and re.search(pattern, err), err
    assert snapshot(tmp_path) == before  # nothing written or changed anywhere, data.root not created


@pytest.mark.parametrize("fmt, writer, image", [("coco", write_coco, "train/a.jpg"), ("voc", write_voc,
                         "JPEGImages/a.jpg"), ("yolo", write_yolo, "images/train/a.jpg")])
def test_symlinked_image_is_read_and_never_written_through(pool, tmp_path, capsys, fmt, writer, image):
    """A data set may link its images to a shared store: read through the link, write a file of our own."""
    src = tmp_path / "ds"
    cfg = writer(pool, src)
    store = tmp_path / "store"
    store.mkdir()
    shutil.move(src / image, store / "a.jpg")
    (src / image).symlink_to(store / "a.jpg")
    params = _stage_params(tmp_path, cfg)
    before = {k: v for k, v in snapshot(tmp_path).items() if k.split("/")[0] != "repo"}
    code, err = _run_download(params, capsys)
    assert code == 0, err
    out = tmp_path / "repo/data/coco/train/a.jpg"
    assert not out.is_symlink() and out.read_bytes() == (pool / "a.jpg").read_bytes()
    assert {k: v for k, v in snapshot(tmp_path).items() if k.split("/")[0] != "repo"} == before


def test_roboflow_data_yaml_beside_its_splits(pool, tmp_path):
    """Roboflow's YOLO export: data.yaml beside train/ and valid/, entries '../train/images' (as ultralytics)."""
    src = tmp_path / "export"
    write_yolo(pool, src)
    for split, folder in (("train", "train"), ("val", "valid")):
        (src / folder).mkdir()
        shutil.move(src / "images" / split, src / folder / "images")
        shutil.move(src / "labels" / split, src / folder / "labels")
    (src / "data.yaml").write_text(yaml.safe_dump({"train": "../train/images", "val": "../valid/images",
                                                   "names": NAMES}))
    report = convert_own(config("data.own", format="yolo", path=str(src), workers=1), tmp_path / "coco")
    assert (report["counts"]["train_images"], report["counts"]["val_images"]) == (5, 2)
