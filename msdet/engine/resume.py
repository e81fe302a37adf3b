"""Resume points inside an epoch: when to save, which file to resume from, where in the epoch to continue.

A resume point records the last finished epoch (``epoch``) and the optimizer steps already taken in the next
one (``epoch_step``, 0 at an epoch end). The epoch's sample order is a pure function of (seed, epoch) and
each sample's augmentation of (seed, epoch, image id) (msdet/data/pipeline.py), so continuing means skipping
``epoch_step x accumulate_steps`` batches of that epoch: the resumed run sees the batches the killed one
would have seen, and with the weights, optimizer, EMA and random state restored it ends bit-identical.

The newest two points are kept: the previous one is renamed aside before the new one is written (itself
written to a temporary file and renamed), so a kill at any moment leaves at least one complete point.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msdet.engine.checkpoint import CheckpointError, checkpoint_meta, read_checkpoint


def previous_path(path: str | Path) -> Path:
    """``state/last.ckpt`` -> ``state/previous.ckpt``."""
    path = Path(path)
    return path.with_name("previous" + path.suffix)


def save_rotating(path: str | Path, write: Callable[[Path], None]) -> None:
    """Keep the current resume point as the previous one, then ``write(path)`` (an atomic writer)."""
    path = Path(path)
    if path.is_file():
        os.replace(path, previous_path(path))
    write(path)


def newest_readable(path: str | Path, accept: Callable[[dict], bool]) -> dict[str, Any] | None:
    """The parameters of the newest resume point that reads and that ``accept`` takes, else None."""
    for candidate in (Path(path), previous_path(path)):
        if not candidate.is_file():
            continue
        try:
            params = read_checkpoint(candidate)
        except CheckpointError:
            continue
        if accept(params):
            return params
    return None


def save_due(step: int, step_in_epoch: int, steps_per_epoch: int, every: int) -> bool:
    """A mid-epoch save after global ``step``: every ``every`` steps, except at an epoch end (saved anyway)."""
    return every > 0 and step % every == 0 and step_in_epoch < steps_per_epoch


def position(params: dict[str, Any]) -> tuple[int, int]:
    """(epoch to continue, optimizer steps of it already taken) from a resume point's metadata."""
    return int(checkpoint_meta(params, "epoch")) + 1, int(checkpoint_meta(params, "epoch_step", 0))
