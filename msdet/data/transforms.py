"""Per-image transforms of both detectors (NumPy/OpenCV, vectorised over boxes).

Inputs are what ``cv2.imdecode`` gives: ``image`` HxWx3 uint8 BGR, ``boxes`` float32 [N, 4] x1y1x2y2 in
pixels, ``labels`` int32 [N]. All randomness comes from a ``numpy.random.Generator`` passed in, so a
sample is reproducible from its seed alone (the pipeline derives one per sample and epoch).

Geometry convention: coordinates are continuous, pixel ``i`` covers ``[i, i + 1)`` (boxes are in these
units, as COCO). Every geometric step is a 3x3 matrix in these coordinates; the image is resampled with
the same matrix shifted by half a pixel (OpenCV addresses pixel centres by integer index), so image and
boxes stay aligned to the sub-pixel: a flip is an exact mirror and a pure resize equals ``cv2.resize``.
(The official NanoDet warps with the un-shifted matrix, a half-pixel misalignment; that is the one
deliberate difference from it.)

Outputs are ready for the network: image float32 [3, S, S] normalised for the model, boxes in
network-input pixels.

- EfficientDet-D0 (google/automl ``DetectionInputProcessor``): train = horizontal flip, random scale jitter
  of the output size, random crop to SxS, zero padding bottom/right; eval = aspect-preserving resize of the
  longer side to S, zero padding. Normalisation is RGB ImageNet and, as in automl (and zylo117), it
  happens before padding: padded pixels are exactly 0 in the network input.
- NanoDet-Plus (RangiLyu/nanodet ``ShapeTransform`` + ``color_aug_and_norm``): train = one warp matrix
  (centre, scale, per-axis stretch, flip, translate, stretched resize to SxS), black border, then
  brightness, contrast and saturation on the [0, 1] image, each applied with probability 1/2; eval =
  stretched resize to SxS. BGR, normalised with the official mean/std (padding is normalised black).
"""
from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from msdet.config import D0AugmentConfig, NanoDetAugmentConfig

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
NANODET_MEAN_BGR = (103.53, 116.28, 123.675)
NANODET_STD_BGR = (57.375, 57.12, 58.395)

#: Boxes narrower or lower than this (network-input pixels) after clipping are dropped.
MIN_BOX_SIZE = 2.0
#: Boxes keeping less than this fraction of their area inside the output after clipping are dropped.
MIN_VISIBLE_FRACTION = 0.2


class TrainSample(NamedTuple):
    image: np.ndarray  # float32 [3, S, S], normalised
    boxes: np.ndarray  # float32 [K, 4] x1y1x2y2 in input pixels, K <= N
    labels: np.ndarray  # int32 [K]


class EvalSample(NamedTuple):
    image: np.ndarray  # float32 [3, S, S], normalised
    scale: np.ndarray  # float32 [2] (sx, sy): original_xy = input_xy / scale
    boxes: np.ndarray | None  # float32 [N, 4] in input pixels, when boxes were given (unfiltered)


# --------------------------------------------------------------------------------------------------
# validation and box geometry


def check_sample(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes as float32 [N, 4] and labels as int32 [N]; raises on a malformed image or mismatched counts."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be an HxWx3 uint8 array, got "
                         f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int32).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    return boxes, labels


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Axis-aligned hull of the four transformed corners of each box (no clipping): float32 [N, 4]."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    corners = boxes[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 4, 2)  # (x1,y1) (x2,y2) (x1,y2) (x2,y1)
    xy = corners @ matrix[:2, :2].T + matrix[:2, 2]
    w = corners @ matrix[2, :2] + matrix[2, 2]
    xy = xy / w[..., None]
    return np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1).astype(np.float32)


