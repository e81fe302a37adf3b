"""Gradient accumulation: k micro-batches, one optimizer step, as one batch k times larger would take it.

The detection losses divide a sum over the batch by a count made from the batch (D0: positive anchors;
NanoDet: positives averaged over the ranks). One big batch divides the summed gradient by the count of the
whole batch, max(1, sum_j n_j); micro-batch j's loss divides by max(1, n_j). So each micro-batch gradient is
multiplied back by max(1, n_j) (giving the gradient of its un-normalised sum), the products and the raw
counts are summed in buffers, and the step divides by max(1, sum_j n_j): exactly the big batch's gradient
for every term normalised by that count. A loss cell announces the count by having a ``return_normaliser``
attribute (it then returns ``(total, parts, count)``); a loss without one is a batch mean and gets n_j = 1,
so its micro-gradients are averaged.

What does not follow the big batch: BatchNorm normalises each micro-batch with its own statistics (and
updates its running averages k times per step); NanoDet's GIoU/DFL terms divide by a second count (the sum
of the positives' scores), replaced here by the positives count's ratio, which is exact when the positives'
mean score is the same in every micro-batch; random ops (D0's drop connect) draw per micro-batch.
The all-reduce across ranks, clipping, the optimizer and the EMA run once per step, on the summed gradient.
With mixed precision, the loss scale is the same for all micro-batches of a step, each micro-gradient is
unscaled before it is added, and the finite check and the scale update run once per step, on the sum.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from msdet.engine.ema import EMA
from msdet.engine.optim import SquareSum, clip_factor
from msdet.engine.precision import LossScaling, ScaledLoss

_add_scaled = ops.MultitypeFuncGraph("add_scaled")
_scaled = ops.MultitypeFuncGraph("scaled")
_zero = ops.MultitypeFuncGraph("zero")


@_add_scaled.register("Tensor", "Tensor", "Tensor")
def _add_scaled_one(factor: Tensor, buffer: Parameter, grad: Tensor) -> Tensor:
    return ops.assign_add(buffer, grad.astype(buffer.dtype) * factor)


@_scaled.register("Tensor", "Tensor")
def _scaled_one(factor: Tensor, buffer: Parameter) -> Tensor:
    return buffer * factor


@_zero.register("Tensor")
def _zero_one(buffer: Parameter) -> Tensor:
    return ops.assign(buffer, ops.zeros_like(buffer))


class MicroStep(nn.Cell):
    """Forward + backward of one micro-batch; adds max(1, n) x gradients and n to the buffers."""

    def __init__(self, loss_cell: nn.Cell, parameters: ParameterTuple, scaling: LossScaling | None = None) -> None:
        """``scaling``: mixed precision; the gradients of loss x scale are divided by the scale before they are
        added (a non-finite one makes the sum non-finite, and the step is skipped)."""
        super().__init__(auto_prefix=False)
        self.with_count = hasattr(loss_cell, "return_normaliser")
        if self.with_count:
            loss_cell.return_normaliser = True
        self.scaled = scaling is not None
        self.scaling = scaling
        differentiated = ScaledLoss(loss_cell, scaling) if self.scaled else loss_cell
        self.grad_fn = ms.value_and_grad(differentiated, None, parameters, has_aux=True)
        self.buffers = ParameterTuple(parameters).clone(prefix="accumulated", init="zeros")
        self.count = Parameter(Tensor(0.0, ms.float32), name="accumulated_count", requires_grad=False)
        self.hyper_map = ops.HyperMap()

    def construct(self, image, gt_boxes, gt_labels, epoch):
        if self.with_count:
            (loss, parts, count), grads = self.grad_fn(image, gt_boxes, gt_labels, epoch)
        else:
            (loss, parts), grads = self.grad_fn(image, gt_boxes, gt_labels, epoch)
            count = ops.ones((), ms.float32)
        if self.scaled:
            grads = self.scaling.unscale(grads)
        count = ops.stop_gradient(count.astype(ms.float32))
        weight = ops.clamp(count, min=1.0)
        added = self.hyper_map(ops.partial(_add_scaled, weight), self.buffers, grads)
        parts = ops.depend(parts, added)
        parts = ops.depend(parts, ops.assign_add(self.count, count))
        return parts, count


class ApplyStep(nn.Cell):
    """Summed gradients / max(1, summed count) -> all-reduce -> clip -> optimizer -> EMA; buffers zeroed."""

    def __init__(self, micro: MicroStep, optimizer: nn.Cell, ema: EMA, reducer: nn.Cell | None,
                 clip_norm: float) -> None:
        super().__init__(auto_prefix=False)
        self.buffers, self.count = micro.buffers, micro.count
        self.optimizer, self.ema, self.reducer = optimizer, ema, reducer
        self.use_reducer = reducer is not None
        self.clip_norm = float(clip_norm)
        self.square_sum = SquareSum()
        self.hyper_map = ops.HyperMap()

    def construct(self, step):
        scale = 1.0 / ops.clamp(self.count, min=1.0)
        grads = self.hyper_map(ops.partial(_scaled, scale), self.buffers)
        if self.use_reducer:
            grads = self.reducer(grads)
        done = self.optimizer(grads, clip_factor(grads, self.clip_norm, self.square_sum))
        done = ops.depend(done, self.ema(ops.depend(step, done)))
        zeroed = ops.depend(self.hyper_map(_zero, self.buffers), done)
        return ops.depend(ops.assign(self.count, ops.zeros_like(self.count)), zeroed)


class ScaledApplyStep(ApplyStep):
    """ApplyStep with dynamic loss scaling: when the summed gradients are not finite on some rank, no weight,
    optimizer moment or EMA changes on any rank and the scale goes down; the buffers are zeroed either way."""

    def __init__(self, micro: MicroStep, optimizer: nn.Cell, ema: EMA, reducer: nn.Cell | None,
                 clip_norm: float, scaling: LossScaling) -> None:
        super().__init__(micro, optimizer, ema, reducer, clip_norm)
        self.scaling = scaling

    def construct(self, step):
        scale = 1.0 / ops.clamp(self.count, min=1.0)
        grads = self.hyper_map(ops.partial(_scaled, scale), self.buffers)
        finite = self.scaling.finite(grads)
        if self.use_reducer:
            grads = self.reducer(grads)
        done = self.scaling.update(finite)
        if finite:
            updated = self.optimizer(grads, clip_factor(grads, self.clip_norm, self.square_sum))
            done = ops.depend(done, self.ema(ops.depend(step, updated)))
        zeroed = ops.depend(self.hyper_map(_zero, self.buffers), done)
        return ops.depend(ops.assign(self.count, ops.zeros_like(self.count)), zeroed)


class AccumulatingStep:
    """Drop-in for TrainStep over a list of micro-batches: ``step(batches, epoch, step) -> (loss, parts)``.

    The reported parts are the micro-batches' parts weighted by max(1, n_j) / max(1, sum n): for terms
    normalised by the count that is the big batch's value.
    """

    def __init__(self, loss_cell: nn.Cell, optimizer: nn.Cell, ema: EMA, reducer: nn.Cell | None,
                 clip_norm: float, scaling: LossScaling | None = None) -> None:
        self.micro = MicroStep(loss_cell, optimizer.parameters, scaling)
        if scaling is None:
            self.apply = ApplyStep(self.micro, optimizer, ema, reducer, clip_norm)
        else:
            self.apply = ScaledApplyStep(self.micro, optimizer, ema, reducer, clip_norm, scaling)

    def __call__(self, batches: list, epoch: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
        """The weighting runs on the device, so the host does not wait for the micro-steps."""
        parts_list, counts = [], []
        for image, gt_boxes, gt_labels in batches:
            parts, count = self.micro(image, gt_boxes, gt_labels, epoch)
            parts_list.append(parts)
            counts.append(count)
        self.apply(step)
        counts = ops.stack(counts)
        weights = ops.clamp(counts, min=1.0) / ops.clamp(counts.sum(), min=1.0)
        parts = (weights[:, None] * ops.stack(parts_list)).sum(axis=0)
        return parts[0], parts
