"""Max pooling 3x3 / stride 2 / padding 1 (ShuffleNetV2's stem, NanoDet-Plus) as a compiled C++ kernel
(``max_pool.cc``) for CPU training.

MindSpore's padded max-pool lowers to ``MaxPool3DWithArgmax``, which ONNX export lacks, so the network pools
an edge-replicated copy of its input (:class:`msdet.models.shufflenetv2.MaxPool3x3s2p1`): two Concats, their slice
gradients and a valid pool, 52 ms forward and backward on NanoDet-Plus's 320 px stem map where PyTorch takes 18.
A training graph on CPU runs the pool as one ``Custom`` op each way instead (the ``max_pool_3x3s2p1`` part of
:mod:`msdet.train_ops`); inference and export keep the exportable form.
"""
from __future__ import annotations

from pathlib import Path

from mindspore import Tensor, nn

from msdet.kernels.library import KernelLibrary

# -fno-trapping-math: GCC turns the gradient's compare-and-select into vector blends only without it
LIBRARY = KernelLibrary("max_pool", Path(__file__).with_suffix(".cc"), "max pooling keeps MindSpore's ops",
                        flags=("-fno-trapping-math",))


class MaxPoolKernel(nn.Cell):
    """PyTorch's ``max_pool2d(x, 3, 2, 1)`` of float32 NCHW as one ``Custom`` op whose ``bprop`` routes each
    output gradient to its window's first maximum."""

    def __init__(self) -> None:
        super().__init__()
        grad = LIBRARY.op("mp_dx")

        def bprop(x, out, dout):
            return (grad(x, dout),)

        self.pool = LIBRARY.op("mp_fwd", out_shape=lambda x: [x[0], x[1], (x[2] + 1) // 2, (x[3] + 1) // 2],
                               bprop=bprop)

    def construct(self, x: Tensor) -> Tensor:
        return self.pool(x)


#: the parts of msdet.train_ops this kernel provides
REPLACEMENTS = {"max_pool_3x3s2p1": MaxPoolKernel}
