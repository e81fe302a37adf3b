"""The measurements, each run in a process of its own (``python -m msdet.bench.sections SECTION ...``).

One process per section and model keeps MindSpore's process-wide settings (context options, compiled
graphs, thread pools) and the peak resident memory of one model apart from the others'. Each function
returns a dict of figures (see :mod:`msdet.bench.stats` for the summaries); the command line writes it,
with the process's peak RSS, to a JSON file the parent (:mod:`msdet.bench.runner`) collects.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msdet.bench.stats import rates, summarize
from msdet.config import Params, load_params

SECTIONS = ("micro", "train", "data", "mindrecord", "eval", "export", "profile")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _cpu_seconds() -> float:
    """User + system CPU time of every thread of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call. On a shared machine the CPU time moves far less with other
    people's load than the wall time does, so it tells a real change from noise."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu_seconds() - c0


def _sync(out: Any) -> Any:
    """Wait for MindSpore's asynchronous results by copying every output to the host."""
    if isinstance(out, (tuple, list)):
        return [_sync(o) for o in out]
    return out.asnumpy() if hasattr(out, "asnumpy") else out


def apply_context(options: dict[str, Any]) -> None:
    """Extra MindSpore options after ``setup_runtime``: ``jit_level`` goes into ``jit_config``, anything
    else straight to ``mindspore.set_context`` (e.g. enable_graph_kernel, runtime_num_threads)."""
    import mindspore as ms

    for key, value in options.items():
        if key == "jit_level":
            ms.set_context(jit_config={"jit_level": str(value)})
        else:
            ms.set_context(**{key: value})


def setup(params: Params, context: dict[str, Any], train_model: str | None = None) -> None:
    """``setup_runtime`` and the extra options; ``train_model``: the model whose training is measured, whose CPU
    kernel layer is then switched on as the train stage does (``runtime.cpu_kernels``)."""
    from msdet.engine.runtime import setup_runtime

    kernels = None
    if train_model is not None:
        from msdet.kernels import layer

        kernels = layer.for_model(train_model)
    setup_runtime(params.runtime, kernels=kernels)
    apply_context(context)


def dataset_num_classes(mindrecord_dir: str | Path) -> int:
    """Classes of the converted data set, or of the embedded synthetic set when there is none yet."""
    from msdet.data.meta import meta_path, num_classes

    if meta_path(mindrecord_dir).is_file():
        return num_classes(mindrecord_dir)
    from msdet.data.synthetic import CATEGORIES

    return len(CATEGORIES)


# --------------------------------------------------------------------------------------------------
# micro: single convolutions, the framework-regression guard


@dataclass(frozen=True)
class ConvCase:
    """A 2-D convolution ``batch x in_ch x hw x hw -> out_ch``, ``kernel`` x ``kernel``, stride 1, same padding."""

    name: str
    batch: int
    in_ch: int
    out_ch: int
    hw: int
    kernel: int
    groups: int = 1

    @property
    def label(self) -> str:
        return f"{self.name}_{self.batch}x{self.in_ch}x{self.hw}x{self.hw}_to_{self.out_ch}"


#: The regression case (MindSpore 2.8 ~26 ms forward here, 2.9/2.10 ~5.5 s) and ShuffleNetV2's depthwise
#: convolutions at the same shape.
REGRESSION_CASES = (
    ConvCase("conv3x3", 16, 116, 116, 40, 3),
    ConvCase("dwconv3x3", 16, 116, 116, 40, 3, groups=116),
    ConvCase("dwconv5x5", 16, 116, 116, 40, 5, groups=116),
)


