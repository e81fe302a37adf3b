"""Detection confusion matrix: the classes plus background, at one IoU and the eval score threshold.

Per image (ultralytics ``ConfusionMatrix.process_batch``): among pairs at IoU >= ``iou``, each detection
keeps its highest-IoU ground-truth box and then each box its highest-IoU detection; a paired detection counts at (its
ground truth's class, its class); an unpaired ground-truth box at (class, background) - missed; an unpaired
detection at (background, class) - a false positive. Unlike ultralytics, same-class pairs are taken first
and only then other-class ones, so that a correct detection is not displaced by a lower-scoring duplicate of
another class at a slightly higher IoU (NMS runs per class).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from msdet.ops.iou import box_iou_np

BACKGROUND = "background"


def _greedy_pairs(iou: np.ndarray, allowed: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(gt, det) index pairs among the allowed ones at IoU >= threshold, each index used once: every detection
    keeps its highest-IoU ground truth, then every ground truth its highest-IoU detection (ultralytics)."""
    gi, di = np.nonzero(allowed & (iou >= threshold))
    order = np.argsort(-iou[gi, di], kind="stable")
    gi, di = gi[order], di[order]
    first = np.unique(di, return_index=True)[1]
    gi, di = gi[first], di[first]
    order = np.argsort(-iou[gi, di], kind="stable")
    gi, di = gi[order], di[order]
    first = np.unique(gi, return_index=True)[1]
    return gi[first], di[first]


def image_confusion(gt_boxes: np.ndarray, gt_labels: np.ndarray, det_boxes: np.ndarray, det_labels: np.ndarray,
                    num_classes: int, iou: float) -> np.ndarray:
    """[C + 1, C + 1] counts for one image: rows the true class, columns the predicted; index C = background."""
    gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
    det_labels = np.asarray(det_labels, np.int64).reshape(-1)
    overlaps = box_iou_np(np.asarray(gt_boxes).reshape(-1, 4), np.asarray(det_boxes).reshape(-1, 4))
    same = gt_labels[:, None] == det_labels[None, :]
    g1, d1 = _greedy_pairs(overlaps, same, iou)
    free = np.ones_like(same)
    free[g1, :] = False
    free[:, d1] = False
    g2, d2 = _greedy_pairs(overlaps, free, iou)
    g, d = np.concatenate([g1, g2]), np.concatenate([d1, d2])
    missed = np.setdiff1d(np.arange(len(gt_labels)), g)
    spurious = np.setdiff1d(np.arange(len(det_labels)), d)
    actual = np.concatenate([gt_labels[g], gt_labels[missed], np.full(len(spurious), num_classes)])
    predicted = np.concatenate([det_labels[d], np.full(len(missed), num_classes), det_labels[spurious]])
    matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    np.add.at(matrix, (actual, predicted), 1)
    return matrix


def precision_recall(matrix: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per class: precision = TP / detections of the class, recall = TP / its ground-truth boxes (-1 if 0/0)."""
    tp = np.diag(matrix)[:-1].astype(np.float64)
    detected = matrix[:, :-1].sum(axis=0)
    present = matrix[:-1, :].sum(axis=1)
    prec = np.where(detected > 0, tp / np.maximum(detected, 1), -1.0)
    rec = np.where(present > 0, tp / np.maximum(present, 1), -1.0)
    return {"precision": {n: round(float(p), 5) for n, p in zip(class_names, prec)},
            "recall": {n: round(float(r), 5) for n, r in zip(class_names, rec)}}


def confusion_rows(matrix: np.ndarray, class_names: Sequence[str]) -> list[dict[str, str]]:
    """One {actual, predicted} row per counted pair: the table DVC's ``confusion`` template counts."""
    names = np.array([*class_names, BACKGROUND], dtype=object)
    actual, predicted = np.nonzero(matrix)
    counts = matrix[actual, predicted]
    return [{"actual": a, "predicted": p}
            for a, p in zip(np.repeat(names[actual], counts).tolist(), np.repeat(names[predicted], counts).tolist())]
