"""EfficientDet anchors (automl / zylo117 ``Anchors``), NumPy, for any input size.

Order: level (P3..P7), then y, then x, then the 9 anchors of a location as
``itertools.product(scales, ratios)`` (scale-major). A ratio ``(rx, ry)`` scales the width by ``rx`` and the
height by ``ry``. Centres sit at ``stride / 2 + k * stride``. Boxes are x1, y1, x2, y2 in input pixels.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

DEFAULT_SCALES = (2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0))
DEFAULT_RATIOS = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))


def efficientdet_anchors(image_size: int | tuple[int, int], anchor_scale: float = 4.0,
                         levels: Sequence[int] = (3, 4, 5, 6, 7),
                         scales: Sequence[float] = DEFAULT_SCALES,
                         ratios: Sequence[tuple[float, float]] = DEFAULT_RATIOS) -> np.ndarray:
    """Anchors ``[A, 4]`` float32 (x1, y1, x2, y2) for an input of ``image_size`` (int or (h, w))."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    per_level = []
    for level in levels:
        stride = 2 ** level
        if h % stride or w % stride:
            raise ValueError(f"anchors: input size {h}x{w} is not a multiple of the stride {stride} of P{level}")
        cy, cx = np.meshgrid(np.arange(stride / 2, h, stride), np.arange(stride / 2, w, stride), indexing="ij")
        half = np.array([[anchor_scale * stride * s * rx / 2.0, anchor_scale * stride * s * ry / 2.0]
                         for s, (rx, ry) in itertools.product(scales, ratios)])      # [K, 2] (half w, half h)
        ctr = np.stack([cx.reshape(-1), cy.reshape(-1)], -1)[:, None, :]              # [HW, 1, 2]
        boxes = np.concatenate([ctr - half[None], ctr + half[None]], -1)             # [HW, K, 4]
        per_level.append(boxes.reshape(-1, 4))
    return np.concatenate(per_level, 0).astype(np.float32)


def anchors_per_level(image_size: int, levels: Sequence[int] = (3, 4, 5, 6, 7), per_location: int = 9) -> list[int]:
    """How many anchors each level contributes (for slicing outputs by level)."""
    return [per_location * (image_size // 2 ** lv) ** 2 for lv in levels]
