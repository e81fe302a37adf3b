"""Switching the CPU kernel layer on for a training run, and reporting what runs.

:func:`for_model` names the kernel modules a model's training can use (:data:`MODEL_KERNELS`, imported by name
when switched on; msdet/devtools/stage_deps.py reads the table like the detector registry, so a stage that
imports this module depends on exactly its model's kernel sources), and :meth:`KernelLayer.enable` builds those
the host supports and installs their replacements (:mod:`msdet.train_ops`). :func:`report` says what ran.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from msdet import train_ops
from msdet.config import CPU_KERNELS
from msdet.kernels import build

#: every kernel, in install order (the dense conv's ``conv2d`` factory is asked before the depthwise one's)
KERNELS = CPU_KERNELS
#: model -> the kernels its training graph can use (a literal table: read by msdet.devtools.stage_deps)
MODEL_KERNELS: dict[str, tuple[str, ...]] = {
    "d0": ("depthwise_conv", "dense_conv", "batch_norm", "activations", "grad_norm", "adamw_ema"),
    "nanodet": ("depthwise_conv", "dense_conv", "batch_norm", "activations", "group_norm", "max_pool", "upsample",
                "grad_norm", "adamw_ema"),
}


def module(name: str):
    """The module of kernel ``name`` (imported now)."""
    if name not in KERNELS:
        raise ValueError(f"unknown cpu kernel {name!r}: expected one of {', '.join(KERNELS)}")
    return importlib.import_module(f"msdet.kernels.{name}")


@dataclass(frozen=True)
class KernelLayer:
    """The kernels a training run may use (``kernels``, a subset of :data:`KERNELS`)."""

    kernels: tuple[str, ...]

    def enable(self, wanted: set[str] | frozenset[str]) -> list[str]:
        """Build and install the kernels of this layer named in ``wanted`` (each that cannot be built stays off
        after one printed line), remove every other replacement; returns the kernels on, in install order."""
        train_ops.clear()
        on = []
        for name in KERNELS:
            if name not in self.kernels:
                continue
            mod = module(name)
            if mod.LIBRARY.enable(name in wanted):
                train_ops.install(name, mod.REPLACEMENTS)
                on.append(name)
        return on


def for_model(model: str) -> KernelLayer:
    """The kernel layer of ``model``'s training (the kernels its network and step can use)."""
    if model not in MODEL_KERNELS:
        raise ValueError(f"no cpu kernels listed for model {model!r}: expected one of {', '.join(MODEL_KERNELS)}")
    return KernelLayer(MODEL_KERNELS[model])


def report() -> dict[str, Any]:
    """What runs: the kernels actually built and on (not the configured switches), the compiler (``g++
    --version``'s first line, "" without g++) and the CPU's instruction set (:func:`msdet.kernels.build.cpu_isa`).
    For the model card and the resume key."""
    return {"kernels": train_ops.installed(), "compiler": build.compiler(), "isa": build.cpu_isa()}
