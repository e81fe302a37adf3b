"""Small generic layers shared by the networks: the layers a CPU training graph may run on a kernel (conv,
BatchNorm, GroupNorm, swish, LeakyReLU, the SE block's mean and gate), TF-"same" conv and max-pool, separable conv,
init.

The kernel-backed layers are built through :mod:`msdet.train_ops`: MindSpore's own cells unless a kernel layer
(:mod:`msdet.kernels`, switched on by CPU training only) installed a replacement. Every replacement has the
parameters, names and eval-mode graph of the cell it replaces.

TF "same" semantics (as TensorFlow and zylo117's ``Conv2dStaticSamePadding``): the output is
``ceil(in / stride)`` and the padding total ``max((out - 1) * stride + k - in, 0)`` is split with the extra
pixel at the bottom/right. MindSpore's ``pad_mode="same"`` convolution implements exactly this.
"""
from __future__ import annotations

import math

import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from msdet import train_ops


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, pad_mode: str = "same",
           padding: int = 0, has_bias: bool = False, group: int = 1) -> nn.Conv2d:
    """``nn.Conv2d(...)`` with these arguments, or the kernel-backed subclass that fits it (``conv2d`` of
    :mod:`msdet.train_ops`: a dense k x k conv on oneDNN 3, a depthwise 3x3/5x5 on the C++ kernel)."""
    fast = train_ops.make("conv2d", in_channels, out_channels, kernel_size, stride, pad_mode, padding, has_bias,
                          group)
    if fast is not None:
        return fast
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode=pad_mode, padding=padding,
                     has_bias=has_bias, group=group)


def batch_norm2d(num_features: int, eps: float, momentum: float) -> nn.BatchNorm2d:
    """``nn.BatchNorm2d`` (MindSpore's momentum: the weight of the old moving value), or its kernel-backed
    subclass (``batch_norm2d`` of :mod:`msdet.train_ops`, float32 NCHW input)."""
    fast = train_ops.make("batch_norm2d", num_features, eps, momentum)
    if fast is not None:
        return fast
    return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum)


def norm_act(norm: nn.Cell, act: nn.Cell) -> None:
    """Mark ``act(norm(x))``: where ``norm`` is a kernel-backed BatchNorm (``fuse_activation``) that has ``act``'s
    activation, its training op applies it and ``act`` passes its input through in training; eval mode and every
    other case run both cells. ``act`` must follow only the norms it is marked with (it may follow several)."""
    fuse = getattr(norm, "fuse_activation", None)
    kind = getattr(act, "kernel_activation", None)
    if fuse is not None and kind is not None and fuse(*kind):
        act.fused_into_norm = True


def share_levels(conv: nn.Cell, levels: int) -> bool:
    """Mark ``conv`` as shared by the ``levels`` maps of a head, run through :func:`conv_levels`: where it is a
    kernel-backed conv (``share_levels``), its training graph runs all levels as one op each way. False where
    nothing changed (each level then runs the conv on its own)."""
    share = getattr(conv, "share_levels", None)
    return bool(share is not None and share(levels))


def conv_levels(conv: nn.Cell, shared: bool, xs: tuple) -> tuple:
    """``conv`` on every map of ``xs``; ``shared``: what :func:`share_levels` returned for it."""
    if shared:
        return conv.levels(xs)
    out = ()
    for x in xs:
        out = out + (conv(x),)
    return out


def norm_act_pairs(cells: list) -> list:
    """``cells`` (a SequentialCell's list) with :func:`norm_act` applied to every norm directly followed by an
    activation."""
    for norm, act in zip(cells, cells[1:]):
        norm_act(norm, act)
    return cells


