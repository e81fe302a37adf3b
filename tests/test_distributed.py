"""Data-parallel training under msrun with 2 CPU workers (what `make train-8p` runs with 8 on Ascend)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import yaml
from mindspore import Tensor, nn

from msdet.config import merge
from msdet.data.coco import resolve_tree
from msdet.data.mindrecord import convert_tree
from msdet.data.synthetic import generate_synthetic
from msdet.engine.launch import DistributedJobFailed, failed_rank_logs, last_error_line, run_distributed
from msdet.engine.live import read_series
from msdet.models.layers import drop_connect
from tests.helpers import config

ROOT = Path(__file__).resolve().parents[1]


def test_failed_rank_log_is_found(tmp_path):
    (tmp_path / "worker_0.log").write_text("[WARNING] fine\nstep 1\n")
    (tmp_path / "worker_1.log").write_text("Traceback (most recent call last):\n  File x\nValueError: bad shard\n")
    bad = failed_rank_logs(tmp_path)
    assert bad == [tmp_path / "worker_1.log"]
    assert last_error_line(bad[0]) == "ValueError: bad shard"
    (tmp_path / "worker_2.log").write_text("[WARNING] fine\nerror: state: the ranks resume from different points\n")
    assert failed_rank_logs(tmp_path)[1:] == [tmp_path / "worker_2.log"]
    assert last_error_line(tmp_path / "worker_2.log") == "error: state: the ranks resume from different points"


def test_failed_rank_logs_come_in_the_order_the_ranks_stopped(tmp_path):
    """Rank 10 raised first; ranks 2 and 3 failed after it, in their next collective."""
    stopped = {10: 100, 3: 160, 2: 130, 0: 200}
    for rank, second in stopped.items():
        log = tmp_path / f"worker_{rank}.log"
        log.write_text("step 1\n" if rank == 0 else f"Traceback (most recent call last):\nRuntimeError: r{rank}\n")
        os.utime(log, (second, second))
    assert failed_rank_logs(tmp_path) == [tmp_path / f"worker_{r}.log" for r in (10, 2, 3)]


HANGING_WORKER = """
import os, sys, time
from pathlib import Path
Path(sys.argv[1], os.environ["MS_ROLE"] + os.environ["RANK_ID"]).write_text(str(os.getpid()))
time.sleep(600)
"""


@pytest.mark.slow
def test_a_hung_job_is_stopped_at_its_timeout_with_its_workers(tmp_path):
    script, pids = tmp_path / "worker.py", tmp_path / "pids"
    script.write_text(HANGING_WORKER)
    pids.mkdir()
    with pytest.raises(DistributedJobFailed, match=r"timed out after 20 s \(runtime.job_timeout_s\); the log "
                                                   r"written to last the longest ago: .*worker_\d\.log"):
        run_distributed(str(script), [str(pids)], 2, tmp_path / "logs", timeout_s=20)
    started = {p.name: int(p.read_text()) for p in pids.iterdir()}
    assert set(started) == {"MS_SCHED0", "MS_WORKER0", "MS_WORKER1"}
    deadline = time.time() + 10  # killed processes linger as zombies until their new parent reaps them
    while any(_running(pid) for pid in started.values()) and time.time() < deadline:
        time.sleep(0.2)
    assert not [name for name, pid in started.items() if _running(pid)]


def _running(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_rank_seeds_keep_rank_zero_and_differ_per_rank():
    from msdet.engine.distributed import rank_seed

    assert rank_seed(0, 0) == 0 and rank_seed(1234, 0) == 1234
    seeds = [rank_seed(0, r) for r in range(64)]
    assert len(set(seeds)) == 64 and all(0 <= s < 2**31 for s in seeds)
    assert rank_seed(0, 1) == rank_seed(0, 1) != rank_seed(1, 1)


class _Drop(nn.Cell):
    def construct(self, x):
        return drop_connect(x, 0.5)


@pytest.mark.parametrize("graph", [True, False], ids=["graph", "pynative"])
def test_rank_seeds_give_each_rank_its_own_drop_connect_masks(graph):
    """Two calls of a fresh cell after seeding, as the compiled step draws step after step."""
    from msdet.engine.distributed import rank_seed

    def masks(seed):
        ms.set_seed(seed)
        cell, x = _Drop(), Tensor(np.ones((32, 1, 1, 1), np.float32))
        return np.concatenate([cell(x).asnumpy().ravel() for _ in range(2)])

    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE if graph else ms.PYNATIVE_MODE)
    try:
        rank0, rank1, again = masks(rank_seed(0, 0)), masks(rank_seed(0, 1)), masks(rank_seed(0, 1))
        np.testing.assert_array_equal(rank0, masks(0))
    finally:
        ms.set_context(mode=mode)
    np.testing.assert_array_equal(rank1, again)
    assert (rank0 != rank1).sum() > 8


def test_device_comes_from_device_id_and_a_rank_table_launch_without_it_is_refused(monkeypatch):
    from msdet.engine.distributed import LaunchError, device_id

    for var in ("MS_WORKER_NUM", "RANK_TABLE_FILE", "RANK_SIZE", "DEVICE_ID", "RANK_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DEVICE_ID", "5")
    assert device_id("Ascend") is None  # one process: MindSpore's default device
    monkeypatch.setenv("RANK_TABLE_FILE", "/x/rank_table_8p.json")
    monkeypatch.setenv("RANK_SIZE", "8")
    monkeypatch.setenv("RANK_ID", "3")
    assert device_id("Ascend") == 5 and device_id("GPU") == 5
    assert device_id("CPU") is None
    monkeypatch.delenv("DEVICE_ID")
    with pytest.raises(LaunchError, match=r"rank_table_8p\.json launch of rank 3: set DEVICE_ID"):
        device_id("Ascend")
    monkeypatch.delenv("RANK_TABLE_FILE")
    monkeypatch.setenv("MS_WORKER_NUM", "8")  # msrun exports DEVICE_ID = the worker's local index
    monkeypatch.setenv("DEVICE_ID", "2")
    assert device_id("Ascend") == 2


def test_setup_runtime_sets_jit_level_device_and_affinity(monkeypatch):
    """Ascend is not available here: set_device, the precision mode and set_cpu_affinity are stubbed."""
    import dataclasses

    import mindspore as ms

    from msdet.engine.runtime import JIT_LEVEL, setup_runtime
    from tests.helpers import project_params

    calls = []
    monkeypatch.setattr(ms, "set_device", lambda *args: calls.append(("device", *args)))
    monkeypatch.setattr(ms.device_context.ascend.op_precision, "precision_mode", lambda mode: None)
    monkeypatch.setattr(ms.runtime, "set_cpu_affinity", lambda on: calls.append(("affinity", on)))
    for var in ("MS_WORKER_NUM", "RANK_TABLE_FILE", "RANK_SIZE"):
        monkeypatch.delenv(var, raising=False)
    runtime = project_params().runtime
    try:
        setup_runtime(runtime)
        assert ms.get_context("jit_config")["jit_level"] == JIT_LEVEL["CPU"] == "O0"
        assert calls == [("device", "CPU")]
        calls.clear()
        monkeypatch.setenv("MS_WORKER_NUM", "8")
        monkeypatch.setenv("DEVICE_ID", "6")
        setup_runtime(dataclasses.replace(runtime, device_target="Ascend"))
        assert calls == [("device", "Ascend", 6), ("affinity", True)]
        assert ms.get_context("jit_config")["jit_level"] == JIT_LEVEL["Ascend"]
    finally:
        monkeypatch.undo()
        setup_runtime(runtime)


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


SHARDED_VALIDATION_WORKER = """
import json, sys
from msdet.config import load_params
from msdet.data.meta import read_meta
from msdet.detectors import build_detector
from msdet.engine.checkpoint import load_weights, save_weights
from msdet.engine.distributed import init_distributed
from msdet.engine.runtime import setup_runtime
from msdet.evaluation.runner import Validator
params = load_params(sys.argv[1])
setup_runtime(params.runtime)
dist = init_distributed()
meta = read_meta(params.mindrecord.out_dir)
det = build_detector(params, "d0", int(meta["num_classes"]))
net = det.build_network()
if dist.enabled:
    load_weights(net, sys.argv[2])
