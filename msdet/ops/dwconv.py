"""Depthwise 3x3 and 5x5 convolutions as compiled C++ kernels (``dwconv.cc``) for CPU training.

MindSpore 2.8's CPU depthwise convs are slow: at D0's and NanoDet's training shapes this kernel's forward is
2-3x and forward+backward 2-8x faster (docs/performance.md, "Depthwise conv kernel"). A training graph on CPU runs
the conv as one ``mindspore.ops.Custom`` "aot" primitive (the C++ forward) whose ``bprop`` is the C++ input and
weight gradients; the library is compiled with g++ at first use into a cache directory. Inference and exported
graphs (``set_train(False)``) keep MindSpore's ``Conv2D``, as do GPU and Ascend. ``enable(True)`` before building
a network turns it on (``setup_runtime`` does, from ``runtime.cpu_depthwise_kernel``); without g++ the standard
op is used after a warning.
"""
from __future__ import annotations

from pathlib import Path

from mindspore import Tensor, nn, ops

from msdet.ops import native

KERNEL_SIZES = (3, 5)
KERNEL = native.Kernel(Path(__file__).with_name("dwconv.cc"), "depthwise convs keep MindSpore's (slow) CPU kernels")


def enable(on: bool) -> bool:
    """Switch the C++ kernel for networks built from now on; returns whether it is on (see ``native.Kernel``)."""
    return KERNEL.enable(on)


def enabled() -> bool:
    return KERNEL.on


class DepthwiseConv(nn.Cell):
    """Parameter-free ``conv(x, w)`` (depthwise k x k, no bias) as one ``Custom`` primitive: the C++ forward, with
    the C++ input and weight gradients as its ``bprop`` (MindSpore inlines a primitive's bprop into the gradient
    graph; a cell's ``bprop`` stays a sub-graph call per conv). ``same``: TF "same" padding; otherwise
    ``(k - 1) / 2`` on every side. Both paddings give ``ceil(size / stride)`` outputs per axis."""

    def __init__(self, kernel_size: int, stride: int, same: bool, library: Path) -> None:
        super().__init__()
        if kernel_size not in KERNEL_SIZES or stride not in (1, 2):
            raise ValueError(f"depthwise kernel: size must be 3 or 5 and stride 1 or 2, got {kernel_size}, {stride}")
        name = f"k{kernel_size}_s{stride}_{'same' if same else 'half'}"
        grad = ops.Custom(f"{library}:dw_bwd_{name}", out_shape=lambda x, dy, w: (x, w),
                          out_dtype=lambda x, dy, w: (x, w), func_type="aot")

        def bprop(x, w, out, dout):
            return grad(x, dout, w)

        def out_shape(x, w):
            return [x[0], x[1], -(-x[2] // stride), -(-x[3] // stride)]

        self.conv = ops.Custom(f"{library}:dw_fwd_{name}", out_shape=out_shape, out_dtype=lambda x, w: x,
                               func_type="aot", bprop=bprop)

    def construct(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w)


class FastDepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, names and checkpoint layout) whose training graph uses
    ``DepthwiseConv``; in eval mode (inference, export) it is the plain ``nn.Conv2d``."""

    def __init__(self, channels: int, kernel_size: int, stride: int, same: bool, library: Path) -> None:
        super().__init__(channels, channels, kernel_size, stride=stride, pad_mode="same" if same else "pad",
                         padding=0 if same else (kernel_size - 1) // 2, has_bias=False, group=channels)
        self.fast = DepthwiseConv(kernel_size, stride, same, library)

    def construct(self, x: Tensor) -> Tensor:
        if self.training:
            return self.fast(x, self.weight)
        return self.conv2d(x, self.weight)


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, pad_mode: str = "same",
           padding: int = 0, has_bias: bool = False, group: int = 1) -> nn.Conv2d:
    """``nn.Conv2d``, or ``FastDepthwiseConv2d`` when enabled and the conv is depthwise 3x3/5x5, stride 1/2,
    no bias, padded "same" or by ``(k - 1) / 2``."""
    fits = (enabled() and kernel_size in KERNEL_SIZES and group == in_channels == out_channels and stride in (1, 2)
            and not has_bias and (pad_mode == "same" or (pad_mode == "pad" and padding == (kernel_size - 1) // 2)))
    if fits:
        return FastDepthwiseConv2d(in_channels, kernel_size, stride, pad_mode == "same", KERNEL.library)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode=pad_mode, padding=padding,
                     has_bias=has_bias, group=group)
