"""GhostPAN (NanoDet-Plus neck) and the conv modules NanoDet builds its neck and heads from.

GhostPAN: 1x1 ConvModules reduce every input to ``out_channels``; a top-down path (bilinear x2 upsampling,
concat, GhostBlocks) and a bottom-up path (stride-2 depthwise-separable conv, concat, GhostBlocks) as in
PAN; ``num_extra_level`` extra levels each add a stride-2 conv of the reduced coarsest input to a stride-2
conv of the last output. Attribute names follow the official modules, so parameter names are the
official state-dict keys up to BatchNorm/GroupNorm naming.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from mindspore import Tensor, nn, ops
from mindspore.common import initializer as init

from msdet import train_ops
from msdet.models.layers import batch_norm2d, conv2d, conv_levels, group_norm, norm_act, norm_act_pairs, share_levels
from msdet.models.shufflenetv2 import activation_cell


def _bn(c: int) -> nn.BatchNorm2d:
    return batch_norm2d(c, 1e-5, 0.9)


def kaiming_normal_fan_out(conv: nn.Conv2d) -> None:
    """mmcv ``kaiming_init`` (normal, fan_out, gain sqrt(2)); bias 0."""
    conv.weight.set_data(init.initializer(init.HeNormal(negative_slope=0, mode="fan_out", nonlinearity="relu"),
                                          conv.weight.shape, conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.set_data(init.initializer("zeros", conv.bias.shape, conv.bias.dtype))


def normal_init(conv: nn.Conv2d, std: float = 0.01, bias: float = 0.0) -> None:
    conv.weight.set_data(init.initializer(init.Normal(std), conv.weight.shape, conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.set_data(init.initializer(init.Constant(bias), conv.bias.shape, conv.bias.dtype))


class ConvModule(nn.Cell):
    """conv -> norm -> activation (NanoDet ``ConvModule``); the norm is named ``bn`` or ``gn`` as the official.

    ``norm``: "BN", "GN" (32 groups) or None; a conv bias is used only without a norm.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, groups: int = 1, norm: str | None = "BN",
                 activation: str | None = "LeakyReLU", num_groups: int = 32) -> None:
        super().__init__()
        self.conv = conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                           padding=padding, has_bias=norm is None, group=groups)
        self.norm_name = None
        if norm == "BN":
            self.bn = _bn(out_channels)
            self.norm_name = "bn"
        elif norm == "GN":
            self.gn = group_norm(num_groups, out_channels, eps=1e-5)
            self.norm_name = "gn"
        elif norm is not None:
            raise ValueError(f"ConvModule: norm must be 'BN', 'GN' or None, got {norm!r}")
        self.has_act = activation is not None
        if self.has_act:
            self.act = activation_cell(activation)
            if self.norm_name is not None:
                norm_act(getattr(self, self.norm_name), self.act)
        kaiming_normal_fan_out(self.conv)
        self.shared_levels = False

    def share_levels(self, levels: int) -> None:
        """Run the conv of :meth:`levels` as one op for ``levels`` maps where it can (:func:`layers.share_levels`)."""
        self.shared_levels = share_levels(self.conv, levels)

    def levels(self, xs: tuple) -> tuple:
        """This module on every map of ``xs`` (the levels of a head's tower that shares it)."""
        out = ()
        for y in conv_levels(self.conv, self.shared_levels, xs):
            out = out + (self.norm_and_act(y),)
        return out

    def construct(self, x: Tensor) -> Tensor:
        return self.norm_and_act(self.conv(x))

    def norm_and_act(self, x: Tensor) -> Tensor:
        if self.norm_name == "bn":
            x = self.bn(x)
        elif self.norm_name == "gn":
            x = self.gn(x)
        if self.has_act:
            x = self.act(x)
        return x


