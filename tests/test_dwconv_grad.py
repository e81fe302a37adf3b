"""The C++ backward of depthwise 3x3/5x5 convs (msdet/kernels/depthwise_conv.py): gradients equal MindSpore's and a
NumPy reference, the eval/export path is the plain conv, the compiled library follows its source, and without g++
the standard conv is used; how setup_runtime switches the kernel layer."""
import contextlib

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

from msdet import train_ops
from msdet.engine.ema import EMA
from msdet.engine.optim import SquareSum
from msdet.kernels import activations, build, layer, upsample
from msdet.kernels import adamw_ema as update
from msdet.kernels import batch_norm as batchnorm
from msdet.kernels import dense_conv as denseconv
from msdet.kernels import depthwise_conv as dwconv
from msdet.kernels import grad_norm as sumsq
from msdet.kernels import group_norm as groupnorm
from msdet.kernels import max_pool as maxpool
from msdet.kernels.library import KernelLibrary
from msdet.models import layers
from msdet.models.ghostpan import Upsample2x
from msdet.models.shufflenetv2 import MaxPool3x3s2p1
from tests.helpers import config, conv_output_and_grads, conv_pads, kernels_off, kernels_on

# (batch, channels, height, width, kernel, stride, TF "same" padding or (k - 1) / 2 on every side)
CASES = [
    (2, 3, 7, 10, 3, 1, True),
    (2, 5, 8, 6, 3, 2, True),     # even sizes: "same" pads 0 before, 1 after
    (1, 4, 9, 7, 3, 2, True),     # odd sizes: 1 before, 1 after
    (2, 1, 6, 9, 3, 1, False),
    (2, 6, 8, 11, 3, 2, False),
    (2, 3, 9, 6, 5, 1, True),
    (2, 4, 8, 7, 5, 2, True),     # 8: "same" pads 1 before, 2 after; 7: 2 and 2
    (1, 2, 6, 10, 5, 2, False),
]


@pytest.fixture
def fast():
    """The switches on for this test only; the GroupNorm, activation, BatchNorm, max-pool and dense conv kernels
    too, so that the whole-network tests compile every kernel of the network into one graph, as training does."""
    with kernels_on(dwconv, groupnorm, activations, batchnorm, maxpool, denseconv):
        yield


def _reference(x, w, dy, stride, same):
    """NumPy forward and both gradients of ``sum(conv(x, w) * dy)`` from the definition on the padded input."""
    k = w.shape[-1]
    (pt, pb), (pl, pr) = conv_pads(x.shape[2], k, stride, same), conv_pads(x.shape[3], k, stride, same)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    ho, wo = dy.shape[2:]
    y = np.zeros(dy.shape)
    dxp = np.zeros(xp.shape)
    dw = np.zeros(w.shape)
    for kh in range(k):
        for kw in range(k):
            window = (slice(None), slice(None), slice(kh, kh + stride * ho, stride),
                      slice(kw, kw + stride * wo, stride))
            tap = w[:, 0, kh, kw][None, :, None, None]
            y += tap * xp[window]
            dxp[window] += tap * dy
            dw[:, 0, kh, kw] = (dy * xp[window]).sum(axis=(0, 2, 3))
    return y, dxp[:, :, pt:pt + x.shape[2], pl:pl + x.shape[3]], dw


