"""Swish (``x * sigmoid(x)``, SiLU), LeakyReLU, and the squeeze-and-excitation block's mean and gate
(``x * sigmoid(s)``) as compiled C++ kernels (``activations.cc``) for CPU training.

MindSpore 2.8 on CPU runs swish as Sigmoid + Mul and its gradient as five kernels (~80 ms of EfficientDet-D0's
step more than a ReLU in the same places); LeakyReLU as ``Maximum(0.1 x, x)``, whose gradient's two ``Select``s
took 12 % of NanoDet-Plus's step; and the SE block's mean and gate as ReduceMean and a broadcasting Mul whose
gradients take Tile, RealDiv, Muls and a ReduceSum (~75 ms of D0's step); docs/performance.md. A training graph
on CPU runs each as one ``mindspore.ops.Custom`` "aot" primitive whose ``bprop`` is the C++ gradient: the
``swish``, ``leaky_relu``, ``plane_mean`` and ``sigmoid_gate`` parts of :mod:`msdet.train_ops`, which the layers
of :mod:`msdet.models.layers` run as ``self.fast``. Inference and exported graphs keep MindSpore's ops, as do GPU
and Ascend.
"""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
from mindspore import Tensor, nn, ops

from msdet.kernels.library import KernelLibrary

# -fno-trapping-math lets GCC vectorise the clamps and selects (as compare-and-blend); -ffp-contract=off keeps
# every instruction-set copy in activations.cc to the same bits (no fused multiply-adds).
LIBRARY = KernelLibrary("activations", Path(__file__).with_suffix(".cc"), "activations keep MindSpore's ops",
                        flags=("-fno-trapping-math", "-ffp-contract=off"))


class UnaryKernel(nn.Cell):
    """``forward(x)`` (float32) as one ``Custom`` primitive whose ``bprop`` is the C++ input gradient
    ``grad(x, dy)``; ``out_shape`` maps x's shape to the output's (default: the same)."""

    def __init__(self, forward: str, grad: str, out_shape=lambda x: x) -> None:
        super().__init__()
        grad_input = LIBRARY.op(grad)

        def bprop(x, out, dout):
            return (grad_input(x, dout),)

        self.op = LIBRARY.op(forward, out_shape=out_shape, bprop=bprop)

    def construct(self, x: Tensor) -> Tensor:
        return self.op(x)


class SwishKernel(UnaryKernel):
    """``x * sigmoid(x)`` with its C++ gradient."""

    def __init__(self) -> None:
        super().__init__("swish_fwd", "swish_dx")


class LeakyReLUKernel(nn.Cell):
    """``x > 0 ? x : alpha * x`` (float32) as one ``Custom`` primitive with the C++ gradient as its ``bprop``."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.slope = Tensor([alpha], ms.float32)
        grad_input = LIBRARY.op("leaky_relu_dx")

        def bprop(x, slope, out, dout):
            return grad_input(x, dout, slope), ops.zeros_like(slope)

        self.act = LIBRARY.op("leaky_relu", bprop=bprop)

    def construct(self, x: Tensor) -> Tensor:
        return self.act(x, self.slope)


class PlaneMeanKernel(UnaryKernel):
    """Mean over H, W of ``x`` [N, C, H, W] -> [N, C, 1, 1] with its C++ gradient."""

    def __init__(self) -> None:
        super().__init__("se_mean", "se_mean_dx", out_shape=lambda x: [x[0], x[1], 1, 1])


class SigmoidGateKernel(nn.Cell):
    """``x * sigmoid(s)`` for ``x`` [N, C, H, W] and ``s`` [N, C, 1, 1] as one ``Custom`` primitive with the C++
    gradients of ``x`` and ``s`` as its ``bprop``."""

    def __init__(self) -> None:
        super().__init__()
        grad_input = LIBRARY.op("se_gate_dx", out_shape=lambda s, dy: dy, out_dtype=lambda s, dy: dy)
        grad_gate = LIBRARY.op("se_gate_ds", out_shape=lambda x, s, dy: s, out_dtype=lambda x, s, dy: s)

        def bprop(x, s, out, dout):
            return grad_input(s, dout), grad_gate(x, s, dout)

        self.gate = LIBRARY.op("se_gate", bprop=bprop)

    def construct(self, x: Tensor, s: Tensor) -> Tensor:
        return self.gate(x, s)


#: the parts of msdet.train_ops this kernel provides
REPLACEMENTS = {"swish": SwishKernel, "leaky_relu": LeakyReLUKernel, "plane_mean": PlaneMeanKernel,
                "sigmoid_gate": SigmoidGateKernel}
