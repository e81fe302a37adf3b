"""Beyond one process group on one launcher: two msrun "nodes" on this host, and a training stage killed with
SIGKILL inside an epoch that a rerun finishes bit-identically (tiny D0 config; both slow)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from msdet.config import merge
from msdet.data.coco import resolve_tree
from msdet.data.mindrecord import convert_tree
from msdet.data.synthetic import generate_synthetic
from msdet.engine.checkpoint import sha256_file
from msdet.engine.launch import Cluster, DistributedJobFailed, free_port, msrun_command, run_distributed
from tests.helpers import config, series_files

ROOT = Path(__file__).resolve().parents[1]
DIGEST = re.compile(r"\[rank (\d)\] trainable weights sha256 (\w+)")


def tiny_d0_project(root: Path, num_train: int, train: dict) -> Path:
    """A working directory with data, MindRecord and a params.yaml for a 128 px D0; returns it."""
    data, mr = root / "coco", root / "mindrecord"
    generate_synthetic(data, config("data.synthetic", num_train=num_train, num_val=4, image_size=128, max_objects=3,
                                    seed=5, num_classes=6, size_sampling="log_uniform", max_rotation_deg=180.0))
    convert_tree(resolve_tree(data), mr, config("mindrecord", train_shards=1, workers=1))
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), {
        "data": {"root": str(data)}, "mindrecord": {"out_dir": str(mr)},
        "d0": {"input_size": 128, "anchor_scale": 4.0,
               "train": merge({"batch_size": 2, "optimizer": "sgd", "lr": 0.05, "lr_reference_batch": 4,
                               "warmup_steps": 1, "num_workers": 1, "max_gt_boxes": 4,
                               "bn_recalibration_batches": 0}, train)},
    })
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def stage_env(extra_path: str = "") -> dict:
    path = os.pathsep.join(p for p in (extra_path, str(Path(sys.executable).parent), os.environ["PATH"]) if p)
    return dict(os.environ, PYTHONPATH=str(ROOT), PATH=path)


def stage(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages.train", "--model", "d0", *args]


def test_msrun_command_for_a_node_of_several():
    cmd = msrun_command("s.py", ["--x"], 8, "logs", cluster=Cluster(nodes=4, node_rank=2, master_addr="h0",
                                                                      master_port=8118))
    assert cmd[1:] == ["--worker_num=32", "--local_worker_num=8", "--master_port=8118", "--log_dir=logs",
                       "--join=True", "--cluster_time_out=300", "--node_rank=2", "--master_addr=h0", "s.py", "--x"]
    one = msrun_command("s.py", [], 2, "logs", master_port=8119)  # one host: no node rank or address
    assert one[1:4] == ["--worker_num=2", "--local_worker_num=2", "--master_port=8119"]
    assert not any("node_rank" in c for c in one)
    with pytest.raises(ValueError, match="msrun needs a scheduler port"):
        msrun_command("s.py", [], 2, "logs")
    with pytest.raises(ValueError, match="node_rank 4 is outside 0..3"):
        Cluster(nodes=4, node_rank=4, master_port=1)
    with pytest.raises(ValueError, match="fixed master_port"):
        Cluster(nodes=2, node_rank=0)


def other_host_ip(tmp_path: Path) -> Path:
    """msrun decides whether it hosts the scheduler by finding master_addr among this host's addresses
    (``ip -j addr``); on one machine both launchers would, so node 1's is given an ``ip`` that lists none,
    as a second host's would."""
    d = tmp_path / "other_host"
    d.mkdir()
    (d / "ip").write_text("#!/bin/sh\necho '[]'\n")
    (d / "ip").chmod(0o755)
    return d


DYING_NODE_WORKER = """
import mindspore as ms
from mindspore import Tensor, ops
from mindspore.communication import get_rank, init
ms.set_device("CPU")
init()
ops.AllReduce()(Tensor([1.0])).asnumpy()
if get_rank() == 1:
    raise RuntimeError("node one gives up")
ops.AllReduce()(Tensor([1.0])).asnumpy()
"""


