"""Data-parallel training under msrun with 2 CPU workers (what `make train-8p` runs with 8 on Ascend)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from msdet.config import merge
from msdet.data.coco import resolve_tree
from msdet.data.mindrecord import convert_tree
from msdet.data.synthetic import generate_synthetic
from msdet.engine.launch import DistributedJobFailed, failed_rank_logs, last_error_line, run_distributed
from msdet.engine.live import read_series
from tests.helpers import config

ROOT = Path(__file__).resolve().parents[1]


def test_failed_rank_log_is_found(tmp_path):
    (tmp_path / "worker_0.log").write_text("[WARNING] fine\nstep 1\n")
    (tmp_path / "worker_1.log").write_text("Traceback (most recent call last):\n  File x\nValueError: bad shard\n")
    bad = failed_rank_logs(tmp_path)
    assert bad == [tmp_path / "worker_1.log"]
    assert last_error_line(bad[0]) == "ValueError: bad shard"


@pytest.mark.slow
def test_dead_worker_fails_the_job_naming_its_log(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, time\n"
        "import mindspore as ms\n"
        "from mindspore.communication import init, get_rank\n"
        "ms.set_device('CPU')\n"
        "init()\n"
        "if get_rank() == 1:\n"
        "    raise RuntimeError('rank one gives up')\n"
        "time.sleep(600)\n")
    with pytest.raises(DistributedJobFailed, match=r"rank 1 failed: see .*worker_1\.log .*rank one gives up"):
        run_distributed(str(script), [], 2, tmp_path / "logs", timeout_s=240)


NANODET_NORMALISER_WORKER = """
import json, sys
import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindspore.communication import get_rank, init
from msdet.config import load_params
from msdet.detectors import build_detector
ms.set_device("CPU")
ms.set_context(mode=ms.PYNATIVE_MODE)
init()
rank = get_rank()
det = build_detector(load_params(sys.argv[1]), "nanodet", 4)
net = det.build_network()
for p in net.get_parameters():  # output biases 0: class scores ~0.5, so the GIoU weight sums exceed 1
    if "gfl_cls" in p.name and p.name.endswith("bias"):
        p.set_data(Tensor(np.zeros(p.shape, np.float32)))
rng = np.random.default_rng(rank)
image = Tensor(rng.normal(size=(1, 3, det.input_size, det.input_size)).astype(np.float32))
boxes = np.zeros((1, 4, 4), np.float32)
labels = np.full((1, 4), -1, np.int32)
n = 1 + 2 * rank  # rank 0: one object, rank 1: three
boxes[0, :n] = [[8, 8, 60, 60], [64, 10, 120, 50], [20, 70, 90, 120]][:n]
labels[0, :n] = [0, 1, 2][:n]
args = (image, Tensor(boxes), Tensor(labels), Tensor(0, ms.int32))
parts = {g: det.loss_cell(net, g)(*args)[1].asnumpy().tolist() for g in (1, 2)}
json.dump(parts, open(sys.argv[2] + f"/rank{rank}.json", "w"))
"""


@pytest.mark.slow
def test_nanodet_normalisers_are_averaged_over_ranks(tmp_path):
    """Official NanoDet divides by reduce_mean(positives) and reduce_mean(sum of weights). Rank r's loss with
    the averaged count N is its one-device loss times N_r / mean(N), and those factors sum to 2 over 2 ranks."""
    script = tmp_path / "worker.py"
    script.write_text(NANODET_NORMALISER_WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run_distributed(str(script), [str(ROOT / "params.yaml"), str(tmp_path)], 2, tmp_path / "logs",
                    timeout_s=600, env=env)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    names = ("loss", "qfl", "bbox", "dfl", "aux_qfl", "aux_bbox", "aux_dfl")
    for k in (names.index("qfl"), names.index("bbox"), names.index("aux_qfl"), names.index("aux_bbox")):
        ratios = [r["2"][k] / r["1"][k] for r in ranks]
        assert ratios[0] != pytest.approx(1.0, abs=1e-3), (names[k], ratios)  # the ranks' counts differ
        assert sum(ratios) == pytest.approx(2.0, rel=1e-4), (names[k], ratios)


@pytest.mark.detector
@pytest.mark.slow
def test_two_workers_train_identical_weights_on_disjoint_halves(tmp_path):
    data = tmp_path / "coco"
    generate_synthetic(data, config("data.synthetic", num_train=8, num_val=4, image_size=128, max_objects=3, seed=5,
                                      num_classes=6, size_sampling="log_uniform", max_rotation_deg=180.0))
    mr = tmp_path / "mindrecord"
    convert_tree(resolve_tree(data), mr, config("mindrecord", train_shards=1, workers=1))
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), {
        "data": {"root": str(data)},
        "mindrecord": {"out_dir": str(mr)},
        # no augmentation: each rank sees the same 4 images every step, so the loss must fall
        # zylo117's head init starts the loss high enough that 12 SGD steps show the fall clearly
        "d0": {"input_size": 128, "anchor_scale": 4.0, "drop_connect_rate": 0.2, "head_init": "zylo117",
               "focal_gamma": 2.0, "neg_iou": 0.4,
               "augment": {"scale_min": 1.0, "scale_max": 1.0, "flip_prob": 0.0},
               "train": {"epochs": 12, "batch_size": 4, "optimizer": "sgd", "lr": 0.16, "lr_reference_batch": 64,
                         "weight_decay": 0.00004, "decay_norm_and_bias": False, "grad_clip_norm": 10.0,
                         "warmup_steps": 1, "num_workers": 1, "max_gt_boxes": 4, "bn_recalibration_batches": 0}},
    })
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--model", "d0", "--workers", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    logs = tmp_path / "logs" / "msrun" / "d0"
    worker_logs = [(logs / f"worker_{r}.log").read_text(errors="replace") for r in (0, 1)]
    assert proc.returncode == 0, proc.stderr[-2000:] + "\n".join(w[-2000:] for w in worker_logs)

    digests = [re.findall(r"\[rank \d\] trainable weights sha256 (\w+)", w) for w in worker_logs]
    assert len(digests[0]) == 1 and digests[0] == digests[1], digests
    for epoch in range(1, 13):
        shards = [json.loads(re.search(rf"\[rank \d\] epoch {epoch} samples (\[.*\])", w).group(1))
                  for w in worker_logs]
        assert len(shards[0]) == len(shards[1]) == 4
        assert not set(shards[0]) & set(shards[1])  # each rank saw its own half of the 8 images

    card = json.loads((tmp_path / "models" / "d0" / "model_card.json").read_text())
    assert card["devices"] == 2 and card["global_batch"] == 8 and card["steps"] == 12
    # what ran (params.yaml: cpu_kernels auto, and this host builds every kernel D0 uses)
    from msdet.kernels import build, layer

    assert card["cpu_kernels"] == {"kernels": [k for k in layer.KERNELS if k in layer.MODEL_KERNELS["d0"]],
                                   "compiler": build.compiler(), "isa": build.cpu_isa()}
    losses = [v for _, v in read_series(tmp_path / "dvclive" / "d0", "train/loss")]  # rank 0's live log
    assert len(losses) == 12
    # rank 0's loss swings by up to 2 from step to step (its half of the images changes every epoch): the later
    # half of the run against the first three steps, not three steps against three
    assert sum(losses[6:]) / 6 < 0.8 * sum(losses[:3]) / 3, losses
