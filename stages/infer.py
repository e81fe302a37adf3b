"""Detect objects in image files with a checkpoint or an exported MINDIR.

    python -m stages.infer --model nanodet --ckpt FILE.ckpt [--input-size N]
                           [--num-classes C | --meta data/mindrecord/meta.json] [--score 0.3] [--draw]
                           [--out DIR] IMAGE_OR_DIR [...]
    python -m stages.infer --model nanodet --mindir FILE.mindir ... IMAGE_OR_DIR

Writes DIR/detections.json (per image: box x1,y1,x2,y2 in original pixels, score, class index, category id,
class name) and, with --draw, DIR/<image stem>.png with the labelled boxes. Class names and category ids come
from --meta (default: the MindRecord meta.json of params.yaml, when present); with --num-classes alone the
classes are named class_<k> and have no category id. NMS IoU, max detections and pre-NMS top-k come from
the eval section of params.yaml (its defaults when the file is absent).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msdet.cli import run
from msdet.config import ConfigError, Params, load_params
from msdet.data.meta import META_FILE
from msdet.detectors import MODEL_NAMES, get_detector
from msdet.engine.checkpoint import CheckpointError
from msdet.engine.runtime import setup_runtime
from msdet.evaluation.runner import nms_iou_for
from msdet.export.exporter import ExportError
from msdet.inference import (
    ClassNames,
    InferenceError,
    Predictor,
    eval_preprocess,
    exported_forward,
    exported_weights_meta,
    list_images,
    load_network,
    network_forward,
    read_meta_file,
    run_inference,
    with_model_cfg,
)


def resolve_classes(meta_arg: str | None, num_classes: int | None, params: Params) -> ClassNames:
    default_meta = Path(params.mindrecord.out_dir) / META_FILE
    meta_path = meta_arg or (str(default_meta) if num_classes is None and default_meta.is_file() else None)
    if meta_path is None:
        if num_classes is None:
            raise InferenceError(f"give --num-classes C or --meta path/to/meta.json ({default_meta} not found)")
        if num_classes < 1:
            raise InferenceError(f"--num-classes must be at least 1, got {num_classes}")
        return ClassNames.anonymous(num_classes)
    classes = ClassNames.from_meta(read_meta_file(meta_path), meta_path)
    if num_classes is not None and num_classes != len(classes):
        raise InferenceError(f"--num-classes {num_classes} disagrees with {meta_path} ({len(classes)} classes)")
    return classes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    ap.add_argument("--model", required=True, choices=MODEL_NAMES)
    weights = ap.add_mutually_exclusive_group(required=True)
    weights.add_argument("--ckpt", help="MindSpore checkpoint of the model (ours or converted official)")
    weights.add_argument("--mindir", help="exported MINDIR (or .onnx) file of the model")
    ap.add_argument("--input-size", type=int, default=None,
                    help="network input size (default: the MINDIR's, or the model's params value)")
    ap.add_argument("--num-classes", type=int, default=None)
    ap.add_argument("--meta", default=None, help="MindRecord meta.json with class names and category ids")
    ap.add_argument("--score", type=float, default=0.3, help="score threshold (default 0.3)")
    ap.add_argument("--draw", action="store_true", help="also write images with the labelled boxes")
    ap.add_argument("--out", default="infer_out", help="output folder (default infer_out)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        if not 0.0 <= args.score <= 1.0:
            raise InferenceError(f"--score must be in [0, 1], got {args.score}")
        params = load_params(args.params)
        files = [f for item in args.inputs for f in list_images(item)]
        classes = resolve_classes(args.meta, args.num_classes, params)
        setup_runtime(params.runtime)
        cfg = getattr(params, args.model)
        if args.ckpt:
            detector = get_detector(args.model, with_model_cfg(cfg, args.input_size), len(classes))
            forward = network_forward(detector, load_network(detector, args.ckpt))
            weights_file = args.ckpt
        else:
            forward, size = exported_forward(args.mindir, args.input_size)
            detector = get_detector(args.model, with_model_cfg(cfg, size), len(classes))
            saved = exported_weights_meta(args.mindir)
            detector.use_weights_meta({k: saved.get(k) for k in detector.weights_meta()}, args.mindir)
            weights_file = args.mindir
        predictor = Predictor(detector, forward, eval_preprocess(args.model, detector.input_size),
                              score_threshold=args.score, iou_threshold=nms_iou_for(args.model, params.eval),
                              max_detections=params.eval.max_detections, pre_nms_top_k=params.eval.pre_nms_top_k)
        info = {"model": args.model, "weights": str(weights_file), "input_size": detector.input_size,
                "num_classes": detector.num_classes, **detector.weights_meta()}
        doc = run_inference(predictor, files, classes, args.out, draw=args.draw, info=info,
                            progress=lambda path, n: print(f"{path}: {n} detections"))
    except (InferenceError, CheckpointError, ExportError, ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"[{args.model}] {len(doc['images'])} images -> {Path(args.out) / 'detections.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
