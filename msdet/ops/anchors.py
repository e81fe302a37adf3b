"""EfficientDet anchors (automl / zylo117 ``Anchors``), NumPy, for any input size.

Order: level (P3..P7), then y, then x, then the 9 anchors of a location as
``itertools.product(scales, ratios)`` (scale-major). A ratio ``(rx, ry)`` scales the width by ``rx`` and the
height by ``ry``. Centres sit at ``stride / 2 + k * stride``. Boxes are x1, y1, x2, y2 in input pixels.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_SCALES = (2 ** 0, 2 ** (1.0 / 3.0), 2 ** (2.0 / 3.0))
DEFAULT_RATIOS = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))


@dataclass(frozen=True)
class AnchorSpec:
    """The anchor shapes of every location: ``len(scales) * len(ratios)`` anchors, ``anchor_scale * stride *
    scale * (rx, ry)`` wide and high. Travels with the weights (checkpoint meta, model card, export report):
    the box regression only means something relative to the anchors it was trained against."""

    anchor_scale: float
    scales: tuple[float, ...] = DEFAULT_SCALES
    ratios: tuple[tuple[float, float], ...] = DEFAULT_RATIOS

    def as_dict(self) -> dict[str, Any]:
        return {"anchor_scale": float(self.anchor_scale), "scales": [float(s) for s in self.scales],
                "ratios": [[float(rx), float(ry)] for rx, ry in self.ratios]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str, per_location: int) -> AnchorSpec:
        """Validated spec; a malformed one raises ValueError naming ``source``."""
        try:
            spec = cls(float(d["anchor_scale"]), tuple(float(s) for s in d["scales"]),
                       tuple((float(rx), float(ry)) for rx, ry in d["ratios"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{source}: anchors must be {{anchor_scale, scales, ratios: [[rx, ry], ...]}}, "
                             f"got {d!r} ({exc!r})") from None
        values = np.array([spec.anchor_scale, *spec.scales, *np.ravel(spec.ratios)])
        if not (np.isfinite(values).all() and (values > 0).all()):
            raise ValueError(f"{source}: anchor scale, scales and ratios must be positive and finite, got {d!r}")
        if len(spec.scales) * len(spec.ratios) != per_location:
            raise ValueError(f"{source}: {len(spec.scales)} scales x {len(spec.ratios)} ratios, the network has "
                             f"{per_location} anchors per location")
        return spec

    def shapes(self, stride: float) -> np.ndarray:
        """[K, 2] (width, height) of the anchors at ``stride``, in :func:`efficientdet_anchors`' order."""
        return np.array([[self.anchor_scale * stride * s * rx, self.anchor_scale * stride * s * ry]
                         for s, (rx, ry) in itertools.product(self.scales, self.ratios)])


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
        half = AnchorSpec(anchor_scale, tuple(scales), tuple(ratios)).shapes(stride) / 2.0  # [K, 2] half w, h
        ctr = np.stack([cx.reshape(-1), cy.reshape(-1)], -1)[:, None, :]              # [HW, 1, 2]
        boxes = np.concatenate([ctr - half[None], ctr + half[None]], -1)             # [HW, K, 4]
        per_level.append(boxes.reshape(-1, 4))
    return np.concatenate(per_level, 0).astype(np.float32)


def anchors_per_level(image_size: int, levels: Sequence[int] = (3, 4, 5, 6, 7), per_location: int = 9) -> list[int]:
    """How many anchors each level contributes (for slicing outputs by level)."""
    return [per_location * (image_size // 2 ** lv) ** 2 for lv in levels]
