"""Typed, validated view of ``params.yaml``.

``params.yaml`` is the only place hyperparameters live. Every stage calls :func:`load_params` once at
start; the YAML is checked against the dataclasses below (unknown keys, wrong types and out-of-range
values stop the stage with a message naming the key) and the stage then reads plain typed attributes.

The dataclasses hold types and constraints, never values: every field is required, so a value can only come
from params.yaml (with ``params_coco.yaml`` or ``dvc exp run -S`` on top), not from a default here that
could drift from it; tests build their configs from params.yaml too. A field's constraints are declared in
its ``metadata``: ``range=(lo, hi)`` (inclusive, ``None`` for open), ``choices=(...)``, ``multiple_of=N``.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params.yaml value is unknown, of the wrong type or out of range."""


def _f(**meta: Any) -> Any:
    """A required field and its constraints: the value comes from params.yaml, never from a default here."""
    return field(metadata=meta)


# --------------------------------------------------------------------------------------------------
# shared blocks

#: the C++ kernels of CPU training (``runtime.cpu_kernels_off`` names them), in the order msdet.kernels installs
#: them: depthwise_conv (depthwise 3x3/5x5 convs), dense_conv (dense k x k convs on oneDNN 3), batch_norm
#: (BatchNorm with the activation after it), activations (swish, LeakyReLU, the SE block's mean and gate),
#: group_norm (NanoDet-Plus's aux head, with its activation), max_pool (ShuffleNetV2's stem pool), upsample
#: (GhostPAN's x2 bilinear upsampling), grad_norm (gradient clipping's global norm), adamw_ema (AdamW and the EMA as
#: one op each over all tensors)
CPU_KERNELS = ("depthwise_conv", "dense_conv", "batch_norm", "activations", "group_norm", "max_pool", "upsample",
               "grad_norm", "adamw_ema")


@dataclass(frozen=True)
class LossScaleConfig:
    """MindSpore's ``amp.DynamicLossScaler`` (mixed precision only): the loss is multiplied by the scale before
    the backward pass and the gradients divided by it after, so that small float16 gradients do not flush to
    zero (Micikevicius et al. 2018, "Mixed Precision Training"). A step whose gradients are not finite is
    skipped and the scale divided by ``factor``; after ``window`` finite steps in a row it is multiplied by it."""

    initial: float = _f(range=(1.0, 2.0**24))
    factor: int = _f(range=(2, 1024))
    window: int = _f(range=(1, 10**9))