def clip_and_filter(boxes: np.ndarray, labels: np.ndarray, width: float, height: float,
                    min_size: float = MIN_BOX_SIZE,
                    min_visible: float = MIN_VISIBLE_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Clip to [0, width] x [0, height]; drop boxes thinner than ``min_size`` or with less than
    ``min_visible`` of their area left inside (those are mostly cropped out and would teach noise)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clipped = np.empty_like(boxes)
    clipped[:, 0::2] = np.clip(boxes[:, 0::2], 0.0, width)
    clipped[:, 1::2] = np.clip(boxes[:, 1::2], 0.0, height)
    cw = clipped[:, 2] - clipped[:, 0]
    ch = clipped[:, 3] - clipped[:, 1]
    keep = (cw >= min_size) & (ch >= min_size) & (cw * ch >= min_visible * area)
    return clipped[keep], np.asarray(labels, dtype=np.int32).reshape(-1)[keep]


def pad_gt(boxes: np.ndarray, labels: np.ndarray, max_boxes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Pad to exactly ``max_boxes`` rows (boxes 0, labels -1) for static shapes.

    With more boxes than that, the largest ``max_boxes`` are kept (in their original order); the number
    dropped is returned so the caller can report it.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int32).reshape(-1)
    dropped = max(0, len(boxes) - max_boxes)
    if dropped:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = np.sort(np.argsort(-area, kind="stable")[:max_boxes])
        boxes, labels = boxes[keep], labels[keep]
    out_boxes = np.zeros((max_boxes, 4), dtype=np.float32)
    out_labels = np.full((max_boxes,), -1, dtype=np.int32)
    out_boxes[: len(boxes)] = boxes
    out_labels[: len(labels)] = labels
    return out_boxes, out_labels, dropped


# --------------------------------------------------------------------------------------------------
# image resampling and normalisation


def _pixel_matrix(matrix: np.ndarray) -> np.ndarray:
    """Continuous-coordinate matrix -> the matrix OpenCV needs (pixel i is centred at i + 0.5)."""
    to_cont = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    to_pix = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]])
    return to_pix @ matrix @ to_cont


def warp_image(image: np.ndarray, matrix: np.ndarray, size: int, replicate: bool = False) -> np.ndarray:
    """Resample ``image`` into SxS with the continuous-coordinate ``matrix`` (bilinear).

    Outside the source is black, or the nearest edge pixel with ``replicate`` (used where the caller
    zeroes everything outside the valid region itself, so the edge is not blended with black).
    """
    m = _pixel_matrix(np.asarray(matrix, dtype=np.float64))
    border = cv2.BORDER_REPLICATE if replicate else cv2.BORDER_CONSTANT
    if np.allclose(m[2], (0.0, 0.0, 1.0)):
        return cv2.warpAffine(image, m[:2], (size, size), flags=cv2.INTER_LINEAR, borderMode=border,
                              borderValue=(0, 0, 0))
    return cv2.warpPerspective(image, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=border,
                               borderValue=(0, 0, 0))


def _normalize_planes(image: np.ndarray, order: tuple[int, int, int], mean: tuple, std: tuple) -> np.ndarray:
    """[3, H, W] float32 with plane k = (image[..., order[k]] - mean[k]) / std[k] (plane-wise: fast)."""
    planes = cv2.split(image)
    return np.stack([(planes[c].astype(np.float32) - np.float32(m)) * np.float32(1.0 / s)
                     for c, m, s in zip(order, mean, std)])


