"""DVC stage eval_<model>: COCO metrics of the EMA weights (``eval.checkpoint: best``: the best validated
epoch's) on the val split.

    python -m stages.eval --model d0|nanodet [--ckpt models/<model>/ema.ckpt]

Writes metrics/<model>.json (12 COCO stats, per-class AP, throughput, per-class precision and recall at the
score threshold), plots/<model>/pr_curve.csv, plots/<model>/confusion.csv (the classes plus background at
IoU 0.5 and eval.score_threshold, for DVC's confusion template) and plots/<model>/images/*.png (predictions in
red, ground truth in green).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msdet.cli import run
from msdet.config import load_params
from msdet.evaluation.runner import run_eval


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=("d0", "nanodet"))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--ckpt", default=None,
                    help="weights to evaluate (default: models/<model>/<eval.checkpoint>.ckpt, ema or best)")
    ap.add_argument("--metrics", default=None, help="default: metrics/<model>.json")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    ckpt = args.ckpt or Path("models") / args.model / f"{params.eval.checkpoint}.ckpt"
    metrics = run_eval(params, args.model, ckpt, args.metrics or Path("metrics") / f"{args.model}.json",
                       Path("plots") / args.model)
    print(f"[{args.model}] AP {metrics['AP']:.4f}  AP50 {metrics['AP50']:.4f}  on {metrics['num_images']} images, "
          f"{metrics['inference_images_per_s']:.1f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
