"""The training-graph replacements of layers and whole-step ops: where the networks and the training step ask for
one, and where an optional kernel layer (:mod:`msdet.kernels`, CPU training) puts them.

The networks and the engine never import the kernel layer: they build each replaceable part through
:func:`make`, which returns None (use MindSpore's own ops) unless a kernel installed a factory for it. So
evaluation, export, inference and conversion import and compile no kernel, and a stage's code deps name only the
kernel sources its model can use (msdet/devtools/stage_deps.py).

The replaceable parts (name: factory arguments -> what it returns):

- ``conv2d``: ``nn.Conv2d``'s arguments -> an ``nn.Conv2d`` subclass, or None when the conv does not fit
- ``batch_norm2d`` (num_features, eps, momentum), ``group_norm`` (num_groups, num_channels, eps): the norm
- ``swish``, ``plane_mean``, ``sigmoid_gate``, ``leaky_relu`` (alpha), ``max_pool_3x3s2p1``,
  ``upsample_bilinear2x``: a cell that a layer runs in its training graph (``self.fast``)
- ``square_sum``: an op over a tuple of tensors; ``adamw_update``, ``ema_update``: the whole-step updates
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: kernel name -> {part name: factory}, in the order installed (the first factory that fits a part wins)
_INSTALLED: dict[str, dict[str, Callable[..., Any]]] = {}


def install(kernel: str, factories: dict[str, Callable[..., Any]]) -> None:
    """Use ``kernel``'s factories for the parts built from now on (replacing what it installed before)."""
    _INSTALLED.pop(kernel, None)
    _INSTALLED[kernel] = dict(factories)


def remove(kernel: str) -> None:
    _INSTALLED.pop(kernel, None)


def clear() -> None:
    """No replacement for parts built from now on."""
    _INSTALLED.clear()


def installed() -> list[str]:
    """The kernels whose replacements are in use, in install order."""
    return list(_INSTALLED)


def snapshot() -> dict[str, dict[str, Callable[..., Any]]]:
    return {k: dict(v) for k, v in _INSTALLED.items()}


def restore(saved: dict[str, dict[str, Callable[..., Any]]]) -> None:
    _INSTALLED.clear()
    _INSTALLED.update(saved)


def make(part: str, *args: Any) -> Any:
    """The replacement of ``part`` built with ``args`` by the first installed factory that gives one, else None."""
    for factories in _INSTALLED.values():
        factory = factories.get(part)
        if factory is not None:
            made = factory(*args)
            if made is not None:
                return made
    return None
