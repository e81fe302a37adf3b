"""Reading and validating COCO-format trees and annotation files.

Two layouts are recognised under a root: the synthetic one (``train/``, ``val/``,
``annotations/instances_{train,val}.json``) and COCO 2017 (``train2017/``, ``val2017/``,
``annotations/instances_{train,val}2017.json``). A root may instead hold a pointer file ``source.json``
naming a tree elsewhere, which is then used in place (a local COCO copy is never duplicated).
Problems are reported by file name and, for annotations, by the offending annotation or image id.

A path read from a data set file (a COCO ``file_name``, a VOC ``<filename>``, a YOLO ``data.yaml`` entry or
list-file line) is untrusted: :func:`relative_below` admits it only as a relative path that stays below the
folder it is relative to, checked on the text before anything is read or written. Symbolic links below that
folder are followed when reading (data sets often link their images to a shared store); outputs are always
written into fresh temporary folders under names derived from these checked paths, never through a link.
"""
from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msdet.atomic import atomic_path

SPLITS = ("train", "val")
POINTER_FILE = "source.json"
#: one of these is in every tree the download stage writes at ``data.root`` (a copy, or a pointer), so a
#: ``data.root`` holding anything else (a folder of the user's own) is refused instead of replaced
TREE_MARKERS = ("annotations/instances_train.json", POINTER_FILE)
#: Written by the conversion of a user's data set (msdet/data/own.py) into the tree it makes: what was
#: converted, dropped, clipped or re-encoded; the MindRecord stage copies it into metrics/data.json.
CONVERSION_FILE = "conversion.json"
LAYOUTS = {
    # layout name -> split -> (image folder, annotation file under annotations/)
    "synthetic": {s: (s, f"instances_{s}.json") for s in SPLITS},
    "coco2017": {s: (f"{s}2017", f"instances_{s}2017.json") for s in SPLITS},
}


class CocoFormatError(ValueError):
    """A COCO tree or annotation file is missing, malformed or inconsistent; the message names it."""


def relative_below(entry: str) -> str:
    """``entry`` as a clean relative POSIX path that stays below the folder it is joined to ("." for the
    folder itself); ``ValueError`` saying why otherwise (absolute, ``..`` leaving the folder, empty, ...)."""
    if not entry.strip():
        raise ValueError("is empty")
    if "\0" in entry:
        raise ValueError("contains a NUL character")
    if "\\" in entry:
        raise ValueError("contains a backslash (write the path with /)")
    if entry.startswith("/") or (len(entry) > 1 and entry[1] == ":" and entry[0].isalpha()):
        raise ValueError("is an absolute path (it must be relative to its folder)")
    clean = posixpath.normpath(entry)
    if clean == ".." or clean.startswith("../"):
        raise ValueError("leads outside its folder (..)")
    return clean


@dataclass(frozen=True)
class SplitFiles:
    name: str
    image_dir: Path
    annotation_file: Path


@dataclass(frozen=True)
class CocoTree:
    root: Path
    layout: str
    splits: dict[str, SplitFiles]

    def __getitem__(self, split: str) -> SplitFiles:
        return self.splits[split]

    @property
    def annotations(self) -> dict[str, Path]:
        """Split -> its instances JSON (the ground truth COCOeval needs, crowd boxes included)."""
        return {s: f.annotation_file for s, f in self.splits.items()}

    @property
    def images(self) -> dict[str, Path]:
        return {s: f.image_dir for s, f in self.splits.items()}


