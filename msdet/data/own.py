"""A data set of one's own -> the normalised COCO tree the rest of the pipeline reads.

Three formats (``data.own.format``):

- ``coco``: instances JSON(s) with any paths, ``train: {images, annotations}`` and optionally ``val``
  (CVAT, Label Studio, Roboflow ``_annotations.coco.json``, detectron2/mmdet custom sets). Image and
  category ids are kept; a box-less category that only names the others' supercategory (Roboflow's
  project-named id 0) is left out.
- ``voc``: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/{train,val}.txt`` when present, read as
  NanoDet's ``XMLDataset`` reads them (``filename``, ``size``, ``object/name``, ``bndbox`` with
  ``w = xmax - xmin``, no 1-pixel offset); ``difficult`` objects become ``iscrowd`` (ignored by training
  and by COCOeval). Classes: ``data.own.names`` in that order, else the names found, sorted.
- ``yolo``: ``images/`` + ``labels/*.txt`` lines ``class cx cy w h`` (normalised), an image's label file at
  its path with the last ``images`` folder replaced by ``labels`` (as ultralytics); an image without a
  label file is a background image. Names and splits from a ``data.yaml`` (``path``, ``train``, ``val``,
  ``names``), else ``images/{train,val}/`` or a flat ``images/`` and ``data.own.names``.

VOC and YOLO images get ids 1..N in file-name order; without a val split, ``val_fraction`` of the images
(a permutation drawn from ``split_seed``, over the images sorted by name) become the val split.

Everything is read and checked before anything is written (errors name the file and the line, object or
id). Boxes outside their image or of non-positive size are dropped and counted, or refused with
``strict``; boxes reaching over the border are clipped. Image files go through msdet/data/images.py.
The tree, ``train/``, ``val/``, ``annotations/instances_{train,val}.json`` and a ``conversion.json``
report, replaces ``data.root`` atomically.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import yaml

from msdet.atomic import atomic_path
from msdet.config import OwnDataConfig
from msdet.data.coco import (
    CONVERSION_FILE,
    LAYOUTS,
    SPLITS,
    TREE_MARKERS,
    CocoFormatError,
    load_annotations,
    relative_below,
)
from msdet.data.images import IMAGE_SUFFIXES, ImageFileError, plan_image, probe, write_image_task

log = logging.getLogger(__name__)
_MAX_WARNINGS = 20


class DatasetError(CocoFormatError):
    """A data set of one's own is inconsistent; the message names the file and the line, object or id."""


@dataclass
class Item:
    """One image as a format reader found it."""

    source: Path                 # the image file
    name: str                    # path relative to its split folder in the output tree (posix)
    split: str | None            # "train" | "val" | None (to be split off by val_fraction)
    image_id: int | None         # kept for coco, assigned for voc and yolo
    ann_size: tuple[int, int] | None  # (width, height) the annotation states
    boxes: np.ndarray            # float64 [n, 4]: x, y, w, h pixels, or cx, cy, w, h normalised (yolo)
    category_ids: np.ndarray     # int64 [n]
    crowd: np.ndarray            # bool [n]
    where: list[str] = field(default_factory=list)  # per box, for messages
    normalised: bool = False
    described: str = ""          # the image, for messages ("file.json: image id 3")


# --------------------------------------------------------------------------------------------------
# readers


