"""The interface every detector offers to the training engine, evaluation, export and conversion.

The engine knows nothing model-specific: it builds the network, wraps it in the detector's loss cell and
trains. Shapes are static (fixed input size, ground truth padded to ``max_gt_boxes``) so graph mode
compiles the step once.

Batch conventions (produced by ``msdet.data.pipeline``):
  image      float32 [B, 3, S, S]  normalised as the model expects (D0: RGB ImageNet; NanoDet: BGR official)
  gt_boxes   float32 [B, M, 4]     x1, y1, x2, y2 in network-input pixels; padding rows are zeros
  gt_labels  int32   [B, M]        contiguous class index 0..C-1; -1 marks padding
  epoch      int32   []            current epoch (0-based), for schedules inside the loss (NanoDet detach)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from mindspore import nn


class Detector(Protocol):
    name: str
    #: names of the loss components returned by the loss cell, in order (total first).
    loss_names: Sequence[str]
    input_size: int
    num_classes: int
    #: human-readable architecture summary for the model card
    architecture: str
    #: parameter-name prefixes of training-only branches (not in the inference network)
    training_only_prefixes: Sequence[str]

    def build_network(self) -> nn.Cell:
        """The full network, training-only branches included (their parameters are checkpointed)."""

    def loss_cell(self, network: nn.Cell, group_size: int = 1) -> nn.Cell:
        """Cell: (image, gt_boxes, gt_labels, epoch) -> (total_loss scalar, components float32 [K]).

        ``group_size``: data-parallel devices, for normalisers the official code averages across them.
        A loss divided by a count made from the batch has a ``return_normaliser`` attribute: set True, the
        cell also returns that raw count (gradient accumulation, msdet/engine/accumulate.py)."""

    def inference_cell(self, network: nn.Cell) -> nn.Cell:
        """Cell: image -> outputs in the official layout (what export writes)."""

    def decode(self, outputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Official-layout outputs -> (boxes [B, A, 4] x1y1x2y2 in input pixels, scores [B, A, C] in [0, 1])."""

    def decode_cell(self) -> nn.Cell:
        """:meth:`decode` as a MindSpore cell for batch 1: official-layout outputs -> (boxes [A, 4], scores [A, C])
        (the end-to-end MINDIR, ``msdet.export.mindir_graph``)."""

    def weights_meta(self) -> dict[str, Any]:
        """What must travel with the weights for their outputs to decode the same (D0: its anchors); saved in
        every checkpoint, the model card and the export report."""

    def use_weights_meta(self, meta: Mapping[str, Any], source: str) -> None:
        """Adopt what :meth:`weights_meta` saved (``meta``: those keys, None where absent); errors name ``source``."""

    def fit_to_data(self, data_meta: Mapping[str, Any], source: str) -> None:
        """Before training: take what the converted data set's ``meta.json`` fitted (D0 with ``d0.anchors: fit``)."""

    def official_name_map(self, network: nn.Cell) -> dict[str, str]:
        """Official PyTorch state-dict key -> our MindSpore parameter name, one to one."""

    def class_head_param_names(self, network: nn.Cell) -> list[str]:
        """Parameters whose shape depends on num_classes (re-initialised when fine-tuning on other classes)."""

    def load_pretrained_backbone(self, network: nn.Cell, spec: str) -> Any:
        """spec: "none", a local MindSpore checkpoint of the ImageNet backbone, or "mindcv"; clear error if
        unusable. Returns None for "none", else a ``msdet.conversion.pretrained.BackboneLoad``."""
