"""NanoDet-Plus-m training in graph mode: the loss goes down, and the AGM detach switches at detach_epoch."""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn, ops

from msdet.detectors.nanodet import NanoDetDetector
from tests.helpers import config

pytestmark = pytest.mark.detector  # every test here builds a whole detector

SIZE = 128
DETACH_EPOCH = 3


@pytest.fixture(scope="module")
def seeded():
    ms.set_seed(0)


class WeightedLoss(nn.Cell):
    """sum(weights * components): all losses, or the main or aux ones only."""

    def __init__(self, loss_cell):
        super().__init__(auto_prefix=False)
        self.loss_cell = loss_cell

    def construct(self, image, gt_boxes, gt_labels, epoch, weights):
        _, parts = self.loss_cell(image, gt_boxes, gt_labels, epoch)
        return ops.sum(parts[1:] * weights), parts


class GradCell(nn.Cell):
    # a Cell rather than ms.jit of a closure: a jitted closure would not see Parameter.set_data afterwards
    def __init__(self, loss, params):
        super().__init__(auto_prefix=False)
        self.loss = loss
        self.grad = ms.value_and_grad(loss, None, params, has_aux=True)

    def construct(self, image, gt_boxes, gt_labels, epoch, weights):
        return self.grad(image, gt_boxes, gt_labels, epoch, weights)


@pytest.fixture(scope="module")
def setup(seeded):
    """One compiled graph: weighted loss components and their gradients, shared by every test."""
    det = NanoDetDetector(config("nanodet", input_size=SIZE, detach_epoch=DETACH_EPOCH), 3)
    net = det.build_network()
    net.set_train(True)
    params = net.trainable_params()
    grad_fn = GradCell(WeightedLoss(det.loss_cell(net)), params)
    rng = np.random.default_rng(0)
    image = Tensor(rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32))
    gt_boxes = np.zeros((2, 4, 4), np.float32)
    gt_labels = -np.ones((2, 4), np.int32)
    gt_boxes[0, :2], gt_labels[0, :2] = [[10, 12, 60, 80], [50, 40, 120, 100]], [1, 2]
    gt_boxes[1, :1], gt_labels[1, :1] = [[20, 30, 110, 120]], [0]
    batch = (image, Tensor(gt_boxes), Tensor(gt_labels))
    return det, net, params, grad_fn, batch


ALL = Tensor(np.ones(6, np.float32))
AUX_ONLY = Tensor(np.array([0, 0, 0, 1, 1, 1], np.float32))


def test_loss_components_and_steps_lower_the_loss(setup):
    det, net, params, grad_fn, batch = setup
    assert det.loss_names == ("loss", "qfl", "bbox", "dfl", "aux_qfl", "aux_bbox", "aux_dfl")
    # The total first rises: the AGM head learns faster than the main head and raises the IoU targets
    # of the main QFL; within ~20 Adam steps both heads fit this batch.
    opt = nn.Adam(params, learning_rate=2e-3)
    epoch = Tensor(0, ms.int32)
    snapshot = [p.asnumpy().copy() for p in net.get_parameters()]
    losses = []
    for _ in range(22):
        (loss, parts), grads = grad_fn(*batch, epoch, ALL)
        opt(grads)
        losses.append(float(loss.asnumpy()))
        parts = parts.asnumpy()
        assert np.isfinite(parts).all() and parts[0] == pytest.approx(parts[1:].sum(), rel=1e-5)
        assert parts[2] > 0 and parts[3] > 0  # there are positives: box losses are active
    assert np.mean(losses[-3:]) < losses[0] * 0.75, losses
    for p, v in zip(net.get_parameters(), snapshot):
        p.set_data(Tensor(v))


def _grad_of(params, grads, name):
    return next(g.asnumpy() for p, g in zip(params, grads) if p.name == name)


def test_detach_stops_aux_gradients_at_detach_epoch(setup):
    _, _, params, grad_fn, batch = setup
    backbone = "backbone.stage2.0.branch2.0.weight"
    neck = "fpn.reduce_layers.0.conv.weight"
    aux_neck = "aux_fpn.reduce_layers.0.conv.weight"
    for epoch in (0, DETACH_EPOCH - 1):
        (_, _), grads = grad_fn(*batch, Tensor(epoch, ms.int32), AUX_ONLY)
        assert np.abs(_grad_of(params, grads, backbone)).max() > 0
        assert np.abs(_grad_of(params, grads, neck)).max() > 0
    for epoch in (DETACH_EPOCH, DETACH_EPOCH + 5):
        (_, parts), grads = grad_fn(*batch, Tensor(epoch, ms.int32), AUX_ONLY)
        assert np.all(_grad_of(params, grads, backbone) == 0)
        assert np.all(_grad_of(params, grads, neck) == 0)
        assert np.abs(_grad_of(params, grads, aux_neck)).max() > 0  # the AGM itself keeps learning
        assert parts.asnumpy()[4] > 0
    # the main losses never reach the AGM
    (_, _), grads = grad_fn(*batch, Tensor(0, ms.int32), Tensor(np.array([1, 1, 1, 0, 0, 0], np.float32)))
    assert np.all(_grad_of(params, grads, "aux_head.gfl_cls.weight") == 0)
    assert np.abs(_grad_of(params, grads, backbone)).max() > 0