class DepthwiseConvModule(nn.Cell):
    """depthwise k x k -> BN -> act -> pointwise 1x1 -> BN -> act (NanoDet ``DepthwiseConvModule``, no biases)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, activation: str = "LeakyReLU") -> None:
        super().__init__()
        self.depthwise = conv2d(in_channels, in_channels, kernel_size, stride=stride, pad_mode="pad",
                                padding=padding, has_bias=False, group=in_channels)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, has_bias=False)
        self.dwnorm = _bn(in_channels)
        self.pwnorm = _bn(out_channels)
        self.act = activation_cell(activation)
        norm_act(self.dwnorm, self.act)
        norm_act(self.pwnorm, self.act)
        kaiming_normal_fan_out(self.depthwise)
        kaiming_normal_fan_out(self.pointwise)

    def construct(self, x: Tensor) -> Tensor:
        x = self.act(self.dwnorm(self.depthwise(x)))
        return self.act(self.pwnorm(self.pointwise(x)))


class GhostModule(nn.Cell):
    """Primary 1x1 conv to ceil(oup / 2) channels plus a cheap depthwise 3x3 of it, concatenated."""

    def __init__(self, inp: int, oup: int, dw_size: int = 3, activation: str | None = "LeakyReLU") -> None:
        super().__init__()
        init_channels = math.ceil(oup / 2)
        self.oup = oup
        prim = [nn.Conv2d(inp, init_channels, 1, has_bias=False), _bn(init_channels)]
        cheap = [conv2d(init_channels, init_channels, dw_size, pad_mode="pad", padding=dw_size // 2,
                        has_bias=False, group=init_channels), _bn(init_channels)]
        if activation is not None:
            prim.append(activation_cell(activation))
            cheap.append(activation_cell(activation))
        self.primary_conv = nn.SequentialCell(norm_act_pairs(prim))
        self.cheap_operation = nn.SequentialCell(norm_act_pairs(cheap))

    def construct(self, x: Tensor) -> Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        return ops.concat((x1, x2), axis=1)


class GhostBottleneck(nn.Cell):
    """Stride-1 ghost bottleneck without SE (as GhostPAN uses it): ghost1 -> ghost2 (linear) + shortcut.

    The shortcut is a depthwise ``dw_kernel_size`` conv + BN + 1x1 conv + BN when widths differ.
    """

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, dw_kernel_size: int = 3,
                 activation: str = "LeakyReLU") -> None:
        super().__init__()
        self.ghost1 = GhostModule(in_chs, mid_chs, activation=activation)
        self.ghost2 = GhostModule(mid_chs, out_chs, activation=None)
        self.has_proj = in_chs != out_chs
        if self.has_proj:
            self.shortcut = nn.SequentialCell([
                conv2d(in_chs, in_chs, dw_kernel_size, pad_mode="pad", padding=(dw_kernel_size - 1) // 2,
                       has_bias=False, group=in_chs),
                _bn(in_chs),
                nn.Conv2d(in_chs, out_chs, 1, has_bias=False),
                _bn(out_chs),
            ])

    def construct(self, x: Tensor) -> Tensor:
        y = self.ghost2(self.ghost1(x))
        if self.has_proj:
            return y + self.shortcut(x)
        return y + x


class GhostBlocks(nn.Cell):
    """A stack of ``num_blocks`` GhostBottlenecks (no residual reduce conv: ``use_res`` is off in NanoDet-Plus)."""

    def __init__(self, in_channels: int, out_channels: int, expand: int = 1, kernel_size: int = 5,
                 num_blocks: int = 1, activation: str = "LeakyReLU") -> None:
        super().__init__()
        blocks = []
        for i in range(num_blocks):
            blocks.append(GhostBottleneck(in_channels if i == 0 else out_channels, int(out_channels * expand),
                                          out_channels, dw_kernel_size=kernel_size, activation=activation))
        self.blocks = nn.SequentialCell(blocks)

    def construct(self, x: Tensor) -> Tensor:
        return self.blocks(x)


def upsample_bilinear2x(x: Tensor) -> Tensor:
    """x2 bilinear upsampling of NCHW with half-pixel centres, as PyTorch ``nn.Upsample(scale_factor=2,
    mode="bilinear")`` (``align_corners=False``).

    For scale 2 the sampling weights are fixed: output 2i mixes inputs i-1 and i (0.25 / 0.75), output 2i+1
    inputs i and i+1 (0.75 / 0.25), borders replicated. Written with slices, so that it exports to ONNX
    (MindSpore's ResizeBilinearV2 does not).
    """
    b, c, h, w = x.shape
    xp = ops.concat((x[:, :, :1], x, x[:, :, -1:]), axis=2)
    even = xp[:, :, :-2] * 0.25 + xp[:, :, 1:-1] * 0.75
    odd = xp[:, :, 1:-1] * 0.75 + xp[:, :, 2:] * 0.25
    x = ops.reshape(ops.stack((even, odd), axis=3), (b, c, 2 * h, w))
    xp = ops.concat((x[..., :1], x, x[..., -1:]), axis=3)
    even = xp[..., :-2] * 0.25 + xp[..., 1:-1] * 0.75
    odd = xp[..., 1:-1] * 0.75 + xp[..., 2:] * 0.25
    return ops.reshape(ops.stack((even, odd), axis=4), (b, c, 2 * h, 2 * w))


class Upsample2x(nn.Cell):
    """x2 bilinear upsampling (half-pixel centres, as ``nn.Upsample(scale_factor=2, mode="bilinear")``): in
    CPU training the C++ kernel (msdet/kernels/upsample.py, the same bits as :func:`upsample_bilinear2x`), else in
    training MindSpore's ``ResizeBilinearV2`` (one op each way; fwd+bwd 1.8 against 3.4 ms at NanoDet's 128 px
    neck, 9.8 against 14.2 at 320; the same values within 5e-7), in inference and export
    :func:`upsample_bilinear2x`, which exports to ONNX."""

    def __init__(self) -> None:
        super().__init__()
        self.resize = ops.ResizeBilinearV2(align_corners=False, half_pixel_centers=True)
        self.fast = train_ops.make("upsample_bilinear2x")

    def construct(self, x: Tensor) -> Tensor:
        if self.training:
            if self.fast is not None:
                return self.fast(x)
            return self.resize(x, (x.shape[2] * 2, x.shape[3] * 2))
        return upsample_bilinear2x(x)


class GhostPAN(nn.Cell):
    """Inputs: a tuple of len(in_channels) maps (finest first). Outputs: len(in_channels) + num_extra_level
    maps of ``out_channels`` channels, finest first."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, use_depthwise: bool = True,
                 kernel_size: int = 5, expand: int = 1, num_blocks: int = 1, num_extra_level: int = 0,
                 activation: str = "LeakyReLU") -> None:
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.out_channels = out_channels
        self.num_inputs = len(self.in_channels)
        self.num_extra_level = num_extra_level
        pad = kernel_size // 2

        def down() -> nn.Cell:
            if use_depthwise:
                return DepthwiseConvModule(out_channels, out_channels, kernel_size, stride=2, padding=pad,
                                           activation=activation)
            return ConvModule(out_channels, out_channels, kernel_size, stride=2, padding=pad, activation=activation)

        def ghost() -> GhostBlocks:
            return GhostBlocks(out_channels * 2, out_channels, expand, kernel_size=kernel_size,
                               num_blocks=num_blocks, activation=activation)

        n = self.num_inputs
        self.reduce_layers = nn.CellList([ConvModule(c, out_channels, 1, activation=activation)
                                          for c in self.in_channels])
        self.top_down_blocks = nn.CellList([ghost() for _ in range(n - 1)])
        self.downsamples = nn.CellList([down() for _ in range(n - 1)])
        self.bottom_up_blocks = nn.CellList([ghost() for _ in range(n - 1)])
        self.extra_lvl_in_conv = nn.CellList([down() for _ in range(num_extra_level)])
        self.extra_lvl_out_conv = nn.CellList([down() for _ in range(num_extra_level)])
        self.upsample = Upsample2x()

    def construct(self, inputs: tuple) -> tuple:
        n = self.num_inputs
        reduced = []
        for i in range(n):
            reduced.append(self.reduce_layers[i](inputs[i]))
        # top-down: inner[i] is the fused map at level i (built from the coarsest down)
        inner = [reduced[n - 1]]
        for j in range(n - 1):
            idx = n - 1 - j
            high = inner[0]
            up = self.upsample(high)
            fused = self.top_down_blocks[j](ops.concat((up, reduced[idx - 1]), axis=1))
            inner = [fused] + inner
        # bottom-up
        outs = [inner[0]]
        for i in range(n - 1):
            down = self.downsamples[i](outs[-1])
            outs.append(self.bottom_up_blocks[i](ops.concat((down, inner[i + 1]), axis=1)))
        for i in range(self.num_extra_level):
            outs.append(self.extra_lvl_in_conv[i](reduced[n - 1]) + self.extra_lvl_out_conv[i](outs[-1]))
        return tuple(outs)


__all__ = ["ConvModule", "DepthwiseConvModule", "GhostModule", "GhostBottleneck", "GhostBlocks", "GhostPAN",
           "Upsample2x", "upsample_bilinear2x", "kaiming_normal_fan_out", "normal_init"]
