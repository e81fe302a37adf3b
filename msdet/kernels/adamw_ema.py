"""AdamW and the EMA over all of a network's tensors, each as one compiled C++ kernel (``adamw_ema.cc``) that
updates the Parameters in place, for CPU training.

MindSpore dispatches one ``AdamWeightDecay`` per weight tensor and a ``Sub`` and an ``ApplyGradientDescent`` per
EMA tensor: ~2,000 kernels a step for NanoDet-Plus, ~75 ms of its step on this machine, most of it dispatch
(docs/performance.md). The ops here take every tensor as an input and write the weights, moments and shadows
through the input pointers; MindSpore does not know about those writes, so callers order what reads them after
the op through its 0-d output (``ops.depend``). The ``adamw_update`` and ``ema_update`` parts of
:mod:`msdet.train_ops` (:class:`msdet.engine.optim.AdamW`, :class:`msdet.engine.ema.EMA`); GPU and Ascend, and CPU
with the kernel off, keep MindSpore's per-tensor ops.
"""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
from mindspore import nn

from msdet.kernels.library import KernelLibrary

LIBRARY = KernelLibrary("adamw_ema", Path(__file__).with_suffix(".cc"),
                        "AdamW and the EMA keep MindSpore's per-tensor ops",
                        flags=("-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off"))


def _flag(*_) -> list:
    return []


def _float32(*_):
    return ms.float32


class AdamWUpdate(nn.Cell):
    """``self(hyper, decays, params, m, v, grads)``: MindSpore's ``AdamWeightDecay`` on every tensor of the
    tuples, in place, on the gradients times ``hyper``'s grad_scale; ``hyper`` = [lr, beta1, beta2, eps, decay
    factor, grad_scale], ``decays`` the per-tensor weight decay (the decay used is their product). Returns a 0-d
    flag to order later reads by."""

    def __init__(self) -> None:
        super().__init__()
        self.op = LIBRARY.op("adamw_update", out_shape=_flag, out_dtype=_float32, writes=True)

    def construct(self, hyper, decays, params: tuple, m: tuple, v: tuple, grads: tuple):
        return self.op(hyper, decays, *params, *m, *v, *grads)


class EMAUpdate(nn.Cell):
    """``self(rate, shadows, sources)``: ``shadow -= rate (shadow - source)`` on every pair, in place (as
    ``ApplyGradientDescent(shadow, rate, shadow - source)``). Returns a 0-d flag to order later reads by."""

    def __init__(self) -> None:
        super().__init__()
        self.op = LIBRARY.op("ema_update", out_shape=_flag, out_dtype=_float32, writes=True)

    def construct(self, rate, shadows: tuple, sources: tuple):
        return self.op(rate, *shadows, *sources)


#: the parts of msdet.train_ops this kernel provides
REPLACEMENTS = {"adamw_update": AdamWUpdate, "ema_update": EMAUpdate}
