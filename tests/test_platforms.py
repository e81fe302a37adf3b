"""The pinned requirements resolve, as wheels, for both platforms the README names: x86-64 and aarch64 Linux
(Ascend servers' hosts are aarch64), CPython 3.11.

pip evaluates environment markers against the machine it runs on even with ``--platform``, so the resolution
is uv's, which evaluates them for the target (``uv pip compile --python-platform``; metadata only, nothing is
installed). Every package must come as a wheel, except ``antlr4-python3-runtime`` (pure Python, published as
an sdist only; dvc needs it through hydra-core). Needs the package registry, as ``make test`` does to install.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SDIST_ONLY = "antlr4-python3-runtime"


def requirement_lines() -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    return [Requirement(line) for line in lines if line]


def test_pyproject_declares_the_same_pins_and_markers():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    assert {str(Requirement(d)) for d in declared} == {str(r) for r in requirement_lines()}
    assert project["requires-python"] == ">=3.11,<3.12"


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_requirements_resolve_as_wheels(tmp_path, machine):
    out = tmp_path / "resolved.txt"
    cmd = [str(Path(sys.executable).with_name("uv")), "pip", "compile", str(ROOT / "requirements.txt"),
           "--python-platform", f"{machine}-manylinux_2_28", "--python-version", "3.11", "--only-binary", ":all:",
           "--no-binary", SDIST_ONLY, "--quiet", "--no-header", "--no-annotate", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resolved = dict(line.split("==") for line in out.read_text().split() if "==" in line)
    env = {"platform_machine": machine, "sys_platform": "linux", "platform_system": "Linux", "python_version": "3.11"}
    for r in requirement_lines():
        wanted = r.marker is None or r.marker.evaluate(env)
        assert (r.name in resolved) == wanted, r
        assert not wanted or resolved[r.name] in r.specifier, r
    assert ("onednn-cpu-gomp" in resolved) == (machine == "x86_64")  # no aarch64 wheel exists
