"""Each detector bundles its network, loss, target assignment and decoding behind one interface.

The registry names each detector's module instead of importing it: a stage for one model imports that model's
code only, and ``msdet.devtools.stage_deps`` reads this table to give each stage exactly those files as deps.
"""
from __future__ import annotations

import importlib
from typing import Any

#: model name -> (module, detector class)
DETECTORS: dict[str, tuple[str, str]] = {
    "d0": ("msdet.detectors.d0", "D0Detector"),
    "nanodet": ("msdet.detectors.nanodet", "NanoDetDetector"),
}
MODEL_NAMES = tuple(DETECTORS)


def get_detector(name: str, cfg: Any, num_classes: int, seed: int = 0) -> Any:
    """The detector called ``name`` ("d0" or "nanodet") for model config ``cfg`` and ``num_classes``."""
    if name not in DETECTORS:
        raise ValueError(f"unknown model '{name}': expected one of {', '.join(MODEL_NAMES)}")
    module, cls = DETECTORS[name]
    return getattr(importlib.import_module(module), cls)(cfg, num_classes, seed=seed)


def build_detector(params: Any, model: str, num_classes: int) -> Any:
    """The detector of ``model`` configured by validated ``params`` (its model section and runtime seed)."""
    return get_detector(model, getattr(params, model), num_classes, seed=params.runtime.seed)
