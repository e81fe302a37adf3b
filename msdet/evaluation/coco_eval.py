"""COCO bbox evaluation with pycocotools, returning plain, named numbers.

Values follow COCOeval: -1 means "undefined" (no ground truth in that area range, or a class without
ground truth in the evaluated images). An empty result list is valid and scores 0 wherever ground truth
exists (pycocotools' own ``loadRes`` crashes on it, so result sets are built here).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from msdet.atomic import atomic_path, write_json
from msdet.evaluation.postprocess import ImageDetections, to_coco_results

#: COCOeval.stats in order, under readable names.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _quiet_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_ground_truth(path: str | Path) -> COCO:
    """A COCO annotation file as a pycocotools ``COCO``, with schema errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: ground-truth annotation file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list)
                                         for k in ("images", "annotations", "categories")):
        raise ValueError(f"{path}: not a COCO annotation file (needs lists 'images', 'annotations', 'categories')")
    for ann in data["annotations"]:
        missing = [k for k in ("id", "image_id", "category_id", "bbox", "area") if k not in ann]
        if missing:
            raise ValueError(f"{path}: annotation {ann.get('id', '?')} lacks {', '.join(missing)}")
    return _quiet_coco(data)


def _results_coco(gt: COCO, results: Sequence[dict], source: str) -> COCO:
    """Result dicts -> a COCO object next to ``gt`` (copies; the caller's dicts are left untouched)."""
    try:
        image_ids = np.array([r["image_id"] for r in results], dtype=np.int64)
        cat_ids = np.array([r["category_id"] for r in results], dtype=np.int64)
        scores = np.array([r["score"] for r in results], dtype=np.float64)
        bboxes = np.array([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{source}: results must be dicts with image_id, category_id, bbox [x, y, w, h], "
                         f"score ({exc!r})") from exc
    bad_img = ~np.isin(image_ids, np.array(gt.getImgIds(), dtype=np.int64))
    if bad_img.any():
        raise ValueError(f"{source}: results name image ids absent from the ground truth, e.g. "
                         f"{sorted(set(image_ids[bad_img].tolist()))[:5]}")
    bad_cat = ~np.isin(cat_ids, np.array(gt.getCatIds(), dtype=np.int64))
    if bad_cat.any():
        raise ValueError(f"{source}: results name category ids absent from the ground truth: "
                         f"{sorted(set(cat_ids[bad_cat].tolist()))[:10]}")
    if not (np.isfinite(bboxes).all() and np.isfinite(scores).all()) or (bboxes[:, 2:] < 0).any():
        raise ValueError(f"{source}: results hold non-finite scores/boxes or boxes with negative width/height")
    anns = [{"id": i + 1, "image_id": int(img), "category_id": int(cat), "bbox": box, "score": float(score),
             "area": box[2] * box[3], "iscrowd": 0}
            for i, (img, cat, box, score) in enumerate(zip(image_ids.tolist(), cat_ids.tolist(),
                                                           bboxes.tolist(), scores.tolist()))]
    return _quiet_coco({"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                        "annotations": anns})


def evaluate(gt_annotation_json_path: str | Path, results: Sequence[dict],
             image_ids: Iterable[int] | None = None) -> dict:
    """COCO bbox evaluation of ``results`` on ``image_ids`` (default: every ground-truth image).

    Returns the 12 COCO stats by name (``STAT_NAMES``), ``per_class_AP`` {category name: AP@[.5:.95]},
    ``num_images``, ``num_detections`` (results on the evaluated images) and ``pr_curve``: rows
    {recall, precision} at IoU 0.5, all areas, 100 detections, precision averaged over the classes that
    have ground truth.
    """
    source = str(gt_annotation_json_path)
    gt = load_ground_truth(gt_annotation_json_path)
    all_ids = set(gt.getImgIds())
    ids = sorted(all_ids if image_ids is None else {int(i) for i in image_ids})
    if not ids:
        raise ValueError(f"{source}: no images to evaluate")
    missing = [i for i in ids if i not in all_ids]
    if missing:
        raise ValueError(f"{source}: image ids to evaluate are absent from the ground truth, e.g. {missing[:5]}")
    dt = _results_coco(gt, results, source)

    coco_eval = COCOeval(gt, dt, iouType="bbox")
    coco_eval.params.imgIds = ids
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    out: dict = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}

    precision = coco_eval.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets]
    m100 = list(coco_eval.params.maxDets).index(100)
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    per_class = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, m100]
        per_class[names[cat_id]] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    out["per_class_AP"] = per_class
    out["num_images"] = len(ids)
    out["num_detections"] = len(dt.getAnnIds(imgIds=ids))

    p50 = precision[0, :, :, 0, m100]  # [R, K]
    has_gt = (p50 > -1).any(axis=0)
    curve = p50[:, has_gt].mean(axis=1) if has_gt.any() else np.zeros(p50.shape[0])
    out["pr_curve"] = [{"recall": float(r), "precision": float(p)}
                       for r, p in zip(coco_eval.params.recThrs, curve)]
    return out


def evaluate_detections(gt_annotation_json_path: str | Path, detections: Sequence[ImageDetections],
                        category_ids: Sequence[int], image_ids: Iterable[int] | None = None) -> dict:
    """Decode-free entry point: per-image detections (original pixels, class indices) -> :func:`evaluate`.

    Used to score anything that is not a network output, e.g. the ground truth fed back as detections.
    ``image_ids`` defaults to the images in ``detections`` (so images without detections still count).
    """
    ids = [d.image_id for d in detections] if image_ids is None else image_ids
    return evaluate(gt_annotation_json_path, to_coco_results(detections, category_ids), ids)


def write_pr_curve(path: str | Path, rows: Sequence[dict]) -> None:
    """Write PR rows for ``dvc plots``: CSV (``.csv``) or JSON ``{"pr_curve": rows}`` (``.json``), atomically."""
    path = Path(path)
    if path.suffix == ".json":
        write_json(path, {"pr_curve": list(rows)})
    elif path.suffix == ".csv":
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["recall", "precision"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"{path}: PR curve must be written as .csv or .json")
