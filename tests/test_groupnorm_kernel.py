"""The C++ GroupNorm (msdet/kernels/group_norm.py): output and gradients equal an independent NumPy reference (and its
finite differences) and MindSpore's GroupNorm, eval mode is MindSpore's op, and the switch and fallbacks work."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from msdet.kernels import build
from msdet.kernels import group_norm as groupnorm
from msdet.kernels.library import KernelLibrary
from msdet.models import layers
from tests.helpers import Weighted, kernels_off, kernels_on

# (batch, channels, height, width, groups)
CASES = [(2, 8, 5, 7, 4), (1, 6, 3, 3, 1), (2, 6, 4, 5, 6), (3, 192, 4, 4, 32), (2, 12, 1, 1, 3)]


@pytest.fixture
def fast():
    with kernels_on(groupnorm):
        yield


def _reference(x, gamma, beta, groups, eps=1e-5):
    """float64 GroupNorm, torch.nn.GroupNorm's definition (biased variance)."""
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    xhat = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)).reshape(x.shape)
    return xhat * gamma.reshape(1, c, 1, 1) + beta.reshape(1, c, 1, 1)


def _finite_differences(x, gamma, beta, dy, groups, h=1e-6):
    """d sum(dy * y) / d(x, gamma, beta) by central differences of the float64 reference."""
    grads = []
    for which in range(3):
        args = [x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64)]
        grad = np.zeros_like(args[which])
        for i in np.ndindex(args[which].shape):
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[which][i] += h
            minus[which][i] -= h
            grad[i] = ((_reference(*plus, groups) - _reference(*minus, groups)) * dy).sum() / (2 * h)
        grads.append(grad)
    return grads


def _run(cell, x, dy):
    """(output, dx, dgamma, dbeta) of ``cell`` compiled in graph mode, gradient of sum(dy * y)."""
    ms.set_context(mode=ms.GRAPH_MODE)
    cell.set_train(True)
    y = cell(Tensor(x))
    dx, (dgamma, dbeta) = ms.jit(ms.grad(Weighted(cell, dy), 0, [cell.gamma, cell.beta]))(Tensor(x))
    return [a.asnumpy() for a in (y, dx, dgamma, dbeta)]


def _inputs(shape, seed=0):
    n, c, h, w, _ = shape
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, c, h, w)) * 3 + 1).astype(np.float32)
    dy = rng.normal(size=(n, c, h, w)).astype(np.float32)
    gamma = rng.normal(size=c).astype(np.float32)
    beta = rng.normal(size=c).astype(np.float32)
    return x, dy, gamma, beta


def _cell(cls, groups, channels, gamma, beta):
    cell = cls(groups, channels)
    cell.gamma.set_data(Tensor(gamma))
    cell.beta.set_data(Tensor(beta))
    return cell


@pytest.mark.parametrize("shape", CASES)
def test_output_and_gradients_equal_the_reference_and_mindspore(fast, shape):
    x, dy, gamma, beta = _inputs(shape)
    groups, channels = shape[4], shape[1]
    got = _run(_cell(layers.group_norm, groups, channels, gamma, beta), x, dy)
    ms_ = _run(_cell(nn.GroupNorm, groups, channels, gamma, beta), x, dy)
    y_ref = _reference(x.astype(np.float64), gamma, beta, groups)
    n, c = x.shape[:2]
    xhat = _reference(x.astype(np.float64), np.ones(c), np.zeros(c), groups)
    dgamma_ref, dbeta_ref = (dy * xhat).sum((0, 2, 3)), dy.sum((0, 2, 3), dtype=np.float64)
    np.testing.assert_allclose(got[0], y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[2], dgamma_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[3], dbeta_ref, rtol=1e-5, atol=1e-4)
    for mine, theirs, name in zip(got, ms_, ("y", "dx", "dgamma", "dbeta")):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4, err_msg=name)


