"""Distance box coding of anchor-free heads and the GFL distribution integral.

A box is coded from a prior point (x, y) as the distances (left, top, right, bottom) to its sides. The
head predicts each distance as a discrete distribution over ``0..reg_max`` (in stride units); its
expectation (:class:`Integral`) times the stride is the distance in pixels.
MindSpore versions run in graph mode; the ``*_np`` twins serve host-side decoding and tests.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from mindspore import Parameter, Tensor, nn, ops


def distance2bbox(points: Tensor, distance: Tensor, max_shape: Sequence[int] | None = None) -> Tensor:
    """points [..., 2] (x, y) and distances [..., 4] (l, t, r, b) -> boxes [..., 4] x1y1x2y2.

    ``max_shape`` (h, w) clips the boxes to the image.
    """
    x1 = points[..., 0] - distance[..., 0]
    y1 = points[..., 1] - distance[..., 1]
    x2 = points[..., 0] + distance[..., 2]
    y2 = points[..., 1] + distance[..., 3]
    if max_shape is not None:
        h, w = float(max_shape[0]), float(max_shape[1])
        x1, x2 = ops.clamp(x1, 0.0, w), ops.clamp(x2, 0.0, w)
        y1, y2 = ops.clamp(y1, 0.0, h), ops.clamp(y2, 0.0, h)
    return ops.stack([x1, y1, x2, y2], axis=-1)


def bbox2distance(points: Tensor, bbox: Tensor, max_dis: float | None = None, eps: float = 0.1) -> Tensor:
    """points [..., 2] and boxes [..., 4] -> distances [..., 4]; with ``max_dis`` clamped to [0, max_dis - eps]."""
    d = ops.stack([points[..., 0] - bbox[..., 0], points[..., 1] - bbox[..., 1],
                   bbox[..., 2] - points[..., 0], bbox[..., 3] - points[..., 1]], axis=-1)
    if max_dis is not None:
        d = ops.clamp(d, 0.0, float(max_dis) - eps)
    return d


def distance2bbox_np(points: np.ndarray, distance: np.ndarray,
                     max_shape: Sequence[int] | None = None) -> np.ndarray:
    p = np.asarray(points)
    d = np.asarray(distance)
    boxes = np.stack([p[..., 0] - d[..., 0], p[..., 1] - d[..., 1],
                      p[..., 0] + d[..., 2], p[..., 1] + d[..., 3]], axis=-1)
    if max_shape is not None:
        h, w = max_shape
        boxes[..., 0::2] = np.clip(boxes[..., 0::2], 0, w)
        boxes[..., 1::2] = np.clip(boxes[..., 1::2], 0, h)
    return boxes


def bbox2distance_np(points: np.ndarray, bbox: np.ndarray, max_dis: float | None = None,
                     eps: float = 0.1) -> np.ndarray:
    p = np.asarray(points)
    b = np.asarray(bbox)
    d = np.stack([p[..., 0] - b[..., 0], p[..., 1] - b[..., 1], b[..., 2] - p[..., 0], b[..., 3] - p[..., 1]], -1)
    if max_dis is not None:
        d = np.clip(d, 0, max_dis - eps)
    return d


def integral_np(reg: np.ndarray, reg_max: int) -> np.ndarray:
    """[..., 4 * (reg_max + 1)] logits -> [..., 4] expected distances in bins (softmax per side)."""
    x = np.asarray(reg, np.float64).reshape(*reg.shape[:-1], 4, reg_max + 1)
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    return (p * np.arange(reg_max + 1, dtype=np.float64)).sum(-1)


class Integral(nn.Cell):
    """Expectation of the per-side distribution: softmax over ``reg_max + 1`` bins, dot ``project = 0..reg_max``.

    ``project`` is a fixed (non-trainable) parameter so that it maps onto the official buffer
    ``head.distribution_project.project``.
    """

    def __init__(self, reg_max: int = 7) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.project = Parameter(Tensor(np.linspace(0, reg_max, reg_max + 1, dtype=np.float32)),
                                 name="project", requires_grad=False)

    def construct(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        x = ops.reshape(x, shape + (4, self.reg_max + 1))
        x = ops.softmax(x, axis=-1)
        return ops.sum(x * self.project.astype(x.dtype), dim=-1)


__all__ = ["distance2bbox", "bbox2distance", "distance2bbox_np", "bbox2distance_np", "integral_np", "Integral"]
