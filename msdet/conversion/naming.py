"""How official checkpoints name our parameters: one name map per official layout, one BatchNorm table.

Layouts:
- PyTorch mirror (zylo117's EfficientDet-D0, RangiLyu's NanoDet-Plus-m, torchvision's ShuffleNetV2, which is
  NanoDet's backbone subtree): our cell trees mirror the official module trees, so a key is the cell path
  plus the parameter name, norm layers spelled PyTorch's way (:func:`pytorch_name_map`).
- mindcv 0.3.0 ``efficientnet_b0`` (:func:`mindcv_efficientnet_b0_map`).
- mindcv 0.3.0 ``shufflenet_v2_x1_0``, the Megvii variant (:func:`mindcv_shufflenet_v2_key`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import mindspore as ms
from mindspore import nn

if TYPE_CHECKING:
    from msdet.models.efficientnet import EfficientNet

#: PyTorch norm-layer state-dict suffix -> MindSpore parameter name (BatchNorm2d and GroupNorm).
BN_TORCH_TO_MS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
GN_TORCH_TO_MS = {"weight": "gamma", "bias": "beta"}
#: PyTorch's BatchNorm update counter: the one official tensor kind without a MindSpore counterpart.
NUM_BATCHES_TRACKED = "num_batches_tracked"


def relative_parameters(model: nn.Cell) -> list[tuple[str, ms.Parameter, nn.Cell]]:
    """(name relative to ``model``, parameter, the cell owning it), independent of how ``model`` is prefixed."""
    out = []
    for path, cell in model.cells_and_names():
        for p in cell.get_parameters(expand=False):
            local = p.name.rsplit(".", 1)[-1]
            out.append((f"{path}.{local}" if path else local, p, cell))
    return out


def _torch_leaf(cell: nn.Cell, leaf: str) -> str:
    if isinstance(cell, nn.BatchNorm2d):
        return {v: k for k, v in BN_TORCH_TO_MS.items()}[leaf]
    if isinstance(cell, nn.GroupNorm):
        return {v: k for k, v in GN_TORCH_TO_MS.items()}.get(leaf, leaf)
    return leaf


def pytorch_name_map(model: nn.Cell) -> dict[str, str]:
    """PyTorch state-dict key (relative to ``model``) -> our parameter name, one to one.

    BatchNorm's gamma/beta/moving_mean/moving_variance and GroupNorm's gamma/beta are spelled
    weight/bias/running_mean/running_var; ``*.num_batches_tracked`` is the only official kind of key without
    a counterpart.
    """
    out: dict[str, str] = {}
    for local, p, cell in relative_parameters(model):
        head, _, leaf = local.rpartition(".")
        key = _torch_leaf(cell, leaf)
        out[f"{head}.{key}" if head else key] = p.name
    return out


_BN = ("gamma", "beta", "moving_mean", "moving_variance")


#: blocks per stage in mindcv's files (the architectures' own; the file layouts number blocks with them)
MINDCV_B0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
MINDCV_SHUFFLENET_STAGE_REPEATS = (4, 8, 4)


def mindcv_efficientnet_b0_map(model: EfficientNet) -> dict[str, str]:
    """Our EfficientNet parameter names (relative to ``model``) -> mindcv ``efficientnet_b0`` checkpoint keys.

    mindcv layout: ``features.0`` stem conv, ``features.1`` stem BN, ``features.{3+s}.{j}.block.{k}`` for block
    ``j`` of stage ``s`` with k = expand conv 0, BN 1, depthwise 3, BN 4, SE 6, project 7, BN 8 (blocks
    without expansion shift down by 3). Its head (``features.10/11``, ``mlp_head``) is not used.
    """
    out = {"_conv_stem.conv.weight": "features.0.weight"}
    out.update({f"_bn0.{p}": f"features.1.{p}" for p in _BN})
    idx = 0
    for s, repeats in enumerate(MINDCV_B0_STAGE_REPEATS):
        for j in range(repeats):
            block = model._blocks[idx]
            base, ours = f"features.{3 + s}.{j}.block", f"_blocks.{idx}"
            k = 3 if block.has_expand else 0
            if block.has_expand:
                out[f"{ours}._expand_conv.conv.weight"] = f"{base}.0.weight"
                out.update({f"{ours}._bn0.{p}": f"{base}.1.{p}" for p in _BN})
            out[f"{ours}._depthwise_conv.conv.weight"] = f"{base}.{k}.weight"
            out.update({f"{ours}._bn1.{p}": f"{base}.{k + 1}.{p}" for p in _BN})
            for ours_se, theirs_se in (("_se_reduce", "conv_reduce"), ("_se_expand", "conv_expand")):
                for p in ("weight", "bias"):
                    out[f"{ours}.{ours_se}.conv.{p}"] = f"{base}.{k + 3}.{theirs_se}.{p}"
            out[f"{ours}._project_conv.conv.weight"] = f"{base}.{k + 4}.weight"
            out.update({f"{ours}._bn2.{p}": f"{base}.{k + 5}.{p}" for p in _BN})
            idx += 1
    return out


def mindcv_shufflenet_v2_key(local: str) -> str:
    """Our ShuffleNetV2 parameter name (relative to the backbone) -> mindcv ``shufflenet_v2_x1_0`` key
    (``first_conv``, ``features.k`` numbering the 4 + 8 + 4 blocks in a row, ``branch_proj`` = our
    ``branch1``, ``branch_main`` = our ``branch2``)."""
    parts = local.split(".")
    if parts[0] == "conv1":
        return ".".join(["first_conv"] + parts[1:])
    stage, block = int(parts[0][len("stage"):]), int(parts[1])
    index = sum(MINDCV_SHUFFLENET_STAGE_REPEATS[:stage - 2]) + block
    branch = {"branch1": "branch_proj", "branch2": "branch_main"}[parts[2]]
    return ".".join(["features", str(index), branch] + parts[3:])


__all__ = ["BN_TORCH_TO_MS", "GN_TORCH_TO_MS", "NUM_BATCHES_TRACKED", "relative_parameters", "pytorch_name_map",
           "mindcv_efficientnet_b0_map", "mindcv_shufflenet_v2_key"]
