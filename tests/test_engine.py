"""The shared training engine on a toy detector: schedule, EMA, loss going down, resume, NaN stop."""
from __future__ import annotations

import dataclasses

import mindspore as ms
import mindspore.dataset as mds
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from msdet.config import TrainConfig
from msdet.engine.batch_norm_stats import recalibrate_batch_norm
from msdet.engine.checkpoint import read_checkpoint
from msdet.engine.ema import EMA
from msdet.engine.schedules import warmup_cosine
from msdet.engine.trainer import TrainData, Trainer, TrainingDiverged

ms.set_context(mode=ms.GRAPH_MODE)
ms.set_device("CPU")


class ToyNet(nn.Cell):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, has_bias=False)
        self.bn = nn.BatchNorm2d(4, momentum=0.9)
        self.fc = nn.Dense(4, 4)
        self.scale = ms.Parameter(Tensor(1.0, ms.float32), name="scale")  # 0-d, like NanoDet's Scale

    def construct(self, x):
        x = ops.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(axis=(2, 3))) * self.scale


class ToyLoss(nn.Cell):
    """Regress the first GT box (scaled) from the image; a second component counts valid GT."""

    def __init__(self, net, scale=1.0):
        super().__init__()
        self.net = net
        self.scale = scale

    def construct(self, image, gt_boxes, gt_labels, epoch):
        pred = self.net(image)
        target = gt_boxes[:, 0, :] / 32.0
        mse = ((pred - target) ** 2).mean() * self.scale
        valid = (gt_labels >= 0).astype(ms.float32).sum()
        return mse, ops.stack([mse, mse * 0.0 + valid])


class ToyDetector:
    name = "toy"
    loss_names = ("loss", "valid")

    def __init__(self, scale=1.0):
        self.scale = scale

    def loss_cell(self, network, group_size=1):
        return ToyLoss(network, self.scale)


def toy_data(n=32, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 3, 16, 16)).astype(np.float32)
    boxes = np.zeros((n, 2, 4), np.float32)
    boxes[:, 0] = images[:, :, :4, :4].mean(axis=(1, 2))[:, :4] * 16 + 16  # learnable from pixels
    labels = np.full((n, 2), -1, np.int32)
    labels[:, 0] = 1

    def make(epoch):
        order = np.random.default_rng(seed * 1000 + epoch).permutation(n)
        ds = mds.NumpySlicesDataset((images[order], boxes[order], labels[order]),
                                    column_names=["image", "gt_boxes", "gt_labels"], shuffle=False)
        return ds.batch(batch, drop_remainder=True)

    return TrainData(make_dataset=make, num_train_images=n)


def cfg(**kw):
    base = dict(epochs=3, batch_size=4, optimizer="adamw", lr=0.01, lr_reference_batch=4, warmup_steps=2,
                weight_decay=0.0, grad_clip_norm=10.0, ema_decay=0.9, ema_ramp_steps=1.0)
    base.update(kw)
    return TrainConfig(**base)


def fresh_trainer(tmp_path, config, scale=1.0, sub="run"):
    ms.set_seed(0)
    net = ToyNet()
    return Trainer(ToyDetector(scale), net, config, toy_data(), tmp_path / sub, progress=False,
                   key_payload=dataclasses.asdict(config)), net


def test_warmup_cosine_shape_and_values():
    c = TrainConfig(epochs=2, lr=0.1, lr_reference_batch=8, warmup_steps=5, warmup_ratio=0.1, min_lr_ratio=0.01)
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


def test_loss_goes_down_and_outputs(tmp_path):
    trainer, net = fresh_trainer(tmp_path, cfg(epochs=4))
    summary = trainer.fit()
    trainer.write_final(tmp_path / "plots.csv")
    lines = (tmp_path / "plots.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,lr,loss,valid"
    losses = [float(line.split(",")[3]) for line in lines[1:]]
    assert len(losses) == 4 * 8 == summary.steps
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert float(lines[1].split(",")[4]) == 4.0  # 4 images x 1 valid GT each
    ema_params = read_checkpoint(tmp_path / "run" / "ema.ckpt")
    assert set(ema_params) >= {p.name for p in net.get_parameters()}


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
    assert (tmp_path / "full" / "state" / "train_log.csv").read_text() == \
        (tmp_path / "part" / "state" / "train_log.csv").read_text()


def test_changed_params_start_fresh(tmp_path):
    first, _ = fresh_trainer(tmp_path, cfg(), sub="x")
    first.fit(stop_after_epochs=1)
    second, _ = fresh_trainer(tmp_path, cfg(lr=0.02), sub="x")
    assert second.fit().resumed_from_epoch == 0


def test_nan_loss_stops_with_step_and_no_checkpoint(tmp_path):
    trainer, _ = fresh_trainer(tmp_path, cfg(), scale=float("nan"))
    with pytest.raises(TrainingDiverged, match=r"epoch 1, step 1 "):
        trainer.fit()
    assert not (tmp_path / "run" / "state" / "last.ckpt").exists()


def test_adamw_matches_torch_formula():
    from msdet.engine.optim import AdamW

    w0 = np.array([[0.5, -1.0], [2.0, 0.1]], np.float32)
    s0 = np.float32(0.7)
    weight = ms.Parameter(Tensor(w0), name="w")
    scale = ms.Parameter(Tensor(s0), name="s")  # 0-d, like NanoDet's Scale
    lrs = np.array([0.1, 0.05, 0.02], np.float32)
    opt = AdamW([{"params": [weight], "weight_decay": 0.05}, {"params": [scale], "weight_decay": 0.0}], lrs)
    grads = [np.array([[0.3, -0.2], [0.0, 1.0]], np.float32), np.float32(-0.4)]
    ref = [w0.astype(np.float64), np.float64(s0)]
    m = [np.zeros_like(r) for r in ref]
    v = [np.zeros_like(r) for r in ref]
    for t in range(1, 5):  # one step past the schedule: the last lr is kept
        opt((Tensor(grads[0]), Tensor(grads[1])))
        lr = lrs[min(t - 1, 2)]
        for i, wd in enumerate((0.05, 0.0)):
            m[i] = 0.9 * m[i] + 0.1 * grads[i]
            v[i] = 0.999 * v[i] + 0.001 * grads[i] ** 2
            ref[i] = ref[i] * (1 - lr * wd) - lr * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
    np.testing.assert_allclose(weight.asnumpy(), ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale.asnumpy(), ref[1], rtol=1e-5, atol=1e-6)
    assert int(opt.global_step.asnumpy()) == 4


def test_clip_grad_norm_keeps_shapes_and_scales():
    from msdet.engine.optim import clip_grad_norm

    grads = (Tensor(np.array([3.0, 0.0], np.float32)), Tensor(np.float32(4.0)))
    def clip_to_one(g):
        return clip_grad_norm(g, 1.0)

    def clip_to_ten(g):
        return clip_grad_norm(g, 10.0)

    clipped = ms.jit(clip_to_one)(grads)
    assert clipped[1].shape == ()
    np.testing.assert_allclose(clipped[0].asnumpy(), [0.6, 0.0], rtol=1e-5)
    np.testing.assert_allclose(clipped[1].asnumpy(), 0.8, rtol=1e-5)
    same = ms.jit(clip_to_ten)(grads)
    np.testing.assert_allclose(same[0].asnumpy(), [3.0, 0.0], rtol=1e-6)


def test_recalibrate_batch_norm_sets_mean_of_batch_statistics():
    ms.set_seed(0)
    net = ToyNet()
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
