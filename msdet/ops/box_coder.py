"""EfficientDet box coder (automl FasterRcnnBoxCoder without scale factors, as zylo117).

Encoding of a box against an anchor: ``(dy, dx, dh, dw) = ((gy - ay) / ha, (gx - ax) / wa, log(gh / ha),
log(gw / wa))`` with centres (gx, gy) and sizes (gw, gh); boxes are x1, y1, x2, y2. zylo117 clamps GT sizes
to at least 1 pixel before the log (``min_size``). NumPy versions for the host, MindSpore for the graph.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops


def _centre_size_np(b: np.ndarray) -> tuple:
    w = b[..., 2] - b[..., 0]
    h = b[..., 3] - b[..., 1]
    return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def encode_np(boxes: np.ndarray, anchors: np.ndarray, min_size: float = 1.0) -> np.ndarray:
    """x1y1x2y2 boxes -> (dy, dx, dh, dw) relative to ``anchors`` (broadcasting)."""
    gx, gy, gw, gh = _centre_size_np(np.asarray(boxes, np.float64))
    ax, ay, aw, ah = _centre_size_np(np.asarray(anchors, np.float64))
    gw = np.maximum(gw, min_size)
    gh = np.maximum(gh, min_size)
    return np.stack([(gy - ay) / ah, (gx - ax) / aw, np.log(gh / ah), np.log(gw / aw)], -1).astype(np.float32)


def decode_np(deltas: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(dy, dx, dh, dw) -> x1y1x2y2 boxes (zylo117 ``BBoxTransform``)."""
    d = np.asarray(deltas, np.float64)
    ax, ay, aw, ah = _centre_size_np(np.asarray(anchors, np.float64))
    cy = d[..., 0] * ah + ay
    cx = d[..., 1] * aw + ax
    h = np.exp(d[..., 2]) * ah
    w = np.exp(d[..., 3]) * aw
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).astype(np.float32)


def encode(boxes: Tensor, anchors: Tensor, min_size: float = 1.0) -> Tensor:
    """MindSpore version of :func:`encode_np` (graph-mode safe)."""
    gw = boxes[..., 2] - boxes[..., 0]
    gh = boxes[..., 3] - boxes[..., 1]
    gx = boxes[..., 0] + 0.5 * gw
    gy = boxes[..., 1] + 0.5 * gh
    aw = anchors[..., 2] - anchors[..., 0]
    ah = anchors[..., 3] - anchors[..., 1]
    ax = anchors[..., 0] + 0.5 * aw
    ay = anchors[..., 1] + 0.5 * ah
    gw = ops.clamp(gw, min=min_size)
    gh = ops.clamp(gh, min=min_size)
    return ops.stack([(gy - ay) / ah, (gx - ax) / aw, ops.log(gh / ah), ops.log(gw / aw)], -1)


def decode(deltas: Tensor, anchors: Tensor) -> Tensor:
    """MindSpore version of :func:`decode_np`."""
    aw = anchors[..., 2] - anchors[..., 0]
    ah = anchors[..., 3] - anchors[..., 1]
    ax = anchors[..., 0] + 0.5 * aw
    ay = anchors[..., 1] + 0.5 * ah
    cy = deltas[..., 0] * ah + ay
    cx = deltas[..., 1] * aw + ax
    h = ops.exp(deltas[..., 2]) * ah
    w = ops.exp(deltas[..., 3]) * aw
    return ops.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
