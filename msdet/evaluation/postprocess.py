"""From decoded network outputs to per-image detections in original-image pixels and COCO result dicts.

Order per image, as the official implementations: (anchor, class) candidates above the score threshold,
capped to the ``pre_nms_top_k`` best, boxes mapped back to the original image and clipped to it,
class-wise NMS, at most ``max_detections`` kept. NMS runs after the mapping back: IoU is unchanged by the
per-axis scaling, and clipping first makes NMS see the boxes that are actually reported.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from msdet.ops.nms import batched_nms


@dataclass(frozen=True)
class ImageDetections:
    """Detections of one image, best first."""

    image_id: int
    boxes: np.ndarray  # float32 [K, 4] x1, y1, x2, y2 in original-image pixels
    scores: np.ndarray  # float32 [K]
    labels: np.ndarray  # int64 [K] contiguous class index 0..C-1


def boxes_to_original(boxes: np.ndarray, scale: np.ndarray, orig_size: np.ndarray) -> np.ndarray:
    """Network-input pixels -> original pixels (divide by (sx, sy)), clipped to the (h, w) image."""
    boxes = np.asarray(boxes, dtype=np.float64)
    sx, sy = (float(v) for v in np.asarray(scale, dtype=np.float64).reshape(2))
    h, w = (float(v) for v in np.asarray(orig_size, dtype=np.float64).reshape(2))
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes_to_original: boxes must end in 4 coordinates, got shape {boxes.shape}")
    if not (sx > 0 and sy > 0 and h > 0 and w > 0):
        raise ValueError(f"boxes_to_original: scale {(sx, sy)} and orig_size {(h, w)} must be positive")
    out = boxes / np.array([sx, sy, sx, sy])
    return np.clip(out, 0.0, np.array([w, h, w, h])).astype(np.float32)


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, as a stable descending sort would pick them (ties: lower index),
    in O(n) rather than sorting every candidate."""
    kth = np.partition(values, values.size - k)[values.size - k]
    above = np.flatnonzero(values > kth)
    tied = np.flatnonzero(values == kth)[: k - above.size]
    return np.concatenate([above, tied])


def select_detections(boxes: np.ndarray, scores: np.ndarray, scale: np.ndarray, orig_size: np.ndarray, *,
                      score_threshold: float, iou_threshold: float, max_detections: int,
                      pre_nms_top_k: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: boxes [A, 4] input pixels, scores [A, C] -> (boxes [K, 4] original pixels, scores [K],
    labels [K]) with K <= max_detections, best first. Boxes left without area by the clipping are dropped
    (they can only be false positives)."""
    scores = np.asarray(scores, dtype=np.float32)
    anchors, classes = np.nonzero(scores > score_threshold)
    cand_scores = scores[anchors, classes]
    if cand_scores.size > pre_nms_top_k:
        top = _top_k(cand_scores, pre_nms_top_k)
        anchors, classes, cand_scores = anchors[top], classes[top], cand_scores[top]
    cand_boxes = boxes_to_original(np.asarray(boxes)[anchors], scale, orig_size)
    valid = (cand_boxes[:, 2] > cand_boxes[:, 0]) & (cand_boxes[:, 3] > cand_boxes[:, 1])
    cand_boxes, cand_scores, classes = cand_boxes[valid], cand_scores[valid], classes[valid]
    keep = batched_nms(cand_boxes, cand_scores, classes, iou_threshold)[:max_detections]
    return cand_boxes[keep], cand_scores[keep], classes[keep].astype(np.int64)


def postprocess(boxes: np.ndarray, scores: np.ndarray, image_ids: np.ndarray, scales: np.ndarray,
                orig_sizes: np.ndarray, *, score_threshold: float, iou_threshold: float, max_detections: int,
                pre_nms_top_k: int = 1000) -> list[ImageDetections]:
    """A decoded eval batch -> one :class:`ImageDetections` per image.

    boxes [B, A, 4] x1y1x2y2 input pixels and scores [B, A, C] from ``Detector.decode``; image_ids [B],
    scales [B, 2] = (sx, sy), orig_sizes [B, 2] = (h, w) from the eval batch.
    """
    boxes, scores = np.asarray(boxes), np.asarray(scores)
    image_ids = np.asarray(image_ids).reshape(-1)
    scales, orig_sizes = np.asarray(scales), np.asarray(orig_sizes)
    b = boxes.shape[0] if boxes.ndim == 3 else -1
    if (boxes.ndim != 3 or boxes.shape[2] != 4 or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]
            or image_ids.shape != (b,) or scales.shape != (b, 2) or orig_sizes.shape != (b, 2)):
        raise ValueError(f"postprocess: expected boxes [B, A, 4], scores [B, A, C], image_ids [B], scales [B, 2], "
                         f"orig_sizes [B, 2]; got {boxes.shape}, {scores.shape}, {image_ids.shape}, "
                         f"{scales.shape}, {orig_sizes.shape}")
    out = []
    for i in range(b):
        det_boxes, det_scores, det_labels = select_detections(
            boxes[i], scores[i], scales[i], orig_sizes[i], score_threshold=score_threshold,
            iou_threshold=iou_threshold, max_detections=max_detections, pre_nms_top_k=pre_nms_top_k)
        out.append(ImageDetections(int(image_ids[i]), det_boxes, det_scores, det_labels))
    return out


def to_coco_results(detections: Sequence[ImageDetections], category_ids: Sequence[int]) -> list[dict]:
    """Detections -> COCO result dicts {image_id, category_id, bbox [x, y, w, h], score}.

    ``category_ids[k]`` is the data set's own id of class index k (meta.json "categories" order).
    """
    cat_ids = np.asarray(category_ids, dtype=np.int64).reshape(-1)
    results = []
    for det in detections:
        labels = np.asarray(det.labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= cat_ids.size):
            raise ValueError(f"to_coco_results: image {det.image_id} has class index {int(labels.max())} "
                             f"or {int(labels.min())} outside the {cat_ids.size} categories")
        xywh = np.asarray(det.boxes, dtype=np.float64).reshape(-1, 4).copy()
        xywh[:, 2:] -= xywh[:, :2]
        for box, score, cat in zip(xywh.tolist(), np.asarray(det.scores, np.float64).tolist(),
                                   cat_ids[labels].tolist()):
            results.append({"image_id": int(det.image_id), "category_id": int(cat), "bbox": box,
                            "score": score})
    return results
