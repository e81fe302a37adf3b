"""The export stage's library: a checkpoint of ``model`` -> verified MINDIR / ONNX files and their metrics.

Check images: the first ``export.num_check_images`` val images through the model's eval pipeline, or
(standalone export of any checkpoint, no MindRecord around) deterministic random inputs. Tolerances come
from ``export``, the decoded comparison's post-processing from ``eval`` (``msdet.export.verify``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from msdet.atomic import check_replaceable
from msdet.config import Params
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
    return out


def failed_formats(report: dict) -> dict[str, str]:
    """Formats asked for but not written, with the reason (for the stage's warnings)."""
    return {fmt: r["reason"] for fmt, r in report["formats"].items() if not r["exported"]}


def run_export(params: Params, model: str, ckpt: str | Path, out_dir: str | Path, num_classes: int,
               input_size: int | None = None, formats: list[str] | None = None, check: str = "val") -> dict:
    """Load ``ckpt`` into ``model`` and export it to ``out_dir``; returns the report.

    ``check``: "val" (val images required) or "auto" (val images if the val split exists, else random)."""
    from msdet.detectors import get_detector
    from msdet.engine.runtime import setup_runtime
    from msdet.inference import load_network, with_model_cfg

    check_replaceable(out_dir, REPORT_NAME)  # before the minutes of loading and exporting
    setup_runtime(params.runtime)
    detector = get_detector(model, with_model_cfg(getattr(params, model), input_size), num_classes)
    network = load_network(detector, ckpt)
    mr_dir = params.mindrecord.out_dir
    n, size = params.export.num_check_images, detector.input_size
    if check == "val" or has_val_split(mr_dir):
        images = val_check_images(mr_dir, model, size, n)
        source = f"{len(images)} val images from {mr_dir}"
    else:
        images = random_check_images(size, n)
        source = f"{n} deterministic random inputs (no val split in {mr_dir})"
    tolerances, postprocess = check_settings(params, model)
    return export_model(detector, network, out_dir, formats or params.export.formats, check_inputs=images,
                        tolerances=tolerances, postprocess=postprocess, strict=params.export.strict,
                        latency_repeats=params.export.latency_repeats,
                        extra={"checkpoint": str(ckpt), "check_inputs": source})
