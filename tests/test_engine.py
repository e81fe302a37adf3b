"""The shared training engine on a toy detector: schedule, EMA, loss going down, resume, NaN stop."""
from __future__ import annotations

import dataclasses
import json

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from msdet.cli import run
from msdet.engine.batch_norm_stats import recalibrate_batch_norm
from msdet.engine.checkpoint import checkpoint_meta, read_checkpoint
from msdet.engine.ema import EMA
from msdet.engine.live import SERIES_DIR, read_series
from msdet.engine.schedules import warmup_cosine
from msdet.engine.trainer import Trainer, TrainingDiverged
from tests.helpers import ToyDetector, ToyNet, cfg, config, series_files, toy_data


def fresh_trainer(tmp_path, config, scale=1.0, sub="run", live=True, validate=None, kill_at=None, drop=0.0):
    ms.set_seed(0)
    net = ToyNet(drop)
    return Trainer(ToyDetector(scale), net, config, toy_data(kill_at=kill_at), tmp_path / sub, progress=False,
                   key_payload=dataclasses.asdict(config), live_dir=tmp_path / sub / "live" if live else None,
                   validate=validate), net


def test_warmup_cosine_shape_and_values():
    c = config("d0.train", epochs=2, lr=0.1, lr_reference_batch=8, warmup_steps=5, warmup_ratio=0.1, min_lr_ratio=0.01,
               batch_size=8, scale_lr_with_batch=True)
    lr = warmup_cosine(c, steps_per_epoch=10, global_batch=16)
    assert lr.shape == (20,)
    peak = 0.2  # linear scaling: 0.1 * 16 / 8
    assert lr[0] == pytest.approx(peak * 0.1, rel=1e-5)
    assert lr[5] == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * 5 / 20)) * 0.99 + peak * 0.01, rel=1e-5)
    assert np.all(np.diff(lr[5:]) <= 0)
    assert lr[-1] >= peak * 0.01


def test_ema_matches_numpy():
    net = nn.Dense(2, 2)
    ema = EMA(net, decay=0.5, ramp_steps=1.0)
    w0 = net.weight.asnumpy().copy()
    net.weight.set_data(Tensor(w0 + 1.0))
    d = ema(Tensor(1.0, ms.float32)).asnumpy()
    assert d == pytest.approx(0.5 * (1 - np.exp(-1.0)), rel=1e-5)
    expect = w0 * d + (w0 + 1.0) * (1 - d)
    np.testing.assert_allclose(ema.shadows[0].asnumpy(), expect, rtol=1e-6)
    ema.copy_to_network()
    np.testing.assert_array_equal(net.weight.asnumpy(), ema.shadows[0].asnumpy())


