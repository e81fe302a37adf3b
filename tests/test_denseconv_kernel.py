"""Dense k x k convs on oneDNN 3 (msdet/kernels/dense_conv.py): output and both gradients equal an independent float64
NumPy reference and MindSpore's conv, also when the batch is split over threads; the factory picks the kernel only
where it fits; eval mode exports the plain conv."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from msdet import train_ops
from msdet.kernels import dense_conv as denseconv
from msdet.kernels import depthwise_conv as dwconv
from msdet.kernels.library import KernelLibrary
from msdet.models import layers as conv
from tests.helpers import conv_output_and_grads, conv_pads, kernels_off, kernels_on

# (batch, in, out, height, width, kernel, stride, TF "same" padding or (k - 1) / 2, bias)
CASES = [
    (2, 3, 5, 7, 10, 3, 1, False, False),
    (2, 4, 6, 8, 6, 3, 2, True, True),     # even sizes: "same" pads 0 before, 1 after
    (1, 5, 3, 9, 7, 3, 2, True, False),    # odd sizes: 1 before, 1 after
    (2, 3, 24, 16, 16, 3, 2, False, False),  # a stem: stride 2, padding 1
    (2, 6, 4, 8, 7, 5, 2, True, True),     # 8: "same" pads 1 before, 2 after; 7: 2 and 2
    (1, 2, 3, 6, 10, 5, 1, False, True),
    (4, 64, 48, 24, 24, 3, 1, False, True),  # 127M multiply-adds: the batch is split in two pieces
]


@pytest.fixture
def fast():
    with kernels_on(denseconv):
        yield


def _reference(x, w, b, dy, stride, same):
    """NumPy float64 forward and both gradients of ``sum(conv(x, w) * dy)``, tap by tap on the padded input."""
    k = w.shape[-1]
    (pt, pb), (pl, pr) = conv_pads(x.shape[2], k, stride, same), conv_pads(x.shape[3], k, stride, same)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    w64, dy64 = w.astype(np.float64), dy.astype(np.float64)
    ho, wo = dy.shape[2:]
    y = np.zeros(dy.shape) + (0.0 if b is None else b[None, :, None, None])
    dxp = np.zeros(xp.shape)
    dw = np.zeros(w.shape)
    for kh in range(k):
        for kw in range(k):
            window = (slice(None), slice(None), slice(kh, kh + stride * ho, stride),
                      slice(kw, kw + stride * wo, stride))
            y += np.einsum("oc,nchw->nohw", w64[:, :, kh, kw], xp[window])
            dxp[window] += np.einsum("oc,nohw->nchw", w64[:, :, kh, kw], dy64)
            dw[:, :, kh, kw] = np.einsum("nohw,nchw->oc", dy64, xp[window])
    return y, dxp[:, :, pt:pt + x.shape[2], pl:pl + x.shape[3]], dw


@pytest.mark.parametrize("batch,cin,cout,height,width,kernel,stride,same,bias", CASES)
def test_output_and_gradients_equal_numpy_and_mindspore(fast, batch, cin, cout, height, width, kernel, stride, same,
                                                        bias):
    rng = np.random.default_rng(cin * 10 + stride)
    pad_mode, padding = ("same", 0) if same else ("pad", (kernel - 1) // 2)
    custom = conv.conv2d(cin, cout, kernel, stride=stride, pad_mode=pad_mode, padding=padding, has_bias=bias)
    plain = nn.Conv2d(cin, cout, kernel, stride=stride, pad_mode=pad_mode, padding=padding, has_bias=bias)
    assert isinstance(custom, denseconv.FastDenseConv2d)
    x = rng.normal(size=(batch, cin, height, width)).astype(np.float32)
    w = rng.normal(size=(cout, cin, kernel, kernel)).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32) if bias else None
    for cell in (custom, plain):
        cell.weight.set_data(Tensor(w))
        if bias:
            cell.bias.set_data(Tensor(b))
    out_shape = (batch, cout, -(-height // stride), -(-width // stride))
    dy = rng.normal(size=out_shape).astype(np.float32)

    y, gx, gw = conv_output_and_grads(custom, x, dy)
    y_ms, gx_ms, gw_ms = conv_output_and_grads(plain, x, dy)
    y_np, gx_np, gw_np = _reference(x, w, b, dy, stride, same)
    assert y.shape == y_np.shape == out_shape
    scale = np.sqrt(cin * kernel * kernel)   # the sums' size: float32 rounding grows with it
    for got, ms_got, ref, name in ((y, y_ms, y_np, "y"), (gx, gx_ms, gx_np, "dx"), (gw, gw_ms, gw_np, "dw")):
        tol = 2e-6 * scale * np.abs(ref).max()
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol, err_msg=name)
        np.testing.assert_allclose(got, ms_got, rtol=0, atol=tol, err_msg=name)


def test_the_factory_uses_the_kernel_only_where_it_fits(fast):
    """Dense odd k > 1, stride 1/2, "same" or (k - 1) / 2 padding; 1x1 convs (MindSpore's GEMM is as fast) and the
    rest keep nn.Conv2d; depthwise convs go to their own kernel when it is on."""
    assert type(conv.conv2d(4, 8, 3, pad_mode="pad", padding=1)) is denseconv.FastDenseConv2d
    assert type(conv.conv2d(4, 8, 5, stride=2)) is denseconv.FastDenseConv2d
    assert type(conv.conv2d(4, 8, 3, has_bias=True)) is denseconv.FastDenseConv2d
    assert type(conv.conv2d(4, 8, 1)) is nn.Conv2d
    assert type(conv.conv2d(4, 8, 4)) is nn.Conv2d
    assert type(conv.conv2d(4, 8, 3, stride=3)) is nn.Conv2d
    assert type(conv.conv2d(4, 8, 3, pad_mode="pad", padding=2)) is nn.Conv2d
    assert type(conv.conv2d(4, 8, 3, pad_mode="valid")) is nn.Conv2d
    assert type(conv.conv2d(4, 8, 3, group=2)) is nn.Conv2d
    assert type(conv.conv2d(4, 4, 3, group=4)) is nn.Conv2d  # the depthwise kernel is not installed
    with kernels_on(dwconv):
        assert type(conv.conv2d(4, 4, 3, group=4)) is dwconv.FastDepthwiseConv2d
        assert type(conv.conv2d(4, 8, 3)) is denseconv.FastDenseConv2d
    train_ops.remove("dense_conv")
    assert type(conv.conv2d(4, 8, 3)) is nn.Conv2d


def test_eval_mode_is_the_plain_conv_and_exports(fast, tmp_path):
    """Inference and export graphs hold MindSpore's Conv2D only: ONNX (which has no Custom op) exports and
    onnxruntime gives the reference output."""
    import onnxruntime as ort

    cell = conv.conv2d(3, 4, 3, stride=2, pad_mode="same", has_bias=True)
    assert isinstance(cell, denseconv.FastDenseConv2d)
    cell.set_train(False)
    x = np.random.default_rng(0).normal(size=(1, 3, 8, 8)).astype(np.float32)
    ms.export(cell, Tensor(x), file_name=str(tmp_path / "conv"), file_format="ONNX")
    session = ort.InferenceSession(str(tmp_path / "conv.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    y_np, _, _ = _reference(x, cell.weight.asnumpy(), cell.bias.asnumpy(), np.zeros((1, 4, 4, 4)), 2, True)
    np.testing.assert_allclose(got, y_np, rtol=1e-5, atol=1e-5)


def test_without_onednn_headers_the_standard_conv_is_used(monkeypatch, tmp_path, capsys):
    """A machine without pip's onednn-devel-cpu-gomp: nothing is compiled, one printed line names the missing header
    and the fallback; a build that fails otherwise (a header that does not compile) falls back the same way."""
    lib = denseconv.LIBRARY
    missing = tmp_path / "include" / "oneapi" / "dnnl" / "dnnl.hpp"
    monkeypatch.setattr(denseconv, "LIBRARY", KernelLibrary(lib.name, lib.source, lib.fallback, lib.flags, (missing,)))
    assert denseconv.LIBRARY.enable(True) is False
    assert capsys.readouterr().out == (f"cpu kernel dense_conv off: {missing} not found; dense convs keep MindSpore's "
                                       f"CPU kernels\n")
    monkeypatch.setenv("MSDET_CACHE", str(tmp_path))
    for header in ("aot.h", "parallel.h", "isa.h"):
        if lib.source.with_name(header).is_file():
            (tmp_path / header).write_text(lib.source.with_name(header).read_text())
    source = tmp_path / "dense_conv.cc"
    source.write_text(lib.source.read_text().replace("<oneapi/dnnl/dnnl.hpp>", "<oneapi/missing.hpp>"))
    monkeypatch.setattr(denseconv, "LIBRARY", KernelLibrary(lib.name, source, lib.fallback, lib.flags))
    assert denseconv.LIBRARY.enable(True) is False
    out = capsys.readouterr().out
    assert out.startswith("cpu kernel dense_conv off: building dense_conv.cc failed (") and out.count("\n") == 1
    assert out.endswith("; dense convs keep MindSpore's CPU kernels\n")
    with kernels_off():
        assert type(conv.conv2d(4, 8, 3)) is nn.Conv2d


def _call_entry(library, function, arrays):
    """Call a kernel entry point directly (the aot signature) on NumPy arrays, from this Python thread."""
    import ctypes

    fn = getattr(ctypes.CDLL(str(library)), function)
    n = len(arrays)
    params = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
    shapes_kept = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(sh, ctypes.POINTER(ctypes.c_int64))
                                                      for sh in shapes_kept])
    dtypes = (ctypes.c_char_p * n)(*[b"float32"] * n)
    return fn(n, params, ndims, shapes, dtypes, None, None)


def test_denormal_inputs_are_read_as_zero(fast):
    """oneDNN runs with denormals flushed (DAZ and FTZ, dense_conv.cc), whatever the calling thread's setting:
    called from this Python thread (IEEE denormals), an input of denormals (1e-39) with weights and an output
    gradient of 1e10 gives exact zeros in the output and both gradients, where IEEE arithmetic gives ~1e-27. Without
    DAZ oneDNN's AVX2 gradient of the 3-channel stems hit denormal assists on stale padding lanes, 70x slower
    (docs/performance.md). The batch is split in two pieces, one on a pool thread: both flush."""
    x = np.full((4, 16, 96, 96), 1e-39, np.float32)  # 21M multiply-adds: two pieces
    w = np.full((16, 16, 3, 3), 1e10, np.float32)
    dy = np.full((4, 16, 48, 48), 1e10, np.float32)
    assert 0 < x[0, 0, 0, 0] < np.finfo(np.float32).tiny  # a denormal
    y, dx, dw = np.ones_like(dy), np.ones_like(x), np.ones_like(w)
    assert _call_entry(denseconv.LIBRARY.path, "conv_fwd_s2_half", [x, w, y]) == 0
    assert _call_entry(denseconv.LIBRARY.path, "conv_bwd_s2_half", [x, w, dy, dx, dw]) == 0
    for name, got in (("y", y), ("dw", dw)):
        np.testing.assert_array_equal(got, 0.0, err_msg=name)
    assert np.isfinite(dx).all()


class _LevelsLoss(nn.Cell):
    """sum over levels of sum(dy_l * y_l), y = the conv on every level (``conv.levels``, or one call a level)."""

    def __init__(self, conv_cell, dys, shared):
        super().__init__()
        self.conv, self.dys, self.shared = conv_cell, tuple(Tensor(d) for d in dys), shared

    def construct(self, *xs):
        ys = conv.conv_levels(self.conv, self.shared, xs)
        total = 0.0
        for y, dy in zip(ys, self.dys):
            total = total + (y * dy).sum()
        return total


@pytest.mark.parametrize("sizes", [(16, 8, 4, 2), (24, 11, 5)])
def test_levels_op_is_each_levels_conv_and_sums_the_weight_gradient_in_level_order(fast, sizes):
    """A conv that a head's levels share, run as one op each way (convs_* of dense_conv.cc): each level's output
    and input gradient are bit for bit its own conv's, the weight and bias gradients the levels' own added in level
    order; the largest level is split over two threads, the smallest is not. Eval mode runs one conv a level."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(len(sizes))
    cell = conv.conv2d(48, 40, 3, pad_mode="pad", padding=1, has_bias=True)
    assert isinstance(cell, denseconv.FastDenseConv2d) and conv.share_levels(cell, len(sizes))
    cell.set_train(True)
    xs = [Tensor(rng.standard_normal((4, 48, s, s)).astype(np.float32)) for s in sizes]
    dys = [rng.standard_normal((4, 40, s, s)).astype(np.float32) for s in sizes]
    assert 4 * 48 * 40 * 9 * sizes[0] ** 2 >= 2 << 23  # two pieces at the largest level (dense_conv.cc pieces())
    params = [cell.weight, cell.bias]
    ys = cell.levels(tuple(xs))
    dxs, (dw, db) = ms.grad(_LevelsLoss(cell, dys, True), grad_position=tuple(range(len(xs))), weights=params)(*xs)
    each = [ms.grad(_LevelsLoss(cell, [dy], False), grad_position=0, weights=params)(x) for x, dy in zip(xs, dys)]
    for level, (x, y, dx) in enumerate(zip(xs, ys, dxs)):
        np.testing.assert_array_equal(y.asnumpy(), cell(x).asnumpy(), err_msg=f"level {level}")
        np.testing.assert_array_equal(dx.asnumpy(), each[level][0].asnumpy(), err_msg=f"level {level}")
    dw_sum, db_sum = each[0][1][0].asnumpy(), each[0][1][1].asnumpy()
    for _, (dw_l, db_l) in each[1:]:
        dw_sum, db_sum = dw_sum + dw_l.asnumpy(), db_sum + db_l.asnumpy()
    np.testing.assert_array_equal(dw.asnumpy(), dw_sum)
    np.testing.assert_allclose(db.asnumpy(), db_sum, rtol=1e-5)  # the bias gradient: MindSpore's own sum
    cell.set_train(False)
    for x, y in zip(xs, cell.levels(tuple(xs))):
        np.testing.assert_allclose(y.asnumpy(), cell(x).asnumpy(), rtol=1e-5, atol=1e-5)
