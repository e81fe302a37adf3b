"""DVC stage export_<model>, and a standalone export tool for any checkpoint of ours (converted ones included).

DVC stage (reads params.yaml; EMA weights, num_classes from the MindRecord meta.json, val images to check):

    python -m stages.export --model d0|nanodet

writes models/<model>/export/{model.mindir, model.onnx, export_report.json} and metrics/export_<model>.json.

Standalone:

    python -m stages.export --model d0|nanodet --ckpt FILE.ckpt --input-size N --num-classes C --out DIR

checks on val images when the MindRecord val split is around, else on deterministic random inputs (the
report says which).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from msdet.atomic import write_json
from msdet.cli import run
from msdet.config import ConfigError, Params, load_params
from msdet.data.meta import read_meta
from msdet.detectors import MODEL_NAMES, get_detector
from msdet.engine.checkpoint import CheckpointError
from msdet.engine.runtime import setup_runtime
from msdet.export.exporter import ExportError, export_model
from msdet.inference import InferenceError, load_network, read_meta_file, with_model_cfg


def has_val_split(mindrecord_dir: str | Path) -> bool:
    from msdet.data.meta import mindrecord_files

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


def export_metrics(report: dict) -> dict:
    """The numbers DVC tracks: latencies, sizes and max differences per format (or why a format is absent)."""
    out: dict[str, Any] = {"input_size": report["input_size"], "num_check_images": report["num_check_images"],
                           "network_latency_ms": report["network_latency_ms"]}
    for fmt, r in report["formats"].items():
        if r["exported"]:
            out[fmt.lower()] = {"size_mb": round(r["size_bytes"] / 2**20, 3), "max_scaled_diff": r["max_scaled_diff"],
                                "latency_ms": r["latency_ms"]}
        else:
            out[fmt.lower()] = {"exported": False, "reason": r["reason"]}
    return out


def run_export(params: Params, model: str, ckpt: str | Path, out_dir: str | Path, num_classes: int,
               input_size: int | None = None, formats: list[str] | None = None,
               check: str = "val") -> dict:
    """Load ``ckpt`` into ``model`` and export it to ``out_dir``; ``check``: "val" (required), "auto"
    (val images if the val split exists, else random inputs)."""
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
    return export_model(detector, network, out_dir, formats or params.export.formats, check_inputs=images,
                        tolerance=params.export.tolerance, latency_repeats=params.export.latency_repeats,
                        extra={"checkpoint": str(ckpt), "check_inputs": source})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=MODEL_NAMES)
    ap.add_argument("--params", default="params.yaml", help="params file (standalone: defaults if it is absent)")
    ap.add_argument("--ckpt", default=None, help="standalone: checkpoint to export")
    ap.add_argument("--input-size", type=int, default=None, help="standalone: default the model's params value")
    ap.add_argument("--num-classes", type=int, default=None, help="standalone: default from --meta")
    ap.add_argument("--meta", default=None, help="standalone: a MindRecord meta.json giving num_classes")
    ap.add_argument("--out", default=None, help="standalone: output folder (replaced as a whole)")
    ap.add_argument("--formats", nargs="+", default=None, help="MINDIR and/or ONNX (default: export.formats)")
    ap.add_argument("--metrics", default=None, help="also write the metrics JSON here")
    args = ap.parse_args(argv)
    try:
        if args.ckpt is None:
            params = load_params(args.params)
            meta = read_meta(params.mindrecord.out_dir)
            report = run_export(params, args.model, Path("models") / args.model / "ema.ckpt",
                                Path("models") / args.model / "export", int(meta["num_classes"]),
                                formats=args.formats, check="val")
            metrics_path = args.metrics or Path("metrics") / f"export_{args.model}.json"
        else:
            params = load_params(args.params) if Path(args.params).is_file() else Params()
            if args.out is None:
                raise InferenceError("--out DIR is required with --ckpt")
            num_classes = args.num_classes
            if num_classes is None:
                if args.meta is None:
                    raise InferenceError("give --num-classes C or --meta path/to/meta.json with --ckpt")
                num_classes = read_meta_file(args.meta)["num_classes"]
            report = run_export(params, args.model, args.ckpt, args.out, num_classes, args.input_size,
                                args.formats, check="auto")
            metrics_path = args.metrics
        if metrics_path:
            write_json(metrics_path, export_metrics(report))
    except (ExportError, CheckpointError, InferenceError, ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for fmt, r in report["formats"].items():
        status = (f"{r['size_bytes'] / 2**20:.2f} MB, max diff {r['max_scaled_diff']:.2e}, {r['latency_ms']:.1f} ms"
                  if r["exported"] else f"not exported: {r['reason']}")
        print(f"[{args.model}] {fmt}: {status}")
    print(f"[{args.model}] in-memory network {report['network_latency_ms']:.1f} ms/image; "
          f"checked on {report['check_inputs']}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