@dataclass(frozen=True)
class RuntimeConfig:
    device_target: str = _f(choices=("CPU", "GPU", "Ascend"))
    seed: int = _f(range=(0, 2**31 - 1))
    graph_mode: bool = _f()
    # Host threads for MindSpore's CPU kernels; 0 leaves MindSpore's default.
    cpu_threads: int = _f(range=(0, 1024))
    # The C++ kernels of CPU training (msdet/kernels, docs/performance.md "CPU kernels"): "auto" builds each that
    # the host supports (g++ at first use) and that the model uses, falling back per kernel to MindSpore's ops
    # with one printed line; "off" builds none. Same results within float rounding. GPU/Ascend, evaluation,
    # export and inference never use them.
    cpu_kernels: str = _f(choices=("auto", "off"))
    # Kernels to turn off singly under "auto" (A/B tests), by name: see CPU_KERNELS.
    cpu_kernels_off: list = _f()
    # Training precision (msdet/engine/precision.py, docs/precision.md): "fp32"; "amp_o1" (MindSpore's O1: convs and
    # dense layers in float16); "amp_o2" (O2: the network in float16 but its norm layers). Losses, assigners and box
    # decoding stay float32; the AMP levels add dynamic loss scaling (``loss_scale``). On Ascend the operator
    # precision mode is set to keep these dtypes ("must_keep_origin_dtype"), so that fp32 is float32 there too.
    precision: str = _f(choices=("fp32", "amp_o1", "amp_o2"))
    loss_scale: LossScaleConfig = _f()
    # Data-parallel training processes on this host (msrun); 1 = a single process.
    workers: int = _f(range=(1, 4096))
    # Ascend HCCL rank-table JSON, the MindSpore model zoo scripts' multi-device setup; "" = let msrun build
    # the cluster.
    rank_table: str = _f()
    # Hosts in the job (msrun on each, ``workers`` per host); this host's index 0..nodes-1; the scheduler's
    # address (node 0, reachable from every host) and port (0 = a free port, single host only).
    nodes: int = _f(range=(1, 4096))
    node_rank: int = _f(range=(0, 4095))
    master_addr: str = _f()
    master_port: int = _f(range=(0, 65535))
    # Wall-clock limit in seconds of a data-parallel job (msrun and its workers are stopped after it; a hung
    # collective otherwise waits for the backend's own timeout, HCCL_EXEC_TIMEOUT's 1836 s on Ascend); 0 = no limit.
    job_timeout_s: float = _f(range=(0.0, 1e8))


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded data set: shapes on textured backgrounds, made deterministically from ``seed``."""

    num_train: int = _f(range=(1, 1_000_000))
    num_val: int = _f(range=(1, 1_000_000))
    image_size: int = _f(range=(32, 4096))
    min_objects: int = _f(range=(1, 100))
    max_objects: int = _f(range=(1, 100))
    min_object_frac: float = _f(range=(0.01, 1.0))
    max_object_frac: float = _f(range=(0.01, 1.0))
    # How object sides are drawn between the two fractions: "uniform" in the side, or "log_uniform" (more
    # small objects, COCO-like).
    size_sampling: str = _f(choices=("uniform", "log_uniform"))
    # The first N of the six shape classes (circle, square, triangle, cross, ring, star).
    num_classes: int = _f(range=(4, 6))
    # Objects are rotated by a random angle in [-max_rotation_deg, max_rotation_deg].
    max_rotation_deg: float = _f(range=(0.0, 180.0))
    seed: int = _f(range=(0, 2**31 - 1))


@dataclass(frozen=True)
class SplitSpec:
    # format coco: the folder the JSON's file_name entries are relative to, and the JSON file.
    images: str = _f()
    annotations: str = _f()


@dataclass(frozen=True)
class OwnDataConfig:
    """A data set of one's own (``data.source: own``), converted by msdet/data/own.py into a COCO tree."""

    format: str = _f(choices=("coco", "voc", "yolo"))
    # voc: the folder with Annotations/, JPEGImages/ (and ImageSets/Main/); yolo: a data.yaml, or a folder
    # with images/ and labels/ (flat, or train/ and val/ inside each). Unused for coco.
    path: str = _f()
    train: SplitSpec = _f()
    # Empty: the validation images are split off the training set (val_fraction, split_seed).
    val: SplitSpec = _f()
    # Class names in index order: required for yolo without a data.yaml; voc: fixes the order (else sorted).
    names: list = _f()
    val_fraction: float = _f(range=(0.0, 0.9))
    split_seed: int = _f(range=(0, 2**31 - 1))
    # apply: boxes refer to the photo as displayed (EXIF orientation applied, as browsers, CVAT, Label Studio,
    # ultralytics and detectron2 show it); ignore: to the stored pixel grid.
    exif_orientation: str = _f(choices=("apply", "ignore"))
    # Longer image side kept; larger images are downscaled at conversion (boxes follow). 0 = keep all.
    max_image_side: int = _f(range=(0, 65536))
    # Refuse boxes outside their image or of non-positive size, and image sizes that disagree with the
    # annotation, instead of dropping / correcting them (counted in metrics/data.json either way).
    strict: bool = _f()
    workers: int = _f(range=(1, 256))


@dataclass(frozen=True)
class DataConfig:
    # "synthetic" (embedded set, made on the spot), "coco2017" (downloaded), "own" (data.own, converted), or a
    # path to a local tree laid out like COCO 2017 (used in place).
    source: str = _f()
    # Where the download stage materialises the COCO-format tree.
    root: str = _f()
    synthetic: SyntheticConfig = _f()
    own: OwnDataConfig = _f()


