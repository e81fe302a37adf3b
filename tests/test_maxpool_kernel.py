"""The C++ 3x3 / stride-2 / padding-1 max-pool (msdet/kernels/max_pool.py): PyTorch's values (-inf padding) and its
gradient routing (each output gradient to the window's first maximum, ties included) against an independent
NumPy reference, and the network's exportable form in inference."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from msdet.kernels import max_pool as maxpool
from msdet.models.shufflenetv2 import MaxPool3x3s2p1
from tests.helpers import Weighted, kernels_on

SHAPES = [(2, 3, 8, 6), (1, 2, 7, 5), (1, 1, 1, 1), (2, 4, 2, 9), (1, 2, 9, 37), (1, 3, 6, 40)]  # wide: vector loop


def _reference(x, dy):
    """(pool, input gradient), window by window in float64: PyTorch's first maximum in row-major order."""
    n, c, h, w = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    y, dx = np.zeros((n, c, ho, wo)), np.zeros(x.shape)
    for i in range(ho):
        for j in range(wo):
            rows, cols = range(max(2 * i - 1, 0), min(2 * i + 2, h)), range(max(2 * j - 1, 0), min(2 * j + 2, w))
            window = x[:, :, rows.start:rows.stop, cols.start:cols.stop].reshape(n, c, -1)
            first = window.argmax(axis=2)  # numpy's argmax is the first maximum
            y[:, :, i, j] = window.max(axis=2)
            r, q = np.divmod(first, len(cols))
            for a in range(n):
                for b in range(c):
                    dx[a, b, rows.start + r[a, b], cols.start + q[a, b]] += dy[a, b, i, j]
    return y, dx


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_maxpool_kernel_is_pytorchs_pool_and_gradient(shape, ties):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(-2, 2, size=shape) if ties else rng.standard_normal(shape) - 3.0
    x = x.astype(np.float32)
    dy = rng.standard_normal((shape[0], shape[1], (shape[2] + 1) // 2, (shape[3] + 1) // 2)).astype(np.float32)
    with kernels_on(maxpool):
        cell = MaxPool3x3s2p1()
    assert cell.fast is not None
    cell.set_train(True)
    y_ref, dx_ref = _reference(x.astype(np.float64), dy.astype(np.float64))
    np.testing.assert_array_equal(cell(Tensor(x)).asnumpy(), y_ref.astype(np.float32))
    dx = ms.grad(Weighted(cell, dy))(Tensor(x)).asnumpy()
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)
    cell.set_train(False)  # inference and export: the edge-padded valid pool, the same values
    np.testing.assert_array_equal(cell(Tensor(x)).asnumpy(), y_ref.astype(np.float32))
