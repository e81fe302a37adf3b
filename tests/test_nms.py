"""batched_nms (OpenCV underneath) against a plain NumPy greedy NMS."""
from __future__ import annotations

import numpy as np
import pytest

from msdet.ops.nms import batched_nms


def reference_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one x1y1x2y2 box with many, continuous coordinates (no +1); 0 when the union is empty."""
    iw = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = iw * ih
    area_others = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = (box[2] - box[0]) * (box[3] - box[1]) + area_others - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def reference_batched_nms(boxes, scores, classes, iou_threshold):
    """Greedy per-class NMS: visit by descending score (ties by index), drop IoU > threshold."""
    boxes = np.asarray(boxes, np.float64)
    scores = np.asarray(scores, np.float32)
    order = np.lexsort((np.arange(len(scores)), -scores))
    kept = []
    for i in order:
        same = [k for k in kept if classes[k] == classes[i]]
        if not same or reference_iou(boxes[i], boxes[same]).max() <= iou_threshold:
            kept.append(i)
    return np.array(kept, dtype=np.int64)


def random_boxes(rng, n, width=640, height=480):
    cx, cy = rng.uniform(0, width, n), rng.uniform(0, height, n)
    w, h = rng.uniform(8, 200, n), rng.uniform(8, 200, n)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.6])
def test_matches_numpy_reference_on_random_boxes(seed, iou_threshold):
    rng = np.random.default_rng(seed)
    n = 400
    boxes = random_boxes(rng, n)  # some extend past the image (negative coordinates included)
    # Clusters of jittered copies, the case NMS exists for.
    boxes[: n // 2] = boxes[n // 2:] + rng.normal(0, 6, (n // 2, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    classes = rng.integers(0, 5, n)
    kept = batched_nms(boxes, scores, classes, iou_threshold)
    ref = reference_batched_nms(boxes, scores, classes, iou_threshold)
    np.testing.assert_array_equal(kept, ref)
    assert 0 < len(kept) < n  # suppression happened and not everything vanished
    assert np.all(np.diff(scores[kept]) <= 0)


def test_iou_has_no_plus_one_pixel():
    # [0,0,10,10] vs [5,0,15,10]: IoU 50/150 = 0.333 continuous; 66/176 = 0.375 with the +1 convention.
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.float64)
    scores, classes = np.array([0.9, 0.8]), np.array([0, 0])
    np.testing.assert_array_equal(batched_nms(boxes, scores, classes, 0.35), [0, 1])
    np.testing.assert_array_equal(batched_nms(boxes, scores, classes, 0.32), [0])


def test_fractional_coordinates_are_not_rounded():
    # Rounded to int both boxes would be [0,0,1,1] (IoU 1); in float their IoU is 1 / 3.61.
    boxes = np.array([[0, 0, 1.9, 1.9], [0.9, 0.9, 1.9, 1.9]])
    np.testing.assert_array_equal(batched_nms(boxes, [0.9, 0.8], [0, 0], 0.5), [0, 1])


def test_classes_are_independent_even_with_negative_coordinates():
    boxes = np.array([[-300, -300, -100, -100], [-300, -300, -100, -100], [-299, -299, -100, -100]], np.float64)
    kept = batched_nms(boxes, [0.5, 0.9, 0.4], [3, 7, 3], 0.5)
    np.testing.assert_array_equal(kept, [1, 0])


def test_zero_area_boxes_neither_suppress_nor_are_suppressed():
    boxes = np.array([[5, 5, 5, 5], [100, 100, 100, 120], [0, 0, 10, 10], [5, 5, 5, 5]], np.float64)
    kept = batched_nms(boxes, [0.9, 0.8, 0.7, 0.6], [0, 1, 0, 0], 0.5)
    np.testing.assert_array_equal(kept, [0, 1, 2, 3])


def test_ties_keep_input_order_and_empty_input():
    boxes = np.tile([[0.0, 0.0, 10.0, 10.0]], (3, 1))
    np.testing.assert_array_equal(batched_nms(boxes, [0.5, 0.5, 0.5], [1, 0, 1], 0.5), [0, 1])
    assert batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), 0.5).shape == (0,)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="x2 >= x1"):
        batched_nms([[10, 0, 0, 10]], [0.5], [0], 0.5)
    with pytest.raises(ValueError, match="finite"):
        batched_nms([[0, 0, 10, 10]], [np.nan], [0], 0.5)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        batched_nms([[0, 0, 10]], [0.5], [0], 0.5)
