"""Box ops: IoU/GIoU (NumPy and MindSpore), EfficientDet anchors, the (dy, dx, dh, dw) box coder."""
import itertools
import math

import numpy as np
import pytest
from mindspore import Tensor, nn

from msdet.ops.anchors import anchors_per_level, efficientdet_anchors
from msdet.ops.box_coder import decode, decode_np, encode, encode_np
from msdet.ops.iou import (
    aligned_giou,
    aligned_giou_np,
    aligned_iou,
    aligned_iou_np,
    box_giou,
    box_giou_np,
    box_iou,
    box_iou_np,
)


def _random_boxes(rng, n, size=100.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(1, size / 2, (n, 2))
    return np.concatenate([xy, xy + wh], -1).astype(np.float32)


# ---------------------------------------------------------------- IoU

def test_iou_hand_values():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], np.float32)
    b = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 20]], np.float32)
    expected_iou = np.array([[1.0, 0.0, 0.5], [25 / 175, 0.0, 50 / 250]])
    # GIoU: disjoint [0,0,10,10] vs [20,20,30,30]: enclosure 900, union 200 -> 0 - 700/900
    expected_giou = expected_iou.copy()
    expected_giou[0, 1] = -700 / 900
    expected_giou[1, 0] = 25 / 175 - (225 - 175) / 225
    expected_giou[1, 1] = -(625 - 200) / 625
    expected_giou[1, 2] = 50 / 250 - (300 - 250) / 300
    np.testing.assert_allclose(box_iou_np(a, b), expected_iou, rtol=1e-6)
    np.testing.assert_allclose(box_giou_np(a, b), expected_giou, rtol=1e-6)
    np.testing.assert_allclose(box_iou(Tensor(a), Tensor(b)).asnumpy(), expected_iou, rtol=1e-5)
    np.testing.assert_allclose(box_giou(Tensor(a), Tensor(b)).asnumpy(), expected_giou, rtol=1e-5, atol=1e-6)


def test_iou_batched_and_aligned_match_numpy():
    rng = np.random.default_rng(0)
    a = np.stack([_random_boxes(rng, 7) for _ in range(3)])       # [3, 7, 4]
    b = np.stack([_random_boxes(rng, 5) for _ in range(3)])       # [3, 5, 4]
    iou = box_iou(Tensor(a), Tensor(b)).asnumpy()
    giou = box_giou(Tensor(a), Tensor(b)).asnumpy()
    assert iou.shape == (3, 7, 5) and giou.shape == (3, 7, 5)
    np.testing.assert_allclose(iou, box_iou_np(a, b), atol=1e-5)
    np.testing.assert_allclose(giou, box_giou_np(a, b), atol=1e-5)
    assert (giou <= iou + 1e-6).all() and (giou >= -1 - 1e-6).all()
    c = _random_boxes(rng, 7)
    d = _random_boxes(rng, 7)
    np.testing.assert_allclose(aligned_iou(Tensor(c), Tensor(d)).asnumpy(), np.diag(box_iou_np(c, d)), atol=1e-5)
    np.testing.assert_allclose(aligned_giou(Tensor(c), Tensor(d)).asnumpy(), np.diag(box_giou_np(c, d)), atol=1e-5)
    np.testing.assert_allclose(aligned_iou_np(c, d), np.diag(box_iou_np(c, d)))
    np.testing.assert_allclose(aligned_giou_np(c, d), np.diag(box_giou_np(c, d)))


def test_pairwise_iou_broadcasts_leading_dims_in_graph_mode():
    """Anchors [1, A, 4] against per-image GT [B, M, 4] inside a compiled cell, as the D0 matcher calls it
    (the pairwise path broadcasts the coordinates explicitly before Minimum/Maximum)."""
    rng = np.random.default_rng(3)
    anchors = _random_boxes(rng, 11)[None]                         # [1, 11, 4]
    gt = np.stack([_random_boxes(rng, 4) for _ in range(3)])       # [3, 4, 4]

    class Pairwise(nn.Cell):
        def construct(self, a, b):
            return box_iou(a, b), box_giou(a, b)

    iou, giou = (t.asnumpy() for t in Pairwise()(Tensor(anchors), Tensor(gt)))
    assert iou.shape == (3, 11, 4) and giou.shape == (3, 11, 4)
    np.testing.assert_allclose(iou, box_iou_np(anchors, gt), atol=1e-6)
    np.testing.assert_allclose(giou, box_giou_np(anchors, gt), atol=1e-6)


def test_iou_degenerate_boxes_are_finite():
    a = np.array([[5, 5, 5, 5], [0, 0, 0, 0]], np.float32)
    b = np.array([[5, 5, 5, 5]], np.float32)
    out = box_giou(Tensor(a), Tensor(b)).asnumpy()
    assert np.isfinite(out).all()
    assert np.allclose(box_iou(Tensor(a), Tensor(b)).asnumpy(), 0.0)


# ---------------------------------------------------------------- anchors

