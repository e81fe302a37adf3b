"""Every command stops on a problem the user can fix with one line naming it, a non-zero exit, no traceback."""
from __future__ import annotations

import ast
import importlib
import os
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
