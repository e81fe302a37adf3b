"""Dense convolutions on oneDNN 3's blocked kernels (``dense_conv.cc``) for CPU training.

MindSpore 2.8 runs its CPU convolutions on its bundled oneDNN 2.2 with plain NCHW tensors, which gets oneDNN's
im2col + GEMM path: 1.4-1.6x the time of PyTorch's (oneDNN 3, blocked layouts) at NanoDet-Plus's aux-head convs,
3-7x at its narrow output convs, and most of NanoDet-Plus's remaining gap to the official code
(docs/performance.md). A training graph on CPU runs a dense conv as one ``mindspore.ops.Custom`` "aot" primitive
whose ``bprop`` is one op computing both gradients; the library is compiled with g++ at first use against pip's
``onednn-cpu-gomp`` (requirements.txt), and stays off without its headers. Inference and exported graphs
(``set_train(False)``) keep MindSpore's ``Conv2D``, as do GPU and Ascend. The ``conv2d`` part of
:mod:`msdet.train_ops` for the convs it fits (:func:`fits`); the depthwise kernel's factory comes after this one.
"""
from __future__ import annotations

import sys
from pathlib import Path

from mindspore import Tensor, nn

from msdet.kernels.library import KernelLibrary

_PREFIX = Path(sys.prefix)
LIBRARY = KernelLibrary("dense_conv", Path(__file__).with_suffix(".cc"), "dense convs keep MindSpore's CPU kernels",
                        flags=(f"-I{_PREFIX / 'include'}", f"-L{_PREFIX / 'lib'}", f"-Wl,-rpath,{_PREFIX / 'lib'}",
                               # Debian's g++ links --as-needed, and flags precede the source
                               "-Wl,--no-as-needed", "-ldnnl", "-lgomp"),
                        requires=(_PREFIX / "include" / "oneapi" / "dnnl" / "dnnl.hpp",))


