"""ShuffleNetV2 feature extractor in NanoDet's (= torchvision's) layout.

Blocks concatenate their two branches and then shuffle channels (groups 2); a stride-1 block passes the
first half of its input through and transforms the second half. The cell tree mirrors the official module
tree (``conv1``, ``stage2..4`` of ``branch1``/``branch2`` sequences, activations occupying their indices), so
parameter names equal the official state-dict keys up to BatchNorm's naming. NanoDet builds it without
``conv5`` and returns the outputs of stages 2-4 (strides 8, 16, 32).
"""
from __future__ import annotations

from collections.abc import Sequence

from mindspore import Tensor, nn, ops
from mindspore.common import initializer as init

from msdet import train_ops
from msdet.models.layers import LeakyReLU, batch_norm2d, conv2d, norm_act_pairs

#: Output channels of conv1 and stages 2-4 per width multiplier.
STAGE_OUT_CHANNELS = {
    "0.5x": (24, 48, 96, 192),
    "1.0x": (24, 116, 232, 464),
    "1.5x": (24, 176, 352, 704),
    "2.0x": (24, 244, 488, 976),
}
STAGE_REPEATS = (4, 8, 4)


def activation_cell(name: str) -> nn.Cell:
    """NanoDet's ``act_layers``: LeakyReLU uses slope 0.1."""
    if name == "LeakyReLU":
        return LeakyReLU(alpha=0.1)
    if name == "ReLU":
        return nn.ReLU()
    raise ValueError(f"unsupported activation '{name}' (expected LeakyReLU or ReLU)")


