"""End-to-end ONNX exports: the appended post-processing graph equals msdet's post-processing (decoding of
both detectors, threshold, top-k, class-wise NMS, mapping back to the original image), the preprocessing
spec and the framework-free example reproduce the eval transforms, and on a tiny trained pipeline the
example reproduces the export stage's own verified detections."""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from msdet.evaluation.postprocess import select_detections  # noqa: E402
from msdet.export.end_to_end import PREPROCESS  # noqa: E402
from msdet.export.graph import DECODERS, Selection, _distances_to_boxes, append_postprocess  # noqa: E402
from tests.helpers import ROOT, run, throwaway_repo  # noqa: E402

EXAMPLE = ROOT / "examples" / "onnx_detect.py"
SEL = Selection(score_threshold=0.05, iou_threshold=0.5, max_detections=10, pre_nms_top_k=20)


class Points:
    """A head of prior points predicting distances in pixels (the post-processing's simplest decoder)."""

    name, input_size, num_classes = "points", 32, 3

    def __init__(self) -> None:
        ys, xs = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
        self.points = ((np.stack([xs, ys], -1).reshape(-1, 2) + 0.5) * 8).astype(np.float32)

    def decode(self, raw):
        dist, scores = raw[0][0], raw[1][0]
        p = self.points
        return np.clip(np.concatenate([p - dist[:, :2], p + dist[:, 2:]], -1), 0, self.input_size), scores


def _decode_points(b, outputs, det):
    return (_distances_to_boxes(b, det.points, b.reshape(outputs[0], [-1, 4]), det.input_size),
            b.reshape(outputs[1], [len(det.points), det.num_classes]))


def fake_raw(splits: list[int]) -> onnx.ModelProto:
    """A "network" whose input [1, A, sum(splits)] is cut along the last axis into its raw outputs, so the
    post-processing can be fed any raw values."""
    nodes, inits, outs, start = [], [numpy_helper.from_array(np.array([2], np.int64), "axis")], [], 0
    for k, width in enumerate(splits):
        inits += [numpy_helper.from_array(np.array([start], np.int64), f"s{k}"),
                  numpy_helper.from_array(np.array([start + width], np.int64), f"e{k}")]
        nodes.append(helper.make_node("Slice", ["image", f"s{k}", f"e{k}", "axis"], [f"out{k}"]))
        outs.append(helper.make_tensor_value_info(f"out{k}", TensorProto.FLOAT, None))
        start += width
    graph = helper.make_graph(nodes, "raw", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                           [1, None, start])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _scale(mode: str, size: int, h: int, w: int) -> np.ndarray:
    return np.array([size / max(h, w)] * 2 if mode == "letterbox" else [size / w, size / h], np.float32)


def _assert_same(session, x, det, sel, mode, h, w, case):
    boxes, scores, labels = session.run(None, {"image": x, "orig_size": np.array([[h, w]], np.float32)})
    ref_boxes, ref_scores = det.decode([x[..., :4], x[..., 4:]])
    rb, rs, rl = select_detections(ref_boxes, ref_scores, _scale(mode, det.input_size, h, w),
                                   np.array([h, w], np.float32), **dataclasses.asdict(sel))
    assert len(scores) == len(rs), f"{case}: {len(scores)} detections, msdet {len(rs)}"
    np.testing.assert_array_equal(labels, rl, err_msg=case)
    np.testing.assert_array_equal(scores, rs, err_msg=case)
    np.testing.assert_allclose(boxes, rb, atol=1e-4 * max(h, w), err_msg=case)
    return len(rs)


@pytest.mark.parametrize("mode", ["letterbox", "stretch"])
def test_postprocess_graph_equals_msdet_postprocessing(monkeypatch, mode):
    """Ties (scores on a 0.1 grid, some at the threshold), the top-k and max-detections cuts, boxes without
    area after clipping (letterbox: in the padding), many image shapes: counts, labels and scores exact,
    boxes to float32."""
    monkeypatch.setitem(DECODERS, "points", _decode_points)
    det = Points()
    session = _session(append_postprocess(fake_raw([4, 3]), det, SEL, mode))
    rng = np.random.default_rng(0)
    counts = []
    for case in range(150):
        dist = np.maximum(rng.normal(4, 4, (1, 16, 4)), 0)
        scores = np.round(rng.random((1, 16, 3)) * 10) / 10 * (rng.random((1, 16, 3)) < rng.uniform(0.02, 1))
        if case % 10 == 0:  # every score at or below the threshold
            scores = scores * SEL.score_threshold
        x = np.concatenate([dist, scores], -1).astype(np.float32)
        h, w = (int(v) for v in rng.integers(8, 400, 2))
        counts.append(_assert_same(session, x, det, SEL, mode, h, w, f"case {case} ({h}x{w})"))
    assert min(counts) == 0 and max(counts) == SEL.max_detections and len(set(counts)) > 5