@pytest.mark.parametrize("batch,channels,height,width,kernel,stride,same", CASES)
def test_gradients_equal_mindspore_and_numpy(fast, batch, channels, height, width, kernel, stride, same):
    rng = np.random.default_rng(channels * 10 + stride)
    x = rng.normal(size=(batch, channels, height, width)).astype(np.float32)
    pad_mode, padding = ("same", 0) if same else ("pad", (kernel - 1) // 2)
    custom = dwconv.conv2d(channels, channels, kernel, stride=stride, pad_mode=pad_mode, padding=padding,
                           group=channels)
    plain = nn.Conv2d(channels, channels, kernel, stride=stride, pad_mode=pad_mode, padding=padding, has_bias=False,
                      group=channels)
    assert isinstance(custom, dwconv.FastDepthwiseConv2d)
    w = rng.normal(size=(channels, 1, kernel, kernel)).astype(np.float32)
    custom.weight.set_data(Tensor(w))
    plain.weight.set_data(Tensor(w))
    out_shape = (batch, channels, -(-height // stride), -(-width // stride))
    dy = rng.normal(size=out_shape).astype(np.float32)

    y, gx, gw = conv_output_and_grads(custom, x, dy)
    y_ms, gx_ms, gw_ms = conv_output_and_grads(plain, x, dy)
    y_np, gx_np, gw_np = _reference(x, w, dy, stride, same)
    assert y.shape == y_np.shape == out_shape
    np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx, gx_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, gw_np, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(gx, gx_ms, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, gw_ms, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(y, y_ms, rtol=1e-5, atol=1e-5)   # C++ forward: another summation order


def test_eval_mode_is_the_plain_conv_and_exports(fast, tmp_path):
    """Inference and export graphs hold MindSpore's Conv2D only: ONNX (which has no Custom op) exports and
    onnxruntime gives the reference output."""
    import onnxruntime as ort

    conv = dwconv.conv2d(4, 4, 3, stride=2, pad_mode="same", group=4)
    assert isinstance(conv, dwconv.FastDepthwiseConv2d)
    conv.set_train(False)
    x = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
    ms.export(conv, Tensor(x), file_name=str(tmp_path / "dw"), file_format="ONNX")
    session = ort.InferenceSession(str(tmp_path / "dw.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    y_np, _, _ = _reference(x, conv.weight.asnumpy(), np.zeros((1, 4, 4, 4), np.float32), 2, True)
    assert got.shape == y_np.shape
    np.testing.assert_allclose(got, y_np, rtol=1e-5, atol=1e-5)


def test_only_depthwise_3x3_5x5_without_bias_is_replaced(fast):
    assert dwconv.conv2d(4, 4, 7, group=4) is None
    assert dwconv.conv2d(4, 4, 1, group=4) is None
    assert dwconv.conv2d(4, 8, 3, group=4) is None
    assert dwconv.conv2d(4, 4, 3, group=1) is None
    assert dwconv.conv2d(4, 4, 3, stride=3, group=4) is None
    assert dwconv.conv2d(4, 4, 3, group=4, has_bias=True) is None
    assert dwconv.conv2d(4, 4, 3, pad_mode="pad", padding=2, group=4) is None
    assert dwconv.conv2d(4, 4, 5, pad_mode="pad", padding=1, group=4) is None
    assert type(dwconv.conv2d(4, 4, 3, pad_mode="pad", padding=1, group=4)) is dwconv.FastDepthwiseConv2d
    assert type(dwconv.conv2d(4, 4, 5, pad_mode="pad", padding=2, group=4)) is dwconv.FastDepthwiseConv2d
    assert type(dwconv.conv2d(4, 4, 5, stride=2, group=4)) is dwconv.FastDepthwiseConv2d


def test_library_is_rebuilt_when_the_source_or_its_header_changes(tmp_path):
    source, checks, header = tmp_path / "kernel.cc", tmp_path / "aot.h", tmp_path / "parallel.h"
    source.write_text(dwconv.LIBRARY.source.read_text())
    for copy in (checks, header):
        copy.write_text(dwconv.LIBRARY.source.with_name(copy.name).read_text())
    assert build.local_includes(source) == [checks, header]
    first = build.build_library(source, tmp_path / "cache")
    stamp = first.stat().st_mtime_ns
    assert build.build_library(source, tmp_path / "cache") == first
    assert first.stat().st_mtime_ns == stamp                  # cached: not compiled again
    source.write_text(dwconv.LIBRARY.source.read_text() + "\n// edited\n")
    second = build.build_library(source, tmp_path / "cache")
    header.write_text(header.read_text() + "\n// edited\n")
    third = build.build_library(source, tmp_path / "cache")
    assert len({first, second, third}) == 3 and third.exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(p.name for p in (first, second, third))


def test_without_gxx_the_standard_conv_is_used(monkeypatch, capsys):
    lib = dwconv.LIBRARY
    monkeypatch.setattr(dwconv, "LIBRARY", KernelLibrary(lib.name, lib.source, lib.fallback))
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert dwconv.LIBRARY.enable(True) is False
    assert capsys.readouterr().out == ("cpu kernel depthwise_conv off: g++ not found; depthwise convs keep "
                                       "MindSpore's (slow) CPU kernels\n")
    with kernels_off():
        assert type(layers.conv2d(4, 4, 3, group=4)) is nn.Conv2d


def test_a_failing_build_falls_back(monkeypatch, tmp_path, capsys):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(dwconv, "LIBRARY", KernelLibrary("depthwise_conv", broken, dwconv.LIBRARY.fallback))
    monkeypatch.setenv("MSDET_CACHE", str(tmp_path / "cache"))
    assert dwconv.LIBRARY.enable(True) is False
    out = capsys.readouterr().out
    assert out.startswith("cpu kernel depthwise_conv off: building broken.cc failed (") and out.count("\n") == 1
    assert not list((tmp_path / "cache").glob("*"))           # no half-written library left behind


@pytest.mark.parametrize("machine", ["riscv64", "ppc64le"])
def test_a_machine_the_sources_are_not_written_for_builds_nothing(monkeypatch, capsys, machine):
    lib = dwconv.LIBRARY
    monkeypatch.setattr(dwconv, "LIBRARY", KernelLibrary(lib.name, lib.source, lib.fallback))
    monkeypatch.setattr(build.platform, "machine", lambda: machine)
    assert dwconv.LIBRARY.enable(True) is False
    assert capsys.readouterr().out.startswith(f"cpu kernel depthwise_conv off: machine {machine} is not x86-64")


class _OutputLoss(nn.Cell):
    """``sum(outputs * fixed random weights)`` of the whole training network (NanoDet: main and aux heads): a
    loss without target assignment, so float rounding cannot flip a discrete choice between the two arms."""

    def __init__(self, net, model, weights):
        super().__init__()
        self.net, self.model, self.weights = net, model, weights

    def construct(self, x):
        if self.model == "d0":
            outputs = self.net(x)
        else:
            outputs = self.net.forward_train(x, Tensor(1.0, ms.float32))
        loss = (outputs[0] * self.weights[0]).sum()
        return loss + (outputs[1] * self.weights[1]).sum()


def _network_gradients(model, kernel, graph):
    """(cells on a C++ kernel, loss, {weight name: gradient}) of ``_OutputLoss`` on one fixed batch, the network
    built from seed 0, compiled as one graph (``graph``) or run op by op."""
    from msdet.detectors.d0 import D0Detector
    from msdet.detectors.nanodet import NanoDetDetector

    ms.set_context(mode=ms.GRAPH_MODE if graph else ms.PYNATIVE_MODE)
    ms.set_seed(0)
    with contextlib.nullcontext() if kernel else kernels_off():
        if model == "d0":
            net = D0Detector(config("d0", input_size=128, drop_connect_rate=0.0), 3).build_network()
        else:
            net = NanoDetDetector(config("nanodet", input_size=128), 3).build_network()
    net.set_train(True)
    fast_cells = (dwconv.FastDepthwiseConv2d, groupnorm.FastGroupNorm, activations.SwishKernel,
                  activations.LeakyReLUKernel, activations.PlaneMeanKernel, activations.SigmoidGateKernel,
                  batchnorm.FastBatchNorm2d, maxpool.MaxPoolKernel, denseconv.FastDenseConv2d)
    replaced = sum(isinstance(c, fast_cells) for _, c in net.cells_and_names())
    rng = np.random.default_rng(0)
    x = Tensor(rng.normal(size=(2, 3, 128, 128)).astype(np.float32))
    shapes = [(2, 3069, 4), (2, 3069, 3)] if model == "d0" else [(2, 340, 35), (2, 340, 35)]  # 128 px, 3 classes
    weights = tuple(Tensor(rng.normal(size=s).astype(np.float32)) for s in shapes)
    loss_cell = _OutputLoss(net, model, weights)
    params = loss_cell.trainable_params()
    step = ms.value_and_grad(loss_cell, None, params)
    loss, grads = (ms.jit(step) if graph else step)(x)
    return replaced, float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(params, grads)}


def _assert_same_gradients(got, expected, atol=1e-5):
    """Every weight's gradient equal within float rounding, relative to the largest gradient of the network
    (so that a gradient that is zero up to rounding, e.g. a BN shift followed by another BN, is compared as such)."""
    assert list(got) == list(expected)           # same parameter names, same order
    scale = max(np.abs(g).max() for g in expected.values())
    for name, g in got.items():
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, expected[name], rtol=1e-3, atol=atol * scale, err_msg=name)


@pytest.mark.detector
@pytest.mark.parametrize("model", ["d0", "nanodet"])
def test_whole_network_gradients_compiled_as_one_graph_equal_op_by_op(fast, model):
    """How the kernel's gradient is attached to the graph: the whole training network compiled in graph mode gives
    the gradients it gives op by op (an earlier attachment, MindSpore's forward passed through a primitive
    carrying the kernel's bprop, gave NaN in NanoDet's graph and one 850x-off D0 weight, op by op all right)."""
    replaced, loss, grads = _network_gradients(model, kernel=True, graph=True)
    replaced_op, loss_op, grads_op = _network_gradients(model, kernel=True, graph=False)
    assert replaced == replaced_op >= 20         # D0: MBConvs, BiFPN and head separable convs; NanoDet:
    assert loss == pytest.approx(loss_op, rel=1e-6)  # ShuffleNetV2 blocks, GhostPAN and head depthwise convs
    _assert_same_gradients(grads, grads_op)


@pytest.mark.detector
def test_whole_d0_gradients_with_the_kernel_equal_mindspores(fast):
    """D0's every weight gradient with the kernels (depthwise convs, swish, SE blocks) equals the one with
    MindSpore's ops. The bound, 5e-5 of the largest gradient, is the network's own float32 noise: a 1e-7 relative
    change of the *input image* moves the stem conv's gradient by 2.0e-5 of it with MindSpore's ops alone; the
    kernels move it by 2.3e-5. (NanoDet-Plus at random init is too sensitive for this: a 2e-7 relative change of
    the input moves its gradients by up to 3.5% with MindSpore's own ops; its convs are covered one by one above.)"""
    replaced, loss, grads = _network_gradients("d0", kernel=True, graph=False)
    replaced_ms, loss_ms, grads_ms = _network_gradients("d0", kernel=False, graph=False)
    assert replaced_ms == 0 and replaced >= 40
    assert loss == pytest.approx(loss_ms, rel=1e-6)
    _assert_same_gradients(grads, grads_ms, atol=5e-5)


def test_d0_gradient_with_the_kernel_matches_finite_differences(fast, pynative):
    """tests/test_d0_training.py's finite-difference check of the whole D0 loss, with the kernel switched on."""
    from tests.test_d0_training import _check_gradient_by_module

    _check_gradient_by_module()


@pytest.mark.parametrize("kernel", list(layer.KERNELS))
@pytest.mark.parametrize("switch,off,target,expected", [("auto", False, "CPU", True), ("off", False, "CPU", False),
                                                        ("auto", True, "CPU", False), ("auto", False, "GPU", False)])
def test_setup_runtime_switches_each_kernel_on_for_cpu_training_only(monkeypatch, kernel, switch, off, target,
                                                                     expected):
    """``runtime.cpu_kernels: auto`` on CPU turns every kernel of the training run's layer on, ``off`` none,
    ``cpu_kernels_off`` names one off singly; GPU and Ascend keep MindSpore's kernels; without the layer
    (evaluation, export) nothing is installed."""
    import dataclasses

    from msdet.engine import runtime

    is_fast = {
        "depthwise_conv": lambda: isinstance(layers.conv2d(8, 8, 3, group=8), dwconv.FastDepthwiseConv2d),
        "group_norm": lambda: isinstance(layers.group_norm(4, 8), groupnorm.FastGroupNorm),
        "activations": lambda: all(cell.fast is not None for cell in (
            layers.Swish(), layers.LeakyReLU(0.1), layers.PlaneMean(), layers.SigmoidGate())),
        "grad_norm": lambda: SquareSum().fast,
        "adamw_ema": lambda: EMA(nn.Dense(2, 2), 0.9).fast is not None,
        "max_pool": lambda: MaxPool3x3s2p1().fast is not None,
        "upsample": lambda: Upsample2x().fast is not None,
        "batch_norm": lambda: isinstance(layers.batch_norm2d(4, 1e-5, 0.9), batchnorm.FastBatchNorm2d),
        "dense_conv": lambda: isinstance(layers.conv2d(4, 8, 3), denseconv.FastDenseConv2d),
    }[kernel]
    for m in (activations, batchnorm, denseconv, dwconv, groupnorm, maxpool, sumsq, update, upsample):
        monkeypatch.setattr(m.LIBRARY, "on", m.LIBRARY.on)
    monkeypatch.setattr(ms, "set_device", lambda target: None)   # no GPU here: only the switch is under test
    cfg = dataclasses.replace(config("runtime"), device_target=target, cpu_kernels=switch,
                              cpu_kernels_off=[kernel] if off else [])
    with kernels_off():
        assert runtime.setup_runtime(cfg, kernels=layer.for_model("nanodet")) == (
            [k for k in layer.KERNELS if k != kernel or expected] if switch == "auto" and target == "CPU" else [])
        assert (kernel in train_ops.installed()) is expected
        assert bool(is_fast()) is expected
        runtime.setup_runtime(cfg)
        assert train_ops.installed() == [] and not is_fast()