def read_coco(cfg: OwnDataConfig) -> tuple[list[dict[str, Any]], list[Item]]:
    categories, items = None, []
    for split, spec in (("train", cfg.train), ("val", cfg.val)):
        if not spec.annotations:
            continue
        if split == "train" and not cfg.val.annotations:
            split = None  # the val split is drawn from these images
        ann = load_annotations(spec.annotations)
        if categories is not None and ann.categories.as_list() != categories:
            raise DatasetError(f"{ann.path}: categories differ from {cfg.train.annotations}'s")
        categories = ann.categories.as_list()
        images = Path(spec.images)
        if not images.is_dir():
            raise DatasetError(f"data.own.{split or 'train'}.images = {spec.images}: no such folder")
        order = np.argsort(ann.ann_image_index, kind="stable")
        bounds = np.searchsorted(ann.ann_image_index[order], np.arange(ann.num_images + 1))
        seen: dict[str, int] = {}
        for r in range(ann.num_images):
            iid, name = int(ann.image_ids[r]), ann.file_names[r]
            if name in seen:
                raise DatasetError(f"{ann.path}: image ids {seen[name]} and {iid} both name the file {name}")
            seen[name] = iid
            sel = order[bounds[r]:bounds[r + 1]]
            items.append(Item(
                source=images / name, name=PurePosixPath(name).as_posix(), split=split, image_id=iid,
                ann_size=(int(ann.widths[r]), int(ann.heights[r])), boxes=ann.bboxes[sel],
                category_ids=ann.category_ids[sel], crowd=ann.iscrowd[sel],
                where=[f"{ann.path}: annotation id {int(a)}" for a in ann.ann_ids[sel]],
                described=f"{ann.path}: image id {iid} ({name})"))
    return _drop_umbrella_categories(categories, items, Path(cfg.train.annotations)), items


def _drop_umbrella_categories(categories: list[dict[str, Any]], items: list[Item],
                              path: Path) -> list[dict[str, Any]]:
    """Without the category that only names the others' supercategory and has no box (Roboflow exports
    one, id 0, named after the project): it would be a class that is never seen."""
    raw = json.loads(path.read_text())["categories"]
    parents = {str(c.get("supercategory")) for c in raw if isinstance(c, dict)}
    used = set(np.concatenate([it.category_ids for it in items] + [np.zeros(0, np.int64)]).tolist())
    drop = {int(c["id"]) for c in raw if c["name"] in parents and int(c["id"]) not in used}
    if drop:
        log.info("%s: category id(s) %s only name the others' supercategory and have no box: left out",
                 path, sorted(drop))
    return [c for c in categories if c["id"] not in drop]


def _text(node: ET.Element, tag: str, xml: Path, what: str) -> str:
    text = node.findtext(tag)
    if text is None or not text.strip():
        raise DatasetError(f"{xml}: {what} has no <{tag}>")
    return text.strip()


def _number(node: ET.Element, tag: str, xml: Path, what: str) -> float:
    text = _text(node, tag, xml, what)
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"{xml}: {what}: <{tag}> is not a number: {text!r}") from None


def _list_file(path: Path) -> list[tuple[int, str]]:
    return [(i, line.split()[0]) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]


def _below(entry: str, where: str) -> str:
    """:func:`relative_below`, with the error naming the file and the entry."""
    try:
        return relative_below(entry)
    except ValueError as exc:
        raise DatasetError(f"{where}: {entry!r} {exc}") from None


