"""Post-processing, COCO evaluation and plots on a small hand-made COCO set with non-contiguous category ids."""
from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from msdet.evaluation.coco_eval import STAT_NAMES, evaluate, evaluate_detections, write_pr_curve
from msdet.evaluation.plots import GT_COLOR, PRED_COLOR, write_detection_plots
from msdet.evaluation.postprocess import (
    ImageDetections,
    boxes_to_original,
    postprocess,
    select_detections,
    to_coco_results,
)

# meta.json "categories" order (class index -> category id), deliberately neither sorted nor contiguous.
CATEGORIES = [{"id": 42, "name": "kite"}, {"id": 5, "name": "bus"}, {"id": 9, "name": "boat"}]
CAT_IDS = [c["id"] for c in CATEGORIES]
IMAGES = [{"id": 11, "file_name": "a.jpg", "height": 480, "width": 640},
          {"id": 12, "file_name": "b.jpg", "height": 300, "width": 200},
          {"id": 30, "file_name": "c.jpg", "height": 256, "width": 256}]
# (image_id, category_id, x, y, w, h): small (< 32^2), medium and large objects.
OBJECTS = [(11, 42, 10, 20, 200, 150), (11, 5, 300, 200, 60, 40), (11, 9, 500, 400, 20, 25),
           (11, 42, 400, 50, 120, 300), (12, 5, 20, 30, 150, 200), (12, 9, 100, 250, 15, 12),
           (30, 42, 0, 0, 256, 128), (30, 9, 60, 150, 50, 60)]
CROWD = (30, 5, 150, 20, 80, 80)