def test_thresholds_are_baked_in_and_recorded(monkeypatch):
    monkeypatch.setitem(DECODERS, "points", _decode_points)
    model = append_postprocess(fake_raw([4, 3]), Points(), SEL, "stretch")
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta == {"score_threshold": "0.05", "iou_threshold": "0.5", "max_detections": "10",
                    "pre_nms_top_k": "20", "nms": "class-wise", "resize": "stretch", "input_size": "32"}
    assert [i.name for i in model.graph.input] == ["image", "orig_size"]
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels"]
    with pytest.raises(ValueError, match="no ONNX decoding for detector 'other'"):
        append_postprocess(fake_raw([4, 3]), type("D", (), {"name": "other"})(), SEL, "stretch")


@pytest.mark.parametrize("model", ["d0", "nanodet"])
def test_decoding_graphs_equal_the_detectors_decode(model):
    """The D0 box coder over its anchors and NanoDet's distribution integral over its priors, with raw
    values spread like a trained head's (a detector built, no network)."""
    from msdet.config import load_params
    from msdet.detectors import get_detector

    cfg = dataclasses.replace(getattr(load_params(ROOT / "params.yaml"), model), input_size=128)
    det = get_detector(model, cfg, 4)
    rng = np.random.default_rng(1)
    rows = len(det.anchors) if model == "d0" else len(det.priors)
    if model == "d0":
        splits = [4, 4]
        x = np.concatenate([rng.normal(0, 0.5, (1, rows, 4)), rng.beta(0.3, 3, (1, rows, 4))], -1)
    else:
        splits = [4 + 4 * (det.reg_max + 1)]
        x = np.concatenate([rng.beta(0.3, 3, (1, rows, 4)), rng.normal(0, 2, (1, rows, 4 * (det.reg_max + 1)))], -1)
    x = x.astype(np.float32)
    sel = Selection(score_threshold=0.05, iou_threshold=0.5, max_detections=100, pre_nms_top_k=1000)
    mode = PREPROCESS[model]["resize"]
    session = _session(append_postprocess(fake_raw(splits), det, sel, mode))
    boxes, scores, labels = session.run(None, {"image": x, "orig_size": np.array([[90, 160]], np.float32)})
    raw = [x[..., :4], x[..., 4:]] if model == "d0" else [x]
    ref_boxes, ref_scores = det.decode(raw)
    rb, rs, rl = select_detections(ref_boxes[0], ref_scores[0], _scale(mode, 128, 90, 160),
                                   np.array([90, 160], np.float32), **dataclasses.asdict(sel))
    assert len(rs) == sel.max_detections and len(scores) == len(rs)
    np.testing.assert_array_equal(labels, rl)
    np.testing.assert_allclose(scores, rs, atol=1e-6)
    np.testing.assert_allclose(boxes, rb, atol=1e-3)


# ------------------------------------------------------------------------------------------------------
# the preprocessing spec and the framework-free example


