"""The C++ AdamW and EMA updates (msdet/kernels/adamw_ema.py): in place on every tensor of a graph's Parameters, equal
to MindSpore's per-tensor kernels (moments and shadows bit for bit, weights within one float32 rounding) and to an
independent float64 NumPy AdamW, over several steps, 0-d tensors and SIMD tails included."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from msdet.kernels import adamw_ema as update
from tests.helpers import kernels_on

SHAPES = [(), (1,), (7,), (3, 5), (16, 3, 3, 3), (1000,), (37, 1)]
BETA1, BETA2 = 0.9, 0.999


@pytest.fixture
def fast():
    with kernels_on(update):
        yield


def _tensors(seed, shapes=SHAPES, positive=False):
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(rng.normal(size=s), np.float32) for s in shapes]
    return [np.asarray(np.abs(a)) for a in arrays] if positive else arrays


def _parameters(prefix, arrays):
    return ParameterTuple(Parameter(Tensor(a), name=f"{prefix}{i}") for i, a in enumerate(arrays))


class _KernelAdamW(nn.Cell):
    def __init__(self, p, m, v):
        super().__init__()
        self.p = _parameters("p", p)
        self.m = _parameters("m", m)
        self.v = _parameters("v", v)
        self.op = update.AdamWUpdate()

    def construct(self, hyper, decays, grads):
        return self.op(hyper, decays, self.p, self.m, self.v, grads)


class _MindSporeAdamW(nn.Cell):
    """MindSpore's own fused AdamWeightDecay on each tensor (it rejects 0-d ones)."""

    def __init__(self, p, m, v):
        super().__init__()
        self.p = _parameters("p", p)
        self.m = _parameters("m", m)
        self.v = _parameters("v", v)
        self.adam = ops.AdamWeightDecay()

    def construct(self, lr, beta1, beta2, eps, decays, grads):
        for i in range(len(self.p)):
            self.adam(self.p[i], self.m[i], self.v[i], lr, beta1, beta2, eps, decays[i], grads[i])
        return lr


def _values(tuple_):
    return [p.asnumpy() for p in tuple_]


def test_adamw_update_is_mindsporess_kernel_and_the_float64_formula(fast):
    ms.set_context(mode=ms.GRAPH_MODE)
    p, m, v = _tensors(0), _tensors(1), _tensors(2, positive=True)
    decays = np.linspace(0.0, 0.1, len(SHAPES)).astype(np.float32)
    kernel = _KernelAdamW(p, m, v)
    nd = [i for i, s in enumerate(SHAPES) if len(s) > 0]
    reference = _MindSporeAdamW([p[i] for i in nd], [m[i] for i in nd], [v[i] for i in nd])
    ref64 = [[np.array(a, np.float64) for a in arrays] for arrays in (p, m, v)]
    # grad_scale (the clipping factor) multiplies the gradients inside the op, as a float32 Mul before it would
    for step, (lr, eps, factor, scale) in enumerate([(0.01, 1e-8, 0.8, 0.37), (0.003, 1e-3, 1.0, 1.0),
                                                     (0.02, 1e-8, 0.5, 0.9)]):
        raw = _tensors(10 + step)
        flag = kernel(Tensor(np.array([lr, BETA1, BETA2, eps, factor, scale], np.float32)), Tensor(decays),
                      tuple(Tensor(g) for g in raw))
        grads = [g * np.float32(scale) for g in raw]
        assert float(flag) == 0.0  # the ordering flag
        f32 = [Tensor(np.float32(x)) for x in (lr, BETA1, BETA2, eps)]
        reference(*f32, tuple(Tensor(np.float32(decays[i] * np.float32(factor))) for i in nd),
                  tuple(Tensor(grads[i]) for i in nd))
        for i, g in enumerate(grads):
            rp, rm, rv = (r[i] for r in ref64)
            rm[...] = rm + (g - rm) * (1 - BETA1)
            rv[...] = rv + (g.astype(np.float64) ** 2 - rv) * (1 - BETA2)
            rp[...] = rp - lr * (rm / (np.sqrt(rv) + eps) + decays[i] * factor * rp)
    got_p, got_m, got_v = _values(kernel.p), _values(kernel.m), _values(kernel.v)
    for j, i in enumerate(nd):
        np.testing.assert_array_equal(got_m[i], reference.m[j].asnumpy())
        np.testing.assert_array_equal(got_v[i], reference.v[j].asnumpy())
        # a rounding a step (of weights ~1: the last step can cancel to ~1e-4, so absolute)
        np.testing.assert_allclose(got_p[i], reference.p[j].asnumpy(), rtol=0, atol=3e-7)
    for got, want in zip((got_p, got_m, got_v), ref64):
        for a, b, shape in zip(got, want, SHAPES):
            assert a.shape == shape
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    assert not np.array_equal(got_p[0], p[0])  # the 0-d weight moved too


class _KernelEMA(nn.Cell):
    def __init__(self, shadows):
        super().__init__()
        self.shadows = _parameters("s", shadows)
        self.op = update.EMAUpdate()

    def construct(self, rate, sources):
        return self.op(rate, self.shadows, sources)


class _MindSporeEMA(nn.Cell):
    def __init__(self, shadows):
        super().__init__()
        self.shadows = _parameters("s", shadows)
        self.step = ops.ApplyGradientDescent()

    def construct(self, rate, sources):
        for i in range(len(self.shadows)):
            self.step(self.shadows[i], rate, self.shadows[i] - sources[i])
        return rate


def test_ema_update_is_apply_gradient_descent_bit_for_bit(fast):
    ms.set_context(mode=ms.GRAPH_MODE)
    shadows = _tensors(3)
    nd = [i for i, s in enumerate(SHAPES) if len(s) > 0]
    kernel, reference = _KernelEMA(shadows), _MindSporeEMA([shadows[i] for i in nd])
    expect0 = shadows[0].copy()
    for step, rate in enumerate((0.9, 0.37, 0.001)):
        sources = _tensors(20 + step)
        kernel(Tensor(np.float32(rate)), tuple(Tensor(x) for x in sources))
        reference(Tensor(np.float32(rate)), tuple(Tensor(sources[i]) for i in nd))
        expect0 = expect0 - np.float32(rate) * (expect0 - sources[0])
    got = _values(kernel.shadows)
    for j, i in enumerate(nd):
        np.testing.assert_array_equal(got[i], reference.shadows[j].asnumpy())
    np.testing.assert_array_equal(got[0], expect0)


def test_update_kernel_rejects_other_dtypes(fast):
    ms.set_context(mode=ms.GRAPH_MODE)
    kernel = _KernelEMA([np.zeros(3, np.float16)])
    with pytest.raises(RuntimeError):
        kernel(Tensor(np.float32(0.5)), (Tensor(np.ones(3, np.float16)),))
