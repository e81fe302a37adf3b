"""Swish (``x * sigmoid(x)``, SiLU), LeakyReLU, and the squeeze-and-excitation block's mean and gate
(``x * sigmoid(s)``) as compiled C++ kernels (``activations.cc``) for CPU training.

MindSpore 2.8 on CPU runs swish as Sigmoid + Mul and its gradient as five kernels (~80 ms of EfficientDet-D0's
step more than a ReLU in the same places); LeakyReLU as ``Maximum(0.1 x, x)``, whose gradient's two ``Select``s
took 12 % of NanoDet-Plus's step; and the SE block's mean and gate as ReduceMean and a broadcasting Mul whose
gradients take Tile, RealDiv, Muls and a ReduceSum (~75 ms of D0's step); docs/performance.md. A training graph
on CPU runs each as one ``mindspore.ops.Custom`` "aot" primitive whose ``bprop`` is the C++ gradient. Inference
and exported graphs keep MindSpore's ops, as do GPU and Ascend (their LeakyReLU trains as
``relu(x) - 0.1 relu(-x)``, the same bits). ``enable(True)`` before building a network turns the kernels on
(``setup_runtime`` does, from ``runtime.cpu_activation_kernel``); without g++ the standard ops are used after a
warning.
"""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
from mindspore import Tensor, nn, ops

from msdet.ops import native

# -fno-trapping-math lets GCC vectorise the clamps and selects (as compare-and-blend); -ffp-contract=off keeps
# every instruction-set copy in activations.cc to the same bits (no fused multiply-adds).
KERNEL = native.Kernel(Path(__file__).with_name("activations.cc"), "activations keep MindSpore's ops",
                       flags=("-fno-trapping-math", "-ffp-contract=off"))


def enable(on: bool) -> bool:
    """Switch the C++ kernel for networks built from now on; returns whether it is on (see ``native.Kernel``)."""
    return KERNEL.enable(on)


def enabled() -> bool:
    return KERNEL.on


class UnaryKernel(nn.Cell):
    """``forward(x)`` (float32) as one ``Custom`` primitive whose ``bprop`` is the C++ input gradient
    ``grad(x, dy)``; ``out_shape`` maps x's shape to the output's (default: the same)."""

    def __init__(self, library: Path, forward: str, grad: str, out_shape=lambda x: x) -> None:
        super().__init__()
        grad_input = ops.Custom(f"{library}:{grad}", out_shape=lambda x, dy: x, out_dtype=lambda x, dy: x,
                                func_type="aot")

        def bprop(x, out, dout):
            return (grad_input(x, dout),)

        self.op = ops.Custom(f"{library}:{forward}", out_shape=out_shape, out_dtype=lambda x: x, func_type="aot",
                             bprop=bprop)

    def construct(self, x: Tensor) -> Tensor:
        return self.op(x)


class SwishKernel(UnaryKernel):
    """``x * sigmoid(x)`` with its C++ gradient."""

    def __init__(self, library: Path) -> None:
        super().__init__(library, "swish_fwd", "swish_dx")


class Swish(nn.Cell):
    """``x * sigmoid(x)`` written out, so export formats without a SiLU op still get it; a training graph built
    while the kernel is enabled runs ``SwishKernel`` instead."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = SwishKernel(KERNEL.library) if enabled() else None

    def construct(self, x: Tensor) -> Tensor:
        if self.training and self.fast is not None:
            return self.fast(x)
        return x * ops.sigmoid(x)


class LeakyReLUKernel(nn.Cell):
    """``x > 0 ? x : alpha * x`` (float32) as one ``Custom`` primitive with the C++ gradient as its ``bprop``."""

    def __init__(self, alpha: float, library: Path) -> None:
        super().__init__()
        self.slope = Tensor([alpha], ms.float32)
        grad_input = ops.Custom(f"{library}:leaky_relu_dx", out_shape=lambda x, dy, a: x,
                                out_dtype=lambda x, dy, a: x, func_type="aot")

        def bprop(x, slope, out, dout):
            return grad_input(x, dout, slope), ops.zeros_like(slope)

        self.act = ops.Custom(f"{library}:leaky_relu", out_shape=lambda x, a: x, out_dtype=lambda x, a: x,
                              func_type="aot", bprop=bprop)

    def construct(self, x: Tensor) -> Tensor:
        return self.act(x, self.slope)


class LeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` whose training graph is ``LeakyReLUKernel`` when built while the kernel is enabled, else
    ``relu(x) - alpha * relu(-x)``: both give PyTorch's values and gradients bit for bit (``0 - alpha * -x`` is
    ``alpha * x`` exactly; the gradient is ``dy`` or ``alpha * dy`` plus an exact zero), where MindSpore lowers
    ``nn.LeakyReLU`` to ``Maximum(alpha * x, x)``, whose gradient is two slow ``Select`` kernels. Eval and export
    keep the one op."""

    def __init__(self, alpha: float = 0.2) -> None:
        super().__init__(alpha=alpha)
        self.fast = LeakyReLUKernel(alpha, KERNEL.library) if enabled() else None

    def construct(self, x: Tensor) -> Tensor:
        if self.training:
            if self.fast is not None:
                return self.fast(x)
            return ops.relu(x) - self.alpha * ops.relu(-x)
        return super().construct(x)


class PlaneMeanKernel(UnaryKernel):
    """Mean over H, W of ``x`` [N, C, H, W] -> [N, C, 1, 1] with its C++ gradient."""

    def __init__(self, library: Path) -> None:
        super().__init__(library, "se_mean", "se_mean_dx", out_shape=lambda x: [x[0], x[1], 1, 1])


class SigmoidGateKernel(nn.Cell):
    """``x * sigmoid(s)`` for ``x`` [N, C, H, W] and ``s`` [N, C, 1, 1] as one ``Custom`` primitive with the C++
    gradients of ``x`` and ``s`` as its ``bprop``."""

    def __init__(self, library: Path) -> None:
        super().__init__()
        grad_input = ops.Custom(f"{library}:se_gate_dx", out_shape=lambda s, dy: dy, out_dtype=lambda s, dy: dy,
                                func_type="aot")
        grad_gate = ops.Custom(f"{library}:se_gate_ds", out_shape=lambda x, s, dy: s,
                               out_dtype=lambda x, s, dy: s, func_type="aot")

        def bprop(x, s, out, dout):
            return grad_input(s, dout), grad_gate(x, s, dout)

        self.gate = ops.Custom(f"{library}:se_gate", out_shape=lambda x, s: x, out_dtype=lambda x, s: x,
                               func_type="aot", bprop=bprop)

    def construct(self, x: Tensor, s: Tensor) -> Tensor:
        return self.gate(x, s)


class PlaneMean(nn.Cell):
    """The SE block's squeeze, ``mean(x, (2, 3), keep_dims=True)``; ``PlaneMeanKernel`` in a training graph built
    while the kernel is enabled."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = PlaneMeanKernel(KERNEL.library) if enabled() else None

    def construct(self, x: Tensor) -> Tensor:
        if self.training and self.fast is not None:
            return self.fast(x)
        return ops.mean(x, (2, 3), True)


class SigmoidGate(nn.Cell):
    """The SE block's excitation, ``sigmoid(s) * x``; ``SigmoidGateKernel`` in a training graph built while the
    kernel is enabled."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = SigmoidGateKernel(KERNEL.library) if enabled() else None

    def construct(self, x: Tensor, s: Tensor) -> Tensor:
        if self.training and self.fast is not None:
            return self.fast(x, s)
        return ops.sigmoid(s) * x
