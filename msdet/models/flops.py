"""Parameter counts, and multiply-accumulates of Conv2d and Dense layers by running a network once (PyNative,
forward hooks).

MACs of a Conv2d = output elements x (in_channels / groups) x kernel area; of a Dense = output elements x
in_features. Biases, normalisation, activations, pooling and element-wise ops are not counted (they are a few
percent). GFLOPs = 2 x GMACs. Note: the EfficientDet paper/automl "FLOPs" (D0: 2.54B) are multiply-adds,
i.e. our GMACs (automl ``utils.num_params_flops`` halves tfprof's count); NanoDet's "0.9 GFLOPs" is 2 x 0.45 GMACs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn


@dataclass
class FlopReport:
    macs: int
    layers: list = field(default_factory=list)  # (cell name, kind, MACs)

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def gflops(self) -> float:
        return 2.0 * self.macs / 1e9


def _conv_macs(cell: nn.Conv2d, out_shape: tuple) -> int:
    kh, kw = cell.weight.shape[2], cell.weight.shape[3]
    return int(np.prod(out_shape)) * (cell.in_channels // cell.group) * kh * kw


def _dense_macs(cell: nn.Dense, out_shape: tuple) -> int:
    return int(np.prod(out_shape)) * cell.in_channels


def count_macs(network: nn.Cell, inputs: tuple[Tensor, ...] | Tensor) -> FlopReport:
    """Run ``network(*inputs)`` once in PyNative mode (restoring the previous mode) and sum the MACs of its
    Conv2d and Dense layers. Use batch size 1 for per-image figures."""
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    names = {id(cell): name for name, cell in network.cells_and_names()}
    layers: list = []

    def hook(cell, _args, output):
        out_shape = tuple(output.shape)
        if isinstance(cell, nn.Conv2d):
            layers.append((names.get(id(cell), "?"), "conv", _conv_macs(cell, out_shape)))
        else:
            layers.append((names.get(id(cell), "?"), "dense", _dense_macs(cell, out_shape)))

    handles = [cell.register_forward_hook(hook) for _, cell in network.cells_and_names()
               if isinstance(cell, (nn.Conv2d, nn.Dense))]
    mode = ms.get_context("mode")
    was_training = network.training
    try:
        ms.set_context(mode=ms.PYNATIVE_MODE)
        network.set_train(False)
        network(*inputs)
    finally:
        for h in handles:
            h.remove()
        network.set_train(was_training)
        ms.set_context(mode=mode)
    return FlopReport(sum(m for _, _, m in layers), layers)


def count_flops(network: nn.Cell, input_shape: tuple[int, ...]) -> FlopReport:
    """:func:`count_macs` for one zero input of ``input_shape`` (e.g. (1, 3, 512, 512))."""
    return count_macs(network, Tensor(np.zeros(input_shape, np.float32)))


def count_trainable(network: nn.Cell, exclude_prefixes: tuple[str, ...] = ()) -> int:
    """Trainable parameters, as PyTorch's ``parameters()`` counts them (BN running statistics are buffers)."""
    return int(sum(p.size for p in network.trainable_params() if not p.name.startswith(exclude_prefixes)))
