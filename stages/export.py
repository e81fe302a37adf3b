"""DVC stage export_<model>, and a standalone export tool for any checkpoint of ours (converted ones included).

DVC stage (reads params.yaml; EMA weights, num_classes from the MindRecord meta.json, val images to check):

    python -m stages.export --model d0|nanodet

writes models/<model>/export/{model.mindir, model.onnx, export_report.json} and metrics/export_<model>.json,
and with export.end_to_end {model_e2e.onnx, model_e2e.mindir (export.end_to_end_mindir), model_e2e_int8.onnx
(export.int8), preprocess.json, val_detections.json} (docs/deploy.md). MINDIR must pass its check; a failing
ONNX is left out with a warning unless export.strict (README, Export).

Standalone:

    python -m stages.export --model d0|nanodet --ckpt FILE.ckpt --input-size N --num-classes C --out DIR

checks on val images when the MindRecord val split is around, else on deterministic random inputs (the
report says which).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msdet.atomic import write_json
from msdet.cli import run
from msdet.config import ConfigError, load_params
from msdet.detectors import MODEL_NAMES
from msdet.engine.checkpoint import CheckpointError
from msdet.export.exporter import ExportError
from msdet.export.runner import export_metrics, failed_formats, run_export
from msdet.inference import InferenceError, read_meta_file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=MODEL_NAMES)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--ckpt", default=None, help="standalone: checkpoint to export")
    ap.add_argument("--input-size", type=int, default=None, help="standalone: default the model's params value")
    ap.add_argument("--num-classes", type=int, default=None, help="standalone: default from --meta")
    ap.add_argument("--meta", default=None, help="standalone: a MindRecord meta.json giving num_classes")
    ap.add_argument("--out", default=None, help="standalone: output folder, replaced as a whole "
                    "(refused unless empty or a previous export)")
    ap.add_argument("--formats", nargs="+", default=None, help="MINDIR and/or ONNX (default: export.formats)")
    ap.add_argument("--metrics", default=None, help="also write the metrics JSON here")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        if args.ckpt is None:
            meta = read_meta_file(Path(params.mindrecord.out_dir) / "meta.json")
            report = run_export(params, args.model, Path("models") / args.model / "ema.ckpt",
                                Path("models") / args.model / "export", meta["num_classes"], formats=args.formats)
            metrics_path = args.metrics or Path("metrics") / f"export_{args.model}.json"
        else:
            if args.out is None or (args.num_classes is None and args.meta is None):
                raise InferenceError("with --ckpt, give --out DIR and --num-classes C (or --meta meta.json)")
            num_classes = args.num_classes or read_meta_file(args.meta)["num_classes"]
            report = run_export(params, args.model, args.ckpt, args.out, num_classes, args.input_size,
                                args.formats, check="auto")
            metrics_path = args.metrics
        if metrics_path:
            write_json(metrics_path, export_metrics(report))
    except (ExportError, CheckpointError, InferenceError, ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for fmt, r in report["formats"].items():
        if r["exported"]:
            raw, dec = r["check"]["raw"], r["check"]["decoded"]
            print(f"[{args.model}] {fmt}: {r['size_bytes'] / 2**20:.2f} MB, {r['latency_ms']:.1f} ms; raw outputs "
                  f"within {raw['max_diff_over_scale']:.1e} of their scale, {dec['paired']} detections within "
                  f"{dec['max_box_diff_px']:.1e} px")
    table = export_metrics(report).get("ap_table", {})
    for key in ("float", "end_to_end", "end_to_end_mindir", "int8"):
        if key in table:
            row = table[key]
            print(f"[{args.model}] {key}: val AP {row['AP']:.4f}, {row['file']} {row['size_mb']:.2f} MB, "
                  f"{row['latency_ms']:.1f} ms")
    if report.get("end_to_end", {}).get("built") is False:
        print(f"warning: [{args.model}] end-to-end model not built: {report['end_to_end']['reason']}",
              file=sys.stderr)
    for fmt, reason in failed_formats(report).items():
        print(f"warning: [{args.model}] {fmt} not written: {reason}", file=sys.stderr)
    print(f"[{args.model}] in-memory network {report['network_latency_ms']:.1f} ms/image; "
          f"checked on {report['check_inputs']}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
