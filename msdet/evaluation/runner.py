"""Evaluate a trained detector on the val split: batched graph-mode inference, decoding, NMS, COCOeval.

The library behind ``stages/eval.py``: one call gives the metrics dict, the PR curve and a few drawn images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from msdet.config import EvalConfig
from msdet.engine.distributed import DistInfo, all_gather, from_main
from msdet.evaluation.coco_eval import evaluate
from msdet.evaluation.postprocess import ImageDetections, postprocess, to_coco_results


@dataclass
class EvalOutcome:
    metrics: dict[str, Any]
    pr_curve: list[dict]
    detections: list[ImageDetections] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)


def nms_iou_for(model: str, cfg: EvalConfig) -> float:
    return {"d0": cfg.nms_iou_d0, "nanodet": cfg.nms_iou_nanodet}[model]


def predict_dataset(detector, network, dataset, batch_size: int, cfg: EvalConfig, iou_threshold: float,
                    infer: Any = None) -> tuple[list[ImageDetections], float, int]:
    """Run ``dataset`` (eval columns image, image_id, scale, orig_size) through the inference network
    (``infer``, else a new ``detector.inference_cell(network)``: a new cell compiles anew).

    The last partial batch is padded to ``batch_size`` so the compiled graph sees one shape only; the
    padding rows are dropped before decoding. Returns detections, seconds spent and images seen.
    """
    from mindspore import Tensor

    infer = infer if infer is not None else detector.inference_cell(network)
    infer.set_train(False)
    detections: list[ImageDetections] = []
    seconds, seen = 0.0, 0
    for batch in dataset.create_dict_iterator(num_epochs=1, output_numpy=True):
        image = batch["image"]
        n = image.shape[0]
        if n < batch_size:
            image = np.concatenate([image, np.repeat(image[-1:], batch_size - n, axis=0)])
        t0 = time.perf_counter()
        outputs = infer(Tensor(image))
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        boxes, scores = detector.decode([o.asnumpy()[:n] for o in outputs])
        detections += postprocess(boxes, scores, batch["image_id"], batch["scale"], batch["orig_size"],
                                  score_threshold=cfg.score_threshold, iou_threshold=iou_threshold,
                                  max_detections=cfg.max_detections, pre_nms_top_k=cfg.pre_nms_top_k)
        seconds += time.perf_counter() - t0
        seen += n
    return detections, seconds, seen


def evaluate_network(detector, network, dataset, gt_json: str | Path, category_ids: list[int],
                     cfg: EvalConfig, model: str, known_ids: set[int] | None = None, infer: Any = None
                     ) -> EvalOutcome:
    """Detections on the images of ``dataset`` scored with pycocotools; metrics flat enough for `dvc metrics`.

    ``known_ids``: the data set's category ids; detections of other classes (a 90-class official D0 head
    has ids COCO never uses) are dropped before scoring. ``infer``: see :func:`predict_dataset`."""
    detections, seconds, seen = predict_dataset(detector, network, dataset, cfg.batch_size, cfg,
                                                nms_iou_for(model, cfg), infer=infer)
    results = known_results(detections, category_ids, known_ids)
    t0 = time.perf_counter()
    stats = evaluate(gt_json, results, image_ids=[int(d.image_id) for d in detections])
    coco_seconds = time.perf_counter() - t0
    pr_curve = stats.pop("pr_curve")
    per_class = stats.pop("per_class_AP")
    metrics = {k: round(float(v), 5) if isinstance(v, float) else v for k, v in stats.items()}
    metrics.update({
        "inference_images_per_s": round(seen / seconds, 3) if seconds > 0 else 0.0,
        "cocoeval_seconds": round(coco_seconds, 3),
        "per_class_AP": {k: round(float(v), 5) for k, v in per_class.items()},
    })
    return EvalOutcome(metrics=metrics, pr_curve=pr_curve, detections=detections, results=results)


def known_results(detections: list[ImageDetections], category_ids: list[int],
                  known_ids: set[int] | None) -> list[dict]:
    """COCO result dicts of ``detections`` without classes outside ``known_ids`` (None: all kept)."""
    results = to_coco_results(detections, category_ids)
    return results if known_ids is None else [r for r in results if r["category_id"] in known_ids]


#: columns of a detection row in the gathered arrays: x1, y1, x2, y2, score, label (-1: padding)
_ROW = 6


def pack_detections(detections: list[ImageDetections], images: int, max_detections: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A rank's detections as fixed-shape arrays for an all-gather: image ids int32 [images] (-1: no image)
    and rows float32 [images, max_detections, 6] (label -1: no detection). float32 holds the boxes and scores
    bit for bit (postprocess makes them float32) and every class index."""
    ids = np.full(images, -1, np.int32)
    rows = np.zeros((images, max_detections, _ROW), np.float32)
    rows[..., 5] = -1
    for i, d in enumerate(detections):
        k = len(d.scores)
        ids[i] = d.image_id
        rows[i, :k] = np.concatenate([d.boxes, d.scores[:, None], d.labels[:, None]], axis=1)
    return ids, rows