def _bn(c: int) -> nn.BatchNorm2d:
    # PyTorch defaults: eps 1e-5, momentum 0.1 (MindSpore weights the old value: 0.9).
    return batch_norm2d(c, 1e-5, 0.9)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return conv2d(cin, cout, k, stride=stride, pad_mode="pad", padding=k // 2, has_bias=False, group=groups)


class MaxPool3x3s2p1(nn.Cell):
    """PyTorch ``MaxPool2d(3, stride=2, padding=1)`` (implicit -inf padding), written as edge-replicate padding
    plus a valid pool: every padded cell copies a border cell of the same window, so the maxima are identical.
    (MindSpore's padded max-pool lowers to MaxPool3DWithArgmax, which ONNX export does not support.)"""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="valid")
        #: CPU training: the C++ kernel (msdet/kernels/max_pool.py), one op each way
        self.fast = train_ops.make("max_pool_3x3s2p1")

    def construct(self, x: Tensor) -> Tensor:
        if self.training and self.fast is not None:
            return self.fast(x)
        x = ops.concat((x[:, :, :1], x, x[:, :, -1:]), axis=2)
        x = ops.concat((x[:, :, :, :1], x, x[:, :, :, -1:]), axis=3)
        return self.pool(x)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    b, c, h, w = x.shape
    x = ops.reshape(x, (b, groups, c // groups, h, w))
    x = ops.transpose(x, (0, 2, 1, 3, 4))
    return ops.reshape(x, (b, c, h, w))


def shuffle_concat(a: Tensor, b: Tensor) -> Tensor:
    """``channel_shuffle(concat((a, b), 1), 2)`` as one interleaving ``Stack`` (backward: one ``Unstack``) instead
    of Concat + Transpose forward and Transpose + two Slices backward; the same values, bit for bit."""
    n, c, h, w = a.shape
    return ops.reshape(ops.stack((a, b), axis=2), (n, 2 * c, h, w))


class ShuffleV2Block(nn.Cell):
    def __init__(self, inp: int, oup: int, stride: int, activation: str = "ReLU") -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ShuffleV2Block: stride must be 1 or 2, got {stride}")
        self.stride = stride
        branch = oup // 2
        if stride == 1 and inp != branch * 2:
            raise ValueError(f"ShuffleV2Block: stride-1 block needs inp == oup ({inp} != {oup})")
        if stride > 1:
            self.branch1 = nn.SequentialCell(norm_act_pairs([
                _conv(inp, inp, 3, stride, groups=inp), _bn(inp),
                _conv(inp, branch, 1), _bn(branch), activation_cell(activation),
            ]))
        self.branch2 = nn.SequentialCell(norm_act_pairs([
            _conv(inp if stride > 1 else branch, branch, 1), _bn(branch), activation_cell(activation),
            _conv(branch, branch, 3, stride, groups=branch), _bn(branch),
            _conv(branch, branch, 1), _bn(branch), activation_cell(activation),
        ]))

    def construct(self, x: Tensor) -> Tensor:
        if self.stride == 1:  # Split's gradient is one Concat, two slices' two StridedSliceGrads and an AddN
            first, second = ops.split(x, x.shape[1] // 2, axis=1)
            return shuffle_concat(first, self.branch2(second))
        return shuffle_concat(self.branch1(x), self.branch2(x))


class ShuffleNetV2(nn.Cell):
    """conv1 (3x3 s2) -> max-pool (3x3 s2 p1) -> stages 2, 3, 4; returns the stages in ``out_stages``."""

    def __init__(self, model_size: str = "1.0x", out_stages: Sequence[int] = (2, 3, 4),
                 activation: str = "LeakyReLU") -> None:
        super().__init__()
        if model_size not in STAGE_OUT_CHANNELS:
            raise ValueError(f"ShuffleNetV2: model_size '{model_size}' not in {sorted(STAGE_OUT_CHANNELS)}")
        if not set(out_stages) <= {2, 3, 4}:
            raise ValueError(f"ShuffleNetV2: out_stages {tuple(out_stages)} must be a subset of (2, 3, 4)")
        self.out_stages = tuple(out_stages)
        chans = STAGE_OUT_CHANNELS[model_size]
        self.out_channels = tuple(chans[s - 1] for s in self.out_stages)
        self.conv1 = nn.SequentialCell(norm_act_pairs([_conv(3, chans[0], 3, 2), _bn(chans[0]),
                                                       activation_cell(activation)]))
        self.maxpool = MaxPool3x3s2p1()
        cin = chans[0]
        stages = []
        for repeats, cout in zip(STAGE_REPEATS, chans[1:]):
            blocks = [ShuffleV2Block(cin, cout, 2, activation)]
            blocks += [ShuffleV2Block(cout, cout, 1, activation) for _ in range(repeats - 1)]
            stages.append(nn.SequentialCell(blocks))
            cin = cout
        self.stage2, self.stage3, self.stage4 = stages
        self._init_weights()

    def _init_weights(self) -> None:
        """Official ``_initialize_weights``: conv N(0, 1 / weight.shape[1]); BN weight 1, bias 1e-4."""
        for _, cell in self.cells_and_names():
            if isinstance(cell, nn.Conv2d):
                shape = cell.weight.shape
                cell.weight.set_data(init.initializer(init.Normal(1.0 / shape[1]), shape, cell.weight.dtype))
            elif isinstance(cell, nn.BatchNorm2d):
                n = cell.gamma.shape[0]
                cell.gamma.set_data(init.initializer("ones", (n,)))
                cell.beta.set_data(init.initializer(init.Constant(1e-4), (n,)))
                cell.moving_mean.set_data(init.initializer("zeros", (n,)))
                cell.moving_variance.set_data(init.initializer("ones", (n,)))

    def construct(self, x: Tensor) -> tuple:
        x = self.maxpool(self.conv1(x))
        c2 = self.stage2(x)
        c3 = self.stage3(c2)
        c4 = self.stage4(c3)
        outs = ()
        if 2 in self.out_stages:
            outs = outs + (c2,)
        if 3 in self.out_stages:
            outs = outs + (c3,)
        if 4 in self.out_stages:
            outs = outs + (c4,)
        return outs


__all__ = ["ShuffleNetV2", "ShuffleV2Block", "MaxPool3x3s2p1", "channel_shuffle", "shuffle_concat",
           "activation_cell", "STAGE_OUT_CHANNELS"]
