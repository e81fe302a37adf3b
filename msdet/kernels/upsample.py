"""x2 bilinear upsampling (half-pixel centres) as a compiled C++ kernel (``upsample.cc``) for CPU training.

GhostPAN upsamples every top-down level. MindSpore's ``ResizeBilinearV2`` gradient takes 10 ms a call at
NanoDet-Plus's 320 px neck where PyTorch takes 2.3 (docs/performance.md). A training graph on CPU runs the
upsampling as one ``Custom`` op each way instead (the ``upsample_bilinear2x`` part of :mod:`msdet.train_ops`), with
the values of the exportable form that inference and export keep (msdet.models.ghostpan.upsample_bilinear2x).
"""
from __future__ import annotations

from pathlib import Path

from mindspore import Tensor, nn

from msdet.kernels.library import KernelLibrary

# -ffp-contract=off: each product and sum rounded apart, as MindSpore's Mul and Add in the exportable form
LIBRARY = KernelLibrary("upsample", Path(__file__).with_suffix(".cc"), "upsampling keeps MindSpore's ops",
                        flags=("-ffp-contract=off",))


class UpsampleKernel(nn.Cell):
    """``nn.Upsample(scale_factor=2, mode="bilinear")`` of float32 NCHW as one ``Custom`` op whose ``bprop`` is
    the C++ adjoint."""

    def __init__(self) -> None:
        super().__init__()
        grad = LIBRARY.op("up2_dx", out_shape=lambda dy: [dy[0], dy[1], dy[2] // 2, dy[3] // 2])

        def bprop(x, out, dout):
            return (grad(dout),)

        self.up = LIBRARY.op("up2_fwd", out_shape=lambda x: [x[0], x[1], 2 * x[2], 2 * x[3]], bprop=bprop)

    def construct(self, x: Tensor) -> Tensor:
        return self.up(x)


#: the parts of msdet.train_ops this kernel provides
REPLACEMENTS = {"upsample_bilinear2x": UpsampleKernel}