def test_threaded_result_is_the_single_threaded_one(fast):
    """8 x 64 x 24 x 24 (295K values) runs on both cores (parallel.h, over 128K), one sample (37K) on one: every
    sample's output and input gradient are the same bits either way, and the affine gradients, summed over the
    samples in the same order, too."""
    x, dy, gamma, beta = _inputs((8, 64, 24, 24, 32), seed=5)
    whole = _run(_cell(layers.group_norm, 32, 64, gamma, beta), x, dy)
    parts = [_run(_cell(layers.group_norm, 32, 64, gamma, beta), x[i:i + 1], dy[i:i + 1]) for i in range(8)]
    np.testing.assert_array_equal(whole[0], np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(whole[1], np.concatenate([p[1] for p in parts]))
    y_ref = _reference(x.astype(np.float64), gamma, beta, 32)
    np.testing.assert_allclose(whole[0], y_ref, rtol=1e-5, atol=1e-5)


def test_input_gradient_equals_finite_differences(fast):
    shape = (2, 4, 3, 3, 2)
    x, dy, gamma, beta = _inputs(shape, seed=1)
    got = _run(_cell(layers.group_norm, 2, 4, gamma, beta), x, dy)
    fd = _finite_differences(x, gamma, beta, dy, 2)
    for mine, ref, name in zip(got[1:], fd, ("dx", "dgamma", "dbeta")):
        np.testing.assert_allclose(mine, ref, rtol=1e-3, atol=1e-4, err_msg=name)


def test_eval_mode_is_mindspores_group_norm(fast):
    x, _, gamma, beta = _inputs((2, 8, 5, 7, 4))
    cell = _cell(layers.group_norm, 4, 8, gamma, beta)
    assert isinstance(cell, groupnorm.FastGroupNorm)
    plain = _cell(nn.GroupNorm, 4, 8, gamma, beta)
    cell.set_train(False)
    plain.set_train(False)
    assert np.array_equal(cell(Tensor(x)).asnumpy(), plain(Tensor(x)).asnumpy())
    assert [p.name for p in cell.get_parameters()] == [p.name for p in plain.get_parameters()]


def test_without_gxx_mindspores_group_norm_is_used(monkeypatch, capsys):
    lib = groupnorm.LIBRARY
    monkeypatch.setattr(groupnorm, "LIBRARY", KernelLibrary(lib.name, lib.source, lib.fallback, lib.flags))
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert groupnorm.LIBRARY.enable(True) is False
    assert capsys.readouterr().out == "cpu kernel group_norm off: g++ not found; GroupNorm keeps MindSpore's (slow) " \
                                      "CPU kernel\n"
    with kernels_off():
        assert type(layers.group_norm(4, 8)) is nn.GroupNorm


@pytest.mark.parametrize("act", ["leaky_relu", "swish"])
@pytest.mark.parametrize("shape", [(2, 8, 5, 7, 4), (8, 64, 24, 24, 32)])  # one thread / two
def test_fused_activation_equals_the_reference_and_mindspore(fast, shape, act):
    """GroupNorm + the activation marked after it (norm_act) as one op each way: the float64 reference of
    act(GroupNorm(x)) and its gradients, and MindSpore's GroupNorm followed by the activation cell."""
    from tests.test_batchnorm_kernel import _act, _activation, _NormAct

    x, dy, gamma, beta = _inputs(shape, seed=3)
    groups, channels = shape[4], shape[1]
    results = []
    for cls, fuse in ((layers.group_norm, True), (nn.GroupNorm, False)):
        norm, activation = _cell(cls, groups, channels, gamma, beta), _activation(act)
        if fuse:
            layers.norm_act(norm, activation)
            assert activation.fused_into_norm and norm.activation == act
        net = _NormAct(norm, activation)
        net.set_train(True)
        dx, (dgamma, dbeta) = ms.jit(ms.grad(Weighted(net, dy), 0, [norm.gamma, norm.beta]))(Tensor(x))
        results.append([net(Tensor(x)).asnumpy(), dx.asnumpy(), dgamma.asnumpy(), dbeta.asnumpy()])
    xhat = _reference(x.astype(np.float64), np.ones(channels), np.zeros(channels), groups)
    y, dact = _act(act, xhat * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1))
    g = dy * dact
    np.testing.assert_allclose(results[0][0], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[0][2], (g * xhat).sum((0, 2, 3)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(results[0][3], g.sum((0, 2, 3)), rtol=1e-4, atol=1e-4)
    for mine, theirs, name in zip(*results, ("y", "dx", "dgamma", "dbeta")):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4, err_msg=name)
