"""Training-mode BatchNorm whose gradient is a compiled C++ kernel (``batch_norm.cc``), for CPU training.

MindSpore 2.8's CPU ``BatchNormGrad`` takes about 3x PyTorch's time (docs/performance.md). A training graph on
CPU runs MindSpore's own ``BatchNorm`` forward (batch statistics, and the in-place update of the moving ones)
inside a cell whose ``bprop`` is the C++ gradient, fed with the mean and variance the forward saved; inference,
GPU and Ascend keep ``nn.BatchNorm2d``. The ``batch_norm2d`` part of :mod:`msdet.train_ops`.
"""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
from mindspore import Tensor, nn, ops

from msdet.kernels.library import KernelLibrary

LIBRARY = KernelLibrary("batch_norm", Path(__file__).with_suffix(".cc"), "BatchNorm keeps MindSpore's gradient")


class BatchNormTrain(nn.Cell):
    """``primitive(x, gamma, beta, moving_mean, moving_variance)`` (a training ``ops.BatchNorm``) with the C++
    gradient as ``bprop``; ``primitive`` is the BN cell's own, swapped by precise-BN recalibration."""

    def __init__(self, primitive: ops.Primitive, eps: float) -> None:
        super().__init__()
        self.primitive = primitive
        self.cfg = Tensor([eps], ms.float32)
        self.grad = LIBRARY.op("bn_bwd", out_shape=lambda x, dy, g, m, v, cfg: (x, g, g),
                               out_dtype=lambda x, dy, g, m, v, cfg: (x, x, x))

    def construct(self, x, gamma, beta, moving_mean, moving_variance):
        return self.primitive(x, gamma, beta, moving_mean, moving_variance)

    def bprop(self, x, gamma, beta, moving_mean, moving_variance, out, dout):
        # outputs 3 and 4 of the CPU BatchNorm are the batch mean and biased variance it normalised with
        dx, dgamma, dbeta = self.grad(x, dout[0], gamma, out[3], out[4], self.cfg)
        return dx, dgamma, dbeta, ops.zeros_like(moving_mean), ops.zeros_like(moving_variance)


class FastBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, names and checkpoint layout) whose training graph differentiates
    through :class:`BatchNormTrain`; in eval mode it is the plain ``nn.BatchNorm2d``."""

    def __init__(self, num_features: int, eps: float, momentum: float) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.fast = BatchNormTrain(self.bn_train, eps)

    def set_train_primitive(self, primitive: ops.Primitive) -> None:
        """Use ``primitive`` as the training BatchNorm (precise-BN recalibration runs one with momentum 1)."""
        self.bn_train = primitive
        self.fast.primitive = primitive

    def construct(self, x: Tensor) -> Tensor:
        if self.training:
            return self.fast(x, self.gamma, self.beta, self.moving_mean, self.moving_variance)[0]
        return super().construct(x)


#: the parts of msdet.train_ops this kernel provides (float32 NCHW input)
REPLACEMENTS = {"batch_norm2d": FastBatchNorm2d}
