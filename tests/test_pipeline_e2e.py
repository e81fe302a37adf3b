"""End to end: the real dvc.yaml in a throw-away git + DVC repo, on a tiny config.

Checks that `dvc repro` runs every stage, that a no-op repro does nothing, that `dvc exp run -S` on an eval
param reruns only the stages that read it (eval and export), that `dvc metrics diff` / `dvc params diff`
report the change, that a code edit reruns exactly the stages that import the file (tests/test_stage_deps.py
checks the lists themselves), that a running `dvc exp run` shows its dvclive metrics, survives a kill and
validates without changing the weights, and that `make clean` deletes no tracked file.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from msdet.engine.checkpoint import checkpoint_meta, read_checkpoint
from msdet.engine.live import SERIES_DIR, read_series
from tests.helpers import run, throwaway_repo

pytestmark = pytest.mark.slow

TINY = {
    "data": {"synthetic": {"num_train": 24, "num_val": 8, "image_size": 128, "max_objects": 4}},
    "mindrecord": {"train_shards": 1},
    "d0": {"input_size": 128, "train": {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 3,
                                         "warmup_steps": 1, "num_workers": 1, "max_gt_boxes": 8,
                                         "bn_recalibration_batches": 2}},
    "nanodet": {"input_size": 128, "train": {"epochs": 1, "batch_size": 4, "max_steps_per_epoch": 3,
                                              "warmup_steps": 1, "num_workers": 1, "max_gt_boxes": 8,
                                              "bn_recalibration_batches": 2}},
    "eval": {"batch_size": 4, "num_plot_images": 1},
    "export": {"formats": ["MINDIR"], "num_check_images": 1, "latency_repeats": 2, "end_to_end": False},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return throwaway_repo(tmp_path_factory.mktemp("e2e") / "repo", TINY)


def test_repro_then_experiment(repo):
    dst, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    run(dvc + ["repro"], dst, env)
    for model in ("d0", "nanodet"):
        metrics = json.loads((dst / "metrics" / f"{model}.json").read_text())
        assert {"AP", "AP50", "AP75", "AR100"} <= set(metrics)
        assert (dst / "models" / model / "ema.ckpt").is_file()
        assert (dst / "models" / model / "export" / "model.mindir").is_file()
        card = json.loads((dst / "models" / model / "model_card.json").read_text())
        assert card["input_size"] == 128 and card["steps"] == 3
        assert [s for s, _ in read_series(dst / "dvclive" / model, "train/loss")] == [1, 2, 3]
        assert (dst / "models" / model / "best.ckpt").is_file() and card["validation"]["best"] is None
    plots = json.loads(run(dvc + ["plots", "show", "--json"], dst, env))["data"]
    for name in ("d0 loss components", "nanodet loss components", "learning rate"):  # from the dvclive files
        assert plots[name][0]["content"]["data"]["values"], name
    data = json.loads((dst / "metrics" / "data.json").read_text())
    assert data["train"]["images"] == 24
    status = run(dvc + ["status"], dst, env)
    assert "changed" not in status
    noop = run(dvc + ["repro"], dst, env)
    assert "Running stage" not in noop
    run(["git", "add", "-A"], dst, env)
    run(["git", "commit", "-qm", "baseline"], dst, env)
    # a model version is a GTO git tag on the commit (what `gto register` writes); DVC resolves it by name
    run(["git", "tag", "-a", "efficientdet-d0@v0.1.0", "-m", "Registering artifact efficientdet-d0 version v0.1.0"],
        dst, env)
    shown = run([sys.executable, "-c", "import dvc.api, json, sys; print(json.dumps(dvc.api.artifacts_show("
                 "'efficientdet-d0', repo=sys.argv[1])))", str(dst)], dst, env)
    assert json.loads(shown.splitlines()[-1])["path"] == "models/d0/ema.ckpt", shown

    out = run(dvc + ["exp", "run", "-S", "eval.score_threshold=0.0"], dst, env)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    # the export stages read eval.* too: their decoded check uses the eval post-processing
    assert ran == {"eval_d0", "eval_nanodet", "export_d0", "export_nanodet"}, out
    params_diff = json.loads(run(dvc + ["params", "diff", "--json"], dst, env))
    changed_param = params_diff["params.yaml"]["eval.score_threshold"]
    assert (changed_param["old"], changed_param["new"]) == (0.05, 0.0)
    metrics_diff = json.loads(run(dvc + ["metrics", "diff", "--json", "--all"], dst, env))
    changed = [k for f, d in metrics_diff.items() for k, v in d.items() if k == "num_detections" and v.get("diff")]
    assert changed, metrics_diff


def test_remote_round_trip_restores_every_output(repo, tmp_path):
    """A team shares data/ and models/ through a DVC remote: push, clone, pull, and nothing is left to run."""
    dst, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    remote = tmp_path / "remote"
    run(dvc + ["remote", "add", "-d", "shared", str(remote)], dst, env)
    run(["git", "add", "-A"], dst, env)
    run(["git", "commit", "-qm", "shared remote"], dst, env)
    run(["git", "tag", "-a", "nanodet-plus-m@v0.1.0", "-m", "Registering artifact nanodet-plus-m version v0.1.0"],
        dst, env)
    run(dvc + ["push"], dst, env)
    # a declared model artifact downloads from the remote by name
    run(dvc + ["artifacts", "get", str(dst), "nanodet-plus-m", "-o", str(tmp_path / "nanodet.ckpt")], tmp_path, env)
    assert (tmp_path / "nanodet.ckpt").read_bytes() == (dst / "models" / "nanodet" / "ema.ckpt").read_bytes()
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(dst), str(clone)], tmp_path, env)
    run(dvc + ["pull"], clone, env)
    for model in ("d0", "nanodet"):
        for name in ("ema.ckpt", "final.ckpt", "export/model.mindir"):
            assert (clone / "models" / model / name).read_bytes() == (dst / "models" / model / name).read_bytes()
    assert "changed" not in run(dvc + ["status"], clone, env)
    assert "Running stage" not in run(dvc + ["repro"], clone, env)


def test_code_edit_reruns_exactly_the_stages_that_import_it(repo):
    dst, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    # An edit to D0's box decoding: train_d0 reruns, from the start (its persisted resume state is of other
    # code), and writes the same checkpoint; eval_d0 still reruns because it imports the decoder itself; no
    # NanoDet stage runs.
    ema = dst / "models" / "d0" / "ema.ckpt"
    before = hashlib.sha256(ema.read_bytes()).hexdigest()
    coder = dst / "msdet" / "ops" / "box_coder.py"
    coder.write_text(coder.read_text().replace("def decode_np(", "# edited by the test\ndef decode_np(", 1))
    out = run(dvc + ["repro"], dst, env)
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"train_d0", "eval_d0", "export_d0"}, out
    assert "other params, data, starting weights or code: training from the start" in out
    assert hashlib.sha256(ema.read_bytes()).hexdigest() == before

    # An edit to a NanoDet-only file leaves every D0 stage alone
    ghostpan = dst / "msdet" / "models" / "ghostpan.py"
    ghostpan.write_text(ghostpan.read_text() + "\n# edited by the test\n")
    changed = set(json.loads(run(dvc + ["status", "--json"], dst, env)))
    assert changed == {"train_nanodet", "eval_nanodet", "export_nanodet"}, changed
    run(["git", "checkout", "--", "msdet/models/ghostpan.py"], dst, env)


def weights(path: Path) -> dict[str, np.ndarray]:
    return {k: v.asnumpy() for k, v in read_checkpoint(path).items() if hasattr(v, "asnumpy")}


def set_d0_train(dst: Path, **values) -> None:
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["d0"]["train"].update(values)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.detector
@pytest.mark.long
def test_live_metrics_kill_resume_and_validation(repo):
    """A validated `dvc exp run` of train_d0 logs live, is killed in its 2nd epoch and rerun with `dvc repro`
    (it resumes; `dvc exp run` would first check the stage's outputs out as dvc.lock has them, resetting the
    persisted state); then the same training without validation, uninterrupted, must give the same series
    and weights."""
    import psutil

    dst, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    live = dst / "dvclive" / "d0"
    steps = 4
    set_d0_train(dst, epochs=3, max_steps_per_epoch=steps, eval_max_images=4, eval_every_epochs=1)
    proc = subprocess.Popen(dvc + ["exp", "run", "train_d0"], cwd=dst, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen, show = [], None
    try:
        while proc.poll() is None and (not seen or seen[-1] <= steps):  # until the 2nd epoch's first row
            rows = len(read_series(live, "train/loss"))
            if rows and (not seen or rows != seen[-1]):
                seen.append(rows)
            if rows and show is None:  # `dvc exp show` on the running experiment
                show = subprocess.Popen(dvc + ["exp", "show", "--json"], cwd=dst, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        trainer = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "stages.train" in " ".join(p.cmdline())]
        assert len(trainer) == 1
        trainer[0].kill()
    finally:
        out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, out[-3000:]
    assert len(seen) >= 2 and seen[-1] == steps + 1, seen  # the file grew while the stage ran
    assert not (dst / "models" / "d0" / "model_card.json").exists()  # the stage never ended
    show_out, show_err = show.communicate(timeout=300)
    assert show.returncode == 0, show_err[-2000:]
    workspace = next(e for e in json.loads(show_out) if e["rev"] == "workspace")
    shown = workspace["data"]["metrics"]["dvclive/d0/metrics.json"]["data"]
    assert 1 <= shown["step"] <= steps + 1 and "loss" in shown["train"], shown

    run(dvc + ["repro", "train_d0"], dst, env)  # resumes after the 1st epoch
    card = json.loads((dst / "models" / "d0" / "model_card.json").read_text())
    assert card["resumed_from_epoch"] == 1 and card["steps"] == 3 * steps
    assert [s for s, _ in read_series(live, "train/loss")] == list(range(1, 3 * steps + 1))
    val_ap = read_series(live, "val/AP")
    assert [s for s, _ in val_ap] == [steps, 2 * steps, 3 * steps]
    best_step = max(val_ap, key=lambda r: r[1])[0]  # the first of equal APs
    best = read_checkpoint(dst / "models" / "d0" / "best.ckpt")
    assert checkpoint_meta(best, "step") == best_step == card["validation"]["best"]["step"]
    series = {p.name: p.read_text() for p in (live / SERIES_DIR / "train").glob("*.tsv")
              if p.name != "images_per_s.tsv"}
    killed_then_resumed = {name: weights(dst / "models" / "d0" / name) for name in ("final.ckpt", "ema.ckpt")}

    set_d0_train(dst, eval_every_epochs=0)
    run(dvc + ["repro", "train_d0"], dst, env)
    assert not read_series(live, "val/AP")
    assert {p.name: p.read_text() for p in (live / SERIES_DIR / "train").glob("*.tsv")
            if p.name != "images_per_s.tsv"} == series
    for name, expected in killed_then_resumed.items():
        got = weights(dst / "models" / "d0" / name)
        for key, value in expected.items():
            np.testing.assert_array_equal(got[key], value, err_msg=f"{name} {key}")


def test_make_clean_deletes_no_tracked_file(repo):
    dst, env = repo
    run(["git", "add", "-A"], dst, env)
    run(["git", "commit", "-qm", "after the edits"], dst, env)
    run(["make", "clean"], dst, env)
    deleted = [ln for ln in run(["git", "status", "--porcelain"], dst, env).splitlines() if ln[:2].strip() == "D"]
    assert not deleted, deleted
    assert not (dst / "models" / "d0" / "ema.ckpt").exists() and not (dst / "data" / "mindrecord").exists()
