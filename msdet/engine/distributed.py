"""Data-parallel setup on MindSpore's own launcher (msrun) or an Ascend rank table.

One code path for every backend: ``mindspore.communication.init()`` picks HCCL on Ascend, NCCL on GPU
and MindSpore's own collectives on CPU. Gradients are averaged across ranks; BatchNorm statistics stay
per device (each rank normalises with its own batch), as the MindSpore model zoo scripts do.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from mindspore import Tensor, nn, ops

from msdet.errors import UserError


class LaunchError(UserError):
    """A distributed launch this process cannot join as it was started (one line: what to set)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    group_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.group_size > 1


def launched_distributed() -> bool:
    """True under msrun (MS_WORKER_NUM) or an Ascend rank table (RANK_TABLE_FILE with RANK_SIZE > 1)."""
    if int(os.environ.get("MS_WORKER_NUM", "0") or 0) > 1:
        return True
    return bool(os.environ.get("RANK_TABLE_FILE")) and int(os.environ.get("RANK_SIZE", "1")) > 1


def device_id(device_target: str) -> int | None:
    """The Ascend/GPU device of this process: ``DEVICE_ID``, which msrun exports per worker (its local index)
    and the model zoo's rank-table scripts export per process; None on CPU or as a single process (MindSpore's
    default device). A rank-table launch without it would put every rank on device 0: refused."""
    if device_target == "CPU" or not launched_distributed():
        return None
    value = os.environ.get("DEVICE_ID", "")
    if not value.isdigit():
        raise LaunchError(f"RANK_TABLE_FILE={os.environ.get('RANK_TABLE_FILE', '')} launch of rank "
                          f"{os.environ.get('RANK_ID', '?')}: set DEVICE_ID (the device of this rank) for each "
                          f"process, or launch with msrun (runtime.workers), which sets it")
    return int(value)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random layers (D0's drop connect): ``seed`` itself on rank 0 (so one process
    trains as with ``seed``), a distinct one per other rank, so the ranks do not all draw the same masks. The
    sample order and augmentation draw from ``seed`` on every rank (msdet/data/pipeline.py)."""
    if rank == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1)[0] % 2**31)


def init_distributed() -> DistInfo:
    """Initialise collectives when launched as several workers; a single process gets rank 0 of 1."""
    if not launched_distributed():
        return DistInfo()
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    init()
    info = DistInfo(rank=get_rank(), group_size=get_group_size())
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=info.group_size)
    return info


class RankMean(nn.Cell):
    """``x -> mean of x over the ranks`` (identity for one rank), for loss normalisers that official code
    averages across devices (NanoDet's ``reduce_mean`` of the positive count)."""

    def __init__(self, group_size: int = 1) -> None:
        super().__init__()
        self.group_size = int(group_size)
        self.all_reduce = ops.AllReduce() if self.group_size > 1 else None

    def construct(self, x: Tensor) -> Tensor:
        if self.all_reduce is None:
            return x
        return self.all_reduce(x) / self.group_size


def gradient_reducer(parameters, info: DistInfo):
    """Mean all-reduce of gradients across ranks (only meaningful when ``info.enabled``)."""
    return nn.DistributedGradReducer(parameters, mean=True, degree=info.group_size)


def all_gather(x: np.ndarray, info: DistInfo) -> np.ndarray:
    """``[group_size, *x.shape]``: every rank's ``x`` in rank order, bit for bit (each rank passes the same shape
    and dtype, of 4 or 8 bytes). It travels as int32 words: MindSpore 2.8's CPU AllGather under PyNative keeps
    only 32 bits of each 64-bit element."""
    if not info.enabled:
        return x[None]
    x = np.ascontiguousarray(x)
    words = ops.AllGather()(Tensor(x.reshape(-1).view(np.int32))).asnumpy()
    return words.view(x.dtype).reshape(info.group_size, *x.shape)


def from_main(x: np.ndarray, info: DistInfo) -> np.ndarray:
    """Rank 0's ``x`` on every rank, bit for bit."""
    return all_gather(x, info)[0]