def _zylo117_reference_anchors(size, anchor_scale=4.0):
    """The official loop (y1, x1, y2, x2 per level, product(scales, ratios)), re-typed for the test."""
    scales = [2 ** 0, 2 ** (1 / 3), 2 ** (2 / 3)]
    ratios = [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]
    out = []
    for stride in (8, 16, 32, 64, 128):
        level = []
        for scale, ratio in itertools.product(scales, ratios):
            base = anchor_scale * stride * scale
            ax, ay = base * ratio[0] / 2, base * ratio[1] / 2
            xv, yv = np.meshgrid(np.arange(stride / 2, size, stride), np.arange(stride / 2, size, stride))
            xv, yv = xv.reshape(-1), yv.reshape(-1)
            level.append(np.stack([yv - ay, xv - ax, yv + ay, xv + ax], 1)[:, None])
        out.append(np.concatenate(level, 1).reshape(-1, 4))
    yxyx = np.concatenate(out)
    return yxyx[:, [1, 0, 3, 2]]


@pytest.mark.parametrize("size", [128, 256])
def test_anchors_match_official_construction(size):
    anchors = efficientdet_anchors(size)
    assert anchors.shape == (9 * sum((size // 2 ** lv) ** 2 for lv in range(3, 8)), 4)
    assert sum(anchors_per_level(size)) == anchors.shape[0]
    np.testing.assert_allclose(anchors, _zylo117_reference_anchors(size), rtol=1e-6, atol=1e-4)


def test_anchors_hand_values_128():
    a = efficientdet_anchors(128)
    assert a.shape == (3069, 4)
    np.testing.assert_allclose(a[0], [-12, -12, 20, 20])                          # P3 (4,4), 32 px square
    np.testing.assert_allclose(a[1], [4 - 22.4, 4 - 11.2, 4 + 22.4, 4 + 11.2], rtol=1e-6)  # ratio (1.4, 0.7)
    h = 16 * 2 ** (1 / 3)
    np.testing.assert_allclose(a[3], [4 - h, 4 - h, 4 + h, 4 + h], rtol=1e-6)     # 2nd scale, ratio 1
    np.testing.assert_allclose(a[9], [-4, -12, 28, 20])                           # next x: centre (12, 4)
    np.testing.assert_allclose(a[16 * 9], [-12, -4, 20, 28])                      # next row: centre (4, 12)
    np.testing.assert_allclose(a[9 * 256], [-24, -24, 40, 40])                    # P4 first: centre 8, size 64
    hw, hh = 2 * 128 * 2 ** (2 / 3) * 0.7, 2 * 128 * 2 ** (2 / 3) * 1.4           # P7 last anchor
    np.testing.assert_allclose(a[-1], [64 - hw, 64 - hh, 64 + hw, 64 + hh], rtol=1e-6)


def test_anchors_reject_bad_size():
    with pytest.raises(ValueError, match="not a multiple"):
        efficientdet_anchors(200)


# ---------------------------------------------------------------- box coder

def test_encode_hand_values():
    anchor = np.array([[10, 20, 50, 100]], np.float32)            # centre (30, 60), w 40, h 80
    same = encode_np(anchor, anchor)
    np.testing.assert_allclose(same, 0.0, atol=1e-7)
    shifted = np.array([[10, 60, 50, 140]], np.float32)           # centre y + 40 = half the height
    np.testing.assert_allclose(encode_np(shifted, anchor), [[0.5, 0.0, 0.0, 0.0]], atol=1e-7)
    wide = np.array([[-10, 20, 70, 100]], np.float32)             # twice as wide, same centre
    np.testing.assert_allclose(encode_np(wide, anchor), [[0.0, 0.0, 0.0, math.log(2)]], atol=1e-6)


def test_encode_decode_round_trip_numpy_and_mindspore():
    rng = np.random.default_rng(1)
    boxes = _random_boxes(rng, 50, 500)
    anchors = _random_boxes(rng, 50, 500)
    deltas = encode_np(boxes, anchors)
    np.testing.assert_allclose(decode_np(deltas, anchors), boxes, rtol=1e-5, atol=1e-3)
    deltas_ms = encode(Tensor(boxes), Tensor(anchors)).asnumpy()
    np.testing.assert_allclose(deltas_ms, deltas, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(decode(Tensor(deltas), Tensor(anchors)).asnumpy(), boxes, rtol=1e-5, atol=1e-3)


def test_encode_clamps_tiny_gt_to_one_pixel():
    anchor = np.array([[0, 0, 8, 8]], np.float32)
    tiny = np.array([[4, 4, 4.2, 4.2]], np.float32)
    d = encode_np(tiny, anchor)
    np.testing.assert_allclose(d[0, 2:], [math.log(1 / 8)] * 2, rtol=1e-6)
    assert np.isfinite(encode(Tensor(np.zeros((1, 4), np.float32)), Tensor(anchor)).asnumpy()).all()