@pytest.mark.slow
@pytest.mark.long
def test_a_failing_node_stops_both_naming_host_and_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DYING_NODE_WORKER)
    port, errors = free_port(), {}
    fake_ip = other_host_ip(tmp_path)

    def node(rank):
        env = stage_env(str(fake_ip) if rank else "")
        try:
            run_distributed(str(script), [], 1, tmp_path / f"node{rank}", timeout_s=400, env=env,
                            cluster=Cluster(nodes=2, node_rank=rank, master_port=port))
        except DistributedJobFailed as exc:
            errors[rank] = str(exc)

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    host = re.escape(socket.gethostname())
    assert re.match(rf"node 1 \({host}\): rank 1 failed: see .*worker_1\.log .*node one gives up", errors[1])
    assert re.match(rf"node 0 \({host}\): rank 0 failed: .* It lost a peer", errors[0]), errors[0]


@pytest.mark.detector
@pytest.mark.slow
@pytest.mark.long
def test_two_nodes_train_the_same_weights_as_one_node_with_two_workers(tmp_path):
    """Node 1 runs with an ``ip`` that lists no address (see other_host_ip)."""
    one = tiny_d0_project(tmp_path / "one", 8, {"epochs": 1})
    two = tiny_d0_project(tmp_path / "two", 8, {"epochs": 1})
    fake_ip = other_host_ip(tmp_path)
    port = str(free_port())
    t0 = time.time()
    single = subprocess.run(stage("--workers", "2"), cwd=one, env=stage_env(), capture_output=True, text=True,
                            timeout=900)
    t_single = time.time() - t0
    assert single.returncode == 0, single.stderr[-3000:]
    t0 = time.time()
    nodes = [subprocess.Popen(stage("--workers", "1", "--nodes", "2", "--node-rank", str(r), "--master-addr",
                                    "127.0.0.1", "--master-port", port), cwd=two,
                              env=stage_env(str(fake_ip) if r else ""), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=900)[0] for p in nodes]
    t_nodes = time.time() - t0
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert "trained on 1 workers x 2 nodes (this is node 1)" in outs[1]

    logs = {"one": [one / "logs/msrun/d0/worker_0.log", one / "logs/msrun/d0/worker_1.log"],
            "two": [two / "logs/msrun/d0/node0/worker_0.log", two / "logs/msrun/d0/node1/worker_1.log"]}
    digests = {}
    for run, files in logs.items():
        for rank, f in enumerate(files):
            found = DIGEST.findall(f.read_text(errors="replace"))
            assert [r for r, _ in found] == [str(rank)], (run, f, found)
            digests[(run, rank)] = found[0][1]
    assert len(set(digests.values())) == 1, digests  # across ranks and across the two layouts
    card = json.loads((two / "models/d0/model_card.json").read_text())
    assert card["devices"] == 2 and card["steps"] == 2
    assert sha256_file(one / "models/d0/final.ckpt") == sha256_file(two / "models/d0/final.ckpt")
    print(f"wall: 1 node x 2 workers {t_single:.1f} s, 2 nodes x 1 worker {t_nodes:.1f} s")


