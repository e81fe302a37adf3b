"""Export to MINDIR/ONNX: files reloaded and run equal the in-memory network, mismatches and failures leave
nothing behind, the report holds the measured numbers; round trips of the real detectors at a small size."""
from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from msdet.export import exporter
from msdet.export.exporter import ExportError, ExportMismatch, export_model, load_exported

ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("CPU")

TOY_STRIDE = 8


class ToyNet(nn.Cell):
    """Three stride-2 convs and a 1x1 head giving 4 distances + C logits per cell; ``aux`` is training-only."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.SequentialCell(
            nn.Conv2d(3, width, 3, stride=2, has_bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, has_bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, has_bias=True), nn.ReLU())
        self.head = nn.Conv2d(width, 4 + num_classes, 1, has_bias=True)
        self.aux = nn.Conv2d(width, 4, 1, has_bias=True)

    def construct(self, image):
        feat = self.stem(image)
        return self.head(feat), self.aux(feat)


class ToyInference(nn.Cell):
    """image -> (distances [B, A, 4] in input pixels, class probabilities [B, A, C])."""

    def __init__(self, net: ToyNet) -> None:
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, image):
        out = self.net.head(self.net.stem(image))
        b, c = out.shape[0], out.shape[1]
        out = ops.reshape(ops.transpose(out, (0, 2, 3, 1)), (b, -1, c))
        return ops.relu(out[:, :, :4]) * TOY_STRIDE, ops.sigmoid(out[:, :, 4:])


class ToyDetector:
    """A tiny anchor-free detector implementing the parts of the Detector interface export/infer use."""

    loss_names = ("loss",)
    architecture = "toy"
    training_only_prefixes = ("aux.",)

    def __init__(self, input_size: int = 32, num_classes: int = 3, width: int = 8, name: str = "toy") -> None:
        self.name = name
        self.input_size = input_size
        self.num_classes = num_classes
        self.width = width
        g = input_size // TOY_STRIDE
        ys, xs = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
        self.points = ((np.stack([xs, ys], -1).reshape(-1, 2) + 0.5) * TOY_STRIDE).astype(np.float32)

    def build_network(self) -> ToyNet:
        net = ToyNet(self.num_classes, self.width)
        rng = np.random.default_rng(1)
        for p in net.get_parameters():  # deterministic weights with some spread in the outputs
            value = rng.normal(0.0, 0.3, p.shape)
            if "moving_variance" in p.name:
                value = np.abs(value) + 0.5
            p.set_data(ms.Tensor(value.astype(np.float32)))
        return net

    def inference_cell(self, network: ToyNet) -> ToyInference:
        return ToyInference(network)

    def decode(self, outputs):
        dist, scores = (np.asarray(o) for o in outputs[:2])
        if dist.shape[1] != len(self.points):
            raise ValueError(f"toy decode: {dist.shape[1]} points, expected {len(self.points)}")
        p = self.points[None]
        boxes = np.concatenate([p - dist[..., :2], p + dist[..., 2:]], -1)
        return np.clip(boxes, 0, self.input_size).astype(np.float32), scores.astype(np.float32)


def toy_preprocess(size: int):
    """Stretch to size x size, BGR scaled to [0, 1]: scale (sx, sy) = (S / w, S / h)."""
    import cv2

    def preprocess(image):
        h, w = image.shape[:2]
        x = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        return x.transpose(2, 0, 1), np.array([size / w, size / h], np.float32)

    return preprocess


def check_images(n: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def toy():
    det = ToyDetector()
    return det, det.build_network()


def _in_memory(det, net, x):
    cell = det.inference_cell(net)
    cell.set_train(False)
    return [o.asnumpy() for o in cell(ms.Tensor(x))]


def test_round_trip_files_compute_what_the_network_does(toy, tmp_path):
    det, net = toy
    out = tmp_path / "export"
    report = export_model(det, net, out, ("MINDIR", "ONNX"), check_inputs=check_images(), tolerance=1e-4,
                          latency_repeats=3, extra={"check_inputs": "random"})
    on_disk = json.loads((out / "export_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "model.mindir", "model.onnx"]
    assert report["input"]["shape"] == [1, 3, 32, 32]
    assert report["outputs"] == [{"name": "output_0", "shape": [1, 16, 4], "dtype": "float32"},
                                 {"name": "output_1", "shape": [1, 16, 3], "dtype": "float32"}]
    assert report["num_check_images"] == 3 and report["check_inputs"] == "random"
    assert report["network_latency_ms"] > 0
    for fmt, name in (("MINDIR", "model.mindir"), ("ONNX", "model.onnx")):
        r = report["formats"][fmt]
        assert r["exported"] and r["file"] == name
        assert r["size_bytes"] == (out / name).stat().st_size > 0
        assert 0.0 <= r["max_scaled_diff"] <= 1e-4
        assert r["latency_ms"] > 0
        assert r["inputs"][0]["shape"] == [1, 3, 32, 32]
        assert [o["shape"] for o in r["outputs"]] == [[1, 16, 4], [1, 16, 3]]
        # An independent check on an input the export never saw.
        x = check_images(1, seed=7)
        got = load_exported(out / name).run(x)
        for a, b in zip(_in_memory(det, net, x), got):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)
    assert load_exported(out / "model.mindir").input_size == 32


def test_mismatching_export_fails_and_leaves_nothing(toy, tmp_path, monkeypatch):
    det, net = toy
    real = exporter.load_exported

    class Perturbed:
        def __init__(self, path):
            self.model = real(path)
            self.input_names, self.input_shapes = self.model.input_names, self.model.input_shapes

        def run(self, x):
            dist, scores = self.model.run(x)
            return dist, scores + 2e-3

    monkeypatch.setattr(exporter, "load_exported", Perturbed)
    out = tmp_path / "export"
    with pytest.raises(ExportMismatch, match=r"model\.mindir.*up to 0\.002"):
        export_model(det, net, out, ("MINDIR",), check_inputs=check_images(2), tolerance=1e-4, latency_repeats=1)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling

    # An earlier good export stays as it was.
    monkeypatch.setattr(exporter, "load_exported", real)
    export_model(det, net, out, ("MINDIR",), check_inputs=check_images(1), latency_repeats=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(exporter, "load_exported", Perturbed)
    with pytest.raises(ExportMismatch):
        export_model(det, net, out, ("MINDIR",), check_inputs=check_images(1), latency_repeats=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_onnx_failure_is_recorded_unless_onnx_was_the_only_format(toy, tmp_path, monkeypatch):
    det, net = toy
    import mindspore.onnx

    def onnx_export_fails(*args, **kwargs):
        raise RuntimeError("Can not find key Foo in convert map.\n----\nC++ trace")

    monkeypatch.setattr(mindspore.onnx, "export", onnx_export_fails)
    out = tmp_path / "export"
    report = export_model(det, net, out, ("MINDIR", "ONNX"), check_inputs=check_images(1), latency_repeats=1)
    assert report["formats"]["ONNX"] == {"exported": False,
                                         "reason": "RuntimeError: Can not find key Foo in convert map."}
    assert report["formats"]["MINDIR"]["exported"]
    assert sorted(p.name for p in out.iterdir()) == ["export_report.json", "model.mindir"]
    with pytest.raises(ExportError, match="ONNX export failed.*convert map"):
        export_model(det, net, tmp_path / "onnx_only", ("onnx",), check_inputs=check_images(1), latency_repeats=1)
    assert not (tmp_path / "onnx_only").exists()


def test_bad_arguments_are_named(toy, tmp_path):
    det, net = toy
    with pytest.raises(ExportError, match=r"check_inputs must be float32 \[N, 3, 32, 32\]"):
        export_model(det, net, tmp_path / "x", check_inputs=check_images(size=64))
    with pytest.raises(ExportError, match="unknown export format 'TFLITE'"):
        export_model(det, net, tmp_path / "x", ("tflite",), check_inputs=check_images())
    with pytest.raises(ExportError, match="not found"):
        load_exported(tmp_path / "missing.mindir")
    (tmp_path / "junk.mindir").write_bytes(b"\x00not a model")
    with pytest.raises(ExportError, match="junk.mindir"):
        load_exported(tmp_path / "junk.mindir")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------------
# the real EfficientDet-D0 at 128 with random weights, through the standalone export tool


def test_d0_standalone_export_round_trip(tmp_path, monkeypatch, capsys):
    import dataclasses

    from msdet.config import Params
    from msdet.detectors import get_detector
    from msdet.engine.checkpoint import save_weights
    from stages import export as export_stage

    monkeypatch.chdir(tmp_path)  # no params.yaml, no data/mindrecord: defaults and random check inputs
    det = get_detector("d0", dataclasses.replace(Params().d0, input_size=128), 3)
    save_weights(tmp_path / "d0.ckpt", det.build_network(), {"model": "d0"})
    argv = ["--model", "d0", "--ckpt", "d0.ckpt", "--input-size", "128", "--num-classes", "3", "--out", "export",
            "--metrics", "metrics.json"]
    assert export_stage.main(argv) == 0
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())
    assert report["check_inputs"].startswith("4 deterministic random inputs (no val split")
    assert report["checkpoint"] == "d0.ckpt" and report["input_size"] == 128 and report["num_classes"] == 3
    anchors = 9 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1)
    assert [o["shape"] for o in report["outputs"]] == [[1, anchors, 4], [1, anchors, 3]]
    mindir = report["formats"]["MINDIR"]
    assert mindir["exported"] and mindir["max_scaled_diff"] <= 1e-4
    onnx = report["formats"]["ONNX"]
    assert (onnx["exported"] and onnx["max_scaled_diff"] <= 1e-4) or onnx["reason"]
    assert (tmp_path / "export" / "model.onnx").exists() == onnx["exported"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mindir"]["size_mb"] == round(mindir["size_bytes"] / 2**20, 3)
    assert metrics["mindir"]["max_scaled_diff"] == mindir["max_scaled_diff"]
    assert metrics["network_latency_ms"] == report["network_latency_ms"] > 0
    out = capsys.readouterr().out
    assert "[d0] MINDIR:" in out and "checked on 4 deterministic random inputs" in out
    # The same checkpoint does not fit NanoDet: a clear error, nothing written.
    assert export_stage.main(["--model", "nanodet", "--ckpt", "d0.ckpt", "--input-size", "128", "--num-classes",
                              "3", "--out", "nd"]) == 2
    assert "d0.ckpt does not fit model 'nanodet'" in capsys.readouterr().err
    assert not (tmp_path / "nd").exists()


def test_difference_is_absolute_below_one_and_relative_above(tmp_path):
    from msdet.export.exporter import _max_scaled_diff

    ref = (np.array([100.0, 0.5], np.float32),)
    assert _max_scaled_diff(tmp_path, ref, (np.array([100.005, 0.5], np.float32),), 0) == pytest.approx(5e-5, rel=1e-2)
    assert _max_scaled_diff(tmp_path, ref, (np.array([100.0, 0.5005], np.float32),), 0) == pytest.approx(5e-4, rel=1e-2)
