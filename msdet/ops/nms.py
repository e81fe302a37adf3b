"""Class-wise (batched) non-maximum suppression on top of OpenCV's C++ implementation.

``cv2.dnn.NMSBoxesBatched`` (OpenCV 4.11, ``modules/dnn/src/nms.cpp``) conventions, checked against its
source and pinned by ``tests/test_nms.py`` against a NumPy reference:

- boxes are ``x, y, w, h``; a float64 array binds to ``Rect2d``, so coordinates are not rounded to int;
- IoU = inter / (area_a + area_b - inter) with area = w * h: continuous coordinates, no "+1 pixel";
- a candidate is dropped when its IoU with an already kept box exceeds ``nms_threshold`` (strictly), the
  torchvision rule; the IoU is rounded to float32 before that comparison, which only matters for IoUs
  within ~1e-7 of the threshold;
- candidates are visited in a stable descending sort of float32 scores, so ties keep input order;
- classes are separated by shifting every box by ``class_id * (max_coord + 1)`` along x and y, which is
  only sound for coordinates >= -1, so boxes are translated to start at 0 first;
- two boxes whose areas sum to zero get IoU 1 (``jaccardDistance``) wherever they are and whatever their
  classes, whereas standard NMS gives them IoU 0: zero-area boxes are therefore kept out of OpenCV and
  always survive (they neither suppress nor are suppressed), as in torchvision.
"""
from __future__ import annotations

import cv2
import numpy as np


def batched_nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS run independently per class.

    boxes [N, 4] x1, y1, x2, y2; scores [N]; classes [N] integer labels. Returns the kept indices (int64)
    ordered by descending score (float32), ties by ascending index.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float32)
    classes = np.asarray(classes)
    n = boxes.shape[0] if boxes.ndim == 2 else -1
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (n,) or classes.shape != (n,):
        raise ValueError(f"batched_nms: expected boxes [N, 4], scores [N], classes [N]; got "
                         f"{boxes.shape}, {scores.shape}, {classes.shape}")
    if n and not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"batched_nms: classes must be integers, got dtype {classes.dtype}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"batched_nms: iou_threshold {iou_threshold} is outside [0, 1]")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ValueError("batched_nms: boxes and scores must be finite (NaN/inf found)")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    wh = boxes[:, 2:] - boxes[:, :2]
    if (wh < 0).any():
        raise ValueError("batched_nms: boxes must satisfy x2 >= x1 and y2 >= y1")

    positive = (wh > 0).all(axis=1)
    idx = np.flatnonzero(positive)
    kept = np.zeros(0, dtype=np.int64)
    if idx.size:
        origin = boxes[idx, :2].min(axis=0)
        xywh = np.concatenate([boxes[idx, :2] - origin, wh[idx]], axis=1)
        _, dense_classes = np.unique(classes[idx], return_inverse=True)
        picked = cv2.dnn.NMSBoxesBatched(xywh, scores[idx], dense_classes.astype(np.int32).reshape(-1),
                                         float("-inf"), float(iou_threshold), 1.0, 0)
        kept = idx[np.asarray(picked, dtype=np.int64).reshape(-1)]
    kept = np.concatenate([kept, np.flatnonzero(~positive)])
    return kept[np.lexsort((kept, -scores[kept]))]
