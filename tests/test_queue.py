"""Queued experiments side by side: scheduler ports, extraction folders, shared output paths, and a real
`dvc queue start -j 2` on the embedded set."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import zipfile

import pytest

from msdet.cli import run
from msdet.data.download import RemoteFile, extract_archive
from msdet.engine import launch
from tests.helpers import ROOT, throwaway_repo, write_params
from tests.helpers import run as run_cmd


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def temp_name(kind: str, pid: int, suffix: str = "x") -> str:
    return f".{kind}.tmp@{socket.gethostname()}@{pid}@{suffix}"


def test_reserved_ports_differ_when_the_kernel_names_one_twice(monkeypatch):
    taken = launch.free_port()
    other = launch.free_port()
    picks = iter([taken, taken, other])
    monkeypatch.setattr(launch, "free_port", lambda: next(picks))
    with launch.reserved_port() as first, launch.reserved_port() as second:
        assert (first, second) == (taken, other)


def test_a_port_held_by_another_job_is_skipped_until_that_job_dies(monkeypatch):
    port, spare = launch.free_port(), launch.free_port()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from msdet.engine.launch import lock_port; "
         f"h = lock_port({port}); print('held' if h else 'busy', flush=True); time.sleep(120)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        picks = iter([port, spare])
        monkeypatch.setattr(launch, "free_port", lambda: next(picks))
        with launch.reserved_port() as got:
            assert got == spare
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.setattr(launch, "free_port", lambda: port)
    with launch.reserved_port() as got:  # the killed job's lock went with it
        assert got == port


def test_extraction_removes_only_dead_jobs_temporary_folders(tmp_path, live_process):
    archive = tmp_path / "val.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("val2017/a.txt", "a")
    root = tmp_path / "root"
    root.mkdir()
    live = root / temp_name("extract-val.zip", live_process.pid)
    dead = root / temp_name("extract-val.zip", dead_pid())
    for folder in (live, dead):
        (folder / "val2017").mkdir(parents=True)
        (folder / "val2017" / "part.jpg").write_bytes(b"half")
    extract_archive(archive, RemoteFile(url="http://host/val.zip", name="val.zip", targets=("val2017",)), root)
    assert (root / "val2017" / "a.txt").read_text() == "a"
    assert (live / "val2017" / "part.jpg").read_bytes() == b"half"  # another job's, still extracting
    assert not dead.exists()
    assert sorted(p.name for p in root.iterdir()) == sorted(["val2017", live.name])


@pytest.mark.parametrize("stage,key", [("download", "data.root"), ("mindrecord", "mindrecord.out_dir")])
def test_an_output_outside_a_queued_copy_is_refused(tmp_path, monkeypatch, capsys, stage, key):
    import importlib

    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc"
    copy.mkdir(parents=True)
    shared = tmp_path / "shared"
    section, name = key.split(".")
    params = write_params(copy / "params.yaml", {section: {name: str(shared)}})
    monkeypatch.chdir(copy)
    main = importlib.import_module(f"stages.{stage}").main
    assert run(main, ["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {params}: {key} '{shared}' is outside this queued")
    assert not shared.exists() and sorted(p.name for p in copy.iterdir()) == ["params.yaml"]


TINY = {
    "data": {"synthetic": {"num_train": 16, "num_val": 4, "image_size": 128, "max_objects": 3}},
    "mindrecord": {"train_shards": 1},
    "nanodet": {"input_size": 128, "train": {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 2,
                                             "warmup_steps": 1, "num_workers": 1, "max_gt_boxes": 4,
                                             "bn_recalibration_batches": 0}},
}


@pytest.mark.detector
@pytest.mark.slow
def test_queue_start_with_two_jobs_trains_both(tmp_path):
    dst, env = throwaway_repo(tmp_path / "repo", TINY)
    dvc = [sys.executable, "-m", "dvc"]
    for lr in ("0.001", "0.002"):
        run_cmd(dvc + ["exp", "run", "--queue", "train_nanodet", "-S", f"nanodet.train.lr={lr}"], dst, env)
    run_cmd(dvc + ["queue", "start", "-j", "2"], dst, env)
    try:
        deadline = time.time() + 1500
        while time.time() < deadline:
            status = run_cmd(dvc + ["queue", "status"], dst, env)
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(10)
    finally:
        subprocess.run(dvc + ["queue", "stop", "--kill"], cwd=dst, env=env, capture_output=True)
    rows = [line.split() for line in status.splitlines()[1:] if line.strip() and not line.startswith("Worker")]
    assert sorted(r[-1] for r in rows) == ["Success", "Success"], status
    shown = run_cmd(dvc + ["exp", "show", "--csv", "--keep", r"^nanodet\.train\.lr$|^step$", "--drop", ".*"], dst, env)
    table = [dict(zip(shown.splitlines()[0].split(","), line.split(","))) for line in shown.splitlines()[1:]]
    # each experiment trained its 2 steps with its own learning rate
    assert sorted(r["nanodet.train.lr"] for r in table if r["step"] == "2") == ["0.001", "0.002"], shown
