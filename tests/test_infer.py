"""Inference on image files: detections mapped back to original pixels with the documented JSON fields, drawn
images, the same detections from a checkpoint and from its exported MINDIR, and clear errors for bad input."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import mindspore as ms
import numpy as np
import pytest

from msdet.detectors import get_detector
from msdet.engine.checkpoint import CheckpointError, save_weights
from msdet.export.exporter import export_model
from msdet.inference import (
    ClassNames,
    InferenceError,
    Predictor,
    eval_preprocess,
    list_images,
    load_network,
    network_forward,
    run_inference,
)
from stages import infer as infer_stage
from tests.helpers import POST, ROOT, TOL, ExportToyDetector, config, toy_preprocess

ms.set_device("CPU")

META = {"num_classes": 3, "categories": [{"id": 7, "name": "circle"}, {"id": 11, "name": "square"},
                                         {"id": 42, "name": "triangle"}]}
FIELDS = {"box", "score", "class_index", "category_id", "class_name"}


def write_images(folder: Path, sizes=((40, 56), (64, 48))) -> list[Path]:
    """Deterministic textured images of the given (h, w) with a bright rectangle in each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate(sizes):
        img = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
        img[h // 4: 3 * h // 4, w // 5: w // 2] = (40, 200, 230)
        path = folder / f"img{i}.{'jpg' if i % 2 == 0 else 'png'}"
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def toy():
    det = ExportToyDetector(input_size=32, num_classes=3)
    net = det.build_network()
    return det, net


@pytest.mark.detector
def test_detections_json_maps_boxes_to_original_pixels(toy, tmp_path):
    det, net = toy
    files = write_images(tmp_path / "images")
    forward = network_forward(det, net)
    predictor = Predictor(det, forward, toy_preprocess(32), score_threshold=0.3, iou_threshold=0.6,
                          max_detections=5)
    doc = run_inference(predictor, files, ClassNames.from_meta(META), tmp_path / "out", draw=True,
                        info={"model": "toy"})
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == json.loads(json.dumps(doc))
    assert doc["model"] == "toy" and doc["score_threshold"] == 0.3 and len(doc["images"]) == 2
    total = 0
    for path, entry in zip(files, doc["images"]):
        image = cv2.imread(str(path))
        h, w = image.shape[:2]
        assert (entry["file"], entry["width"], entry["height"]) == (str(path), w, h)
        # Independent reference: every candidate (point, class) of the network, in original pixels.
        chw, scale = toy_preprocess(32)(image)
        boxes, scores = det.decode(forward(chw[None]))
        cand_boxes = np.clip(boxes[0] / np.array([scale[0], scale[1], scale[0], scale[1]]), 0, [w, h, w, h])
        dets = entry["detections"]
        assert 1 <= len(dets) <= 5
        assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
        # NMS always keeps the best candidate whose box has an area.
        has_area = (cand_boxes[:, 2] > cand_boxes[:, 0]) & (cand_boxes[:, 3] > cand_boxes[:, 1])
        assert dets[0]["score"] == pytest.approx(float(scores[0][has_area].max()), abs=1e-5)
        for d in dets:
            assert set(d) == FIELDS
            k = d["class_index"]
            assert d["category_id"] == META["categories"][k]["id"]
            assert d["class_name"] == META["categories"][k]["name"]
            assert d["score"] >= 0.3
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            match = (np.abs(scores[0][:, k] - d["score"]) < 1e-5) & np.all(
                np.abs(cand_boxes - np.array(d["box"])) < 0.02, axis=1)
            assert match.any(), f"{d} is not one of the network's candidates"
        total += len(dets)
        drawn = cv2.imread(str(tmp_path / "out" / entry["drawing"]))
        assert drawn.shape == image.shape
        assert (np.abs(drawn.astype(int) - image.astype(int)).sum(axis=2) > 0).sum() > 10  # boxes drawn
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["detections.json", "img0.png", "img1.png"]
    assert total >= 2


def test_anonymous_classes_and_input_listing(tmp_path):
    names = ClassNames.anonymous(2)
    assert names.names == ["class_0", "class_1"] and names.category_ids is None
    files = write_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    assert list_images(tmp_path / "imgs") == sorted(files)  # other suffixes are not images of the folder
    assert list_images(files[1]) == [files[1]]
    (tmp_path / "imgs" / "fake.jpg").write_text("text, not a JPEG")
    with pytest.raises(InferenceError, match=r"fake\.jpg: not an image file"):
        list_images(tmp_path / "imgs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InferenceError, match="no image files"):
        list_images(tmp_path / "empty")


@pytest.mark.detector
def test_checkpoint_of_another_architecture_names_the_first_mismatching_tensor(tmp_path):
    small, wide = ExportToyDetector(num_classes=3, width=8), ExportToyDetector(num_classes=3, width=16)
    save_weights(tmp_path / "wide.ckpt", wide.build_network(), {"model": "toy_wide"})
    with pytest.raises(CheckpointError, match=r"wide\.ckpt does not fit model 'toy' with 3 classes: tensor "
                                              r"'stem\.0\.weight' has shape \(16, 3, 3, 3\), the network "
                                              r"expects \(8, 3, 3, 3\); the file was saved for model 'toy_wide'"):
        load_network(small, tmp_path / "wide.ckpt")
    # Training-only tensors may be absent; everything else must be there.
    net = small.build_network()
    save_weights(tmp_path / "no_aux.ckpt", [{"name": p.name, "data": p} for p in net.get_parameters()
                                            if not p.name.startswith("aux.")])
    loaded = load_network(small, tmp_path / "no_aux.ckpt")
    np.testing.assert_array_equal(loaded.head.weight.asnumpy(), net.head.weight.asnumpy())
    save_weights(tmp_path / "no_head.ckpt", [{"name": p.name, "data": p} for p in net.get_parameters()
                                             if not p.name.startswith("head.")])
    with pytest.raises(CheckpointError, match=r"network tensor 'head\.weight' is not in the checkpoint"):
        load_network(small, tmp_path / "no_head.ckpt")


# ------------------------------------------------------------------------------------------------------
# the real NanoDet-Plus at 128 with random weights: export round trip, CLI from checkpoint and from MINDIR


@pytest.fixture(scope="module")
def nanodet(tmp_path_factory):
    root = tmp_path_factory.mktemp("nanodet")
    cfg = config("nanodet", input_size=128)
    det = get_detector("nanodet", cfg, 3)
    net = det.build_network()
    save_weights(root / "nanodet.ckpt", net, {"model": "nanodet"})
    files = write_images(root / "images", sizes=((90, 120), (100, 70)))
    preprocess = eval_preprocess("nanodet", 128)
    check = np.stack([preprocess(cv2.imread(str(f)))[0] for f in files])
    report = export_model(det, net, root / "export", ("MINDIR", "ONNX"), check_inputs=check, tolerances=TOL,
                          postprocess=POST, latency_repeats=2)
    (root / "meta.json").write_text(json.dumps(META))
    return root, report, files


@pytest.mark.detector
def test_nanodet_export_round_trip(nanodet):
    root, report, _ = nanodet
    assert report["outputs"][0]["shape"] == [1, 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2, 3 + 4 * 8]
    mindir = report["formats"]["MINDIR"]
    assert mindir["exported"] and mindir["check"]["raw"]["worst_fraction_of_tolerance"] <= 1.0
    assert mindir["size_bytes"] == (root / "export" / "model.mindir").stat().st_size
    onnx = report["formats"]["ONNX"]
    if onnx["exported"]:
        assert onnx["check"]["raw"]["worst_fraction_of_tolerance"] <= 1.0 and (root / "export" / "model.onnx").is_file()
    else:
        assert onnx["reason"] and not (root / "export" / "model.onnx").exists()


@pytest.mark.detector
def test_nanodet_cli_checkpoint_and_mindir_agree(nanodet, tmp_path, capsys):
    root, _, files = nanodet
    common = ["--model", "nanodet", "--meta", str(root / "meta.json"), "--score", "0.005", "--params",
              str(ROOT / "params.yaml"), str(root / "images")]
    assert infer_stage.main(["--ckpt", str(root / "nanodet.ckpt"), "--input-size", "128", "--draw",
                             "--out", str(tmp_path / "a")] + common) == 0
    assert infer_stage.main(["--mindir", str(root / "export" / "model.mindir"), "--out", str(tmp_path / "b")]
                            + common) == 0
    a = json.loads((tmp_path / "a" / "detections.json").read_text())
    b = json.loads((tmp_path / "b" / "detections.json").read_text())
    assert a["input_size"] == b["input_size"] == 128 and a["num_classes"] == 3
    assert [e["file"] for e in a["images"]] == [str(f) for f in files]
    for ea, eb in zip(a["images"], b["images"]):
        assert len(ea["detections"]) == len(eb["detections"]) > 0
        for da, db in zip(ea["detections"], eb["detections"]):
            assert set(da) == FIELDS and da["class_index"] == db["class_index"]
            assert da["category_id"] == META["categories"][da["class_index"]]["id"]
            assert da["score"] == pytest.approx(db["score"], abs=1e-4)
            np.testing.assert_allclose(da["box"], db["box"], atol=0.05)
            x1, y1, x2, y2 = da["box"]
            assert 0 <= x1 < x2 <= ea["width"] and 0 <= y1 < y2 <= ea["height"]
        assert cv2.imread(str(tmp_path / "a" / ea["drawing"])).shape == (ea["height"], ea["width"], 3)


def _error(capsys, argv) -> str:
    assert infer_stage.main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.detector
def test_cli_errors_are_clear(nanodet, tmp_path, capsys):
    root, _, files = nanodet
    ckpt = str(root / "nanodet.ckpt")
    base = ["--model", "nanodet", "--num-classes", "3", "--input-size", "128", "--params",
            str(ROOT / "params.yaml"), "--out", str(tmp_path / "out")]
    missing = tmp_path / "missing.jpg"
    assert f"{missing}: no such file or folder" in _error(capsys, base + ["--ckpt", ckpt, str(missing)])
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert f"{notes}: not an image file" in _error(capsys, base + ["--ckpt", ckpt, str(notes)])
    assert f"{tmp_path / 'none.ckpt'}: checkpoint file not found" in _error(
        capsys, base + ["--ckpt", str(tmp_path / "none.ckpt"), str(files[0])])
    err = _error(capsys, base + ["--mindir", str(root / "export" / "model.mindir"), "--input-size", "192",
                                 str(files[0])])
    assert "model.mindir: exported for input [1, 3, 128, 128], but --input-size is 192" in err
    # Same model, other number of classes: the class head is named.
    err = _error(capsys, ["--model", "nanodet", "--num-classes", "5", "--input-size", "128", "--params",
                          str(ROOT / "params.yaml"), "--ckpt", ckpt, str(files[0])])
    assert "does not fit model 'nanodet' with 5 classes: tensor 'head.gfl_cls.0.weight' has shape" in err
    # A D0 checkpoint given for NanoDet: the first NanoDet tensor it lacks, and what the file is.
    d0 = get_detector("d0", config("d0", input_size=128), 3)
    save_weights(tmp_path / "d0.ckpt", d0.build_network(), {"model": "d0"})
    err = _error(capsys, base + ["--ckpt", str(tmp_path / "d0.ckpt"), str(files[0])])
    assert "d0.ckpt does not fit model 'nanodet' with 3 classes: network tensor 'backbone." in err
    assert "is not in the checkpoint (0 of " in err and "the file was saved for model 'd0'" in err
    assert not (tmp_path / "out").exists()
