"""Parameter counts and compute of both detectors at the COCO setting (params_coco.yaml: 80 classes, each model's
own input size)."""
from __future__ import annotations

from typing import Any

from msdet.config import Params
from msdet.detectors import get_detector
from msdet.models.flops import count_flops, count_trainable


def model_summary(params: Params, num_classes: int = 80) -> dict[str, dict[str, Any]]:
    """{model: {params_inference, params_train, gflops, gmacs, input_size}} at each model's ``params`` block
    (the COCO profile gives the official sizes); trainable parameters only, as PyTorch's ``parameters()``
    counts them (BN running statistics are buffers)."""
    out = {}
    for name in ("d0", "nanodet"):
        cfg = getattr(params, name)
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