def _follow_pointer(root: Path) -> Path:
    pointer = root / POINTER_FILE
    try:
        target = json.loads(pointer.read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CocoFormatError(f"{pointer}: unreadable pointer file (expected {{\"path\": ...}}): {exc}") from exc
    target = Path(target)
    if (target / POINTER_FILE).exists():
        raise CocoFormatError(f"{pointer}: points to {target}, which is itself a pointer; point to the tree")
    return target


def resolve_tree(path: str | Path) -> CocoTree:
    """Locate the split folders and annotation files under ``path`` (following ``source.json``)."""
    root = Path(path)
    if (root / POINTER_FILE).is_file():
        root = _follow_pointer(root)
    if not root.is_dir():
        raise CocoFormatError(f"{root}: COCO tree not found (no such directory)")
    ann_dir = root / "annotations"
    coco_marks = [root / "train2017", root / "val2017", ann_dir / "instances_train2017.json",
                  ann_dir / "instances_val2017.json"]
    layout = "coco2017" if any(p.exists() for p in coco_marks) else "synthetic"
    splits, missing = {}, []
    for split, (folder, ann_name) in LAYOUTS[layout].items():
        files = SplitFiles(split, root / folder, ann_dir / ann_name)
        if not files.image_dir.is_dir():
            missing.append(f"image folder {folder}/")
        if not files.annotation_file.is_file():
            missing.append(f"annotation file annotations/{ann_name}")
        splits[split] = files
    if missing:
        raise CocoFormatError(f"{root}: incomplete COCO tree ({layout} layout): missing " + ", ".join(missing))
    return CocoTree(root=root, layout=layout, splits=splits)


class CategoryMap:
    """COCO category ids (with gaps) <-> contiguous class indices 0..C-1, in increasing id order."""

    def __init__(self, categories: Sequence[Mapping[str, Any]], source: str = "categories"):
        try:
            pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
        except (KeyError, TypeError, ValueError) as exc:
            raise CocoFormatError(f"{source}: each category needs an integer 'id' and a 'name' ({exc})") from exc
        if not pairs:
            raise CocoFormatError(f"{source}: no categories")
        self.ids = np.array([p[0] for p in pairs], dtype=np.int64)
        self.names = [p[1] for p in pairs]
        dup = self.ids[1:][self.ids[1:] == self.ids[:-1]]
        if dup.size:
            raise CocoFormatError(f"{source}: duplicate category id {int(dup[0])}")

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    def to_index(self, coco_ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Class indices of ``coco_ids``; an unknown id raises :class:`CocoFormatError`."""
        ids = np.asarray(coco_ids, dtype=np.int64)
        idx = np.searchsorted(self.ids, ids)
        bad = (idx >= len(self.ids)) | (self.ids[np.minimum(idx, len(self.ids) - 1)] != ids)
        if np.any(bad):
            raise CocoFormatError(f"unknown category id {int(ids[bad][0])}; known: {self.ids.tolist()}")
        return idx.astype(np.int32)

    def to_coco_id(self, index: Iterable[int] | np.ndarray) -> np.ndarray:
        return self.ids[np.asarray(index, dtype=np.int64)]

    def as_list(self) -> list[dict[str, Any]]:
        return [{"id": int(i), "name": n} for i, n in zip(self.ids, self.names)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CategoryMap) and self.as_list() == other.as_list()

    def __repr__(self) -> str:
        return f"CategoryMap({self.as_list()})"


@dataclass(frozen=True)
class CocoAnnotations:
    """One annotation file as arrays; annotations refer to images by row index into the image arrays."""

    path: Path
    image_ids: np.ndarray        # int64 [I]
    file_names: list[str]        # [I]
    widths: np.ndarray           # int64 [I]
    heights: np.ndarray          # int64 [I]
    ann_ids: np.ndarray          # int64 [A]
    ann_image_index: np.ndarray  # int64 [A], row into the image arrays
    bboxes: np.ndarray           # float64 [A, 4] x, y, w, h as in the file
    category_ids: np.ndarray     # int64 [A]
    iscrowd: np.ndarray          # bool [A]
    categories: CategoryMap

    @property
    def num_images(self) -> int:
        return len(self.image_ids)


def _column(records: list, key: str, what: str, path: Path, default: Any = None) -> list:
    """``[r[key] for r in records]`` with an error naming the first record that lacks ``key``."""
    try:
        if default is None:
            return [r[key] for r in records]
        return [r.get(key, default) for r in records]
    except (KeyError, TypeError, AttributeError):
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise CocoFormatError(f"{path}: {what} #{i} is not an object") from None
            if key not in r:
                ident = f" (id {r['id']})" if "id" in r else ""
                raise CocoFormatError(f"{path}: {what} #{i}{ident} has no '{key}'") from None
        raise


def _is_int(v: Any) -> bool:
    return isinstance(v, int) or (isinstance(v, float) and np.isfinite(v) and v == int(v))


def _int_array(values: list, key: str, what: str, path: Path) -> np.ndarray:
    try:
        arr = np.asarray(values)
        ok = arr.ndim == 1 and arr.dtype.kind in "biuf"
    except ValueError:  # ragged
        ok = False
    if ok and arr.dtype.kind == "f":
        ok = bool(np.all(np.isfinite(arr))) and bool(np.all(arr == np.round(arr)))
    if not ok:
        bad = next((i for i, v in enumerate(values) if not _is_int(v)), 0)
        raise CocoFormatError(f"{path}: {what} #{bad} has a non-integer '{key}': {values[bad]!r}")
    return arr.astype(np.int64)


def load_annotations(path: str | Path) -> CocoAnnotations:
    """Read and check a COCO instances file: schema, ids, references, box values."""
    path = Path(path)
    if not path.is_file():
        raise CocoFormatError(f"{path}: annotation file not found")
    if path.stat().st_size == 0:
        raise CocoFormatError(f"{path}: annotation file is empty")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise CocoFormatError(f"{path}: not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CocoFormatError(f"{path}: not valid JSON (not UTF-8 text): {exc}") from exc
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: top level must be an object with images/annotations/categories")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise CocoFormatError(f"{path}: missing key(s) {', '.join(missing)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{path}: '{key}' must be a list")
    images, anns = data["images"], data["annotations"]
    categories = CategoryMap(data["categories"], source=f"{path}: categories")

    image_ids = _int_array(_column(images, "id", "image", path), "id", "image", path)
    widths = _int_array(_column(images, "width", "image", path), "width", "image", path)
    heights = _int_array(_column(images, "height", "image", path), "height", "image", path)
    file_names = [str(n) for n in _column(images, "file_name", "image", path)]
    for k, name in enumerate(file_names):
        try:
            file_names[k] = relative_below(name)
        except ValueError as exc:
            ident = images[k].get("id", f"#{k}")
            raise CocoFormatError(f"{path}: image id {ident}: file_name {name!r} {exc}") from None
    if np.any(widths <= 0) or np.any(heights <= 0):
        bad = int(np.flatnonzero((widths <= 0) | (heights <= 0))[0])
        raise CocoFormatError(f"{path}: image id {image_ids[bad]} has a non-positive size "
                              f"{widths[bad]}x{heights[bad]}")
    order = np.argsort(image_ids, kind="stable")
    sorted_ids = image_ids[order]
    if np.any(sorted_ids[1:] == sorted_ids[:-1]):
        dup = int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])
        raise CocoFormatError(f"{path}: duplicate image id {dup}")

    ann_ids = _int_array(_column(anns, "id", "annotation", path), "id", "annotation", path)
    ann_image_ids = _int_array(_column(anns, "image_id", "annotation", path), "image_id", "annotation", path)
    category_ids = _int_array(_column(anns, "category_id", "annotation", path), "category_id", "annotation",
                              path)
    iscrowd = _int_array(_column(anns, "iscrowd", "annotation", path, default=0), "iscrowd", "annotation",
                         path).astype(bool)
    raw_boxes = _column(anns, "bbox", "annotation", path)
    try:
        bboxes = np.asarray(raw_boxes)
        ok = not len(anns) or (bboxes.dtype.kind in "iuf" and bboxes.shape == (len(anns), 4))
    except ValueError:  # ragged
        ok = False
    if not ok:
        bad = next((i for i, b in enumerate(raw_boxes) if not (isinstance(b, list) and len(b) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in b))), 0)
        raise CocoFormatError(f"{path}: annotation id {ann_ids[bad]} has a malformed bbox {raw_boxes[bad]!r} "
                              f"(expected [x, y, w, h])")
    bboxes = bboxes.astype(np.float64).reshape(len(anns), 4)
    if not np.all(np.isfinite(bboxes)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(bboxes), axis=1))[0])
        raise CocoFormatError(f"{path}: annotation id {ann_ids[bad]} has a non-finite bbox {raw_boxes[bad]!r}")

    pos = np.minimum(np.searchsorted(sorted_ids, ann_image_ids), max(len(sorted_ids) - 1, 0))
    unknown_image = sorted_ids[pos] != ann_image_ids if len(sorted_ids) else np.ones(len(anns), bool)
    if np.any(unknown_image):
        bad = int(np.flatnonzero(unknown_image)[0])
        raise CocoFormatError(f"{path}: annotation id {ann_ids[bad]} refers to unknown image id "
                              f"{ann_image_ids[bad]}")
    known_cat = np.isin(category_ids, categories.ids)
    if not np.all(known_cat):
        bad = int(np.flatnonzero(~known_cat)[0])
        raise CocoFormatError(f"{path}: annotation id {ann_ids[bad]} has unknown category id "
                              f"{category_ids[bad]} (known: {categories.ids.tolist()})")
    return CocoAnnotations(
        path=path, image_ids=image_ids, file_names=file_names, widths=widths, heights=heights,
        ann_ids=ann_ids, ann_image_index=order[pos] if len(anns) else np.zeros(0, np.int64), bboxes=bboxes,
        category_ids=category_ids, iscrowd=iscrowd, categories=categories)


def validate_tree(tree: CocoTree) -> dict[str, dict[str, int]]:
    """Load both annotation files, check they share categories and that every image file exists.

    Returns images and annotations per split. Image contents are checked later, by the MindRecord stage.
    """
    summary, categories = {}, None
    for split, files in tree.splits.items():
        ann = load_annotations(files.annotation_file)
        if categories is not None and ann.categories != categories:
            raise CocoFormatError(f"{files.annotation_file}: categories differ from the other split's")
        categories = ann.categories
        present = set(os.listdir(files.image_dir))
        absent = [n for n in ann.file_names if n not in present and not (files.image_dir / n).is_file()]
        if absent:
            raise CocoFormatError(f"{files.image_dir}: {len(absent)} image file(s) listed in "
                                  f"{files.annotation_file.name} are missing, e.g. {', '.join(absent[:5])}")
        summary[split] = {"images": ann.num_images, "annotations": len(ann.ann_ids)}
    return summary


def read_conversion_report(tree: CocoTree) -> dict[str, Any] | None:
    """The conversion report of a tree made from a user's data set, or None for other trees."""
    path = tree.root / CONVERSION_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CocoFormatError(f"{path}: not valid JSON: {exc}") from exc


def write_pointer(root: str | Path, target: str | Path) -> CocoTree:
    """Validate the COCO tree at ``target`` and make ``root`` point to it (atomically replacing ``root``)."""
    target = Path(target).expanduser().resolve()
    here = Path(root).resolve()
    if here == target or here in target.parents or target in here.parents:
        raise CocoFormatError(f"{target}: the COCO tree overlaps {root}, which the pointer replaces; "
                              f"keep the tree outside data.root")
    tree = resolve_tree(target)
    validate_tree(tree)
    with atomic_path(root, replaces=TREE_MARKERS) as tmp:
        tmp.mkdir()
        (tmp / POINTER_FILE).write_text(json.dumps({"path": str(target)}, indent=2) + "\n")
    return tree
