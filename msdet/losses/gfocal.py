"""Generalized Focal Loss terms (Li et al. 2020) as NanoDet-Plus uses them; element-wise, unreduced.

Reduction (sum over positives/priors, division by the number of positives or by the summed quality
weights, loss weights) is the caller's: the detector's loss cell does it with static shapes.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops


def bce_with_logits(logits: Tensor, target: Tensor) -> Tensor:
    """Element-wise binary cross-entropy on logits, numerically stable: max(x,0) - x*t + log(1 + exp(-|x|))."""
    return ops.relu(logits) - logits * target + ops.log1p(ops.exp(-ops.abs(logits)))


def quality_focal_loss(logits: Tensor, labels: Tensor, scores: Tensor, beta: float = 2.0) -> Tensor:
    """QFL per prior: [N..., C] logits, labels [N...] (class index; any value outside 0..C-1 = negative),
    scores [N...] (IoU quality targets of positives) -> [N...] summed over classes.

    The target of the labelled class is its score, every other class has target 0; each term is the BCE
    scaled by |target - sigmoid|^beta (for a 0 target that is sigmoid^beta, as the official negatives).
    """
    num_classes = logits.shape[-1]
    classes = ops.arange(num_classes, dtype=ms.int32)
    onehot = (ops.expand_dims(labels.astype(ms.int32), -1) == classes).astype(logits.dtype)
    target = onehot * ops.expand_dims(scores.astype(logits.dtype), -1)
    return quality_focal_loss_dense(logits, target, beta)


def quality_focal_loss_dense(logits: Tensor, target: Tensor, beta: float = 2.0) -> Tensor:
    """QFL with a dense soft target [N..., C] (one-hot x IoU, zeros for negatives) -> [N...]."""
    sig = ops.sigmoid(logits)
    loss = bce_with_logits(logits, target) * ops.pow(ops.abs(target - sig), beta)
    return ops.sum(loss, dim=-1)


def distribution_focal_loss(logits: Tensor, label: Tensor) -> Tensor:
    """DFL: logits [N..., n + 1] of a distance distribution, label [N...] in [0, n) (bins) -> [N...].

    Cross-entropy towards the two bins around the target, weighted by the linear-interpolation weights.
    """
    n1 = logits.shape[-1]
    left = ops.floor(label)
    w_left = left + 1.0 - label
    w_right = label - left
    logp = ops.log_softmax(logits, axis=-1)
    bins = ops.arange(n1, dtype=ms.int32)
    left_i = ops.expand_dims(left.astype(ms.int32), -1)
    lp_left = ops.sum(logp * (left_i == bins).astype(logp.dtype), dim=-1)
    lp_right = ops.sum(logp * ((left_i + 1) == bins).astype(logp.dtype), dim=-1)
    return -(lp_left * w_left + lp_right * w_right)


__all__ = ["bce_with_logits", "quality_focal_loss", "quality_focal_loss_dense", "distribution_focal_loss"]