@dataclass(frozen=True)
class DownloadConfig:
    base_url: str = _f()
    retries: int = _f(range=(0, 100))
    backoff_seconds: float = _f(range=(0.0, 600.0))
    timeout_seconds: float = _f(range=(1.0, 3600.0))
    chunk_bytes: int = _f(range=(1024, 1 << 30))
    # Keep the zips in <root>/downloads after extraction (else DVC would also cache ~20 GB of archives).
    keep_archives: bool = _f()


@dataclass(frozen=True)
class MindrecordConfig:
    out_dir: str = _f()
    train_shards: int = _f(range=(1, 1000))
    val_shards: int = _f(range=(1, 1000))
    workers: int = _f(range=(1, 256))
    # Keep training images that have no (non-crowd) annotation as pure-background samples.
    keep_empty_images: bool = _f()
    skip_bad_images: bool = _f()
    # Boxes narrower or lower than this (pixels, after clipping to the image) are dropped.
    min_box_side: float = _f(range=(0.0, 1e4))
    # A warning names the classes with fewer training boxes than this (and val classes train lacks).
    min_class_boxes: int = _f(range=(0, 10**9))


# --------------------------------------------------------------------------------------------------
# training (one engine, one schema; each model block carries its own values)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _f(range=(1, 100_000))
    batch_size: int = _f(range=(1, 4096))
    optimizer: str = _f(choices=("sgd", "adamw"))
    # Peak learning rate at ``lr_reference_batch`` images per step; scaled linearly with the global batch
    # when ``scale_lr_with_batch`` is set.
    lr: float = _f(range=(0.0, 10.0))
    lr_reference_batch: int = _f(range=(1, 1 << 20))
    scale_lr_with_batch: bool = _f()
    warmup_steps: int = _f(range=(0, 10**9))
    warmup_ratio: float = _f(range=(0.0, 1.0))
    # Cosine decay ends at lr * min_lr_ratio.
    min_lr_ratio: float = _f(range=(0.0, 1.0))
    weight_decay: float = _f(range=(0.0, 1.0))
    # automl exempts BN scales and biases from weight decay; nanodet's AdamW decays every tensor.
    decay_norm_and_bias: bool = _f()
    momentum: float = _f(range=(0.0, 1.0))
    grad_clip_norm: float = _f(range=(0.0, 1e6))
    ema_decay: float = _f(range=(0.0, 1.0))
    # EMA decay ramps up as decay * (1 - exp(-step / ema_ramp_steps)) (nanodet: 2000).
    ema_ramp_steps: float = _f(range=(1.0, 1e9))
    # Padded ground-truth boxes per image (static shapes: the step compiles once); 0 = from the data, the
    # most boxes on one training image rounded up to a multiple of 8 (metrics/data.json: gt_padding).
    max_gt_boxes: int = _f(range=(0, 1000))
    num_workers: int = _f(range=(1, 64))
    # Steps between live rows (mean losses over them). The host reads the losses only then, at resume points and at
    # epoch ends, so a NaN/inf loss stops training within this many steps and before any checkpoint of it.
    log_every_steps: int = _f(range=(1, 10**6))
    # Stop after this many steps per epoch (0 = the whole epoch); used by tiny test configs and benchmarks.
    max_steps_per_epoch: int = _f(range=(0, 10**9))
    # Precise BN: before saving, BN statistics are recomputed over this many training batches with the
    # final (and the EMA) weights; 0 keeps the running averages (msdet/engine/batch_norm_stats.py).
    bn_recalibration_batches: int = _f(range=(0, 10**6))
    # Micro-batches of ``batch_size`` whose gradients are summed before one optimizer step: the effective
    # global batch is batch_size x devices x accumulate_steps (lr scaling, warmup, EMA and the loss
    # normalisers follow it; BatchNorm still sees micro-batches). See msdet/engine/accumulate.py.
    accumulate_steps: int = _f(range=(1, 4096))
    # Also save the resume state every this many optimizer steps inside an epoch (0 = at epoch ends only);
    # a killed run continues from there with identical results (msdet/engine/resume.py).
    checkpoint_every_steps: int = _f(range=(0, 10**9))
    # Validate the EMA weights (COCO AP on the val split, eval block's post-processing) every this many epochs
    # and keep the best by AP as best.ckpt; 0 = off. automl evaluates every 5 epochs, nanodet every 10.
    eval_every_epochs: int = _f(range=(0, 100_000))
    # Validate on the first N val images only (a fixed subset, cheaper); 0 = the whole val split.
    eval_max_images: int = _f(range=(0, 10**9))


