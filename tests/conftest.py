"""Shared test helpers."""
from __future__ import annotations

from pathlib import Path

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
