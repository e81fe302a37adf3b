"""GIoU loss (Rezatofighi et al. 2019) for x1y1x2y2 boxes, element-wise, as NanoDet's ``giou_loss``."""
from __future__ import annotations

from mindspore import Tensor

from msdet.ops.iou import aligned_giou


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - GIoU of matching pairs ``[..., 4] x [..., 4] -> [...]``; union and enclosing area clamped at ``eps``."""
    return 1.0 - aligned_giou(pred, target, eps)


__all__ = ["giou_loss"]
