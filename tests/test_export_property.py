"""Export verification on the real detectors: both models, from random initialisation, with
perturbed weights (class biases raised so that detections survive the score threshold) and from the
converted-official layout, at two input sizes each: MINDIR and ONNX pass their check (no false alarm), and
injected bugs (swapped outputs, a one-pixel input shift, a 1 % wrong constant) are caught wherever the
outputs can show them."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from msdet.config import load_params
from msdet.conversion.converters import COCO_CATEGORIES, convert_state_dict
from msdet.detectors import get_detector
from msdet.export.exporter import _as_numpy_outputs, export_model
from msdet.export.runner import check_settings, random_check_images
from msdet.export.verify import verify
from tests.helpers import ScaledBoxes, ShiftedInput, SwappedOutputs, config, random_official_state

pytestmark = pytest.mark.detector  # every test here builds a whole detector

PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
CASES = [(model, size, state) for model, sizes in (("d0", (128, 256)), ("nanodet", (64, 128)))
         for size in sizes for state in ("random", "perturbed", "converted")]


@pytest.fixture(autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    yield


def _network(model: str, size: int, state: str):
    """(detector, network) of ``model`` at ``size`` with 4 classes and weights of the given kind; the
    converted-official layout keeps the official head's rows of 4 COCO categories."""
    detector = get_detector(model, dataclasses.replace(getattr(PARAMS, model), input_size=size), 4)
    network = detector.build_network()  # fresh cells per case: re-exporting one cell to ONNX fails in MindSpore 2.8
    initial = {p.name: p.asnumpy() for p in network.get_parameters()}
    values = dict(initial)
    if state == "converted":
        categories = [{"id": i, "name": COCO_CATEGORIES[i]} for i in (1, 3, 18, 62)]
        converted, _ = convert_state_dict(model, random_official_state(model, 90 if model == "d0" else 80, seed=3),
                                          categories=categories, cfg=config(model, "coco"))
        values = {p.name: p.asnumpy() for p in converted.get_parameters()}
    elif state == "perturbed":
        rng = np.random.default_rng(5)
        head = set(detector.class_head_param_names(network))
        for name, value in initial.items():
            if "moving_variance" in name:
                value = value * np.exp(0.1 * rng.standard_normal(value.shape))
            else:
                # heads start near zero (D0's boxes ~1e-6): noise of at least 0.01 makes outputs depend on the input
                value = value + 0.1 * max(value.std(), 0.1) * rng.standard_normal(value.shape)
            if name in head and name.endswith("bias"):
                value = value + 3.0  # prior -4.6 -> about -1.6: scores above the 0.05 threshold
            values[name] = value
    for p in network.get_parameters():
        p.set_data(ms.Tensor(values[p.name].astype(np.float32)))
    return detector, network


def _pynative(cell, images: np.ndarray) -> list[tuple]:
    ms.set_context(mode=ms.PYNATIVE_MODE)  # one forward pass per image: cheaper than another compilation
    try:
        return [_as_numpy_outputs(cell(ms.Tensor(images[i:i + 1]))) for i in range(len(images))]
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("model, size, state", CASES)
def test_healthy_exports_pass_and_injected_bugs_are_caught(model, size, state, tmp_path):
    tolerances, postprocess = check_settings(PARAMS, model)
    detector, network = _network(model, size, state)
    images = random_check_images(size, 2, seed=11)
    report = export_model(detector, network, tmp_path / "export", ("MINDIR", "ONNX"), check_inputs=images,
                          tolerances=tolerances, postprocess=postprocess, strict=True, latency_repeats=1)
    measured = {}
    for fmt in ("MINDIR", "ONNX"):
        r = report["formats"][fmt]
        assert r["exported"], r.get("reason")
        raw, decoded = r["check"]["raw"], r["check"]["decoded"]
        assert raw["worst_fraction_of_tolerance"] <= 1.0 and decoded["max_box_diff_px"] <= tolerances.box_atol_px
        measured[fmt] = {"raw_max_diff_over_scale": raw["max_diff_over_scale"],
                         "worst_fraction_of_tolerance": raw["worst_fraction_of_tolerance"], **decoded}
    if state != "random":  # the decoded comparison has something to compare
        assert report["formats"]["ONNX"]["check"]["decoded"]["paired"] > 0

    cell = detector.inference_cell(network)
    cell.set_train(False)
    names = [o["name"] for o in report["outputs"]]
    reference = _pynative(cell, images)
    # Random weights leave outputs nearly independent of the input (D0: every state here, 1e-6 to 1e-4 between
    # the two images; NanoDet: all but the converted one), and at random initialisation D0's boxes are ~1e-6:
    # an input-side bug can only show where the outputs depend on the input, a 1 % scale where they are not ~0.
    depends = max(float(np.abs(a - b).max()) for a, b in zip(reference[0], reference[1])) > 100 * tolerances.atol
    for variant, observable in ((SwappedOutputs, True), (ShiftedInput, depends), (ScaledBoxes, state != "random")):
        verdict = verify(detector, reference, _pynative(variant(cell), images), names, tolerances, postprocess)
        measured[variant.__name__] = {"raw_max_diff_over_scale": verdict.raw["max_diff_over_scale"],
                                      "worst_fraction_of_tolerance": verdict.raw["worst_fraction_of_tolerance"],
                                      **verdict.decoded, "caught": not verdict.ok}
        if observable:
            assert not verdict.ok, f"{variant.__name__} not caught"
            assert verdict.raw["worst_fraction_of_tolerance"] > 3.0  # caught with a margin, not by a hair
    if model == "nanodet" and state == "converted":
        assert depends  # the input-side bug is exercised at least there
    print(json.dumps({f"{model}@{size} {state}": measured}))
