"""Pairwise and aligned IoU / GIoU for x1y1x2y2 boxes, in NumPy (host side) and MindSpore (in graph).

Pairwise: ``[..., N, 4] x [..., M, 4] -> [..., N, M]`` (leading dims broadcast).
Aligned:  ``[..., 4] x [..., 4] -> [...]`` (element-wise pairs).
Degenerate boxes (zero or negative extent) have zero area; ``eps`` keeps every division finite.
"""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, ops

EPS = 1e-7


def _area_np(b: np.ndarray) -> np.ndarray:
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def _pairwise_np(a: np.ndarray, b: np.ndarray, giou: bool, eps: float) -> np.ndarray:
    a = np.asarray(a, np.float64)[..., :, None, :]
    b = np.asarray(b, np.float64)[..., None, :, :]
    return _aligned_np(a, b, giou, eps)


def _aligned_np(a: np.ndarray, b: np.ndarray, giou: bool, eps: float) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = _area_np(a) + _area_np(b) - inter
    iou = inter / np.maximum(union, eps)
    if not giou:
        return iou
    cw = np.maximum(a[..., 2], b[..., 2]) - np.minimum(a[..., 0], b[..., 0])
    ch = np.maximum(a[..., 3], b[..., 3]) - np.minimum(a[..., 1], b[..., 1])
    enclose = np.clip(cw, 0, None) * np.clip(ch, 0, None)
    return iou - (enclose - union) / np.maximum(enclose, eps)


def box_iou_np(a: np.ndarray, b: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Pairwise IoU, NumPy, float64 result ``[..., N, M]``."""
    return _pairwise_np(a, b, False, eps)


def box_giou_np(a: np.ndarray, b: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Pairwise generalised IoU, NumPy, in [-1, 1]."""
    return _pairwise_np(a, b, True, eps)


def aligned_iou_np(a: np.ndarray, b: np.ndarray, eps: float = EPS) -> np.ndarray:
    return _aligned_np(a, b, False, eps)


def aligned_giou_np(a: np.ndarray, b: np.ndarray, eps: float = EPS) -> np.ndarray:
    return _aligned_np(a, b, True, eps)


def _aligned_ms(a: Tensor, b: Tensor, giou: bool, eps: float, broadcast_first: bool = True) -> Tensor:
    ax1, ay1, ax2, ay2 = a[..., 0], a[..., 1], a[..., 2], a[..., 3]
    bx1, by1, bx2, by2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    area_a = ops.relu(ax2 - ax1) * ops.relu(ay2 - ay1)
    area_b = ops.relu(bx2 - bx1) * ops.relu(by2 - by1)
    # MindSpore 2.8's CPU Maximum/Minimum are ~10x slower when they broadcast (15 ms for an [8, 3069, 1] x
    # [8, 1, 16] pair) than on equal shapes, while broadcast_to and broadcasting Sub/Add/Mul are not
    # (docs/performance.md): the pairwise case spells the broadcast out first. Same values, bit for bit; the
    # eight broadcast copies cost memory (D0 at COCO size: 8 x [16, 49104, 100] fp32), so devices skip them.
    shape = (ax1 - bx1).shape
    if broadcast_first and (ax1.shape != shape or bx1.shape != shape):
        ax1, ay1, ax2, ay2 = (ops.broadcast_to(ax1, shape), ops.broadcast_to(ay1, shape),
                              ops.broadcast_to(ax2, shape), ops.broadcast_to(ay2, shape))
        bx1, by1, bx2, by2 = (ops.broadcast_to(bx1, shape), ops.broadcast_to(by1, shape),
                              ops.broadcast_to(bx2, shape), ops.broadcast_to(by2, shape))
    iw = ops.relu(ops.minimum(ax2, bx2) - ops.maximum(ax1, bx1))
    ih = ops.relu(ops.minimum(ay2, by2) - ops.maximum(ay1, by1))
    inter = iw * ih
    union = area_a + area_b - inter
    iou = inter / ops.clamp(union, min=eps)
    if not giou:
        return iou
    cw = ops.relu(ops.maximum(ax2, bx2) - ops.minimum(ax1, bx1))
    ch = ops.relu(ops.maximum(ay2, by2) - ops.minimum(ay1, by1))
    enclose = cw * ch
    return iou - (enclose - union) / ops.clamp(enclose, min=eps)


def box_iou(a: Tensor, b: Tensor, eps: float = EPS, broadcast_first: bool = True) -> Tensor:
    """Pairwise IoU of MindSpore boxes ``[..., N, 4] x [..., M, 4] -> [..., N, M]`` (graph-mode safe).
    ``broadcast_first``: the CPU-fast form (see _aligned_ms); False lets Minimum/Maximum broadcast."""
    return _aligned_ms(ops.expand_dims(a, -2), ops.expand_dims(b, -3), False, eps, broadcast_first)


def box_giou(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """Pairwise generalised IoU of MindSpore boxes ``[..., N, 4] x [..., M, 4] -> [..., N, M]``."""
    return _aligned_ms(ops.expand_dims(a, -2), ops.expand_dims(b, -3), True, eps)


def aligned_iou(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """IoU of matching pairs ``[..., 4] x [..., 4] -> [...]``."""
    return _aligned_ms(a, b, False, eps)


def aligned_giou(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """Generalised IoU of matching pairs ``[..., 4] x [..., 4] -> [...]``; ``1 - giou`` is the GIoU loss."""
    return _aligned_ms(a, b, True, eps)
