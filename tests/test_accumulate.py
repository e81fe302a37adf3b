"""Gradient accumulation: batch 8 x 1 step == batch 4 x 2 micro-steps, loss normalisers over the whole batch."""
from __future__ import annotations

import dataclasses

import mindspore as ms
import mindspore.dataset as mds
import numpy as np
import pytest
from mindspore import nn, ops

from msdet.engine.trainer import TrainData, Trainer
from tests.helpers import ToyNet, cfg

ms.set_device("CPU")


class PlainNet(nn.Cell):
    """ToyNet without BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, has_bias=True)
        self.fc = nn.Dense(4, 8)

    def construct(self, x):
        return self.fc(ops.relu(self.conv(x)).mean(axis=(2, 3)))


class CountNormalisedLoss(nn.Cell):
    """Squared error of every valid GT box against the image's two predicted boxes, summed over the batch and
    divided by max(1, valid GT in the batch): a detection-style normaliser that differs between micro-batches."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.return_normaliser = False

    def construct(self, image, gt_boxes, gt_labels, epoch):
        pred = self.net(image).reshape(-1, 2, 4)
        valid = (gt_labels >= 0).astype(ms.float32)
        count = valid.sum()
        err = (((pred - gt_boxes / 32.0) ** 2).sum(-1) * valid).sum()
        loss = err / ops.clamp(count, min=1.0)
        if self.return_normaliser:
            return loss, ops.stack([loss, count]), count
        return loss, ops.stack([loss, count])


class MeanLoss(nn.Cell):
    """A plain batch mean (no normaliser attribute): accumulation averages its micro-gradients."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def construct(self, image, gt_boxes, gt_labels, epoch):
        pred = self.net(image)[:, :4]
        loss = ((pred - gt_boxes[:, 0] / 32.0) ** 2).mean()
        return loss, ops.stack([loss, loss])


class Detector:
    name = "toy"
    loss_names = ("loss", "count")

    def __init__(self, loss_type):
        self.loss_type = loss_type

    def loss_cell(self, network, group_size=1):
        return self.loss_type(network)


def uneven_data(n=24, batch=4, seed=3):
    """Images with 0, 1 or 2 valid GT boxes: the micro-batches' counts differ."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 3, 16, 16)).astype(np.float32)
    boxes = rng.uniform(0, 32, size=(n, 2, 4)).astype(np.float32)
    labels = np.full((n, 2), -1, np.int32)
    counts = np.array([2, 0, 1, 2, 2, 2, 1, 0] * (n // 8))
    for i, c in enumerate(counts):
        labels[i, :c] = 1

    def make(epoch, skip=0):
        order = np.random.default_rng(epoch).permutation(n)[skip * batch:]
        ds = mds.NumpySlicesDataset((images[order], boxes[order], labels[order]),
                                    column_names=["image", "gt_boxes", "gt_labels"], shuffle=False)
        return ds.batch(batch, drop_remainder=True)

    return TrainData(make_dataset=make, num_train_images=n, make_dataset_from=make)


def train(tmp_path, net_type, loss_type, batch, accumulate, sub, **kw):
    config = cfg(epochs=1, batch_size=batch, accumulate_steps=accumulate, lr_reference_batch=8, warmup_steps=2,
                 grad_clip_norm=kw.pop("grad_clip_norm", 10.0), **kw)
    ms.set_seed(0)
    net = net_type()
    trainer = Trainer(Detector(loss_type), net, config, uneven_data(batch=batch), tmp_path / sub, progress=False,
                      key_payload=dataclasses.asdict(config))
    summary = trainer.fit()
    return trainer, net, summary


@pytest.mark.parametrize("loss_type,optimizer,clip", [(CountNormalisedLoss, "adamw", 10.0),
                                                      (CountNormalisedLoss, "sgd", 0.5),
                                                      (MeanLoss, "sgd", 10.0)])
def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, loss_type, optimizer, clip):
    big, net_big, s_big = train(tmp_path, PlainNet, loss_type, 8, 1, "big", optimizer=optimizer, grad_clip_norm=clip)
    acc, net_acc, s_acc = train(tmp_path, PlainNet, loss_type, 4, 2, "acc", optimizer=optimizer, grad_clip_norm=clip)
    assert s_big.steps == s_acc.steps == 3 and s_big.global_batch == s_acc.global_batch == 8
    np.testing.assert_array_equal(big.lr, acc.lr)  # the schedule follows the effective batch
    ms.set_seed(0)
    w0 = [p.asnumpy() for p in PlainNet().get_parameters()]
    for a, b, start in zip(net_big.get_parameters(), net_acc.get_parameters(), w0):
        assert not np.allclose(a.asnumpy(), start), a.name  # it trained
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=2e-5, atol=1e-6, err_msg=a.name)
    for a, b in zip(big.ema.shadows, acc.ema.shadows):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=2e-5, atol=1e-6, err_msg=a.name)
    # the logged step losses are the big batch's too
    assert s_acc.final_losses["loss"] == pytest.approx(s_big.final_losses["loss"], rel=1e-5)


def test_with_batch_norm_the_difference_is_bounded(tmp_path):
    """BN normalises each micro-batch with its own statistics, so accumulation is not the big batch; on this
    toy (conv -> BN -> dense, SGD) the weights after 3 steps differ by ~1 % of how far they moved (L2 over all
    trainable weights; the figure the README quotes)."""
    _, net_big, _ = train(tmp_path, ToyNet, MeanLoss, 8, 1, "big", optimizer="sgd", lr=0.05)
    _, net_acc, _ = train(tmp_path, ToyNet, MeanLoss, 4, 2, "acc", optimizer="sgd", lr=0.05)
    ms.set_seed(0)
    w0 = [p.asnumpy() for p in ToyNet().get_parameters()]
    diff = moved = 0.0
    for a, b, start in zip(net_big.get_parameters(), net_acc.get_parameters(), w0):
        if "moving" not in a.name:
            diff += float(((a.asnumpy() - b.asnumpy()) ** 2).sum())
            moved += float(((a.asnumpy() - start) ** 2).sum())
    ratio = np.sqrt(diff / moved)
    assert 1e-3 < ratio < 0.05, ratio  # BN does see other batches, and the result stays close
