"""Export to MINDIR/ONNX: files reloaded and run equal the in-memory network; the check passes runtime noise
(no false alarm on large outputs) and catches small systematic bugs; a failing MINDIR leaves nothing behind, a failing
ONNX is recorded unless strict; the stage's exit codes, warnings and metrics."""
from __future__ import annotations

import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from msdet.export import exporter
from msdet.export.exporter import ExportError, ExportMismatch, export_model, load_exported
from msdet.export.verify import Detections, compare_detections, compare_raw
from tests.helpers import (
    POST,
    TOL,
    ExportToyDetector,
    ScaledBoxes,
    ShiftedInput,
    SwappedSides,
    write_params,
)


def check_images(n: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def toy():
    det = ExportToyDetector()
    return det, det.build_network()


def _in_memory(det, net, x):
    cell = det.inference_cell(net)
    cell.set_train(False)
    return [o.asnumpy() for o in cell(ms.Tensor(x))]


def _export(det, net, out, formats=("MINDIR",), n=3, **kwargs):
    kwargs.setdefault("latency_repeats", 1)
    return export_model(det, net, out, formats, check_inputs=check_images(n), tolerances=TOL, postprocess=POST,
                        **kwargs)


class Perturbed:
    """An exported file whose outputs are changed by ``change(outputs) -> outputs`` (only for ``formats``)."""

    def __init__(self, real, change, formats=("MINDIR", "ONNX")):
        self.real, self.change, self.formats = real, change, formats

    def __call__(self, path):
        model = self.real(path)
        if model.format in self.formats:
            run = model.run
            model.run = lambda x: tuple(self.change([np.array(o) for o in run(x)]))
        return model


@pytest.mark.detector
def test_round_trip_files_compute_what_the_network_does(toy, tmp_path):
    det, net = toy
    out = tmp_path / "export"
    report = _export(det, net, out, ("MINDIR", "ONNX"), latency_repeats=3, extra={"check_inputs": "random"})
    on_disk = json.loads((out / "export_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "model.mindir", "model.onnx"]
    assert report["input"]["shape"] == [1, 3, 32, 32]
    assert report["outputs"] == [{"name": "output_0", "shape": [1, 16, 4], "dtype": "float32"},
                                 {"name": "output_1", "shape": [1, 16, 3], "dtype": "float32"}]
    assert report["num_check_images"] == 3 and report["check_inputs"] == "random"
    assert report["tolerances"] == {"atol": 1e-4, "rtol": 1e-3, "box_atol_px": 0.25, "score_atol": 1e-4}
    assert report["strict"] is False and report["network_latency_ms"] > 0
    for fmt, name in (("MINDIR", "model.mindir"), ("ONNX", "model.onnx")):
        r = report["formats"][fmt]
        assert r["exported"] and r["file"] == name
        assert r["size_bytes"] == (out / name).stat().st_size > 0
        raw, decoded = r["check"]["raw"], r["check"]["decoded"]
        assert 0.0 <= raw["max_diff_over_scale"] <= 1e-5 and raw["worst_fraction_of_tolerance"] <= 1.0
        assert sorted(raw["outputs"]) == ["output_0", "output_1"] and raw["outputs"]["output_0"]["scale"] > 1.0
        assert decoded["detections"] == decoded["paired"] > 3 and decoded["borderline"] == 0
        assert decoded["max_box_diff_px"] <= 1e-3 and decoded["max_score_diff"] <= 1e-5
        assert r["latency_ms"] > 0
        assert r["inputs"][0]["shape"] == [1, 3, 32, 32]
        assert [o["shape"] for o in r["outputs"]] == [[1, 16, 4], [1, 16, 3]]
        # An independent check on an input the export never saw.
        x = check_images(1, seed=7)
        got = load_exported(out / name).run(x)
        for a, b in zip(_in_memory(det, net, x), got):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)
    assert load_exported(out / "model.mindir").input_size == 32


def _runtime_noise(outputs, seed=3):
    """Another runtime's float32 sums, as measured on a D0 ONNX export: box outputs off by up to 3e-5 of
    their scale, probabilities by their logits' error (up to 2.5e-4) through the sigmoid."""
    rng = np.random.default_rng(seed)
    dist, prob = outputs
    dist = dist + (3e-5 * np.abs(dist).max() * rng.uniform(-1, 1, dist.shape)).astype(np.float32)
    prob = prob + (prob * (1 - prob) * 2.5e-4 * rng.uniform(-1, 1, prob.shape)).astype(np.float32)
    return [dist, prob]


def _large(outputs):
    """Outputs like a D0 box tensor: reaching |31.6|, with small values beside the large ones."""
    dist, scores = outputs
    return [dist * np.float32(31.6 / np.abs(dist).max()), scores]


@pytest.mark.detector
def test_runtime_noise_on_large_outputs_passes(toy, tmp_path, monkeypatch):
    det, net = toy
    x = check_images(3)
    ref = [_large(_in_memory(det, net, x[i:i + 1])) for i in range(3)]
    got = [_runtime_noise(r, seed=i) for i, r in enumerate(ref)]
    # a per-element rule, |a - b| / max(1, |a|) <= 1e-4, calls this a failure
    old = max(float((np.abs(a - b) / np.maximum(1.0, np.abs(a))).max()) for r, g in zip(ref, got) for a, b in zip(r, g))
    assert old > 5e-4
    raw, problems = compare_raw(ref, got, ["dist", "scores"], TOL)
    assert problems == [] and 2e-5 < raw["outputs"]["dist"]["max_diff_over_scale"] <= 3e-5
    assert raw["outputs"]["dist"]["scale"] == pytest.approx(31.6, rel=1e-5)
    # through the export: the MINDIR "runtime" adds such noise, the file is kept
    monkeypatch.setattr(det, "decode", lambda outputs: ExportToyDetector.decode(det, _large(outputs)))
    monkeypatch.setattr(exporter, "load_exported", Perturbed(exporter.load_exported, _runtime_noise))
    report = _export(det, net, tmp_path / "export")
    check = report["formats"]["MINDIR"]["check"]
    assert report["formats"]["MINDIR"]["exported"] and 0.01 < check["raw"]["worst_fraction_of_tolerance"] <= 1.0
    assert check["decoded"]["detections"] == check["decoded"]["paired"] > 3
    assert check["decoded"]["max_box_diff_px"] < 0.01


@pytest.mark.detector
def test_mismatching_export_fails_and_leaves_nothing(toy, tmp_path, monkeypatch):
    det, net = toy
    real = exporter.load_exported
    monkeypatch.setattr(exporter, "load_exported", Perturbed(real, lambda o: [o[0], o[1] + 2e-3]))
    out = tmp_path / "export"
    with pytest.raises(ExportMismatch, match=r"model\.mindir: does not compute.*output 'output_1' differs by up "
                                             r"to 0\.002 at scale"):
        _export(det, net, out, n=2)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling

    # An earlier good export stays as it was.
    monkeypatch.setattr(exporter, "load_exported", real)
    _export(det, net, out, n=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(exporter, "load_exported", Perturbed(real, lambda o: [o[0], o[1] + 2e-3]))
    with pytest.raises(ExportMismatch):
        _export(det, net, out, n=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def export_variant(monkeypatch, variant):
    """Make the exporter write ``variant(inference cell)`` while verifying against the unchanged network."""
    real = exporter._write
    monkeypatch.setattr(exporter, "_write", lambda cell, *args: real(variant(cell), *args))


@pytest.mark.detector
@pytest.mark.parametrize("variant", [ShiftedInput, SwappedSides, ScaledBoxes])
def test_small_systematic_export_bugs_are_caught(toy, tmp_path, monkeypatch, variant):
    det, net = toy
    export_variant(monkeypatch, variant)
    with pytest.raises(ExportMismatch, match=r"model\.mindir: does not compute what the network does: "
                                             r"output 'output_0' differs"):
        _export(det, net, tmp_path / "export", n=2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.detector
def test_failing_secondary_format_is_recorded_unless_strict(toy, tmp_path, monkeypatch):
    det, net = toy
    monkeypatch.setattr(exporter, "load_exported",
                        Perturbed(exporter.load_exported, lambda o: [o[0] * 1.01, o[1]], formats=("ONNX",)))
    out = tmp_path / "export"
    report = _export(det, net, out, ("MINDIR", "ONNX"))
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "model.mindir"]
    assert report["formats"]["MINDIR"]["exported"]
    onnx = report["formats"]["ONNX"]
    assert onnx["exported"] is False and "output 'output_0' differs by up to" in onnx["reason"]
    assert onnx["check"]["raw"]["max_diff_over_scale"] == pytest.approx(0.01, rel=1e-3)
    assert onnx["check"]["decoded"]["max_box_diff_px"] > 0.01
    assert json.loads((out / "export_report.json").read_text())["formats"]["ONNX"]["reason"] == onnx["reason"]
    with pytest.raises(ExportMismatch, match=r"model\.onnx: does not compute"):
        _export(det, net, tmp_path / "strict", ("MINDIR", "ONNX"), strict=True)
    assert not (tmp_path / "strict").exists()


@pytest.mark.detector
def test_onnx_failure_is_recorded_unless_onnx_was_the_only_format(toy, tmp_path, monkeypatch):
    det, net = toy
    import mindspore.onnx

    def onnx_export_fails(*args, **kwargs):
        raise RuntimeError("Can not find key Foo in convert map.\n----\nC++ trace")

    monkeypatch.setattr(mindspore.onnx, "export", onnx_export_fails)
    out = tmp_path / "export"
    report = _export(det, net, out, ("MINDIR", "ONNX"), n=1)
    assert report["formats"]["ONNX"] == {"exported": False,
                                         "reason": "RuntimeError: Can not find key Foo in convert map."}
    assert report["formats"]["MINDIR"]["exported"]
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "model.mindir"]
    with pytest.raises(ExportError, match="ONNX export failed.*convert map"):
        _export(det, net, tmp_path / "onnx_only", ("onnx",), n=1)
    assert not (tmp_path / "onnx_only").exists()


@pytest.mark.detector
def test_bad_arguments_are_named(toy, tmp_path):
    det, net = toy
    with pytest.raises(ExportError, match=r"check_inputs must be float32 \[N, 3, 32, 32\]"):
        export_model(det, net, tmp_path / "x", check_inputs=check_images(size=64), tolerances=TOL, postprocess=POST)
    with pytest.raises(ExportError, match="unknown export format 'TFLITE'"):
        _export(det, net, tmp_path / "x", ("tflite",))
    with pytest.raises(ExportError, match="not found"):
        load_exported(tmp_path / "missing.mindir")
    (tmp_path / "junk.mindir").write_bytes(b"\x00not a model")
    with pytest.raises(ExportError, match="junk.mindir"):
        load_exported(tmp_path / "junk.mindir")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------------
# the two comparisons on hand-made numbers


def test_raw_tolerance_is_relative_to_each_tensors_scale():
    ref = [(np.array([31.6, -0.165], np.float32), np.array([0.5, 0.01], np.float32))]
    small_next_to_large = [(np.array([31.6, -0.1658], np.float32), ref[0][1])]
    raw, problems = compare_raw(ref, small_next_to_large, ["box", "score"], TOL)
    assert problems == []
    assert raw["outputs"]["box"]["max_abs_diff"] == pytest.approx(8e-4, rel=1e-3)
    assert raw["max_diff_over_scale"] == pytest.approx(8e-4 / 31.6, rel=1e-3)
    assert raw["worst_fraction_of_tolerance"] == pytest.approx(8e-4 / (1e-4 + 1e-3 * 31.6), rel=1e-3)
    # the other tensor has its own scale (0.5): 1e-3 there is beyond 1e-4 + 1e-3 * 0.5
    _, problems = compare_raw(ref, [(ref[0][0], np.array([0.5, 0.011], np.float32))], ["box", "score"], TOL)
    assert len(problems) == 1 and problems[0].startswith("output 'score' differs by up to 0.001 at scale 0.5")
    _, problems = compare_raw(ref, [(ref[0][0][:1], ref[0][1])], ["box", "score"], TOL)
    assert problems == ["output 'box' has shape (1,), the network's (2,) (check image 0)"]
    _, problems = compare_raw(ref, [(ref[0][0], np.array([np.nan, 0.01], np.float32))], ["box", "score"], TOL)
    assert "inf/NaN" in problems[0]


def _dets(boxes, scores, labels, cuts=(0.05,)):
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                      np.array(labels, np.int64), tuple(cuts))


REF = _dets([[10, 10, 50, 50], [60, 60, 100, 90], [12, 8, 48, 52]], [0.9, 0.6, 0.3], [0, 1, 2])


def test_decoded_detections_equal_within_tolerance_pass():
    got = _dets(REF.boxes + 0.01, REF.scores + 5e-5, REF.labels)
    stats, problems = compare_detections(REF, got, POST, TOL)
    assert problems == []
    assert stats == {"detections": 3, "paired": 3, "borderline": 0, "max_box_diff_px": pytest.approx(0.01, abs=1e-5),
                     "max_score_diff": pytest.approx(5e-5, abs=1e-6)}


@pytest.mark.parametrize("change, message", [
    (lambda b, s, c: (b + np.float32([0.5, 0, 0, 0]), s, c), "has no counterpart within 0.25 px (nearest "
                                                              "same-class box 0.5 px away)"),
    (lambda b, s, c: (b, s - np.float32([0, 2e-3, 0]), c), "paired scores differ by up to 0.002"),
    (lambda b, s, c: (b, s, np.array([0, 1, 0])), "the network's detection class 2 score 0.3000"),
    (lambda b, s, c: (b[:2], s[:2], c[:2]), "the network's detection class 2 score 0.3000 box [12.0, 8.0, 48.0, "
                                            "52.0] has no counterpart"),
    (lambda b, s, c: (b + np.float32([40, 0, 40, 0]), s, c), "no counterpart"),
])
def test_decoded_mismatches_are_named(change, message):
    got = _dets(*change(REF.boxes.copy(), REF.scores.copy(), REF.labels.copy()))
    _, problems = compare_detections(REF, got, POST, TOL)
    assert any(message in p for p in problems), problems


def test_detections_on_a_decision_boundary_may_flip():
    # a score at the threshold (0.05): kept by one runtime, not by the other
    ref = _dets(np.vstack([REF.boxes, [[0, 0, 20, 20]]]), np.append(REF.scores, 0.05005), np.append(REF.labels, 1))
    stats, problems = compare_detections(ref, REF, POST, TOL)
    assert problems == [] and stats["borderline"] == 1 and stats["paired"] == 3
    # an overlap at the NMS threshold (0.5): suppressed on one side only
    iou_half = np.float32([[10, 10, 50, 50]]) + np.float32([[0, 40 / 3, 0, 40 / 3]])  # IoU 0.5, REF's class 0 box
    ref = _dets(np.vstack([REF.boxes, iou_half]), np.append(REF.scores, 0.8), np.append(REF.labels, 0))
    stats, problems = compare_detections(ref, REF, POST, TOL)
    assert problems == [] and stats["borderline"] == 1
    # two overlapping boxes with tied scores: NMS keeps either, depending on the last bits
    twin = np.float32([[14, 10, 54, 50]])  # IoU 0.82 with REF's first box, score 0.9 + 5e-5
    ref = _dets(np.vstack([twin, REF.boxes[1:]]), np.append(np.float32([0.90005]), REF.scores[1:]), REF.labels)
    stats, problems = compare_detections(ref, REF, POST, TOL)
    assert problems == [] and stats["borderline"] == 2 and stats["paired"] == 2
    # the same detection clearly below the NMS threshold is a real difference
    apart = np.float32([[10, 10, 50, 50]]) + np.float32([[0, 25, 0, 25]])
    ref = _dets(np.vstack([REF.boxes, apart]), np.append(REF.scores, 0.8), np.append(REF.labels, 0))
    _, problems = compare_detections(ref, REF, POST, TOL)
    assert len(problems) == 1 and "class 0 score 0.8000" in problems[0]


# ------------------------------------------------------------------------------------------------------
# the stage: exit codes, warnings and metrics (the toy detector stands in for D0)


@pytest.fixture
def toy_stage(tmp_path, monkeypatch, toy):
    import msdet.detectors
    from msdet.engine.checkpoint import save_weights

    det, net = toy
    monkeypatch.setattr(msdet.detectors, "get_detector", lambda model, cfg, num_classes: det)
    monkeypatch.chdir(tmp_path)  # no MindRecord here: deterministic random check inputs
    save_weights(tmp_path / "toy.ckpt", net, {"model": "d0"})
    write_params("params.yaml", {"export": {"num_check_images": 2, "latency_repeats": 1}})
    return ["--model", "d0", "--ckpt", "toy.ckpt", "--num-classes", "3", "--out", "export", "--metrics", "m.json"]


@pytest.mark.detector
def test_stage_warns_about_a_failing_onnx_and_exits_0(toy_stage, tmp_path, monkeypatch, capsys):
    from stages import export as export_stage

    monkeypatch.setattr(exporter, "load_exported",
                        Perturbed(exporter.load_exported, lambda o: [o[0], o[1] + 0.01], formats=("ONNX",)))
    assert export_stage.main(toy_stage) == 0
    out, err = capsys.readouterr()
    assert "warning: [d0] ONNX not written: does not compute what the network does: output 'output_1'" in err
    assert "[d0] MINDIR:" in out and "checked on 2 deterministic random inputs" in out
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["export_report.json", "model.mindir"]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["onnx"]["exported"] is False and metrics["onnx"]["reason"].startswith("does not compute")
    assert metrics["onnx"]["raw"]["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)
    assert metrics["onnx"]["decoded"]["max_score_diff"] == pytest.approx(0.01, rel=1e-3)
    assert metrics["mindir"]["exported"] is True and metrics["mindir"]["raw"]["worst_fraction_of_tolerance"] <= 1
    assert metrics["mindir"]["decoded"]["paired"] == metrics["mindir"]["decoded"]["detections"] > 0
    # strict: the same failure fails the stage, one line, nothing written
    write_params("params.yaml", {"export": {"num_check_images": 2, "latency_repeats": 1, "strict": True}})
    argv = toy_stage[:-4] + ["--out", "strict", "--metrics", "strict.json"]
    assert export_stage.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: strict/model.onnx: does not compute what the network does") and "\n" not in err
    assert not (tmp_path / "strict").exists() and not (tmp_path / "strict.json").exists()


@pytest.mark.detector
def test_stage_fails_on_a_failing_mindir_and_on_missing_params(toy_stage, tmp_path, monkeypatch, capsys):
    from stages import export as export_stage

    export_variant(monkeypatch, ShiftedInput)
    assert export_stage.main(toy_stage) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: export/model.mindir: does not compute what the network does") and "\n" not in err
    assert not (tmp_path / "export").exists() and not (tmp_path / "m.json").exists()
    assert export_stage.main(toy_stage + ["--params", "absent.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "error: absent.yaml: params file not found"


@pytest.mark.detector
def test_export_and_its_references_run_on_cpu_whatever_device_trained(toy_stage, monkeypatch, capsys):
    """A model trained on Ascend is exported, and checked under strict tolerances, against CPU float32
    references (Ascend's own forward runs float16 cube convolutions); the device itself is not needed."""
    import msdet.engine.runtime as runtime
    from stages import export as export_stage

    targets, setup = [], runtime.setup_runtime
    monkeypatch.setattr(runtime, "setup_runtime", lambda cfg: targets.append(cfg.device_target) or setup(cfg))
    write_params("params.yaml", {"runtime": {"device_target": "Ascend"},
                                 "export": {"num_check_images": 2, "latency_repeats": 1, "strict": True}})
    assert export_stage.main(toy_stage) == 0, capsys.readouterr().err
    assert targets == ["CPU"] and ms.get_context("device_target") == "CPU"


# ------------------------------------------------------------------------------------------------------
# the real EfficientDet-D0 at 128 with random weights, through the standalone export tool


@pytest.mark.detector
@pytest.mark.slow
def test_d0_standalone_export_round_trip(tmp_path, monkeypatch, capsys):
    import dataclasses

    from msdet.config import load_params
    from msdet.detectors import get_detector
    from msdet.engine.checkpoint import save_weights
    from stages import export as export_stage

    params_file = str(Path(__file__).resolve().parents[1] / "params.yaml")
    monkeypatch.chdir(tmp_path)  # no data/mindrecord here: random check inputs
    det = get_detector("d0", dataclasses.replace(load_params(params_file).d0, input_size=128), 3)
    save_weights(tmp_path / "d0.ckpt", det.build_network(), {"model": "d0"})
    argv = ["--model", "d0", "--ckpt", "d0.ckpt", "--input-size", "128", "--num-classes", "3", "--out", "export",
            "--metrics", "metrics.json", "--params", params_file]
    assert export_stage.main(argv) == 0
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())
    assert report["check_inputs"].startswith("4 deterministic random inputs (no val split")
    assert report["checkpoint"] == "d0.ckpt" and report["input_size"] == 128 and report["num_classes"] == 3
    anchors = 9 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1)
    assert [o["shape"] for o in report["outputs"]] == [[1, anchors, 4], [1, anchors, 3]]
    assert report["postprocess"] == {"score_threshold": 0.05, "iou_threshold": 0.5, "max_detections": 100,
                                     "pre_nms_top_k": 1000}
    mindir = report["formats"]["MINDIR"]
    assert mindir["exported"] and mindir["check"]["raw"]["worst_fraction_of_tolerance"] <= 1.0
    onnx = report["formats"]["ONNX"]
    assert (onnx["exported"] and onnx["check"]["raw"]["worst_fraction_of_tolerance"] <= 1.0) or onnx["reason"]
    assert (tmp_path / "export" / "model.onnx").exists() == onnx["exported"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mindir"]["size_mb"] == round(mindir["size_bytes"] / 2**20, 3)
    assert metrics["mindir"]["raw"]["max_diff_over_scale"] == mindir["check"]["raw"]["max_diff_over_scale"]
    assert metrics["mindir"]["decoded"] == mindir["check"]["decoded"]
    assert metrics["network_latency_ms"] == report["network_latency_ms"] > 0
    out = capsys.readouterr().out
    assert "[d0] MINDIR:" in out and "checked on 4 deterministic random inputs" in out
    # The same checkpoint does not fit NanoDet: a clear error, nothing written.
    assert export_stage.main(["--model", "nanodet", "--ckpt", "d0.ckpt", "--input-size", "128", "--num-classes",
                              "3", "--out", "nd", "--params", params_file]) == 2
    assert "d0.ckpt does not fit model 'nanodet'" in capsys.readouterr().err
    assert not (tmp_path / "nd").exists()
