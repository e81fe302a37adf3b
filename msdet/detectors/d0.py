"""EfficientDet-D0 behind the Detector interface: network, in-graph matching + focal/Huber loss and decoding
(official names and ImageNet backbone loading live in ``msdet.conversion``).

Loss (automl): anchors matched by IoU (``pos_iou``/``neg_iou``, each GT force-matched to its best anchor);
sigmoid focal loss over positive and negative anchors (ignored anchors excluded), summed over the batch and
divided by max(1, positives in the batch); Huber (``huber_delta``) on the encoded box targets of positives,
summed and divided by 4 x max(1, positives), times ``box_loss_weight``. The "box" component reported is that
weighted term, so total = cls + box. The positives are counted per device, as automl does per replica.

Where the two official codes differ, ``D0Config`` reaches either (``params_coco.yaml`` takes automl's):
focal ``gamma`` automl 1.5 (``hparams_config.py``), zylo117 2.0 (``efficientdet/loss.py``); matching band
automl ``neg_iou = pos_iou = 0.5`` (``tf2/anchors.py`` AnchorLabeler: ``unmatched_threshold=match_threshold``,
nothing ignored), zylo117 0.4 / 0.5; head depthwise fan_in (``head_init``, see ``init_heads``). Both use
alpha 0.25 and box weight 50; the force match and Huber delta 0.1 are automl's (zylo117: neither, smooth L1).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from msdet.assigners.anchor_matcher import AnchorMatcher
from msdet.config import D0Config
from msdet.losses.focal import huber_loss, sigmoid_focal_loss
from msdet.models.efficientdet import D0_SPEC, EfficientDet, EfficientDetInference
from msdet.ops.anchors import AnchorSpec, efficientdet_anchors
from msdet.ops.box_coder import decode, decode_np, encode

if TYPE_CHECKING:
    from msdet.conversion.pretrained import BackboneLoad


class D0LossCell(nn.Cell):
    """(image, gt_boxes, gt_labels, epoch) -> (total, [total, cls, box]); ``epoch`` is unused by D0."""

    def __init__(self, network: EfficientDet, anchors: np.ndarray, cfg: D0Config) -> None:
        super().__init__(auto_prefix=False)  # keep the network's parameter names
        self.network = network
        self.num_classes = network.num_classes
        self.anchors = Tensor(anchors, ms.float32)
        self.matcher = AnchorMatcher(cfg.pos_iou, cfg.neg_iou)
        self.alpha = cfg.focal_alpha
        self.gamma = cfg.focal_gamma
        self.delta = cfg.huber_delta
        self.box_weight = cfg.box_loss_weight
        #: also return the raw positives count (gradient accumulation, msdet/engine/accumulate.py)
        self.return_normaliser = False
        #: the network runs (partly) in float16: its outputs are cast to float32 (msdet/engine/precision.py)
        self.float32_outputs = False

    def construct(self, image: Tensor, gt_boxes: Tensor, gt_labels: Tensor, epoch: Tensor) -> tuple:
        regression, logits = self.network(image)
        if self.float32_outputs:
            regression, logits = regression.astype(ms.float32), logits.astype(ms.float32)
        boxes, labels, positive, negative = self.matcher(self.anchors, gt_boxes, gt_labels)
        pos = positive.astype(ms.float32)
        count = ops.sum(pos)
        num_pos = ops.clamp(count, min=1.0)
        onehot = ops.one_hot(ops.clamp(labels, min=0), self.num_classes, Tensor(1.0, ms.float32),
                             Tensor(0.0, ms.float32)) * ops.expand_dims(pos, -1)
        care = ops.logical_or(positive, negative).astype(ms.float32)
        cls_loss = ops.sum(sigmoid_focal_loss(logits, onehot, self.alpha, self.gamma)
                           * ops.expand_dims(care, -1)) / num_pos
        targets = ops.stop_gradient(encode(boxes, ops.expand_dims(self.anchors, 0)))
        box_loss = ops.sum(huber_loss(regression, targets, self.delta) * ops.expand_dims(pos, -1))
        box_loss = box_loss / (num_pos * 4.0) * self.box_weight
        total = cls_loss + box_loss
        if self.return_normaliser:
            return total, ops.stack([total, cls_loss, box_loss]), count
        return total, ops.stack([total, cls_loss, box_loss])


class D0Decode(nn.Cell):
    """(regression (dy, dx, dh, dw) [1, A, 4], probabilities [1, A, C]) -> boxes [A, 4] (``box_coder.decode``,
    clipped to the input), scores [A, C]: :meth:`D0Detector.decode` in MindSpore, for the end-to-end MINDIR."""

    def __init__(self, anchors: np.ndarray, input_size: int, num_classes: int) -> None:
        super().__init__()
        self.anchors = Tensor(np.asarray(anchors, np.float32))
        self.size = float(input_size)
        self.shape = (self.anchors.shape[0], int(num_classes))

    def construct(self, regression: Tensor, probabilities: Tensor) -> tuple[Tensor, Tensor]:
        boxes = ops.clamp(decode(regression.reshape(-1, 4), self.anchors), 0.0, self.size)
        return boxes, probabilities.reshape(self.shape)


class D0Detector:
    """EfficientDet-D0 for ``num_classes`` classes at ``cfg.input_size`` (a multiple of 128)."""

    name = "d0"
    loss_names = ("loss", "cls", "box")
    training_only_prefixes: tuple[str, ...] = ()
    architecture = ("EfficientDet-D0: EfficientNet-B0 (MBConv + SE, swish, drop connect) + BiFPN (64 ch, 3 repeats, "
                    "P3-P7, fast normalized fusion) + shared box/class nets (3 separable convs, per-level BN), "
                    "9 anchors per location; focal loss + Huber box loss")

    def __init__(self, cfg: D0Config, num_classes: int, seed: int = 0) -> None:
        if cfg.input_size % 128:
            raise ValueError(f"d0.input_size = {cfg.input_size}: must be a multiple of 128 (stride of P7)")
        if num_classes < 1:
            raise ValueError(f"D0Detector: num_classes must be >= 1, got {num_classes}")
        self.cfg = cfg
        self.input_size = cfg.input_size
        self.num_classes = num_classes
        self.seed = seed
        self.levels = tuple(range(D0_SPEC.min_level, D0_SPEC.min_level + D0_SPEC.num_levels))
        self.set_anchors(AnchorSpec(cfg.anchor_scale))

    def set_anchors(self, spec: AnchorSpec) -> None:
        """Use the anchor shapes ``spec`` (the network's box and class heads are the same for any)."""
        self.anchor_spec = spec
        self.anchors = efficientdet_anchors(self.input_size, spec.anchor_scale, self.levels, spec.scales,
                                            spec.ratios)

    # ------------------------------------------------------------------ what travels with the weights
    def weights_meta(self) -> dict[str, Any]:
        return {"anchors": self.anchor_spec.as_dict()}

    def use_weights_meta(self, meta: Mapping[str, Any], source: str) -> None:
        """The anchors saved with the weights; none saved (older or converted files): ``d0.anchor_scale``'s
        default anchors, what those were trained with."""
        if meta.get("anchors") is not None:
            self.set_anchors(AnchorSpec.from_dict(meta["anchors"], source, D0_SPEC.num_anchors))

    def fit_to_data(self, data_meta: Mapping[str, Any], source: str) -> None:
        """``d0.anchors: fit``: the anchors the mindrecord stage fitted to the training boxes."""
        if self.cfg.anchors != "fit":
            return
        fitted = data_meta.get("d0_anchors")
        if fitted is None:
            raise ValueError(f"{source}: no fitted 'd0_anchors' (d0.anchors is fit): rerun the mindrecord stage")
        if fitted.get("input_size") != self.input_size:
            raise ValueError(f"{source}: anchors fitted at input size {fitted.get('input_size')}, d0.input_size is "
                             f"{self.input_size}: rerun the mindrecord stage")
        self.set_anchors(AnchorSpec.from_dict(fitted["fit"], source, D0_SPEC.num_anchors))

    # ------------------------------------------------------------------ Detector interface
    def build_network(self) -> EfficientDet:
        """Freshly initialised network; ImageNet weights come from :meth:`load_pretrained_backbone`."""
        return EfficientDet(self.num_classes, D0_SPEC, drop_connect_rate=self.cfg.drop_connect_rate, seed=self.seed,
                            head_init=self.cfg.head_init)

    def loss_cell(self, network: nn.Cell, group_size: int = 1) -> nn.Cell:
        """``group_size`` is unused: automl normalises by each replica's own positives."""
        return D0LossCell(network, self.anchors, self.cfg)

    def inference_cell(self, network: nn.Cell) -> nn.Cell:
        return EfficientDetInference(network)

    def decode(self, outputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(regression [B, A, 4], probabilities [B, A, C]) -> (boxes x1y1x2y2 clipped to [0, S], scores)."""
        regression, scores = (np.asarray(o) for o in outputs[:2])
        if regression.shape[1] != self.anchors.shape[0]:
            raise ValueError(f"D0 decode: {regression.shape[1]} anchors in the outputs, expected "
                             f"{self.anchors.shape[0]} for input size {self.input_size}")
        boxes = np.clip(decode_np(regression, self.anchors[None]), 0.0, float(self.input_size))
        return boxes.astype(np.float32), scores.astype(np.float32)

    def decode_cell(self) -> nn.Cell:
        return D0Decode(self.anchors, self.input_size, self.num_classes)

    def class_head_param_names(self, network: nn.Cell) -> list[str]:
        """The class net's output conv: its shape is 9 x num_classes."""
        return [p.name for p in network.get_parameters() if p.name.startswith("classifier.header.")]

    def official_name_map(self, network: nn.Cell) -> dict[str, str]:
        """zylo117's state-dict keys: our cell tree mirrors the official module tree."""
        from msdet.conversion.naming import pytorch_name_map

        return pytorch_name_map(network)

    def load_pretrained_backbone(self, network: EfficientDet, spec: str) -> BackboneLoad | None:
        """EfficientNet-B0 ImageNet weights into ``network.backbone_net.model`` (see
        :func:`msdet.conversion.pretrained.load_efficientnet_b0`); None for ``spec`` "none"."""
        if spec in ("", "none"):
            return None
        from msdet.conversion.pretrained import load_efficientnet_b0

        return load_efficientnet_b0(network.backbone_net.model, spec)
