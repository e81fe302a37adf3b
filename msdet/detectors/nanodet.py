"""NanoDet-Plus-m behind the Detector interface: network, in-graph dynamic soft-label assignment and GFL losses,
decoding, official-name mapping and ImageNet backbone loading.

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

from collections.abc import Sequence
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from msdet.assigners.dsl_assigner import DynamicSoftLabelAssigner
from msdet.config import NanoDetConfig
from msdet.engine.checkpoint import cached_download, read_pretrained
from msdet.engine.distributed import RankMean
from msdet.losses.gfocal import distribution_focal_loss, quality_focal_loss_dense
from msdet.losses.iou_loss import giou_loss
from msdet.models.nanodet_plus import NANODET_PLUS_M, NanoDetPlus, NanoDetPlusInference
from msdet.ops.distance_coder import bbox2distance, distance2bbox, distance2bbox_np, integral_np
from msdet.ops.priors import center_priors

#: PyTorch norm-layer state-dict suffix -> MindSpore parameter name (BatchNorm2d and GroupNorm).
BN_TORCH_TO_MS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
GN_TORCH_TO_MS = {"weight": "gamma", "bias": "beta"}
#: The one kind of official tensor with no MindSpore counterpart (PyTorch's BN update counter).
UNMAPPED_OFFICIAL_SUFFIX = "num_batches_tracked"
TRAINING_ONLY_PREFIXES = ("aux_fpn.", "aux_head.")
MINDCV_SHUFFLENET_V2_X1_0_URL = (
    "https://download.mindspore.cn/toolkits/mindcv/shufflenet/shufflenetv2/shufflenet_v2_x1_0-0da4b7fa.ckpt")
ARCHITECTURE = ("NanoDet-Plus-m: ShuffleNetV2 1.0x (stages 2-4, LeakyReLU 0.1) + GhostPAN (96 ch, k5, bilinear x2, "
                "1 extra level) + NanoDetPlusHead (2 depthwise-separable k5 convs per level, GFL outputs, reg_max "
                "{reg_max}), strides 8/16/32/64; training-only Assign Guidance Module (aux GhostPAN + "
                "SimpleConvHead 192 ch), DynamicSoftLabelAssigner, QFL + GIoU + DFL")
#: the number of blocks per ShuffleNetV2 stage (stage2, stage3, stage4): mindcv numbers them 0..15 in a row
_STAGE_REPEATS = (4, 8, 4)


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


class NanoDetDetector:
    """NanoDet-Plus-m for ``num_classes`` classes at ``cfg.input_size`` (a multiple of 64)."""

    name = "nanodet"
    loss_names = ("loss", "qfl", "bbox", "dfl", "aux_qfl", "aux_bbox", "aux_dfl")
    training_only_prefixes = TRAINING_ONLY_PREFIXES

    def __init__(self, cfg: NanoDetConfig, num_classes: int) -> None:
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

    def official_name_map(self, network: nn.Cell) -> dict[str, str]:
        return official_name_map(network)

    def class_head_param_names(self, network: nn.Cell) -> list[str]:
        names = [f"head.gfl_cls.{i}.{k}" for i in range(len(self.strides)) for k in ("weight", "bias")]
        names += ["aux_head.gfl_cls.weight", "aux_head.gfl_cls.bias"]
        present = {p.name for p in network.get_parameters()}
        return [n for n in names if n in present]

    def load_pretrained_backbone(self, network: NanoDetPlus, spec: str) -> list[str]:
        return load_pretrained_backbone(network, spec)


# ----------------------------------------------------------------------------------------------------
# official names


def official_name_map(network: nn.Cell) -> dict[str, str]:
    """Official NanoDet state-dict key -> our parameter name, one to one.

    The cell tree mirrors the official module tree: a key is the cell path plus the parameter name, with
    BatchNorm's gamma/beta/moving_mean/moving_variance and GroupNorm's gamma/beta spelled PyTorch's way.
    ``*.num_batches_tracked`` is the only official kind of key without a counterpart.
    """
    bn = {v: k for k, v in BN_TORCH_TO_MS.items()}
    gn = {v: k for k, v in GN_TORCH_TO_MS.items()}
    out: dict[str, str] = {}
    for path, cell in network.cells_and_names():
        rename = bn if isinstance(cell, nn.BatchNorm2d) else gn if isinstance(cell, nn.GroupNorm) else {}
        for p in cell.get_parameters(expand=False):
            local = p.name.rsplit(".", 1)[-1]
            key = rename.get(local, local)
            out[f"{path}.{key}" if path else key] = p.name
    return out


# ----------------------------------------------------------------------------------------------------
# ImageNet backbone


def download_mindcv_shufflenet(timeout: float = 60.0) -> Path:
    """mindcv's ImageNet checkpoint for this backbone, downloaded once into the cache."""
    return cached_download(MINDCV_SHUFFLENET_V2_X1_0_URL, "nanodet.pretrained_backbone", timeout)


