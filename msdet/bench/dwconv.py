"""Depthwise convs, backward formulations side by side (``python -m msdet.bench.dwconv``).

``conv``: MindSpore's ``nn.Conv2d(group=C)``; ``kernel``: :class:`msdet.kernels.depthwise_conv.FastDepthwiseConv2d`
(C++ forward and backward). Every case is compiled in graph mode once per formulation, then timed in
interleaved rounds (each round runs every formulation ``repeats`` times, in turn), so all see the same load; the
figures are medians over rounds of the per-round median, and the ratios are medians of the per-round ratios to ``conv``.
``--train-step d0|nanodet``: the whole compiled training step (as ``make bench`` builds it) with MindSpore's
op and with the kernel (``--kernel depthwise_conv|group_norm|...``, any of msdet.kernels.layer.KERNELS; the
others as ``params.yaml`` sets them), two networks from the same seed in one process, steps interleaved.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import numpy as np

from msdet.config import CPU_KERNELS

#: (name, batch, channels, height, width, kernel, stride, "same" padding (D0) or (k - 1) / 2 (NanoDet)), at the
#: default 128 px, batch 8
CASES = (
    ("d0_k3_144x32_s1", 8, 144, 32, 32, 3, 1, True),
    ("d0_k3_96x64_s2", 8, 96, 64, 64, 3, 2, True),
    ("d0_k3_144x32_s2", 8, 144, 32, 32, 3, 2, True),
    ("d0_k5_240x16_s1", 8, 240, 16, 16, 5, 1, True),
    ("d0_k5_144x32_s2", 8, 144, 32, 32, 5, 2, True),
    ("nanodet_k3_58x16_s1", 8, 58, 16, 16, 3, 1, False),
    ("nanodet_k3_96x16_s1", 8, 96, 16, 16, 3, 1, False),
    ("nanodet_k5_96x16_s1", 8, 96, 16, 16, 5, 1, False),
)
FORMULATIONS = ("conv", "kernel")


def _cell(formulation: str, channels: int, kernel: int, stride: int, same: bool) -> Any:
    from mindspore import nn

    from msdet.kernels import depthwise_conv as dwconv

    pad_mode, padding = ("same", 0) if same else ("pad", (kernel - 1) // 2)
    if formulation == "conv":
        return nn.Conv2d(channels, channels, kernel, stride=stride, pad_mode=pad_mode, padding=padding,
                         has_bias=False, group=channels)
    if not dwconv.LIBRARY.enable(True):
        raise RuntimeError("the depthwise conv kernel could not be built")
    return dwconv.conv2d(channels, channels, kernel, stride=stride, pad_mode=pad_mode, padding=padding, group=channels)


def bench(rounds: int = 7, repeats: int = 3, cases: tuple = CASES) -> dict[str, Any]:
    """{case: {formulation: {mode: ms summary}, "ratio": {formulation: {mode: ratio summary}}}}."""
    import mindspore as ms

    from msdet.bench.layers import LayerCase, runner
    from msdet.bench.sections import _timed
    from msdet.bench.stats import summarize

    ms.set_context(mode=ms.GRAPH_MODE)
    report: dict[str, Any] = {"load_start": os.getloadavg()[0]}
    rng = np.random.default_rng(0)
    for name, batch, channels, height, width, kernel, stride, same in cases:
        x = rng.normal(size=(batch, channels, height, width)).astype(np.float32)
        runs = {}
        for form in FORMULATIONS:
            cell = _cell(form, channels, kernel, stride, same)
            cell.set_train(True)
            case = LayerCase(name, form, cell, (ms.Tensor(x),), grad_inputs=(0,))
            for mode in ("forward", "forward_backward"):
                runs[form, mode] = runner(case, mode)
                runs[form, mode]()  # compile
        times: dict[tuple, list] = {key: [] for key in runs}
        for _ in range(rounds):
            for key, run in runs.items():
                times[key].append(float(np.median([_timed(run)[0] * 1000.0 for _ in range(repeats)])))
        entry: dict[str, Any] = {f: {m: summarize(times[f, m]) for m in ("forward", "forward_backward")}
                                 for f in FORMULATIONS}
        entry["ratio_to_conv"] = {
            f: {m: summarize(np.array(times[f, m]) / np.array(times["conv", m]), digits=3)
                for m in ("forward", "forward_backward")} for f in FORMULATIONS[1:]}
        report[name] = entry
    report["load_end"] = os.getloadavg()[0]
    return report


def bench_train_step(params: Any, model: str, num_classes: int, rounds: int = 7,
                     kernel_module: str = "depthwise_conv") -> dict[str, Any]:
    """{"standard_ms", "kernel_ms", "ratio"}: one step of each per round, in turn (after one compiling step);
    ``kernel_module``: a kernel of msdet.kernels.layer.KERNELS, removed then put back (the kernel layer of
    ``model`` must be on: ``sections.setup(..., train_model=model)``)."""
    from msdet import train_ops
    from msdet.bench.layers import train_step_runner
    from msdet.bench.sections import _timed, _timed_cpu
    from msdet.bench.stats import summarize

    if kernel_module not in train_ops.installed():
        raise RuntimeError(f"the {kernel_module} kernel is not on (runtime.cpu_kernels, or it could not be built)")
    installed = train_ops.snapshot()
    train_ops.remove(kernel_module)
    standard = train_step_runner(params, model, num_classes)
    train_ops.restore(installed)
    kernel = train_step_runner(params, model, num_classes)
    first = {"standard": _timed(standard)[0], "kernel": _timed(kernel)[0]}
    times: dict[str, list] = {"standard": [], "kernel": []}
    load_start = os.getloadavg()[0]
    for _ in range(rounds):
        for name, run in (("standard", standard), ("kernel", kernel)):
            times[name].append(np.array(_timed_cpu(run)) * 1000.0)
    wall = {k: np.array(v)[:, 0] for k, v in times.items()}
    cpu = {k: np.array(v)[:, 1] for k, v in times.items()}
    return {"model": model, "kernel": kernel_module, "load_start": load_start, "load_end": os.getloadavg()[0],
            "first_call_s": {k: round(v, 1) for k, v in first.items()},
            "standard_ms": summarize(wall["standard"]), "kernel_ms": summarize(wall["kernel"]),
            "ratio": summarize(wall["kernel"] / wall["standard"], digits=3),
            "standard_cpu_ms": summarize(cpu["standard"]), "kernel_cpu_ms": summarize(cpu["kernel"]),
            "cpu_ratio": summarize(cpu["kernel"] / cpu["standard"], digits=3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3, help="runs per formulation per round")
    parser.add_argument("--train-step", choices=("d0", "nanodet"), default=None,
                        help="time the whole training step with and without the kernel instead")
    parser.add_argument("--kernel", choices=CPU_KERNELS, default="depthwise_conv",
                        help="with --train-step: the kernel to switch")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--mindrecord-dir", default="data/mindrecord")
    args = parser.parse_args(argv)
    if args.train_step:
        from msdet.bench.sections import dataset_num_classes, setup
        from msdet.config import load_params

        params = load_params(args.params)
        setup(params, {}, args.train_step)
        report = bench_train_step(params, args.train_step, dataset_num_classes(args.mindrecord_dir), args.rounds,
                                  args.kernel)
        print(json.dumps(report, indent=1))
        return 0
    report = bench(args.rounds, args.repeats)
    print(json.dumps(report, indent=1))
    print(f"load {report['load_start']:.1f} -> {report['load_end']:.1f}; ms medians over rounds "
          f"(min..max) of {', '.join(FORMULATIONS)}; ratio = median per-round time / conv's")
    for name, *_ in CASES:
        e = report[name]
        for mode in ("forward", "forward_backward"):
            cells = [f"{f} {e[f][mode]['median']:.1f} ({e[f][mode]['min']:.1f}..{e[f][mode]['max']:.1f})"
                     for f in FORMULATIONS]
            ratios = [f"{f} {r[mode]['median']:.2f}" for f, r in e["ratio_to_conv"].items()]
            print(f"{name:20s} {mode:17s} " + " | ".join(cells) + " | ratios " + ", ".join(ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