@dataclass(frozen=True)
class D0AugmentConfig:
    scale_min: float = _f(range=(0.01, 10.0))
    scale_max: float = _f(range=(0.01, 10.0))
    flip_prob: float = _f(range=(0.0, 1.0))


@dataclass(frozen=True)
class D0Config:
    input_size: int = _f(range=(128, 4096), multiple_of=128)
    # "none", a path (under weights/) to a checkpoint of EfficientNet-B0, or "mindcv" (ImageNet weights, online);
    # see msdet/conversion/pretrained.py
    pretrained_backbone: str = _f()
    # "none" or a checkpoint of the whole detector (ours or converted from the official weights).
    init: str = _f()
    drop_connect_rate: float = _f(range=(0.0, 0.9))
    anchor_scale: float = _f(range=(0.1, 100.0))
    # "default": automl's ratios and anchor_scale; "fit": the ratios and scale the mindrecord stage fitted to
    # the training boxes (msdet/ops/anchor_fit.py, meta.json "d0_anchors"), carried by the checkpoints.
    anchors: str = _f(choices=("default", "fit"))
    # Anchor matching: IoU >= pos_iou positive, < neg_iou background, in between ignored. automl: 0.5 / 0.5 (no
    # ignored anchors, anchors.py AnchorLabeler); zylo117: 0.5 / 0.4.
    pos_iou: float = _f(range=(0.0, 1.0))
    neg_iou: float = _f(range=(0.0, 1.0))
    focal_alpha: float = _f(range=(0.0, 1.0))
    # automl hparams_config.py: 1.5; zylo117 loss.py: 2.0.
    focal_gamma: float = _f(range=(0.0, 10.0))
    box_loss_weight: float = _f(range=(0.0, 1e4))
    huber_delta: float = _f(range=(1e-6, 10.0))
    # Box/class net depthwise fan_in: "automl" (Keras, kh*kw*in_channels) or "zylo117" (kh*kw, 8x larger std).
    # From-scratch only: converted official weights or d0.init replace it.
    head_init: str = _f(choices=("automl", "zylo117"))
    train: TrainConfig = _f()
    augment: D0AugmentConfig = _f()


@dataclass(frozen=True)
class NanoDetAugmentConfig:
    scale_min: float = _f(range=(0.01, 10.0))
    scale_max: float = _f(range=(0.01, 10.0))
    stretch_min: float = _f(range=(0.01, 10.0))
    stretch_max: float = _f(range=(0.01, 10.0))
    translate: float = _f(range=(0.0, 1.0))
    flip_prob: float = _f(range=(0.0, 1.0))
    brightness: float = _f(range=(0.0, 1.0))
    contrast_min: float = _f(range=(0.0, 10.0))
    contrast_max: float = _f(range=(0.0, 10.0))
    saturation_min: float = _f(range=(0.0, 10.0))
    saturation_max: float = _f(range=(0.0, 10.0))


@dataclass(frozen=True)
class NanoDetConfig:
    input_size: int = _f(range=(64, 4096), multiple_of=64)
    pretrained_backbone: str = _f()
    init: str = _f()
    reg_max: int = _f(range=(1, 64))
    detach_epoch: int = _f(range=(0, 100_000))
    assigner_topk: int = _f(range=(1, 1000))
    assigner_iou_factor: float = _f(range=(0.0, 100.0))
    qfl_beta: float = _f(range=(0.0, 10.0))
    qfl_weight: float = _f(range=(0.0, 100.0))
    dfl_weight: float = _f(range=(0.0, 100.0))
    giou_weight: float = _f(range=(0.0, 100.0))
    train: TrainConfig = _f()
    augment: NanoDetAugmentConfig = _f()


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = _f(range=(1, 4096))
    score_threshold: float = _f(range=(0.0, 1.0))
    # Per model: D0 0.5, NanoDet 0.6, as the official implementations.
    nms_iou_d0: float = _f(range=(0.0, 1.0))
    nms_iou_nanodet: float = _f(range=(0.0, 1.0))
    max_detections: int = _f(range=(1, 10_000))
    # Highest-scoring (anchor, class) candidates per image kept before NMS, bounding its cost.
    pre_nms_top_k: int = _f(range=(1, 1_000_000))
    num_plot_images: int = _f(range=(0, 1000))
    # Weights the eval stage scores: "ema" (the end of training) or "best" (best validated epoch, best.ckpt).
    checkpoint: str = _f(choices=("ema", "best"))


