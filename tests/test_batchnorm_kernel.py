"""BatchNorm with the C++ gradient (msdet/kernels/batch_norm.py): MindSpore's forward and moving statistics bit for
bit, and input, scale and shift gradients equal to an independent float64 NumPy reference and to MindSpore's
BatchNormGrad, on both sides of the kernel's two-thread threshold."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from msdet.kernels import batch_norm as batchnorm
from tests.helpers import Weighted, kernels_on

EPS = 1e-3


def _reference(x, dy, gamma):
    """float64 (dx, dgamma, dbeta) of y = gamma * (x - mean) / sqrt(var + eps) + beta over the batch."""
    axes = (0, 2, 3)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    xhat = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + EPS)
    dbeta, dgamma = dy.sum(axis=axes), (dy * xhat).sum(axis=axes)
    g = gamma.reshape(1, -1, 1, 1) / np.sqrt(x.var(axis=axes, keepdims=True) + EPS)
    dx = g * (dy - dbeta.reshape(1, -1, 1, 1) / m - xhat * dgamma.reshape(1, -1, 1, 1) / m)
    return dx, dgamma, dbeta


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (8, 16, 96, 96)])  # one thread / two (over 2^20 values)
def test_batch_norm_kernel_gradients_and_statistics(shape):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(shape[1])
    x = (rng.standard_normal(shape) * 3.0 + 1.5).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, shape[1]).astype(np.float32)
    results = {}
    for kernel in (False, True):
        with kernels_on(batchnorm):
            bn = batchnorm.FastBatchNorm2d(shape[1], EPS, 0.9) if kernel else \
                nn.BatchNorm2d(shape[1], eps=EPS, momentum=0.9)
        bn.gamma.set_data(Tensor(gamma))
        bn.set_train(True)
        weighted = Weighted(bn, dy)
        dx, (dgamma, dbeta) = ms.grad(weighted, 0, weighted.trainable_params())(Tensor(x))
        y = bn(Tensor(x)).asnumpy()  # a second training forward: the moving statistics move twice
        results[kernel] = (y, dx.asnumpy(), dgamma.asnumpy(), dbeta.asnumpy(), bn.moving_mean.asnumpy(),
                           bn.moving_variance.asnumpy())
    ref = _reference(x.astype(np.float64), dy.astype(np.float64), gamma.astype(np.float64))
    for got, want in zip(results[True][1:4], ref):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * np.abs(want).max())
    for got, theirs in zip(results[True][1:4], results[False][1:4]):
        np.testing.assert_allclose(got, theirs, rtol=1e-4, atol=2e-5 * np.abs(theirs).max())
    for got, theirs in zip(results[True][:1] + results[True][4:], results[False][:1] + results[False][4:]):
        np.testing.assert_array_equal(got, theirs)  # the forward and moving statistics are MindSpore's op
