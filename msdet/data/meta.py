"""The converted data set's metadata: ``<mindrecord.out_dir>/meta.json``, its one reader and writer.

The MindRecord stage writes it last, with the shards, so it is the authority on which files make a split
(categories in class-index order, ``num_classes``, per split the shard files, images, boxes and skipped
files). Everything downstream (training, evaluation, export, inference, the benchmarks) reads it here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from msdet.atomic import write_json

META_FILE = "meta.json"
#: Padded ground-truth rows derived from the data are a multiple of this (static shapes compile once).
GT_ROWS_MULTIPLE = 8


class MetaError(ValueError):
    """meta.json is missing, malformed, or lists files that are not there; the message names it."""


def meta_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / META_FILE


def read_meta_file(path: str | Path) -> dict[str, Any]:
    """A ``meta.json`` given by its own path: a mapping with an integer ``num_classes`` and ``categories``.

    A missing file raises FileNotFoundError, a malformed one :class:`MetaError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: MindRecord metadata not found; run the mindrecord stage first")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MetaError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("num_classes"), int):
        raise MetaError(f"{path}: no integer 'num_classes'")
    cats = meta.get("categories")
    if not isinstance(cats, list) or len(cats) != meta["num_classes"] or not all(
            isinstance(c, dict) and "id" in c and "name" in c for c in cats):
        raise MetaError(f"{path}: 'categories' must list num_classes entries with 'id' and 'name'")
    return meta


def read_meta(out_dir: str | Path) -> dict[str, Any]:
    """The meta.json of the MindRecord folder ``out_dir``."""
    return read_meta_file(meta_path(out_dir))


def write_meta(out_dir: str | Path, meta: dict[str, Any]) -> None:
    """Written by the MindRecord stage: inside its temporary folder, then once more with the fitted anchors
    (atomically: a reader never sees half a file)."""
    write_json(meta_path(out_dir), meta)


def is_converted(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a meta.json whose train and val shard files are all present."""
    try:
        return all(mindrecord_files(out_dir, s) for s in ("train", "val"))
    except (MetaError, FileNotFoundError):
        return False


def num_classes(out_dir: str | Path) -> int:
    return int(read_meta(out_dir)["num_classes"])


def class_names(meta: dict[str, Any]) -> list[str]:
    return [str(c["name"]) for c in meta["categories"]]


def category_ids(meta: dict[str, Any]) -> list[int]:
    """The data set's own category id of each class index."""
    return [int(c["id"]) for c in meta["categories"]]


def mindrecord_files(out_dir: str | Path, split: str) -> list[Path]:
    """The shard files of ``split`` in order, as meta.json lists them; give all of them to ``MindDataset``.

    A listed file or its ``.db`` index that is missing (an incomplete copy) raises FileNotFoundError.
    """
    meta = read_meta(out_dir)
    splits = meta.get("splits", {})
    if split not in splits or not splits[split].get("files"):
        raise FileNotFoundError(f"{meta_path(out_dir)}: no {split}.mindrecord files listed; run the mindrecord "
                                f"stage first")
    files = [Path(out_dir) / f for f in splits[split]["files"]]
    missing = [str(f) for f in files if not f.is_file()]
    missing += [f"{f}.db" for f in files if f.is_file() and not Path(f"{f}.db").is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir}: MindRecord file(s) listed in {META_FILE} are missing (incomplete "
                                f"copy?): {', '.join(missing)}")
    return files


def gt_rows(pinned: int, max_boxes_per_image: int) -> int:
    """Ground-truth rows each training image is padded to: ``pinned`` when set (> 0), else the most boxes
    on one training image rounded up to a multiple of :data:`GT_ROWS_MULTIPLE`. Augmentation only ever
    removes boxes (crops), so the derived value never drops one."""
    if pinned > 0:
        return int(pinned)
    m = GT_ROWS_MULTIPLE
    return max(m, -(-int(max_boxes_per_image) // m) * m)
