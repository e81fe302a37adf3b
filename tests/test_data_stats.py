"""Data statistics, D0's anchor fit and best-possible recall, the detection confusion matrix."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from msdet.config import ConfigError, load_params
from msdet.conversion.converters import ConversionError, convert_state_dict
from msdet.data.stats import BoxTable, d0_anchor_fit, health_warning, letterboxed_boxes, split_tables
from msdet.detectors.d0 import D0Detector
from msdet.evaluation.confusion import confusion_rows, image_confusion, precision_recall
from msdet.ops.anchor_fit import best_anchor_iou, best_possible_recall, fit_anchors, kmeans_log_aspect
from msdet.ops.anchors import AnchorSpec, efficientdet_anchors
from tests.helpers import config

LEVELS = (3, 4, 5, 6, 7)


def random_boxes(n: int, size: int, seed: int, aspect: tuple[float, float] = (0.25, 4.0)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    side = rng.uniform(4, size * 0.8, n)
    ratio = np.exp(rng.uniform(*np.log(aspect), n))          # w / h
    w, h = side * np.sqrt(ratio), side / np.sqrt(ratio)
    x, y = rng.uniform(0, size, n), rng.uniform(0, size, n)
    return np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], 1)


def brute_force_best_iou(boxes: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Every box against every anchor, written out independently of msdet.ops."""
    b, a = boxes[:, None, :], anchors[None, :, :].astype(np.float64)
    iw = np.clip(np.minimum(b[..., 2], a[..., 2]) - np.maximum(b[..., 0], a[..., 0]), 0, None)
    ih = np.clip(np.minimum(b[..., 3], a[..., 3]) - np.maximum(b[..., 1], a[..., 1]), 0, None)
    inter = iw * ih
    union = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) + (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    return (inter / (union - inter)).max(axis=1)


@pytest.mark.parametrize("spec", [AnchorSpec(2.0), AnchorSpec(3.1, ratios=((0.5, 2.0), (1.0, 1.0), (2.2, 0.45)))])
def test_best_anchor_iou_and_bpr_match_all_pairs(spec):
    boxes = random_boxes(400, 128, seed=1)
    anchors = efficientdet_anchors(128, spec.anchor_scale, LEVELS, spec.scales, spec.ratios)
    ref = brute_force_best_iou(boxes, anchors)
    np.testing.assert_allclose(best_anchor_iou(boxes, spec, 128, LEVELS), ref, atol=1e-5)
    for thr in (0.4, 0.5, 0.6):
        assert best_possible_recall(boxes, spec, 128, LEVELS, thr) == pytest.approx(np.mean(ref >= thr - 1e-9))


def test_kmeans_finds_the_aspect_clusters_deterministically():
    rng = np.random.default_rng(0)
    true = np.array([0.25, 1.0, 3.0])
    ratio = np.repeat(true, [300, 500, 200]) * np.exp(rng.normal(0, 0.05, 1000))
    w = 20 * np.sqrt(ratio)
    boxes = np.stack([np.zeros(1000), np.zeros(1000), w, w / ratio], 1)
    got = kmeans_log_aspect(boxes, 3)
    np.testing.assert_allclose(got, true, rtol=0.03)
    assert np.array_equal(got, kmeans_log_aspect(boxes.copy(), 3))  # no randomness
    np.testing.assert_allclose(kmeans_log_aspect(boxes[::-1], 3), got, rtol=1e-12)  # nor order


def test_fit_on_thin_boxes_beats_default_and_is_deterministic():
    boxes = random_boxes(1500, 128, seed=2, aspect=(0.24, 0.26))
    default = AnchorSpec(2.0)
    fitted = fit_anchors(boxes, default, 128, LEVELS, 0.5)
    assert fitted == fit_anchors(boxes.copy(), default, 128, LEVELS, 0.5)
    for rx, ry in fitted.ratios:  # area-preserving 1:4 ratios
        assert rx * ry == pytest.approx(1.0) and rx / ry == pytest.approx(0.25, rel=0.05)

    def fitness(spec):
        best = brute_force_best_iou(boxes, efficientdet_anchors(128, spec.anchor_scale, LEVELS, spec.scales,
                                                                 spec.ratios))
        return np.mean(best * (best >= 0.5)), np.mean(best >= 0.5)

    (fit_f, fit_bpr), (def_f, def_bpr) = fitness(fitted), fitness(default)
    assert fit_f > def_f + 0.05 and fit_bpr > def_bpr


def test_fit_keeps_default_on_boxes_the_default_fits():
    spec = AnchorSpec(2.0)
    boxes = efficientdet_anchors(128, 2.0, LEVELS)[::7].astype(np.float64)  # the anchors themselves: IoU 1
    assert fit_anchors(boxes, spec, 128, LEVELS, 0.5) == spec


def test_d0_anchor_report_letterboxes_the_boxes():
    # one 256 x 128 image: scale 0.5 to 128 px; its box becomes [0, 0, 32, 16] at input size
    table = BoxTable(np.array([[0, 0, 64, 32]], np.float32), np.array([0]), np.array([0]), np.array([128]),
                     np.array([256]))
    np.testing.assert_allclose(letterboxed_boxes(table, 128), [[0, 0, 32, 16]])
    report, fitted = d0_anchor_fit(table, config("d0", input_size=128))
    spec = AnchorSpec.from_dict(report["fit"], "report", 9)
    assert spec == fitted and report["boxes"] == 1
    ref = brute_force_best_iou(np.array([[0, 0, 32, 16.0]]), efficientdet_anchors(128, 2.0))
    assert report["default"]["bpr"] == float(ref[0] >= 0.5)


def test_split_tables_count_like_numpy():
    rng = np.random.default_rng(3)
    boxes = random_boxes(200, 100, seed=3, aspect=(0.1, 10.0))
    image_of = np.sort(rng.integers(0, 30, 200))
    heights, widths = np.full(40, 100), np.full(40, 100)
    labels = rng.integers(0, 3, 200)
    stats = {"dropped": {"crowd": 1, "degenerate": 2}, "clipped_boxes": 3, "skipped_images": 0}
    tables = split_tables(BoxTable(boxes, labels, image_of, heights, widths), ["a", "b", "c"], stats)
    assert [r["boxes"] for r in tables["classes"]] == np.bincount(labels, minlength=3).tolist()
    per_image = np.bincount(image_of, minlength=40)
    assert [r["images"] for r in tables["boxes_per_image"]] == np.bincount(per_image).tolist()
    wh = boxes[:, 2:] - boxes[:, :2]
    log_aspect = np.clip(np.log2(wh[:, 0] / wh[:, 1]), -4, 4 - 1e-9)
    assert [r["boxes"] for r in tables["aspect_ratio"]] == np.histogram(log_aspect, np.linspace(-4, 4, 33))[0].tolist()
    rel = np.clip(np.sqrt(wh.prod(1)) / 100.0, 0, 1 - 1e-9)
    assert [r["boxes"] for r in tables["box_size"]] == np.histogram(rel, np.linspace(0, 1, 21))[0].tolist()
    assert {r["reason"]: r["count"] for r in tables["health"]}["dropped: degenerate"] == 2


def test_health_warning_names_rare_and_unseen_classes():
    stats = {"train": {"per_class": {"a": 50, "b": 3, "c": 0}}, "val": {"per_class": {"a": 5, "b": 1, "c": 2}}}
    line = health_warning(stats, 20)
    assert "\n" not in line and "b (3)" in line and "c (0)" in line and "a (" not in line
    assert "train lacks: c" in line
    assert health_warning({"train": {"per_class": {"a": 50}}, "val": {"per_class": {"a": 5}}}, 20) is None


def test_confusion_matrix_hand_built_image():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]], float)
    gt_labels = np.array([0, 1, 1, 0])
    det = np.array([[0, 0, 10, 10],      # class 0 on gt 0: TP
                    [1, 0, 11, 10],      # class 2 duplicate on gt 0 (IoU 0.82 > 0.5): gt 0 is taken -> FP
                    [20, 20, 30, 31],    # class 0 on gt 1: confused 1 -> 0
                    [80, 80, 90, 90],    # nothing there: FP class 1
                    [40, 40, 46, 50]])   # class 1 on gt 2 at IoU 0.6: TP
    det_labels = np.array([0, 2, 0, 1, 1])
    m = image_confusion(gt, gt_labels, det, det_labels, 3, 0.5)   # gt 3 missed
    expected = np.zeros((4, 4), int)
    expected[0, 0] = 1
    expected[1, 0] = 1
    expected[1, 1] = 1
    expected[0, 3] = 1     # gt 3 missed -> background
    expected[3, 2] = 1     # duplicate
    expected[3, 1] = 1     # empty-space detection
    np.testing.assert_array_equal(m, expected)
    pr = precision_recall(m, ["a", "b", "c"])
    assert pr["precision"] == {"a": 0.5, "b": 0.5, "c": 0.0}
    assert pr["recall"] == {"a": 0.5, "b": 0.5, "c": -1.0}
    rows = confusion_rows(m, ["a", "b", "c"])
    assert len(rows) == m.sum() and rows.count({"actual": "b", "predicted": "a"}) == 1
    assert rows.count({"actual": "background", "predicted": "c"}) == 1