def unpack_detections(ids: np.ndarray, rows: np.ndarray) -> list[ImageDetections]:
    """Every rank's packed detections, ``ids [ranks, images]`` and ``rows [ranks, images, D, 6]`` from strided
    shards (rank r's image j is image j x ranks + r), back in the order of the unsharded val split."""
    order = np.swapaxes(ids, 0, 1).reshape(-1)
    rows = np.swapaxes(rows, 0, 1).reshape(-1, *rows.shape[2:])
    out = []
    for image_id, r in zip(order.tolist(), rows):
        if image_id < 0:
            continue
        r = r[r[:, 5] >= 0]
        out.append(ImageDetections(image_id=image_id, boxes=r[:, :4].copy(), scores=r[:, 4].copy(),
                                   labels=r[:, 5].astype(np.int64)))
    return out


class Validator:
    """COCO AP / AP50 of a network during training, on the val split or its first ``<model>.train.
    eval_max_images`` (a fixed subset), with the eval block's post-processing: the callable the train stage
    hands to the engine. The inference cell is kept between calls, so its graph compiles once.

    With several ranks each predicts every ``group_size``-th image, the detections are all-gathered as
    fixed-shape arrays, rank 0 runs COCOeval and every rank gets its AP: no rank idles through the whole
    validation (or outlasts the collectives' timeout) while rank 0 predicts alone."""

    def __init__(self, params, model: str, category_ids: list[int]) -> None:
        self.params, self.model, self.category_ids = params, model, [int(i) for i in category_ids]
        self._infer: tuple[Any, Any] | None = None  # (network, its inference cell)

    def __call__(self, detector, network, dist: DistInfo | None = None) -> dict[str, float]:
        from msdet.data.coco import resolve_tree
        from msdet.data.pipeline import create_eval_dataset, num_samples

        dist = dist or DistInfo()
        mcfg, cfg, mr_dir = getattr(self.params, self.model), self.params.eval, self.params.mindrecord.out_dir
        if self._infer is None or self._infer[0] is not network:
            self._infer = (network, detector.inference_cell(network))
        n = num_samples(mr_dir, "val")
        n = min(n, mcfg.train.eval_max_images) if mcfg.train.eval_max_images > 0 else n
        detections = []
        if dist.rank < n:
            dataset = create_eval_dataset(mr_dir, self.model, mcfg.input_size, cfg.batch_size,
                                          max_images=n, shard=(dist.rank, dist.group_size))
            detections = predict_dataset(detector, network, dataset, cfg.batch_size, cfg,
                                         nms_iou_for(self.model, cfg), infer=self._infer[1])[0]
        if dist.enabled:
            ids, rows = pack_detections(detections, -(-n // dist.group_size), cfg.max_detections)
            detections = unpack_detections(all_gather(ids, dist), all_gather(rows, dist))
        ap = np.zeros(2)
        if dist.is_main:
            results = known_results(detections, self.category_ids, set(self.category_ids))
            stats = evaluate(resolve_tree(self.params.data.root).annotations["val"], results,
                             image_ids=[int(d.image_id) for d in detections])
            ap = np.array([round(stats["AP"], 5), round(stats["AP50"], 5)])
        ap = from_main(ap, dist)
        return {"AP": float(ap[0]), "AP50": float(ap[1])}


#: the confusion matrix's IoU for a detection to count as finding a box (COCO's AP50 criterion)
CONFUSION_IOU = 0.5


def write_csv(path: str | Path, rows: list[dict], columns: list[str]) -> None:
    """``rows`` as a CSV table with header ``columns``, written atomically (a DVC plot file)."""
    import csv

    from msdet.atomic import atomic_path

    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def pick_plot_samples(detections: list[ImageDetections], n: int) -> list[ImageDetections]:
    """The first ``n`` images by id: the same images in every run, so plots compare across experiments."""
    return sorted(detections, key=lambda d: int(d.image_id))[:n]


def run_eval(params, model: str, ckpt: str | Path, metrics_path: str | Path, plots_dir: str | Path) -> dict:
    """The eval stage: EMA weights of ``model`` on the val MindRecord, metrics JSON, PR curve, drawn images and
    the confusion matrix at the eval score threshold (``confusion.csv``; per-class precision and recall from it
    in the metrics' ``at_score_threshold``)."""
    from msdet.atomic import write_json
    from msdet.data.coco import resolve_tree
    from msdet.data.meta import read_meta
    from msdet.data.mindrecord import read_mindrecord
    from msdet.data.pipeline import create_eval_dataset
    from msdet.detectors import build_detector
    from msdet.engine.checkpoint import category_ids_for, checkpoint_meta, load_weights, read_checkpoint
    from msdet.engine.runtime import setup_runtime
    from msdet.evaluation.coco_eval import write_pr_curve
    from msdet.evaluation.confusion import confusion_rows, image_confusion, precision_recall
    from msdet.evaluation.plots import write_detection_plots

    setup_runtime(params.runtime)
    mr_dir = params.mindrecord.out_dir
    meta = read_meta(mr_dir)
    # the checkpoint's own classes (a converted 90-class official D0) or the data set's
    category_ids = category_ids_for(ckpt, meta)
    detector = build_detector(params, model, len(category_ids))
    saved = read_checkpoint(ckpt)
    detector.use_weights_meta({k: checkpoint_meta(saved, k) for k in detector.weights_meta()}, str(ckpt))
    network = detector.build_network()
    load_weights(network, ckpt)
    mcfg = getattr(params, model)
    dataset = create_eval_dataset(mr_dir, model, mcfg.input_size, params.eval.batch_size)
    gt_json = resolve_tree(params.data.root).annotations["val"]
    data_ids = [int(c["id"]) for c in meta["categories"]]
    outcome = evaluate_network(detector, network, dataset, gt_json, category_ids, params.eval, model,
                               known_ids=set(data_ids))
    plots_dir = Path(plots_dir)
    write_pr_curve(plots_dir / "pr_curve.csv", outcome.pr_curve)
    wanted = {int(d.image_id): d for d in pick_plot_samples(outcome.detections, params.eval.num_plot_images)}
    names = checkpoint_meta(saved, "class_names") or [c["name"] for c in meta["categories"]]
    # ground-truth labels are data-set class indices: map them into the checkpoint's class space by id
    to_ckpt_index = np.array([category_ids.index(i) if i in category_ids else -1 for i in data_ids])
    samples = []
    by_id = {int(d.image_id): d for d in outcome.detections}
    matrix = np.zeros((len(category_ids) + 1,) * 2, np.int64)
    for rec in read_mindrecord(mr_dir, "val"):
        det = by_id.get(int(rec["image_id"]))
        if det is None:
            continue
        gt_labels = to_ckpt_index[np.asarray(rec["labels"]).reshape(-1)]
        known = gt_labels >= 0  # a class the checkpoint lacks cannot be confused: left out, as in COCOeval
        matrix += image_confusion(np.asarray(rec["boxes"]).reshape(-1, 4)[known], gt_labels[known], det.boxes,
                                  det.labels, len(category_ids), CONFUSION_IOU)
        if int(rec["image_id"]) in wanted:
            image, _, gt_boxes, _ = _plot_sample(rec, det)
            samples.append((image, det, gt_boxes, gt_labels))
    write_detection_plots(plots_dir / "images", samples, names, min_score=0.3)
    write_csv(plots_dir / "confusion.csv", confusion_rows(matrix, names), ["actual", "predicted"])
    outcome.metrics["at_score_threshold"] = {"score_threshold": params.eval.score_threshold, "iou": CONFUSION_IOU,
                                             **precision_recall(matrix, names)}
    write_json(metrics_path, outcome.metrics)
    return outcome.metrics


def _plot_sample(rec: dict, det: ImageDetections) -> Any:
    import cv2

    image = cv2.imdecode(np.frombuffer(rec["image"], np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return image, det, np.asarray(rec["boxes"]).reshape(-1, 4), np.asarray(rec["labels"]).reshape(-1)
