"""The end-to-end post-processing as a MindSpore cell, for an end-to-end MINDIR (``model_e2e.mindir``).

It computes what ``msdet.export.graph`` appends to the ONNX model, with static shapes and MindSpore's
``ops.NMSWithMask`` for the NMS:

1. decode the raw outputs to boxes [A, 4] in input pixels, clipped to [0, S] (``Detector.decode_cell``, the
   MindSpore twin of ``Detector.decode``);
2. the ``pre_nms_top_k`` best (anchor, class) scores (``ops.TopK``); those at or below ``score_threshold``
   are marked invalid;
3. boxes divided by the preprocessing scale (from ``orig_size`` = (h, w) and the resize mode), clipped to
   the original image; boxes left without area are marked invalid;
4. class-wise NMS as one ``NMSWithMask`` over boxes shifted by ``label * (max(h, w) + 1)``, the offset
   ``cv2.dnn.NMSBoxesBatched`` uses. ``NMSWithMask`` (MindSpore 2.8 CPU, pinned by
   ``tests/test_export_mindir_e2e.py``) sorts its input by score, visits it in that order and drops a box
   whose IoU (no "+1 pixel") with a kept one exceeds the threshold, strictly; it returns the sorted boxes,
   not their input positions, so each kept row's class is read back from its offset. Invalid candidates get
   score -1: sorted last, they can suppress only each other;
5. the kept detections by descending score, at most ``max_detections``.

Outputs have static shapes, padded as TensorRT's ``EfficientNMS`` plugin pads: ``boxes`` [M, 4] float32
(original pixels), ``scores`` [M], ``labels`` [M] int32 (class index), ``count`` [1] int32; rows from
``count`` on are zeros, with label -1.
"""
from __future__ import annotations

from typing import Any

import mindspore as ms
from mindspore import Tensor, nn, ops

from msdet.export.graph import RESIZE_MODES, Selection, _static_rows


class EndToEndCell(nn.Cell):
    """``(image [1, 3, S, S], orig_size float32 [1, 2] = (h, w)) -> (boxes [M, 4], scores [M], labels [M],
    count [1])``: ``inference`` (the raw network cell) followed by the post-processing above."""

    def __init__(self, inference: nn.Cell, detector: Any, selection: Selection, resize: str) -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize mode {resize!r}: expected one of {RESIZE_MODES}")
        if not hasattr(detector, "decode_cell"):
            raise ValueError(f"detector {getattr(detector, 'name', detector)!r} has no MindSpore decoding "
                             "(decode_cell)")
        self.inference, self.decode = inference, detector.decode_cell()
        self.num_classes = int(detector.num_classes)
        self.k0 = min(int(selection.pre_nms_top_k), _static_rows(detector) * self.num_classes)
        self.max_det = min(int(selection.max_detections), self.k0)
        self.out_rows = int(selection.max_detections)
        self.score_threshold = float(selection.score_threshold)
        self.size = float(detector.input_size)
        self.letterbox = resize == "letterbox"
        self.nms = ops.NMSWithMask(float(selection.iou_threshold))

    def construct(self, image: Tensor, orig_size: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        outputs = self.inference(image)
        boxes, scores = self.decode(*outputs) if isinstance(outputs, tuple) else self.decode(outputs)
        top_s, top_i = ops.topk(scores.reshape(-1), self.k0)
        anchor = top_i // self.num_classes
        label = top_i - anchor * self.num_classes
        wh = ops.stack([orig_size[0, 1], orig_size[0, 0]])
        longer = ops.maximum(wh[0], wh[1])
        scale = ops.tile(self.size / (ops.stack([longer, longer]) if self.letterbox else wh), (2,))
        limit = ops.tile(wh, (2,))
        orig = ops.minimum(ops.maximum(ops.gather(boxes, anchor, 0) / scale, 0.0), limit)
        valid = ops.logical_and(ops.logical_and(orig[:, 2] > orig[:, 0], orig[:, 3] > orig[:, 1]),
                                top_s > self.score_threshold)
        nms_s = ops.select(valid, top_s, ops.full_like(top_s, -1.0))
        step = longer + 1.0
        shifted = orig + (label.astype(ms.float32) * step).reshape(-1, 1)
        out, _, mask = self.nms(ops.concat([shifted, nms_s.reshape(-1, 1)], axis=1))
        kept = ops.logical_and(mask, out[:, 4] > self.score_threshold)
        best_s, best_i = ops.topk(ops.select(kept, out[:, 4], ops.full_like(out[:, 4], -2.0)), self.max_det)
        rows = ops.gather(out, best_i, 0)
        out_label = ops.floor(rows[:, 0] / step)
        live = best_s > self.score_threshold
        det_boxes = ops.select(live.reshape(-1, 1).broadcast_to((self.max_det, 4)),
                               rows[:, :4] - (out_label * step).reshape(-1, 1), ops.zeros_like(rows[:, :4]))
        det_scores = ops.select(live, best_s, ops.zeros_like(best_s))
        det_labels = ops.select(live, out_label.astype(ms.int32), ops.full_like(best_i, -1).astype(ms.int32))
        count = live.astype(ms.int32).sum(keepdims=True)
        pad = self.out_rows - self.max_det
        if pad:
            det_boxes = ops.concat([det_boxes, ops.zeros((pad, 4), ms.float32)])
            det_scores = ops.concat([det_scores, ops.zeros((pad,), ms.float32)])
            det_labels = ops.concat([det_labels, ops.full((pad,), -1, dtype=ms.int32)])
        return det_boxes, det_scores, det_labels, count
