"""EfficientNet-B0 feature extractor (stem + 16 MBConv blocks), as the EfficientDet backbone.

Attribute names follow zylo117's port of the official model (``_conv_stem``, ``_bn0``, ``_blocks.i._expand_conv``
...) so that our parameter names are the official state-dict keys up to MindSpore's BN suffixes. The ImageNet
classification head (``_conv_head``, ``_bn1``, ``_fc``) is not built: EfficientDet deletes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, nn

from msdet.models.layers import (
    Conv2dSame,
    PlaneMean,
    SigmoidGate,
    Swish,
    batch_norm,
    drop_connect,
    init_conv_normal_fan_out,
    norm_act,
)


@dataclass(frozen=True)
class BlockArgs:
    kernel_size: int
    num_repeat: int
    input_filters: int
    output_filters: int
    expand_ratio: int
    stride: int
    se_ratio: float = 0.25


#: EfficientNet-B0 stages (width and depth multipliers 1.0), the official block strings decoded.
EFFICIENTNET_B0_STAGES = (
    BlockArgs(3, 1, 32, 16, 1, 1),
    BlockArgs(3, 2, 16, 24, 6, 2),
    BlockArgs(5, 2, 24, 40, 6, 2),
    BlockArgs(3, 3, 40, 80, 6, 2),
    BlockArgs(5, 3, 80, 112, 6, 1),
    BlockArgs(5, 4, 112, 192, 6, 2),
    BlockArgs(3, 1, 192, 320, 6, 1),
)


def expand_stages(stages: tuple[BlockArgs, ...]) -> list[BlockArgs]:
    """One BlockArgs per block: the first block of a stage strides and changes width, repeats do not."""
    blocks = []
    for st in stages:
        blocks.append(st)
        for _ in range(st.num_repeat - 1):
            blocks.append(BlockArgs(st.kernel_size, 1, st.output_filters, st.output_filters, st.expand_ratio, 1,
                                    st.se_ratio))
    return blocks


class MBConvBlock(nn.Cell):
    """Mobile inverted bottleneck: [1x1 expand + BN + swish] -> depthwise + BN + swish -> SE -> 1x1 project + BN.

    The identity skip (with drop connect while training) is used when stride is 1 and widths match.
    """

    def __init__(self, args: BlockArgs, drop_connect_rate: float = 0.0,
                 bn_momentum: float = 0.99, bn_eps: float = 1e-3) -> None:
        super().__init__()
        self.args = args
        inp = args.input_filters
        oup = inp * args.expand_ratio
        self.has_expand = args.expand_ratio != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(inp, oup, 1, bias=False)
            self._bn0 = batch_norm(oup, bn_momentum, bn_eps)
        self._depthwise_conv = Conv2dSame(oup, oup, args.kernel_size, stride=args.stride, bias=False, groups=oup)
        self._bn1 = batch_norm(oup, bn_momentum, bn_eps)
        squeezed = max(1, int(inp * args.se_ratio))
        self._se_reduce = Conv2dSame(oup, squeezed, 1, bias=True)
        self._se_expand = Conv2dSame(squeezed, oup, 1, bias=True)
        self._project_conv = Conv2dSame(oup, args.output_filters, 1, bias=False)
        self._bn2 = batch_norm(args.output_filters, bn_momentum, bn_eps)
        self._swish = Swish()
        self._se_swish = Swish()  # not after a BatchNorm: _swish is fused into _bn0 and _bn1 (norm_act)
        if self.has_expand:
            norm_act(self._bn0, self._swish)
        norm_act(self._bn1, self._swish)
        self._squeeze, self._excite = PlaneMean(), SigmoidGate()
        self.use_skip = args.stride == 1 and inp == args.output_filters
        self.drop_connect_rate = float(drop_connect_rate)

    def construct(self, inputs: Tensor) -> Tensor:
        x = inputs
        if self.has_expand:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        s = self._squeeze(x)
        s = self._se_expand(self._se_swish(self._se_reduce(s)))
        x = self._excite(x, s)
        x = self._bn2(self._project_conv(x))
        if self.use_skip:
            if self.training and self.drop_connect_rate > 0:
                x = drop_connect(x, self.drop_connect_rate)
            x = x + inputs
        return x


class EfficientNet(nn.Cell):
    """Stem + MBConv blocks; returns the last block output before each of the last stride changes and the
    final block output: for B0 (C3, C4, C5) with 40/112/320 channels at strides 8/16/32.

    Block ``i`` drops its residual with probability ``drop_connect_rate * i / num_blocks`` (zylo117/automl).
    """

    def __init__(self, stages: tuple[BlockArgs, ...] = EFFICIENTNET_B0_STAGES, drop_connect_rate: float = 0.2,
                 num_features: int = 3, seed: int = 0) -> None:
        super().__init__()
        blocks = expand_stages(stages)
        stem = stages[0].input_filters
        self._conv_stem = Conv2dSame(3, stem, 3, stride=2, bias=False)
        self._bn0 = batch_norm(stem)
        self._swish = Swish()
        norm_act(self._bn0, self._swish)
        n = len(blocks)
        self._blocks = nn.CellList([MBConvBlock(b, drop_connect_rate * i / n) for i, b in enumerate(blocks)])
        # A feature is the output of the block just before a stride-2 block, plus the last block's output.
        taps = [i - 1 for i, b in enumerate(blocks) if b.stride == 2 and i > 0] + [n - 1]
        self.feature_ids = tuple(taps[-num_features:])
        self.feature_channels = tuple(blocks[i].output_filters for i in self.feature_ids)
        rng = np.random.default_rng(seed)
        for _, cell in self.cells_and_names():
            if isinstance(cell, nn.Conv2d):
                init_conv_normal_fan_out(cell, rng)

    def construct(self, x: Tensor) -> tuple:
        x = self._swish(self._bn0(self._conv_stem(x)))
        feats = ()
        i = 0
        for block in self._blocks:
            x = block(x)
            if i in self.feature_ids:
                feats = feats + (x,)
            i += 1
        return feats


class EfficientNetBackbone(nn.Cell):
    """Holds the EfficientNet as ``.model``: keeps the official key layout ``backbone_net.model.*``."""

    def __init__(self, drop_connect_rate: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.model = EfficientNet(drop_connect_rate=drop_connect_rate, seed=seed)
        self.out_channels = self.model.feature_channels

    def construct(self, x: Tensor) -> tuple:
        return self.model(x)
