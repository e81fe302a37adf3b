"""COCO split -> sharded MindRecord files, plus a reader for tests and evaluation.

Every decision on the way is counted: crowd boxes are kept out of the targets, boxes are clipped to the
image, boxes entirely outside it or thinner than ``min_box_side`` after clipping are dropped, training
images left without a box are dropped unless ``keep_empty_images`` (validation keeps every image: COCOeval
needs them), and a missing or corrupt image stops the conversion naming the file or, with
``skip_bad_images``, is counted and skipped.

Worker processes read and check the image files; one writer writes. Each shard is written by its own
``FileWriter`` (MindRecord's multi-shard writer distributes rows at random), so the files are
byte-identical from run to run and the sample order never changes. Shards are independent MindRecord
files: pass the whole list from :func:`msdet.data.meta.mindrecord_files` to ``mindspore.dataset.MindDataset``.
``MindDataset`` refuses shards whose headers differ, so every shard of a split gets the same page and header
size (from the split's largest image and shard), and each split is opened as one ``MindDataset`` and its rows
counted before the output is published.
Everything goes to a temporary directory that replaces ``out_dir`` only when all of it succeeded.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from msdet.atomic import atomic_path
from msdet.config import MindrecordConfig
from msdet.data.coco import SPLITS, CocoAnnotations, CocoFormatError, CocoTree, load_annotations
from msdet.data.meta import META_FILE, gt_rows, mindrecord_files, write_meta
from msdet.errors import UserError

SCHEMA = {
    "image": {"type": "bytes"},
    "image_id": {"type": "int64"},
    "height": {"type": "int32"},
    "width": {"type": "int32"},
    "boxes": {"type": "float32", "shape": [-1, 4]},
    "labels": {"type": "int32", "shape": [-1]},
}
COLUMNS = tuple(SCHEMA)
BOX_DROP_REASONS = ("crowd", "outside_image", "degenerate")
# Rows handed to FileWriter per call (or fewer when they exceed _WRITE_BYTES): fixed, for identical files.
_WRITE_ROWS = 64
_WRITE_BYTES = 64 << 20
_MAX_LISTED_SKIPS = 50


class BadImageError(UserError):
    """An image file is missing, truncated, undecodable or not the size its annotation states."""


class UnreadableSplitError(UserError):
    """The shards written for a split do not open together as one ``MindDataset``, or hold other rows."""


@dataclass(frozen=True)
class SplitTargets:
    """What will be written for one split, before the image files are read."""

    image_rows: np.ndarray      # int64 [N]: rows of the annotation file's image arrays, by increasing image id
    boxes: list[np.ndarray]     # float32 [n_i, 4] x1, y1, x2, y2 in original pixels, clipped to the image
    labels: list[np.ndarray]    # int32 [n_i] contiguous class index
    dropped: dict[str, int]     # boxes per BOX_DROP_REASONS and images as "empty_image"
    clipped_boxes: int          # kept boxes that were clipped to the image


def build_targets(ann: CocoAnnotations, min_box_side: float, keep_empty_images: bool) -> SplitTargets:
    """Apply the box rules to every annotation at once and group the survivors per image."""
    x, y, w, h = ann.bboxes.T
    x1, y1, x2, y2 = x, y, x + w, y + h
    width = ann.widths[ann.ann_image_index].astype(np.float64)
    height = ann.heights[ann.ann_image_index].astype(np.float64)
    crowd = ann.iscrowd
    outside = ~crowd & ((x1 >= width) | (y1 >= height) | (x2 <= 0) | (y2 <= 0))
    cx1, cx2 = np.clip(x1, 0, width), np.clip(x2, 0, width)
    cy1, cy2 = np.clip(y1, 0, height), np.clip(y2, 0, height)
    side = np.minimum(cx2 - cx1, cy2 - cy1)
    degenerate = ~crowd & ~outside & ((side < min_box_side) | (side <= 0))
    keep = ~crowd & ~outside & ~degenerate
    clipped = keep & ((cx1 != x1) | (cy1 != y1) | (cx2 != x2) | (cy2 != y2))

    kept = np.flatnonzero(keep)
    kept = kept[np.lexsort((ann.ann_ids[kept], ann.ann_image_index[kept]))]
    per_image = np.bincount(ann.ann_image_index[kept], minlength=ann.num_images)
    boxes_all = np.stack([cx1, cy1, cx2, cy2], axis=1)[kept].astype(np.float32)
    labels_all = ann.categories.to_index(ann.category_ids[kept])
    bounds = np.concatenate([[0], np.cumsum(per_image)])

    rows = np.argsort(ann.image_ids, kind="stable")
    empty = per_image[rows] == 0
    if not keep_empty_images:
        rows = rows[~empty]
    return SplitTargets(
        image_rows=rows,
        boxes=[boxes_all[bounds[r]:bounds[r + 1]] for r in rows],
        labels=[labels_all[bounds[r]:bounds[r + 1]] for r in rows],
        dropped={"crowd": int(crowd.sum()), "outside_image": int(outside.sum()),
                 "degenerate": int(degenerate.sum()), "empty_image": 0 if keep_empty_images else int(empty.sum())},
        clipped_boxes=int(clipped.sum()),
    )


def check_image_bytes(data: bytes, width: int, height: int) -> str | None:
    """The problem with an encoded image, or None when it decodes completely to ``width`` x ``height``."""
    if not data:
        return "empty file"
    if data[:2] == b"\xff\xd8":
        # Entropy-coded data cannot contain FF D9, so the last scan (after the last SOS) must end with EOI.
        if data.find(b"\xff\xd9", max(data.rfind(b"\xff\xda"), 0)) < 0:
            return "truncated JPEG (no end-of-image marker)"
    elif data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-16:]:
        return "truncated PNG (no IEND chunk)"
    # COCO boxes refer to the stored pixel grid: EXIF orientation must not rotate it.
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        return "cannot be decoded as an image"
    if img.shape[:2] != (height, width):
        return f"is {img.shape[1]}x{img.shape[0]} but its annotation says {width}x{height}"
    return None


def _read_image(task: tuple[str, int, int]) -> tuple[bytes | None, str | None]:
    path, width, height = task
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None, "file not found"
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    problem = check_image_bytes(data, width, height)
    return (None, problem) if problem else (data, None)


def _worker_init() -> None:
    cv2.setNumThreads(1)


def _pow2(n: float) -> int:
    return 1 << max(int(np.ceil(np.log2(max(n, 1)))), 0)


def writer_sizes(max_row_bytes: int, shard_bytes: int, shard_rows: int) -> tuple[int, int]:
    """(page_size, header_size) for one shard: pages hold >= 8 of the largest rows; the header lists pages.

    MindRecord's defaults (32 MB pages, 16 MB header) pad every small file to ~50 MB.
    """
    page = min(_pow2(max(8 * max_row_bytes, 1 << 20)), 1 << 28)
    if max_row_bytes > page:
        raise BadImageError(f"a sample of {max_row_bytes} bytes exceeds MindRecord's 256 MB page limit")
    pages = 2 * (shard_bytes // (page // 2) + 1) + 2 * (shard_rows // _WRITE_ROWS + 1) + 16
    header = min(max(_pow2(pages * 512 + (1 << 16)), 1 << 14), 1 << 27)
    return page, header


class _ShardWriter:
    """One MindRecord file, fed row by row in fixed-size batches."""

    def __init__(self, path: Path, page_size: int, header_size: int):
        from mindspore.mindrecord import FileWriter  # heavy import: only in the writing process

        self.path = path
        self.writer = FileWriter(str(path), shard_num=1, overwrite=False)
        self.writer.set_page_size(page_size)
        self.writer.set_header_size(header_size)
        self.writer.add_schema(SCHEMA, "msdet detection sample")
        self.rows: list[dict[str, Any]] = []
        self.nbytes = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.nbytes += len(row["image"])
        if len(self.rows) >= _WRITE_ROWS or self.nbytes >= _WRITE_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_raw_data(self.rows)
        self.rows, self.nbytes = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.commit()


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}.mindrecord{index:0{len(str(num_shards - 1))}d}"


def convert_split(ann: CocoAnnotations, image_dir: Path, out_dir: Path, split: str, cfg: MindrecordConfig,
                  pool: Pool | None = None) -> dict[str, Any]:
    """Write ``<out_dir>/<split>.mindrecord<k>`` (+ .db) for one split; returns its statistics."""
    keep_empty = cfg.keep_empty_images or split != "train"
    targets = build_targets(ann, cfg.min_box_side, keep_empty)
    rows = targets.image_rows
    if not len(rows):
        raise CocoFormatError(f"{ann.path}: no {split} image has a usable box; nothing to write")
    paths = [str(image_dir / ann.file_names[r]) for r in rows]
    sizes = np.array([os.path.getsize(p) if os.path.isfile(p) else 0 for p in paths], dtype=np.int64)
    max_boxes = max(len(b) for b in targets.boxes)
    num_shards = min(cfg.train_shards if split == "train" else cfg.val_shards, len(rows))
    shard_of = np.repeat(np.arange(num_shards), [len(c) for c in np.array_split(np.arange(len(rows)), num_shards)])
    # MindDataset refuses shards whose headers differ: one page and header size for the whole split
    page, header = writer_sizes(int(sizes.max()) + 20 * max_boxes + 256,
                                int(np.bincount(shard_of, weights=sizes).max()),
                                int(np.bincount(shard_of).max()))

    tasks = [(p, int(ann.widths[r]), int(ann.heights[r])) for p, r in zip(paths, rows)]
    results = pool.imap(_read_image, tasks, chunksize=8) if pool is not None else map(_read_image, tasks)
    per_class = np.zeros(ann.categories.num_classes, dtype=np.int64)
    files, skipped, boxes_per_image, writer, written = [], [], [], None, 0
    for i, (data, problem) in enumerate(tqdm(results, total=len(tasks), desc=f"mindrecord {split}",
                                             mininterval=5, disable=None)):
        if writer is not None and writer.path.name != shard_name(split, int(shard_of[i]), num_shards):
            writer.close()
            writer = None
        if problem is not None:
            if not cfg.skip_bad_images:
                raise BadImageError(f"{paths[i]}: {problem} (set mindrecord.skip_bad_images: true to skip "
                                    f"such images)")
            skipped.append(f"{ann.file_names[rows[i]]}: {problem}")
            continue
        if writer is None:
            writer = _ShardWriter(out_dir / shard_name(split, int(shard_of[i]), num_shards), page, header)
            files.append(writer.path.name)
        r = rows[i]
        writer.add({"image": data, "image_id": int(ann.image_ids[r]), "height": int(ann.heights[r]),
                    "width": int(ann.widths[r]), "boxes": targets.boxes[i], "labels": targets.labels[i]})
        per_class += np.bincount(targets.labels[i], minlength=len(per_class))
        boxes_per_image.append(len(targets.labels[i]))
        written += 1
    if writer is not None:
        writer.close()
    if not written:
        raise BadImageError(f"{image_dir}: every {split} image was skipped as bad; nothing to write")
    return {
        "images": written,
        "boxes": int(per_class.sum()),
        "per_class": dict(zip(ann.categories.names, per_class.tolist())),
        "dropped": targets.dropped,
        "clipped_boxes": targets.clipped_boxes,
        "skipped_images": len(skipped),
        "skipped_files": skipped[:_MAX_LISTED_SKIPS],
        "files": files,
        "boxes_per_image": np.array(boxes_per_image, dtype=np.int64),
    }


def check_split_readable(folder: Path, split: str, files: list[str], rows: int, final: Path) -> None:
    """Open the split's shards as training and evaluation do (one ``MindDataset``) and count the rows, so that
    shards MindSpore refuses to read together fail here, named, and not in a later stage."""
    import mindspore.dataset as ds

    try:
        found = ds.MindDataset([str(folder / f) for f in files], columns_list=["image_id"],
                               shuffle=False).get_dataset_size()
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if line.startswith("[ERROR]")),
                      " ".join(str(exc).split())[:300])
        raise UnreadableSplitError(f"{final}: the {len(files)} {split} shard(s) do not read as one MindDataset: "
                                   f"{detail.replace(str(folder), str(final))}") from None
    if found != rows:
        raise UnreadableSplitError(f"{final}: the {split} shards hold {found} rows, {rows} were written")


def gt_padding_report(boxes_per_image: np.ndarray, caps: dict[str, int]) -> dict[str, Any]:
    """Per model (``caps``: its ``train.max_gt_boxes``, 0 = derived): the padded rows and the boxes on
    training images beyond them, which padding drops (an upper bound: augmentation only removes boxes)."""
    most = int(boxes_per_image.max(initial=0))
    report: dict[str, Any] = {"max_boxes_per_image": most}
    for model, pinned in caps.items():
        rows = gt_rows(pinned, most)
        over = np.maximum(boxes_per_image - rows, 0)
        report[model] = {"max_gt_boxes": rows, "boxes_over_cap": int(over.sum()),
                         "images_over_cap": int(np.count_nonzero(over))}
    return report


def convert_tree(tree: CocoTree, out_dir: str | Path, cfg: MindrecordConfig,
                 gt_caps: dict[str, int] | None = None) -> dict[str, Any]:
    """Convert train and val of ``tree`` into ``out_dir`` (atomically) and write meta.json.

    Returns the statistics for metrics/data.json (numbers only): ``num_classes`` and, per split, images,
    boxes, per-class box counts by name, dropped boxes/images by reason, clipped boxes and skipped images.
    The names of skipped files go to meta.json. With ``gt_caps`` (model -> ``train.max_gt_boxes``) the
    statistics also hold ``gt_padding`` (:func:`gt_padding_report` of the training split).
    """
    anns = {s: load_annotations(tree[s].annotation_file) for s in SPLITS}
    categories = anns["train"].categories
    if anns["val"].categories != categories:
        raise CocoFormatError(f"{tree['val'].annotation_file}: categories differ from "
                              f"{tree['train'].annotation_file}")
    stats: dict[str, Any] = {"num_classes": categories.num_classes}
    with atomic_path(out_dir, replaces=META_FILE) as tmp:
        tmp.mkdir()
        pool = get_context("spawn").Pool(cfg.workers, initializer=_worker_init) if cfg.workers > 1 else None
        try:
            for split in SPLITS:
                stats[split] = convert_split(anns[split], tree[split].image_dir, tmp, split, cfg, pool)
                check_split_readable(tmp, split, stats[split]["files"], stats[split]["images"], Path(out_dir))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        meta = {
            "categories": categories.as_list(),
            "num_classes": categories.num_classes,
            "columns": list(COLUMNS),
            # file lists stay out of the metrics, which hold numbers only
            "splits": {s: {"files": stats[s].pop("files"), "images": stats[s]["images"],
                           "boxes": stats[s]["boxes"], "skipped_files": stats[s].pop("skipped_files")}
                       for s in SPLITS},
        }
        write_meta(tmp, meta)
    train_counts = [stats[s].pop("boxes_per_image") for s in SPLITS][0]
    if gt_caps is not None:
        stats["gt_padding"] = gt_padding_report(train_counts, gt_caps)
    return stats


def read_mindrecord(path: str | Path, split: str | None = None) -> Iterator[dict[str, Any]]:
    """Samples in stored order: image bytes, image_id/height/width ints, boxes [n, 4] and labels [n].

    ``path`` is one MindRecord file, or with ``split`` the output folder (then every shard of the split).
    """
    if split is not None:
        for shard in mindrecord_files(path, split):
            yield from read_mindrecord(shard)
        return
    from mindspore.mindrecord import FileReader

    reader = FileReader(str(path), num_consumer=1)
    try:
        for row in reader.get_next():
            yield {
                "image": bytes(row["image"]),
                "image_id": int(row["image_id"]),
                "height": int(row["height"]),
                "width": int(row["width"]),
                "boxes": np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4),
                "labels": np.asarray(row["labels"], dtype=np.int32).reshape(-1),
            }
    finally:
        reader.close()


def max_boxes_per_image(out_dir: str | Path, split: str = "train") -> int:
    """The most boxes on one image of ``split`` (reads only the labels column, not the images)."""
    from mindspore.mindrecord import FileReader

    most = 0
    for shard in mindrecord_files(out_dir, split):
        reader = FileReader(str(shard), num_consumer=1, columns=["labels"])
        try:
            for row in reader.get_next():
                most = max(most, int(np.asarray(row["labels"]).size))
        finally:
            reader.close()
    return most


def read_split(out_dir: str | Path, split: str) -> Iterator[dict[str, Any]]:
    """Every sample of ``split``, shard after shard."""
    return read_mindrecord(out_dir, split)
