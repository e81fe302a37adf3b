"""The embedded data set: coloured shapes on textured backgrounds, written as a COCO-format tree.

Six classes that differ in shape, not colour (colour is drawn per object, independent of the class), with
COCO-like non-contiguous category ids so the id <-> class-index mapping is exercised. Each image is made from
its own generator seeded by ``(seed, split, index)``: the output is byte-identical for a given seed no matter
how many processes share the work. Larger objects are drawn first and pairwise IoU is kept below
``MAX_PAIR_IOU``, so every object stays visible enough to be recognised.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from msdet.atomic import atomic_path
from msdet.config import SyntheticConfig
from msdet.data.coco import TREE_MARKERS

JPEG_QUALITY = 90
MAX_PAIR_IOU = 0.3
# At most this fraction of an object's box may lie under the boxes of smaller objects drawn on top of it.
MAX_COVERED_FRAC = 0.5
# Val image ids start here so the two splits never share an id (num_train is at most 1e6).
VAL_ID_OFFSET = 10_000_000
SPLITS = ("train", "val")
# COCO-style: ids with gaps, sorted by id = class-index order.
CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
    {"id": 7, "name": "triangle", "supercategory": "shape"},
    {"id": 12, "name": "cross", "supercategory": "shape"},
    {"id": 18, "name": "ring", "supercategory": "shape"},
    {"id": 23, "name": "star", "supercategory": "shape"},
)


def _regular(n: int, radius: float, phase: float = np.pi / 2) -> np.ndarray:
    a = phase + np.arange(n) * (2 * np.pi / n)
    return np.stack([np.cos(a), -np.sin(a)], axis=1) * radius


def _unit_shape(name: str) -> list[np.ndarray]:
    """Outline(s) of a class around the origin, radius ~1; a second outline is a hole (ring)."""
    if name == "circle":
        return [_regular(48, 1.0)]
    if name == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)]
    if name == "triangle":
        return [_regular(3, 1.0)]
    if name == "cross":
        t = 0.32
        return [np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1], [-t, t],
                          [-1, t], [-1, -t], [-t, -t]], dtype=np.float64)]
    if name == "ring":
        return [_regular(48, 1.0), _regular(48, 0.55)[::-1]]
    if name == "star":
        pts = _regular(10, 1.0)
        pts[1::2] *= 0.42
        return [pts]
    raise ValueError(f"unknown synthetic shape {name!r}")


_SHAPES = [_unit_shape(c["name"]) for c in CATEGORIES]


def _segmentation(outlines: list[np.ndarray]) -> np.ndarray:
    """One COCO polygon; a ring becomes outer + inner joined by a zero-width slit, so its area is the annulus."""
    if len(outlines) == 1:
        return outlines[0]
    outer, inner = outlines
    return np.concatenate([outer, outer[:1], inner, inner[:1]], axis=0)


def _polygon_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _iou(box: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of ``box`` with each of ``boxes`` (xyxy) and the intersection areas."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter), inter


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Two-colour gradient with soft blurred blobs and thin random lines (uint8 BGR).

    The smooth part is made at a quarter of the resolution and upscaled: the blur is the costly step.
    """
    c0, c1 = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    sh, sw = max(h // 4, 1), max(w // 4, 1)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    t = xx * np.cos(theta) + yy * np.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    small = c0 + t[..., None] * (c1 - c0)
    side = min(sh, sw)
    for _ in range(int(rng.integers(2, 6))):
        center = (int(rng.integers(0, sw)), int(rng.integers(0, sh)))
        axes = (max(int(rng.uniform(0.1, 0.35) * side), 1), max(int(rng.uniform(0.1, 0.35) * side), 1))
        cv2.ellipse(small, center, axes, float(rng.uniform(0, 180)), 0, 360, rng.uniform(0, 255, 3).tolist(), -1)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=side / 12 + 0.5)
    img = np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR), 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(2, 8))):
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.line(img, p0, p1, rng.uniform(0, 255, 3).tolist(), int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _contrasting_colour(rng: np.random.Generator, ref: np.ndarray) -> list[float]:
    """A random colour at least 100 (L2 in BGR) away from ``ref``; the most distant of 16 draws otherwise."""
    cand = rng.uniform(0, 255, (16, 3))
    dist = np.linalg.norm(cand - ref, axis=1)
    ok = np.flatnonzero(dist >= 100)
    return cand[ok[0] if ok.size else int(np.argmax(dist))].tolist()


def _place(rng: np.random.Generator, outlines: list[np.ndarray], side: float, w: int, h: int,
           max_rotation: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Stretch, rotate, scale so the longer box side is ``side`` and translate inside the image."""
    aspect = np.exp(rng.uniform(np.log(0.75), np.log(1.33)))
    theta = rng.uniform(-max_rotation, max_rotation)
    rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    pts = [(o * [aspect, 1 / aspect]) @ rot for o in outlines]
    lo, hi = pts[0].min(axis=0), pts[0].max(axis=0)
    scale = side / float(np.max(hi - lo))
    size = (hi - lo) * scale
    origin = rng.uniform([0.0, 0.0], np.maximum([w - size[0], h - size[1]], 0.0))
    pts = [(p - lo) * scale + origin for p in pts]
    return pts, np.concatenate([origin, origin + size])


def make_image(cfg: SyntheticConfig, split: str, index: int) -> tuple[bytes, int, int, list[dict[str, Any]]]:
    """One image: (JPEG bytes, width, height, objects with category_id, bbox xywh, area, segmentation)."""
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
    s = cfg.image_size
    w = h = s
    if rng.random() < 0.5:
        w, h = (int(round(s * f)) for f in rng.uniform(0.75, 1.25, 2))
    img = _background(rng, h, w)

    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    short = min(w, h)
    if cfg.size_sampling == "uniform":
        sides = np.sort(rng.uniform(cfg.min_object_frac, cfg.max_object_frac, n))[::-1]
    else:
        sides = np.sort(np.exp(rng.uniform(np.log(cfg.min_object_frac), np.log(cfg.max_object_frac), n)))[::-1]
    sides = np.maximum(sides * short, 2.0)
    classes = rng.integers(0, cfg.num_classes, n)
    boxes = np.zeros((0, 4))
    covered = np.zeros(0)
    objects = []
    for k in range(n):
        required = k < cfg.min_objects
        side = sides[k]
        for attempt in range(1000 if required else 40):
            if attempt and attempt % 10 == 0:
                side = max(side * 0.85, cfg.min_object_frac * short)
            pts, box = _place(rng, _SHAPES[classes[k]], side, w, h, np.deg2rad(cfg.max_rotation_deg))
            if not len(boxes):
                break
            iou, inter = _iou(box, boxes)
            # Earlier objects are larger and lie underneath: bound how much of each one gets hidden.
            cover = covered + inter / ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
            if iou.max() < MAX_PAIR_IOU and cover.max() < MAX_COVERED_FRAC:
                covered = cover
                break
        else:
            if required:
                raise ValueError(f"synthetic {split}[{index}]: cannot place {cfg.min_objects} objects "
                                 f"without overlap; lower data.synthetic.min_objects or object sizes")
            continue
        boxes = np.concatenate([boxes, box[None]])
        covered = np.append(covered, 0.0)
        x0, y0, x1, y1 = (int(v) for v in np.clip(np.round(box), 0, [w, h, w, h]))
        ref = img[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)].reshape(-1, 3).mean(axis=0)
        # Pixel i covers [i, i+1): shift by half a pixel so the drawn shape fills exactly the polygon.
        cv2.fillPoly(img, [np.round((p - 0.5) * 16).astype(np.int32) for p in pts],
                     _contrasting_colour(rng, ref), cv2.LINE_AA, shift=4)
        seg = np.round(_segmentation(pts), 2)
        objects.append({
            "category_id": CATEGORIES[classes[k]]["id"],
            "bbox": [round(float(box[0]), 2), round(float(box[1]), 2),
                     round(float(box[2] - box[0]), 2), round(float(box[3] - box[1]), 2)],
            "area": round(_polygon_area(seg), 2),
            "segmentation": [seg.reshape(-1).tolist()],
        })
    noise = rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(rng.uniform(3, 12))
    img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"synthetic {split}[{index}]: JPEG encoding failed")
    return buf.tobytes(), w, h, objects


def image_id(split: str, index: int) -> int:
    return index + 1 + (VAL_ID_OFFSET if split == "val" else 0)


def _write_image(task: tuple[SyntheticConfig, str, int, str]) -> tuple[int, int, list[dict[str, Any]]]:
    cfg, split, index, path = task
    data, w, h, objects = make_image(cfg, split, index)
    with open(path, "wb") as f:
        f.write(data)
    return w, h, objects


def _worker_init() -> None:
    cv2.setNumThreads(1)


def _write_split(root: Path, split: str, cfg: SyntheticConfig, pool: ProcessPoolExecutor | None) -> dict:
    """Images into ``root/split``; returns the COCO dict of the split (in index order, whatever the pool)."""
    count = cfg.num_train if split == "train" else cfg.num_val
    (root / split).mkdir()
    names = [f"{image_id(split, i):012d}.jpg" for i in range(count)]
    tasks = [(cfg, split, i, str(root / split / names[i])) for i in range(count)]
    results = pool.map(_write_image, tasks, chunksize=16) if pool else map(_write_image, tasks)
    images, annotations = [], []
    for i, (w, h, objects) in enumerate(results):
        iid = image_id(split, i)
        images.append({"id": iid, "file_name": names[i], "width": w, "height": h, "license": 1})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": iid, **obj, "iscrowd": 0})
    return {
        "info": {"description": "msdet synthetic shapes", "version": "1.0", "year": 2017, "contributor": "msdet",
                 "seed": cfg.seed},
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES[:cfg.num_classes]],
    }


def generate_synthetic(root: str | Path, cfg: SyntheticConfig, workers: int | None = None
                       ) -> dict[str, dict[str, int]]:
    """Write the whole tree to ``root`` atomically (replacing it); returns images and boxes per split.

    ``workers`` only changes the speed, never the bytes; None picks one process per ~100 images, at most
    the available cores and 8 (starting a process costs about as much as 100 images).
    """
    if cfg.min_objects > cfg.max_objects or cfg.min_object_frac > cfg.max_object_frac:
        raise ValueError("data.synthetic: min_objects/min_object_frac must not exceed their max")
    if workers is None:
        workers = max(1, min(default_workers(), 8, (cfg.num_train + cfg.num_val) // 100))
    summary = {}
    with atomic_path(root, replaces=TREE_MARKERS) as tmp:
        (tmp / "annotations").mkdir(parents=True)
        pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init)
                if workers > 1 else None)
        try:
            for split in SPLITS:
                coco = _write_split(tmp, split, cfg, pool)
                (tmp / "annotations" / f"instances_{split}.json").write_text(
                    json.dumps(coco, separators=(",", ":")) + "\n")
                summary[split] = {"images": len(coco["images"]), "boxes": len(coco["annotations"])}
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
    return summary


def default_workers() -> int:
    """Processes for generation: at most the cores available to this process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