def test_confusion_prefers_the_same_class_pair():
    # two detections on one box, the other class at the higher IoU: the right class is the match
    gt, gt_labels = np.array([[0, 0, 10, 10.0]]), np.array([1])
    det, det_labels = np.array([[0, 0, 10, 9.0], [0, 0, 10, 10.0]]), np.array([1, 0])
    m = image_confusion(gt, gt_labels, det, det_labels, 2, 0.5)
    assert m[1, 1] == 1 and m[2, 0] == 1 and m.sum() == 2


def test_d0_anchors_travel_with_the_weights():
    cfg = config("d0", input_size=128)
    detector = D0Detector(cfg, 3)
    default = detector.anchors.copy()
    spec = AnchorSpec(3.0, ratios=((0.5, 2.0), (0.5, 2.0), (1.0, 1.0)))
    other = D0Detector(cfg, 3)
    other.use_weights_meta({"anchors": spec.as_dict()}, "x.ckpt")
    np.testing.assert_array_equal(other.anchors, efficientdet_anchors(128, 3.0, LEVELS, spec.scales, spec.ratios))
    assert other.weights_meta() == {"anchors": spec.as_dict()}
    detector.use_weights_meta({"anchors": None}, "old.ckpt")            # nothing saved: the default anchors
    np.testing.assert_array_equal(detector.anchors, default)
    with pytest.raises(ValueError, match="x.ckpt: 3 scales x 2 ratios"):
        other.use_weights_meta({"anchors": {**spec.as_dict(), "ratios": [[1, 1], [2, 0.5]]}}, "x.ckpt")
    fit = D0Detector(dataclasses.replace(cfg, anchors="fit"), 3)
    with pytest.raises(ValueError, match="meta.json: anchors fitted at input size 256"):
        fit.fit_to_data({"d0_anchors": {"input_size": 256, "fit": spec.as_dict()}}, "meta.json")
    fit.fit_to_data({"d0_anchors": {"input_size": 128, "fit": spec.as_dict()}}, "meta.json")
    assert fit.anchor_spec == spec
    detector.fit_to_data({"d0_anchors": {"input_size": 128, "fit": spec.as_dict()}}, "meta.json")
    np.testing.assert_array_equal(detector.anchors, default)            # d0.anchors default ignores the fit


def test_converter_refuses_fitted_anchors():
    with pytest.raises(ConversionError, match="d0.anchors is fit"):
        convert_state_dict("d0", {}, cfg=config("d0", anchors="fit"))


def test_anchors_param_is_validated(tmp_path):
    from tests.helpers import write_params

    path = write_params(tmp_path / "params.yaml", {"d0": {"anchors": "kmeans"}})
    with pytest.raises(ConfigError, match="'d0.anchors' = 'kmeans' is not one of"):
        load_params(path)