def normalize_imagenet_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 BGR HxWx3 -> float32 [3, H, W] RGB, (x / 255 - mean) / std (D0)."""
    return _normalize_planes(image, (2, 1, 0), tuple(255.0 * m for m in IMAGENET_MEAN_RGB),
                             tuple(255.0 * s for s in IMAGENET_STD_RGB))


def normalize_nanodet(image: np.ndarray) -> np.ndarray:
    """BGR HxWx3 on the 0..255 scale (uint8 or float) -> float32 [3, H, W], (x - mean) / std (NanoDet)."""
    return _normalize_planes(image, (0, 1, 2), NANODET_MEAN_BGR, NANODET_STD_BGR)


def _eval_boxes(boxes: np.ndarray | None, matrix: np.ndarray) -> np.ndarray | None:
    """Eval boxes are mapped (for checks and validation losses) but never clipped or filtered."""
    return None if boxes is None else transform_boxes(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), matrix)


def _zero_outside(chw: np.ndarray, valid_h: int, valid_w: int) -> np.ndarray:
    chw[:, valid_h:, :] = 0.0
    chw[:, :, valid_w:] = 0.0
    return chw


# --------------------------------------------------------------------------------------------------
# EfficientDet-D0


def d0_train_geometry(cfg: D0AugmentConfig, rng: np.random.Generator) -> tuple[bool, float, float, float]:
    """Draw (flip, scale_factor, offset_y_fraction, offset_x_fraction) as automl does, in that order."""
    flip = bool(rng.random() < cfg.flip_prob)
    factor = float(rng.uniform(cfg.scale_min, cfg.scale_max))
    offset_y, offset_x = (float(v) for v in rng.random(2))
    return flip, factor, offset_y, offset_x


def d0_scale_crop(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, size: int, flip: bool,
                  factor: float, offset_y: float = 0.0, offset_x: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Deterministic core of the D0 train transform (automl ``set_training_random_scale_factors``).

    The longer side is scaled to ``int(factor * size)`` (per-axis factors from the integer scaled size),
    a window of SxS starts at ``offset * (scaled - size)`` (integer, 0 when the scaled image is smaller),
    the rest is padded. Returns (uint8 image SxS, boxes, labels, (valid_h, valid_w)): the pixels outside
    the valid region are padding.
    """
    boxes, labels = check_sample(image, boxes, labels)
    h, w = image.shape[:2]
    target = int(factor * size)
    image_scale = min(target / h, target / w)
    # floor as automl, guarded against 31.999... for a longer side that should land exactly on target
    scaled_h = max(1, int(h * image_scale + 1e-6))
    scaled_w = max(1, int(w * image_scale + 1e-6))
    oy = int(max(0, scaled_h - size) * offset_y)
    ox = int(max(0, scaled_w - size) * offset_x)
    kx, ky = scaled_w / w, scaled_h / h
    flip_m = np.array([[-1.0, 0.0, w], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) if flip else np.eye(3)
    matrix = np.array([[kx, 0.0, -ox], [0.0, ky, -oy], [0.0, 0.0, 1.0]]) @ flip_m
    out = warp_image(image, matrix, size, replicate=True)
    valid_h, valid_w = min(size, scaled_h - oy), min(size, scaled_w - ox)
    out[valid_h:], out[:, valid_w:] = 0, 0
    boxes, labels = clip_and_filter(transform_boxes(boxes, matrix), labels, valid_w, valid_h)
    return out, boxes, labels, (valid_h, valid_w)


def d0_train(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, size: int, cfg: D0AugmentConfig,
             rng: np.random.Generator) -> TrainSample:
    """automl training input: flip, scale jitter, random crop, pad; RGB ImageNet normalisation, pad = 0."""
    flip, factor, oy, ox = d0_train_geometry(cfg, rng)
    out, boxes, labels, (vh, vw) = d0_scale_crop(image, boxes, labels, size, flip, factor, oy, ox)
    return TrainSample(_zero_outside(normalize_imagenet_rgb(out), vh, vw), boxes, labels)


def d0_eval(image: np.ndarray, size: int, boxes: np.ndarray | None = None) -> EvalSample:
    """Longer side to ``size`` keeping the aspect ratio, zero padding bottom/right; scale = (s, s)."""
    check_sample(image, np.zeros((0, 4)), np.zeros(0))
    h, w = image.shape[:2]
    s = size / max(h, w)
    matrix = np.diag([s, s, 1.0])
    out = warp_image(image, matrix, size, replicate=True)
    vh, vw = min(size, int(round(h * s))), min(size, int(round(w * s)))
    chw = _zero_outside(normalize_imagenet_rgb(out), vh, vw)
    scale = np.array([s, s], dtype=np.float32)
    return EvalSample(chw, scale, _eval_boxes(boxes, matrix))


# --------------------------------------------------------------------------------------------------
# NanoDet-Plus


def nanodet_warp_matrix(height: int, width: int, size: int, cfg: NanoDetAugmentConfig,
                        rng: np.random.Generator) -> np.ndarray:
    """The official ShapeTransform matrix (keep_ratio false), continuous coordinates, 3x3.

    resize @ translate @ flip @ stretch @ scale @ centre: the image is centred on the origin, scaled
    uniformly, stretched per axis, mirrored about its centre, moved back to a random position around the
    centre (translate is a fraction of the source size) and finally stretched to SxS.
    """
    centre = np.array([[1.0, 0.0, -width / 2], [0.0, 1.0, -height / 2], [0.0, 0.0, 1.0]])
    s = rng.uniform(cfg.scale_min, cfg.scale_max)
    scale = np.diag([s, s, 1.0])
    stretch = np.diag([rng.uniform(cfg.stretch_min, cfg.stretch_max),
                       rng.uniform(cfg.stretch_min, cfg.stretch_max), 1.0])
    flip = np.diag([-1.0 if rng.random() < cfg.flip_prob else 1.0, 1.0, 1.0])
    tx = rng.uniform(0.5 - cfg.translate, 0.5 + cfg.translate) * width
    ty = rng.uniform(0.5 - cfg.translate, 0.5 + cfg.translate) * height
    translate = np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])
    resize = np.diag([size / width, size / height, 1.0])
    return resize @ translate @ flip @ stretch @ scale @ centre


