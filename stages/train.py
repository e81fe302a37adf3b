"""DVC stages train_d0 / train_nanodet: ``python -m stages.train --model d0|nanodet [--workers N]``.

With ``runtime.workers`` (or ``--workers``) above 1 the stage relaunches itself on that many data-parallel
workers with msrun (``make train-8p``); each worker then runs this same file, and rank 0 writes the outputs.
Several hosts: run it on each with ``--nodes N --node-rank r --master-addr HOST --master-port P`` (or the
``runtime.*`` params of the same names); global rank 0 (on node 0) writes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msdet.cli import run
from msdet.config import load_params
from msdet.data.meta import read_meta
from msdet.devtools.stage_deps import code_sha256
from msdet.engine.distributed import launched_distributed
from msdet.engine.launch import Cluster, DistributedJobFailed, run_distributed
from msdet.training import check_starting_weights_tracked, train_model

#: the project checkout: the code fingerprint covers the files this stage imports from it
ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True, choices=("d0", "nanodet"))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--workers", type=int, default=None, help="data-parallel workers (default: runtime.workers)")
    ap.add_argument("--nodes", type=int, default=None, help="hosts in the job (default: runtime.nodes)")
    ap.add_argument("--node-rank", type=int, default=None, help="this host's index (default: runtime.node_rank)")
    ap.add_argument("--master-addr", default=None, help="node 0's address (default: runtime.master_addr)")
    ap.add_argument("--master-port", type=int, default=None, help="scheduler port (default: runtime.master_port)")
    ap.add_argument("--stop-after-epochs", type=int, default=None,
                    help="end after this many epochs, as an interruption would; a rerun resumes")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    rt = params.runtime
    try:
        check_starting_weights_tracked(getattr(params, args.model), args.model)
        cluster = Cluster(nodes=_pick(args.nodes, rt.nodes), node_rank=_pick(args.node_rank, rt.node_rank),
                          master_addr=_pick(args.master_addr, rt.master_addr),
                          master_port=_pick(args.master_port, rt.master_port))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    workers = args.workers or rt.workers
    if (workers > 1 or cluster.nodes > 1) and not launched_distributed():
        log_dir = Path("logs") / "msrun" / args.model
        if cluster.nodes > 1:  # hosts may share this directory (a cluster file system)
            log_dir = log_dir / f"node{cluster.node_rank}"
        forwarded = ["--model", args.model, "--params", args.params, "--workers", str(workers)]
        if args.stop_after_epochs is not None:
            forwarded += ["--stop-after-epochs", str(args.stop_after_epochs)]
        try:
            run_distributed(__file__, forwarded, workers, log_dir, timeout_s=rt.job_timeout_s or None,
                            rank_table=rt.rank_table or None, cluster=cluster)
        except DistributedJobFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        where = f" x {cluster.nodes} nodes (this is node {cluster.node_rank})" if cluster.nodes > 1 else ""
        print(f"[{args.model}] trained on {workers} workers{where}; logs in {log_dir}")
        return 0
    validate = None
    if getattr(params, args.model).train.eval_every_epochs:
        from msdet.evaluation.runner import Validator

        categories = read_meta(params.mindrecord.out_dir)["categories"]
        validate = Validator(params, args.model, [c["id"] for c in categories])
    card = train_model(params, args.model, params.mindrecord.out_dir, Path("models") / args.model,
                       live_dir=Path("dvclive") / args.model, stop_after_epochs=args.stop_after_epochs,
                       validate=validate,
                       code_sha256=code_sha256(f"python -m stages.train --model {args.model}", ROOT))
    if card is not None:
        print(f"[{args.model}] done: {card['epochs']} epochs in {card['wall_time_s']:.0f} s, "
              f"final losses {card['final_losses']}")
    return 0


def _pick(cli, param):
    return param if cli is None else cli


if __name__ == "__main__":
    sys.exit(run(main))
