"""Detections on image files from a checkpoint or an exported MINDIR: the library behind ``stages/infer.py``.

One image at a time at batch 1: the model's eval preprocessing, the network (in memory or the exported
graph), the detector's decoding, then score threshold, class-wise NMS and mapping back to original pixels
(``msdet.evaluation.postprocess``). Results go to ``detections.json``; ``--draw`` adds one PNG per image.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msdet.atomic import write_json
from msdet.engine.checkpoint import CheckpointError, checkpoint_meta, load_weights, read_checkpoint
from msdet.evaluation.postprocess import ImageDetections, select_detections

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: image_bgr uint8 [H, W, 3] -> (image float32 [3, S, S] normalised for the model, scale (sx, sy))
Preprocess = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
#: image float32 [1, 3, S, S] -> network outputs in the official layout
Forward = Callable[[np.ndarray], Sequence[np.ndarray]]


class InferenceError(ValueError):
    """Bad input to inference: a missing or unreadable file, or a model file that does not fit the model."""


# ----------------------------------------------------------------------------------------------------
# inputs


def list_images(path: str | Path) -> list[Path]:
    """``path`` itself when it is a file, else the image files directly inside the folder, sorted.

    Each file must be one OpenCV can decode (checked from its header, before any model is loaded)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InferenceError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise InferenceError(f"{path}: no such file or folder")
    import cv2

    for f in files:
        if not cv2.haveImageReader(str(f)):
            raise InferenceError(f"{f}: not an image file OpenCV can read")
    return files


