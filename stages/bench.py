"""Speed and memory benchmarks (``make bench``):

    python -m stages.bench [--params params.yaml] [--overlay params_coco.yaml] [--device-target CPU]
                           [--quick] [--full] [--profile] [--only SECTION ...] [--by-layer] [--models d0 nanodet]
                           [--context KEY=VALUE ...]

Measures, at the params' input and batch sizes: single convolutions (framework-regression guard), the
compiled training step and its peak memory, the training input pipeline, the MindRecord conversion,
evaluation (inference + decoding + NMS, COCOeval), batch-1 latency of the exported files, and DVC's no-op
repro (``--full`` also times the whole default ``dvc repro`` in a throw-away copy). Every figure is the
median and spread of several runs. Writes metrics/bench.json (atomically) and prints a table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from msdet.bench.runner import (
    ALL_SECTIONS,
    DEFAULT_SECTIONS,
    MODELS,
    BenchOptions,
    render,
    run_benchmarks,
    write_report,
)
from msdet.bench.sections import parse_context
from msdet.cli import run
from msdet.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--overlay", default=None, help="a profile merged on top of --params, e.g. params_coco.yaml")
    ap.add_argument("--device-target", default=None, choices=("CPU", "GPU", "Ascend"),
                    help="default: runtime.device_target of the params")
    ap.add_argument("--quick", action="store_true", help="fewer runs per figure")
    ap.add_argument("--full", action="store_true", help="also time the whole default dvc repro (long)")
    ap.add_argument("--only", nargs="+", choices=ALL_SECTIONS, default=list(DEFAULT_SECTIONS), metavar="SECTION",
                    help=f"sections to run: {' '.join(ALL_SECTIONS)} (default: all but profile)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the training step (MindSpore profiler) and the input pipeline (cProfile)")
    ap.add_argument("--by-layer", action="store_true",
                    help="profile section: forward and forward+backward time per block type (see "
                         "msdet/bench/layers.py) and the CPU-core utilisation of the step, instead of the profilers")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--repeats", type=int, default=None, help="runs per figure for every section")
    ap.add_argument("--context", action="append", default=[], metavar="KEY=VALUE",
                    help="extra mindspore.set_context option for the MindSpore sections (jit_level=O1 goes "
                         "into jit_config), e.g. --context runtime_num_threads=2")
    ap.add_argument("--out", default="metrics/bench.json")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be at least 1")
    try:
        profile = ["profile"] if args.profile or args.by_layer else []
        sections = list(dict.fromkeys(list(args.only) + profile))
        opts = BenchOptions(params=args.params, overlay=args.overlay, device_target=args.device_target,
                            quick=args.quick, full=args.full, sections=sections, models=args.models,
                            context=parse_context(args.context), repeats=args.repeats,
                            by_layer=args.by_layer)
        report = run_benchmarks(opts, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_report(report, Path(args.out))
    print(render(report))
    print(f"written to {args.out}")
    if report.get("errors"):
        print(f"error: {len(report['errors'])} section(s) failed: {', '.join(report['errors'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
