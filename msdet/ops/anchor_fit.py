"""EfficientDet anchors fitted to a data set's boxes, and the best-possible recall (BPR) of an anchor set.

BPR (ultralytics' ``check_anchors``/autoanchor metric, here with the matcher's own IoU criterion): the share
of ground-truth boxes that have at least one anchor at IoU >= ``pos_iou``, i.e. that the matcher can make
positive without the force match. Exact and vectorised: for a fixed box and anchor shape, the overlap along
x only falls with the distance between the centres along x (likewise y), so the best anchor of each shape and
level is the one whose centre is nearest the box centre in x and in y separately; ``N x levels x K`` IoUs
replace the ``N x A`` pairwise matrix.

Fit: the aspect ratios are k-means centres of the boxes' log aspect ratio (YOLOv2's "dimension clusters",
Redmon & Farhadi 2017, in one dimension: the level and scale take care of size), started at evenly spaced
quantiles so the result is deterministic; each ratio keeps the anchor's area (``rx * ry = 1``). The anchor
scale is then searched on a grid around the configured one, for the fitted and for the default ratios; the
pair of highest fitness wins (ultralytics autoanchor's ``anchor_fitness``: the mean over boxes of the best
anchor's IoU, counted where it reaches ``pos_iou``), ties going to the default ratios and the scale nearest
the configured one. So the fit never has a lower fitness than the default anchors on the boxes it was fitted
to; its BPR can be lower (a few more boxes just below ``pos_iou`` for many more boxes matched much better).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from msdet.ops.anchors import AnchorSpec

#: anchor scales searched: a quarter to four times the configured one, in eighth-octave steps
SCALE_STEPS = 2.0 ** (np.arange(-16, 17) / 8.0)
KMEANS_ITERATIONS = 50
_CHUNK = 1 << 16  # boxes per vectorised pass: bounds the [N, K, 2] temporaries (COCO: ~860k boxes)


def best_anchor_iou(boxes: np.ndarray, spec: AnchorSpec, image_size: int, levels: Sequence[int]) -> np.ndarray:
    """[N] the highest IoU of each box (x1, y1, x2, y2, input pixels) with any anchor of ``spec``."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    ctr = (boxes[:, :2] + boxes[:, 2:]) / 2.0                                    # [N, 2]
    wh = np.clip(boxes[:, 2:] - boxes[:, :2], 0.0, None)                         # [N, 2]
    best = np.zeros(len(boxes))
    for level in levels:
        stride = 2.0 ** level
        cells = image_size // int(stride)
        nearest = np.clip(np.round((ctr - stride / 2.0) / stride), 0, cells - 1) * stride + stride / 2.0
        dist = np.abs(ctr - nearest)[:, None, :]                                 # [N, 1, 2]
        shapes = spec.shapes(stride)[None]                                       # [1, K, 2]
        b = wh[:, None, :]
        overlap = np.clip(np.minimum(np.minimum(b, shapes), (b + shapes) / 2.0 - dist), 0.0, None)
        inter = overlap[..., 0] * overlap[..., 1]
        union = b[..., 0] * b[..., 1] + shapes[..., 0] * shapes[..., 1] - inter
        best = np.maximum(best, (inter / np.maximum(union, 1e-12)).max(axis=1))
    return best


def anchor_quality(boxes: np.ndarray, spec: AnchorSpec, image_size: int, levels: Sequence[int],
                   pos_iou: float) -> tuple[float, float]:
    """(BPR, fitness) of ``spec`` on ``boxes``: fitness is autoanchor's ``mean(best * (best > thr))`` with the
    best-anchor IoU as the metric, so it rewards anchors that fit well, not just well enough."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    if not len(boxes):
        return 1.0, 1.0
    best = np.concatenate([best_anchor_iou(boxes[i:i + _CHUNK], spec, image_size, levels)
                           for i in range(0, len(boxes), _CHUNK)])
    hit = best >= pos_iou
    return float(np.count_nonzero(hit) / len(best)), float(np.mean(best * hit))


def best_possible_recall(boxes: np.ndarray, spec: AnchorSpec, image_size: int, levels: Sequence[int],
                         pos_iou: float) -> float:
    """The share of ``boxes`` with an anchor at IoU >= ``pos_iou`` (1.0 for no boxes)."""
    return anchor_quality(boxes, spec, image_size, levels, pos_iou)[0]


def kmeans_log_aspect(boxes: np.ndarray, k: int) -> np.ndarray:
    """[k] ascending aspect ratios (width / height): 1-D k-means on log(w / h), quantile-started."""
    wh = np.clip(np.asarray(boxes, np.float64)[:, 2:] - np.asarray(boxes, np.float64)[:, :2], 1e-6, None)
    x = np.log(wh[:, 0] / wh[:, 1])
    centres = np.quantile(x, (np.arange(k) + 0.5) / k)
    for _ in range(KMEANS_ITERATIONS):
        assign = np.abs(x[:, None] - centres[None]).argmin(axis=1)
        counts = np.bincount(assign, minlength=k)
        sums = np.bincount(assign, weights=x, minlength=k)
        moved = np.where(counts > 0, sums / np.maximum(counts, 1), centres)  # an empty cluster keeps its centre
        if np.allclose(moved, centres):
            break
        centres = moved
    return np.exp(np.sort(centres))


def fit_anchors(boxes: np.ndarray, default: AnchorSpec, image_size: int, levels: Sequence[int],
                pos_iou: float) -> AnchorSpec:
    """The anchors of the highest fitness on ``boxes`` (input pixels): k-means aspect ratios or ``default``'s,
    times the best anchor scale of :data:`SCALE_STEPS` around ``default.anchor_scale`` (see the module doc)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if not len(boxes):
        return default
    aspect = kmeans_log_aspect(boxes, len(default.ratios))
    fitted = tuple((float(np.sqrt(a)), float(1.0 / np.sqrt(a))) for a in aspect)
    best, best_key = default, None
    for rank, ratios in enumerate((default.ratios, fitted)):
        for scale in default.anchor_scale * SCALE_STEPS:
            spec = replace(default, anchor_scale=float(scale), ratios=ratios)
            fitness = anchor_quality(boxes, spec, image_size, levels, pos_iou)[1]
            key = (fitness, -rank, -abs(np.log(scale / default.anchor_scale)))
            if best_key is None or key > best_key:
                best, best_key = spec, key
    return best
