"""Process-wide MindSpore setup: device, execution mode, threads, the CPU kernels, seeds."""
from __future__ import annotations

import os
import random

import numpy as np

from msdet.config import RuntimeConfig


def setup_runtime(cfg: RuntimeConfig, seed_offset: int = 0) -> None:
    """Set device target, graph/pynative mode, CPU threads and every seed before any network is built."""
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's INFO/WARNING logs drown the progress bar
    import mindspore as ms

    from msdet.ops import activations, batchnorm, denseconv, dwconv, groupnorm, maxpool, sumsq, update

    ms.set_context(mode=ms.GRAPH_MODE if cfg.graph_mode else ms.PYNATIVE_MODE)
    ms.set_device(cfg.device_target)
    if cfg.cpu_threads:
        ms.set_context(runtime_num_threads=cfg.cpu_threads)
    dwconv.enable(cfg.cpu_depthwise_kernel and cfg.device_target == "CPU")
    groupnorm.enable(cfg.cpu_group_norm_kernel and cfg.device_target == "CPU")
    activations.enable(cfg.cpu_activation_kernel and cfg.device_target == "CPU")
    sumsq.enable(cfg.cpu_grad_norm_kernel and cfg.device_target == "CPU")
    update.enable(cfg.cpu_update_kernel and cfg.device_target == "CPU")
    maxpool.enable(cfg.cpu_maxpool_kernel and cfg.device_target == "CPU")
    batchnorm.enable(cfg.cpu_batch_norm_kernel and cfg.device_target == "CPU")
    denseconv.enable(cfg.cpu_dense_conv_kernel and cfg.device_target == "CPU")
    seed = cfg.seed + seed_offset
    ms.set_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
