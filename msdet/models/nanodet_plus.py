"""NanoDet-Plus: ShuffleNetV2 + GhostPAN + NanoDetPlusHead, with the training-only Assign Guidance Module
(``aux_fpn``, a copy of the neck, and ``aux_head``, a SimpleConvHead on the concatenated main and aux features).

Head outputs are ``[B, num_priors, num_classes + 4 * (reg_max + 1)]``: per level ``[B, C, H, W]`` flattened
to ``[B, C, H*W]``, levels concatenated, channels last (prior order: level, y, x). The first ``num_classes``
channels are class logits, the rest the per-side distance distributions (logits over ``reg_max + 1`` bins).
Cell names mirror the official modules so parameter names are the official state-dict keys.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from msdet.models.ghostpan import ConvModule, DepthwiseConvModule, GhostPAN, normal_init
from msdet.models.layers import conv2d, conv_levels, share_levels
from msdet.models.shufflenetv2 import ShuffleNetV2
from msdet.ops.distance_coder import Integral

#: class-logit bias of every output conv: sigmoid(-4.595) = 0.01.
CLS_BIAS_INIT = -4.595


@dataclass(frozen=True)
class NanoDetPlusSpec:
    """config/nanodet-plus-m_320.yml."""

    model_size: str = "1.0x"
    fpn_channels: int = 96
    kernel_size: int = 5
    num_extra_level: int = 1
    head_stacked_convs: int = 2
    aux_channels: int = 192
    aux_stacked_convs: int = 4
    strides: tuple = (8, 16, 32, 64)
    activation: str = "LeakyReLU"


NANODET_PLUS_M = NanoDetPlusSpec()


def _flatten_levels(outs: list) -> Tensor:
    """list of [B, C, H, W] -> [B, sum(H*W), C]."""
    flat = [ops.reshape(o, (o.shape[0], o.shape[1], -1)) for o in outs]
    return ops.transpose(ops.concat(flat, axis=2), (0, 2, 1))


class NanoDetPlusHead(nn.Cell):
    """Per level: ``stacked_convs`` depthwise-separable ConvModules (not shared) and a 1x1 output conv."""

    def __init__(self, num_classes: int, input_channel: int = 96, feat_channels: int = 96, stacked_convs: int = 2,
                 kernel_size: int = 5, strides: Sequence[int] = (8, 16, 32, 64), reg_max: int = 7,
                 activation: str = "LeakyReLU") -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.strides = tuple(strides)
        self.num_levels = len(self.strides)
        self.out_channels = num_classes + 4 * (reg_max + 1)
        self.distribution_project = Integral(reg_max)
        self.cls_convs = nn.CellList([
            nn.CellList([DepthwiseConvModule(input_channel if i == 0 else feat_channels, feat_channels, kernel_size,
                                             padding=kernel_size // 2, activation=activation)
                         for i in range(stacked_convs)])
            for _ in self.strides])
        self.gfl_cls = nn.CellList([nn.Conv2d(feat_channels, self.out_channels, 1, has_bias=True)
                                    for _ in self.strides])
        self.stacked_convs = stacked_convs
        self._init_weights()

    def _init_weights(self) -> None:
        for _, cell in self.cls_convs.cells_and_names():
            if isinstance(cell, nn.Conv2d):
                normal_init(cell, 0.01)
        for conv in self.gfl_cls:
            # the official init sets every output bias (class and distance channels) to -4.595
            normal_init(conv, 0.01, CLS_BIAS_INIT)

    def construct(self, feats: tuple) -> Tensor:
        outs = []
        for lvl in range(self.num_levels):
            x = feats[lvl]
            for j in range(self.stacked_convs):
                x = self.cls_convs[lvl][j](x)
            outs.append(self.gfl_cls[lvl](x))
        return _flatten_levels(outs)


class Scale(nn.Cell):
    """A learnable scalar multiplier (0-d parameter ``scale``, as the official ``Scale``)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = Parameter(Tensor(value, ms.float32), name="scale")

    def construct(self, x: Tensor) -> Tensor:
        return x * self.scale