#: the export formats, in upper case; the first is the primary one (msdet/export/exporter.py)
EXPORT_FORMATS = ("MINDIR", "ONNX")


@dataclass(frozen=True)
class ExportConfig:
    # Any of EXPORT_FORMATS, in any case.
    formats: list = _f()
    # MINDIR failing its check always fails the stage; strict: a failing ONNX too (else recorded, warned).
    strict: bool = _f()
    # Raw outputs, per output tensor: max|exported - network| <= atol + rtol * max|network|.
    atol: float = _f(range=(0.0, 1.0))
    rtol: float = _f(range=(0.0, 1.0))
    # Decoded detections (eval post-processing, network-input pixels): paired boxes and scores within these.
    box_atol_px: float = _f(range=(0.0, 100.0))
    score_atol: float = _f(range=(0.0, 1.0))
    num_check_images: int = _f(range=(1, 1000))
    latency_repeats: int = _f(range=(1, 10_000))
    # model_e2e.onnx (decoding + NMS appended to the ONNX export): its val AP must equal the network's within this.
    end_to_end: bool = _f()
    # model_e2e.mindir: the same post-processing in MindSpore ops (NMSWithMask), verified like model_e2e.onnx
    end_to_end_mindir: bool = _f()
    e2e_ap_atol: float = _f(range=(0.0, 1.0))
    # model_e2e_int8.onnx: onnxruntime static INT8 (QDQ), calibrated on the first N training images.
    int8: bool = _f()
    int8_calibration_images: int = _f(range=(1, 100_000))
    int8_per_channel: bool = _f()


@dataclass(frozen=True)
class Params:
    runtime: RuntimeConfig = _f()
    data: DataConfig = _f()
    download: DownloadConfig = _f()
    mindrecord: MindrecordConfig = _f()
    d0: D0Config = _f()
    nanodet: NanoDetConfig = _f()
    eval: EvalConfig = _f()
    export: ExportConfig = _f()


# --------------------------------------------------------------------------------------------------
# validation


def _check_value(key: str, value: Any, tp: Any, meta: dict, source: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, source, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):  # X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        tp = args[0]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):  # NaN passes every range comparison; .inf would pass an open bound
            raise ConfigError(f"{source}: '{key}' = {value!r} must be a finite number")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    elif tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
    lo_hi = meta.get("range")
    if lo_hi is not None:
        lo, hi = lo_hi
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{source}: '{key}' = {value!r} is out of range [{lo}, {hi}]")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{source}: '{key}' = {value!r} is not one of {list(choices)}")
    mult = meta.get("multiple_of")
    if mult is not None and value % mult != 0:
        raise ConfigError(f"{source}: '{key}' = {value!r} must be a multiple of {mult}")
    return value


def from_dict(cls: type, data: dict, source: str = "params.yaml", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and bad values by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"allowed under '{prefix.rstrip('.') or '<top>'}': {', '.join(sorted(fields))}"
        )
    missing = [name for name in fields if name not in data]
    if missing:
        raise ConfigError(
            f"{source}: missing key(s) {', '.join(prefix + k for k in missing)}; every key of the project's "
            f"params.yaml must be set")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check_value(prefix + name, value, hints[name], dict(fields[name].metadata), source)
    obj = cls(**kwargs)
    _check_cross(obj, source, prefix)
    return obj