def _relative_params(model: nn.Cell) -> list[tuple[str, ms.Parameter, bool]]:
    """(name relative to ``model`` in our spelling, parameter, is a BatchNorm parameter)."""
    out = []
    for path, cell in model.cells_and_names():
        for p in cell.get_parameters(expand=False):
            local = p.name.rsplit(".", 1)[-1]
            out.append((f"{path}.{local}" if path else local, p, isinstance(cell, nn.BatchNorm2d)))
    return out


def mindcv_key(local: str) -> str:
    """Our backbone-relative name -> mindcv ``shufflenet_v2_x1_0`` name (``first_conv``, ``features.k``,
    ``branch_proj`` = our ``branch1``, ``branch_main`` = our ``branch2``)."""
    parts = local.split(".")
    if parts[0] == "conv1":
        return ".".join(["first_conv"] + parts[1:])
    stage, block = int(parts[0][len("stage"):]), int(parts[1])
    index = sum(_STAGE_REPEATS[:stage - 2]) + block
    branch = {"branch1": "branch_proj", "branch2": "branch_main"}[parts[2]]
    return ".".join(["features", str(index), branch] + parts[3:])


def load_pretrained_backbone(network: NanoDetPlus, spec: str) -> list[str]:
    """Load ShuffleNetV2 1.0x ImageNet weights into ``network.backbone``; returns the parameter names loaded.

    ``spec``: "none" (nothing); a MindSpore checkpoint path holding the backbone in our names (optionally
    prefixed ``backbone.``, e.g. a NanoDet checkpoint), in torchvision/NanoDet names (BatchNorm spelled
    weight/bias/running_mean/running_var, as a converted ``shufflenetv2_x1-5666bf0f80.pth``) or in mindcv's
    names; or "mindcv" (mindcv 0.3.0's ImageNet checkpoint, downloaded once).

    Our/torchvision layouts must provide every backbone tensor with our shape. mindcv's ShuffleNetV2 is the
    Megvii variant (channel split before the block, stage2's first block keeps 24 + 92 channels): tensors are
    mapped by name and every one must exist, but the four stage2.0 tensors whose shapes differ
    (``branch1.2``, ``branch1.3``, ``branch2.5``, ``branch2.6``) keep their initialisation, and the channel
    routing differs from NanoDet's, so mindcv weights are an approximate ImageNet start, not the official one.
    """
    if spec in ("", "none"):
        return []
    path = download_mindcv_shufflenet() if spec == "mindcv" else Path(spec)
    ckpt = read_pretrained(path)
    bn_ms_to_torch = {v: k for k, v in BN_TORCH_TO_MS.items()}
    params = _relative_params(network.backbone)
    mindcv = any(k.startswith(("first_conv.", "features.")) for k in ckpt)
    fmt = "mindcv" if mindcv else "msdet/torchvision"
    loaded, skipped = [], []
    for local, param, is_bn in params:
        if mindcv:
            candidates = [mindcv_key(local)]
        else:
            torch_local = local
            if is_bn:
                head, leaf = local.rsplit(".", 1)
                torch_local = f"{head}.{bn_ms_to_torch[leaf]}"
            candidates = [pre + name for name in dict.fromkeys((local, torch_local)) for pre in ("", "backbone.")]
        key = next((k for k in candidates if k in ckpt), None)
        if key is None:
            raise ValueError(f"pretrained_backbone: {path} ({fmt} layout) has no tensor for backbone parameter "
                             f"'{local}' (looked for {', '.join(repr(k) for k in candidates)})")
        value = ckpt[key]
        if tuple(value.shape) != tuple(param.shape):
            if mindcv and local.startswith("stage2.0."):
                skipped.append(local)
                continue
            raise ValueError(f"pretrained_backbone: {path}: tensor '{key}' has shape {tuple(value.shape)}, "
                             f"backbone parameter '{local}' needs {tuple(param.shape)}")
        param.set_data(Tensor(value.asnumpy().astype(np.float32)))
        loaded.append(param.name)
    if skipped:
        print(f"pretrained_backbone: {path.name}: {len(loaded)} tensors loaded; {len(skipped)} keep their "
              f"initialisation (mindcv's Megvii-style stage2.0 has other shapes): {', '.join(skipped)}")
    return loaded


__all__ = ["NanoDetDetector", "NanoDetLossCell", "official_name_map", "load_pretrained_backbone", "mindcv_key",
           "download_mindcv_shufflenet", "TRAINING_ONLY_PREFIXES", "MINDCV_SHUFFLENET_V2_X1_0_URL"]
