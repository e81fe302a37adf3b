"""Dynamic soft-label assignment (NanoDet-Plus), batched over padded ground truth with static shapes.

Per image, following the official ``DynamicSoftLabelAssigner.assign``:
  * candidates ("valid" priors) are the priors whose point lies strictly inside at least one GT box;
  * for every candidate and every GT: IoU of the predicted box with the GT, and the cost
    ``sum_c BCE(logit_c, onehot_c * IoU) * |onehot_c * IoU - sigmoid(logit_c)|^2 + iou_factor * -log(IoU + 1e-7)``
    (a candidate is costed against every GT, also GTs it is not inside - as the official);
  * dynamic k per GT = max(1, int(sum of its ``topk`` largest candidate IoUs)); each GT takes its k
    cheapest candidates;
  * a candidate taken by several GTs goes to the GT of minimum cost over all GTs.
Images without GT, or without candidates, get no positives. Padded GTs (label < 0) never take part.

The per-pair class cost is computed without a [P, M, C] tensor: the soft label is zero except at the GT's
class, so the sum over classes is the all-negative sum minus the GT-class negative term plus its positive term.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from msdet.losses.gfocal import bce_with_logits
from msdet.ops.iou import box_iou

#: cost of pairs that cannot match (padded GT, prior outside every GT)
INF = 1.0e8


class DynamicSoftLabelAssigner(nn.Cell):
    """construct(cls_logits [B,P,C], priors [P,4], boxes [B,P,4], gt_boxes [B,M,4], gt_labels [B,M]) ->
    (assigned_gt int32 [B,P] (-1 = negative), assigned_iou float32 [B,P] (0 for negatives),
    matching float32 [B,P,M] (one-hot rows of positives, zero rows of negatives))."""

    def __init__(self, topk: int = 13, iou_factor: float = 3.0) -> None:
        super().__init__()
        self.topk = int(topk)
        self.iou_factor = float(iou_factor)
        self.bmm_t = ops.BatchMatMul(transpose_b=True)

    def construct(self, cls_logits: Tensor, priors: Tensor, boxes: Tensor, gt_boxes: Tensor,
                  gt_labels: Tensor) -> tuple:
        cls_logits = ops.stop_gradient(cls_logits.astype(ms.float32))
        boxes = ops.stop_gradient(boxes.astype(ms.float32))
        gt_boxes = gt_boxes.astype(ms.float32)
        num_priors = boxes.shape[1]
        num_gt = gt_boxes.shape[1]
        num_classes = cls_logits.shape[2]

        gt_valid = gt_labels >= 0                                                     # [B, M]
        px = ops.reshape(priors[:, 0], (1, -1, 1))
        py = ops.reshape(priors[:, 1], (1, -1, 1))
        gx1 = ops.expand_dims(gt_boxes[..., 0], 1)
        gy1 = ops.expand_dims(gt_boxes[..., 1], 1)
        gx2 = ops.expand_dims(gt_boxes[..., 2], 1)
        gy2 = ops.expand_dims(gt_boxes[..., 3], 1)
        deltas_min = ops.minimum(ops.minimum(px - gx1, py - gy1), ops.minimum(gx2 - px, gy2 - py))
        in_gt = ops.logical_and(deltas_min > 0, ops.expand_dims(gt_valid, 1))         # [B, P, M]
        prior_valid = ops.any(in_gt, 2)                                        # [B, P]
        pair_valid = ops.logical_and(ops.expand_dims(prior_valid, 2), ops.expand_dims(gt_valid, 1))
        pair_f = pair_valid.astype(ms.float32)

        ious = box_iou(boxes, gt_boxes, 1e-6)                                         # [B, P, M]
        iou_cost = -ops.log(ious + 1e-7)

        classes = ops.arange(num_classes, dtype=ms.int32)
        gt_onehot = (ops.expand_dims(gt_labels.astype(ms.int32), -1) == classes).astype(ms.float32)  # [B, M, C]
        sig = ops.sigmoid(cls_logits)
        neg_all = ops.sum(bce_with_logits(cls_logits, ops.zeros_like(cls_logits)) * sig * sig, dim=-1)  # [B, P]
        x_pg = self.bmm_t(cls_logits, gt_onehot)                                      # logit of the GT class
        s_pg = ops.sigmoid(x_pg)
        neg_pg = bce_with_logits(x_pg, ops.zeros_like(x_pg)) * s_pg * s_pg
        pos_pg = bce_with_logits(x_pg, ious) * ops.square(ious - s_pg)
        cls_cost = ops.expand_dims(neg_all, 2) - neg_pg + pos_pg
        cost = cls_cost + iou_cost * self.iou_factor
        cost = ops.where(pair_valid, cost, ops.full_like(cost, INF))

        # dynamic k from the top-k candidate IoUs of every GT
        k = min(self.topk, num_priors)
        ious_t = ops.transpose(ious * pair_f, (0, 2, 1))                              # [B, M, P]
        top_ious, _ = ops.topk(ious_t, k)
        dynamic_k = ops.clamp(ops.floor(ops.sum(top_ious, dim=-1)), min=1.0).astype(ms.int32)  # [B, M]
        neg_sorted, _ = ops.topk(-ops.transpose(cost, (0, 2, 1)), k)                  # ascending costs
        kth = -ops.gather_elements(neg_sorted, 2, ops.expand_dims(dynamic_k - 1, -1))  # [B, M, 1]
        matching = ops.logical_and(cost <= ops.transpose(kth, (0, 2, 1)), pair_valid).astype(ms.float32)

        # priors taken by several GTs go to their cheapest GT
        count = ops.sum(matching, dim=-1)                                             # [B, P]
        cheapest = ops.argmin(cost, -1).astype(ms.int32)
        gt_index = ops.arange(num_gt, dtype=ms.int32)
        best = (ops.expand_dims(cheapest, -1) == gt_index).astype(ms.float32)
        matching = ops.where(ops.expand_dims(count > 1.0, -1), best, matching)

        positive = count > 0.0
        assigned_gt = ops.where(positive, ops.argmax(matching, -1).astype(ms.int32),
                                ops.full_like(cheapest, -1))
        assigned_iou = ops.sum(matching * ious, dim=-1)
        return assigned_gt, assigned_iou, matching


__all__ = ["DynamicSoftLabelAssigner", "INF"]