def write_gt(path):
    anns = [{"id": i + 1, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            for i, (img, cat, x, y, w, h) in enumerate(OBJECTS)]
    img, cat, x, y, w, h = CROWD
    anns.append({"id": 100, "image_id": img, "category_id": cat, "bbox": [x, y, w, h], "area": w * h,
                 "iscrowd": 1})
    path.write_text(json.dumps({"images": IMAGES, "annotations": anns, "categories": CATEGORIES}))
    return path


@pytest.fixture
def gt_path(tmp_path):
    return write_gt(tmp_path / "instances_val.json")


def gt_as_results(dx=0.0, score=1.0):
    return [{"image_id": img, "category_id": cat, "bbox": [x + dx, y, w, h], "score": score}
            for img, cat, x, y, w, h in OBJECTS]


def gt_detections(image_id):
    """Ground truth of one image as ImageDetections (x1y1x2y2, class index, score 1)."""
    rows = [(x, y, x + w, y + h, CAT_IDS.index(cat)) for img, cat, x, y, w, h in OBJECTS if img == image_id]
    arr = np.array(rows, dtype=np.float64)
    return ImageDetections(image_id, arr[:, :4].astype(np.float32), np.ones(len(rows), np.float32),
                           arr[:, 4].astype(np.int64))


# ---------------------------------------------------------------------------------------------- COCO eval


def test_ground_truth_as_detections_scores_one(gt_path):
    m = evaluate(gt_path, gt_as_results(), [11, 12, 30])
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    for name in ("APs", "APm", "APl", "AR100"):
        assert m[name] == pytest.approx(1.0), name
    assert m["per_class_AP"] == pytest.approx({"kite": 1.0, "bus": 1.0, "boat": 1.0})
    assert m["num_images"] == 3 and m["num_detections"] == len(OBJECTS)
    assert len(m["pr_curve"]) == 101
    assert all(r["precision"] == pytest.approx(1.0) for r in m["pr_curve"])
    assert set(STAT_NAMES) <= set(m)


def test_shifted_detections_score_strictly_lower(gt_path):
    exact = evaluate(gt_path, gt_as_results())["AP"]
    shifted = evaluate(gt_path, gt_as_results(dx=6.0))["AP"]
    assert exact == pytest.approx(1.0)
    assert 0.0 < shifted < exact - 0.05


def test_empty_results_score_zero_without_crash(gt_path):
    m = evaluate(gt_path, [], [11, 12, 30])
    assert m["AP"] == 0.0 and m["AP50"] == 0.0 and m["AR100"] == 0.0
    assert m["per_class_AP"] == {"kite": 0.0, "bus": 0.0, "boat": 0.0}
    assert m["num_detections"] == 0
    assert all(r["precision"] == 0.0 for r in m["pr_curve"])


def test_subset_of_images_and_results_left_untouched(gt_path):
    results = gt_as_results()
    before = json.dumps(results)
    m = evaluate(gt_path, [r for r in results if r["image_id"] == 12], [12])
    assert m["AP"] == pytest.approx(1.0) and m["num_images"] == 1
    assert m["per_class_AP"]["kite"] == -1.0  # no kite on image 12: undefined, COCO's -1
    assert json.dumps(results) == before


def test_bad_results_and_ids_are_rejected(gt_path):
    with pytest.raises(ValueError, match="category ids absent"):
        evaluate(gt_path, [{"image_id": 11, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])
    with pytest.raises(ValueError, match="image ids"):
        evaluate(gt_path, [{"image_id": 99, "category_id": 5, "bbox": [0, 0, 5, 5], "score": 0.5}])
    with pytest.raises(ValueError, match="absent from the ground truth"):
        evaluate(gt_path, [], [11, 77])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate(gt_path.parent / "nope.json", [])


def test_evaluate_detections_maps_class_indices_to_category_ids(gt_path):
    dets = [gt_detections(i) for i in (11, 12, 30)]
    assert evaluate_detections(gt_path, dets, CAT_IDS)["AP"] == pytest.approx(1.0)
    # The same detections read with the sorted id order (a classic mistake) lose most of their AP.
    assert evaluate_detections(gt_path, dets, sorted(CAT_IDS))["AP"] < 0.5


def test_pr_curve_files(tmp_path, gt_path):
    rows = evaluate(gt_path, gt_as_results(dx=6.0))["pr_curve"]
    write_pr_curve(tmp_path / "pr.csv", rows)
    write_pr_curve(tmp_path / "pr.json", rows)
    with open(tmp_path / "pr.csv", newline="") as fh:
        read = list(csv.DictReader(fh))
    assert [float(r["recall"]) for r in read] == pytest.approx(np.linspace(0, 1, 101))
    assert [float(r["precision"]) for r in read] == pytest.approx([r["precision"] for r in rows])
    assert json.loads((tmp_path / "pr.json").read_text())["pr_curve"] == rows
    assert rows[0]["precision"] > rows[-1]["precision"]


# ------------------------------------------------------------------------------------------- postprocess


def input_boxes(orig_xyxy, sx, sy):
    return orig_xyxy * np.array([sx, sy, sx, sy])


@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
def test_mapping_back_to_original_is_exact(mode):
    rng = np.random.default_rng(0)
    size, h, w = 320, 375.0, 500.0
    sx, sy = (size / max(h, w),) * 2 if mode == "letterbox" else (size / w, size / h)
    x1, y1 = rng.uniform(0, w - 50, 64), rng.uniform(0, h - 50, 64)
    orig = np.stack([x1, y1, x1 + rng.uniform(1, 50, 64), y1 + rng.uniform(1, 50, 64)], 1)
    back = boxes_to_original(input_boxes(orig, sx, sy).astype(np.float32), (sx, sy), (h, w))
    np.testing.assert_allclose(back, orig, atol=1e-4, rtol=0)


def test_mapping_clips_to_the_original_image():
    # Letterbox of a 100x200 (h, w) image into 256: padding below y = 128 in input pixels.
    boxes = np.array([[-10, -5, 100, 200], [250, 120, 300, 140]], np.float32)
    out = boxes_to_original(boxes, (1.28, 1.28), (100, 200))
    np.testing.assert_allclose(out, [[0, 0, 100 / 1.28, 100], [250 / 1.28, 120 / 1.28, 200, 100]], atol=1e-4)


def synthetic_decode(image_ids, scales, orig_sizes, num_anchors=64, seed=0):
    """Decode-like outputs for the GT images: each object as a score-0.9 anchor, a near copy at 0.6
    (NMS must drop it), the rest low-score noise. Input pixels = original * (sx, sy)."""
    rng = np.random.default_rng(seed)
    b = len(image_ids)
    boxes = np.zeros((b, num_anchors, 4), np.float32)
    scores = rng.uniform(0, 0.04, (b, num_anchors, len(CAT_IDS))).astype(np.float32)
    noise = rng.uniform(0, 100, (b, num_anchors, 2))
    boxes[..., :2], boxes[..., 2:] = noise, noise + 10
    for i, img in enumerate(image_ids):
        det = gt_detections(img)
        k = len(det.labels)
        boxes[i, :k] = input_boxes(det.boxes, *scales[i])
        boxes[i, k:2 * k] = input_boxes(det.boxes + np.array([1, 1, 1, 1]), *scales[i])
        scores[i, np.arange(k), det.labels] = 0.9
        scores[i, np.arange(k, 2 * k), det.labels] = 0.6
    return boxes, scores


def test_decoded_batch_round_trips_to_ap_one(gt_path):
    ids = np.array([11, 12, 30], np.int64)
    orig = np.array([[480, 640], [300, 200], [256, 256]], np.float32)
    size = 320
    # Image 11 letterboxed, 12 stretched, 30 letterboxed (square).
    scales = np.array([[size / 640] * 2, [size / 200, size / 300], [size / 256] * 2], np.float32)
    boxes, scores = synthetic_decode(ids, scales.astype(np.float64), orig)
    dets = postprocess(boxes, scores, ids, scales, orig, score_threshold=0.05, iou_threshold=0.5,
                       max_detections=100)
    assert [d.image_id for d in dets] == [11, 12, 30]
    for d in dets:
        ref = gt_detections(d.image_id)
        assert len(d.labels) == len(ref.labels)  # duplicates suppressed, noise thresholded
        np.testing.assert_allclose(d.boxes, ref.boxes, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(d.labels, ref.labels)
    results = to_coco_results(dets, CAT_IDS)
    assert sorted((r["image_id"], r["category_id"]) for r in results) == sorted((o[0], o[1]) for o in OBJECTS)
    assert evaluate(gt_path, results, ids)["AP"] == pytest.approx(1.0)


def grid_boxes(n, cell=20):
    """n disjoint boxes so NMS keeps everything and only the threshold and caps act."""
    r, c = np.divmod(np.arange(n), 16)
    return np.stack([c * cell, r * cell, c * cell + cell - 2, r * cell + cell - 2], 1).astype(np.float32)


def test_score_threshold_and_max_detections():
    rng = np.random.default_rng(1)
    a, ncls = 128, 3
    boxes = grid_boxes(a)
    scores = rng.uniform(0, 1, (a, ncls)).astype(np.float32)
    scores[0, 0] = 0.3  # exactly the threshold: excluded (strictly greater)
    kw = dict(scale=(1.0, 1.0), orig_size=(1000, 1000), iou_threshold=0.5)
    _, s, labels = select_detections(boxes, scores, score_threshold=0.3, max_detections=10_000, **kw)
    assert len(s) == int((scores > 0.3).sum()) and s.min() > 0.3
    assert np.all(np.diff(s) <= 0) and labels.dtype == np.int64
    b, s, labels = select_detections(boxes, scores, score_threshold=0.3, max_detections=25, **kw)
    assert len(s) == 25
    np.testing.assert_array_equal(s, np.sort(scores.ravel())[::-1][:25])
    anchors = (boxes[:, None, :] == b[None]).all(-1).argmax(0)  # the anchor each kept box came from
    np.testing.assert_array_equal(scores[anchors, labels], s)


def test_pre_nms_top_k_caps_candidates():
    scores = np.linspace(0.1, 0.9, 128, dtype=np.float32)[:, None]
    boxes = grid_boxes(128)
    _, s, _ = select_detections(boxes, scores, (1.0, 1.0), (1000, 1000), score_threshold=0.05,
                                iou_threshold=0.5, max_detections=100, pre_nms_top_k=7)
    np.testing.assert_array_equal(s, scores[::-1, 0][:7])
    # Ties at the cut go to the lower anchor index, as a stable sort would.
    tied = np.full((128, 1), 0.5, np.float32)
    tied[100] = 0.7
    b, s, _ = select_detections(boxes, tied, (1.0, 1.0), (1000, 1000), score_threshold=0.05,
                                iou_threshold=0.5, max_detections=100, pre_nms_top_k=4)
    np.testing.assert_array_equal(b, boxes[[100, 0, 1, 2]])


def test_nms_is_class_wise_and_degenerate_boxes_are_dropped():
    boxes = np.array([[10, 10, 50, 50], [11, 11, 51, 51], [10, 10, 50, 50], [300, 10, 320, 50]], np.float32)
    scores = np.zeros((4, 2), np.float32)
    scores[0, 0], scores[1, 0], scores[2, 1], scores[3, 0] = 0.9, 0.8, 0.7, 0.95
    # Anchor 3 lies right of the 200-pixel-wide original: zero width after clipping.
    b, s, labels = select_detections(boxes, scores, (1.0, 1.0), (100, 200), score_threshold=0.05,
                                     iou_threshold=0.5, max_detections=100)
    np.testing.assert_allclose(s, [0.9, 0.7])
    np.testing.assert_array_equal(labels, [0, 1])


def test_postprocess_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="scales"):
        postprocess(np.zeros((2, 5, 4)), np.zeros((2, 5, 3)), [1, 2], np.ones((1, 2)), np.ones((2, 2)),
                    score_threshold=0.05, iou_threshold=0.5, max_detections=10)


def test_to_coco_results_converts_boxes_and_ids():
    det = ImageDetections(7, np.array([[10, 20, 40, 25]], np.float32), np.array([0.5], np.float32),
                          np.array([2]))
    assert to_coco_results([det], CAT_IDS) == [{"image_id": 7, "category_id": 9, "bbox": [10.0, 20.0, 30.0, 5.0],
                                                 "score": 0.5}]
    with pytest.raises(ValueError, match="class index"):
        to_coco_results([ImageDetections(7, det.boxes, det.scores, np.array([3]))], CAT_IDS)


# ------------------------------------------------------------------------------------------------- plots


def test_detection_plots_are_written_with_both_colours(tmp_path):
    image = np.full((100, 120, 3), 128, np.uint8)
    det = ImageDetections(5, np.array([[60, 40, 110, 90], [0, 0, 5, 5]], np.float32),
                          np.array([0.8, 0.1], np.float32), np.array([1, 0]))
    gt_boxes, gt_labels = np.array([[10, 10, 50, 50]], np.float32), np.array([2])
    out = tmp_path / "plots"
    (out.parent / "plots").mkdir()
    (out / "stale.png").write_bytes(b"old")
    paths = write_detection_plots(out, [(image, det, gt_boxes, gt_labels)], [c["name"] for c in CATEGORIES])
    assert paths == [out / "5.png"] and sorted(p.name for p in out.iterdir()) == ["5.png"]
    drawn = cv2.imread(str(paths[0]))
    assert drawn.shape == image.shape
    assert tuple(drawn[30, 10]) == GT_COLOR  # left edge of the GT box
    assert tuple(drawn[75, 110]) == PRED_COLOR  # right edge of the prediction
    assert tuple(drawn[3, 3]) == (128, 128, 128)  # the 0.1-score prediction is below min_score
    assert tuple(image[30, 10]) == (128, 128, 128)  # input untouched