def read_image(path: str | Path) -> np.ndarray:
    """BGR uint8 [H, W, 3]; raises InferenceError naming the file when it cannot be decoded."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    if data is None:
        raise InferenceError(f"{path}: no such file")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise InferenceError(f"{path}: not a decodable image file")
    return image


@dataclass(frozen=True)
class ClassNames:
    """Names and data-set category ids of the classes, in class-index order (ids None when unknown)."""

    names: list[str]
    category_ids: list[int] | None

    @classmethod
    def from_meta(cls, meta: dict, source: str = "meta.json") -> ClassNames:
        from msdet.data.meta import category_ids, class_names

        cats = meta.get("categories")
        if not isinstance(cats, list) or not cats:
            raise InferenceError(f"{source}: no 'categories' list")
        return cls(class_names(meta), category_ids(meta))

    @classmethod
    def anonymous(cls, num_classes: int) -> ClassNames:
        return cls([f"class_{k}" for k in range(num_classes)], None)

    def __len__(self) -> int:
        return len(self.names)


def read_meta_file(path: str | Path) -> dict:
    """A MindRecord ``meta.json`` (msdet.data.meta), its problems as :class:`InferenceError`."""
    from msdet.data.meta import MetaError
    from msdet.data.meta import read_meta_file as read

    try:
        return read(path)
    except (MetaError, FileNotFoundError) as exc:
        raise InferenceError(str(exc)) from None


# ----------------------------------------------------------------------------------------------------
# models


def fit_problem(network: Any, ckpt: dict, skip_prefixes: Sequence[str] = ()) -> str | None:
    """The first network tensor (in network order) the checkpoint lacks or has in another shape, or None."""
    names = [p for p in network.get_parameters() if not p.name.startswith(tuple(skip_prefixes))]
    found = sum(p.name in ckpt for p in names)
    for p in names:
        src = ckpt.get(p.name)
        if src is None:
            return f"network tensor '{p.name}' is not in the checkpoint ({found} of {len(names)} network tensors are)"
        if tuple(src.shape) != tuple(p.shape):
            return f"tensor '{p.name}' has shape {tuple(src.shape)}, the network expects {tuple(p.shape)}"
    return None


def load_network(detector: Any, path: str | Path) -> Any:
    """``detector.build_network()`` with the weights of checkpoint ``path`` (ours or converted official).

    The detector first adopts what the file carries for decoding (D0: its anchors). Training-only branches
    may be absent from the file. A file that does not fit (another model, input
    size or number of classes) raises CheckpointError naming the first mismatching tensor.
    """
    ckpt = read_checkpoint(path)
    detector.use_weights_meta({k: checkpoint_meta(ckpt, k) for k in detector.weights_meta()}, str(path))
    network = detector.build_network()
    skip = tuple(getattr(detector, "training_only_prefixes", ()))
    problem = fit_problem(network, ckpt, skip)
    if problem:
        saved_for = checkpoint_meta(ckpt, "model")
        hint = f"; the file was saved for model '{saved_for}'" if saved_for and saved_for != detector.name else ""
        raise CheckpointError(f"{path} does not fit model '{detector.name}' with {detector.num_classes} classes: "
                              f"{problem}{hint}")
    skip_names = [p.name for p in network.get_parameters() if p.name.startswith(skip) and p.name not in ckpt]
    load_weights(network, path, strict=True, skip=skip_names)
    return network


def network_forward(detector: Any, network: Any) -> Forward:
    """The in-memory inference cell (eval mode) as an array -> arrays function."""
    from mindspore import Tensor

    cell = detector.inference_cell(network)
    cell.set_train(False)

    def forward(image: np.ndarray) -> tuple:
        out = cell(Tensor(np.ascontiguousarray(image, dtype=np.float32)))
        return tuple(o.asnumpy() for o in (out if isinstance(out, (tuple, list)) else (out,)))

    return forward


def exported_forward(path: str | Path, input_size: int | None) -> tuple[Forward, int]:
    """An exported MINDIR/ONNX file as a forward function, and its input size.

    ``input_size`` (when given) must equal the size the file was exported at."""
    from msdet.export.exporter import ExportError, load_exported

    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"{path}: no such model file")
    try:
        model = load_exported(path)
    except ExportError as exc:
        raise InferenceError(str(exc)) from exc
    shape = model.input_shapes[0] if model.input_shapes else []
    if len(shape) != 4 or shape[:2] != [1, 3] or shape[2] != shape[3] or model.input_size is None:
        raise InferenceError(f"{path}: input shape {shape} is not [1, 3, S, S]")
    if input_size is not None and model.input_size != input_size:
        raise InferenceError(f"{path}: exported for input {shape}, but --input-size is {input_size}")
    return model.run, model.input_size


def exported_weights_meta(path: str | Path) -> dict[str, Any]:
    """What the export stage recorded beside an exported file for decoding it (D0: the anchors), from the
    ``export_report.json`` in its folder; empty when there is none (a file exported elsewhere)."""
    from msdet.export.exporter import REPORT_NAME

    report = Path(path).with_name(REPORT_NAME)
    if not report.is_file():
        return {}
    try:
        doc = json.loads(report.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InferenceError(f"{report}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InferenceError(f"{report}: not an export report (a JSON object)")
    return doc


def with_model_cfg(cfg: Any, input_size: int | None) -> Any:
    """The model config for inference: ``input_size`` overridden, nothing downloaded or initialised."""
    changes: dict[str, Any] = {"pretrained_backbone": "none", "init": "none"}
    if input_size is not None:
        changes["input_size"] = int(input_size)
    return dataclasses.replace(cfg, **changes)


def eval_preprocess(model: str, input_size: int) -> Preprocess:
    """The model's eval transform (D0 letterbox RGB, NanoDet stretch BGR), as used by evaluation."""
    from msdet.data import transforms

    transform = {"d0": transforms.d0_eval, "nanodet": transforms.nanodet_eval}.get(model)
    if transform is None:
        raise InferenceError(f"unknown model '{model}'")

    def preprocess(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sample = transform(image, input_size)
        return sample.image, sample.scale

    return preprocess


# ----------------------------------------------------------------------------------------------------
# prediction


@dataclass
class Predictor:
    """One image in, its detections in original pixels out."""

    detector: Any
    forward: Forward
    preprocess: Preprocess
    score_threshold: float
    iou_threshold: float
    max_detections: int = 100
    pre_nms_top_k: int = 1000

    def __call__(self, image_bgr: np.ndarray, image_id: int = 0) -> ImageDetections:
        chw, scale = self.preprocess(image_bgr)
        size = int(self.detector.input_size)
        chw = np.asarray(chw, dtype=np.float32)
        if chw.shape != (3, size, size):
            raise InferenceError(f"preprocessing gave an image of shape {chw.shape}, "
                                 f"the model takes (3, {size}, {size})")
        outputs = self.forward(chw[None])
        try:
            boxes, scores = self.detector.decode(outputs)
        except (ValueError, IndexError) as exc:
            shapes = [tuple(np.shape(o)) for o in outputs]
            raise InferenceError(f"model outputs {shapes} do not fit '{self.detector.name}' with "
                                 f"{self.detector.num_classes} classes at input {size}: {exc}") from exc
        if scores.shape[-1] != self.detector.num_classes:
            raise InferenceError(f"model gives scores for {scores.shape[-1]} classes, expected "
                                 f"{self.detector.num_classes}")
        h, w = image_bgr.shape[:2]
        det_boxes, det_scores, det_labels = select_detections(
            boxes[0], scores[0], np.asarray(scale, np.float32), np.array([h, w], np.float32),
            score_threshold=self.score_threshold, iou_threshold=self.iou_threshold,
            max_detections=self.max_detections, pre_nms_top_k=self.pre_nms_top_k)
        return ImageDetections(image_id, det_boxes, det_scores, det_labels)


def detections_to_json(det: ImageDetections, classes: ClassNames) -> list[dict]:
    labels = np.asarray(det.labels, dtype=np.int64).tolist()
    return [{"box": [round(float(v), 2) for v in box], "score": round(float(score), 5), "class_index": int(label),
             "category_id": classes.category_ids[label] if classes.category_ids is not None else None,
             "class_name": classes.names[label]}
            for box, score, label in zip(np.asarray(det.boxes).reshape(-1, 4).tolist(),
                                         np.asarray(det.scores).tolist(), labels)]


def _drawing_names(files: Sequence[Path]) -> list[str]:
    """<stem>.png per image, the full file name where stems collide (a.jpg and a.png)."""
    stems = [f.stem for f in files]
    return [f"{f.stem if stems.count(f.stem) == 1 else f.name}.png" for f in files]


def run_inference(predictor: Predictor, files: Sequence[Path], classes: ClassNames, out_dir: str | Path,
                  draw: bool = False, info: dict | None = None,
                  progress: Callable[[Path, int], None] | None = None) -> dict:
    """Detect on every file; write ``out_dir/detections.json`` (and ``out_dir/<stem>.png`` with ``draw``).

    Returns the written document: ``info`` plus, per image, file, width, height and detections
    (box x1y1x2y2 in original pixels, score, class_index, category_id, class_name).
    """
    from msdet.evaluation.plots import draw_detections, write_png

    if len(classes) != predictor.detector.num_classes:
        raise InferenceError(f"{len(classes)} class names for a model with {predictor.detector.num_classes} classes")
    out_dir = Path(out_dir)
    results = []
    for index, (path, png) in enumerate(zip(files, _drawing_names(files))):
        image = read_image(path)
        det = predictor(image, image_id=index)
        entry = {"file": str(path), "width": int(image.shape[1]), "height": int(image.shape[0]),
                 "detections": detections_to_json(det, classes)}
        if draw:
            write_png(out_dir / png, draw_detections(image, det, classes.names, min_score=predictor.score_threshold))
            entry["drawing"] = png
        results.append(entry)
        if progress:
            progress(path, len(entry["detections"]))
    doc = {**(info or {}), "score_threshold": predictor.score_threshold, "iou_threshold": predictor.iou_threshold,
           "max_detections": predictor.max_detections, "images": results}
    write_json(out_dir / "detections.json", doc)
    return doc
