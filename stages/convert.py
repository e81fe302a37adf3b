"""Convert official PyTorch weights to a MindSpore checkpoint of ours (no PyTorch needed, no code from the file run).

    python -m stages.convert --model d0 --src efficientdet-d0.pth --out weights/official/d0.ckpt
    python -m stages.convert --model nanodet --src nanodet-plus-m_320.pth --out weights/official/nanodet.ckpt

d0: zylo117/Yet-Another-EfficientDet-Pytorch weights (90 COCO classes: class k = category id k + 1, recorded
in the checkpoint). nanodet: RangiLyu/nanodet NanoDet-Plus-m ``.pth`` or Lightning ``.ckpt`` (the EMA
``avg_model.*`` copy is preferred). The checkpoint then works with ``<model>.init``, ``stages.export --ckpt``
and ``stages.eval --ckpt``. ``--meta data/mindrecord/meta.json`` cuts the class head to that data set's
categories (by COCO category id, in its order): for COCO, an 80-class checkpoint that keeps every
pretrained class weight. ``--report FILE.json`` writes what was done (it doubles as ``stages.infer --meta``).
"""
from __future__ import annotations

import argparse
import sys

from msdet.cli import run
from msdet.config import ConfigError, load_params
from msdet.conversion.converters import MODELS, ConversionError, convert_file
from msdet.conversion.torch_reader import CheckpointError
from msdet.engine.runtime import setup_runtime
from msdet.inference import ClassNames, InferenceError, read_meta_file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=MODELS)
    ap.add_argument("--src", required=True, help="official .pth / .ckpt file")
    ap.add_argument("--out", required=True, help="MindSpore checkpoint to write")
    ap.add_argument("--num-classes", type=int, default=None, help="expected class count (default: the file's)")
    ap.add_argument("--meta", default=None, help="a MindRecord meta.json: keep only its categories' class rows")
    ap.add_argument("--report", default=None, help="also write the conversion report (JSON) here")
    ap.add_argument("--params", default="params.yaml", help="params file (the model block is read from it)")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        categories = None
        if args.meta:
            classes = ClassNames.from_meta(read_meta_file(args.meta), args.meta)
            categories = [{"id": i, "name": n} for i, n in zip(classes.category_ids, classes.names)]
        setup_runtime(params.runtime)
        report = convert_file(args.model, args.src, args.out, args.num_classes, categories=categories,
                              cfg=getattr(params, args.model), report_path=args.report, seed=params.runtime.seed)
    except (ConversionError, CheckpointError, ConfigError, InferenceError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"[{args.model}] wrote {args.out}" + (f" and {args.report}" if args.report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
