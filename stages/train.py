"""DVC stages train_d0 / train_nanodet: ``python -m stages.train --model d0|nanodet [--workers N]``.

With ``runtime.workers`` (or ``--workers``) above 1 the stage relaunches itself on that many data-parallel
workers with msrun (``make train-8p``); each worker then runs this same file, and rank 0 writes the outputs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msdet.config import load_params
from msdet.engine.distributed import launched_distributed
from msdet.engine.launch import DistributedJobFailed, run_distributed
from msdet.training import check_starting_weights_tracked, read_meta, train_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, choices=("d0", "nanodet"))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--workers", type=int, default=None, help="data-parallel workers (default: runtime.workers)")
    ap.add_argument("--stop-after-epochs", type=int, default=None,
                    help="end after this many epochs, as an interruption would; a rerun resumes")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    try:
        check_starting_weights_tracked(getattr(params, args.model), args.model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    workers = args.workers or params.runtime.workers
    if workers > 1 and not launched_distributed():
        log_dir = Path("logs") / "msrun" / args.model
        forwarded = ["--model", args.model, "--params", args.params, "--workers", str(workers)]
        if args.stop_after_epochs is not None:
            forwarded += ["--stop-after-epochs", str(args.stop_after_epochs)]
        try:
            run_distributed(__file__, forwarded, workers, log_dir, rank_table=params.runtime.rank_table or None)
        except DistributedJobFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"[{args.model}] trained on {workers} workers; logs in {log_dir}")
        return 0
    validate = None
    if getattr(params, args.model).train.eval_every_epochs:
        from msdet.evaluation.runner import Validator

        categories = read_meta(params.mindrecord.out_dir)["categories"]
        validate = Validator(params, args.model, [c["id"] for c in categories])
    card = train_model(params, args.model, params.mindrecord.out_dir, Path("models") / args.model,
                       live_dir=Path("dvclive") / args.model, stop_after_epochs=args.stop_after_epochs,
                       validate=validate)
    if card is not None:
        print(f"[{args.model}] done: {card['epochs']} epochs in {card['wall_time_s']:.0f} s, "
              f"final losses {card['final_losses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
