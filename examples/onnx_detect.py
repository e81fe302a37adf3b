"""Detect objects in a folder of images with an end-to-end ONNX export: numpy, OpenCV and onnxruntime only.

    python examples/onnx_detect.py models/nanodet/export/model_e2e.onnx IMAGES_DIR OUT_DIR

reads ``preprocess.json`` beside the model (or ``--spec``), writes ``OUT_DIR/<image stem>.png`` with the boxes
drawn and ``OUT_DIR/detections.json`` ({"images": [{"file_name", "boxes", "scores", "labels", "classes"}]},
boxes x1, y1, x2, y2 in original pixels). The preprocessing below is the one the spec describes
(docs/deploy.md); the model itself applies the score threshold, NMS and the mapping back to the image.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def preprocess(image_bgr: np.ndarray, spec: dict) -> np.ndarray:
    """HxWx3 uint8 BGR -> float32 [1, 3, S, S] as ``spec`` says (resize mode, channel order, mean/std)."""
    size = int(spec["input_size"])
    h, w = image_bgr.shape[:2]
    mode = spec["resize"]["mode"]
    if mode == "letterbox":
        s = size / max(h, w)
        # pixel centres at i + 0.5: the continuous-coordinate scaling by s, as cv2 addresses pixels
        matrix = np.array([[s, 0.0, 0.5 * s - 0.5], [0.0, s, 0.5 * s - 0.5]])
        resized = cv2.warpAffine(image_bgr, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REPLICATE)
    elif mode == "stretch":
        resized = cv2.resize(image_bgr, (size, size), interpolation=cv2.INTER_LINEAR)
    else:
        raise ValueError(f"unknown resize mode {mode!r} in the spec")
    planes = cv2.split(resized)
    order = (2, 1, 0) if spec["channel_order"] == "RGB" else (0, 1, 2)
    chw = np.stack([(planes[c].astype(np.float32) - np.float32(m)) * np.float32(1.0 / sd)
                    for c, m, sd in zip(order, spec["mean"], spec["std"])])
    if mode == "letterbox":
        chw[:, min(size, int(round(h * s))):, :] = spec["pad_value"]
        chw[:, :, min(size, int(round(w * s))):] = spec["pad_value"]
    return chw[None]


def draw(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, names: list[str]) -> np.ndarray:
    out = image.copy()
    for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
        colour = tuple(int(c) for c in np.random.default_rng(label).integers(64, 256, 3))
        cv2.rectangle(out, (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2))), colour, 2)
        cv2.putText(out, f"{names[label]} {score:.2f}", (int(x1), max(int(y1) - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, colour, 1, cv2.LINE_AA)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="model_e2e.onnx or model_e2e_int8.onnx")
    ap.add_argument("images", type=Path, help="folder of images")
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--spec", type=Path, default=None, help="preprocess.json (default: beside the model)")
    ap.add_argument("--min-score", type=float, default=0.3, help="draw detections from this score on")
    args = ap.parse_args(argv)
    spec_path = args.spec or args.model.parent / "preprocess.json"
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {spec_path}: cannot read the preprocessing spec ({exc})", file=sys.stderr)
        return 2
    files = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if args.images.is_dir() else []
    if not files:
        print(f"error: {args.images}: no images found", file=sys.stderr)
        return 2
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    image_name, size_name = (i.name for i in session.get_inputs())
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for path in files:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is None:
            print(f"error: {path}: not a readable image", file=sys.stderr)
            return 2
        orig_size = np.array([image.shape[:2]], np.float32)
        boxes, scores, labels = session.run(None, {image_name: preprocess(image, spec), size_name: orig_size})
        keep = scores >= args.min_score
        cv2.imwrite(str(args.out / f"{path.stem}.png"),
                    draw(image, boxes[keep], scores[keep], labels[keep], spec["class_names"]))
        results.append({"file_name": path.name, "boxes": boxes.tolist(), "scores": scores.tolist(),
                        "labels": labels.tolist(), "classes": [spec["class_names"][k] for k in labels.tolist()]})
        print(f"{path.name}: {int(keep.sum())} of {len(scores)} detections drawn (score >= {args.min_score})")
    (args.out / "detections.json").write_text(json.dumps({"images": results}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
