"""The C++ x2 bilinear upsampling (msdet/kernels/upsample.py): PyTorch's half-pixel values against an independent
NumPy reference (the sampling coordinates, not the fixed weights), the same bits as the exportable form that
inference keeps, and a gradient that is the reference's adjoint and MindSpore's ResizeBilinearV2 gradient."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from msdet.kernels import upsample
from msdet.models.ghostpan import Upsample2x, upsample_bilinear2x
from tests.helpers import Weighted, kernels_on

SHAPES = [(2, 3, 5, 4), (1, 2, 1, 1), (1, 1, 1, 6), (2, 4, 3, 2), (1, 3, 20, 20)]


def _matrix(n):
    """[2n, n]: PyTorch's align_corners=False sampling, src = (dst + 0.5) / 2 - 0.5 clamped at 0, linear between
    floor(src) and the next input (the last input repeated)."""
    m = np.zeros((2 * n, n))
    for o in range(2 * n):
        src = max((o + 0.5) / 2 - 0.5, 0.0)
        i0 = int(np.floor(src))
        i1, frac = min(i0 + 1, n - 1), src - i0
        m[o, i0] += 1.0 - frac
        m[o, i1] += frac
    return m


def _reference(x, dy):
    """(upsampled, input gradient) in float64: y = Mh x Mw^T per plane, dx = Mh^T dy Mw."""
    mh, mw = _matrix(x.shape[2]), _matrix(x.shape[3])
    return np.einsum("ai,ncij,bj->ncab", mh, x, mw), np.einsum("ai,ncab,bj->ncij", mh, dy, mw)


@pytest.mark.parametrize("shape", SHAPES)
def test_upsample_kernel_is_pytorchs_and_its_adjoint(shape):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal((shape[0], shape[1], 2 * shape[2], 2 * shape[3])).astype(np.float32)
    with kernels_on(upsample):
        cell = Upsample2x()
    assert cell.fast is not None
    cell.set_train(True)
    y_ref, dx_ref = _reference(x.astype(np.float64), dy.astype(np.float64))
    y = cell(Tensor(x)).asnumpy()
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y, upsample_bilinear2x(Tensor(x)).asnumpy())  # inference's bits
    dx = ms.grad(Weighted(cell, dy))(Tensor(x)).asnumpy()
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
    resize = ops.ResizeBilinearV2(align_corners=False, half_pixel_centers=True)

    class Resize(nn.Cell):
        def construct(self, t):
            return resize(t, (t.shape[2] * 2, t.shape[3] * 2))

    np.testing.assert_allclose(ms.grad(Weighted(Resize(), dy))(Tensor(x)).asnumpy(), dx, rtol=1e-5, atol=1e-5)
