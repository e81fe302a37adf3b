"""The export stage's library: a checkpoint of ``model`` -> verified MINDIR / ONNX files and their metrics.

Check images: the first ``export.num_check_images`` val images through the model's eval pipeline, or
(standalone export of any checkpoint, no MindRecord around) deterministic random inputs. Tolerances come
from ``export``, the decoded comparison's post-processing from ``eval`` (``msdet.export.verify``). With
``export.end_to_end`` and a val split, the end-to-end and INT8 models are built and measured on every val
image (``msdet.export.end_to_end``); without a val split the report says why they are absent.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from msdet.atomic import check_replaceable
from msdet.config import Params, RuntimeConfig
from msdet.export.end_to_end import EndToEndSettings, ValData, make_extend
from msdet.export.exporter import REPORT_NAME, ExportError, export_model
from msdet.export.verify import Postprocess, Tolerances


def has_val_split(mindrecord_dir: str | Path) -> bool:
    from msdet.data.mindrecord import mindrecord_files

    try:
        return bool(mindrecord_files(mindrecord_dir, "val"))
    except (OSError, KeyError, ValueError):
        return False


def val_check_images(mindrecord_dir: str | Path, model: str, input_size: int, count: int) -> np.ndarray:
    """The first ``count`` val images, preprocessed by the model's eval pipeline: float32 [N, 3, S, S]."""
    from msdet.data.pipeline import create_eval_dataset

    dataset = create_eval_dataset(mindrecord_dir, model, input_size, count)
    for batch in dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        return np.asarray(batch["image"], dtype=np.float32)[:count]
    raise ExportError(f"{mindrecord_dir}: the val split has no images to check the export on")


def random_check_images(input_size: int, count: int, seed: int = 0) -> np.ndarray:
    """Deterministic stand-ins for normalised images (standard normal), when no val data is around."""
    return np.random.default_rng(seed).standard_normal((count, 3, input_size, input_size)).astype(np.float32)


def check_settings(params: Params, model: str) -> tuple[Tolerances, Postprocess]:
    """The export check's tolerances (``export``) and the post-processing of ``model`` (``eval``)."""
    from msdet.evaluation.runner import nms_iou_for

    e, ev = params.export, params.eval
    return (Tolerances(atol=e.atol, rtol=e.rtol, box_atol_px=e.box_atol_px, score_atol=e.score_atol),
            Postprocess(score_threshold=ev.score_threshold, iou_threshold=nms_iou_for(model, ev),
                        max_detections=ev.max_detections, pre_nms_top_k=ev.pre_nms_top_k))


def export_metrics(report: dict) -> dict:
    """The numbers DVC tracks: per format its size, latency and measured differences, or why it is absent."""
    out: dict[str, Any] = {"input_size": report["input_size"], "num_check_images": report["num_check_images"],
                           "network_latency_ms": report["network_latency_ms"]}
    for fmt, r in report["formats"].items():
        entry: dict[str, Any] = ({"exported": True, "size_mb": round(r["size_bytes"] / 2**20, 3),
                                  "latency_ms": r["latency_ms"]} if r["exported"]
                                 else {"exported": False, "reason": r["reason"]})
        if "check" in r:
            raw = {k: v for k, v in r["check"]["raw"].items() if k != "outputs"}
            entry.update({"raw": raw, "decoded": r["check"]["decoded"]})
        out[fmt.lower()] = entry
    if "end_to_end" in report:
        out["end_to_end"] = report["end_to_end"]
    for key in ("end_to_end_mindir", "int8"):
        if key in report:
            out[key] = report[key]
    if report.get("end_to_end", {}).get("file"):
        out["ap_table"] = ap_table(report)
    return out


def ap_table(report: dict) -> dict:
    """Val AP, size and batch-1 CPU latency of the network (raw model.onnx + msdet's post-processing in
    Python, which the latency leaves out), the end-to-end model and its INT8 twin."""
    e2e, raw = report["end_to_end"], report["formats"]["ONNX"]
    rows = {"float": {"AP": e2e["float_AP"], "AP50": e2e["float_AP50"], "file": raw["file"],
                      "size_mb": round(raw["size_bytes"] / 2**20, 3), "latency_ms": raw["latency_ms"]}}
    for key in ("end_to_end", "end_to_end_mindir", "int8"):
        if key in report:
            r = report[key]
            rows[key] = {"AP": r["AP"], "AP50": r["AP50"], "file": r["file"],
                         "size_mb": round(r["size_bytes"] / 2**20, 3), "latency_ms": r["latency_ms"]}
    rows["cpu"] = report["cpu"]
    return rows


def failed_formats(report: dict) -> dict[str, str]:
    """Formats asked for but not written, with the reason (for the stage's warnings)."""
    return {fmt: r["reason"] for fmt, r in report["formats"].items() if not r["exported"]}


