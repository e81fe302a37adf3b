"""Learning-rate schedules, precomputed per step so the optimizer indexes them with its global step."""
from __future__ import annotations

import numpy as np

from msdet.config import TrainConfig


def peak_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The linear scaling rule (Goyal et al.): lr grows with the global batch when asked to."""
    return cfg.lr * global_batch / cfg.lr_reference_batch if cfg.scale_lr_with_batch else cfg.lr


def warmup_cosine(cfg: TrainConfig, steps_per_epoch: int, global_batch: int) -> np.ndarray:
    """Linear warmup from ``peak * warmup_ratio`` over ``warmup_steps``, then cosine to ``peak * min_lr_ratio``.

    The cosine spans the whole run (warmup included), as nanodet's and automl's schedulers do.
    """
    total = cfg.epochs * steps_per_epoch
    peak = peak_lr(cfg, global_batch)
    step = np.arange(total, dtype=np.float64)
    floor = peak * cfg.min_lr_ratio
    cosine = floor + 0.5 * (peak - floor) * (1.0 + np.cos(np.pi * step / max(total, 1)))
    warm = min(cfg.warmup_steps, total)
    if warm > 0:
        ramp = cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * step[:warm] / warm
        cosine[:warm] *= ramp
    return cosine.astype(np.float32)
