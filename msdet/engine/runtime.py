"""Process-wide MindSpore setup: device (a rank's own device and cores), execution mode and level, Ascend
operator precision, threads, the CPU kernels, seeds."""
from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

import numpy as np

from msdet import train_ops
from msdet.config import RuntimeConfig

if TYPE_CHECKING:
    from msdet.kernels.layer import KernelLayer

#: MindSpore 2.8's graph execution level per device (docs/distributed.md): O0 (kernel by kernel, no fusion) is
#: what 2.8 picks on CPU by itself and keeps each op's float rounding on every device; O2 (Ascend graph sink)
#: is what 2.8 would switch a rank-table launch to
JIT_LEVEL = {"CPU": "O0", "GPU": "O0", "Ascend": "O0"}


def wanted_kernels(cfg: RuntimeConfig, kernels: tuple[str, ...]) -> tuple[set[str], list[str]]:
    """(the kernels of ``kernels`` that ``cfg`` switches on, those of them turned off by its precision): on CPU
    only, all unless ``runtime.cpu_kernels`` is ``off``, less ``runtime.cpu_kernels_off``, less the float32-only
    activation kernels at an AMP level."""
    from msdet.engine.precision import ACTIVATION_KERNELS, is_mixed

    if cfg.device_target != "CPU" or cfg.cpu_kernels == "off":
        return set(), []
    wanted = set(kernels) - set(cfg.cpu_kernels_off)
    amp_off = []
    if is_mixed(cfg.precision):
        amp_off = [name for name in kernels if name in ACTIVATION_KERNELS and name in wanted]
        wanted -= set(ACTIVATION_KERNELS)
    return wanted, amp_off


def setup_runtime(cfg: RuntimeConfig, seed_offset: int = 0, kernels: KernelLayer | None = None) -> list[str]:
    """Set device target, graph/pynative mode, CPU threads and every seed before any network is built.

    ``kernels``: the CPU kernel layer of a training run (``msdet.kernels.layer.for_model(model)``, passed by the train
    stages only): the kernels of it that ``runtime.cpu_kernels`` / ``cpu_kernels_off`` / the precision leave on
    are built (those the host cannot build stay off, one printed line each) and used by the networks and steps
    built from now on. None (evaluation, export, inference, conversion): no kernel, none compiled, none imported
    (the layer is passed in, not imported here, so that those stages' code deps name no kernel source).
    Returns the kernels on."""
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's INFO/WARNING logs drown the progress bar
    import mindspore as ms

    from msdet.engine.distributed import device_id
    from msdet.engine.precision import ASCEND_PRECISION_MODE

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
    train_ops.clear()
    on: list[str] = []
    if kernels is not None:
        wanted, amp_off = wanted_kernels(cfg, kernels.kernels)
        if amp_off:
            print(f"runtime.precision {cfg.precision}: the float32-only CPU kernels {', '.join(amp_off)} are off",
                  flush=True)
        on = kernels.enable(wanted)
    seed = cfg.seed + seed_offset
    ms.set_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return on