def export_runtime(runtime: RuntimeConfig) -> RuntimeConfig:
    """The export runs on CPU whatever ``runtime.device_target`` trained: MINDIR and ONNX files do not depend
    on the device, and the reference outputs the files are checked against (to ``export.score_atol``) must be
    float32 ones, which Ascend's float16 cube convolutions are not."""
    return dataclasses.replace(runtime, device_target="CPU")


def run_export(params: Params, model: str, ckpt: str | Path, out_dir: str | Path, num_classes: int,
               input_size: int | None = None, formats: list[str] | None = None, check: str = "val") -> dict:
    """Load ``ckpt`` into ``model`` and export it to ``out_dir``; returns the report.

    ``check``: "val" (val images required) or "auto" (val images if the val split exists, else random)."""
    from msdet.detectors import get_detector
    from msdet.engine.runtime import setup_runtime
    from msdet.inference import load_network, with_model_cfg

    check_replaceable(out_dir, REPORT_NAME)  # before the minutes of loading and exporting
    setup_runtime(export_runtime(params.runtime))
    detector = get_detector(model, with_model_cfg(getattr(params, model), input_size), num_classes)
    network = load_network(detector, ckpt)
    mr_dir = params.mindrecord.out_dir
    n, size = params.export.num_check_images, detector.input_size
    on_val = check == "val" or has_val_split(mr_dir)
    if on_val:
        images = val_check_images(mr_dir, model, size, n)
        source = f"{len(images)} val images from {mr_dir}"
    else:
        images = random_check_images(size, n)
        source = f"{n} deterministic random inputs (no val split in {mr_dir})"
    tolerances, postprocess = check_settings(params, model)
    e = params.export
    extend, extra = None, {"checkpoint": str(ckpt), "check_inputs": source}
    if e.end_to_end and on_val:
        settings = EndToEndSettings(post=postprocess, tolerances=tolerances, ap_atol=e.e2e_ap_atol, int8=e.int8,
                                    latency_repeats=e.latency_repeats, mindir=e.end_to_end_mindir)
        extend = make_extend(detector, model, val_data(params, model, ckpt, size), settings,
                             lambda: calibration_images(mr_dir, model, size, e.int8_calibration_images),
                             e.int8_per_channel)
    elif e.end_to_end:
        extra["end_to_end"] = {"built": False, "reason": f"no val split in {mr_dir} to verify it on"}
    return export_model(detector, network, out_dir, formats or e.formats, check_inputs=images,
                        tolerances=tolerances, postprocess=postprocess, strict=e.strict,
                        latency_repeats=e.latency_repeats, extra=extra, extend=extend)


def val_data(params: Params, model: str, ckpt: str | Path, input_size: int) -> ValData:
    """The val split, its ground truth and the checkpoint's classes, as the eval stage scores them."""
    import json

    from msdet.data.coco import resolve_tree
    from msdet.data.meta import read_meta
    from msdet.data.pipeline import create_eval_dataset
    from msdet.engine.checkpoint import category_ids_for, checkpoint_meta, read_checkpoint

    mr_dir, batch_size = params.mindrecord.out_dir, params.eval.batch_size
    meta = read_meta(mr_dir)
    category_ids = category_ids_for(ckpt, meta)
    gt_json = resolve_tree(params.data.root).annotations["val"]
    names = checkpoint_meta(read_checkpoint(ckpt), "class_names") or [c["name"] for c in meta["categories"]]
    file_names = {int(im["id"]): str(im["file_name"]) for im in json.loads(Path(gt_json).read_text())["images"]}
    return ValData(batches=lambda: create_eval_dataset(mr_dir, model, input_size, batch_size).create_dict_iterator(
                       num_epochs=1, output_numpy=True),
                   gt_json=Path(gt_json), category_ids=category_ids,
                   known_ids={int(c["id"]) for c in meta["categories"]}, class_names=list(names),
                   file_names=file_names, batch_size=batch_size)


def calibration_images(mindrecord_dir: str | Path, model: str, input_size: int, count: int) -> np.ndarray:
    """The first ``count`` training images in file order through the eval preprocessing: float32 [N, 3, S, S]
    (what the deployed model sees; the training augmentation would widen the ranges)."""
    from msdet.data.mindrecord import read_mindrecord
    from msdet.data.pipeline import EvalSampleMap

    fn = EvalSampleMap(model, input_size, str(mindrecord_dir))
    images = []
    for rec in read_mindrecord(mindrecord_dir, "train"):
        if len(images) == count:
            break
        images.append(fn(rec["image"], rec["image_id"], rec["height"], rec["width"])[0])
    if not images:
        raise ExportError(f"{mindrecord_dir}: the train split has no images to calibrate INT8 on")
    return np.stack(images).astype(np.float32)
