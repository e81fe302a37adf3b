"""Transforms of both detectors on hand-made cases with known answers."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from msdet.data import transforms as T
from tests.helpers import config

IMNET_MEAN = np.array([0.485, 0.456, 0.406])
IMNET_STD = np.array([0.229, 0.224, 0.225])
ND_MEAN = np.array([103.53, 116.28, 123.675])
ND_STD = np.array([57.375, 57.12, 58.395])

NO_AUG_ND = config("nanodet.augment", scale_min=1.0, scale_max=1.0, stretch_min=1.0, stretch_max=1.0, translate=0.0,
                                      flip_prob=0.0, brightness=0.0, contrast_min=1.0, contrast_max=1.0,
                                      saturation_min=1.0, saturation_max=1.0)


def textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 1.5)


def rectangle_image(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    return img


def bright_extent(chw: np.ndarray, thresh: float) -> np.ndarray:
    """x1, y1, x2, y2 (pixel-edge units) of plane-0 values above ``thresh``."""
    ys, xs = np.nonzero(chw[0] > thresh)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


# --------------------------------------------------------------------------------------------------
# flip


def test_d0_flip_mirrors_image_and_maps_x_to_s_minus_x():
    img = textured(96, 96)
    boxes = np.array([[10, 20, 30, 50], [0, 0, 96, 40]], np.float32)
    out, b, lab, valid = T.d0_scale_crop(img, boxes, [3, 4], 96, flip=True, factor=1.0)
    assert valid == (96, 96)
    np.testing.assert_array_equal(out, cv2.flip(img, 1))
    np.testing.assert_allclose(b, [[96 - 30, 20, 96 - 10, 50], [0, 0, 96, 40]])
    np.testing.assert_array_equal(lab, [3, 4])


def test_nanodet_flip_mirrors_image_and_maps_x_to_s_minus_x():
    img = textured(80, 80)
    cfg = config("nanodet.augment", **{**NO_AUG_ND.__dict__, "flip_prob": 1.0})
    m = T.nanodet_warp_matrix(80, 80, 80, cfg, np.random.default_rng(0))
    out, b, lab = T.nanodet_warp(img, [[5, 6, 25, 40]], [1], m, 80)
    np.testing.assert_array_equal(out, cv2.flip(img, 1))
    np.testing.assert_allclose(b, [[80 - 25, 6, 80 - 5, 40]], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# D0 letterbox / scale-crop


def test_d0_eval_letterbox_scale_padding_and_exact_inverse():
    img = textured(100, 200)  # h, w
    boxes = np.array([[10.5, 3.25, 190.0, 99.0], [0, 0, 200, 100]], np.float32)
    s = T.d0_eval(img, 128, boxes)
    assert s.image.shape == (3, 128, 128) and s.image.dtype == np.float32
    np.testing.assert_allclose(s.scale, [0.64, 0.64], rtol=1e-7)
    assert np.all(s.image[:, 64:, :] == 0.0)  # padding below the 128x64 content is exactly 0
    ref = cv2.resize(img, (128, 64), interpolation=cv2.INTER_LINEAR)[:, :, ::-1] / 255.0
    ref = ((ref - IMNET_MEAN) / IMNET_STD).transpose(2, 0, 1)
    assert np.abs(s.image[:, :64] - ref).max() < 2.5 / 255 / 0.224  # within 2 grey levels of cv2.resize
    np.testing.assert_allclose(s.boxes / np.tile(s.scale, 2), boxes, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(s.boxes[1], [0, 0, 128, 64], atol=1e-4)


def test_d0_eval_portrait_pads_right():
    img = textured(160, 80)
    s = T.d0_eval(img, 64)
    np.testing.assert_allclose(s.scale, [0.4, 0.4], rtol=1e-7)
    assert np.all(s.image[:, :, 32:] == 0.0)
    assert np.all(np.abs(s.image[:, :, :32]).sum(axis=0) > 0)


def test_d0_scale_crop_matches_resize_then_crop():
    img = textured(120, 200, seed=3)
    for factor, oy, ox in [(1.0, 0.0, 0.0), (1.7, 0.3, 0.8), (0.5, 0.9, 0.9)]:
        out, _, _, (vh, vw) = T.d0_scale_crop(img, np.zeros((0, 4)), [], 128, False, factor, oy, ox)
        target = int(factor * 128)
        k = min(target / 120, target / 200)
        sh, sw = int(120 * k), int(200 * k)
        y0, x0 = int(max(0, sh - 128) * oy), int(max(0, sw - 128) * ox)
        ref = cv2.resize(img, (sw, sh), interpolation=cv2.INTER_LINEAR)[y0:y0 + 128, x0:x0 + 128]
        assert (vh, vw) == ref.shape[:2]
        assert np.abs(out[:vh, :vw].astype(int) - ref).max() <= 2
        assert not out[vh:].any() and not out[:, vw:].any()


def test_d0_train_padding_is_zero_and_boxes_scale():
    img = rectangle_image(100, 200, (40, 20, 120, 60))
    cfg = config("d0.augment", scale_min=0.5, scale_max=0.5, flip_prob=0.0)
    s = T.d0_train(img, [[40, 20, 120, 60]], [2], 128, cfg, np.random.default_rng(0))
    # longer side -> int(0.5 * 128) = 64: content is 32 x 64, the rest is padding = 0 after normalisation
    assert np.all(s.image[:, 32:, :] == 0.0) and np.all(s.image[:, :, 64:] == 0.0)
    np.testing.assert_allclose(s.boxes, [[12.8, 6.4, 38.4, 19.2]], rtol=1e-6)
    ext = bright_extent(s.image, 0.0)
    np.testing.assert_allclose(ext, s.boxes[0], atol=1.0)
    np.testing.assert_array_equal(s.labels, [2])


def test_d0_crop_removes_boxes_outside_and_clips_partial():
    img = textured(100, 100)
    boxes = np.array([
        [0, 0, 20, 20],  # top-left: cropped out entirely by a bottom-right crop
        [90, 90, 100, 100],  # bottom-right corner: inside
        [40, 50, 60, 100],  # crosses the crop's top edge, 60% inside
        [45, 0, 60, 55],  # crosses the crop's top edge, only 5/55 inside (< 20 %)
    ], np.float32)
    # factor 2 at S=100: scaled 200x200, crop window offset (100, 100) in scaled px = [50, 100] in source
    out, b, lab, valid = T.d0_scale_crop(img, boxes, [0, 1, 2, 3], 100, False, 2.0, 1.0, 1.0)
    assert valid == (100, 100)
    np.testing.assert_array_equal(lab, [1, 2])
    np.testing.assert_allclose(b, [[80, 80, 100, 100], [0, 0, 20, 100]], atol=1e-4)
    ref = cv2.resize(img, (200, 200), interpolation=cv2.INTER_LINEAR)[100:, 100:]
    assert np.abs(out.astype(int) - ref).max() <= 1


def test_clip_and_filter_rules():
    boxes = np.array([
        [-10, -10, 5, 5],  # 25 of 225 px inside (11 %): removed
        [-2, 10, 8, 30],  # 8 of 10 wide inside: kept, clipped
        [10, 10, 11.5, 40],  # 1.5 px wide: removed
        [50, 50, 70, 70],  # fully outside a 40x40 canvas: removed
        [0, 0, 40, 40],  # exactly the canvas
    ], np.float32)
    b, lab = T.clip_and_filter(boxes, np.arange(5), 40, 40)
    np.testing.assert_array_equal(lab, [1, 4])
    np.testing.assert_allclose(b, [[0, 10, 8, 30], [0, 0, 40, 40]])
    b, lab = T.clip_and_filter(np.zeros((0, 4)), [], 40, 40)
    assert b.shape == (0, 4) and lab.shape == (0,)


# --------------------------------------------------------------------------------------------------
# NanoDet warp


def corner_hull(boxes: np.ndarray, m: np.ndarray) -> np.ndarray:
    out = []
    for x1, y1, x2, y2 in boxes:
        pts = np.array([[x, y, 1.0] for x in (x1, x2) for y in (y1, y2)]) @ m.T
        pts = pts[:, :2] / pts[:, 2:]
        out.append([*pts.min(0), *pts.max(0)])
    return np.array(out)


def test_transform_boxes_equals_transforming_corners():
    rng = np.random.default_rng(7)
    boxes = np.sort(rng.uniform(0, 300, (20, 2, 2)), axis=1).transpose(0, 2, 1).reshape(20, 4)
    boxes = boxes[:, [0, 2, 1, 3]]
    matrices = [T.nanodet_warp_matrix(240, 320, 160, config("nanodet.augment", flip_prob=0.5), rng) for _ in range(5)]
    matrices.append(np.array([[0.9, 0.2, 5.0], [-0.1, 1.1, -3.0], [1e-4, 2e-4, 1.0]]))  # general projective
    for m in matrices:
        np.testing.assert_allclose(T.transform_boxes(boxes, m), corner_hull(boxes, m), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_nanodet_warp_moves_image_content_with_the_box(flip):
    box = (60, 40, 140, 100)
    img = rectangle_image(160, 200, box)
    cfg = config("nanodet.augment", scale_min=0.7, scale_max=1.3, translate=0.1, flip_prob=flip)
    for seed in range(4):
        m = T.nanodet_warp_matrix(160, 200, 128, cfg, np.random.default_rng(seed))
        out, b, lab = T.nanodet_warp(img, [box], [5], m, 128)
        np.testing.assert_allclose(b[0], np.clip(corner_hull(np.array([box], float), m)[0], 0, 128), atol=1e-3)
        ys, xs = np.nonzero(out[..., 0] > 127)
        np.testing.assert_allclose([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], b[0], atol=1.0)
        np.testing.assert_array_equal(lab, [5])


def test_nanodet_matrix_composition_known_answer():
    cfg = config("nanodet.augment", scale_min=0.8, scale_max=0.8, stretch_min=1.25, stretch_max=1.25, translate=0.0,
                                    flip_prob=0.0)
    m = T.nanodet_warp_matrix(100, 200, 100, cfg, np.random.default_rng(0))
    # source centre -> output centre; lengths scale by 0.8 * 1.25 * (100 / 200) in x and (100 / 100) in y
    centre = m @ [100.0, 50.0, 1.0]
    np.testing.assert_allclose(centre, [50, 50, 1])
    np.testing.assert_allclose(np.diag(m)[:2], [0.8 * 1.25 * 0.5, 0.8 * 1.25 * 1.0])
    # translate t draws the re-centring uniformly from (0.5 +- t) of the source size
    cfg = config("nanodet.augment", **{**cfg.__dict__, "translate": 0.2})
    shifts = np.array([(T.nanodet_warp_matrix(100, 200, 100, cfg, np.random.default_rng(s)) @ [100.0, 50, 1])[:2]
                       for s in range(200)])
    assert shifts[:, 0].min() >= 30 - 1e-6 and shifts[:, 0].max() <= 70 + 1e-6  # (0.5 +- 0.2) * 200 * 0.5
    assert shifts[:, 1].min() >= 30 - 1e-6 and shifts[:, 1].max() <= 70 + 1e-6
    assert np.ptp(shifts[:, 0]) > 30


def test_nanodet_eval_stretch_scale_and_exact_inverse():
    img = textured(90, 150)
    boxes = np.array([[3, 4, 140, 88], [0, 0, 150, 90]], np.float32)
    s = T.nanodet_eval(img, 64, boxes)
    np.testing.assert_allclose(s.scale, [64 / 150, 64 / 90], rtol=1e-7)
    np.testing.assert_allclose(s.boxes[1], [0, 0, 64, 64], atol=1e-4)
    np.testing.assert_allclose(s.boxes / np.tile(s.scale, 2), boxes, rtol=1e-6, atol=1e-4)
    ref = (cv2.resize(img, (64, 64), interpolation=cv2.INTER_LINEAR) - ND_MEAN) / ND_STD
    np.testing.assert_allclose(s.image, ref.transpose(2, 0, 1), atol=1e-4)


# --------------------------------------------------------------------------------------------------
# normalisation and colour


def test_normalisation_values():
    img = np.zeros((2, 3, 3), np.uint8)
    img[...] = (10, 20, 30)  # B, G, R
    d0 = T.normalize_imagenet_rgb(img)
    assert d0.shape == (3, 2, 3) and d0.dtype == np.float32
    np.testing.assert_allclose(d0[:, 0, 0], (np.array([30, 20, 10]) / 255 - IMNET_MEAN) / IMNET_STD, rtol=1e-5)
    nd = T.normalize_nanodet(img)
    np.testing.assert_allclose(nd[:, 1, 2], (np.array([10, 20, 30]) - ND_MEAN) / ND_STD, rtol=1e-5)


def test_nanodet_train_without_augmentation_is_normalised_stretch():
    img = textured(90, 150)
    s = T.nanodet_train(img, [[10, 10, 60, 80]], [1], 64, NO_AUG_ND, np.random.default_rng(0))
    ref = (cv2.resize(img, (64, 64), interpolation=cv2.INTER_LINEAR) - ND_MEAN) / ND_STD
    assert np.abs(s.image - ref.transpose(2, 0, 1)).max() < 2.5 / 57
    np.testing.assert_allclose(s.boxes, [[10 * 64 / 150, 10 * 64 / 90, 60 * 64 / 150, 80 * 64 / 90]], rtol=1e-5)


def test_nanodet_brightness_is_a_uniform_shift_applied_half_the_time():
    img = textured(16, 16)
    cfg = config("nanodet.augment", brightness=0.2, contrast_min=1.0, contrast_max=1.0, saturation_min=1.0,
                                    saturation_max=1.0)
    shifts = []
    for seed in range(200):
        diff = T.nanodet_color(img, cfg, np.random.default_rng(seed)) - img
        assert np.ptp(diff) < 1e-3  # one shift for every pixel and channel
        shifts.append(diff.flat[0])
    shifts = np.array(shifts)
    off = np.abs(shifts) < 1e-4
    assert 0.35 < off.mean() < 0.65
    assert np.abs(shifts).max() <= 0.2 * 255 + 1e-3 and np.abs(shifts).max() > 0.15 * 255


def test_nanodet_zero_saturation_gives_grey_at_the_max_channel():
    img = textured(16, 16)
    cfg = config("nanodet.augment", brightness=0.0, contrast_min=1.0, contrast_max=1.0, saturation_min=0.0,
                                    saturation_max=0.0)
    grey = 0
    for seed in range(60):
        out = T.nanodet_color(img, cfg, np.random.default_rng(seed))
        if np.allclose(out, img, atol=1e-3):
            continue
        np.testing.assert_allclose(out, np.repeat(img.max(axis=2, keepdims=True), 3, axis=2), atol=1e-2)
        grey += 1
    assert 15 < grey < 45


def test_nanodet_contrast_scales_values():
    img = textured(16, 16)
    cfg = config("nanodet.augment", brightness=0.0, contrast_min=0.6, contrast_max=1.4, saturation_min=1.0,
                                    saturation_max=1.0)
    ratios = []
    for seed in range(100):
        out = T.nanodet_color(img, cfg, np.random.default_rng(seed))
        r = out / np.maximum(img, 1)
        assert np.ptp(r[img > 10]) < 1e-3
        ratios.append(r[img > 10].mean())
    assert min(ratios) >= 0.6 - 1e-4 and max(ratios) <= 1.4 + 1e-4 and np.mean(np.isclose(ratios, 1.0)) > 0.3


# --------------------------------------------------------------------------------------------------
# determinism and padding


@pytest.mark.parametrize("model", ["d0", "nanodet"])
def test_train_transforms_reproducible_from_seed(model):
    img = textured(120, 160)
    boxes = np.array([[10, 10, 80, 90], [60, 40, 150, 110]], np.float32)
    fn, cfg = (T.d0_train, config("d0.augment")) if model == "d0" else (T.nanodet_train, config("nanodet.augment"))
    a = fn(img, boxes, [0, 1], 96, cfg, np.random.default_rng([1, 2, 3]))
    b = fn(img, boxes, [0, 1], 96, cfg, np.random.default_rng([1, 2, 3]))
    c = fn(img, boxes, [0, 1], 96, cfg, np.random.default_rng([1, 2, 4]))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert a.image.shape == (3, 96, 96) and a.image.dtype == np.float32
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int32
    assert not np.array_equal(a.image, c.image)


def test_pad_gt_pads_and_truncates_to_largest():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 2, 2], [0, 0, 30, 5], [5, 5, 40, 40]], np.float32)
    labels = np.array([1, 2, 3, 4], np.int32)
    b, lab, dropped = T.pad_gt(boxes, labels, 6)
    assert dropped == 0 and b.shape == (6, 4) and lab.shape == (6,)
    np.testing.assert_array_equal(b[:4], boxes)
    assert not b[4:].any() and np.all(lab[4:] == -1)
    b, lab, dropped = T.pad_gt(boxes, labels, 2)
    assert dropped == 2
    np.testing.assert_array_equal(lab, [3, 4])  # areas 150 and 1225 are the largest, original order kept
    np.testing.assert_array_equal(b, boxes[[2, 3]])
    b, lab, dropped = T.pad_gt(np.zeros((0, 4)), [], 3)
    assert dropped == 0 and not b.any() and np.all(lab == -1)


def test_bad_input_raises_clear_error():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        T.d0_train(np.zeros((8, 8), np.uint8), [], [], 64, config("d0.augment"), np.random.default_rng(0))
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        T.nanodet_train(np.zeros((8, 8, 3), np.uint8), [[0, 0, 4, 4]] * 2, [1], 64, config("nanodet.augment"),
                        np.random.default_rng(0))


def test_d0_longer_side_lands_exactly_on_target():
    # int(h * (t / h)) can floor to t - 1 in floating point; the longer side must be exactly t
    for h in (37, 48, 49, 97, 113):
        img = np.zeros((h, 2 * h, 3), np.uint8)
        _, _, _, (vh, vw) = T.d0_scale_crop(img, np.zeros((0, 4)), [], 256, False, 0.5)
        assert vw == 128 and vh == 64