def _check_own(own: OwnDataConfig, source: str, prefix: str) -> None:
    """What each format of ``data.own`` needs (checked when ``data.source`` is ``own``)."""
    key = f"{prefix}own."
    if own.format == "coco":
        if not (own.train.images and own.train.annotations):
            raise ConfigError(f"{source}: format coco needs '{key}train.images' and '{key}train.annotations'")
        if bool(own.val.images) != bool(own.val.annotations):
            raise ConfigError(f"{source}: give both '{key}val.images' and '{key}val.annotations', or neither")
    elif not own.path:
        raise ConfigError(f"{source}: format {own.format} needs '{key}path'")
    if not all(isinstance(n, str) and n for n in own.names) or len(set(own.names)) != len(own.names):
        raise ConfigError(f"{source}: '{key}names' must be distinct non-empty strings, got {own.names!r}")


def _check_cross(obj: Any, source: str, prefix: str) -> None:
    """Constraints between fields of one block."""
    if isinstance(obj, DataConfig) and obj.source == "own":
        _check_own(obj.own, source, prefix)
    pairs = [("min_objects", "max_objects"), ("min_object_frac", "max_object_frac"), ("scale_min", "scale_max"),
             ("stretch_min", "stretch_max"), ("contrast_min", "contrast_max"), ("saturation_min", "saturation_max"),
             ("neg_iou", "pos_iou")]
    for lo, hi in pairs:
        if hasattr(obj, lo) and hasattr(obj, hi) and getattr(obj, lo) > getattr(obj, hi):
            raise ConfigError(f"{source}: '{prefix}{lo}' ({getattr(obj, lo)}) must not exceed "
                              f"'{prefix}{hi}' ({getattr(obj, hi)})")
    if isinstance(obj, ExportConfig):
        bad = [f for f in obj.formats if not isinstance(f, str) or f.upper() not in EXPORT_FORMATS]
        if bad or not obj.formats:
            raise ConfigError(f"{source}: '{prefix}formats' = {obj.formats!r} must be a non-empty list of "
                              f"{', '.join(EXPORT_FORMATS)}" + (f"; unknown: {bad!r}" if bad else ""))
    if isinstance(obj, RuntimeConfig):
        bad = [k for k in obj.cpu_kernels_off if k not in CPU_KERNELS]
        if bad:
            raise ConfigError(f"{source}: '{prefix}cpu_kernels_off' names unknown kernel(s) "
                              f"{', '.join(map(repr, bad))}; valid: {', '.join(CPU_KERNELS)}")
        if obj.node_rank >= obj.nodes:
            raise ConfigError(f"{source}: '{prefix}node_rank' ({obj.node_rank}) must be below "
                              f"'{prefix}nodes' ({obj.nodes})")
        if obj.nodes > 1 and (obj.master_port == 0 or not obj.master_addr.strip()):
            raise ConfigError(f"{source}: '{prefix}nodes' is {obj.nodes}: every host must be given the same "
                              f"'{prefix}master_addr' (node 0's address) and a fixed '{prefix}master_port' "
                              f"(got {obj.master_addr!r}:{obj.master_port})")


def read_yaml(path: str | Path) -> dict:
    """A params or overlay file as a mapping; a missing file or bad YAML is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of params")
    return raw


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None,
                overlay: str | Path | None = None) -> Params:
    """Read and validate ``path``; an ``overlay`` file (e.g. params_coco.yaml) and then ``overrides`` (nested
    dict, for tests and tools) are merged on top."""
    raw = read_yaml(path)
    if overlay is not None:
        raw = merge(raw, read_yaml(overlay))
    if overrides:
        raw = merge(raw, overrides)
    return from_dict(Params, raw, str(path) if overlay is None else f"{path} + {overlay}")


def merge(base: dict, over: dict) -> dict:
    """Recursive dict merge: ``over`` wins; neither input is modified."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mapping -> [("a.b.c", value)], the form ``dvc exp run -S a.b.c=value`` takes."""
    out: list[tuple[str, Any]] = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.extend(flatten(v, key + ".") if isinstance(v, dict) else [(key, v)])
    return out
