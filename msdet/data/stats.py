"""What the converted data set holds, before anything trains on it: DVC plot tables, D0's anchors fitted to the
boxes with their best-possible recall, and a health warning.

Per split, ``plots/data/<split>/``: ``classes.csv`` (boxes per class), ``boxes_per_image.csv``,
``box_size.csv`` (histogram of sqrt(box area / image area): the box side relative to the image side),
``aspect_ratio.csv`` (histogram of log2(width / height)) and ``health.csv`` (boxes dropped per reason,
boxes clipped, images skipped: the conversion's counts of metrics/data.json). Read from the MindRecord
shards' box columns only (no image is decoded), so the tables describe exactly what training reads.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msdet.atomic import atomic_path
from msdet.config import D0Config
from msdet.data.meta import mindrecord_files
from msdet.ops.anchor_fit import anchor_quality, fit_anchors
from msdet.ops.anchors import AnchorSpec

#: relative box size bins (sqrt(box area / image area)) and log2 aspect-ratio bins (values beyond: edge bins)
SIZE_EDGES = np.linspace(0.0, 1.0, 21)
ASPECT_EDGES = np.linspace(-4.0, 4.0, 33)
#: D0's pyramid levels (EfficientDet P3-P7)
D0_LEVELS = (3, 4, 5, 6, 7)


@dataclass(frozen=True)
class BoxTable:
    """Every box of a split, flat: ``boxes`` [N, 4] x1, y1, x2, y2 original pixels, ``labels`` [N] class index,
    ``image_of`` [N] the box's image; per image ``heights``, ``widths`` [I]."""

    boxes: np.ndarray
    labels: np.ndarray
    image_of: np.ndarray
    heights: np.ndarray
    widths: np.ndarray


def read_boxes(out_dir: str | Path, split: str) -> BoxTable:
    """The box columns of ``split`` in the MindRecord folder ``out_dir``, in stored order."""
    from mindspore.mindrecord import FileReader

    boxes, labels, heights, widths = [], [], [], []
    for shard in mindrecord_files(out_dir, split):
        reader = FileReader(str(shard), num_consumer=1, columns=["boxes", "labels", "height", "width"])
        try:
            for row in reader.get_next():
                boxes.append(np.asarray(row["boxes"], np.float32).reshape(-1, 4))
                labels.append(np.asarray(row["labels"], np.int64).reshape(-1))
                heights.append(int(row["height"]))
                widths.append(int(row["width"]))
        finally:
            reader.close()
    counts = np.array([len(lb) for lb in labels], dtype=np.int64)
    return BoxTable(np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
                    np.concatenate(labels) if labels else np.zeros(0, np.int64),
                    np.repeat(np.arange(len(counts)), counts), np.array(heights), np.array(widths))


def _histogram(values: np.ndarray, edges: np.ndarray, column: str) -> list[dict[str, Any]]:
    counts = np.bincount(np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2),
                         minlength=len(edges) - 1)
    centres = (edges[:-1] + edges[1:]) / 2.0
    return [{column: round(float(c), 4), "boxes": int(n)} for c, n in zip(centres, counts)]


def split_tables(table: BoxTable, class_names: list[str], split_stats: dict[str, Any]) -> dict[str, list[dict]]:
    """The plot tables of one split (see the module doc); ``split_stats``: its entry of metrics/data.json."""
    wh = np.clip(table.boxes[:, 2:] - table.boxes[:, :2], 1e-6, None).astype(np.float64)
    image_area = (table.heights * table.widths).astype(np.float64)[table.image_of]
    per_class = np.bincount(table.labels, minlength=len(class_names))
    per_image = np.bincount(np.bincount(table.image_of, minlength=len(table.heights)))
    health = [{"reason": f"dropped: {k}", "count": int(v)} for k, v in split_stats["dropped"].items()]
    health += [{"reason": "clipped to the image", "count": int(split_stats["clipped_boxes"])},
               {"reason": "bad image skipped", "count": int(split_stats["skipped_images"])}]
    return {
        "classes": [{"class": n, "boxes": int(c)} for n, c in zip(class_names, per_class)],
        "boxes_per_image": [{"boxes": k, "images": int(c)} for k, c in enumerate(per_image)],
        "box_size": _histogram(np.sqrt(wh.prod(axis=1) / image_area), SIZE_EDGES, "relative_size"),
        "aspect_ratio": _histogram(np.log2(wh[:, 0] / wh[:, 1]), ASPECT_EDGES, "log2_aspect"),
        "health": health,
    }


def write_plot_tables(plots_dir: str | Path, tables: dict[str, dict[str, list[dict]]]) -> None:
    """Replace ``plots_dir`` with ``<split>/<name>.csv`` per table; the folder appears only when complete."""
    with atomic_path(plots_dir) as tmp:
        for split, by_name in tables.items():
            (tmp / split).mkdir(parents=True)
            for name, rows in by_name.items():
                with (tmp / split / f"{name}.csv").open("w", newline="") as fh:
                    writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                    writer.writeheader()
                    writer.writerows(rows)


def letterboxed_boxes(table: BoxTable, input_size: int) -> np.ndarray:
    """The boxes in network-input pixels after D0's resize (longer side to ``input_size``, aspect kept)."""
    scale = input_size / np.maximum(table.heights, table.widths).astype(np.float64)
    return table.boxes.astype(np.float64) * scale[table.image_of, None]


def d0_anchor_fit(train: BoxTable, cfg: D0Config) -> tuple[dict[str, Any], AnchorSpec]:
    """(metrics/data.json's ``d0_anchors``: BPR and fitness at ``d0.pos_iou`` of the default and the fitted
    anchors on the training boxes at ``d0.input_size``, with both anchor sets; the fitted anchors)."""
    boxes = letterboxed_boxes(train, cfg.input_size)
    default = AnchorSpec(cfg.anchor_scale)
    fitted = fit_anchors(boxes, default, cfg.input_size, D0_LEVELS, cfg.pos_iou)
    report = {"input_size": cfg.input_size, "pos_iou": cfg.pos_iou, "boxes": len(boxes)}
    for name, spec in (("default", default), ("fit", fitted)):
        bpr, fitness = anchor_quality(boxes, spec, cfg.input_size, D0_LEVELS, cfg.pos_iou)
        report[name] = {"bpr": round(bpr, 5), "fitness": round(fitness, 5), **spec.as_dict()}
    return report, fitted


def health_warning(stats: dict[str, Any], min_class_boxes: int) -> str | None:
    """One line naming the classes with fewer than ``min_class_boxes`` training boxes and the classes val has
    but train lacks (``stats``: metrics/data.json); None when there are none."""
    train, val = stats["train"]["per_class"], stats["val"]["per_class"]
    few = [f"{name} ({n})" for name, n in train.items() if n < min_class_boxes]
    unseen = [name for name, n in val.items() if n > 0 and train.get(name, 0) == 0]
    parts = []
    if few:
        parts.append(f"classes with fewer than {min_class_boxes} training boxes: {', '.join(few)}")
    if unseen:
        parts.append(f"val has boxes of classes train lacks: {', '.join(unseen)}")
    return "; ".join(parts) or None
