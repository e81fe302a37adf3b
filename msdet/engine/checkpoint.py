"""Checkpoints: atomic writes, a resume state per run, and plain weight files for eval/export/fine-tuning."""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn

from msdet.atomic import atomic_path
from msdet.errors import UserError


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the network: the user picks another file."""


def save_weights(path: str | Path, items: nn.Cell | Iterable[dict], meta: dict[str, Any] | None = None) -> None:
    """``items`` is a Cell or a list of {"name", "data"}; ``meta`` is stored as JSON strings beside them."""
    append = {k: json.dumps(v) for k, v in (meta or {}).items()}
    obj = items if isinstance(items, nn.Cell) else list(items)
    with atomic_path(path) as tmp:
        ms.save_checkpoint(obj, str(tmp), append_dict=append or None)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Name -> Parameter; raises CheckpointError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return ms.load_checkpoint(str(path))
    except Exception as exc:  # MindSpore raises ValueError/RuntimeError with long messages
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({str(exc).splitlines()[0]})") from exc


def checkpoint_meta(params: dict[str, Any], key: str, default: Any = None) -> Any:
    value = params.get(key)
    if value is None:
        return default
    return json.loads(value if isinstance(value, str) else str(value))


def load_weights(network: nn.Cell, path: str | Path, strict: bool = True, skip: Iterable[str] = ()) -> list[str]:
    """Load weights into ``network`` by name with shape checks; returns the network params not loaded.

    ``strict`` requires every network parameter to be present (names in ``skip`` excepted); a shape
    mismatch always fails, naming the tensor.
    """
    params = read_checkpoint(path)
    skip = set(skip)
    missing, loaded = [], {}
    for p in network.get_parameters():
        if p.name in skip:
            missing.append(p.name)
            continue
        src = params.get(p.name)
        if src is None:
            missing.append(p.name)
            continue
        if tuple(src.shape) != tuple(p.shape):
            raise CheckpointError(
                f"{path}: tensor '{p.name}' has shape {tuple(src.shape)}, the network expects {tuple(p.shape)}")
        loaded[p.name] = src
    if strict and [m for m in missing if m not in skip]:
        saved_for = checkpoint_meta(params, "model")
        hint = f"; the file was saved for model '{saved_for}'" if saved_for else ""
        raise CheckpointError(f"{path}: {len(missing)} network tensors missing, e.g. {missing[:5]}{hint}")
    ms.load_param_into_net(network, loaded, strict_load=False)
    return missing


def weights_digest(cell: nn.Cell, trainable_only: bool = True) -> str:
    """SHA-256 over parameter names and bytes: equal digests mean bit-identical weights.

    Trainable weights only by default: BatchNorm running statistics stay per device in data-parallel runs.
    """
    import hashlib

    h = hashlib.sha256()
    for p in (cell.trainable_params() if trainable_only else cell.get_parameters()):
        h.update(p.name.encode())
        h.update(np.ascontiguousarray(p.asnumpy()).tobytes())
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (checkpoints can be large)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def category_ids_for(ckpt_path: str | Path, meta: dict) -> list[int]:
    """Data-set category id of each class index of the checkpoint: its own ids when it carries them (a
    converted official checkpoint: 90 for zylo117's D0), else the data set's (``meta["categories"]``)."""
    ids = checkpoint_meta(read_checkpoint(ckpt_path), "category_ids")
    if ids:
        return [int(i) for i in ids]
    return [int(c["id"]) for c in meta["categories"]]
