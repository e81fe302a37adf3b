"""Every command stops on a problem the user can fix with one line naming it, a non-zero exit, no traceback."""
from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from msdet.cli import run

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")


@pytest.fixture
def bad_params(tmp_path) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["eval"]["batch_size"] = 2.5
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


#: each stage's arguments with the bad params file in it
ARGS = {
    "download": lambda p: ["--params", str(p)],
    "mindrecord": lambda p: ["--params", str(p)],
    "train": lambda p: ["--model", "d0", "--params", str(p)],
    "eval": lambda p: ["--model", "d0", "--params", str(p)],
    "export": lambda p: ["--model", "d0", "--params", str(p)],
    "infer": lambda p: ["--model", "d0", "--ckpt", "x.ckpt", "--params", str(p), "img.png"],
    "convert": lambda p: ["--model", "d0", "--src", "x.pth", "--out", "y.ckpt", "--params", str(p)],
    "bench": lambda p: ["--params", str(p), "--only", "micro"],
}


@pytest.mark.parametrize("stage", sorted(ARGS))
def test_a_bad_params_value_is_one_line_naming_the_key(stage, bad_params, capsys, monkeypatch):
    monkeypatch.delenv("MSDET_TRACEBACK", raising=False)
    module = importlib.import_module(f"stages.{stage}")
    assert run(module.main, ARGS[stage](bad_params)) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'eval.batch_size' must be an integer" in err[0], err


def test_coco_overrides_names_an_unknown_key(tmp_path, capsys):
    from stages import coco_overrides

    bad = tmp_path / "coco.yaml"
    bad.write_text("d0:\n  input_sise: 512\n")
    assert run(coco_overrides.main, [str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input_sise" in err[0], err


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_script_runs_its_main_through_cli_run(stage):
    tree = ast.parse((ROOT / "stages" / f"{stage}.py").read_text())
    guard = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert guard and ast.unparse(guard[0].body[0]) == "sys.exit(run(main))", stage


def test_as_a_process_no_traceback(bad_params):
    env = {k: v for k, v in os.environ.items() if k != "MSDET_TRACEBACK"}
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--model", "nanodet", "--params", str(bad_params)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "eval.batch_size" in proc.stderr


def test_a_bug_keeps_its_traceback():
    def main(argv):
        raise TypeError("a bug")

    with pytest.raises(TypeError):
        run(main, [])


# --- a bad checkpoint through eval and train (<model>.init): one line naming the file, nothing written ---

#: the CPU kernels off: a training stage run in this process then compiles and installs none
KERNELS_OFF = {"cpu_kernels": "off"}


def bad_checkpoint(path: Path, kind: str) -> str:
    """Write a checkpoint ``kind`` to ``path``; returns what the error line says after the path."""
    from mindspore import nn

    from msdet.detectors import build_detector
    from msdet.engine.checkpoint import save_weights
    from tests.helpers import project_params

    if kind == "other_model":  # a NanoDet-Plus checkpoint where a D0 one is expected
        net = build_detector(project_params(), "nanodet", 2).build_network()
        save_weights(path, net, {"model": "nanodet"})
        return r": \d+ network tensors missing, e.g. \[.*\]; the file was saved for model 'nanodet'$"
    save_weights(path, nn.Dense(8, 8), {"model": "d0"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if kind == "truncated" else bytes(range(256)) * 8)
    return r": not a readable MindSpore checkpoint \(Failed to read the checkpoint file"


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("stage, kind", [
    ("eval", "truncated"),
    ("eval", "garbage"),
    pytest.param("eval", "other_model", marks=pytest.mark.detector),
    pytest.param("train", "truncated", marks=pytest.mark.detector),
    pytest.param("train", "garbage", marks=pytest.mark.detector),
    pytest.param("train", "other_model", marks=pytest.mark.detector),
])
def test_a_bad_checkpoint_is_one_line_naming_the_file(stage, kind, tmp_path, capsys, monkeypatch):
    from msdet.data.meta import write_meta
    from tests.helpers import write_params

    monkeypatch.delenv("MSDET_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "records").mkdir()
    write_meta(tmp_path / "records", {"num_classes": 2, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
                                      "splits": {}})
    (tmp_path / "weights").mkdir()
    ckpt = Path("weights") / "bad.ckpt"
    tail = bad_checkpoint(ckpt, kind)
    write_params(tmp_path / "params.yaml", {"runtime": KERNELS_OFF, "mindrecord": {"out_dir": "records"},
                                            "d0": {"init": str(ckpt), "train": {"eval_every_epochs": 0}}})
    before = snapshot(tmp_path)
    module = importlib.import_module(f"stages.{stage}")
    argv = ["--model", "d0"] + (["--ckpt", str(ckpt)] if stage == "eval" else [])
    capsys.readouterr()
    assert run(module.main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {ckpt}"), err
    assert re.search(re.escape(str(ckpt)) + tail, err[0]), err[0]
    assert snapshot(tmp_path) == before


@pytest.mark.detector
@pytest.mark.parametrize("stage, split", [("train", "train"), ("eval", "val")])
def test_a_truncated_shard_is_one_line_naming_it(stage, split, tmp_path, capsys, monkeypatch):
    from msdet.detectors import build_detector
    from msdet.engine.checkpoint import save_weights
    from tests.helpers import project_params, write_params
    from tests.test_pipeline import write_split

    monkeypatch.delenv("MSDET_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "records").mkdir()
    write_split(tmp_path / "records", "train", 4, shards=2)
    write_split(tmp_path / "records", "val", 3, shards=1)
    shard = Path("records") / ("train.mindrecord1" if split == "train" else "val.mindrecord")
    os.truncate(shard, shard.stat().st_size - 100)
    save_weights(tmp_path / "ema.ckpt", build_detector(project_params(), "d0", 1).build_network())
    write_params(tmp_path / "params.yaml", {"runtime": KERNELS_OFF, "mindrecord": {"out_dir": "records"},
                                            "d0": {"train": {"eval_every_epochs": 0}}})
    before = snapshot(tmp_path)
    module = importlib.import_module(f"stages.{stage}")
    capsys.readouterr()
    assert run(module.main, ["--model", "d0"] + (["--ckpt", "ema.ckpt"] if stage == "eval" else [])) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {shard}: truncated MindRecord shard of the {split} split ("), err
    assert snapshot(tmp_path) == before


def test_a_200000_deep_pickle_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    import pickle

    from stages import convert
    from tests.helpers import pkl_str, write_params, zip_checkpoint

    monkeypatch.delenv("MSDET_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)
    depth = 200_000
    src = zip_checkpoint(tmp_path / "deep.pth", pickle.PROTO + b"\x02" + (pickle.EMPTY_DICT + pkl_str("k")) * depth
                         + pickle.EMPTY_DICT + pickle.SETITEM * depth + pickle.STOP)
    write_params(tmp_path / "params.yaml", {"runtime": KERNELS_OFF})
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert run(convert.main, ["--model", "d0", "--src", str(src), "--out", "out.ckpt"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {src}: containers nested deeper than 100 levels, not a checkpoint PyTorch writes"]
    assert snapshot(tmp_path) == before
