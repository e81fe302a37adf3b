"""End to end on your own data: photos of mixed sizes and formats in the YOLO layout -> `dvc repro eval_nanodet`
in a throw-away repo (tiny config, the default four training shards).

Class names and count come from the data (the class head follows), the download stage converts (large photos
are downscaled), the MindRecord stage shards and reports the conversion and the ground-truth padding in
metrics/data.json, and training reads every shard.
"""
from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import PHOTO_SIZES, run, throwaway_repo, write_photo_set

pytestmark = pytest.mark.slow
NAMES = ["apple", "pear"]


def test_mixed_photos_train_and_evaluate_through_dvc(tmp_path):
    boxes = write_photo_set(tmp_path / "fruit", NAMES, {"train": 12, "val": 4})
    dst = tmp_path / "repo"
    tiny = {
        "data": {"source": "own", "own": {"format": "yolo", "path": str(tmp_path / "fruit"), "max_image_side": 640,
                                          "workers": 1}},
        "mindrecord": {"train_shards": 4, "val_shards": 2, "workers": 1},
        "nanodet": {"input_size": 64, "train": {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2,
                                                 "warmup_steps": 1, "num_workers": 1,
                                                 "bn_recalibration_batches": 1}},
        "eval": {"batch_size": 4, "num_plot_images": 1},
    }
    dst, env = throwaway_repo(dst, tiny)
    out = run([sys.executable, "-m", "dvc", "repro", "eval_nanodet"], dst, env)
    assert {"download", "mindrecord", "train_nanodet", "eval_nanodet"} <= {
        line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert f"[download] own (yolo) -> data/coco: train 12 images / {boxes['train']} annotations" in out, out

    data = json.loads((dst / "metrics" / "data.json").read_text())
    assert data["num_classes"] == 2 and (data["train"]["images"], data["val"]["images"]) == (12, 4)
    assert data["conversion"]["images"] == 16 and data["conversion"]["boxes"] == sum(boxes.values())
    assert data["conversion"]["downscaled"] == 2 * sum(max(w, h) > 640 for w, h, _ in PHOTO_SIZES)  # 16 = 2 x 8
    assert len(list((dst / "data" / "mindrecord").glob("train.mindrecord?"))) == 4
    assert data["gt_padding"]["nanodet"] == {"max_gt_boxes": 8, "boxes_over_cap": 0, "images_over_cap": 0}
    card = json.loads((dst / "models" / "nanodet" / "model_card.json").read_text())
    assert card["classes"] == NAMES and card["num_classes"] == 2 and card["category_ids"] == [1, 2]
    metrics = json.loads((dst / "metrics" / "nanodet.json").read_text())
    assert {"AP", "AP50", "AR100"} <= set(metrics)
    assert sorted((dst / "plots" / "nanodet" / "images").glob("*.png"))
