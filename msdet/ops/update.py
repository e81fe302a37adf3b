"""AdamW and the EMA over all of a network's tensors, each as one compiled C++ kernel (``update.cc``) that updates
the Parameters in place, for CPU training.

MindSpore dispatches one ``AdamWeightDecay`` per weight tensor and a ``Sub`` and an ``ApplyGradientDescent`` per
EMA tensor: ~2,000 kernels a step for NanoDet-Plus, ~75 ms of its step on this machine, most of it dispatch
(docs/performance.md). The ops here take every tensor as an input and write the weights, moments and shadows
through the input pointers; MindSpore does not know about those writes, so callers order what reads them after
the op through its 0-d output (``ops.depend``). ``enable(True)`` before building the training step turns them on
(``setup_runtime`` does, from ``runtime.cpu_update_kernel``); GPU and Ascend, and CPU without g++ (after a
warning), keep MindSpore's per-tensor ops.
"""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
from mindspore import nn, ops

from msdet.ops import native

KERNEL = native.Kernel(Path(__file__).with_name("update.cc"), "AdamW and the EMA keep MindSpore's per-tensor ops",
                       flags=("-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off"))


def enable(on: bool) -> bool:
    """Switch the C++ kernel for cells built from now on; returns whether it is on (see ``native.Kernel``)."""
    return KERNEL.enable(on)


def enabled() -> bool:
    return KERNEL.on


def _flag(*_) -> list:
    return []


def _float32(*_):
    return ms.float32


def _writing_custom(library: Path, entry: str) -> ops.Custom:
    """The ``Custom`` op ``entry``, marked as writing memory (``side_effect_mem``): without the mark the graph
    hands the op copies of the Parameters (``TensorMove``), and the writes are lost."""
    op = ops.Custom(f"{library}:{entry}", out_shape=_flag, out_dtype=_float32, func_type="aot")
    op.add_prim_attr("side_effect_mem", True)
    return op


class AdamWUpdate(nn.Cell):
    """``self(hyper, decays, params, m, v, grads)``: MindSpore's ``AdamWeightDecay`` on every tensor of the
    tuples, in place; ``hyper`` = [lr, beta1, beta2, eps, decay factor], ``decays`` the per-tensor weight decay
    (the decay used is their product). Returns a 0-d flag to order later reads by."""

    def __init__(self, library: Path) -> None:
        super().__init__()
        self.op = _writing_custom(library, "adamw_update")

    def construct(self, hyper, decays, params: tuple, m: tuple, v: tuple, grads: tuple):
        return self.op(hyper, decays, *params, *m, *v, *grads)


class EMAUpdate(nn.Cell):
    """``self(rate, shadows, sources)``: ``shadow -= rate (shadow - source)`` on every pair, in place (as
    ``ApplyGradientDescent(shadow, rate, shadow - source)``). Returns a 0-d flag to order later reads by."""

    def __init__(self, library: Path) -> None:
        super().__init__()
        self.op = _writing_custom(library, "ema_update")

    def construct(self, rate, shadows: tuple, sources: tuple):
        return self.op(rate, *shadows, *sources)