def run_until(cmd: list[str], cwd: Path, pattern: str, timeout: float) -> tuple[subprocess.Popen, float]:
    """Start ``cmd``; SIGKILL it as soon as a line matching ``pattern`` appears. Returns it and the seconds."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    for line in proc.stdout:
        if re.search(pattern, line):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        if time.time() - t0 > timeout:
            break
    proc.wait()
    return proc, time.time() - t0


@pytest.mark.detector
@pytest.mark.slow
@pytest.mark.long
def test_stage_killed_inside_an_epoch_resumes_to_the_same_weights(tmp_path):
    """12 images / (batch 2 x accumulate 2) = 3 steps per epoch, 2 epochs, a resume point every 2 steps:
    killed right after the point at step 4 (epoch 2, 1 step in), the rerun starts there and must end with
    the same files (D0's loss cell with its positives normaliser under accumulation, too)."""
    train = {"epochs": 2, "accumulate_steps": 2, "checkpoint_every_steps": 2}
    full = tiny_d0_project(tmp_path / "full", 12, train)
    killed = tiny_d0_project(tmp_path / "killed", 12, train)
    t0 = time.time()
    done = subprocess.run(stage(), cwd=full, env=stage_env(), capture_output=True, text=True, timeout=900)
    t_full = time.time() - t0
    assert done.returncode == 0, done.stderr[-3000:]

    proc, t_killed = run_until(stage(), killed, r"resume point saved at step 4", 900)
    assert proc.returncode == -signal.SIGKILL
    state = killed / "models/d0/state"
    assert not (killed / "models/d0/final.ckpt").exists()
    assert sorted(p.name for p in state.glob("*.ckpt")) == ["last.ckpt", "previous.ckpt"]
    t0 = time.time()
    again = subprocess.run(stage(), cwd=killed, env=stage_env(), capture_output=True, text=True, timeout=900)
    t_again = time.time() - t0
    assert again.returncode == 0, again.stderr[-3000:]
    card = json.loads((killed / "models/d0/model_card.json").read_text())
    assert card["resumed_from_epoch"] == 1 and card["steps"] == 6 and card["global_batch"] == 4
    for name in ("final.ckpt", "ema.ckpt"):
        assert sha256_file(full / "models/d0" / name) == sha256_file(killed / "models/d0" / name), name
    assert series_files(full / "dvclive" / "d0") == series_files(killed / "dvclive" / "d0")  # each step once
    print(f"wall: uninterrupted {t_full:.1f} s, killed after step 4 {t_killed:.1f} s, rerun {t_again:.1f} s")


@pytest.mark.detector
@pytest.mark.slow
@pytest.mark.long
def test_a_node_without_the_resume_point_refuses_naming_the_ranks(tmp_path):
    """Each node in its own folder, as hosts without a shared file system: after a run stopped at the end of
    epoch 1 (step 2) only node 0's folder holds models/d0/state/, so rank 1 would start at step 0. The rerun
    must stop on both nodes and say where each rank stands (PyNative: no graph compilation)."""
    first = tiny_d0_project(tmp_path / "node0", 8, {"epochs": 2})
    params = yaml.safe_load((first / "params.yaml").read_text())
    params["runtime"]["graph_mode"] = False
    (first / "params.yaml").write_text(yaml.safe_dump(params))
    second = tmp_path / "node1"
    second.mkdir()
    shutil.copyfile(first / "params.yaml", second / "params.yaml")  # the same data, by absolute path
    fake_ip = other_host_ip(tmp_path)

    def two_nodes(*extra: str) -> tuple[list[int], list[str]]:
        port = str(free_port())
        nodes = [subprocess.Popen(stage("--workers", "1", "--nodes", "2", "--node-rank", str(r), "--master-addr",
                                        "127.0.0.1", "--master-port", port, *extra), cwd=cwd,
                                  env=stage_env(str(fake_ip) if r else ""), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r, cwd in enumerate((first, second))]
        outs = [p.communicate(timeout=900)[0] for p in nodes]
        return [p.returncode for p in nodes], outs

    codes, outs = two_nodes("--stop-after-epochs", "1")
    assert codes == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert (first / "models/d0/state/last.ckpt").is_file()
    assert not (second / "models/d0/state/last.ckpt").exists()

    codes, outs = two_nodes()
    assert codes == [1, 1], "\n".join(o[-2000:] for o in outs)
    for out in outs:
        assert re.search(r"rank \d failed: .*error: models/d0/state: the ranks resume from different points", out), \
            out[-2000:]
    for node, log in ((first, "node0/worker_0.log"), (second, "node1/worker_1.log")):
        text = (node / "logs/msrun/d0" / log).read_text(errors="replace")
        assert re.search(r"rank 0 at step 2 \(epoch 2, 0 steps into it; digest \w{15}\); "
                         r"rank 1 at step 0 \(epoch 1, 0 steps into it; digest \w{15}\)\); each node reads", text), \
            text[-2000:]
