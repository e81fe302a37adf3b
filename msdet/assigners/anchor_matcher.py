"""EfficientDet anchor matching (automl ArgMaxMatcher with force_match_for_each_row), vectorised in graph.

For every anchor, the GT of highest IoU: IoU >= ``pos_iou`` positive, < ``neg_iou`` negative, in between
ignored (none with ``neg_iou == pos_iou``, automl's 0.5). Then every valid GT also claims its best anchor
(force match) - that anchor becomes positive for that GT even below ``pos_iou`` (when GTs share a best
anchor, the lowest GT index wins, as automl's argmax). A GT whose best IoU is 0 (degenerate box) forces nothing.
Padding GTs (label < 0) never match.
All shapes static: ``gt_boxes [B, M, 4]``, ``gt_labels [B, M]``, anchors ``[A, 4]``.

Two formulations, same matches: on CPU the IoU spells its broadcast out (MindSpore's CPU Minimum/Maximum are
slow when they broadcast) and the force match is a one-hot [B, M, A]; elsewhere ("lean") neither: at COCO
size (16 x 49104 anchors x 100 GTs) those are eight 314 MB coordinate copies and two 314 MB one-hots per step.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, nn, ops

from msdet.ops.iou import box_iou


class AnchorMatcher(nn.Cell):
    """(anchors, gt_boxes, gt_labels) -> (matched_boxes [B, A, 4], matched_labels [B, A] int32 (-1 unless
    positive), positive [B, A] bool, negative [B, A] bool). Anchors neither positive nor negative are ignored.
    """

    def __init__(self, pos_iou: float = 0.5, neg_iou: float = 0.5, force_match: bool = True,
                 lean: bool | None = None) -> None:
        """``lean``: the formulation without [B, A, M] broadcast copies and [B, M, A] one-hots; None: lean
        unless the device target is CPU."""
        super().__init__()
        if neg_iou > pos_iou:
            raise ValueError(f"AnchorMatcher: neg_iou ({neg_iou}) must not exceed pos_iou ({pos_iou})")
        self.pos_iou = pos_iou
        self.neg_iou = neg_iou
        self.force_match = force_match
        self.lean = ms.get_context("device_target") != "CPU" if lean is None else lean

    def construct(self, anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple:
        num_gt = gt_boxes.shape[1]
        num_anchors = anchors.shape[0]
        valid = gt_labels >= 0                                                   # [B, M]
        iou = box_iou(ops.expand_dims(anchors, 0), gt_boxes, broadcast_first=not self.lean)  # [B, A, M]
        iou = ops.where(ops.expand_dims(valid, 1), iou, ops.full_like(iou, -1.0))
        max_iou = ops.max(iou, axis=2)[0]                                        # [B, A]
        best_gt = ops.argmax(iou, dim=2).astype(ms.int32)                        # [B, A]
        positive = max_iou >= self.pos_iou
        negative = max_iou < self.neg_iou
        if self.force_match:
            gt_best_iou = ops.max(iou, axis=1)[0]                                # [B, M]
            gt_best_anchor = ops.argmax(iou, dim=1).astype(ms.int32)             # [B, M]
            forces = ops.logical_and(valid, gt_best_iou > 0)
            if self.lean:
                forced_gt = self._first_claims(gt_best_anchor, forces, num_anchors)
                forced = forced_gt >= 0
            else:
                claim = ops.one_hot(gt_best_anchor, num_anchors, Tensor(1.0, ms.float32), Tensor(0.0, ms.float32))
                claim = claim * ops.expand_dims(forces.astype(ms.float32), -1)  # [B, M, A]
                forced = ops.max(claim, axis=1)[0] > 0                           # [B, A]
                forced_gt = ops.argmax(claim, dim=1).astype(ms.int32)            # first claiming GT
            best_gt = ops.where(forced, forced_gt, best_gt)
            positive = ops.logical_or(positive, forced)
            negative = ops.logical_and(negative, ops.logical_not(forced))
        idx = ops.clamp(best_gt, 0, num_gt - 1)
        matched_boxes = ops.gather_elements(gt_boxes, 1, ops.broadcast_to(ops.expand_dims(idx, -1),
                                                                          (idx.shape[0], idx.shape[1], 4)))
        matched_labels = ops.gather_elements(gt_labels.astype(ms.int32), 1, idx)
        matched_labels = ops.where(positive, matched_labels, ops.full_like(matched_labels, -1))
        return (ops.stop_gradient(matched_boxes), ops.stop_gradient(matched_labels),
                ops.stop_gradient(positive), ops.stop_gradient(negative))

    def _first_claims(self, best_anchor: Tensor, forces: Tensor, num_anchors: int) -> Tensor:
        """[B, A] int32: the lowest forcing GT index that claims each anchor, -1 where none does, by a scatter
        over [B, M] instead of a [B, M, A] one-hot. A GT whose anchor a lower forcing GT claims writes into a
        spare column instead, so the scattered indices are unique."""
        batch, num_gt = best_anchor.shape
        gt = ops.arange(num_gt, dtype=ms.int32)
        earlier = ops.expand_dims(gt, 0) < ops.expand_dims(gt, 1)                # [m, m'] = m' < m
        shared = ops.expand_dims(best_anchor, 2) == ops.expand_dims(best_anchor, 1)  # [B, M, M]
        taken = ops.logical_and(ops.logical_and(shared, ops.expand_dims(earlier, 0)), ops.expand_dims(forces, 1))
        wins = ops.logical_and(forces, ops.logical_not(ops.any(taken, axis=2)))
        target = ops.where(wins, best_anchor, ops.full_like(best_anchor, num_anchors))
        claims = ops.full((batch, num_anchors + 1), -1, dtype=ms.int32)
        claims = ops.tensor_scatter_elements(claims, target, ops.broadcast_to(gt, (batch, num_gt)), axis=1)
        return claims[:, :num_anchors]