def read_voc(cfg: OwnDataConfig) -> tuple[list[dict[str, Any]], list[Item]]:
    root = Path(cfg.path)
    ann_dir, img_dir, sets = root / "Annotations", root / "JPEGImages", root / "ImageSets" / "Main"
    for folder in (ann_dir, img_dir):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: no such folder (data.own.path = {cfg.path} must hold Annotations/ and "
                               f"JPEGImages/)")
    listed: dict[str, tuple[str | None, str]] = {}
    if (sets / "train.txt").is_file():
        for split in SPLITS:
            lst = sets / f"{split}.txt"
            if not lst.is_file():
                continue
            for line, stem in _list_file(lst):
                stem = _below(stem, f"{lst}:{line}")
                if stem in listed:
                    raise DatasetError(f"{lst}:{line}: {stem} is already listed ({listed[stem][1]})")
                if not (ann_dir / f"{stem}.xml").is_file():
                    raise DatasetError(f"{lst}:{line}: {stem}: no Annotations/{stem}.xml")
                listed[stem] = (split, f"{lst.name}:{line}")
        if not any(split == "val" for split, _ in listed.values()):
            listed = {stem: (None, where) for stem, (_, where) in listed.items()}
    else:
        listed = {p.stem: (None, p.name) for p in sorted(ann_dir.glob("*.xml"))}
    parsed = []
    for stem, (split, _) in sorted(listed.items()):
        xml = ann_dir / f"{stem}.xml"
        try:
            node = ET.parse(xml).getroot()
        except ET.ParseError as exc:
            raise DatasetError(f"{xml}: not valid XML ({exc})") from exc
        # <path> (often an absolute path on the annotator's machine) is not read: images are in JPEGImages/
        filename = _below(_text(node, "filename", xml, "the annotation"), f"{xml}: <filename>")
        size = node.find("size")
        ann_size = None
        if size is not None and size.findtext("width") and size.findtext("height"):
            ann_size = (int(_number(size, "width", xml, "<size>")), int(_number(size, "height", xml, "<size>")))
        objects = []
        for k, obj in enumerate(node.findall("object"), 1):
            what = f"object #{k}"
            box = obj.find("bndbox")
            if box is None:
                raise DatasetError(f"{xml}: {what} has no <bndbox>")
            x1, y1, x2, y2 = (_number(box, t, xml, what) for t in ("xmin", "ymin", "xmax", "ymax"))
            difficult = (obj.findtext("difficult") or "0").strip() == "1"
            objects.append((_text(obj, "name", xml, what), [x1, y1, x2 - x1, y2 - y1], difficult, what))
        parsed.append((xml, filename, split, ann_size, objects))
    names = list(cfg.names) or sorted({o[0] for *_, objs in parsed for o in objs})
    ids = {n: i for i, n in enumerate(names, 1)}
    items = []
    for xml, filename, split, ann_size, objects in parsed:
        for name, _, _, what in objects:
            if name not in ids:
                raise DatasetError(f"{xml}: {what}: unknown category {name!r} (data.own.names: {names})")
        items.append(Item(
            source=img_dir / filename, name=filename, split=split, image_id=None, ann_size=ann_size,
            boxes=np.array([o[1] for o in objects], np.float64).reshape(-1, 4),
            category_ids=np.array([ids[o[0]] for o in objects], np.int64),
            crowd=np.array([o[2] for o in objects], bool), where=[f"{xml}: {o[3]}" for o in objects],
            described=f"{xml}"))
    return [{"id": i, "name": n} for n, i in ids.items()], items


def _yaml_path(folder: Path, root: str, entry: str, where: str, yaml_entry: bool = True) -> str:
    """A YOLO path (``root``-relative, or absolute) as a path below the data set ``folder``.

    A ``data.yaml`` entry ``../x`` that would leave the folder is read as ``x``, as ultralytics reads it:
    Roboflow's exports hold ``train: ../train/images`` in a data.yaml that sits beside ``train/``.
    """
    rel = os.path.relpath(entry, folder) if entry.startswith("/") else posixpath.join(root, entry)
    try:
        return relative_below(rel)
    except ValueError as exc:
        if yaml_entry and entry.startswith("../"):
            with contextlib.suppress(ValueError):
                return relative_below(posixpath.join(root, entry[3:]))
        raise DatasetError(f"{where}: {entry!r} {exc} (the data set folder is {folder})") from None