class DenseConv(nn.Cell):
    """Parameter-free ``conv(x, w)`` (dense k x k, odd k, group 1, no bias) as one ``Custom`` primitive with the
    C++ gradients as its ``bprop``. ``same``: TF "same" padding (MindSpore's ``pad_mode="same"``); otherwise
    ``(k - 1) / 2`` on every side. One op name per geometry: MindSpore keeps one shape function per name."""

    def __init__(self, kernel_size: int, stride: int, same: bool) -> None:
        super().__init__()
        if kernel_size % 2 == 0 or stride not in (1, 2):
            raise ValueError(f"dense conv kernel: size must be odd and stride 1 or 2, got {kernel_size}, {stride}")
        name = f"s{stride}_{'same' if same else 'half'}"
        grad = LIBRARY.op(f"conv_bwd_{name}", out_shape=lambda x, w, dy: (x, w), out_dtype=lambda x, w, dy: (x, w))

        def bprop(x, w, out, dout):
            return grad(x, w, dout)

        def out_shape(x, w):  # both paddings give ceil(size / stride) for an odd k
            return [x[0], w[0], -(-x[2] // stride), -(-x[3] // stride)]

        self.conv = LIBRARY.op(f"conv_fwd_{name}", out_shape=out_shape, bprop=bprop)

    def construct(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w)


def _levels_bprop(grad, levels: int):
    """The bprop of a ``levels``-level op: MindSpore reads a bprop's arity from its signature (no ``*args``)."""
    def bprop2(x0, x1, w, out, dout):
        return grad(x0, x1, w, *dout)

    def bprop3(x0, x1, x2, w, out, dout):
        return grad(x0, x1, x2, w, *dout)

    def bprop4(x0, x1, x2, x3, w, out, dout):
        return grad(x0, x1, x2, x3, w, *dout)

    def bprop5(x0, x1, x2, x3, x4, w, out, dout):
        return grad(x0, x1, x2, x3, x4, w, *dout)

    return {2: bprop2, 3: bprop3, 4: bprop4, 5: bprop5}[levels]


#: the level counts :class:`DenseConvLevels` takes (a head with another count runs one conv per level)
LEVEL_COUNTS = (2, 3, 4, 5)


class DenseConvLevels(nn.Cell):
    """``(conv(x_0, w), .., conv(x_{L-1}, w))`` for the ``levels`` maps of a head that share one conv, as one
    ``Custom`` primitive each way (``convs_*`` of dense_conv.cc): the weights reordered once, not per level, and
    their gradient summed over the levels in the op; each level's values those of :class:`DenseConv`."""

    def __init__(self, stride: int, same: bool, levels: int) -> None:
        super().__init__()
        name = f"s{stride}_{'same' if same else 'half'}"

        def grad_shape(*shapes):  # x_0.., w, dy_0.. -> dx_0.., dw
            return (*shapes[:levels], shapes[levels])

        grad = LIBRARY.op(f"convs_bwd_{name}", out_shape=grad_shape, out_dtype=grad_shape)
        bprop = _levels_bprop(grad, levels)

        def out_shape(*shapes):  # x_0.., w -> y_0..
            w = shapes[-1]
            return tuple([x[0], w[0], -(-x[2] // stride), -(-x[3] // stride)] for x in shapes[:-1])

        self.conv = LIBRARY.op(f"convs_fwd_{name}", out_shape=out_shape,
                               out_dtype=lambda *dtypes: dtypes[:-1], bprop=bprop)

    def construct(self, xs: tuple, w: Tensor) -> tuple:
        return self.conv(*xs, w)


class FastDenseConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, names and checkpoint layout) whose training graph uses :class:`DenseConv`
    (then the bias, if any); in eval mode it is the plain ``nn.Conv2d``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, pad_mode: str,
                 padding: int, has_bias: bool) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, pad_mode=pad_mode, padding=padding,
                         has_bias=has_bias)
        self.fast = DenseConv(kernel_size, stride, pad_mode == "same")
        self.fast_levels = None

    def share_levels(self, levels: int) -> bool:
        """Mark this conv as shared by ``levels`` maps, run through :meth:`levels` (a head's tower); False
        (nothing changed) for a level count :class:`DenseConvLevels` does not take."""
        if levels not in LEVEL_COUNTS:
            return False
        self.fast_levels = DenseConvLevels(self.stride[0], self.pad_mode == "same", levels)
        return True

    def construct(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().construct(x)
        y = self.fast(x, self.weight)
        if self.has_bias:
            y = self.bias_add(y, self.bias)
        return y

    def levels(self, xs: tuple) -> tuple:
        """This conv on every map of ``xs`` (the levels of a head that shares it): in training one op each way for
        all of them (:class:`DenseConvLevels`), else one conv each."""
        if not self.training or self.fast_levels is None:
            out = ()
            for x in xs:
                out = out + (self.construct(x),)
            return out
        ys = self.fast_levels(xs, self.weight)
        if not self.has_bias:
            return ys
        out = ()
        for y in ys:
            out = out + (self.bias_add(y, self.bias),)
        return out


def fits(kernel_size: int, stride: int, pad_mode: str, padding: int, group: int) -> bool:
    """Whether the kernel computes this conv: dense (group 1), odd square kernel k > 1; stride 1 or 2; "same"
    padding or ``(k - 1) / 2``. 1x1 convs stay MindSpore's: its GEMM path is as fast there (docs/performance.md)."""
    return (group == 1 and isinstance(kernel_size, int) and kernel_size > 1 and kernel_size % 2 == 1
            and stride in (1, 2) and (pad_mode == "same" or (pad_mode == "pad" and padding == (kernel_size - 1) // 2)))


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, pad_mode: str = "same",
           padding: int = 0, has_bias: bool = False, group: int = 1) -> FastDenseConv2d | None:
    """``FastDenseConv2d`` for a conv the kernel fits, else None."""
    if not fits(kernel_size, stride, pad_mode, padding, group):
        return None
    return FastDenseConv2d(in_channels, out_channels, kernel_size, stride, pad_mode, padding, has_bias)


#: the parts of msdet.train_ops this kernel provides
REPLACEMENTS = {"conv2d": conv2d}