else:
    save_weights(sys.argv[2], net)
metrics = Validator(params, "d0", [c["id"] for c in meta["categories"]])(det, net, dist)
json.dump(metrics, open(sys.argv[3] + f"/rank{dist.rank}_of_{dist.group_size}.json", "w"))
"""


@pytest.mark.slow
def test_two_workers_validate_to_the_ap_of_one(tmp_path):
    """9 val images: rank 0 predicts 5, rank 1 predicts 4 (its last batch padded); the gathered detections
    must score the AP one process gets on the same weights (a fresh network with every candidate kept, two
    classes and many objects, so AP is small but above 0 and counts the detections of every image)."""
    data, mr = tmp_path / "coco", tmp_path / "mindrecord"
    generate_synthetic(data, config("data.synthetic", num_train=2, num_val=9, image_size=128, max_objects=6, seed=5,
                                    num_classes=2, size_sampling="log_uniform", max_rotation_deg=180.0))
    convert_tree(resolve_tree(data), mr, config("mindrecord", train_shards=1, workers=1))
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), {
        "data": {"root": str(data)}, "mindrecord": {"out_dir": str(mr)}, "runtime": {"graph_mode": False},
        "d0": {"input_size": 128}, "eval": {"batch_size": 2, "score_threshold": 0.0}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    script = tmp_path / "worker.py"
    script.write_text(SHARDED_VALIDATION_WORKER)
    args = [str(tmp_path / "params.yaml"), str(tmp_path / "net.ckpt"), str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    one = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    run_distributed(str(script), args, 2, tmp_path / "logs", timeout_s=600, env=env)
    single = json.loads((tmp_path / "rank0_of_1.json").read_text())
    assert single["AP"] > 0 and single["AP50"] > 0, single
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}_of_2.json").read_text()) == single, rank