def _yolo_layout(cfg: OwnDataConfig) -> tuple[Path, dict[str | None, list[Path]], list[str], str]:
    """The data set folder, image folders (or list files) per split (None = to be split), the class names."""
    path = Path(cfg.path)
    spec = path if path.is_file() else path / "data.yaml"
    if spec.is_file():
        try:
            data = yaml.safe_load(spec.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DatasetError(f"{spec}: not valid YAML ({exc})") from exc
        if not isinstance(data, dict) or "train" not in data:
            raise DatasetError(f"{spec}: needs at least 'train' (and 'names' unless data.own.names is set)")
        folder = spec.parent
        root = _yaml_path(folder, ".", str(data.get("path") or "."), f"{spec}: path")
        raw = data.get("names", [])
        names = [raw[k] for k in sorted(raw)] if isinstance(raw, dict) else list(raw or [])
        splits: dict[str | None, list[Path]] = {}
        for split in SPLITS:
            entries = data.get(split)
            if entries:
                key = split if data.get("val") else None
                splits[key] = [folder / _yaml_path(folder, root, str(e), f"{spec}: {split}")
                               for e in (entries if isinstance(entries, list) else [entries])]
        where = str(spec)
    else:
        folder, images = path, path / "images"
        if not images.is_dir():
            raise DatasetError(f"data.own.path = {cfg.path}: neither a data.yaml nor a folder with images/")
        split_dirs = {s: images / s for s in SPLITS if (images / s).is_dir()}
        splits = {s: [d] for s, d in split_dirs.items()} if "val" in split_dirs else {None: [images]}
        names, where = [], "data.own.names"
    names = [str(n) for n in (cfg.names or names)]
    if not names:
        raise DatasetError(f"{cfg.path}: no class names: give them in a data.yaml 'names' or in data.own.names")
    return folder, splits, names, where


def _label_path(image: Path) -> Path:
    parts = list(image.parts)
    k = len(parts) - 1 - parts[::-1].index("images") if "images" in parts else None
    if k is None:
        raise DatasetError(f"{image}: a YOLO image must sit below an 'images' folder (its labels below 'labels')")
    return Path(*parts[:k], "labels", *parts[k + 1:]).with_suffix(".txt")


def _yolo_images(entry: Path, folder: Path) -> list[tuple[Path, Path]]:
    """(image, image folder it is relative to) for a folder or a list file of image paths (each relative to
    the list file, or absolute, and below the data set ``folder``)."""
    if entry.is_dir():
        return [(p, entry) for p in sorted(entry.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if entry.is_file():
        out = []
        here = os.path.relpath(entry.parent, folder)
        for line, rel in _list_file(entry):
            p = folder / _yaml_path(folder, here, rel, f"{entry}:{line}", yaml_entry=False)
            if not p.is_file():
                raise DatasetError(f"{entry}:{line}: image {rel} not found")
            out.append((p, p.parent))
        return out
    raise DatasetError(f"{entry}: no such image folder or list file")


def _read_label_file(path: Path, num_names: int, names_from: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rows, cls, where = [], [], []
    for line, text in enumerate(path.read_text().splitlines(), 1):
        fields = text.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise DatasetError(f"{path}:{line}: expected 'class cx cy w h', got {len(fields)} fields")
        try:
            c, values = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise DatasetError(f"{path}:{line}: not numbers: {text.strip()!r}") from None
        if not 0 <= c < num_names:
            raise DatasetError(f"{path}:{line}: class index {c} is beyond the {num_names} names of {names_from}")
        if not np.all(np.isfinite(values)):
            raise DatasetError(f"{path}:{line}: non-finite box {text.strip()!r}")
        rows.append(values)
        cls.append(c + 1)
        where.append(f"{path}:{line}")
    return np.array(rows, np.float64).reshape(-1, 4), np.array(cls, np.int64), where


def read_yolo(cfg: OwnDataConfig) -> tuple[list[dict[str, Any]], list[Item]]:
    folder, splits, names, names_from = _yolo_layout(cfg)
    items, label_dirs, used_labels = [], set(), {}
    for split, entries in splits.items():
        for entry in entries:
            for image, base in _yolo_images(entry, folder):
                label = _label_path(image)
                if label in used_labels:
                    raise DatasetError(f"{image} and {used_labels[label]} share the label file {label}")
                used_labels[label] = image
                label_dirs.add(label.parent)
                boxes, cls, where = (_read_label_file(label, len(names), names_from) if label.is_file()
                                     else (np.zeros((0, 4)), np.zeros(0, np.int64), []))
                items.append(Item(source=image, name=image.relative_to(base).as_posix(), split=split,
                                  image_id=None, ann_size=None, boxes=boxes, category_ids=cls,
                                  crowd=np.zeros(len(cls), bool), where=where, normalised=True,
                                  described=str(image)))
    for folder in sorted(label_dirs):
        for label in sorted(folder.glob("*.txt")):
            if label not in used_labels and label.name != "classes.txt":
                raise DatasetError(f"{label}: label file for a missing image (no image of that name in "
                                   f"{str(folder).replace('labels', 'images')})")
    return [{"id": i, "name": n} for i, n in enumerate(names, 1)], items


READERS = {"coco": read_coco, "voc": read_voc, "yolo": read_yolo}


# --------------------------------------------------------------------------------------------------
# split, images, boxes


def assign_splits(items: list[Item], val_fraction: float, seed: int) -> None:
    """Give every item without a split one: ``val_fraction`` of them (by name order, permuted from ``seed``)."""
    pool = sorted((it for it in items if it.split is None), key=lambda it: it.name)
    if not pool:
        return
    n_val = int(round(len(pool) * val_fraction))
    if val_fraction > 0 and len(pool) > 1:
        n_val = min(max(n_val, 1), len(pool) - 1)
    val = set(np.random.default_rng(seed).permutation(len(pool))[:n_val].tolist())
    for k, it in enumerate(pool):
        it.split = "val" if k in val else "train"


def _check_boxes(it: Item, width: int, height: int, strict: bool, counts: dict[str, int]) -> np.ndarray:
    """Keep mask of ``it.boxes`` (pixels x, y, w, h) in a ``width`` x ``height`` image; clips in place."""
    x, y, w, h = it.boxes.T
    degenerate = ~((w > 0) & (h > 0))
    outside = ~degenerate & ((x >= width) | (y >= height) | (x + w <= 0) | (y + h <= 0))
    for mask, what in ((degenerate, "has a non-positive size"), (outside, "lies outside the image")):
        if strict and mask.any():
            k = int(np.flatnonzero(mask)[0])
            raise DatasetError(f"{it.where[k]}: box {it.boxes[k].round(2).tolist()} {what} ({width}x{height}); "
                               f"set data.own.strict: false to drop such boxes")
    keep = ~degenerate & ~outside
    x1, y1 = np.clip(x, 0, width), np.clip(y, 0, height)
    x2, y2 = np.clip(x + w, 0, width), np.clip(y + h, 0, height)
    clipped = keep & ((x1 != x) | (y1 != y) | (x2 != x + w) | (y2 != y + h))
    it.boxes = np.stack([x1, y1, x2 - x1, y2 - y1], axis=1)
    counts["dropped_degenerate"] += int(degenerate.sum())
    counts["dropped_outside_image"] += int(outside.sum())
    counts["clipped_boxes"] += int(clipped.sum())
    return keep


@dataclass
class Converted:
    """The checked data set: per split the COCO dict; the image tasks; the report."""

    coco: dict[str, dict[str, Any]]
    tasks: list[tuple[str, str, Any]]
    report: dict[str, Any]


def prepare(cfg: OwnDataConfig) -> Converted:
    """Read, split and check everything, plan every image; nothing is written."""
    categories, items = READERS[cfg.format](cfg)
    if not items:
        raise DatasetError(f"data.own ({cfg.format}): no images found")
    if cfg.format != "coco":
        for i, it in enumerate(sorted(items, key=lambda it: (it.name, it.split or "")), 1):
            it.image_id = i
    assign_splits(items, cfg.val_fraction, cfg.split_seed)
    for split in SPLITS:
        if not any(it.split == split for it in items):
            hint = " (data.own.val_fraction is 0 and no val split is given)" if split == "val" else ""
            raise DatasetError(f"data.own ({cfg.format}): the {split} split is empty{hint}")
    known = np.array(sorted(c["id"] for c in categories), np.int64)
    counts = dict.fromkeys(("images", "boxes", "dropped_degenerate", "dropped_outside_image", "clipped_boxes",
                            "size_mismatch", "copied", "reencoded", "exif_rotated", "pixel_format", "other_format",
                            "downscaled"), 0)
    warnings: list[str] = []
    coco = {s: {"images": [], "annotations": [], "categories": categories} for s in SPLITS}
    tasks, out_names = [], set()
    for it in sorted(items, key=lambda it: (SPLITS.index(it.split), it.image_id)):
        if not np.isin(it.category_ids, known).all():  # the coco reader has checked this already
            k = int(np.flatnonzero(~np.isin(it.category_ids, known))[0])
            raise DatasetError(f"{it.where[k]}: unknown category id {int(it.category_ids[k])}")
        try:
            plan = plan_image(probe(it.source), cfg.exif_orientation, cfg.max_image_side)
        except ImageFileError as exc:
            raise DatasetError(f"{it.described}: {exc}") from None
        width, height = plan.width, plan.height
        if it.normalised:
            cx, cy, w, h = it.boxes.T
            it.boxes = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height], axis=1)
        if it.ann_size is not None and it.ann_size != (width, height):
            problem = (f"{it.described}: the annotation says {it.ann_size[0]}x{it.ann_size[1]}, the image file is "
                       f"{width}x{height}")
            if it.ann_size == (height, width) and cfg.exif_orientation == "apply":
                problem += (" (the annotation ignores the EXIF orientation: if its boxes were drawn on the "
                            "unrotated pixels, set data.own.exif_orientation: ignore)")
            if cfg.strict:
                raise DatasetError(problem + "; set data.own.strict: false to use the file's size")
            counts["size_mismatch"] += 1
            if len(warnings) < _MAX_WARNINGS:
                warnings.append(problem + "; using the file's size")
        keep = _check_boxes(it, width, height, cfg.strict, counts)
        sx, sy = plan.out_width / width, plan.out_height / height
        boxes = (it.boxes[keep] * [sx, sy, sx, sy]).round(2)
        name = PurePosixPath(it.name)
        name = str(name if name.suffix.lower() in ((".jpg", ".jpeg") if plan.suffix == ".jpg" else (".png",))
                   else name.with_suffix(plan.suffix))
        if (it.split, name) in out_names:
            raise DatasetError(f"{it.described}: two {it.split} images would both be written as {name}")
        out_names.add((it.split, name))
        split = coco[it.split]
        split["images"].append({"id": it.image_id, "file_name": name, "width": plan.out_width,
                                "height": plan.out_height})
        for box, cat, crowd in zip(boxes.tolist(), it.category_ids[keep].tolist(), it.crowd[keep].tolist()):
            split["annotations"].append({"id": 0, "image_id": it.image_id, "category_id": cat, "bbox": box,
                                         "area": round(box[2] * box[3], 2), "iscrowd": int(crowd)})
        counts["images"] += 1
        counts["boxes"] += int(keep.sum())
        counts["reencoded" if plan.reencode else "copied"] += 1
        for reason in plan.reasons:
            counts[reason] += 1
        tasks.append((str(it.source), f"{LAYOUTS['synthetic'][it.split][0]}/{name}", plan))
    ann_id = 0
    for split in SPLITS:
        for ann in coco[split]["annotations"]:
            ann_id += 1
            ann["id"] = ann_id
    counts.update({f"{s}_images": len(coco[s]["images"]) for s in SPLITS})
    report = {"format": cfg.format, "source": cfg.path or cfg.train.annotations, "counts": counts,
              "warnings": warnings}
    return Converted(coco, tasks, report)


def convert_own(cfg: OwnDataConfig, root: str | Path) -> dict[str, Any]:
    """Convert the data set ``cfg`` describes into the COCO tree at ``root`` (replaced atomically on
    success); returns the report (also written to ``root/conversion.json``)."""
    conv = prepare(cfg)
    for w in conv.report["warnings"]:
        log.warning("%s", w)
    with atomic_path(root, replaces=TREE_MARKERS) as tmp:
        tmp.mkdir()
        tasks = [(src, str(tmp / rel), plan) for src, rel, plan in conv.tasks]
        if cfg.workers > 1 and len(tasks) > 8:
            with get_context("spawn").Pool(cfg.workers) as pool:
                for _ in pool.imap_unordered(write_image_task, tasks, chunksize=16):
                    pass
        else:
            for task in tasks:
                write_image_task(task)
        (tmp / "annotations").mkdir()
        for split in SPLITS:
            (tmp / "annotations" / LAYOUTS["synthetic"][split][1]).write_text(
                json.dumps(conv.coco[split], separators=(",", ":")) + "\n")
        (tmp / CONVERSION_FILE).write_text(json.dumps(conv.report, indent=2) + "\n")
    return conv.report