def nanodet_color(image: np.ndarray, cfg: NanoDetAugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Official color_aug_and_norm photometrics on the [0, 1] image, each with probability 1/2, in the
    official order brightness (add), contrast (multiply), saturation (HSV S multiply); no clipping.
    Returns float32 BGR on the 0..255 scale (ready for :func:`normalize_nanodet`)."""
    gates = rng.random(3) < 0.5
    delta = rng.uniform(-cfg.brightness, cfg.brightness)
    alpha = rng.uniform(cfg.contrast_min, cfg.contrast_max)
    sat = rng.uniform(cfg.saturation_min, cfg.saturation_max)
    img = image.astype(np.float32) * np.float32(1.0 / 255.0)
    if gates[0]:
        img += np.float32(delta)
    if gates[1]:
        img *= np.float32(alpha)
    if gates[2]:
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[..., 1] *= np.float32(sat)
        img = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    return img * np.float32(255.0)


def nanodet_warp(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, matrix: np.ndarray, size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply a warp matrix to image (black border) and boxes (corners, clipped, degenerate ones removed)."""
    boxes, labels = check_sample(image, boxes, labels)
    out = warp_image(image, matrix, size)
    boxes, labels = clip_and_filter(transform_boxes(boxes, matrix), labels, size, size)
    return out, boxes, labels


def nanodet_train(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, size: int,
                  cfg: NanoDetAugmentConfig, rng: np.random.Generator) -> TrainSample:
    """Official NanoDet-Plus training input: ShapeTransform warp, colour augmentation, BGR normalisation."""
    h, w = image.shape[:2]
    matrix = nanodet_warp_matrix(h, w, size, cfg, rng)
    out, boxes, labels = nanodet_warp(image, boxes, labels, matrix, size)
    return TrainSample(normalize_nanodet(nanodet_color(out, cfg, rng)), boxes, labels)


def nanodet_eval(image: np.ndarray, size: int, boxes: np.ndarray | None = None) -> EvalSample:
    """Stretch to SxS (no aspect ratio kept); scale = (S / w, S / h)."""
    check_sample(image, np.zeros((0, 4)), np.zeros(0))
    h, w = image.shape[:2]
    sx, sy = size / w, size / h
    out = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    scale = np.array([sx, sy], dtype=np.float32)
    matrix = np.diag([sx, sy, 1.0])
    return EvalSample(normalize_nanodet(out), scale, _eval_boxes(boxes, matrix))


__all__ = [
    "IMAGENET_MEAN_RGB", "IMAGENET_STD_RGB", "NANODET_MEAN_BGR", "NANODET_STD_BGR", "MIN_BOX_SIZE",
    "MIN_VISIBLE_FRACTION", "TrainSample", "EvalSample", "check_sample", "transform_boxes", "clip_and_filter",
    "pad_gt", "warp_image", "normalize_imagenet_rgb", "normalize_nanodet", "d0_train_geometry", "d0_scale_crop",
    "d0_train", "d0_eval", "nanodet_warp_matrix", "nanodet_color", "nanodet_warp", "nanodet_train",
    "nanodet_eval",
]
