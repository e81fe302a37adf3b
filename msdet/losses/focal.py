"""Sigmoid focal loss and Huber loss (automl EfficientDet), element-wise; callers mask, sum and normalise."""
from __future__ import annotations

from mindspore import Tensor, ops


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss of ``logits`` against 0/1 ``targets`` (same shape), automl ``FocalLoss``.

    ``alpha_t * (1 - p_t)^gamma * BCE``, the cross entropy in the stable log-sigmoid form.
    """
    p = ops.sigmoid(logits)
    p_t = targets * p + (1.0 - targets) * (1.0 - p)
    alpha_t = targets * alpha + (1.0 - targets) * (1.0 - alpha)
    ce = ops.relu(logits) - logits * targets + ops.log1p(ops.exp(-ops.abs(logits)))
    return alpha_t * ops.pow(1.0 - p_t, gamma) * ce


def huber_loss(pred: Tensor, target: Tensor, delta: float = 0.1) -> Tensor:
    """Element-wise Huber (TF ``tf.keras.losses.Huber``): 0.5 x^2 if |x| <= delta else delta (|x| - delta / 2)."""
    err = ops.abs(pred - target)
    quad = ops.minimum(err, delta)
    return 0.5 * quad * quad + delta * (err - quad)