def _example_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("onnx_detect", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model", ["d0", "nanodet"])
def test_example_preprocessing_is_the_eval_transform_bit_for_bit(model):
    from msdet.data import transforms as T
    from msdet.export.end_to_end import preprocess_spec
    from msdet.export.verify import Postprocess

    spec = json.loads(json.dumps(preprocess_spec(model, 128, ["image", "orig_size"], Postprocess(0.05, 0.5, 100, 1000),
                                                 ["a"], [1], {})))
    example = _example_module()
    rng = np.random.default_rng(3)
    for h, w in ((97, 203), (300, 41), (128, 128), (64, 500)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = (T.d0_eval if model == "d0" else T.nanodet_eval)(image, 128).image
        np.testing.assert_array_equal(example.preprocess(image, spec)[0], want, err_msg=f"{model} {h}x{w}")


def test_example_imports_only_numpy_opencv_and_onnxruntime():
    import ast

    tree = ast.parse(EXAMPLE.read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert modules - {"__future__", "argparse", "json", "sys", "pathlib"} == {"cv2", "numpy", "onnxruntime"}


# ------------------------------------------------------------------------------------------------------
# a tiny trained pipeline: the stage's verified outputs, and the example reproducing them


TINY = {
    "data": {"synthetic": {"num_train": 24, "num_val": 8, "image_size": 128, "max_objects": 4}},
    "mindrecord": {"train_shards": 1},
    "nanodet": {"input_size": 128, "train": {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 3,
                                              "warmup_steps": 1, "num_workers": 1, "max_gt_boxes": 8,
                                              "bn_recalibration_batches": 2}},
    "eval": {"batch_size": 4, "score_threshold": 0.005},  # a 3-step model scores low: detections to compare
    "export": {"num_check_images": 1, "latency_repeats": 2, "end_to_end_mindir": True, "int8": True,
               "int8_calibration_images": 4},
}


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    repo, env = throwaway_repo(tmp_path_factory.mktemp("deploy") / "repo", TINY)
    run(["dvc", "repro", "export_nanodet"], repo, env)
    return repo, env


@pytest.mark.slow
def test_stage_records_the_ap_table_and_the_example_reproduces_its_detections(tiny_export, tmp_path):
    repo, env = tiny_export
    export = repo / "models" / "nanodet" / "export"
    assert {p.name for p in export.iterdir()} == {
        "model.mindir", "model.onnx", "model_e2e.onnx", "model_e2e.mindir", "model_e2e_int8.onnx", "preprocess.json",
        "val_detections.json", "export_report.json"}
    metrics = json.loads((repo / "metrics" / "export_nanodet.json").read_text())
    table = metrics["ap_table"]
    assert abs(table["end_to_end"]["AP"] - table["float"]["AP"]) <= 0.001
    for key in ("end_to_end", "end_to_end_mindir"):
        check = metrics[key]["check"]
        assert check["images"] == 8 and check["count_mismatch_images"] == 0, key
        assert check["paired"] + check["borderline"] == check["detections"], key
    assert abs(table["end_to_end_mindir"]["AP"] - table["float"]["AP"]) <= 0.001
    assert table["end_to_end_mindir"]["file"] == "model_e2e.mindir"
    assert metrics["int8"]["AP_drop"] == pytest.approx(table["float"]["AP"] - table["int8"]["AP"], abs=1e-5)
    assert table["int8"]["size_mb"] < table["end_to_end"]["size_mb"] and table["int8"]["latency_ms"] > 0
    spec = json.loads((export / "preprocess.json").read_text())
    assert spec["resize"]["mode"] == "stretch" and spec["channel_order"] == "BGR"
    assert spec["thresholds"]["score_threshold"] == 0.005 and spec["thresholds"]["iou_threshold"] == 0.6

    # the example run with msdet and mindspore unimportable
    out = tmp_path / "drawn"
    argv = [str(export / "model_e2e.onnx"), str(repo / "data" / "coco" / "val"), str(out)]
    code = (f"import runpy, sys; sys.modules['msdet'] = sys.modules['mindspore'] = None; sys.argv = {['x'] + argv!r}; "
            f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')")
    run([sys.executable, "-c", code], tmp_path, env)
    got = {r["file_name"]: r for r in json.loads((out / "detections.json").read_text())["images"]}
    want = {r["file_name"]: r for r in json.loads((export / "val_detections.json").read_text())["images"]}
    assert set(got) == set(want) and len(want) == 8
    assert sum(len(r["scores"]) for r in want.values()) > 0
    for name, w in want.items():
        g = got[name]
        assert g["labels"] == w["labels"], name
        np.testing.assert_allclose(g["scores"], w["scores"], atol=1e-6, err_msg=name)
        np.testing.assert_allclose(np.reshape(g["boxes"], (-1, 4)), np.reshape(w["boxes"], (-1, 4)), atol=1e-3,
                                   err_msg=name)
    assert len(list(out.glob("*.png"))) == 8


def _assert_stage_fails_on(file_name: str, repo, monkeypatch, capsys) -> None:
    """The export stage, with a model broken by the caller's patch, fails in one line naming ``file_name``
    and leaves the previous export as it was."""
    from stages import export as export_stage

    export = repo / "models" / "nanodet" / "export"
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    monkeypatch.chdir(repo)
    assert export_stage.main(["--model", "nanodet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: export/{file_name}: its detections differ from msdet's post-processing") \
        and "\n" not in err, err
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before


@pytest.mark.slow
@pytest.mark.detector
def test_stage_fails_on_an_end_to_end_model_that_maps_boxes_wrongly(tiny_export, monkeypatch, capsys):
    """The graph without the rescale to original pixels."""
    from msdet.export import graph

    monkeypatch.setattr(graph, "_scale", lambda b, orig_size, size, resize: (
        b.const([1.0] * 4), b.op("Concat", [b.op("Gather", [b.reshape(orig_size, [2]), b.const([1, 0], np.int64)],
                                                 axis=0)] * 2, axis=0)))
    _assert_stage_fails_on("model_e2e.onnx", tiny_export[0], monkeypatch, capsys)


@pytest.mark.slow
@pytest.mark.detector
def test_stage_fails_on_an_end_to_end_mindir_that_maps_boxes_wrongly(tiny_export, monkeypatch, capsys):
    """The MINDIR cell with a wrong preprocessing scale."""
    from msdet.export import mindir_graph

    init = mindir_graph.EndToEndCell.__init__

    def wrong_scale(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.size *= 2.0

    monkeypatch.setattr(mindir_graph.EndToEndCell, "__init__", wrong_scale)
    _assert_stage_fails_on("model_e2e.mindir", tiny_export[0], monkeypatch, capsys)
