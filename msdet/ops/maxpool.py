"""Max pooling 3x3 / stride 2 / padding 1 (ShuffleNetV2's stem) as a compiled C++ kernel (``maxpool.cc``) for CPU
training.

MindSpore's padded max-pool lowers to ``MaxPool3DWithArgmax``, which ONNX export lacks, so the network pools
an edge-replicated copy of its input (:class:`msdet.models.shufflenetv2.MaxPool3x3s2p1`): two Concats, their slice
gradients and a valid pool, 52 ms forward and backward on NanoDet-Plus's 320 px stem map where PyTorch takes 18.
A training graph on CPU runs the pool as one ``Custom`` op each way instead; inference and export keep the
exportable form. ``enable(True)`` before building a network turns it on (``setup_runtime`` does, from
``runtime.cpu_maxpool_kernel``); without g++ the standard ops are used after a warning.
"""
from __future__ import annotations

from pathlib import Path

from mindspore import Tensor, nn, ops

from msdet.ops import native

KERNEL = native.Kernel(Path(__file__).with_name("maxpool.cc"), "max pooling keeps MindSpore's ops")


def enable(on: bool) -> bool:
    """Switch the C++ kernel for networks built from now on; returns whether it is on (see ``native.Kernel``)."""
    return KERNEL.enable(on)


def enabled() -> bool:
    return KERNEL.on


class MaxPoolKernel(nn.Cell):
    """PyTorch's ``max_pool2d(x, 3, 2, 1)`` of float32 NCHW as one ``Custom`` op whose ``bprop`` routes each
    output gradient to its window's first maximum."""

    def __init__(self, library: Path) -> None:
        super().__init__()
        grad = ops.Custom(f"{library}:mp_dx", out_shape=lambda x, dy: x, out_dtype=lambda x, dy: x, func_type="aot")

        def bprop(x, out, dout):
            return (grad(x, dout),)

        self.pool = ops.Custom(f"{library}:mp_fwd",
                               out_shape=lambda x: [x[0], x[1], (x[2] + 1) // 2, (x[3] + 1) // 2],
                               out_dtype=lambda x: x, func_type="aot", bprop=bprop)

    def construct(self, x: Tensor) -> Tensor:
        return self.pool(x)
