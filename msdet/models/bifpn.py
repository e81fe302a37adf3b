"""BiFPN neck of EfficientDet with fast normalised fusion (levels P3-P7), zylo117/automl layout.

The first cell takes the backbone's (C3, C4, C5): 1x1 conv + BN brings each to the BiFPN width (P3_0, P4_0,
P5_0); P6_0 = maxpool(conv1x1+BN(C5)), P7_0 = maxpool(P6_0); the bottom-up pass of that first cell uses a
second, separate 1x1 projection of C4 and C5 (``p4_down_channel_2``, ``p5_down_channel_2``) as automl does.
Every node: weighted sum (w = relu(w) / (sum relu(w) + 1e-4)) -> swish -> separable conv -> BN.
"""
from __future__ import annotations

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from msdet.models.layers import (
    Conv2dSame,
    MaxPool2dSame,
    SeparableConvBlock,
    Swish,
    batch_norm,
    convs_of,
    init_conv_glorot_uniform,
    upsample_nearest2x,
)


def _projection(in_channels: int, out_channels: int, pool: bool = False) -> nn.SequentialCell:
    layers = [Conv2dSame(in_channels, out_channels, 1), batch_norm(out_channels)]
    if pool:
        layers.append(MaxPool2dSame(3, 2))
    return nn.SequentialCell(layers)


def _fusion_weight(n: int) -> Parameter:
    return Parameter(Tensor(np.ones(n, np.float32)))


class BiFPNCell(nn.Cell):
    """One BiFPN repeat: top-down P7->P3 then bottom-up P3->P7 (official ``BiFPN`` module)."""

    def __init__(self, num_channels: int, conv_channels: tuple[int, int, int], first_time: bool = False,
                 epsilon: float = 1e-4) -> None:
        super().__init__()
        self.epsilon = epsilon
        self.first_time = first_time
        for name in ("conv6_up", "conv5_up", "conv4_up", "conv3_up",
                     "conv4_down", "conv5_down", "conv6_down", "conv7_down"):
            setattr(self, name, SeparableConvBlock(num_channels))
        self.p4_downsample = MaxPool2dSame(3, 2)
        self.p5_downsample = MaxPool2dSame(3, 2)
        self.p6_downsample = MaxPool2dSame(3, 2)
        self.p7_downsample = MaxPool2dSame(3, 2)
        self.swish = Swish()
        if first_time:
            c3, c4, c5 = conv_channels
            self.p5_down_channel = _projection(c5, num_channels)
            self.p4_down_channel = _projection(c4, num_channels)
            self.p3_down_channel = _projection(c3, num_channels)
            self.p5_to_p6 = _projection(c5, num_channels, pool=True)
            self.p6_to_p7 = nn.SequentialCell([MaxPool2dSame(3, 2)])
            self.p4_down_channel_2 = _projection(c4, num_channels)
            self.p5_down_channel_2 = _projection(c5, num_channels)
        self.p6_w1 = _fusion_weight(2)
        self.p5_w1 = _fusion_weight(2)
        self.p4_w1 = _fusion_weight(2)
        self.p3_w1 = _fusion_weight(2)
        self.p4_w2 = _fusion_weight(3)
        self.p5_w2 = _fusion_weight(3)
        self.p6_w2 = _fusion_weight(3)
        self.p7_w2 = _fusion_weight(2)

    def _weights(self, w: Parameter) -> Tensor:
        w = ops.relu(w)
        return w / (ops.sum(w) + self.epsilon)

    def _fuse2(self, w: Parameter, a: Tensor, b: Tensor) -> Tensor:
        w = self._weights(w)
        return self.swish(w[0] * a + w[1] * b)

    def _fuse3(self, w: Parameter, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        w = self._weights(w)
        return self.swish(w[0] * a + w[1] * b + w[2] * c)

    def construct(self, inputs: tuple) -> tuple:
        if self.first_time:
            p3, p4, p5 = inputs
            p6_in = self.p5_to_p6(p5)
            p7_in = self.p6_to_p7(p6_in)
            p3_in = self.p3_down_channel(p3)
            p4_in = self.p4_down_channel(p4)
            p5_in = self.p5_down_channel(p5)
        else:
            p3_in, p4_in, p5_in, p6_in, p7_in = inputs

        p6_up = self.conv6_up(self._fuse2(self.p6_w1, p6_in, upsample_nearest2x(p7_in)))
        p5_up = self.conv5_up(self._fuse2(self.p5_w1, p5_in, upsample_nearest2x(p6_up)))
        p4_up = self.conv4_up(self._fuse2(self.p4_w1, p4_in, upsample_nearest2x(p5_up)))
        p3_out = self.conv3_up(self._fuse2(self.p3_w1, p3_in, upsample_nearest2x(p4_up)))

        if self.first_time:
            p4_in = self.p4_down_channel_2(p4)
            p5_in = self.p5_down_channel_2(p5)

        p4_out = self.conv4_down(self._fuse3(self.p4_w2, p4_in, p4_up, self.p4_downsample(p3_out)))
        p5_out = self.conv5_down(self._fuse3(self.p5_w2, p5_in, p5_up, self.p5_downsample(p4_out)))
        p6_out = self.conv6_down(self._fuse3(self.p6_w2, p6_in, p6_up, self.p6_downsample(p5_out)))
        p7_out = self.conv7_down(self._fuse2(self.p7_w2, p7_in, self.p7_downsample(p6_out)))
        return p3_out, p4_out, p5_out, p6_out, p7_out


class BiFPN(nn.SequentialCell):
    """``repeats`` BiFPN cells in sequence (children ``0..repeats-1``, as the official ``bifpn.i.*`` keys)."""

    def __init__(self, num_channels: int, conv_channels: tuple[int, int, int], repeats: int, seed: int = 0) -> None:
        super().__init__([BiFPNCell(num_channels, conv_channels, first_time=(i == 0)) for i in range(repeats)])
        rng = np.random.default_rng(seed)
        for conv in convs_of(self):
            init_conv_glorot_uniform(conv, rng)
