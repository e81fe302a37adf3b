"""GroupNorm, fused with the activation that follows it, as a compiled C++ kernel (``group_norm.cc``) for CPU
training (NanoDet-Plus's aux head).

MindSpore 2.8's CPU ``GroupNorm`` takes 8.7 ms forward and 14 ms forward+backward on NanoDet-Plus's aux-head shape
(8 x 192 x 16 x 16, 32 groups), PyTorch 0.15 / 1.0 ms (docs/performance.md); the aux head runs 32 of them per step.
A training graph on CPU runs the norm, and the activation a network marks after it
(:func:`msdet.models.layers.norm_act`), as one ``mindspore.ops.Custom`` "aot" primitive (the C++ forward) whose
``bprop`` is the C++ input and affine gradients; evaluation never runs the aux head, and GPU and Ascend keep
MindSpore's op. The ``group_norm`` part of :mod:`msdet.train_ops`.
"""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
from mindspore import Tensor, nn, ops

from msdet.kernels.library import ACTIVATION_CODES, FusedActivation, KernelLibrary

# -fno-trapping-math and -ffp-contract=off as activations.py: the fused activations vectorise and agree to the bit
LIBRARY = KernelLibrary("group_norm", Path(__file__).with_suffix(".cc"),
                        "GroupNorm keeps MindSpore's (slow) CPU kernel", flags=("-fno-trapping-math",
                                                                                "-ffp-contract=off"))


class FastGroupNorm(FusedActivation, nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, names and checkpoint layout) whose training graph is one fused op each
    way, with the activation :meth:`fuse_activation` names; in eval mode it is the plain ``nn.GroupNorm`` (the
    activation then runs in its own cell)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_groups, num_channels, eps=eps)
        self._set_cfg()
        grad = LIBRARY.op("gn_bwd", out_shape=lambda x, dy, g, b, cfg: (x, g, g),
                          out_dtype=lambda x, dy, g, b, cfg: (x, x, x))

        def bprop(x, gamma, beta, cfg, out, dout):
            dx, dgamma, dbeta = grad(x, dout, gamma, beta, cfg)
            return dx, dgamma, dbeta, ops.zeros_like(cfg)

        self.fused = LIBRARY.op("gn_fwd", bprop=bprop)

    def _set_cfg(self) -> None:
        # [groups, eps, activation, slope]
        self.cfg = Tensor([float(self.num_groups), self.eps, ACTIVATION_CODES[self.activation], self.slope],
                          ms.float32)

    def construct(self, x: Tensor) -> Tensor:
        if self.training:
            return self.fused(x, self.gamma, self.beta, self.cfg)
        return super().construct(x)


#: the parts of msdet.train_ops this kernel provides (float32 NCHW input, affine)
REPLACEMENTS = {"group_norm": FastGroupNorm}
