"""The sum of squares of many tensors (the global norm of gradient clipping) as one compiled C++ kernel
(``grad_norm.cc``) for CPU training.

MindSpore runs it as Square and ReduceSum per tensor plus one AddN: 920 kernels for D0's 460 weight gradients,
~60 ms per step against ~8 ms for the one op (docs/performance.md). The ``square_sum`` part of
:mod:`msdet.train_ops` (:class:`msdet.engine.optim.SquareSum` runs it); GPU and Ascend, and CPU with the kernel
off, keep MindSpore's ops.
"""
from __future__ import annotations

from pathlib import Path

from msdet.kernels.library import KernelLibrary

LIBRARY = KernelLibrary("grad_norm", Path(__file__).with_suffix(".cc"),
                        "the gradient norm keeps MindSpore's per-tensor ops")


def square_sum():
    """``sum_squares(t_1, ..., t_k)``: one 0-d float32 over float32 tensors."""
    return LIBRARY.op("sum_squares", out_shape=lambda *shapes: [], out_dtype=lambda *dtypes: dtypes[0])


#: the parts of msdet.train_ops this kernel provides
REPLACEMENTS = {"square_sum": square_sum}
