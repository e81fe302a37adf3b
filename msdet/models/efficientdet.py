"""EfficientDet network: EfficientNet backbone + BiFPN + box/class heads (zylo117 layout, automl semantics).

The network returns raw head outputs ``(regression [B, A, 4] as (dy, dx, dh, dw), class logits [B, A, C])``
with anchors ordered (level, y, x, anchor); the inference wrapper applies the sigmoid to give the official
output layout. Logits (not probabilities) leave the network so the focal loss can use the stable
log-sigmoid form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, nn, ops

from msdet.models.bifpn import BiFPN
from msdet.models.efficientnet import EfficientNetBackbone
from msdet.models.layers import SeparableConvBlock, Swish, batch_norm, convs_of, init_conv_variance_scaling, norm_act

PRIOR_PROB = 0.01


@dataclass(frozen=True)
class EfficientDetSpec:
    """Architecture constants of one compound coefficient (D0 defaults)."""

    fpn_channels: int = 64
    fpn_repeats: int = 3
    head_repeats: int = 3
    num_levels: int = 5
    min_level: int = 3
    num_anchors: int = 9


D0_SPEC = EfficientDetSpec()


class HeadNet(nn.Cell):
    """Shared separable-conv tower with per-level BN (``bn_list[level][i]``), swish, then the output conv.

    Official ``Regressor`` (``outputs_per_anchor`` 4) and ``Classifier`` (``num_classes``) have this one body.
    """

    def __init__(self, in_channels: int, num_anchors: int, outputs_per_anchor: int, num_layers: int,
                 num_levels: int) -> None:
        super().__init__()
        self.outputs_per_anchor = outputs_per_anchor
        self.conv_list = nn.CellList([SeparableConvBlock(in_channels, in_channels, norm=False)
                                      for _ in range(num_layers)])
        self.bn_list = nn.CellList([nn.CellList([batch_norm(in_channels) for _ in range(num_layers)])
                                    for _ in range(num_levels)])
        self.header = SeparableConvBlock(in_channels, num_anchors * outputs_per_anchor, norm=False)
        self.swish = Swish()
        for bns in self.bn_list:
            for bn in bns:
                norm_act(bn, self.swish)

    def construct(self, feats: tuple) -> Tensor:
        outs = ()
        level = 0
        for feat in feats:
            bns = self.bn_list[level]
            i = 0
            for conv in self.conv_list:
                feat = self.swish(bns[i](conv(feat)))
                i += 1
            feat = self.header(feat)
            b = feat.shape[0]
            feat = ops.transpose(feat, (0, 2, 3, 1))
            outs = outs + (ops.reshape(feat, (b, -1, self.outputs_per_anchor)),)
            level += 1
        return ops.concat(outs, 1)


HEAD_INITS = ("automl", "zylo117")


def init_heads(regressor: HeadNet, classifier: HeadNet, rng: np.random.Generator, head_init: str = "automl") -> None:
    """Box/class net weights ``VarianceScaling(1.0, fan_in)``, biases 0, class output bias -log((1 - pi) / pi).

    automl (``efficientdet_keras.py`` ClassNet/BoxNet: ``depthwise_initializer='variance_scaling'``) counts a
    3x3 depthwise kernel's fan_in over its input channels as Keras does (3 x 3 x 64 = 576); zylo117
    (``utils.variance_scaling_`` on the PyTorch shape [64, 1, 3, 3]) counts 9, so its header outputs start
    sqrt(64) = 8x larger. Both draw std sqrt(1 / fan_in); we draw it truncated as Keras (zylo117: plain normal).
    """
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init = {head_init!r}: must be one of {list(HEAD_INITS)}")
    for conv in convs_of(regressor) + convs_of(classifier):
        init_conv_variance_scaling(conv, rng, keras_fans=head_init == "automl")
    bias = classifier.header.pointwise_conv.conv.bias
    bias.set_data(Tensor(np.full(bias.shape, -math.log((1 - PRIOR_PROB) / PRIOR_PROB), np.float32)))


class EfficientDet(nn.Cell):
    """image [B, 3, S, S] -> (regression [B, A, 4], class logits [B, A, C]); S a multiple of 2^(max level)."""

    def __init__(self, num_classes: int, spec: EfficientDetSpec = D0_SPEC, drop_connect_rate: float = 0.2,
                 seed: int = 0, head_init: str = "automl") -> None:
        super().__init__()
        self.num_classes = num_classes
        self.spec = spec
        self.backbone_net = EfficientNetBackbone(drop_connect_rate=drop_connect_rate, seed=seed)
        self.bifpn = BiFPN(spec.fpn_channels, self.backbone_net.out_channels, spec.fpn_repeats, seed=seed + 1)
        self.regressor = HeadNet(spec.fpn_channels, spec.num_anchors, 4, spec.head_repeats, spec.num_levels)
        self.classifier = HeadNet(spec.fpn_channels, spec.num_anchors, num_classes, spec.head_repeats,
                                  spec.num_levels)
        init_heads(self.regressor, self.classifier, np.random.default_rng(seed + 2), head_init)

    def construct(self, image: Tensor) -> tuple:
        feats = self.backbone_net(image)
        feats = self.bifpn(feats)
        return self.regressor(feats), self.classifier(feats)


class EfficientDetInference(nn.Cell):
    """Official output layout: (regression [B, A, 4] (dy, dx, dh, dw), class probabilities [B, A, C])."""

    def __init__(self, network: EfficientDet) -> None:
        super().__init__(auto_prefix=False)  # wrapping must not rename the network's parameters
        self.network = network

    def construct(self, image: Tensor) -> tuple:
        regression, logits = self.network(image)
        return regression, ops.sigmoid(logits)
