"""Qualitative check: predicted and ground-truth boxes drawn on a few validation images."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from msdet.atomic import atomic_path
from msdet.evaluation.postprocess import ImageDetections

GT_COLOR = (0, 200, 0)  # BGR green
PRED_COLOR = (0, 0, 255)  # BGR red


def _label(image: np.ndarray, text: str, x: int, y: int, color: tuple) -> None:
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    y = max(y, th + base)
    cv2.rectangle(image, (x, y - th - base), (x + tw, y), color, cv2.FILLED)
    cv2.putText(image, text, (x, y - base), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def draw_detections(image_bgr: np.ndarray, detections: ImageDetections, class_names: Sequence[str],
                    gt_boxes: np.ndarray | None = None, gt_labels: np.ndarray | None = None,
                    min_score: float = 0.3) -> np.ndarray:
    """A copy of ``image_bgr`` (uint8 [H, W, 3], original size) with ground truth in green (thin, class
    name) and predictions scoring at least ``min_score`` in red (class name and score)."""
    image = np.ascontiguousarray(image_bgr, dtype=np.uint8).copy()
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"draw_detections: expected a BGR image [H, W, 3], got shape {image.shape}")
    if gt_boxes is not None:
        labels = np.full(len(gt_boxes), -1) if gt_labels is None else np.asarray(gt_labels)
        for box, label in zip(np.asarray(gt_boxes).reshape(-1, 4).round().astype(int).tolist(), labels.tolist()):
            cv2.rectangle(image, tuple(box[:2]), tuple(box[2:]), GT_COLOR, 1)
            if label >= 0:
                _label(image, class_names[label], box[0], box[3] + 12, GT_COLOR)
    show = np.asarray(detections.scores) >= min_score
    for box, score, label in zip(np.asarray(detections.boxes)[show].round().astype(int).tolist(),
                                 np.asarray(detections.scores)[show].tolist(),
                                 np.asarray(detections.labels)[show].tolist()):
        cv2.rectangle(image, tuple(box[:2]), tuple(box[2:]), PRED_COLOR, 2)
        _label(image, f"{class_names[label]} {score:.2f}", box[0], box[1], PRED_COLOR)
    return image


def write_png(path: str | Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def write_detection_plots(out_dir: str | Path,
                          samples: Iterable[tuple[np.ndarray, ImageDetections, np.ndarray, np.ndarray]],
                          class_names: Sequence[str], min_score: float = 0.3) -> list[Path]:
    """Replace ``out_dir`` with one ``<image_id>.png`` per (image_bgr, detections, gt_boxes, gt_labels)
    sample; the directory appears only once every file is written. Returns the final file paths."""
    out_dir = Path(out_dir)
    names = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for image, det, gt_boxes, gt_labels in samples:
            name = f"{det.image_id}.png"
            write_png(tmp / name, draw_detections(image, det, class_names, gt_boxes, gt_labels, min_score))
            names.append(name)
    return [out_dir / n for n in names]
