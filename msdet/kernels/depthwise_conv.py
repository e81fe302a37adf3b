"""Depthwise 3x3 and 5x5 convolutions as compiled C++ kernels (``depthwise_conv.cc``) for CPU training.

MindSpore 2.8's CPU depthwise convs are slow: at D0's and NanoDet's training shapes this kernel's forward is
2-3x and forward+backward 2-8x faster (docs/performance.md, "Depthwise conv kernel"). A training graph on CPU runs
the conv as one ``mindspore.ops.Custom`` "aot" primitive (the C++ forward) whose ``bprop`` is the C++ input and
weight gradients. Inference and exported graphs (``set_train(False)``) keep MindSpore's ``Conv2D``, as do GPU and
Ascend. The ``conv2d`` part of :mod:`msdet.train_ops` for the convs it fits.
"""
from __future__ import annotations

from pathlib import Path

from mindspore import Tensor, nn

from msdet.kernels.library import KernelLibrary

KERNEL_SIZES = (3, 5)
LIBRARY = KernelLibrary("depthwise_conv", Path(__file__).with_suffix(".cc"),
                        "depthwise convs keep MindSpore's (slow) CPU kernels")


class DepthwiseConv(nn.Cell):
    """Parameter-free ``conv(x, w)`` (depthwise k x k, no bias) as one ``Custom`` primitive: the C++ forward, with
    the C++ input and weight gradients as its ``bprop``. ``same``: TF "same" padding; otherwise ``(k - 1) / 2`` on
    every side. Both paddings give ``ceil(size / stride)`` outputs per axis."""

    def __init__(self, kernel_size: int, stride: int, same: bool) -> None:
        super().__init__()
        if kernel_size not in KERNEL_SIZES or stride not in (1, 2):
            raise ValueError(f"depthwise kernel: size must be 3 or 5 and stride 1 or 2, got {kernel_size}, {stride}")
        name = f"k{kernel_size}_s{stride}_{'same' if same else 'half'}"
        grad = LIBRARY.op(f"dw_bwd_{name}", out_shape=lambda x, dy, w: (x, w), out_dtype=lambda x, dy, w: (x, w))

        def bprop(x, w, out, dout):
            return grad(x, dout, w)

        def out_shape(x, w):
            return [x[0], x[1], -(-x[2] // stride), -(-x[3] // stride)]

        self.conv = LIBRARY.op(f"dw_fwd_{name}", out_shape=out_shape, bprop=bprop)

    def construct(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w)


class FastDepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, names and checkpoint layout) whose training graph uses
    ``DepthwiseConv``; in eval mode (inference, export) it is the plain ``nn.Conv2d``."""

    def __init__(self, channels: int, kernel_size: int, stride: int, same: bool) -> None:
        super().__init__(channels, channels, kernel_size, stride=stride, pad_mode="same" if same else "pad",
                         padding=0 if same else (kernel_size - 1) // 2, has_bias=False, group=channels)
        self.fast = DepthwiseConv(kernel_size, stride, same)

    def construct(self, x: Tensor) -> Tensor:
        if self.training:
            return self.fast(x, self.weight)
        return self.conv2d(x, self.weight)


def fits(in_channels: int, out_channels: int, kernel_size: int, stride: int, pad_mode: str, padding: int,
         has_bias: bool, group: int) -> bool:
    """Depthwise 3x3/5x5, stride 1/2, no bias, padded "same" or by ``(k - 1) / 2``."""
    return (kernel_size in KERNEL_SIZES and group == in_channels == out_channels and stride in (1, 2)
            and not has_bias and (pad_mode == "same" or (pad_mode == "pad" and padding == (kernel_size - 1) // 2)))


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, pad_mode: str = "same",
           padding: int = 0, has_bias: bool = False, group: int = 1) -> FastDepthwiseConv2d | None:
    """``FastDepthwiseConv2d`` for a conv the kernel fits, else None."""
    if not fits(in_channels, out_channels, kernel_size, stride, pad_mode, padding, has_bias, group):
        return None
    return FastDepthwiseConv2d(in_channels, kernel_size, stride, pad_mode == "same")


#: the parts of msdet.train_ops this kernel provides
REPLACEMENTS = {"conv2d": conv2d}