def bench_micro(cases: Sequence[ConvCase] = REGRESSION_CASES, repeats: int = 10) -> dict[str, Any]:
    """Graph-mode forward and forward+backward (input and weight gradients) time of each case."""
    import mindspore as ms
    from mindspore import Tensor, nn

    class SumOf(nn.Cell):
        def __init__(self, net: nn.Cell) -> None:
            super().__init__()
            self.net = net

        def construct(self, x):
            return self.net(x).sum()

    class ForwardBackward(nn.Cell):
        def __init__(self, net: nn.Cell) -> None:
            super().__init__()
            self.loss = SumOf(net)
            self.grad_fn = ms.value_and_grad(self.loss, 0, net.trainable_params())

        def construct(self, x):
            return self.grad_fn(x)

    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for case in cases:
        conv = nn.Conv2d(case.in_ch, case.out_ch, case.kernel, pad_mode="pad", padding=case.kernel // 2,
                         group=case.groups, has_bias=False)
        x = Tensor(rng.standard_normal((case.batch, case.in_ch, case.hw, case.hw)).astype(np.float32))
        entry: dict[str, Any] = {"input": [case.batch, case.in_ch, case.hw, case.hw], "out_channels": case.out_ch,
                                 "kernel": case.kernel, "groups": case.groups}
        for mode, cell in (("forward", conv), ("forward_backward", ForwardBackward(conv))):
            first, _ = _timed(lambda: _sync(cell(x)))
            wall_cpu = np.array([_timed_cpu(lambda: _sync(cell(x))) for _ in range(repeats)]) * 1000.0
            entry[f"{mode}_first_call_s"] = round(first, 3)
            entry[f"{mode}_ms"] = summarize(wall_cpu[:, 0])
            entry[f"{mode}_cpu_ms"] = summarize(wall_cpu[:, 1])
        out[case.label] = entry
    return out


# --------------------------------------------------------------------------------------------------
# train: the compiled step on a fixed synthetic batch


