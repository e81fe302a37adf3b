"""Train one of our detectors from validated params: the library behind ``stages/train.py``."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msdet.config import Params, RuntimeConfig
from msdet.data.meta import read_meta
from msdet.detectors import build_detector
from msdet.engine.checkpoint import CheckpointError, load_weights, read_checkpoint, sha256_file
from msdet.engine.distributed import DistInfo, init_distributed, rank_seed
from msdet.engine.precision import is_mixed
from msdet.engine.runtime import setup_runtime
from msdet.engine.trainer import TrainData, Trainer, TrainSummary
from msdet.kernels import layer as cpu_kernels
from msdet.models.flops import count_flops, count_trainable


def init_from_checkpoint(detector, network, path: str) -> list[str]:
    """Start from a whole-detector checkpoint (ours or converted); class-head tensors whose shape differs
    (another number of classes) keep their fresh initialisation. Returns the names re-initialised."""
    params = read_checkpoint(path)
    head = set(detector.class_head_param_names(network))
    reinit = [p.name for p in network.get_parameters()
              if p.name in head and p.name in params and tuple(params[p.name].shape) != tuple(p.shape)]
    load_weights(network, path, strict=True, skip=reinit)
    return reinit


#: where the files a training run starts from (``<model>.init``, ``<model>.pretrained_backbone``) live: the
#: train stages depend on this directory, so replacing a file there retrains.
STARTING_WEIGHTS_DIR = "weights"


def starting_weight_files(mcfg: Any, model: str) -> dict[str, Path]:
    """``{"<model>.init" | "<model>.pretrained_backbone": path}`` for the options that name a local file."""
    out = {}
    for key in ("init", "pretrained_backbone"):
        value = getattr(mcfg, key)
        if value not in ("", "none", "mindcv"):
            out[f"{model}.{key}"] = Path(value)
    return out


def check_starting_weights_tracked(mcfg: Any, model: str, root: str | Path = ".") -> None:
    """A DVC train stage only notices a changed file inside its dependency ``weights/``: refuse others."""
    tracked = (Path(root) / STARTING_WEIGHTS_DIR).resolve()
    for key, path in starting_weight_files(mcfg, model).items():
        full = (Path(root) / path).resolve()
        if tracked not in full.parents:
            raise ValueError(f"{key} = {path}: a checkpoint the train stage starts from must live under "
                             f"{STARTING_WEIGHTS_DIR}/ (a dependency of train_{model}, so replacing it retrains); "
                             f"move or copy it there")


def run_key_payload(params: Params, model: str, meta: dict, start_files: dict[str, str],
                    code_sha256: str, kernels: dict[str, Any] | None = None) -> dict[str, Any]:
    """What makes two training runs the same run, so that one may resume the other's state: the model's params
    (not how often the state is saved), the seed, the data, the starting weights, the code, and the runtime
    settings that change the float rounding of a step - device, graph mode, precision and loss scaling, CPU
    threads, and the CPU kernels that run (``kernels``: :func:`msdet.kernels.layer.report`, taken after
    ``setup_runtime``). The kernels are keyed by what actually runs, not by ``runtime.cpu_kernels`` /
    ``cpu_kernels_off``: a run resumed on a host where another set of kernels builds (no g++, no oneDNN headers,
    a switch changed), or where they are built by another compiler or for another instruction set, would
    continue the old run's weights with other numerics, so it is another run (its resume point is set aside, not
    continued); a switch that changes nothing (on GPU, say) keeps the run. With no kernel on, the compiler and
    ISA are left out: they then change nothing."""
    model_key = dataclasses.asdict(getattr(params, model))
    del model_key["train"]["checkpoint_every_steps"]
    numerics = {k: v for k, v in dataclasses.asdict(params.runtime).items()
                if k in ("device_target", "graph_mode", "precision", "loss_scale", "cpu_threads")}
    kernels = kernels or {"kernels": []}
    numerics["cpu_kernels"] = kernels if kernels["kernels"] else {"kernels": []}
    return {"model": model_key, "runtime_seed": params.runtime.seed, "runtime_numerics": numerics, "meta": meta,
            "starting_weights_sha256": start_files, "code_sha256": code_sha256}


def train_model(params: Params, model: str, mindrecord_dir: str | Path, out_dir: str | Path,
                live_dir: str | Path | None = None, stop_after_epochs: int | None = None,
                progress: bool = True, validate: Callable[[Any, Any, DistInfo], dict[str, float]] | None = None,
                code_sha256: str = "") -> dict | None:
    """Train ``model`` ("d0" | "nanodet"); writes ``out_dir`` (see msdet.engine.trainer) and the model card.

    ``live_dir``: the dvclive directory of the run's metrics. ``validate(detector, network, dist)`` -> {"AP",
    "AP50"}, the same on every rank, is called every ``<model>.train.eval_every_epochs`` epochs on every rank
    (msdet.evaluation.runner.Validator).
    ``code_sha256``: the fingerprint of the code that trains (the stage's import closure); a resume point left
    by other code, like one left by other params, data or starting weights, is not continued.
    Works the same on one process and under msrun: every rank trains on its own shard, rank 0 writes.
    Returns the model card (rank 0) or None.
    """
    from msdet.data.pipeline import create_train_dataset, epoch_order, num_samples, resolve_max_gt_boxes

    # the device must be set before communication.init(); training alone turns the CPU kernel layer on
    setup_runtime(params.runtime, kernels=cpu_kernels.for_model(model))
    kernel_report = cpu_kernels.report()
    dist: DistInfo = init_distributed()
    mcfg = getattr(params, model)
    tcfg = mcfg.train
    meta = read_meta(mindrecord_dir)
    detector = build_detector(params, model, int(meta["num_classes"]))
    detector.fit_to_data(meta, str(Path(mindrecord_dir) / "meta.json"))
    network = detector.build_network()
    reinit: list[str] = []
    backbone_load = None
    if mcfg.init != "none":
        reinit = init_from_checkpoint(detector, network, mcfg.init)
    elif mcfg.pretrained_backbone != "none":
        backbone_load = detector.load_pretrained_backbone(network, mcfg.pretrained_backbone).card()

    max_gt_boxes = resolve_max_gt_boxes(tcfg.max_gt_boxes, mindrecord_dir)

    def make_dataset(epoch: int, skip_batches: int = 0):
        return create_train_dataset(
            mindrecord_dir, model=model, input_size=mcfg.input_size, augment_cfg=mcfg.augment,
            batch_size=tcfg.batch_size, max_gt_boxes=max_gt_boxes, num_workers=tcfg.num_workers,
            seed=params.runtime.seed, epoch=epoch, rank=dist.rank, group_size=dist.group_size,
            local_ranks=params.runtime.workers if dist.enabled else 1, skip_batches=skip_batches)

    n_train = num_samples(mindrecord_dir, "train")
    data = TrainData(make_dataset=make_dataset, num_train_images=n_train,
                     shard_of_epoch=lambda epoch: epoch_order(n_train, params.runtime.seed, epoch, dist.rank,
                                                              dist.group_size, True),
                     make_dataset_from=make_dataset)
    # the starting files' content is part of the run: a replaced file must not resume the old run's state
    start_files = {key: sha256_file(path) for key, path in starting_weight_files(mcfg, model).items()}
    payload = run_key_payload(params, model, meta, start_files, code_sha256, kernel_report)
    if dist.rank:  # after the weights are made (identical on every rank); rank 0 keeps setup_runtime's seed
        import mindspore as ms

        ms.set_seed(rank_seed(params.runtime.seed, dist.rank))
    trainer = Trainer(detector, network, tcfg, data, out_dir, dist=dist, key_payload=payload, progress=progress,
                      live_dir=live_dir, validate=(lambda net: validate(detector, net, dist)) if validate else None,
                      precision=params.runtime.precision, loss_scale=params.runtime.loss_scale)
    summary = trainer.fit(stop_after_epochs=stop_after_epochs)
    if not trainer.finished():
        return None
    if not dist.is_main:
        return None
    card = model_card(detector, network, mcfg, meta, summary, dist, reinit, start_files, backbone_load,
                      precision_card(params.runtime, summary), kernel_report)
    trainer.write_final(card)  # the card is part of the checkpoint set
    return card


def precision_card(runtime: RuntimeConfig, summary: TrainSummary) -> dict[str, Any]:
    """How the weights were trained: ``runtime.precision``, and for an AMP level the loss scaling settings, the
    scale at the end and the optimizer steps skipped for non-finite gradients. The weights are float32 either
    way."""
    if not is_mixed(runtime.precision):
        return {"mode": runtime.precision}
    return {"mode": runtime.precision, "loss_scale": dataclasses.asdict(runtime.loss_scale),
            "final_loss_scale": summary.extra["loss_scale"], "skipped_steps": summary.extra["skipped_steps"]}


def model_card(detector, network, mcfg, meta: dict, summary: TrainSummary, dist: DistInfo,
               reinit: list[str], start_files: dict[str, str],
               backbone_load: dict[str, Any] | None = None, precision: dict[str, Any] | None = None,
               cpu_kernels: dict[str, Any] | None = None) -> dict[str, Any]:
    """``backbone_load``: what loading ``pretrained_backbone`` did (``BackboneLoad.card()``: source, layout,
    tensors loaded, tensors that kept their initialisation, adaptations such as the BatchNorm eps fold);
    ``precision``: :func:`precision_card`; ``cpu_kernels``: the CPU kernels that ran, the compiler and the
    instruction set (:func:`msdet.kernels.layer.report`)."""
    flops = count_flops(detector.inference_cell(network), (1, 3, mcfg.input_size, mcfg.input_size))
    return {
        "model": detector.name,
        "architecture": detector.architecture,
        "input_size": mcfg.input_size,
        **detector.weights_meta(),
        "num_classes": detector.num_classes,
        "classes": [c["name"] for c in meta["categories"]],
        "category_ids": [c["id"] for c in meta["categories"]],
        "params_train": count_trainable(network),
        "params_inference": count_trainable(network, tuple(detector.training_only_prefixes)),
        "gflops": round(flops.gflops, 3),
        "gmacs": round(flops.gmacs, 3),
        "epochs": summary.epochs,
        "steps": summary.steps,
        "global_batch": summary.global_batch,
        "devices": dist.group_size,
        "precision": precision,
        "cpu_kernels": cpu_kernels,
        "wall_time_s": summary.wall_time_s,
        "train_images_per_s": summary.images_per_s,
        "compile_time_s": summary.compile_time_s,
        "resumed_from_epoch": summary.resumed_from_epoch,
        "final_losses": summary.final_losses,
        "validation": {"every_epochs": mcfg.train.eval_every_epochs, "max_images": mcfg.train.eval_max_images,
                       "best": summary.best},
        "init": mcfg.init,
        "pretrained_backbone": mcfg.pretrained_backbone,
        "pretrained_backbone_load": backbone_load,
        "class_head_reinitialised": reinit,
        "starting_weights_sha256": start_files,
        "weights": {"ema": "ema.ckpt", "final": "final.ckpt", "best": "best.ckpt"},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


__all__ = ["train_model", "model_card", "init_from_checkpoint", "CheckpointError",
           "STARTING_WEIGHTS_DIR", "starting_weight_files", "check_starting_weights_tracked"]
