"""Process-wide MindSpore setup: device (a rank's own device and cores), execution mode and level, Ascend
operator precision, threads, the CPU kernels, seeds."""
from __future__ import annotations

import os
import random

import numpy as np

from msdet.config import RuntimeConfig

#: MindSpore 2.8's graph execution level per device (docs/distributed.md): O0 (kernel by kernel, no fusion) is
#: what 2.8 picks on CPU by itself and keeps each op's float rounding on every device; O2 (Ascend graph sink)
#: is what 2.8 would switch a rank-table launch to
JIT_LEVEL = {"CPU": "O0", "GPU": "O0", "Ascend": "O0"}


def setup_runtime(cfg: RuntimeConfig, seed_offset: int = 0) -> None:
    """Set device target, graph/pynative mode, CPU threads and every seed before any network is built."""
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's INFO/WARNING logs drown the progress bar
    import mindspore as ms

    from msdet.engine.distributed import device_id
    from msdet.engine.precision import ACTIVATION_KERNELS, ASCEND_PRECISION_MODE, is_mixed
    from msdet.ops import activations, batchnorm, denseconv, dwconv, groupnorm, maxpool, sumsq, update

    ms.set_context(mode=ms.GRAPH_MODE if cfg.graph_mode else ms.PYNATIVE_MODE,
                   jit_config={"jit_level": JIT_LEVEL[cfg.device_target]})
    device = device_id(cfg.device_target)
    ms.set_device(cfg.device_target, *([] if device is None else [device]))
    if device is not None:  # one rank per device: its host threads on the cores near it (docs/distributed.md)
        ms.runtime.set_cpu_affinity(True)
    if cfg.device_target == "Ascend":  # else Atlas training series run float32 convs in float16 (docs/precision.md)
        ms.device_context.ascend.op_precision.precision_mode(ASCEND_PRECISION_MODE)
    if cfg.cpu_threads:
        ms.set_context(runtime_num_threads=cfg.cpu_threads)
    cpu = cfg.device_target == "CPU"
    kernel = {name: getattr(cfg, name) and cpu for name in dir(cfg)
              if name.startswith("cpu_") and name.endswith("_kernel")}
    if is_mixed(cfg.precision):
        off = [name for name in ACTIVATION_KERNELS if kernel[name]]
        if off:
            print(f"runtime.precision {cfg.precision}: the float32-only CPU kernels {', '.join(off)} are off",
                  flush=True)
        kernel.update(dict.fromkeys(ACTIVATION_KERNELS, False))
    dwconv.enable(kernel["cpu_depthwise_kernel"])
    groupnorm.enable(kernel["cpu_group_norm_kernel"])
    activations.enable(kernel["cpu_activation_kernel"])
    sumsq.enable(kernel["cpu_grad_norm_kernel"])
    update.enable(kernel["cpu_update_kernel"])
    maxpool.enable(kernel["cpu_maxpool_kernel"])
    batchnorm.enable(kernel["cpu_batch_norm_kernel"])
    denseconv.enable(kernel["cpu_dense_conv_kernel"])
    seed = cfg.seed + seed_offset
    ms.set_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
