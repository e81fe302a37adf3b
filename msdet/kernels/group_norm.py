"""GroupNorm as a compiled C++ kernel (``group_norm.cc``) for CPU training (NanoDet-Plus's aux head).

MindSpore 2.8's CPU ``GroupNorm`` takes 8.7 ms forward and 14 ms forward+backward on NanoDet-Plus's aux-head shape
(8 x 192 x 16 x 16, 32 groups), PyTorch 0.15 / 1.0 ms (docs/performance.md); the aux head runs 32 of them per step.
A training graph on CPU runs the norm as one ``mindspore.ops.Custom`` "aot" primitive (the C++ forward) whose
``bprop`` is the C++ input and affine gradients; evaluation never runs the aux head, and GPU and Ascend keep
MindSpore's op. The ``group_norm`` part of :mod:`msdet.train_ops`.
"""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
from mindspore import Tensor, nn, ops

from msdet.kernels.library import KernelLibrary

LIBRARY = KernelLibrary("group_norm", Path(__file__).with_suffix(".cc"),
                        "GroupNorm keeps MindSpore's (slow) CPU kernel")


class GroupNormKernel(nn.Cell):
    """Parameter-free ``group_norm(x, gamma, beta)`` as one ``Custom`` primitive with the C++ gradients as its
    ``bprop``; the group count and eps travel as a constant ``cfg`` input."""

    def __init__(self, num_groups: int, eps: float) -> None:
        super().__init__()
        self.cfg = Tensor([float(num_groups), eps], ms.float32)
        grad = LIBRARY.op("gn_bwd", out_shape=lambda x, dy, g, cfg: (x, g, g),
                          out_dtype=lambda x, dy, g, cfg: (x, x, x))

        def bprop(x, gamma, beta, cfg, out, dout):
            dx, dgamma, dbeta = grad(x, dout, gamma, cfg)
            return dx, dgamma, dbeta, ops.zeros_like(cfg)

        self.norm = LIBRARY.op("gn_fwd", bprop=bprop)

    def construct(self, x: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
        return self.norm(x, gamma, beta, self.cfg)


class FastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, names and checkpoint layout) whose training graph uses
    ``GroupNormKernel``; in eval mode it is the plain ``nn.GroupNorm``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_groups, num_channels, eps=eps)
        self.fast = GroupNormKernel(num_groups, eps)

    def construct(self, x: Tensor) -> Tensor:
        if self.training:
            return self.fast(x, self.gamma, self.beta)
        return super().construct(x)


#: the parts of msdet.train_ops this kernel provides (float32 NCHW input, affine)
REPLACEMENTS = {"group_norm": FastGroupNorm}