class _ScaledDense(nn.Cell):
    """A matrix, a vector and a 0-d weight (NanoDet's per-level scales are 0-d)."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Dense(3, 2)
        self.scale = ms.Parameter(Tensor(np.float32(1.5)), name="scale")

    def construct(self, x):
        return self.dense(x) * self.scale


def test_ema_steps_match_numpy_for_every_rank_of_weight():
    """Several updates with a ramping decay against float64 NumPy, the 0-d weight included."""
    net = _ScaledDense()
    ema = EMA(net, decay=0.9, ramp_steps=3.0)
    rng = np.random.default_rng(0)
    shadows = [p.asnumpy().astype(np.float64) for p in ema.sources]
    for step in (1.0, 2.0, 5.0):
        for p in ema.sources:
            p.set_data(Tensor((p.asnumpy() + rng.normal(size=p.shape)).astype(np.float32)))
        d = float(ema(Tensor(step, ms.float32)).asnumpy())
        assert d == pytest.approx(0.9 * (1 - np.exp(-step / 3.0)), rel=1e-5)
        shadows = [d * s + (1 - d) * p.asnumpy() for s, p in zip(shadows, ema.sources)]
    assert sorted(s.ndim for s in shadows) == [0, 1, 2]
    for got, want in zip(ema.shadows, shadows):
        assert got.shape == want.shape
        np.testing.assert_allclose(got.asnumpy(), want, rtol=2e-6, atol=1e-7)


def test_loss_goes_down_and_outputs(tmp_path):
    trainer, net = fresh_trainer(tmp_path, cfg(epochs=4))
    summary = trainer.fit()
    trainer.write_final()
    live = tmp_path / "run" / "live"
    loss = read_series(live, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 4 * 8 + 1)) and summary.steps == 32
    losses = [v for _, v in loss]
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert read_series(live, "train/valid")[0] == (1, 4.0)  # 4 images x 1 valid GT each
    np.testing.assert_allclose([v for _, v in read_series(live, "train/lr")], trainer.lr, rtol=1e-6)
    assert len(read_series(live, "train/images_per_s")) == 32
    assert (live / SERIES_DIR / "train" / "loss.tsv").read_text().startswith("step\tloss\n")
    latest = json.loads((live / "metrics.json").read_text())
    assert latest["step"] == 32 and latest["train"]["loss"] == losses[-1]
    assert summary.final_losses["loss"] == pytest.approx(losses[-1], rel=1e-6)
    ema_params = read_checkpoint(tmp_path / "run" / "ema.ckpt")
    assert set(ema_params) >= {p.name for p in net.get_parameters()}
    # no validation: best.ckpt is the EMA checkpoint
    assert (tmp_path / "run" / "best.ckpt").read_bytes() == (tmp_path / "run" / "ema.ckpt").read_bytes()


def test_resume_gives_identical_weights(tmp_path):
    full, net_full = fresh_trainer(tmp_path, cfg(), sub="full")
    full.fit()
    part, _ = fresh_trainer(tmp_path, cfg(), sub="part")
    part.fit(stop_after_epochs=1)
    assert not part.finished()
    resumed, net_resumed = fresh_trainer(tmp_path, cfg(), sub="part")  # a new process would start like this
    summary = resumed.fit()
    assert summary.resumed_from_epoch == 1 and resumed.finished()
    for a, b in zip(net_full.get_parameters(), net_resumed.get_parameters()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=a.name)
    for a, b in zip(full.ema.shadows, resumed.ema.shadows):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=a.name)
    for name in ("train/loss", "train/valid", "train/lr"):
        assert read_series(tmp_path / "full" / "live", name) == read_series(tmp_path / "part" / "live", name)


def test_update_kernel_trains_like_the_per_tensor_ops(tmp_path, monkeypatch):
    """The C++ AdamW and EMA (msdet/kernels/adamw_ema.py) in the real step: the weights, moments and EMA shadows of
    MindSpore's per-tensor ops within float rounding, and every weight moved (the in-place writes reached the
    Parameters, not copies of them: without ``side_effect_mem`` they do not)."""
    from msdet.kernels import adamw_ema
    from tests.helpers import kernels_if

    runs = {}
    for on in (False, True):
        with kernels_if(on, adamw_ema):
            trainer, net = fresh_trainer(tmp_path, cfg(epochs=2, weight_decay=0.05), sub=f"kernel{int(on)}",
                                         live=False)
        assert (trainer.optimizer.fast is not None) is on and (trainer.ema.fast is not None) is on
        start = [p.asnumpy().copy() for p in trainer.optimizer.parameters]
        trainer.fit()
        opt = trainer.optimizer
        runs[on] = [(p.name, p.asnumpy()) for group in (opt.parameters, opt.moments1, opt.moments2, trainer.ema.shadows)
                    for p in group]
        for before, p in zip(start, opt.parameters):
            assert not np.array_equal(before, p.asnumpy()), p.name
    assert [n for n, _ in runs[False]] == [n for n, _ in runs[True]]
    for (name, a), (_, b) in zip(runs[False], runs[True]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)


def test_changed_params_start_fresh(tmp_path):
    first, _ = fresh_trainer(tmp_path, cfg(), sub="x")
    first.fit(stop_after_epochs=1)
    second, _ = fresh_trainer(tmp_path, cfg(lr=0.02), sub="x")
    assert second.fit().resumed_from_epoch == 0


def test_a_checkpoint_set_staged_by_a_killed_run_is_finished_at_the_next_start(tmp_path):
    """write_final stages final/ema/best.ckpt and the card as one set; a kill while they move in leaves the
    rest staged, and the next start of the trainer moves it in before anything else (and no temporary
    folder is left in state/, a DVC output)."""
    import socket
    import subprocess
    import sys

    trainer, _ = fresh_trainer(tmp_path, cfg(epochs=1))
    trainer.fit()
    trainer.write_final({"model": "toy"})
    run_dir = tmp_path / "run"
    written = {n: (run_dir / n).read_bytes() for n in ("best.ckpt", "ema.ckpt", "final.ckpt", "model_card.json")}
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    stage = run_dir / f".checkpoints.set@{socket.gethostname()}@{dead}@x"
    stage.mkdir()
    for name in ("ema.ckpt", "final.ckpt", "model_card.json"):  # best.ckpt had moved in when it was killed
        (run_dir / name).rename(stage / name)
        (run_dir / name).write_bytes(b"the previous run's")
    (stage / ".complete").write_text("")
    leftover = run_dir / "state" / f".last.ckpt.tmp@{socket.gethostname()}@{dead}@y"
    leftover.mkdir()
    again, _ = fresh_trainer(tmp_path, cfg(epochs=1))
    again.fit()  # finished already: no step, only the start
    assert {n: (run_dir / n).read_bytes() for n in written} == written
    assert not stage.exists() and not leftover.exists()


def test_nan_loss_stops_with_step_and_no_checkpoint(tmp_path, capsys, monkeypatch):
    trainer, _ = fresh_trainer(tmp_path, cfg(), scale=float("nan"))
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1 "):
        trainer.fit()
    assert not (tmp_path / "run" / "state" / "last.ckpt").exists()
    # a command reports it in one line, exit status 1
    monkeypatch.delenv("MSDET_TRACEBACK", raising=False)
    trainer, _ = fresh_trainer(tmp_path, cfg(), scale=float("nan"), sub="cli")
    capsys.readouterr()
    assert run(lambda argv: trainer.fit(), []) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: toy: non-finite loss at epoch 1, step 1 (loss=nan"), err
    assert not (tmp_path / "cli" / "state" / "last.ckpt").exists()


def test_losses_are_read_only_every_log_every_steps_steps(tmp_path, monkeypatch):
    """The host waits for the loss parts after the first step, every log_every_steps steps and at the epoch's
    end; each row holds the mean over the steps since the previous row (the per-step run's values)."""
    from msdet.engine.trainer import LossWindow

    reads = []
    mean = LossWindow.mean
    monkeypatch.setattr(LossWindow, "mean", lambda self: reads.append(self.last) or mean(self))
    every, _ = fresh_trainer(tmp_path, cfg(epochs=1), sub="every")
    every.fit()
    per_step = [v for _, v in read_series(tmp_path / "every" / "live", "train/loss")]
    assert reads == list(range(1, 9))
    reads.clear()
    sparse, _ = fresh_trainer(tmp_path, cfg(epochs=1, log_every_steps=3), sub="sparse")
    summary = sparse.fit()
    assert reads == [1, 3, 6, 8]
    rows = read_series(tmp_path / "sparse" / "live", "train/loss")
    assert [s for s, _ in rows] == [3, 6]
    np.testing.assert_allclose([v for _, v in rows], [np.mean(per_step[:3]), np.mean(per_step[3:6])], rtol=1e-6)
    assert summary.final_losses["loss"] == pytest.approx(per_step[-1], rel=1e-6)


@pytest.mark.parametrize(("every", "where"), [(0, "steps 1-4"), (2, "steps 1-2")])
def test_a_nan_between_log_steps_stops_before_the_next_row_or_checkpoint(tmp_path, every, where):
    """Step 2's loss is infinite; with log_every_steps 4 the stop comes at step 4, or before the resume point of
    step 2 is written."""
    ms.set_seed(0)
    c = cfg(epochs=1, log_every_steps=4, checkpoint_every_steps=every)
    trainer = Trainer(ToyDetector(), ToyNet(), c, toy_data(inf_at=(0, 1)), tmp_path, progress=False,
                      key_payload={}, live_dir=tmp_path / "live")
    with pytest.raises(TrainingDiverged, match=f"non-finite loss at epoch 1, {where} \\(mean over them: loss="):
        trainer.fit()
    assert not (tmp_path / "state" / "last.ckpt").exists()


@pytest.mark.parametrize("kernel", [False, True])
def test_adamw_matches_torch_formula(kernel):
    """torch's AdamW on the gradients times grad_scale, with MindSpore's per-tensor ops and with the C++ update."""
    from msdet.engine.optim import AdamW
    from msdet.kernels import adamw_ema
    from tests.helpers import kernels_if

    w0 = np.array([[0.5, -1.0], [2.0, 0.1]], np.float32)
    s0 = np.float32(0.7)
    weight = ms.Parameter(Tensor(w0), name="w")
    scale = ms.Parameter(Tensor(s0), name="s")  # 0-d, like NanoDet's Scale
    lrs = np.array([0.1, 0.05, 0.02], np.float32)
    with kernels_if(kernel, adamw_ema):
        opt = AdamW([{"params": [weight], "weight_decay": 0.05}, {"params": [scale], "weight_decay": 0.0}], lrs)
    assert (opt.fast is not None) is kernel
    raw = [np.array([[0.3, -0.2], [0.0, 1.0]], np.float32), np.float32(-0.4)]
    # the update uses the gradients times grad_scale, here so small that eps (1e-8) makes the update depend on it
    # (AdamW is otherwise nearly blind to a gradient scale)
    grad_scale = np.float32(2e-8)
    grads = [g * grad_scale for g in raw]
    ref = [w0.astype(np.float64), np.float64(s0)]
    m = [np.zeros_like(r) for r in ref]
    v = [np.zeros_like(r) for r in ref]
    for t in range(1, 5):  # one step past the schedule: the last lr is kept
        opt((Tensor(raw[0]), Tensor(raw[1])), Tensor(grad_scale))
        lr = lrs[min(t - 1, 2)]
        for i, wd in enumerate((0.05, 0.0)):
            m[i] = 0.9 * m[i] + 0.1 * grads[i]
            v[i] = 0.999 * v[i] + 0.001 * grads[i] ** 2
            ref[i] = ref[i] * (1 - lr * wd) - lr * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(weight.asnumpy(), ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale.asnumpy(), ref[1], rtol=1e-5, atol=1e-6)
    assert int(opt.global_step.asnumpy()) == 4


def test_square_sum_kernel_equals_float64_over_many_tensors(monkeypatch):
    from msdet.engine.optim import SquareSum
    from msdet.kernels import grad_norm
    from tests.helpers import kernels_if

    rng = np.random.default_rng(4)
    shapes = [(), (1,), (7,), (3, 5), (16, 3, 3, 3), (2, 1, 1, 1), (1000,)] * 6
    arrays = [(rng.normal(size=s) * 10.0 ** rng.integers(-3, 3)).astype(np.float32) for s in shapes]
    expected = sum((a.astype(np.float64) ** 2).sum() for a in arrays)
    for kernel in (True, False):
        with kernels_if(kernel, grad_norm):
            cell = SquareSum()
        assert cell.fast is kernel

        def total(*tensors, cell=cell):
            return cell(tensors)

        got = ms.jit(total)(*[Tensor(a) for a in arrays])
        assert got.shape == () and got.dtype == ms.float32
        assert float(got.asnumpy()) == pytest.approx(expected, rel=2e-6)


@pytest.mark.parametrize("kernel", [False, True])
def test_clip_grad_norm_keeps_shapes_and_scales(monkeypatch, kernel):
    from msdet.engine.optim import SquareSum, clip_factor, scale_gradients
    from msdet.kernels import grad_norm
    from tests.helpers import kernels_if

    with kernels_if(kernel, grad_norm):
        square_sum = SquareSum()
    assert square_sum.fast is kernel
    grads = (Tensor(np.array([3.0, 0.0], np.float32)), Tensor(np.float32(4.0)))
    def clip_to_one(g):
        return scale_gradients(g, clip_factor(g, 1.0, square_sum))

    def clip_to_ten(g):
        return scale_gradients(g, clip_factor(g, 10.0, square_sum))

    clipped = ms.jit(clip_to_one)(grads)
    assert clipped[1].shape == ()
    np.testing.assert_allclose(clipped[0].asnumpy(), [0.6, 0.0], rtol=1e-5)
    np.testing.assert_allclose(clipped[1].asnumpy(), 0.8, rtol=1e-5)
    same = ms.jit(clip_to_ten)(grads)
    np.testing.assert_array_equal(same[0].asnumpy(), [3.0, 0.0])
    assert same[1].shape == () and float(same[1].asnumpy()) == 4.0


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("max_norm", [0.5, 1e4])
def test_clip_grad_norm_is_bit_identical_to_numpy(kernel, max_norm):
    """Branch-free clipping: under the norm the gradients come back bit for bit (x 1.0), over it they are
    multiplied by the float32 factor max_norm / (norm + 1e-6), as NumPy computes it from the same norm."""
    from msdet.engine.optim import SquareSum, clip_factor, scale_gradients
    from msdet.kernels import grad_norm
    from tests.helpers import kernels_if

    with kernels_if(kernel, grad_norm):
        square_sum = SquareSum()
    assert square_sum.fast is kernel
    rng = np.random.default_rng(7)
    arrays = [rng.normal(size=s).astype(np.float32) for s in [(), (5,), (3, 4), (8, 3, 3, 3)]]
    grads = tuple(Tensor(a) for a in arrays)

    def clip(g):
        return scale_gradients(g, clip_factor(g, max_norm, square_sum))

    def total(g):
        return square_sum(g)

    got = [g.asnumpy() for g in ms.jit(clip)(grads)]
    norm = np.sqrt(np.float32(ms.jit(total)(grads).asnumpy()))
    factor = min(np.float32(max_norm) / (norm + np.float32(1e-6)), np.float32(1.0))
    assert bool(factor < 1.0) is (max_norm == 0.5)
    for g, a in zip(got, arrays):
        assert g.shape == a.shape and g.dtype == np.float32
        np.testing.assert_array_equal(g, a * factor)
    if factor == 1.0:
        for g, a in zip(got, arrays):
            np.testing.assert_array_equal(g, a)


@pytest.mark.parametrize("kernel", [False, True])
def test_recalibrate_batch_norm_sets_mean_of_batch_statistics(monkeypatch, kernel):
    """With MindSpore's BatchNorm and with the fused C++ one (which takes the momentum from the swapped primitive)."""
    from msdet.kernels import batch_norm as batchnorm
    from tests.helpers import kernels_if

    ms.set_seed(0)
    with kernels_if(kernel, batchnorm):
        net = ToyNet()
    assert isinstance(net.bn, batchnorm.FastBatchNorm2d) is kernel
    net.bn.moving_mean.set_data(Tensor(np.full(4, 7.0, np.float32)))
    net.bn.moving_variance.set_data(Tensor(np.full(4, 50.0, np.float32)))
    weights = net.conv.weight.asnumpy().copy()
    rng = np.random.default_rng(1)
    batches = [rng.normal(i, 1 + i, size=(4, 3, 16, 16)).astype(np.float32) for i in range(3)]
    assert recalibrate_batch_norm(net, batches) == 3
    feats = [net.conv(Tensor(b)).asnumpy().astype(np.float64) for b in batches]
    mean = np.mean([f.mean(axis=(0, 2, 3)) for f in feats], axis=0)
    # MindSpore's BatchNorm keeps the unbiased variance in its moving statistics (as PyTorch)
    var = np.mean([f.var(axis=(0, 2, 3), ddof=1) for f in feats], axis=0)
    np.testing.assert_allclose(net.bn.moving_mean.asnumpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.bn.moving_variance.asnumpy(), var, rtol=1e-3)
    np.testing.assert_array_equal(net.conv.weight.asnumpy(), weights)
    assert not net.training
    assert recalibrate_batch_norm(net, []) == 0
    np.testing.assert_allclose(net.bn.moving_mean.asnumpy(), mean, rtol=1e-4, atol=1e-5)

    def interrupted():
        yield batches[2] * 5.0
        raise KeyboardInterrupt

    before = net.bn.moving_mean.asnumpy().copy()
    with pytest.raises(KeyboardInterrupt):
        recalibrate_batch_norm(net, interrupted())
    np.testing.assert_array_equal(net.bn.moving_mean.asnumpy(), before)


def test_write_final_recalibrates_bn_and_resume_saves_the_same(tmp_path):
    config = cfg(bn_recalibration_batches=2)
    full, net = fresh_trainer(tmp_path, config, sub="full")
    full.fit()
    running = {p.name: p.asnumpy().copy() for p in net.get_parameters()}
    full.write_final()
    part, _ = fresh_trainer(tmp_path, config, sub="part")
    part.fit(stop_after_epochs=2)
    resumed, _ = fresh_trainer(tmp_path, config, sub="part")
    resumed.fit()
    resumed.write_final()
    for p in net.get_parameters():  # the live network is left as trained
        np.testing.assert_array_equal(p.asnumpy(), running[p.name], err_msg=p.name)
    for name in ("final.ckpt", "ema.ckpt"):
        a, b = read_checkpoint(tmp_path / "full" / name), read_checkpoint(tmp_path / "part" / name)
        for key in ("net.bn.moving_mean", "net.bn.moving_variance", "net.conv.weight"):
            np.testing.assert_array_equal(a[key].asnumpy(), b[key].asnumpy(), err_msg=f"{name} {key}")
    final = read_checkpoint(tmp_path / "full" / "final.ckpt")
    np.testing.assert_array_equal(final["net.conv.weight"].asnumpy(), running["net.conv.weight"])
    assert not np.allclose(final["net.bn.moving_mean"].asnumpy(), running["net.bn.moving_mean"])


def test_killed_mid_epoch_then_resumed_gives_the_uninterrupted_series(tmp_path):
    full, _ = fresh_trainer(tmp_path, cfg(), sub="full")
    full.fit()
    killed, _ = fresh_trainer(tmp_path, cfg(), sub="part", kill_at=(1, 5))
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    part = tmp_path / "part" / "live"
    assert read_series(part, "train/loss")[-1][0] == 8 + 5  # logged past the resume point (end of epoch 1)
    resumed, _ = fresh_trainer(tmp_path, cfg(), sub="part")
    assert resumed.fit().resumed_from_epoch == 1
    expected = series_files(tmp_path / "full" / "live")
    assert set(expected) == {"train/loss.tsv", "train/valid.tsv", "train/lr.tsv"}
    assert series_files(part) == expected
    assert [s for s, _ in read_series(part, "train/images_per_s")] == list(range(1, 25))
    a, b = (json.loads((d / "live" / "metrics.json").read_text()) for d in (tmp_path / "full", tmp_path / "part"))
    assert a["step"] == b["step"] == 24 and a["train"]["loss"] == b["train"]["loss"]


class ScriptedValidator:
    """AP from a script, one value per call; records what it saw, runs the network in inference mode and
    (``rand``) draws random numbers, as a validation may."""

    def __init__(self, aps, rand=True):
        self.aps, self.seen, self.rand = list(aps), [], rand

    def __call__(self, network):
        self.seen.append({p.name: p.asnumpy().copy() for p in network.get_parameters()})
        if self.rand:
            ops.rand((3,))
        network.set_train(False)
        network(Tensor(np.ones((4, 3, 16, 16), np.float32)))
        ap = self.aps[len(self.seen) - 1]
        return {"AP": ap, "AP50": ap + 0.1}


def test_validation_keeps_training_bit_identical_and_best_is_the_highest_ap(tmp_path):
    config = cfg(epochs=4, bn_recalibration_batches=2)
    plain, net_plain = fresh_trainer(tmp_path, config, sub="plain", drop=0.3)
    plain.fit()
    plain.write_final()
    validator = ScriptedValidator([0.2, 0.6, 0.4, 0.5])
    checked, net_checked = fresh_trainer(tmp_path, dataclasses.replace(config, eval_every_epochs=1), sub="val",
                                         validate=validator, drop=0.3)
    summary = checked.fit()
    checked.write_final()
    for a, b in zip(net_plain.get_parameters(), net_checked.get_parameters()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=a.name)
    for name in ("final.ckpt", "ema.ckpt"):
        a, b = read_checkpoint(tmp_path / "plain" / name), read_checkpoint(tmp_path / "val" / name)
        for key in (p.name for p in net_plain.get_parameters()):
            np.testing.assert_array_equal(a[key].asnumpy(), b[key].asnumpy(), err_msg=f"{name} {key}")
    # the validated weights are the EMA with precise BN, as ema.ckpt holds them after the last epoch
    ema = read_checkpoint(tmp_path / "val" / "ema.ckpt")
    for key, value in validator.seen[-1].items():
        np.testing.assert_array_equal(value, ema[key].asnumpy(), err_msg=key)
    # best.ckpt: the weights validated at the epoch with the highest AP in the log
    val_ap = read_series(tmp_path / "val" / "live", "val/AP")
    assert [s for s, _ in val_ap] == [8, 16, 24, 32]
    best_step = max(val_ap, key=lambda r: r[1])[0]
    best = read_checkpoint(tmp_path / "val" / "best.ckpt")
    assert checkpoint_meta(best, "step") == best_step == 16 and checkpoint_meta(best, "epoch") == 2
    assert checkpoint_meta(best, "AP") == 0.6 and summary.best["AP"] == 0.6
    for key, value in validator.seen[1].items():
        np.testing.assert_array_equal(best[key].asnumpy(), value, err_msg=key)
    val_series = {name: read_series(tmp_path / "val" / "live", name) for name in ("val/AP", "val/AP50")}
    latest = json.loads((tmp_path / "val" / "live" / "metrics.json").read_text())
    assert latest["val"] == {"AP": 0.5, "AP50": 0.6, "best_AP": 0.6, "best_epoch": 2}

    # interrupted after epoch 3 and resumed: the same best (kept in the resume state) and validation series.
    # (Only up to the resume point for the weights: a resume does not restore graph-mode drop-connect draws.)
    part, _ = fresh_trainer(tmp_path, dataclasses.replace(config, eval_every_epochs=1), sub="part",
                            validate=ScriptedValidator([0.2, 0.6, 0.4]), drop=0.3)
    part.fit(stop_after_epochs=3)
    resumed, _ = fresh_trainer(tmp_path, dataclasses.replace(config, eval_every_epochs=1), sub="part",
                               validate=ScriptedValidator([0.5]), drop=0.3)
    resumed.fit()
    resumed.write_final()
    assert (tmp_path / "part" / "best.ckpt").read_bytes() == (tmp_path / "val" / "best.ckpt").read_bytes()
    for name in ("val/AP", "val/AP50"):
        assert read_series(tmp_path / "part" / "live", name) == val_series[name]
    assert json.loads((tmp_path / "part" / "live" / "metrics.json").read_text())["val"] == latest["val"]


def test_validation_keeps_training_bit_identical_in_pynative_mode(tmp_path):
    """PyNative runs each op as called: the train/eval flag validation leaves behind reaches the next steps.
    (Without drop-connect: in PyNative mode random draws during validation do shift training's.)"""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        config = cfg(epochs=2, bn_recalibration_batches=1)
        plain, net_plain = fresh_trainer(tmp_path, config, sub="plain", live=False)
        plain.fit()
        checked, net_checked = fresh_trainer(tmp_path, dataclasses.replace(config, eval_every_epochs=1), sub="val",
                                             live=False, validate=ScriptedValidator([0.1, 0.2], rand=False))
        checked.fit()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    for a, b in zip(net_plain.get_parameters(), net_checked.get_parameters()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=a.name)
