"""A data set of tall thin objects (1 : 4 boxes), and D0 trained on it with the default and the fitted anchors.

    python -m msdet.devtools.thin_objects --out /tmp/thin [--steps 300] [--num-train 800] [--num-val 100]

Writes a COCO tree (``<out>/coco``: bars and ellipses four times as high as wide on noise, 128 px, 1-4 per
image), converts it with the mindrecord stage (``<out>/data.json`` holds the best-possible recall of both
anchor sets), trains D0 for ``--steps`` steps once per ``d0.anchors`` value from the same seed and prints
each one's val AP and AP50 (``<out>/<anchors>/metrics.json``). Everything else comes from params.yaml.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from msdet.atomic import atomic_path

CLASSES = ("bar", "ellipse")
IMAGE_SIZE = 128


def make_image(rng: np.random.Generator, size: int, aspect: float) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """(BGR image, [(class index, [x, y, w, h])]): 1-4 objects ``aspect`` times as high as wide."""
    image = rng.integers(60, 200, size=(size, size, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 2.0)
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        h = float(rng.uniform(0.3, 0.9) * size)
        w = h / aspect
        x, y = float(rng.uniform(0, size - w)), float(rng.uniform(0, size - h))
        label = int(rng.integers(len(CLASSES)))
        colour = tuple(int(c) for c in rng.choice([0, 255], size=3))
        if label == 0:
            cv2.rectangle(image, (round(x), round(y)), (round(x + w) - 1, round(y + h) - 1), colour, cv2.FILLED)
        else:
            cv2.ellipse(image, (round(x + w / 2), round(y + h / 2)), (round(w / 2), round(h / 2)), 0, 0, 360,
                        colour, cv2.FILLED)
        objects.append((label, [round(x, 2), round(y, 2), round(w, 2), round(h, 2)]))
    return image, objects


def write_tree(root: str | Path, num_train: int, num_val: int, seed: int = 0, aspect: float = 4.0) -> None:
    """A COCO tree (the synthetic layout) of thin objects at ``root``, written atomically, deterministic."""
    rng = np.random.default_rng(seed)
    with atomic_path(root) as tmp:
        (tmp / "annotations").mkdir(parents=True)
        ann_id = 1
        for split, count in (("train", num_train), ("val", num_val)):
            (tmp / split).mkdir()
            images, anns = [], []
            for i in range(count):
                image, objects = make_image(rng, IMAGE_SIZE, aspect)
                name = f"{i:06d}.png"
                cv2.imwrite(str(tmp / split / name), image)
                image_id = i + 1 + (0 if split == "train" else 1_000_000)
                images.append({"id": image_id, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
                for label, box in objects:
                    anns.append({"id": ann_id, "image_id": image_id, "category_id": label + 1, "bbox": box,
                                 "area": box[2] * box[3], "iscrowd": 0})
                    ann_id += 1
            cats = [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]
            (tmp / "annotations" / f"instances_{split}.json").write_text(
                json.dumps({"images": images, "annotations": anns, "categories": cats}))


def _params(out: Path, anchors: str, steps: int, num_train: int) -> dict[str, Any]:
    from msdet.config import merge, read_yaml

    batch = read_yaml("params.yaml")["d0"]["train"]["batch_size"]
    per_epoch = num_train // batch
    return merge(read_yaml("params.yaml"), {
        "data": {"root": str(out / "coco")}, "mindrecord": {"out_dir": str(out / "mindrecord")},
        "d0": {"anchors": anchors, "train": {"epochs": -(-steps // per_epoch),
                                             "max_steps_per_epoch": min(per_epoch, steps)}}})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--num-train", type=int, default=800)
    ap.add_argument("--num-val", type=int, default=100)
    args = ap.parse_args(argv)
    from msdet.config import load_params
    from msdet.evaluation.runner import run_eval
    from msdet.training import train_model
    from stages import mindrecord

    out = Path(args.out)
    write_tree(out / "coco", args.num_train, args.num_val)
    rows = []
    for anchors in ("default", "fit"):
        run_dir = out / anchors
        run_dir.mkdir(parents=True, exist_ok=True)
        params_file = run_dir / "params.yaml"
        params_file.write_text(yaml.safe_dump(_params(out, anchors, args.steps, args.num_train), sort_keys=False))
        if anchors == "default":
            mindrecord.main(["--params", str(params_file), "--metrics", str(out / "data.json"),
                             "--plots", str(out / "plots")])
        params = load_params(params_file)
        card = train_model(params, "d0", params.mindrecord.out_dir, run_dir / "model", progress=False)
        metrics = run_eval(params, "d0", run_dir / "model" / "ema.ckpt", run_dir / "metrics.json", run_dir / "plots")
        rows.append((anchors, card["steps"], card["anchors"], metrics["AP"], metrics["AP50"]))
    bpr = json.loads((out / "data.json").read_text())["d0_anchors"]
    for anchors, steps, spec, ap_, ap50 in rows:
        print(f"{anchors:8s} BPR {bpr[anchors]['bpr']:.4f}  steps {steps}  AP {ap_:.4f}  AP50 {ap50:.4f}  "
              f"anchors {json.dumps(spec)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
