"""ONNX post-processing appended to a raw exported network: decoding, score threshold, top-k, class-wise NMS.

The appended graph reproduces ``msdet.evaluation.postprocess.select_detections`` for one image:

1. decode the raw outputs to boxes [A, 4] in input pixels, clipped to [0, S] (``Detector.decode``);
2. the ``pre_nms_top_k`` best (anchor, class) scores (``TopK``: "if two elements are equal, the one with
   the lower index appears first", ONNX operator spec), so ties fall as in the stable NumPy selection;
   those at or below ``score_threshold`` are dropped;
3. boxes divided by the preprocessing scale (from ``orig_size`` = (h, w) and the resize mode), clipped to
   the original image; boxes left without area are dropped;
4. class-wise ``NonMaxSuppression``: per class, visit by descending score, suppress a box whose IoU with a
   kept one exceeds ``iou_threshold`` (ONNX operator spec; onnxruntime's test is ``iou > threshold`` and
   keeps scores ``> score_threshold``), which is ``msdet.ops.nms.batched_nms``' rule;
5. the kept detections by descending score (ties: lower candidate index), at most ``max_detections``.

Only operators whose semantics are the same from opset 11 on are used, so the graph joins a raw model of
any such opset without touching the raw nodes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_OPSET = 11
ORIG_SIZE = "orig_size"
BOXES, SCORES, LABELS = "boxes", "scores", "labels"
RESIZE_MODES = ("letterbox", "stretch")


@dataclass(frozen=True)
class Selection:
    """The post-processing settings baked into the graph (``eval`` in params.yaml)."""

    score_threshold: float
    iou_threshold: float
    max_detections: int
    pre_nms_top_k: int


class _Builder:
    """Appends uniquely named nodes and constants to a graph."""

    def __init__(self, graph: onnx.GraphProto, prefix: str = "post/") -> None:
        self.graph, self.prefix, self.count = graph, prefix, 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def const(self, value: Any, dtype: Any = np.float32, hint: str = "c") -> str:
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs: Any) -> Any:
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.graph.node.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def cols(self, x: str, start: int, end: int) -> str:
        """x[:, start:end] of a 2-D tensor."""
        return self.op("Slice", [x, self.const([start], np.int64), self.const([end], np.int64),
                                 self.const([1], np.int64)])

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.op("Reshape", [x, self.const(shape, np.int64)])


Decoder = Callable[[_Builder, list[str], Any], tuple[str, str]]


def decode_d0(b: _Builder, outputs: list[str], detector: Any) -> tuple[str, str]:
    """(regression (dy, dx, dh, dw) [1, A, 4], probabilities [1, A, C]) -> boxes [A, 4], scores [A, C]
    (``msdet.ops.box_coder.decode_np``, clipped to the input)."""
    anchors = np.asarray(detector.anchors, np.float64)
    wh = anchors[:, 2:] - anchors[:, :2]
    centre = anchors[:, :2] + 0.5 * wh
    reg = b.reshape(outputs[0], [-1, 4])
    d_xy = b.op("Gather", [reg, b.const([1, 0], np.int64)], axis=1)
    d_wh = b.op("Gather", [reg, b.const([3, 2], np.int64)], axis=1)
    c = b.op("Add", [b.op("Mul", [d_xy, b.const(wh)]), b.const(centre)])
    half = b.op("Mul", [b.op("Mul", [b.op("Exp", [d_wh]), b.const(wh)]), b.const(0.5)])
    boxes = b.op("Concat", [b.op("Sub", [c, half]), b.op("Add", [c, half])], axis=1)
    scores = b.reshape(outputs[1], [anchors.shape[0], detector.num_classes])
    return _clip_to_input(b, boxes, detector.input_size), scores


def decode_nanodet(b: _Builder, outputs: list[str], detector: Any) -> tuple[str, str]:
    """[1, P, C + 4 (reg_max + 1)] -> boxes [P, 4], scores [P, C]: softmax expectation of each side's
    distribution times the stride, from the prior point (``NanoDetDetector.decode``)."""
    c, bins, priors = detector.num_classes, detector.reg_max + 1, np.asarray(detector.priors, np.float32)
    out = b.reshape(outputs[0], [priors.shape[0], c + 4 * bins])
    reg = b.reshape(b.cols(out, c, c + 4 * bins), [-1, bins])
    project = b.const(np.arange(bins, dtype=np.float32).reshape(bins, 1))
    dist = b.op("Mul", [b.reshape(b.op("MatMul", [b.op("Softmax", [reg], axis=1), project]), [-1, 4]),
                        b.const(priors[:, 2:3])])
    return _distances_to_boxes(b, priors[:, :2], dist, detector.input_size), b.cols(out, 0, c)


def _distances_to_boxes(b: _Builder, points: np.ndarray, dist: str, size: int) -> str:
    p = b.const(points)
    boxes = b.op("Concat", [b.op("Sub", [p, b.cols(dist, 0, 2)]), b.op("Add", [p, b.cols(dist, 2, 4)])], axis=1)
    return _clip_to_input(b, boxes, size)


def _clip_to_input(b: _Builder, boxes: str, size: int) -> str:
    return b.op("Clip", [boxes, b.const(0.0), b.const(float(size))])


#: detector name -> the graph of its ``decode``
DECODERS: dict[str, Decoder] = {"d0": decode_d0, "nanodet": decode_nanodet}


def _scale(b: _Builder, orig_size: str, size: int, resize: str) -> tuple[str, str]:
    """(scale [4] = (sx, sy, sx, sy), limits [4] = (w, h, w, h)) from orig_size [1, 2] = (h, w), as the eval
    transforms compute them: letterbox s = S / max(h, w) on both axes, stretch (S / w, S / h)."""
    hw = b.reshape(orig_size, [2])
    wh = b.op("Gather", [hw, b.const([1, 0], np.int64)], axis=0)
    if resize == "letterbox":
        longer = b.op("ReduceMax", [wh], keepdims=1)  # axes attribute omitted: same in every opset
        xy = b.op("Expand", [b.op("Div", [b.const([float(size)]), longer]), b.const([2], np.int64)])
    else:
        xy = b.op("Div", [b.const([float(size)]), wh])
    return b.op("Concat", [xy, xy], axis=0), b.op("Concat", [wh, wh], axis=0)


def append_postprocess(model: onnx.ModelProto, detector: Any, selection: Selection, resize: str) -> onnx.ModelProto:
    """A copy of the raw batch-1 ``model`` whose graph ends in detections: inputs ``image`` [1, 3, S, S] and
    ``orig_size`` float32 [1, 2] (h, w) -> ``boxes`` float32 [K, 4] x1y1x2y2 in original pixels, ``scores``
    [K], ``labels`` int64 [K] (class index), best first, K <= max_detections."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize mode {resize!r}: expected one of {RESIZE_MODES}")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(f"the raw ONNX model has opset {opset}; the post-processing needs {MIN_OPSET} or later")
    decoder = DECODERS.get(getattr(detector, "name", ""))
    if decoder is None:
        raise ValueError(f"no ONNX decoding for detector {getattr(detector, 'name', '?')!r} "
                         f"(known: {', '.join(DECODERS)})")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    _rename_clashes(g)
    raw_outputs = [o.name for o in g.output]
    del g.output[:]
    g.input.append(helper.make_tensor_value_info(ORIG_SIZE, TensorProto.FLOAT, [1, 2]))
    b = _Builder(g)
    boxes, scores = decoder(b, raw_outputs, detector)
    size = int(detector.input_size)
    num_classes = int(detector.num_classes)
    num_anchors = _static_rows(detector)
    k0 = min(int(selection.pre_nms_top_k), num_anchors * num_classes)

    top_s, top_i = b.op("TopK", [b.reshape(scores, [-1]), b.const([k0], np.int64)], n_out=2, axis=0,
                        largest=1, sorted=1)
    c_const = b.const(num_classes, np.int64)
    anchor = b.op("Div", [top_i, c_const])
    label = b.op("Sub", [top_i, b.op("Mul", [anchor, c_const])])
    scale, limit = _scale(b, ORIG_SIZE, size, resize)
    cand = b.op("Gather", [boxes, anchor], axis=0)
    orig = b.op("Min", [b.op("Max", [b.op("Div", [cand, scale]), b.const(0.0)]), limit])
    x1, y1, x2, y2 = (b.cols(orig, k, k + 1) for k in range(4))
    valid = b.op("And", [b.op("Greater", [x2, x1]), b.op("Greater", [y2, y1])])
    valid = b.op("And", [b.reshape(valid, [k0]), b.op("Greater", [top_s, b.const(selection.score_threshold)])])
    nms_s = b.op("Where", [valid, top_s, b.const(-1.0)])
    same_class = b.op("Equal", [b.reshape(label, [1, k0]), b.const(np.arange(num_classes).reshape(-1, 1), np.int64)])
    per_class = b.reshape(b.op("Where", [same_class, b.reshape(nms_s, [1, k0]), b.const(-1.0)]),
                          [1, num_classes, k0])
    selected = b.op("NonMaxSuppression", [b.reshape(orig, [1, k0, 4]), per_class,
                                          b.const([selection.max_detections], np.int64),
                                          b.const([selection.iou_threshold]),
                                          b.const([selection.score_threshold])], center_point_box=0)
    kept = b.op("Gather", [selected, b.const(2, np.int64)], axis=1)
    kept_s = b.op("ScatterElements", [b.const(np.full(k0, -2.0, np.float32)), kept,
                                      b.op("Gather", [top_s, kept], axis=0)], axis=0)
    # min(kept, max_detections): Min takes int64 from opset 12 only, ReduceMin from 11
    n = b.op("ReduceMin", [b.op("Concat", [b.op("Shape", [kept]), b.const([selection.max_detections], np.int64)],
                                axis=0)], keepdims=1)
    final_s, final_i = b.op("TopK", [kept_s, n], n_out=2, axis=0, largest=1, sorted=1)
    g.node.append(helper.make_node("Identity", [final_s], [SCORES], name="post/scores"))
    g.node.append(helper.make_node("Gather", [orig, final_i], [BOXES], name="post/boxes", axis=0))
    g.node.append(helper.make_node("Gather", [label, final_i], [LABELS], name="post/labels", axis=0))
    g.output.extend([helper.make_tensor_value_info(BOXES, TensorProto.FLOAT, ["K", 4]),
                     helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["K"]),
                     helper.make_tensor_value_info(LABELS, TensorProto.INT64, ["K"])])
    del out.metadata_props[:]
    for key, value in {"score_threshold": selection.score_threshold, "iou_threshold": selection.iou_threshold,
                       "max_detections": selection.max_detections, "pre_nms_top_k": selection.pre_nms_top_k,
                       "nms": "class-wise", "resize": resize, "input_size": size}.items():
        out.metadata_props.add(key=key, value=str(value))
    onnx.checker.check_model(out)
    return out


def _rename_clashes(g: onnx.GraphProto) -> None:
    """Raw tensors named like the end-to-end outputs get a ``raw/`` prefix (names must be unique)."""
    clash = {n: f"raw/{n}" for n in (BOXES, SCORES, LABELS, ORIG_SIZE)}
    for node in g.node:
        node.input[:] = [clash.get(n, n) for n in node.input]
        node.output[:] = [clash.get(n, n) for n in node.output]
    for value in list(g.output) + list(g.input) + list(g.value_info):
        value.name = clash.get(value.name, value.name)


def _static_rows(detector: Any) -> int:
    """Anchors / prior points of the detector's head (A)."""
    for attr in ("anchors", "priors", "points"):
        if hasattr(detector, attr):
            return int(len(getattr(detector, attr)))
    raise ValueError(f"detector {getattr(detector, 'name', '?')!r} exposes no anchors, priors or points")