class SimpleConvHead(nn.Cell):
    """The AGM head: cls and reg towers of ``stacked_convs`` 3x3 conv + GroupNorm(32) + act shared across levels,
    3x3 output convs, and a learnable Scale per level on the distance logits."""

    def __init__(self, num_classes: int, input_channel: int = 192, feat_channels: int = 192, stacked_convs: int = 4,
                 strides: Sequence[int] = (8, 16, 32, 64), reg_max: int = 7, activation: str = "LeakyReLU") -> None:
        super().__init__()
        self.num_levels = len(strides)
        self.stacked_convs = stacked_convs
        self.cls_convs = nn.CellList([ConvModule(input_channel if i == 0 else feat_channels, feat_channels, 3,
                                                 padding=1, norm="GN", activation=activation)
                                      for i in range(stacked_convs)])
        self.reg_convs = nn.CellList([ConvModule(input_channel if i == 0 else feat_channels, feat_channels, 3,
                                                 padding=1, norm="GN", activation=activation)
                                      for i in range(stacked_convs)])
        self.gfl_cls = conv2d(feat_channels, num_classes, 3, pad_mode="pad", padding=1, has_bias=True)
        self.gfl_reg = conv2d(feat_channels, 4 * (reg_max + 1), 3, pad_mode="pad", padding=1, has_bias=True)
        self.scales = nn.CellList([Scale(1.0) for _ in strides])
        for m in list(self.cls_convs) + list(self.reg_convs):
            normal_init(m.conv, 0.01)
            m.share_levels(self.num_levels)
        normal_init(self.gfl_cls, 0.01, CLS_BIAS_INIT)
        normal_init(self.gfl_reg, 0.01, 0.0)
        self.gfl_shared = (share_levels(self.gfl_cls, self.num_levels), share_levels(self.gfl_reg, self.num_levels))

    def construct(self, feats: tuple) -> Tensor:
        # conv by conv over all levels (the same values as level by level): the CPU kernel runs a conv that the
        # levels share as one op each way (msdet.models.layers.share_levels)
        cls_feats, reg_feats = feats, feats
        for j in range(self.stacked_convs):
            cls_feats = self.cls_convs[j].levels(cls_feats)
            reg_feats = self.reg_convs[j].levels(reg_feats)
        cls_scores = conv_levels(self.gfl_cls, self.gfl_shared[0], cls_feats)
        bbox_preds = conv_levels(self.gfl_reg, self.gfl_shared[1], reg_feats)
        outs = []
        for lvl in range(self.num_levels):
            outs.append(ops.concat((cls_scores[lvl], self.scales[lvl](bbox_preds[lvl])), axis=1))
        return _flatten_levels(outs)


def keep_gradient(x: Tensor, keep: Tensor) -> Tensor:
    """Forward value ``x``; gradient scaled by ``keep`` (1 passes it, 0 stops it) - a detach switched in-graph."""
    sg = ops.stop_gradient(x)
    return sg + (x - sg) * keep


class NanoDetPlus(nn.Cell):
    """``construct(image)`` -> main head outputs; ``forward_train(image, keep)`` -> (main, aux) outputs.

    ``keep`` is a float scalar: 1 before ``detach_epoch`` (aux losses train the backbone and neck too), 0 from
    then on (the AGM only sees detached backbone and neck features).
    """

    def __init__(self, num_classes: int, reg_max: int = 7, spec: NanoDetPlusSpec = NANODET_PLUS_M) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.reg_max = reg_max
        self.spec = spec
        self.strides = tuple(spec.strides)
        self.backbone = ShuffleNetV2(spec.model_size, (2, 3, 4), spec.activation)
        fpn_args = dict(in_channels=self.backbone.out_channels, out_channels=spec.fpn_channels, use_depthwise=True,
                        kernel_size=spec.kernel_size, num_extra_level=spec.num_extra_level,
                        activation=spec.activation)
        self.fpn = GhostPAN(**fpn_args)
        self.head = NanoDetPlusHead(num_classes, spec.fpn_channels, spec.fpn_channels, spec.head_stacked_convs,
                                    spec.kernel_size, spec.strides, reg_max, spec.activation)
        self.aux_fpn = GhostPAN(**fpn_args)
        # the official aux_fpn is a deepcopy of the freshly initialised fpn
        for dst, src in zip(self.aux_fpn.get_parameters(), self.fpn.get_parameters()):
            dst.set_data(Tensor(src.asnumpy().copy()))
        self.aux_head = SimpleConvHead(num_classes, spec.aux_channels, spec.aux_channels, spec.aux_stacked_convs,
                                       spec.strides, reg_max, spec.activation)
        self.num_levels = len(self.strides)

    def construct(self, x: Tensor) -> Tensor:
        return self.head(self.fpn(self.backbone(x)))

    def forward_train(self, x: Tensor, keep: Tensor) -> tuple:
        feats = self.backbone(x)
        fpn_feats = self.fpn(feats)
        head_out = self.head(fpn_feats)
        aux_in = ()
        for f in feats:
            aux_in = aux_in + (keep_gradient(f, keep),)
        aux_fpn_feats = self.aux_fpn(aux_in)
        dual = ()
        for lvl in range(self.num_levels):
            dual = dual + (ops.concat((keep_gradient(fpn_feats[lvl], keep), aux_fpn_feats[lvl]), axis=1),)
        aux_out = self.aux_head(dual)
        return head_out, aux_out


class NanoDetPlusInference(nn.Cell):
    """image -> [B, num_priors, num_classes + 4 * (reg_max + 1)] with sigmoid on the class channels (official ONNX)."""

    def __init__(self, network: NanoDetPlus) -> None:
        super().__init__(auto_prefix=False)
        self.network = network
        self.num_classes = network.num_classes

    def construct(self, x: Tensor) -> Tensor:
        out = self.network(x)
        c = self.num_classes
        return ops.concat((ops.sigmoid(out[..., :c]), out[..., c:]), axis=-1)


__all__ = ["NanoDetPlus", "NanoDetPlusHead", "SimpleConvHead", "Scale", "NanoDetPlusInference", "NanoDetPlusSpec",
           "NANODET_PLUS_M", "CLS_BIAS_INIT", "keep_gradient"]
