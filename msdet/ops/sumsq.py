"""The sum of squares of many tensors (the global norm of gradient clipping) as one compiled C++ kernel
(``sumsq.cc``) for CPU training.

MindSpore runs it as Square and ReduceSum per tensor plus one AddN: 920 kernels for D0's 460 weight gradients,
~60 ms per step against ~8 ms for the one op (docs/performance.md). ``enable(True)`` before building the training
step turns it on (``setup_runtime`` does, from ``runtime.cpu_grad_norm_kernel``); GPU and Ascend, and CPU without
g++ (after a warning), keep MindSpore's ops.
"""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
from mindspore import Tensor, nn, ops

from msdet.ops import native

KERNEL = native.Kernel(Path(__file__).with_name("sumsq.cc"), "the gradient norm keeps MindSpore's per-tensor ops")

_square_sum = ops.MultitypeFuncGraph("square_sum")


@_square_sum.register("Tensor")
def _square_sum_one(t):
    return ops.reduce_sum(ops.square(t.astype(ms.float32)))


def enable(on: bool) -> bool:
    """Switch the C++ kernel for cells built from now on; returns whether it is on (see ``native.Kernel``)."""
    return KERNEL.enable(on)


def enabled() -> bool:
    return KERNEL.on


class SquareSum(nn.Cell):
    """``sum_i sum(t_i ** 2)`` over a tuple of tensors, a 0-d float32: one ``Custom`` op (float32 tensors) when
    built while the kernel is enabled, else per-tensor ``Square`` + ``ReduceSum`` and an ``AddN``."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = enabled()
        if self.fast:
            self.op = ops.Custom(f"{KERNEL.library}:sum_squares", out_shape=lambda *shapes: [],
                                 out_dtype=lambda *dtypes: dtypes[0], func_type="aot")
        self.hyper_map = ops.HyperMap()

    def construct(self, tensors: tuple) -> Tensor:
        if self.fast:
            return self.op(*tensors)
        return ops.addn(self.hyper_map(_square_sum, tensors))
