"""The C++ swish, LeakyReLU and squeeze-and-excitation kernels (msdet/kernels/activations.py): outputs and gradients
equal an independent float64 NumPy reference (and its finite differences; LeakyReLU's bit for bit) and MindSpore's
ops, eval mode is MindSpore's ops, and without g++ the standard ops are used."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from msdet.kernels import activations as kernel_module
from msdet.kernels import build
from msdet.kernels.library import KernelLibrary
from msdet.models import layers as activations
from tests.helpers import Weighted, kernels_off, kernels_on

# the exponential's clamp and the sign select are where a vectorised sigmoid goes wrong
EXTREMES = [-120.0, -88.0, -87.3, -30.0, -1e-8, -0.0, 0.0, 1e-8, 15.0, 87.3, 88.5, 120.0]
SE_SHAPES = [(2, 5, 7, 3), (1, 3, 1, 1), (3, 16, 4, 4), (2, 7, 9, 17)]


@pytest.fixture
def fast():
    with kernels_on(kernel_module):
        yield


def _sigmoid(x):
    """float64, without overflow or cancellation: e^-|x| / (1 + e^-|x|) for x < 0."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _swish_ref(x):
    return x * _sigmoid(x)


def _swish_grad_ref(x, dy):
    s = _sigmoid(x)
    return dy * s * (1.0 + x * (1.0 - s))


def _se_ref(x, s):
    return x * _sigmoid(s)


def _run(cell, inputs, dy, training=True):
    """(output, gradients of every input) of ``cell`` compiled in graph mode."""
    ms.set_context(mode=ms.GRAPH_MODE)
    cell.set_train(training)
    tensors = [Tensor(a) for a in inputs]
    out = cell(*tensors).asnumpy()
    grads = ms.jit(ms.grad(Weighted(cell, dy), tuple(range(len(inputs)))))(*tensors)
    grads = grads if isinstance(grads, tuple) else (grads,)   # one input: a tensor, not a tuple
    return out, [g.asnumpy() for g in grads]


def _swish_input(seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.array(EXTREMES), rng.normal(size=500) * 4]).astype(np.float32).reshape(2, 4, 8, 8)
    return x, rng.normal(size=x.shape).astype(np.float32)


