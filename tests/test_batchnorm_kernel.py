"""Training BatchNorm fused with its activation (msdet/kernels/batch_norm.py): output, moving statistics and input,
scale and shift gradients equal to an independent float64 NumPy reference and to MindSpore's BatchNorm followed by
the activation, with no activation, LeakyReLU and swish, on both sides of the kernel's two-thread threshold."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from msdet.kernels import batch_norm as batchnorm
from msdet.models import layers
from tests.helpers import Weighted, kernels_on

EPS = 1e-3
SLOPE = 0.1


def _act(name, p):
    """float64 (activation, its derivative) at p."""
    if name == "leaky_relu":
        return np.where(p > 0, p, SLOPE * p), np.where(p > 0, 1.0, SLOPE)
    if name == "swish":
        s = 1.0 / (1.0 + np.exp(-p))
        return p * s, s * (1.0 + p * (1.0 - s))
    return p, np.ones_like(p)


def _reference(x, dy, gamma, beta, act):
    """float64 (y, dx, dgamma, dbeta, batch mean, unbiased batch variance) of y = act(gamma * xhat + beta)."""
    axes = (0, 2, 3)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + EPS)
    y, dact = _act(act, gamma.reshape(1, -1, 1, 1) * xhat + beta.reshape(1, -1, 1, 1))
    g = dy * dact
    dbeta, dgamma = g.sum(axis=axes), (g * xhat).sum(axis=axes)
    k = gamma.reshape(1, -1, 1, 1) / np.sqrt(var + EPS)
    dx = k * (g - dbeta.reshape(1, -1, 1, 1) / m - xhat * dgamma.reshape(1, -1, 1, 1) / m)
    return y, dx, dgamma, dbeta, mean.ravel(), var.ravel() * m / (m - 1)


class _NormAct(nn.Cell):
    def __init__(self, norm, act):
        super().__init__()
        self.norm, self.act = norm, act

    def construct(self, x):
        y = self.norm(x)
        if self.act is not None:
            y = self.act(y)
        return y


def _activation(name):
    return {"leaky_relu": lambda: layers.LeakyReLU(SLOPE), "swish": layers.Swish, None: lambda: None}[name]()


@pytest.mark.parametrize("act", [None, "leaky_relu", "swish"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (8, 16, 48, 48)])  # one thread / two (over 2^17 values)
def test_fused_batch_norm_matches_reference_and_mindspore(shape, act):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(shape[1])
    x = (rng.standard_normal(shape) * 3.0 + 1.5).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, shape[1]).astype(np.float32)
    beta = rng.uniform(-1.0, 1.0, shape[1]).astype(np.float32)
    moving = rng.uniform(0.5, 2.0, (2, shape[1])).astype(np.float32)
    results = {}
    for kernel in (False, True):
        with kernels_on(batchnorm):
            bn = batchnorm.FastBatchNorm2d(shape[1], EPS, 0.9) if kernel else \
                nn.BatchNorm2d(shape[1], eps=EPS, momentum=0.9)
        activation = _activation(act)
        if kernel and activation is not None:
            layers.norm_act(bn, activation)
            assert activation.fused_into_norm and bn.activation == act
        for param, value in zip((bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance), (gamma, beta, *moving)):
            param.set_data(Tensor(value))
        net = _NormAct(bn, activation)
        net.set_train(True)
        weighted = Weighted(net, dy)
        dx, (dgamma, dbeta) = ms.grad(weighted, 0, weighted.trainable_params())(Tensor(x))
        y = net(Tensor(x)).asnumpy()  # a second training forward: the moving statistics move twice
        results[kernel] = (y, dx.asnumpy(), dgamma.asnumpy(), dbeta.asnumpy(), bn.moving_mean.asnumpy(),
                           bn.moving_variance.asnumpy())
        net.set_train(False)  # eval: the plain BatchNorm with the moving statistics, then the activation
        results[kernel] += (net(Tensor(x)).asnumpy(),)
    y, dx, dgamma, dbeta, mean, var = _reference(*(a.astype(np.float64) for a in (x, dy, gamma, beta)), act)
    mean_after = 0.9 * (0.9 * moving[0] + 0.1 * mean) + 0.1 * mean
    var_after = 0.9 * (0.9 * moving[1] + 0.1 * var) + 0.1 * var
    for got, want in zip(results[True][:6], (y, dx, dgamma, dbeta, mean_after, var_after)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * np.abs(want).max())
    for got, theirs in zip(results[True], results[False]):
        np.testing.assert_allclose(got, theirs, rtol=1e-4, atol=2e-5 * np.abs(theirs).max())


def test_norm_act_fuses_only_what_the_kernel_has():
    """A ReLU (no fused form) or a norm without the kernel stays as it is: both cells run."""
    with kernels_on(batchnorm):
        bn = batchnorm.FastBatchNorm2d(4, EPS, 0.9)
    relu = nn.ReLU()
    layers.norm_act(bn, relu)
    assert bn.activation is None and not hasattr(relu, "fused_into_norm")
    plain, leaky = nn.BatchNorm2d(4), layers.LeakyReLU(SLOPE)
    layers.norm_act(plain, leaky)
    assert leaky.fused_into_norm is False
    pairs = layers.norm_act_pairs([nn.Conv2d(4, 4, 1), bn, layers.Swish(), nn.Conv2d(4, 4, 1)])
    assert bn.activation == "swish" and pairs[2].fused_into_norm


def test_precise_batch_norm_momentum_reaches_the_fused_op():
    """``set_train_primitive`` (precise-BN recalibration) changes the momentum the fused op updates with."""
    from mindspore import ops

    ms.set_context(mode=ms.GRAPH_MODE)
    with kernels_on(batchnorm):
        bn = batchnorm.FastBatchNorm2d(3, EPS, 0.9)
    x = np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float32) + 2.0
    bn.set_train_primitive(ops.BatchNorm(is_training=True, epsilon=EPS, momentum=1.0))
    bn.set_train(True)
    bn(Tensor(x))
    np.testing.assert_allclose(bn.moving_mean.asnumpy(), x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.asnumpy(), x.var(axis=(0, 2, 3), ddof=1), rtol=1e-5)


@pytest.mark.detector
@pytest.mark.parametrize("model", ["d0", "nanodet"])
def test_whole_network_with_fused_norms_computes_the_same_loss(model):
    """Every BatchNorm + activation pair a network marks, fused, gives the loss of MindSpore's ops: an activation
    marked after a cell that is not its BatchNorm (skipped in training) or applied twice would move it by far more
    than the 1e-5 allowed."""
    from msdet.kernels import activations, dense_conv, depthwise_conv, group_norm, max_pool
    from tests.test_dwconv_grad import _network_gradients

    with kernels_on(depthwise_conv, group_norm, activations, batchnorm, max_pool, dense_conv):
        replaced, loss, _ = _network_gradients(model, kernel=True, graph=True)
    _, loss_ms, _ = _network_gradients(model, kernel=False, graph=True)
    assert replaced >= 40
    assert loss == pytest.approx(loss_ms, rel=1e-5)