def group_norm(num_groups: int, num_channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """``nn.GroupNorm``, or its kernel-backed subclass (``group_norm`` of :mod:`msdet.train_ops`)."""
    fast = train_ops.make("group_norm", num_groups, num_channels, eps)
    if fast is not None:
        return fast
    return nn.GroupNorm(num_groups, num_channels, eps=eps)


class Swish(nn.Cell):
    """``x * sigmoid(x)`` written out, so export formats without a SiLU op still get it; a training graph built
    while a kernel provides ``swish`` runs that instead."""

    kernel_activation = ("swish",)

    def __init__(self) -> None:
        super().__init__()
        self.fast = train_ops.make("swish")
        #: training: the preceding BatchNorm applies it (norm_act)
        self.fused_into_norm = False

    def construct(self, x: Tensor) -> Tensor:
        if self.training:
            if self.fused_into_norm:
                return x
            if self.fast is not None:
                return self.fast(x)
        return x * ops.sigmoid(x)


class LeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` whose training graph is the ``leaky_relu`` kernel when one is installed, else
    ``relu(x) - alpha * relu(-x)``: both give PyTorch's values and gradients bit for bit (``0 - alpha * -x`` is
    ``alpha * x`` exactly; the gradient is ``dy`` or ``alpha * dy`` plus an exact zero), where MindSpore lowers
    ``nn.LeakyReLU`` to ``Maximum(alpha * x, x)``, whose gradient is two slow ``Select`` kernels. Eval and export
    keep the one op."""

    def __init__(self, alpha: float = 0.2) -> None:
        super().__init__(alpha=alpha)
        self.fast = train_ops.make("leaky_relu", alpha)
        self.kernel_activation = ("leaky_relu", float(alpha))
        #: training: the preceding BatchNorm applies it (norm_act)
        self.fused_into_norm = False

    def construct(self, x: Tensor) -> Tensor:
        if self.training:
            if self.fused_into_norm:
                return x
            if self.fast is not None:
                return self.fast(x)
            return ops.relu(x) - self.alpha * ops.relu(-x)
        return super().construct(x)


class PlaneMean(nn.Cell):
    """The SE block's squeeze, ``mean(x, (2, 3), keep_dims=True)``; the ``plane_mean`` kernel in a training graph
    built while one is installed."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = train_ops.make("plane_mean")

    def construct(self, x: Tensor) -> Tensor:
        if self.training and self.fast is not None:
            return self.fast(x)
        return ops.mean(x, (2, 3), True)


class SigmoidGate(nn.Cell):
    """The SE block's excitation, ``sigmoid(s) * x``; the ``sigmoid_gate`` kernel in a training graph built while
    one is installed."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = train_ops.make("sigmoid_gate")

    def construct(self, x: Tensor, s: Tensor) -> Tensor:
        if self.training and self.fast is not None:
            return self.fast(x, s)
        return ops.sigmoid(s) * x


def batch_norm(num_features: int, momentum: float = 0.99, eps: float = 1e-3) -> nn.BatchNorm2d:
    """BatchNorm2d with TF defaults of EfficientNet/EfficientDet.

    MindSpore's ``momentum`` weights the OLD running value (``new = m * old + (1 - m) * batch``), so
    MindSpore 0.99 == TF 0.99 == PyTorch 0.01.
    """
    return batch_norm2d(num_features, eps, momentum)


class Conv2dSame(nn.Cell):
    """Conv2d with TF "same" padding; the wrapped conv is ``.conv`` as in zylo117's Conv2dStaticSamePadding
    (built by :func:`conv2d`: on a C++ kernel in CPU training where one fits)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 bias: bool = True, groups: int = 1) -> None:
        super().__init__()
        self.conv = conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="same",
                           has_bias=bias, group=groups)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(x)


def same_pad_amounts(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TF "same" for one spatial dimension."""
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class MaxPool2dSame(nn.Cell):
    """Max-pool with TF "same" output size, padding with ZEROS as zylo117's MaxPool2dStaticSamePadding.

    (TensorFlow's own max-pool ignores padded cells; zylo117 pads with 0 via ``F.pad``. The released
    PyTorch weights were fitted with zero padding, so we keep it for a faithful port.)
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.pool = nn.MaxPool2d(kernel_size=kernel_size, stride=stride, pad_mode="valid")

    def construct(self, x: Tensor) -> Tensor:
        h, w = x.shape[2], x.shape[3]
        top, bottom = same_pad_amounts(h, self.kernel_size, self.stride)
        left, right = same_pad_amounts(w, self.kernel_size, self.stride)
        return self.pool(zero_pad2d(x, left, right, top, bottom))


def zero_pad2d(x: Tensor, left: int, right: int, top: int, bottom: int) -> Tensor:
    """Zero-pad the last two dims of NCHW by concatenation.

    Not ``ops.pad``: on CPU in MindSpore 2.8 its gradient (PadV3Grad) is wrong - it changes from call to call
    for identical inputs and eventually hangs a training step; concat's gradient is a plain slice.
    """
    b, c, h, w = x.shape
    if left:
        x = ops.concat((ops.zeros((b, c, h, left), x.dtype), x), 3)
    if right:
        x = ops.concat((x, ops.zeros((b, c, h, right), x.dtype)), 3)
    w = w + left + right
    if top:
        x = ops.concat((ops.zeros((b, c, top, w), x.dtype), x), 2)
    if bottom:
        x = ops.concat((x, ops.zeros((b, c, bottom, w), x.dtype)), 2)
    return x


def upsample_nearest2x(x: Tensor) -> Tensor:
    """Nearest-neighbour x2 upsampling of NCHW (each pixel becomes a 2x2 block)."""
    b, c, h, w = x.shape
    x = ops.reshape(x, (b, c, h, 1, w, 1))
    x = ops.broadcast_to(x, (b, c, h, 2, w, 2))
    return ops.reshape(x, (b, c, h * 2, w * 2))


class SeparableConvBlock(nn.Cell):
    """Depthwise k x k (no bias) + pointwise 1x1 (bias), optional BN and swish (zylo117 SeparableConvBlock)."""

    def __init__(self, in_channels: int, out_channels: int | None = None, norm: bool = True,
                 activation: bool = False, kernel_size: int = 3) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.depthwise_conv = Conv2dSame(in_channels, in_channels, kernel_size, bias=False, groups=in_channels)
        self.pointwise_conv = Conv2dSame(in_channels, out_channels, 1, bias=True)
        self.norm = norm
        self.activation = activation
        if norm:
            self.bn = batch_norm(out_channels)
        if activation:
            self.swish = Swish()

    def construct(self, x: Tensor) -> Tensor:
        x = self.pointwise_conv(self.depthwise_conv(x))
        if self.norm:
            x = self.bn(x)
        if self.activation:
            x = self.swish(x)
        return x


def drop_connect(x: Tensor, rate: float) -> Tensor:
    """Per-sample stochastic depth: drop the whole residual branch with probability ``rate``, rescale the rest."""
    keep = 1.0 - rate
    mask = ops.floor(keep + ops.rand((x.shape[0], 1, 1, 1), dtype=x.dtype))
    return x / keep * mask


# ----------------------------------------------------------------------------------------------------
# initialisation


def _fans(shape: tuple) -> tuple[int, int]:
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _set(param: Parameter, array: np.ndarray) -> None:
    param.set_data(Tensor(array.astype(np.float32)))


def init_conv_normal_fan_out(conv: nn.Conv2d, rng: np.random.Generator) -> None:
    """EfficientNet (TF) conv init: N(0, sqrt(2 / fan_out)) with fan_out = out_channels/groups*k*k."""
    shape = tuple(conv.weight.shape)
    fan_out = shape[0] // conv.group * int(np.prod(shape[2:]))
    _set(conv.weight, rng.normal(0.0, math.sqrt(2.0 / fan_out), shape))
    if conv.bias is not None:
        _set(conv.bias, np.zeros(conv.bias.shape))


def init_conv_variance_scaling(conv: nn.Conv2d, rng: np.random.Generator, scale: float = 1.0,
                               keras_fans: bool = True) -> None:
    """Keras ``VarianceScaling()`` (fan_in, truncated normal, std sqrt(scale / fan_in)) for conv weights; bias 0.

    ``keras_fans``: fan_in as Keras counts it, kh x kw x in_channels also for a depthwise kernel (its Keras
    shape is [kh, kw, in, 1]); False counts from the MindSpore/PyTorch shape [C, 1, kh, kw], i.e. kh x kw for
    a depthwise kernel, as zylo117's ``variance_scaling_`` does. The two agree for ungrouped convs.
    """
    shape = tuple(conv.weight.shape)
    fan_in, _ = _fans(shape)
    if keras_fans:
        fan_in *= conv.group
    std = math.sqrt(scale / max(1, fan_in)) / 0.87962566103423978
    w = rng.normal(0.0, 1.0, shape)
    while np.any(np.abs(w) > 2.0):
        bad = np.abs(w) > 2.0
        w[bad] = rng.normal(0.0, 1.0, int(bad.sum()))
    _set(conv.weight, w * std)
    if conv.bias is not None:
        _set(conv.bias, np.zeros(conv.bias.shape))


def init_conv_glorot_uniform(conv: nn.Conv2d, rng: np.random.Generator) -> None:
    """Keras default ``glorot_uniform`` for conv weights; bias zero."""
    shape = tuple(conv.weight.shape)
    fan_in, fan_out = _fans(shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    _set(conv.weight, rng.uniform(-limit, limit, shape))
    if conv.bias is not None:
        _set(conv.bias, np.zeros(conv.bias.shape))


def convs_of(cell: nn.Cell) -> list[nn.Conv2d]:
    return [sub for _, sub in cell.cells_and_names() if isinstance(sub, nn.Conv2d)]


__all__ = [
    "conv2d", "batch_norm2d", "group_norm", "Swish", "LeakyReLU", "PlaneMean", "SigmoidGate",
    "batch_norm", "Conv2dSame", "MaxPool2dSame", "same_pad_amounts", "zero_pad2d", "upsample_nearest2x",
    "SeparableConvBlock", "drop_connect", "init_conv_normal_fan_out", "init_conv_variance_scaling",
    "init_conv_glorot_uniform", "convs_of",
]
