"""End to end on your own data: a YOLO-format folder -> `dvc repro eval_nanodet` in a throw-away repo (tiny config).

Class names and count come from the data (the class head follows), the download stage converts, the
MindRecord stage reports the conversion and the ground-truth padding in metrics/data.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.helpers import run, throwaway_repo

pytestmark = pytest.mark.slow
NAMES = ["apple", "pear"]


def write_yolo_set(root: Path, n: int = 16) -> None:
    """n 64x64 JPEGs, each with one or two filled squares (class = colour), flat images/ + labels/."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.full((64, 64, 3), 90, np.uint8)
        lines = []
        for k in range(1 + i % 2):
            c = (i + k) % 2
            s = int(rng.integers(14, 24))
            x, y = int(rng.integers(0, 64 - s)), int(rng.integers(0, 64 - s))
            img[y:y + s, x:x + s] = (40, 40, 220) if c == 0 else (40, 200, 40)
            lines.append(f"{c} {(x + s / 2) / 64:.6f} {(y + s / 2) / 64:.6f} {s / 64:.6f} {s / 64:.6f}\n")
        cv2.imwrite(str(root / "images" / f"im{i:02d}.jpg"), img)
        (root / "labels" / f"im{i:02d}.txt").write_text("".join(lines))


def test_yolo_folder_trains_and_evaluates_through_dvc(tmp_path):
    write_yolo_set(tmp_path / "fruit")
    dst = tmp_path / "repo"
    tiny = {
        "data": {"source": "own", "own": {"format": "yolo", "path": str(tmp_path / "fruit"), "names": NAMES,
                                          "val_fraction": 0.25, "workers": 1}},
        "mindrecord": {"train_shards": 1, "workers": 1},
        "nanodet": {"input_size": 64, "train": {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2,
                                                 "warmup_steps": 1, "num_workers": 1,
                                                 "bn_recalibration_batches": 1}},
        "eval": {"batch_size": 4, "num_plot_images": 1},
    }
    dst, env = throwaway_repo(dst, tiny)
    out = run([sys.executable, "-m", "dvc", "repro", "eval_nanodet"], dst, env)
    assert {"download", "mindrecord", "train_nanodet", "eval_nanodet"} <= {
        line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}

    data = json.loads((dst / "metrics" / "data.json").read_text())
    assert data["num_classes"] == 2 and (data["train"]["images"], data["val"]["images"]) == (12, 4)
    assert data["conversion"]["images"] == 16 and data["conversion"]["boxes"] == 24
    assert data["gt_padding"]["nanodet"] == {"max_gt_boxes": 8, "boxes_over_cap": 0, "images_over_cap": 0}
    card = json.loads((dst / "models" / "nanodet" / "model_card.json").read_text())
    assert card["classes"] == NAMES and card["num_classes"] == 2 and card["category_ids"] == [1, 2]
    metrics = json.loads((dst / "metrics" / "nanodet.json").read_text())
    assert {"AP", "AP50", "AR100"} <= set(metrics)
    assert sorted((dst / "plots" / "nanodet" / "images").glob("*.png"))
