"""The end-to-end MINDIR's post-processing cell: MindSpore's NMSWithMask behaves as the cell assumes, and the
cell (decoding of both detectors, threshold, top-k, class-wise NMS through class offsets, mapping back to the
original image, padding) equals msdet's post-processing on raw outputs spread like a trained head's."""
from __future__ import annotations

import dataclasses

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from msdet.evaluation.postprocess import select_detections
from msdet.export.end_to_end import PREPROCESS
from msdet.export.graph import Selection
from msdet.export.mindir_graph import EndToEndCell
from tests.helpers import ROOT


def _nms(boxes: list[list[float]], threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    out, _, mask = ops.NMSWithMask(threshold)(Tensor(np.array(boxes, np.float32)))
    return out.asnumpy(), mask.asnumpy()


def test_nms_with_mask_sorts_by_score_and_suppresses_strictly_above_the_threshold():
    """What mindir_graph.py relies on: rows come back sorted by score (not in input order, so a kept row's
    class must be read from the row itself), IoU without "+1 pixel", and IoU == threshold survives."""
    out, mask = _nms([[0, 0, 10, 10, 0.9], [0, 0, 10, 5, 0.8], [20, 20, 30, 30, 0.95], [0, 0, 10, 6, 0.7]])
    np.testing.assert_array_equal(out[:, 4], np.float32([0.95, 0.9, 0.8, 0.7]))
    np.testing.assert_array_equal(out[0, :4], [20, 20, 30, 30])
    # IoU 0.5 exactly (kept), 0.6 (dropped)
    np.testing.assert_array_equal(mask, [True, True, True, False])
    # continuous areas: IoU 39.6 / 81 = 0.489 is kept; with "+1 pixel" areas it would be 0.54, dropped
    assert _nms([[0, 0, 9, 9, 0.9], [0, 0, 9, 4.4, 0.8]])[1].tolist() == [True, True]
    assert _nms([[0, 0, 9, 9, 0.9], [0, 0, 9, 4.6, 0.8]])[1].tolist() == [True, False]
    # a box of score -1 (the cell's invalid candidates) comes last and suppresses nothing above it
    out, mask = _nms([[0, 0, 10, 10, -1.0], [0, 0, 10, 10, 0.3]])
    np.testing.assert_array_equal(out[:, 4], np.float32([0.3, -1.0]))
    assert mask.tolist() == [True, False]


class _Raw(nn.Cell):
    """A "network" whose input is its raw outputs: [1, A, K] cut as the detector's inference cell returns them."""

    def __init__(self, split: int | None) -> None:
        super().__init__()
        self.split = split

    def construct(self, x):
        if self.split is None:
            return x
        return x[:, :, :self.split], x[:, :, self.split:]


def _scale(mode: str, size: int, h: int, w: int) -> np.ndarray:
    return np.array([size / max(h, w)] * 2 if mode == "letterbox" else [size / w, size / h], np.float32)


@pytest.mark.parametrize("model", ["d0", "nanodet"])
def test_mindir_postprocessing_equals_msdet_postprocessing(model):
    """Counts, labels and scores exact, boxes to float32 of the class offset, over image shapes that push
    boxes into the letterbox padding, with the top-k and max-detections cuts active. Continuous scores:
    among equal scores the two orders may differ (docs/deploy.md)."""
    from msdet.config import load_params
    from msdet.detectors import get_detector

    ms.set_context(mode=ms.GRAPH_MODE)
    cfg = dataclasses.replace(getattr(load_params(ROOT / "params.yaml"), model), input_size=128)
    det = get_detector(model, cfg, 4)
    mode = PREPROCESS[model]["resize"]
    sel = Selection(score_threshold=0.05, iou_threshold=0.5, max_detections=60, pre_nms_top_k=400)
    cell = EndToEndCell(_Raw(4 if model == "d0" else None), det, sel, mode)
    cell.set_train(False)
    rng = np.random.default_rng(2)
    rows = len(det.anchors) if model == "d0" else len(det.priors)
    counts = []
    for case, (h, w) in enumerate([(90, 160), (480, 640), (40, 400), (700, 30), (128, 128), (333, 251)]):
        if model == "d0":
            x = np.concatenate([rng.normal(0, 0.5, (1, rows, 4)), rng.beta(0.3, 3, (1, rows, 4))], -1)
        else:
            x = np.concatenate([rng.beta(0.3, 3, (1, rows, 4)), rng.normal(0, 2, (1, rows, 4 * (det.reg_max + 1)))],
                               -1)
        if case == 4:  # few candidates: the count stays below max_detections, the padding shows
            x[..., (4 if model == "d0" else 0):][..., :4] *= 0.08
        x = x.astype(np.float32)
        boxes, scores, labels, count = (o.asnumpy() for o in cell(Tensor(x), Tensor(np.float32([[h, w]]))))
        raw = [x[..., :4], x[..., 4:]] if model == "d0" else [x]
        ref_boxes, ref_scores = det.decode(raw)
        rb, rs, rl = select_detections(ref_boxes[0], ref_scores[0], _scale(mode, 128, h, w),
                                       np.array([h, w], np.float32), **dataclasses.asdict(sel))
        k = int(count[0])
        case_name = f"{model} {h}x{w}"
        assert k == len(rs), f"{case_name}: {k} detections, msdet {len(rs)}"
        np.testing.assert_array_equal(labels[:k], rl, err_msg=case_name)
        np.testing.assert_array_equal(scores[:k], rs, err_msg=case_name)
        np.testing.assert_allclose(boxes[:k], rb, atol=1e-4 * max(h, w), err_msg=case_name)
        assert (labels[k:] == -1).all() and not scores[k:].any() and not boxes[k:].any(), case_name
        counts.append(k)
    assert max(counts) == sel.max_detections and min(counts) < sel.max_detections