def test_swish_output_and_gradient_equal_the_reference_and_mindspore(fast):
    x, dy = _swish_input()
    out, (dx,) = _run(activations.Swish(), [x], dy)
    assert activations.Swish().fast is not None
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(out, _swish_ref(x64), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(dx, _swish_grad_ref(x64, dy), rtol=1e-5, atol=1e-7)
    assert abs(out[0, 0, 0, 0]) < 1e-30 and out[0, 0, 1, 3] == 120.0   # swish(-120), swish(120)
    out_ms, (dx_ms,) = _run(activations.Swish(), [x], dy, training=False)
    np.testing.assert_allclose(out, out_ms, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dx, dx_ms, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make", [activations.Swish, lambda: activations.LeakyReLU(0.1)])
def test_threaded_result_is_the_single_threaded_one(fast, make):
    """8 x 64 x 48 x 48 (1.2M values) runs on both cores (parallel.h), one sample (147K) on one: the same bits."""
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(8, 64, 48, 48)) * 4).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    out, (dx,) = _run(make(), [x], dy)
    parts = [_run(make(), [x[i:i + 1]], dy[i:i + 1]) for i in range(8)]
    np.testing.assert_array_equal(out, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(dx, np.concatenate([p[1][0] for p in parts]))
    if not isinstance(make(), activations.Swish):  # LeakyReLU: PyTorch's definition to the bit
        np.testing.assert_array_equal(out, np.where(x > 0, x, np.float32(0.1) * x))


def test_swish_gradient_equals_finite_differences(fast):
    x, dy = _swish_input(seed=1)
    x = x[:, :, 2:, :]          # no extremes: their finite differences are 0 / 1 to rounding
    dy = dy[:, :, 2:, :]
    _, (dx,) = _run(activations.Swish(), [x], dy)
    h = 1e-6
    x64 = x.astype(np.float64)
    fd = (_swish_ref(x64 + h) - _swish_ref(x64 - h)) / (2 * h) * dy
    np.testing.assert_allclose(dx, fd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel", [True, False])
def test_leaky_relu_training_graph_is_bit_exact(monkeypatch, kernel):
    """Kernel or ``relu(x) - 0.1 relu(-x)``: PyTorch's leaky_relu and its gradient to the bit, as in eval mode."""
    context = kernels_on(kernel_module) if kernel else kernels_off()
    with context:
        _leaky_relu_training_graph_is_bit_exact(kernel)


def _leaky_relu_training_graph_is_bit_exact(kernel):
    rng = np.random.default_rng(3)
    x = np.concatenate([np.array(EXTREMES), rng.standard_normal(500)]).astype(np.float32).reshape(2, 4, 8, 8)
    x[x == 0] = 1.0     # at exactly 0 the gradient is 0.1 dy in PyTorch and the kernel, 0 in the relu form
    dy = rng.standard_normal(x.shape).astype(np.float32)
    slope = np.float32(0.1)
    act = activations.LeakyReLU(alpha=0.1)
    assert (act.fast is not None) is kernel
    for training in (True, False):
        out, (dx,) = _run(act, [x], dy, training=training)
        np.testing.assert_array_equal(out, np.where(x > 0, x, slope * x))
        np.testing.assert_array_equal(dx, np.where(x > 0, dy, slope * dy))


class _SE(nn.Cell):
    """The SE block's pieces as MBConv uses them: mean, then a function of it, then the gate."""

    def __init__(self):
        super().__init__()
        self.squeeze, self.excite = activations.PlaneMean(), activations.SigmoidGate()

    def construct(self, x, w):
        m = self.squeeze(x)
        return self.excite(x, m * w + 0.5)


def _se_full_ref(x, w):
    hw = x.shape[2] * x.shape[3]
    m = x.mean((2, 3), keepdims=True)
    return _se_ref(x, m * w + 0.5), hw


@pytest.mark.parametrize("shape", SE_SHAPES)
def test_se_mean_and_gate_equal_the_reference_and_mindspore(fast, shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.normal(size=shape) * 3).astype(np.float32)
    w = (rng.normal(size=(1, shape[1], 1, 1)) * 2).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    cell = _SE()
    assert cell.squeeze.fast is not None and cell.excite.fast is not None
    out, (dx, dw) = _run(cell, [x, w], dy)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref, hw = _se_full_ref(x64, w64)
    # d/dx: through the gate (dy * g) and through the mean (sum_hw(dy * x) * g (1 - g) * w / hw)
    s = x64.mean((2, 3), keepdims=True) * w64 + 0.5
    g = _sigmoid(s)
    ds = (dy * x64).sum((2, 3), keepdims=True) * g * (1 - g)
    dx_ref = dy * g + ds * w64 / hw
    dw_ref = (ds * x64.mean((2, 3), keepdims=True)).sum(0, keepdims=True)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-5)
    out_ms, (dx_ms, dw_ms) = _run(_SE(), [x, w], dy, training=False)
    for mine, theirs, name in ((out, out_ms, "y"), (dx, dx_ms, "dx"), (dw, dw_ms, "dw")):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5, err_msg=name)


class _Plain(nn.Cell):
    def construct(self, x):
        return x * ops.sigmoid(x)


def test_eval_mode_is_mindspores_ops(fast):
    x, _ = _swish_input()
    cell = activations.Swish()
    cell.set_train(False)
    ms.set_context(mode=ms.GRAPH_MODE)
    assert np.array_equal(cell(Tensor(x)).asnumpy(), _Plain()(Tensor(x)).asnumpy())


def test_without_gxx_the_standard_ops_are_used(monkeypatch, capsys):
    lib = kernel_module.LIBRARY
    monkeypatch.setattr(kernel_module, "LIBRARY", KernelLibrary(lib.name, lib.source, lib.fallback, lib.flags))
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert kernel_module.LIBRARY.enable(True) is False
    assert capsys.readouterr().out == "cpu kernel activations off: g++ not found; activations keep MindSpore's ops\n"
    with kernels_off():
        cells = (activations.Swish(), activations.LeakyReLU(0.1), activations.PlaneMean(), activations.SigmoidGate())
    assert all(cell.fast is None for cell in cells)
