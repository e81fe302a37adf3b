"""Deployable exports beside the raw ones: an end-to-end ONNX model, its INT8 twin and the preprocessing spec.

``model_e2e.onnx`` is the verified raw ``model.onnx`` with decoding, score threshold, top-k and class-wise NMS
appended (``msdet.export.graph``): image and original size in, detections in original pixels out.
``model_e2e.mindir`` (``export.end_to_end_mindir``) is the same post-processing in MindSpore ops after the network
(``msdet.export.mindir_graph``), with static, padded outputs. ``model_e2e_int8.onnx`` is the raw model
statically quantised by onnxruntime (QDQ, MinMax calibration on the first ``export.int8_calibration_images``
training images) with the same post-processing appended.
``preprocess.json`` says how to build the image input; ``val_detections.json`` holds the end-to-end
model's detections on every val image (what ``examples/onnx_detect.py`` must reproduce).

Each end-to-end model (ONNX, and MINDIR where built) is verified like the raw export, on every val image: its
detections must pair with
msdet's post-processing of the in-memory network (``msdet.export.verify.compare_detections``, compared in
input pixels with the export tolerances) and its COCO AP must equal the network's within ``export.e2e_ap_atol``.
INT8 is measured, not verified: its AP, AP drop, size and latency are recorded whatever they are.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msdet.evaluation.coco_eval import evaluate
from msdet.evaluation.postprocess import ImageDetections, postprocess, to_coco_results
from msdet.export.verify import Detections, Postprocess, Tolerances, compare_detections, reference_cuts

E2E_NAME = "model_e2e.onnx"
E2E_MINDIR_NAME = "model_e2e.mindir"
INT8_NAME = "model_e2e_int8.onnx"
SPEC_NAME = "preprocess.json"
DETECTIONS_NAME = "val_detections.json"
PER_CHANNEL_OPSET = 13

#: the eval transforms (msdet.data.transforms d0_eval / nanodet_eval) as data: mean and std on the 0..255
#: scale, in ``channel_order``; normalised = (pixel - mean) * (1 / std) in float32
PREPROCESS: dict[str, dict[str, Any]] = {
    "d0": {"resize": "letterbox", "channel_order": "RGB", "pad_value": 0.0,
           "mean": [255.0 * m for m in (0.485, 0.456, 0.406)], "std": [255.0 * s for s in (0.229, 0.224, 0.225)]},
    "nanodet": {"resize": "stretch", "channel_order": "BGR", "pad_value": None,
                "mean": [103.53, 116.28, 123.675], "std": [57.375, 57.12, 58.395]},
}
RESIZE_TEXT = {
    "letterbox": "s = S / max(h, w); cv2.warpAffine(image, [[s, 0, s/2 - 1/2], [0, s, s/2 - 1/2]], (S, S), "
                 "INTER_LINEAR, BORDER_REPLICATE); normalise; every value at row >= round(h s) or column >= "
                 "round(w s) set to pad_value; boxes map back as x / s",
    "stretch": "cv2.resize(image, (S, S), interpolation=INTER_LINEAR); normalise; boxes map back as "
               "x / (S / w), y / (S / h)",
}


@dataclass(frozen=True)
class EndToEndSettings:
    """``export`` params of the end-to-end artifacts and the post-processing baked into them (``eval``)."""

    post: Postprocess
    tolerances: Tolerances
    ap_atol: float
    int8: bool
    latency_repeats: int
    mindir: bool = False


@dataclass
class ValData:
    """The val split as the export stage sees it: preprocessed batches (columns image, image_id, scale,
    orig_size), the ground truth, and the class space of the checkpoint."""

    batches: Callable[[], Iterable[dict]]
    gt_json: Path
    category_ids: list[int]
    known_ids: set[int]
    class_names: list[str]
    file_names: dict[int, str]
    batch_size: int


class EndToEndModel:
    """An end-to-end ONNX file on onnxruntime's CPU provider: ``(image [1, 3, S, S], orig_size [1, 2]) ->
    (boxes [K, 4], scores [K], labels [K])``."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.image_name, self.size_name = (i.name for i in self.session.get_inputs())

    def __call__(self, image: np.ndarray, orig_size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes, scores, labels = self.session.run(None, {
            self.image_name: np.ascontiguousarray(image, np.float32),
            self.size_name: np.asarray(orig_size, np.float32).reshape(1, 2)})
        return boxes, scores, labels


class MindirEndToEndModel:
    """An end-to-end MINDIR file on MindSpore's CPU runtime, called like :class:`EndToEndModel`: its padded
    outputs cut to ``count`` rows, labels as int64."""

    def __init__(self, path: str | Path) -> None:
        import mindspore as ms

        self.cell = ms.nn.GraphCell(ms.load(str(path)))

    def __call__(self, image: np.ndarray, orig_size: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import mindspore as ms

        boxes, scores, labels, count = (o.asnumpy() for o in self.cell(
            ms.Tensor(np.ascontiguousarray(image, np.float32)),
            ms.Tensor(np.asarray(orig_size, np.float32).reshape(1, 2))))
        k = int(count[0])
        return boxes[:k], scores[:k], labels[:k].astype(np.int64)


def build_end_to_end_mindir(cell: Any, target: Path, detector: Any, post: Postprocess, model: str) -> None:
    """The raw network ``cell`` + :class:`msdet.export.mindir_graph.EndToEndCell` -> ``target`` (MINDIR)."""
    import mindspore as ms

    from msdet.export.graph import Selection
    from msdet.export.mindir_graph import EndToEndCell

    e2e = EndToEndCell(cell, detector, Selection(**dataclasses.asdict(post)), resize_mode(model))
    e2e.set_train(False)
    size = int(detector.input_size)
    ms.export(e2e, ms.Tensor(np.zeros((1, 3, size, size), np.float32)),
              ms.Tensor(np.full((1, 2), float(size), np.float32)),
              file_name=str(target.with_suffix("")), file_format="MINDIR")


def resize_mode(model: str) -> str:
    if model not in PREPROCESS:
        raise ValueError(f"no preprocessing spec for model {model!r} (known: {', '.join(PREPROCESS)})")
    return PREPROCESS[model]["resize"]


def build_end_to_end(raw_onnx: Path, target: Path, detector: Any, post: Postprocess, model: str) -> None:
    """``raw_onnx`` + the post-processing graph -> ``target``."""
    import onnx

    from msdet.export.graph import Selection, append_postprocess

    selection = Selection(**dataclasses.asdict(post))
    onnx.save(append_postprocess(onnx.load(str(raw_onnx)), detector, selection, resize_mode(model)), str(target))


def quantize_int8(raw_onnx: Path, target: Path, calibration: np.ndarray, per_channel: bool) -> None:
    """onnxruntime static quantisation (QDQ, int8 weights and activations, MinMax ranges) of ``raw_onnx``,
    calibrated on ``calibration`` float32 [N, 3, S, S] one image at a time."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(str(raw_onnx))
    if next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < PER_CHANNEL_OPSET:
        # per-channel DequantizeLinear (its axis attribute) exists from opset 13 on
        model = version_converter.convert_version(model, PER_CHANNEL_OPSET)
    name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.images = iter(calibration)

        def get_next(self) -> dict | None:
            image = next(self.images, None)
            return None if image is None else {name: np.ascontiguousarray(image[None], np.float32)}

    quantize_static(model, str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def preprocess_spec(model: str, input_size: int, input_names: list[str], post: Postprocess,
                    class_names: list[str], category_ids: list[int], files: dict[str, str]) -> dict:
    """What a deployment needs besides the model file (the example reads it)."""
    prep = PREPROCESS[model]
    return {
        "model": model,
        "input_size": int(input_size),
        "input": {"name": input_names[0], "shape": [1, 3, input_size, input_size], "dtype": "float32",
                  "layout": "NCHW"},
        "orig_size_input": {"name": input_names[1], "shape": [1, 2], "dtype": "float32",
                            "meaning": "original image (height, width) in pixels"},
        "resize": {"mode": prep["resize"], "how": RESIZE_TEXT[prep["resize"]]},
        "channel_order": prep["channel_order"],
        "pixel_range": "0..255",
        "mean": prep["mean"],
        "std": prep["std"],
        "normalise": "(pixel - mean) * (1 / std) per channel, float32",
        "pad_value": prep["pad_value"],
        "class_names": list(class_names),
        "category_ids": [int(i) for i in category_ids],
        "thresholds": {"score_threshold": post.score_threshold, "iou_threshold": post.iou_threshold,
                       "pre_nms_top_k": post.pre_nms_top_k, "max_detections": post.max_detections,
                       "nms": "class-wise"},
        "outputs": {"boxes": "float32 [K, 4] x1, y1, x2, y2 in original-image pixels",
                    "scores": "float32 [K], best first", "labels": "int64 [K] class index into class_names"},
        **({"mindir_outputs": {
            "boxes": f"float32 [{post.max_detections}, 4], the first `count` rows as in `outputs`, then zeros",
            "scores": f"float32 [{post.max_detections}], best first, zeros from `count` on",
            "labels": f"int32 [{post.max_detections}] class index, -1 from `count` on",
            "count": "int32 [1] detections kept"}} if "end_to_end_mindir" in files else {}),
        "files": files,
    }


def _latency_ms(fn: Callable[[], Any], repeats: int) -> float:
    from msdet.export.exporter import _latency_ms as latency

    return latency(lambda _: fn(), np.zeros(0), repeats)


def _as_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, scale: np.ndarray,
                   cuts: tuple[float, ...]) -> Detections:
    """Original-pixel detections -> :class:`Detections` in input pixels (where the tolerances are set)."""
    sxy = np.tile(np.asarray(scale, np.float64).reshape(2), 2)
    return Detections((np.asarray(boxes, np.float64) * sxy).reshape(-1, 4), np.asarray(scores, np.float64),
                      np.asarray(labels, np.int64), cuts)


def _coco_ap(val: ValData, dets: list[ImageDetections]) -> dict[str, float]:
    results = [r for r in to_coco_results(dets, val.category_ids) if r["category_id"] in val.known_ids]
    stats = evaluate(val.gt_json, results, image_ids=[d.image_id for d in dets])
    return {"AP": round(float(stats["AP"]), 5), "AP50": round(float(stats["AP50"]), 5)}


def _images_json(model: str, val: ValData, dets: list[ImageDetections]) -> dict:
    return {"model": model, "images": [
        {"image_id": int(d.image_id), "file_name": val.file_names.get(int(d.image_id), ""),
         "boxes": np.asarray(d.boxes, np.float32).reshape(-1, 4).tolist(),
         "scores": np.asarray(d.scores, np.float32).tolist(), "labels": np.asarray(d.labels, np.int64).tolist()}
        for d in dets]}


#: the end-to-end models that must reproduce msdet's post-processing (INT8 is measured only), and their files
VERIFIED = {"end_to_end": E2E_NAME, "end_to_end_mindir": E2E_MINDIR_NAME}


def _empty_check() -> dict:
    return {"images": 0, "detections": 0, "paired": 0, "borderline": 0, "count_mismatch_images": 0,
            "max_box_diff_px": 0.0, "max_score_diff": 0.0}


def run_on_val(detector: Any, cell: Any, models: dict[str, Any], val: ValData,
               settings: EndToEndSettings
               ) -> tuple[dict[str, list[ImageDetections]], dict[str, dict], list[tuple[str, str]]]:
    """Every val image through the network + msdet's post-processing (``float``) and each of ``models``;
    returns the detections per source, the comparison with ``float`` of each verified model (``VERIFIED``)
    and their problems."""
    import mindspore as ms

    post = settings.post
    dets: dict[str, list[ImageDetections]] = {"float": [], **{k: [] for k in models}}
    checks = {k: _empty_check() for k in models if k in VERIFIED}
    problems: list[tuple[str, str]] = []
    for batch in val.batches():
        image = np.asarray(batch["image"], np.float32)
        n = image.shape[0]
        padded = np.concatenate([image, np.repeat(image[-1:], val.batch_size - n, axis=0)]) \
            if n < val.batch_size else image
        outputs = cell(ms.Tensor(padded))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        raw = [o.asnumpy()[:n] for o in outputs]
        boxes, scores = detector.decode(raw)
        first = len(dets["float"])
        dets["float"] += postprocess(boxes, scores, batch["image_id"], batch["scale"], batch["orig_size"],
                                     score_threshold=post.score_threshold, iou_threshold=post.iou_threshold,
                                     max_detections=post.max_detections, pre_nms_top_k=post.pre_nms_top_k)
        for i in range(n):
            image_id = int(np.asarray(batch["image_id"]).reshape(-1)[i])
            for key, model in models.items():
                dets[key].append(ImageDetections(image_id, *model(image[i:i + 1], batch["orig_size"][i])))
            ref = dets["float"][first + i]
            cuts = reference_cuts(scores[i], ref.scores, post)
            for key, stats in checks.items():
                got = dets[key][-1]
                image_stats, image_problems = compare_detections(
                    _as_detections(ref.boxes, ref.scores, ref.labels, batch["scale"][i], cuts),
                    _as_detections(got.boxes, got.scores, got.labels, batch["scale"][i], cuts),
                    post, settings.tolerances)
                stats["images"] += 1
                stats["count_mismatch_images"] += int(len(ref.scores) != len(got.scores))
                for name in ("detections", "paired", "borderline"):
                    stats[name] += image_stats[name]
                for name in ("max_box_diff_px", "max_score_diff"):
                    stats[name] = max(stats[name], image_stats[name])
                problems += [(VERIFIED[key], f"{p} (val image {image_id})") for p in image_problems]
    if not dets["float"]:
        raise ValueError("the val split has no images to verify the end-to-end export on")
    return dets, checks, problems


def make_extend(detector: Any, model: str, val: ValData, settings: EndToEndSettings,
                calibration: Callable[[], np.ndarray] | None, per_channel: bool) -> Callable[[Path, Any, dict], dict]:
    """The ``extend`` step of :func:`msdet.export.exporter.export_model` writing the end-to-end artifacts."""
    from msdet.export.exporter import FILE_NAMES, ExportError, ExportMismatch, _first_line

    def extend(folder: Path, cell: Any, report: dict) -> dict:
        onnx_entry = report["formats"].get("ONNX", {})
        if not onnx_entry.get("exported"):
            raise ExportError(f"export.end_to_end needs the raw ONNX export, which was "
                              f"{'not asked for' if not onnx_entry else 'not written: ' + onnx_entry['reason']}")
        raw = folder / FILE_NAMES["ONNX"]
        files = {"end_to_end": E2E_NAME, "raw_onnx": raw.name, "spec": SPEC_NAME, "val_detections": DETECTIONS_NAME}
        if "MINDIR" in report["formats"]:
            files["raw_mindir"] = FILE_NAMES["MINDIR"]
        try:
            build_end_to_end(raw, folder / E2E_NAME, detector, settings.post, model)
            models: dict[str, Any] = {"end_to_end": EndToEndModel(folder / E2E_NAME)}
        except Exception as exc:
            raise ExportError(f"{folder.name}/{E2E_NAME}: cannot be built ({_first_line(exc)})") from exc
        if settings.mindir:
            try:
                build_end_to_end_mindir(cell, folder / E2E_MINDIR_NAME, detector, settings.post, model)
                models["end_to_end_mindir"] = MindirEndToEndModel(folder / E2E_MINDIR_NAME)
            except Exception as exc:
                raise ExportError(f"{folder.name}/{E2E_MINDIR_NAME}: cannot be built ({_first_line(exc)})") from exc
            files["end_to_end_mindir"] = E2E_MINDIR_NAME
        calib = calibration() if settings.int8 and calibration is not None else None
        if calib is not None:
            raw_int8 = folder.parent / "raw_int8.onnx"  # the staging folder's parent is a private temp dir
            try:
                quantize_int8(raw, raw_int8, calib, per_channel)
                build_end_to_end(raw_int8, folder / INT8_NAME, detector, settings.post, model)
                models["int8"] = EndToEndModel(folder / INT8_NAME)
            except Exception as exc:
                raise ExportError(f"{folder.name}/{INT8_NAME}: cannot be built ({_first_line(exc)})") from exc
            raw_int8.unlink()
            files["int8"] = INT8_NAME
        dets, checks, problems = run_on_val(detector, cell, models, val, settings)
        ap = {k: _coco_ap(val, v) for k, v in dets.items()}
        if problems:
            name, problem = problems[0]
            raise ExportMismatch(f"{folder.name}/{name}: its detections differ from msdet's post-processing: "
                                 f"{problem}")
        ap_diff = {k: abs(ap[k]["AP"] - ap["float"]["AP"]) for k in checks}
        for key, diff in ap_diff.items():
            if diff > settings.ap_atol:
                raise ExportMismatch(f"{folder.name}/{VERIFIED[key]}: val AP {ap[key]['AP']} differs from the "
                                     f"network's {ap['float']['AP']} by {diff:.5f} (allowed {settings.ap_atol})")
        first = next(iter(val.batches()))
        image, orig_size = np.asarray(first["image"][:1], np.float32), first["orig_size"][0]
        repeats = settings.latency_repeats
        entry = lambda key, name: {  # noqa: E731
            "file": name, "size_bytes": (folder / name).stat().st_size, "AP": ap[key]["AP"], "AP50": ap[key]["AP50"],
            "latency_ms": _latency_ms(lambda: models[key](image, orig_size), repeats)}
        out: dict[str, Any] = {key: {**entry(key, VERIFIED[key]), "float_AP": ap["float"]["AP"],
                                     "float_AP50": ap["float"]["AP50"], "AP_abs_diff": round(ap_diff[key], 5),
                                     "check": checks[key], "thresholds": dataclasses.asdict(settings.post)}
                               for key in checks}
        out["cpu"] = f"{platform.machine()}, {os.cpu_count()} cores"
        if calib is not None:
            out["int8"] = {**entry("int8", INT8_NAME), "AP_drop": round(ap["float"]["AP"] - ap["int8"]["AP"], 5),
                           "calibration_images": int(len(calib)), "per_channel": per_channel,
                           "method": "onnxruntime quantize_static, QDQ, int8 weights and activations, MinMax"}
            out["int8"]["latency_vs_float"] = round(out["int8"]["latency_ms"] / out["end_to_end"]["latency_ms"], 3)
        spec = preprocess_spec(model, detector.input_size, [models["end_to_end"].image_name,
                                                            models["end_to_end"].size_name],
                               settings.post, val.class_names, val.category_ids, files)
        (folder / SPEC_NAME).write_text(json.dumps(spec, indent=2) + "\n")
        (folder / DETECTIONS_NAME).write_text(json.dumps(_images_json(model, val, dets["end_to_end"])) + "\n")
        return out

    return extend
