"""Each detector bundles its network, loss, target assignment and decoding behind one interface."""
from __future__ import annotations

from typing import Any

MODEL_NAMES = ("d0", "nanodet")


def get_detector(name: str, cfg: Any, num_classes: int, seed: int = 0) -> Any:
    """The detector called ``name`` ("d0" or "nanodet") for model config ``cfg`` and ``num_classes``."""
    if name == "d0":
        from msdet.detectors.d0 import D0Detector

        return D0Detector(cfg, num_classes, seed=seed)
    if name == "nanodet":
        from msdet.detectors.nanodet import NanoDetDetector

        return NanoDetDetector(cfg, num_classes)
    raise ValueError(f"unknown model '{name}': expected one of {', '.join(MODEL_NAMES)}")
