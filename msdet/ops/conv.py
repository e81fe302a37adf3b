"""The factory the networks build their convolutions with, so each one trains on the fastest CPU kernel that fits:
a dense k x k conv (k > 1) on oneDNN 3's blocked kernels (:mod:`msdet.ops.denseconv`), a depthwise 3x3/5x5 on the
C++ kernel (:mod:`msdet.ops.dwconv`), else MindSpore's ``nn.Conv2d``. Every choice has ``nn.Conv2d``'s parameters,
names and eval-mode graph."""
from __future__ import annotations

from mindspore import nn

from msdet.ops import denseconv, dwconv


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, pad_mode: str = "same",
           padding: int = 0, has_bias: bool = False, group: int = 1) -> nn.Conv2d:
    """``nn.Conv2d(...)`` with these arguments, or the kernel-backed subclass that fits it."""
    if denseconv.fits(kernel_size, stride, pad_mode, padding, group):
        return denseconv.FastDenseConv2d(in_channels, out_channels, kernel_size, stride, pad_mode, padding, has_bias,
                                         denseconv.KERNEL.library)
    return dwconv.conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode=pad_mode, padding=padding,
                         has_bias=has_bias, group=group)
