"""Sharded validation's fixed-shape packing: detections of strided shards come back whole, in val order."""
from __future__ import annotations

import numpy as np

from msdet.evaluation.postprocess import ImageDetections
from msdet.evaluation.runner import pack_detections, unpack_detections


def random_detections(rng: np.random.Generator, image_id: int, k: int) -> ImageDetections:
    xy = rng.uniform(0, 500, (k, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(1, 90, (k, 2)).astype(np.float32)], axis=1)
    return ImageDetections(image_id=image_id, boxes=boxes, scores=np.sort(rng.random(k).astype(np.float32))[::-1],
                           labels=rng.integers(0, 80, k).astype(np.int64))


def test_strided_shards_unpack_to_the_unsharded_detections():
    rng = np.random.default_rng(0)
    ranks, max_det = 3, 5
    images = [random_detections(rng, 1000 + 7 * i, k) for i, k in enumerate([5, 0, 3, 1, 5, 2, 4])]
    per_rank = -(-len(images) // ranks)
    packed = [pack_detections(images[r::ranks], per_rank, max_det) for r in range(ranks)]
    ids = np.stack([p[0] for p in packed])
    rows = np.stack([p[1] for p in packed])
    assert ids.shape == (3, 3) and rows.shape == (3, 3, 5, 6) and rows.dtype == np.float32
    out = unpack_detections(ids, rows)
    assert [d.image_id for d in out] == [d.image_id for d in images]  # the image without detections too
    for got, want in zip(out, images):
        np.testing.assert_array_equal(got.boxes, want.boxes)
        np.testing.assert_array_equal(got.scores, want.scores)
        np.testing.assert_array_equal(got.labels, want.labels)
        assert got.boxes.dtype == np.float32 and got.labels.dtype == np.int64
