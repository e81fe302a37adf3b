"""NanoDet-Plus-m behind the Detector interface: network, in-graph dynamic soft-label assignment and GFL losses,
decoding (official names and ImageNet backbone loading live in ``msdet.conversion``).

Loss (official ``NanoDetPlusHead.loss`` with aux predictions), per head (main and aux), on ONE assignment made
by the DynamicSoftLabelAssigner from the aux head's detached predictions:
  qfl  = qfl_weight  * sum over priors and classes of QFL(logits, onehot x IoU) / max(1, N)
  bbox = giou_weight * sum_pos w * GIoU loss(decoded box, GT) / max(1, W)
  dfl  = dfl_weight  * sum_pos,sides w * DFL(distance logits, clamp(distance / stride, 0, reg_max - 0.1))
                     / (4 * max(1, W))
with w = max class sigmoid of the prior (detached) and IoU = the IoU of the aux-decoded box with its GT (the
assigner's). total = main (qfl + bbox + dfl) + aux (qfl + bbox + dfl). From ``detach_epoch`` on the aux
branch gets detached inputs; the switch is computed in-graph from the ``epoch`` input (no recompilation).
N (positives in the batch) and W (sum_pos w) are averaged over the devices in data-parallel training, as the
official ``reduce_mean``, so every rank's loss has the same scale as one device with the global batch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from msdet.assigners.dsl_assigner import DynamicSoftLabelAssigner
from msdet.config import NanoDetConfig
from msdet.engine.distributed import RankMean
from msdet.losses.gfocal import distribution_focal_loss, quality_focal_loss_dense
from msdet.losses.iou_loss import giou_loss
from msdet.models.nanodet_plus import NANODET_PLUS_M, NanoDetPlus, NanoDetPlusInference
from msdet.ops.distance_coder import Integral, bbox2distance, distance2bbox, distance2bbox_np, integral_np
from msdet.ops.priors import center_priors

if TYPE_CHECKING:
    from msdet.conversion.pretrained import BackboneLoad

TRAINING_ONLY_PREFIXES = ("aux_fpn.", "aux_head.")
ARCHITECTURE = ("NanoDet-Plus-m: ShuffleNetV2 1.0x (stages 2-4, LeakyReLU 0.1) + GhostPAN (96 ch, k5, bilinear x2, "
                "1 extra level) + NanoDetPlusHead (2 depthwise-separable k5 convs per level, GFL outputs, reg_max "
                "{reg_max}), strides 8/16/32/64; training-only Assign Guidance Module (aux GhostPAN + "
                "SimpleConvHead 192 ch), DynamicSoftLabelAssigner, QFL + GIoU + DFL")


class NanoDetLossCell(nn.Cell):
    """(image, gt_boxes, gt_labels, epoch) -> (total, [total, qfl, bbox, dfl, aux_qfl, aux_bbox, aux_dfl])."""

    def __init__(self, network: NanoDetPlus, priors: np.ndarray, cfg: NanoDetConfig, group_size: int = 1) -> None:
        super().__init__(auto_prefix=False)  # keep the network's parameter names
        self.rank_mean = RankMean(group_size)
        self.network = network
        self.num_classes = network.num_classes
        self.reg_max = network.reg_max
        self.points = Tensor(priors[:, :2], ms.float32)
        self.strides = Tensor(priors[:, 2:3], ms.float32)
        self.priors = Tensor(priors, ms.float32)
        self.assigner = DynamicSoftLabelAssigner(cfg.assigner_topk, cfg.assigner_iou_factor)
        self.detach_epoch = int(cfg.detach_epoch)
        self.qfl_beta = float(cfg.qfl_beta)
        self.qfl_weight = float(cfg.qfl_weight)
        self.dfl_weight = float(cfg.dfl_weight)
        self.giou_weight = float(cfg.giou_weight)
        self.bmm = ops.BatchMatMul()
        #: also return the raw positives count (gradient accumulation, msdet/engine/accumulate.py)
        self.return_normaliser = False
        #: the network runs (partly) in float16: its outputs are cast to float32 (msdet/engine/precision.py)
        self.float32_outputs = False

    def _decode(self, reg: Tensor) -> Tensor:
        dist = self.network.head.distribution_project(reg) * self.strides
        return distance2bbox(self.points, dist)

    def _head_loss(self, cls: Tensor, reg: Tensor, boxes: Tensor, cls_target: Tensor, box_target: Tensor,
                   dist_target: Tensor, pos: Tensor, num_pos: Tensor) -> tuple:
        qfl = ops.sum(quality_focal_loss_dense(cls, cls_target, self.qfl_beta)) / num_pos * self.qfl_weight
        weight = ops.max(ops.sigmoid(ops.stop_gradient(cls)), axis=-1)[0] * pos            # [B, P]
        weight_sum = ops.clamp(self.rank_mean(ops.sum(weight)), min=1.0)
        bbox = ops.sum(giou_loss(boxes, box_target, 1e-6) * weight) / weight_sum * self.giou_weight
        b, p = reg.shape[0], reg.shape[1]
        dfl = distribution_focal_loss(ops.reshape(reg, (b, p, 4, self.reg_max + 1)), dist_target)  # [B, P, 4]
        dfl = ops.sum(dfl * ops.expand_dims(weight, -1)) / (4.0 * weight_sum) * self.dfl_weight
        return qfl, bbox, dfl

    def construct(self, image: Tensor, gt_boxes: Tensor, gt_labels: Tensor, epoch: Tensor) -> tuple:
        keep = (epoch < self.detach_epoch).astype(ms.float32)
        head_out, aux_out = self.network.forward_train(image, keep)
        if self.float32_outputs:
            head_out, aux_out = head_out.astype(ms.float32), aux_out.astype(ms.float32)
        c = self.num_classes
        cls, reg = head_out[..., :c], head_out[..., c:]
        aux_cls, aux_reg = aux_out[..., :c], aux_out[..., c:]
        boxes = self._decode(reg)
        aux_boxes = self._decode(aux_reg)

        assigned_gt, assigned_iou, matching = self.assigner(
            ops.stop_gradient(aux_cls), self.priors, ops.stop_gradient(aux_boxes), gt_boxes, gt_labels)
        pos = (assigned_gt >= 0).astype(ms.float32)
        count = self.rank_mean(ops.sum(pos))
        num_pos = ops.clamp(count, min=1.0)
        classes = ops.arange(c, dtype=ms.int32)
        gt_onehot = (ops.expand_dims(gt_labels.astype(ms.int32), -1) == classes).astype(ms.float32)
        cls_target = self.bmm(matching, gt_onehot) * ops.expand_dims(assigned_iou, -1)     # [B, P, C]
        box_target = self.bmm(matching, gt_boxes.astype(ms.float32))                        # [B, P, 4]
        dist_target = bbox2distance(self.points, box_target) / self.strides
        dist_target = ops.clamp(dist_target, 0.0, self.reg_max - 0.1)
        cls_target = ops.stop_gradient(cls_target)
        box_target = ops.stop_gradient(box_target)
        dist_target = ops.stop_gradient(dist_target)

        qfl, bbox, dfl = self._head_loss(cls, reg, boxes, cls_target, box_target, dist_target, pos, num_pos)
        aux_qfl, aux_bbox, aux_dfl = self._head_loss(aux_cls, aux_reg, aux_boxes, cls_target, box_target,
                                                     dist_target, pos, num_pos)
        total = qfl + bbox + dfl + aux_qfl + aux_bbox + aux_dfl
        parts = ops.stack([total, qfl, bbox, dfl, aux_qfl, aux_bbox, aux_dfl])
        if self.return_normaliser:
            return total, parts, count
        return total, parts


class NanoDetDecode(nn.Cell):
    """[1, P, C + 4 (reg_max + 1)] -> boxes [P, 4] (``Integral`` times the stride, ``distance2bbox`` clipped to
    the input), scores [P, C]: :meth:`NanoDetDetector.decode` in MindSpore, for the end-to-end MINDIR."""

    def __init__(self, priors: np.ndarray, input_size: int, num_classes: int, reg_max: int) -> None:
        super().__init__()
        priors = np.asarray(priors, np.float32)
        self.c, self.p = int(num_classes), priors.shape[0]
        self.width = self.c + 4 * (int(reg_max) + 1)
        self.points = Tensor(priors[:, :2])
        self.stride = Tensor(priors[:, 2:3])
        self.integral = Integral(int(reg_max))
        self.size = (int(input_size),) * 2

    def construct(self, out: Tensor) -> tuple[Tensor, Tensor]:
        out = out.reshape(self.p, self.width)
        dist = self.integral(out[:, self.c:]) * self.stride
        return distance2bbox(self.points, dist, self.size), out[:, :self.c]


class NanoDetDetector:
    """NanoDet-Plus-m for ``num_classes`` classes at ``cfg.input_size`` (a multiple of 64)."""

    name = "nanodet"
    loss_names = ("loss", "qfl", "bbox", "dfl", "aux_qfl", "aux_bbox", "aux_dfl")
    training_only_prefixes = TRAINING_ONLY_PREFIXES

    def __init__(self, cfg: NanoDetConfig, num_classes: int, seed: int = 0) -> None:
        """``seed`` is part of the detector interface; NanoDet's initialisers draw from the global seed that
        ``setup_runtime`` sets from ``runtime.seed``, so it is not used here."""
        if cfg.input_size % 64:
            raise ValueError(f"nanodet.input_size = {cfg.input_size}: must be a multiple of 64 (stride of the "
                             f"extra level)")
        if num_classes < 1:
            raise ValueError(f"NanoDetDetector: num_classes must be >= 1, got {num_classes}")
        self.cfg = cfg
        self.input_size = cfg.input_size
        self.num_classes = num_classes
        self.reg_max = cfg.reg_max
        self.strides = tuple(NANODET_PLUS_M.strides)
        self.priors = center_priors(self.input_size, self.strides)
        self.architecture = ARCHITECTURE.format(reg_max=cfg.reg_max)

    # ------------------------------------------------------------------ what travels with the weights
    def weights_meta(self) -> dict[str, Any]:
        """Nothing: the centre priors follow from the input size and strides alone."""
        return {}

    def use_weights_meta(self, meta: Mapping[str, Any], source: str) -> None:
        """Nothing to adopt (see :meth:`weights_meta`)."""

    def fit_to_data(self, data_meta: Mapping[str, Any], source: str) -> None:
        """Nothing is fitted to the data before training."""

    # ------------------------------------------------------------------ Detector interface
    def build_network(self) -> NanoDetPlus:
        return NanoDetPlus(self.num_classes, self.reg_max, NANODET_PLUS_M)

    def loss_cell(self, network: nn.Cell, group_size: int = 1) -> nn.Cell:
        return NanoDetLossCell(network, self.priors, self.cfg, group_size)

    def inference_cell(self, network: nn.Cell) -> nn.Cell:
        return NanoDetPlusInference(network)

    def decode(self, outputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """[B, P, C + 4 (reg_max + 1)] (sigmoid class scores, distance logits) -> (boxes clipped to the input,
        scores)."""
        out = np.asarray(outputs[0])
        expected = (len(self.priors), self.num_classes + 4 * (self.reg_max + 1))
        if out.ndim != 3 or tuple(out.shape[1:]) != expected:
            raise ValueError(f"NanoDet decode: outputs of shape {out.shape}, expected [B, {expected[0]}, "
                             f"{expected[1]}] for input size {self.input_size} and {self.num_classes} classes")
        c = self.num_classes
        dist = integral_np(out[..., c:], self.reg_max) * self.priors[None, :, 2:3]
        boxes = distance2bbox_np(self.priors[None, :, :2], dist, (self.input_size, self.input_size))
        return boxes.astype(np.float32), out[..., :c].astype(np.float32)

    def decode_cell(self) -> nn.Cell:
        return NanoDetDecode(self.priors, self.input_size, self.num_classes, self.reg_max)

    def official_name_map(self, network: nn.Cell) -> dict[str, str]:
        """RangiLyu's state-dict keys: our cell tree mirrors the official module tree."""
        from msdet.conversion.naming import pytorch_name_map

        return pytorch_name_map(network)

    def class_head_param_names(self, network: nn.Cell) -> list[str]:
        names = [f"head.gfl_cls.{i}.{k}" for i in range(len(self.strides)) for k in ("weight", "bias")]
        names += ["aux_head.gfl_cls.weight", "aux_head.gfl_cls.bias"]
        present = {p.name for p in network.get_parameters()}
        return [n for n in names if n in present]

    def load_pretrained_backbone(self, network: NanoDetPlus, spec: str) -> BackboneLoad | None:
        """ShuffleNetV2 1.0x ImageNet weights into ``network.backbone`` (see
        :func:`msdet.conversion.pretrained.load_shufflenet_v2`); None for ``spec`` "none"."""
        if spec in ("", "none"):
            return None
        from msdet.conversion.pretrained import load_shufflenet_v2

        return load_shufflenet_v2(network.backbone, spec)


__all__ = ["NanoDetDetector", "NanoDetLossCell", "TRAINING_ONLY_PREFIXES"]
