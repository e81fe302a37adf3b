"""Center priors of anchor-free heads (NanoDet-Plus): one grid point per feature-map cell.

A prior is ``(x, y, stride, stride)`` with ``x = col * stride`` and ``y = row * stride`` (the cell's top-left
corner, no +0.5 offset, as the official ``get_single_level_center_priors``), ordered level by level, then
row-major (y, then x) inside a level: the order of the head's flattened outputs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: NanoDet-Plus-m strides (P3..P5 plus the GhostPAN extra level).
NANODET_STRIDES = (8, 16, 32, 64)


def _hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, (int, np.integer)):
        return int(input_size), int(input_size)
    h, w = input_size
    return int(h), int(w)


def featmap_sizes(input_size: int | Sequence[int], strides: Sequence[int] = NANODET_STRIDES) -> list[tuple[int, int]]:
    """(height, width) of each level's feature map: ceil(size / stride)."""
    h, w = _hw(input_size)
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


def center_priors(input_size: int | Sequence[int], strides: Sequence[int] = NANODET_STRIDES) -> np.ndarray:
    """float32 [P, 4] priors (x, y, stride, stride) for an input of ``input_size`` (int or (h, w))."""
    levels = []
    for (fh, fw), s in zip(featmap_sizes(input_size, strides), strides):
        ys, xs = np.meshgrid(np.arange(fh, dtype=np.float32) * s, np.arange(fw, dtype=np.float32) * s,
                             indexing="ij")
        st = np.full(fh * fw, s, np.float32)
        levels.append(np.stack([xs.reshape(-1), ys.reshape(-1), st, st], axis=-1))
    return np.concatenate(levels, axis=0).astype(np.float32)


def num_priors(input_size: int | Sequence[int], strides: Sequence[int] = NANODET_STRIDES) -> int:
    return int(sum(fh * fw for fh, fw in featmap_sizes(input_size, strides)))


__all__ = ["NANODET_STRIDES", "featmap_sizes", "center_priors", "num_priors"]
