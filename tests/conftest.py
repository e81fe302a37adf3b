"""Shared test helpers."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCE_LISTINGS = {
    "d0": FIXTURES / "reference" / "efficientdet_d0.state_dict.txt",
    "nanodet": FIXTURES / "reference" / "nanodet_plus_m_320.state_dict.txt",
}


def official_state_dict(model: str) -> dict[str, tuple]:
    """Official PyTorch state-dict listing (copied from shared/reference): key -> (shape, dtype)."""
    out = {}
    for line in REFERENCE_LISTINGS[model].read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        out[key] = (tuple(int(v) for v in shape.strip("()").split(",") if v.strip()), dtype)
    return out


def random_official_state(model: str, num_classes: int, seed: int = 0) -> OrderedDict[str, np.ndarray]:
    """Every tensor of the official listing with random values of its shape and dtype, scaled so that a
    forward pass stays finite (conv weights ~ 1/sqrt(fan_in), positive running variances)."""
    rng = np.random.default_rng(seed)
    listing = official_state_dict(model)
    heads = {"classifier.header.pointwise_conv.conv.": 9 * num_classes, "head.gfl_cls.": num_classes + 32,
             "aux_head.gfl_cls.": num_classes}
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, (shape, dtype) in listing.items():
        rows = next((n for prefix, n in heads.items() if key.startswith(prefix)), None)
        if rows is not None:
            shape = (rows,) + shape[1:]
        if dtype == "int64":
            out[key] = np.asarray(rng.integers(0, 10**6), dtype=np.int64).reshape(shape)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(dtype)
        elif len(shape) == 4:
            out[key] = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(dtype)
        elif key.endswith(".weight") or "_w" in key.rsplit(".", 1)[-1]:
            out[key] = rng.uniform(0.5, 1.5, shape).astype(dtype)
        else:
            out[key] = (0.1 * rng.standard_normal(shape)).astype(dtype)
    return out
