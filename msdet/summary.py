"""Parameter counts and compute of both detectors at the COCO setting (80 classes, each model's own size)."""
from __future__ import annotations

from typing import Any

from msdet.config import D0Config, NanoDetConfig
from msdet.detectors import get_detector
from msdet.models.flops import count_flops, count_trainable

#: each model's official input size on COCO
COCO_SETTING = {"d0": D0Config(input_size=512), "nanodet": NanoDetConfig(input_size=320)}


def model_summary(num_classes: int = 80) -> dict[str, dict[str, Any]]:
    """{model: {params_inference, params_train, gflops, gmacs, input_size}}; trainable parameters only,
    as PyTorch's ``parameters()`` counts them (BN running statistics are buffers)."""
    out = {}
    for name, cfg in COCO_SETTING.items():
        detector = get_detector(name, cfg, num_classes)
        network = detector.build_network()
        flops = count_flops(detector.inference_cell(network), (1, 3, cfg.input_size, cfg.input_size))
        out[name] = {
            "params_inference": count_trainable(network, tuple(detector.training_only_prefixes)),
            "params_train": count_trainable(network),
            "gflops": round(flops.gflops, 3),
            "gmacs": round(flops.gmacs, 3),
            "input_size": cfg.input_size,
            "num_classes": num_classes,
        }
    return out