def synthetic_train_batch(batch: int, size: int, max_gt_boxes: int, num_classes: int, boxes_per_image: int = 4,
                          seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of the pipeline's train layout: image [B,3,S,S] (standard normal, like normalised pixels),
    gt_boxes [B,M,4] with ``boxes_per_image`` real boxes (10-50 % of S) and zero padding rows, gt_labels
    [B,M] (-1 = padding)."""
    rng = np.random.default_rng(seed)
    k = min(boxes_per_image, max_gt_boxes)
    image = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    wh = rng.uniform(0.1, 0.5, (batch, k, 2)) * size
    xy = rng.uniform(0.0, 1.0, (batch, k, 2)) * (size - wh)
    gt_boxes = np.zeros((batch, max_gt_boxes, 4), np.float32)
    gt_boxes[:, :k] = np.concatenate([xy, xy + wh], axis=-1)
    gt_labels = np.full((batch, max_gt_boxes), -1, np.int32)
    gt_labels[:, :k] = rng.integers(0, num_classes, (batch, k))
    return image, gt_boxes, gt_labels


def synthetic_gt_rows(params: Params, model: str) -> int:
    """Padded boxes per image for the synthetic batches: pinned, or as derived for the embedded set."""
    from msdet.data.meta import gt_rows

    return gt_rows(getattr(params, model).train.max_gt_boxes, params.data.synthetic.max_objects)


def bench_train(params: Params, model: str, num_classes: int, steps: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Images/s of the compiled training step, built as :class:`msdet.engine.trainer.Trainer` builds it."""
    import mindspore as ms
    from mindspore import Tensor

    from msdet.detectors import build_detector
    from msdet.engine.trainer import TrainData, Trainer

    mcfg = getattr(params, model)
    tcfg = mcfg.train
    detector = build_detector(params, model, num_classes)
    t_build, network = _timed(detector.build_network)
    batch = tcfg.batch_size
    data = TrainData(make_dataset=_no_dataset, num_train_images=batch * (steps + warmup + 1))
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        trainer = Trainer(detector, network, tcfg, data, tmp, progress=False)
        network.set_train(True)
        image, gt_boxes, gt_labels = (Tensor(a) for a in synthetic_train_batch(
            batch, mcfg.input_size, synthetic_gt_rows(params, model), num_classes, seed=params.runtime.seed))
        epoch = Tensor(0, ms.int32)

        def step(i: int) -> np.ndarray:
            _, parts = trainer.step_fn(image, gt_boxes, gt_labels, epoch, Tensor(i + 1, ms.float32))
            return parts.asnumpy()

        first, parts = _timed(lambda: step(0))
        for i in range(warmup):
            step(1 + i)
        wall_cpu = np.array([_timed_cpu(lambda: step(1 + warmup + i)) for i in range(steps)])
    times = wall_cpu[:, 0].tolist()
    if not np.all(np.isfinite(parts)):
        raise RuntimeError(f"{model}: the benchmark step gave non-finite losses {parts.tolist()}")
    step_summary = summarize([t * 1000.0 for t in times])
    return {
        "input_size": mcfg.input_size, "batch_size": batch, "num_classes": num_classes,
        "max_gt_boxes": synthetic_gt_rows(params, model), "optimizer": tcfg.optimizer,
        "build_s": round(t_build, 3),
        # the first call compiles and runs one step: compile time is the excess over a median step
        "compile_s": round(max(first - step_summary["median"] / 1000.0, 0.0), 3),
        "step_ms": step_summary,
        "step_cpu_ms": summarize(wall_cpu[:, 1] * 1000.0),
        # process CPU time over wall time: how many of the cores the step keeps busy
        "cpu_cores_used": summarize(wall_cpu[:, 1] / wall_cpu[:, 0], digits=3),
        "images_per_s": summarize(rates(batch, times)),
    }


def _no_dataset(epoch: int) -> Any:
    raise RuntimeError("the training benchmark feeds a fixed synthetic batch; no dataset is built")


# --------------------------------------------------------------------------------------------------
# data: the training input pipeline alone


def bench_data(params: Params, model: str, mindrecord_dir: str | Path, repeats: int = 3, batches: int = 10,
               num_workers: int | None = None, python_multiprocessing: bool = False) -> dict[str, Any]:
    """Images/s of ``create_train_dataset`` (decode, augment, pad, batch) over ``batches`` batches after the
    first, in ``repeats`` fresh pipelines (epochs 0, 1, ...); start-up (time to the first batch) apart."""
    from msdet.data.pipeline import create_train_dataset, num_samples, resolve_max_gt_boxes

    mcfg = getattr(params, model)
    tcfg = mcfg.train
    workers = num_workers or tcfg.num_workers
    available = num_samples(mindrecord_dir, "train") // tcfg.batch_size - 1
    if available < 1:
        raise ValueError(f"{mindrecord_dir}: too few training images for two batches of {tcfg.batch_size}")
    batches = min(batches, available)
    startup, seconds = [], []
    for r in range(repeats):
        dataset = create_train_dataset(
            mindrecord_dir, model=model, input_size=mcfg.input_size, augment_cfg=mcfg.augment,
            batch_size=tcfg.batch_size, max_gt_boxes=resolve_max_gt_boxes(tcfg.max_gt_boxes, mindrecord_dir),
            num_workers=workers,
            seed=params.runtime.seed, epoch=r, python_multiprocessing=python_multiprocessing)
        t0 = time.perf_counter()
        iterator = dataset.create_tuple_iterator(num_epochs=1)
        first = next(iterator)
        t1 = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
        t2 = time.perf_counter()
        startup.append(t1 - t0)
        seconds.append(t2 - t1)
        shape = tuple(batch[0].shape)
        del iterator, dataset, first
    return {
        "input_size": mcfg.input_size, "batch_size": tcfg.batch_size, "num_workers": workers,
        "python_multiprocessing": python_multiprocessing, "batches_timed": batches, "batch_shape": list(shape),
        "startup_s": summarize(startup),
        "images_per_s": summarize(rates(batches * tcfg.batch_size, seconds)),
    }


# --------------------------------------------------------------------------------------------------
# mindrecord: the conversion stage


def bench_mindrecord(params: Params, coco_root: str | Path, repeats: int = 3) -> dict[str, Any]:
    """Images/s of ``convert_tree`` (with the configured workers and shards) on a temporary copy of the tree."""
    from msdet.data.coco import resolve_tree
    from msdet.data.mindrecord import convert_tree

    with tempfile.TemporaryDirectory(prefix="bench-mindrecord-") as tmp:
        copy = Path(tmp) / "coco"
        shutil.copytree(resolve_tree(coco_root).root, copy)
        tree = resolve_tree(copy)
        seconds, images = [], 0
        for r in range(repeats):
            t, stats = _timed(lambda: convert_tree(tree, Path(tmp) / f"out{r}", params.mindrecord))
            seconds.append(t)
            images = int(stats["train"]["images"] + stats["val"]["images"])
            shutil.rmtree(Path(tmp) / f"out{r}")
    return {"images": images, "workers": params.mindrecord.workers, "train_shards": params.mindrecord.train_shards,
            "seconds_s": summarize(seconds), "images_per_s": summarize(rates(images, seconds))}


# --------------------------------------------------------------------------------------------------
# eval: inference + decoding + NMS, and COCOeval


class _CompiledOnce:
    """The detector with its inference cell built once, so repeated passes reuse one compiled graph."""

    def __init__(self, detector: Any) -> None:
        self._detector = detector
        self._cell = None

    def inference_cell(self, network: Any) -> Any:
        if self._cell is None:
            self._cell = self._detector.inference_cell(network)
        return self._cell

    def __getattr__(self, name: str) -> Any:
        return getattr(self._detector, name)


def candidates_per_image(scores: np.ndarray, score_threshold: float, pre_nms_top_k: int) -> np.ndarray:
    """(anchor, class) pairs entering NMS per image: above the threshold, at most ``pre_nms_top_k``."""
    above = (np.asarray(scores) > score_threshold).reshape(len(scores), -1).sum(axis=1)
    return np.minimum(above, pre_nms_top_k)


def bench_eval(params: Params, model: str, mindrecord_dir: str | Path, gt_json: str | Path,
               repeats: int = 3) -> dict[str, Any]:
    """``predict_dataset`` over the val split with random-init weights, at the configured score threshold
    and at threshold 0 (every image fills ``pre_nms_top_k`` candidates: the NMS worst case), the forward /
    decode / postprocess (score filter, top-k, NMS) split on one batch, and COCOeval on the threshold-0
    detections. NMS cost grows with the candidates, so their number is reported with each figure."""
    from mindspore import Tensor

    from msdet.data.meta import read_meta
    from msdet.data.pipeline import create_eval_dataset
    from msdet.detectors import build_detector
    from msdet.evaluation.coco_eval import evaluate
    from msdet.evaluation.postprocess import postprocess, to_coco_results
    from msdet.evaluation.runner import nms_iou_for, predict_dataset

    meta = read_meta(mindrecord_dir)
    ecfg = params.eval
    mcfg = getattr(params, model)
    detector = _CompiledOnce(build_detector(params, model, int(meta["num_classes"])))
    network = detector.build_network()
    network.set_train(False)
    iou = nms_iou_for(model, ecfg)
    dataset = create_eval_dataset(mindrecord_dir, model, mcfg.input_size, ecfg.batch_size)
    batch = next(dataset.create_dict_iterator(num_epochs=1, output_numpy=True))
    image = batch["image"]
    if len(image) < ecfg.batch_size:
        image = np.concatenate([image, np.repeat(image[-1:], ecfg.batch_size - len(image), axis=0)])
    infer = detector.inference_cell(network)
    infer.set_train(False)
    compile_s, outputs = _timed(lambda: _sync(infer(Tensor(image))))
    forward = [_timed(lambda: _sync(infer(Tensor(image))))[0] * 1000.0 for _ in range(repeats)]
    outputs = outputs if isinstance(outputs, list) else [outputs]
    n = len(batch["image"])
    decode = [_timed(lambda: detector.decode([o[:n] for o in outputs]))[0] * 1000.0 for _ in range(repeats)]
    boxes, scores = detector.decode([o[:n] for o in outputs])

    out: dict[str, Any] = {"input_size": mcfg.input_size, "batch_size": ecfg.batch_size, "weights": "random init",
                           "compile_s": round(compile_s, 3), "forward_ms_per_batch": summarize(forward),
                           "decode_ms_per_batch": summarize(decode)}
    variants = {"configured": ecfg, "nms_worst_case": dataclasses.replace(ecfg, score_threshold=0.0)}
    worst: list = []
    for name, cfg in variants.items():
        post = [_timed(lambda: postprocess(boxes, scores, batch["image_id"], batch["scale"], batch["orig_size"],
                                           score_threshold=cfg.score_threshold, iou_threshold=iou,
                                           max_detections=cfg.max_detections,
                                           pre_nms_top_k=cfg.pre_nms_top_k))[0] * 1000.0 for _ in range(repeats)]
        seconds, images, dets = [], 0, []
        for _ in range(repeats):
            dets, secs, images = predict_dataset(detector, network, dataset, ecfg.batch_size, cfg, iou)
            seconds.append(secs)
        cands = candidates_per_image(scores, cfg.score_threshold, cfg.pre_nms_top_k)
        out[name] = {
            "score_threshold": cfg.score_threshold, "pre_nms_top_k": cfg.pre_nms_top_k, "images": images,
            "candidates_per_image_first_batch": round(float(cands.mean()), 1),
            "detections_per_image": round(sum(len(d.scores) for d in dets) / max(images, 1), 2),
            "postprocess_nms_ms_per_batch": summarize(post),
            "images_per_s": summarize(rates(images, seconds)),
        }
        if name == "nms_worst_case":
            worst = dets
    results = to_coco_results(worst, [int(c["id"]) for c in meta["categories"]])
    image_ids = [int(d.image_id) for d in worst]
    coco = [_timed(lambda: evaluate(gt_json, results, image_ids=image_ids))[0] for _ in range(repeats)]
    out["cocoeval"] = {"detections": len(results), "images": len(image_ids), "seconds_s": summarize(coco)}
    return out


# --------------------------------------------------------------------------------------------------
# export: batch-1 latency of the exported files


def bench_export(params: Params, model: str, num_classes: int, repeats: int = 10) -> dict[str, Any]:
    """Export the random-init network (``msdet.export.exporter``, verified there), then time batch-1 calls of
    the in-memory network, the MINDIR (``nn.GraphCell``) and the ONNX file (onnxruntime, CPU)."""
    from mindspore import Tensor

    from msdet.detectors import build_detector
    from msdet.export.exporter import FILE_NAMES, export_model, load_exported
    from msdet.export.runner import check_settings

    detector = build_detector(params, model, num_classes)
    network = detector.build_network()
    size = detector.input_size
    image = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    out: dict[str, Any] = {"input_size": size, "batch": 1}
    tolerances, postprocess = check_settings(params, model)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        export_s, report = _timed(lambda: export_model(
            detector, network, Path(tmp) / "export", params.export.formats, check_inputs=image,
            tolerances=tolerances, postprocess=postprocess, strict=params.export.strict, latency_repeats=1))
        out["export_and_verify_s"] = round(export_s, 3)
        cell = detector.inference_cell(network)
        cell.set_train(False)
        _sync(cell(Tensor(image)))
        out["network_latency_ms"] = summarize(
            [_timed(lambda: _sync(cell(Tensor(image))))[0] * 1000.0 for _ in range(repeats)])
        for fmt, info in report["formats"].items():
            if not info["exported"]:
                out[fmt.lower()] = {"exported": False, "reason": info["reason"]}
                continue
            exported = load_exported(Path(tmp) / "export" / FILE_NAMES[fmt])
            exported.run(image)
            out[fmt.lower()] = {
                "exported": True, "size_mb": round(info["size_bytes"] / 2**20, 3),
                "raw_max_diff_over_scale": info["check"]["raw"]["max_diff_over_scale"],
                "latency_ms": summarize([_timed(lambda: exported.run(image))[0] * 1000.0 for _ in range(repeats)]),
            }
    return out


# --------------------------------------------------------------------------------------------------
# profile: where the training step and the input pipeline spend their time


def op_time_breakdown(framework_dir: str | Path, steps: int, top: int = 12) -> dict[str, Any]:
    """Summarise MindSpore's CPU profiler CSVs (``cpu_op_type_info_0.csv``, ``cpu_op_detail_info_0.csv``):
    time per step by op type and by network block (the first cell below the model), largest first."""
    import csv
    import re
    from collections import Counter

    root = Path(framework_dir)
    types = list(csv.DictReader((root / "cpu_op_type_info_0.csv").open()))
    detail = list(csv.DictReader((root / "cpu_op_detail_info_0.csv").open()))
    total = sum(float(r["total_compute_time"]) for r in types) / steps
    by_type = Counter({r["op_type"]: float(r["total_compute_time"]) / steps for r in types})
    by_block: Counter = Counter()
    backward = 0.0
    for r in detail:
        name, ms_per_step = r["full_op_name"], float(r["op_total_time(ms)"]) / steps
        m = (re.search(r"network-[^/]+/([^/]+)", name) or re.search(r"loss_cell-[^/]+/([^/]+)", name)
             or re.search(r"Default/([^/]+)", name))
        by_block[m.group(1) if m else "other"] += ms_per_step
        backward += ms_per_step if name.startswith("Gradients/") else 0.0

    def table(counter: Counter) -> list[dict[str, Any]]:
        return [{"name": k, "ms_per_step": round(v, 2), "share": round(v / total, 4)}
                for k, v in counter.most_common(top)]

    return {"op_ms_per_step": round(total, 1), "backward_share": round(backward / total, 4),
            "by_op_type": table(by_type), "by_block": table(by_block)}


def profile_train(params: Params, model: str, num_classes: int, steps: int = 3) -> dict[str, Any]:
    """MindSpore's profiler (CPU ops) over ``steps`` compiled training steps after a warm-up."""
    import mindspore as ms
    from mindspore import Tensor
    from mindspore.profiler import ProfilerActivity

    from msdet.detectors import build_detector
    from msdet.engine.trainer import TrainData, Trainer

    mcfg = getattr(params, model)
    tcfg = mcfg.train
    detector = build_detector(params, model, num_classes)
    network = detector.build_network()
    network.set_train(True)  # as Trainer.fit: batch statistics in BN, the training graph of every layer
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        trainer = Trainer(detector, network, tcfg, TrainData(_no_dataset, tcfg.batch_size * (steps + 3)), tmp,
                          progress=False)
        batch = [Tensor(a) for a in synthetic_train_batch(tcfg.batch_size, mcfg.input_size,
                                                           synthetic_gt_rows(params, model),
                                                           num_classes, seed=params.runtime.seed)]
        epoch = Tensor(0, ms.int32)
        for i in range(2):  # compile, warm up
            trainer.step_fn(*batch, epoch, Tensor(i + 1, ms.float32))[1].asnumpy()
        profiler = ms.Profiler(output_path=str(Path(tmp) / "profile"), activities=[ProfilerActivity.CPU])
        for i in range(steps):
            trainer.step_fn(*batch, epoch, Tensor(i + 3, ms.float32))[1].asnumpy()
        profiler.analyse()
        found = sorted(Path(tmp, "profile").rglob("cpu_op_type_info_0.csv"))
        if not found:
            raise RuntimeError(f"{model}: the MindSpore profiler wrote no CPU op statistics")
        return {"steps": steps, **op_time_breakdown(found[0].parent, steps)}


def profile_data(params: Params, model: str, mindrecord_dir: str | Path, samples: int = 50,
                 top: int = 10) -> dict[str, Any]:
    """cProfile of the per-sample map (decode, augment, pad) on one thread: functions by own time."""
    import cProfile
    import pstats

    from msdet.data.mindrecord import read_mindrecord
    from msdet.data.pipeline import TrainSampleMap, resolve_max_gt_boxes

    mcfg = getattr(params, model)
    fn = TrainSampleMap(model, mcfg.input_size, mcfg.augment,
                        resolve_max_gt_boxes(mcfg.train.max_gt_boxes, mindrecord_dir), params.runtime.seed, 0,
                        str(mindrecord_dir))
    records = []
    for rec in read_mindrecord(mindrecord_dir, "train"):
        records.append((np.frombuffer(rec["image"], np.uint8), np.int64(rec["image_id"]), np.int32(rec["height"]),
                        np.int32(rec["width"]), np.asarray(rec["boxes"], np.float32).reshape(-1, 4),
                        np.asarray(rec["labels"], np.int32).reshape(-1)))
        if len(records) == samples:
            break
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    for rec in records:
        fn(*rec)
    seconds = time.perf_counter() - t0
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, func): (cc, nc, tottime, cumtime, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    n = max(len(records), 1)
    return {"samples": len(records), "ms_per_sample": round(1000.0 * seconds / n, 3),
            "by_function": [{"name": f"{Path(k[0]).name}:{k[2]}", "ms_per_sample": round(1000.0 * v[2] / n, 3),
                             "share": round(v[2] / seconds, 4)} for k, v in rows]}


# --------------------------------------------------------------------------------------------------
# command line (the parent runs one of these per section and model)


def parse_context(items: Sequence[str]) -> dict[str, Any]:
    """``["enable_graph_kernel=true", "runtime_num_threads=2"]`` -> {name: YAML-typed value}."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"context option {item!r} is not KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_section(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {"runtime": {"device_target": args.device_target}} if args.device_target else None
    params = load_params(args.params, overrides, overlay=args.overlay)
    context = parse_context(args.context)
    if args.section == "mindrecord":
        return bench_mindrecord(params, args.coco_root, args.repeats)
    if args.section == "data":
        return bench_data(params, args.model, args.mindrecord_dir, args.repeats, args.batches,
                          num_workers=args.num_workers, python_multiprocessing=args.python_multiprocessing)
    setup(params, context, args.model if args.section in ("train", "profile") else None)
    if args.section == "micro":
        return bench_micro(REGRESSION_CASES if not args.micro_small else SMALL_CASES, args.repeats)
    num_classes = dataset_num_classes(args.mindrecord_dir)
    if args.section == "train":
        return bench_train(params, args.model, num_classes, steps=args.repeats)
    if args.section == "eval":
        return bench_eval(params, args.model, args.mindrecord_dir, args.gt_json, args.repeats)
    if args.section == "export":
        return bench_export(params, args.model, num_classes, args.repeats)
    if args.section == "profile":
        if args.by_layer:
            from msdet.bench.layers import bench_layers

            return {"by_layer": bench_layers(params, args.model, num_classes, args.repeats),
                    "train_step": bench_train(params, args.model, num_classes, steps=args.repeats)}
        return {"train_step": profile_train(params, args.model, num_classes, steps=args.repeats),
                "data_sample": profile_data(params, args.model, args.mindrecord_dir)}
    raise ValueError(f"unknown section {args.section!r}; expected one of {', '.join(SECTIONS)}")


#: Tiny versions of the regression cases, for tests.
SMALL_CASES = tuple(dataclasses.replace(c, batch=2, in_ch=16, out_ch=16, hw=16,
                                        groups=16 if c.groups > 1 else 1) for c in REGRESSION_CASES)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("section", choices=SECTIONS)
    ap.add_argument("--out", required=True, help="JSON file for the figures")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--overlay", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device-target", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--python-multiprocessing", action="store_true")
    ap.add_argument("--mindrecord-dir", default=None)
    ap.add_argument("--coco-root", default=None)
    ap.add_argument("--gt-json", default=None)
    ap.add_argument("--micro-small", action="store_true")
    ap.add_argument("--by-layer", action="store_true", help="profile: time each block type instead")
    ap.add_argument("--context", action="append", default=[], help="KEY=VALUE for mindspore.set_context")
    args = ap.parse_args(argv)
    os.environ.setdefault("GLOG_v", "3")
    result = run_section(args)
    result["peak_rss_mb"] = peak_rss_mb()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
