"""Training-mode BatchNorm, fused with the activation that follows it, as compiled C++ kernels
(``batch_norm.cc``) for CPU training.

MindSpore 2.8 on CPU runs a BatchNorm forward at about twice PyTorch's time and its gradient at three times,
and each BatchNorm + activation pair as four kernels a step (docs/performance.md). A training graph on CPU runs
the pair as one ``Custom`` op each way: the forward normalises with the batch statistics, applies the activation
and updates the moving statistics in place, as MindSpore's ``BatchNorm`` does; its ``bprop`` recomputes the
pre-activation and returns the gradients of the input, gamma and beta. A network marks a pair with
:func:`msdet.models.layers.norm_act`; a BatchNorm with no activation marked runs the same op with none.
Inference, GPU and Ascend keep ``nn.BatchNorm2d``. The ``batch_norm2d`` part of :mod:`msdet.train_ops`.
"""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
from mindspore import Tensor, nn, ops

from msdet.kernels.library import ACTIVATION_CODES, FusedActivation, KernelLibrary

# -fno-trapping-math and -ffp-contract=off as activations.py: the swish copies vectorise and agree to the bit
LIBRARY = KernelLibrary("batch_norm", Path(__file__).with_suffix(".cc"), "BatchNorm keeps MindSpore's ops",
                        flags=("-fno-trapping-math", "-ffp-contract=off"))

class FastBatchNorm2d(FusedActivation, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same parameters, names and checkpoint layout) whose training graph is one fused op
    each way, with the activation :meth:`fuse_activation` names; in eval mode it is the plain ``nn.BatchNorm2d``
    (the activation then runs in its own cell)."""

    def __init__(self, num_features: int, eps: float, momentum: float) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self._set_cfg()
        grad = LIBRARY.op("bn_act_bwd", out_shape=lambda x, dy, g, b, m, v, cfg: (x, g, g),
                          out_dtype=lambda x, dy, g, b, m, v, cfg: (x, x, x))

        def bprop(x, gamma, beta, moving_mean, moving_variance, cfg, out, dout):
            dx, dgamma, dbeta = grad(x, dout[0], gamma, beta, out[1], out[2], cfg)
            return dx, dgamma, dbeta, ops.zeros_like(moving_mean), ops.zeros_like(moving_variance), \
                ops.zeros_like(cfg)

        self.fused = LIBRARY.op("bn_act_fwd", out_shape=lambda x, g, b, m, v, cfg: (x, g, g),
                                out_dtype=lambda x, g, b, m, v, cfg: (x, x, x), bprop=bprop, writes=True)

    def _set_cfg(self) -> None:
        # [eps, momentum (weight of the batch statistic, the training primitive's), activation, slope]
        self.cfg = Tensor([self.eps, float(self.bn_train.momentum), ACTIVATION_CODES[self.activation], self.slope],
                          ms.float32)

    def set_train_primitive(self, primitive: ops.Primitive) -> None:
        """Train with ``primitive``'s momentum (precise-BN recalibration runs one with momentum 1)."""
        self.bn_train = primitive
        self._set_cfg()

    def construct(self, x: Tensor) -> Tensor:
        if self.training:
            return self.fused(x, self.gamma, self.beta, self.moving_mean, self.moving_variance, self.cfg)[0]
        return super().construct(x)


#: the parts of msdet.train_ops this kernel provides (float32 NCHW input)
REPLACEMENTS = {"batch_norm2d": FastBatchNorm2d}
