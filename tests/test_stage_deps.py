"""Each DVC stage's code deps are exactly the project files its command imports (msdet/devtools/stage_deps.py)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from msdet.devtools.stage_deps import (
    closure,
    code_sha256,
    command_roots,
    differences,
    expected_code_deps,
    load_stages,
)

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_code_deps_equal_each_stage_import_closure():
    problems = differences(ROOT)
    assert not problems, "\n".join(problems) + "\nrun `make deps`"


def test_a_missing_or_an_extra_dep_line_is_named():
    stages = copy.deepcopy(dict(load_stages(ROOT)))
    stages["eval_d0"]["deps"] = [d for d in stages["eval_d0"]["deps"] if d != "msdet/ops/box_coder.py"]
    stages["train_d0"]["deps"].append("msdet/models/ghostpan.py")
    assert differences(ROOT, stages) == [
        "train_d0: lists msdet/models/ghostpan.py, which its command does not import",
        "eval_d0: imports msdet/ops/box_coder.py, which its deps do not list",
    ]


def test_each_model_stage_sees_its_own_model_only():
    train_d0 = set(expected_code_deps("python -m stages.train --model d0", ROOT))
    train_nd = set(expected_code_deps("python -m stages.train --model nanodet", ROOT))
    eval_d0 = set(expected_code_deps("python -m stages.eval --model d0", ROOT))
    export_nd = set(expected_code_deps("python -m stages.export --model nanodet", ROOT))
    assert {"msdet/detectors/d0.py", "msdet/ops/box_coder.py", "msdet/config.py", "msdet/atomic.py",
            "stages/__init__.py", "stages/train.py"} <= train_d0
    assert not {f for f in train_d0 | eval_d0 if "nanodet" in f or "ghostpan" in f or "shufflenet" in f}
    assert not {f for f in train_nd | export_nd if f.endswith(("d0.py", "efficientdet.py", "bifpn.py"))}
    # evaluation and export do not import the training loop
    assert not {"msdet/training.py", "msdet/engine/trainer.py", "msdet/engine/optim.py"} & (eval_d0 | export_nd)


def test_closure_follows_lazy_and_relative_imports_only_into_the_project(tmp_path):
    pkg = tmp_path / "msdet"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("import numpy\n\ndef f():\n    from msdet.sub import b\n    return b\n")
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("import os\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                                      "    from msdet import unused\n")
    (pkg / "unused.py").write_text("")
    got = {p.as_posix() for p in closure(tmp_path, [Path("msdet/a.py")])}
    assert got == {"msdet/a.py", "msdet/__init__.py", "msdet/sub/__init__.py", "msdet/sub/b.py", "msdet/sub/c.py"}


def test_a_modules_compiled_companion_source_is_part_of_its_code(tmp_path):
    """msdet/kernels/depthwise_conv.py compiles depthwise_conv.cc, which includes parallel.h, at run time: editing
    either must make training stale."""
    pkg = tmp_path / "msdet"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from msdet import kernel\n")
    (pkg / "kernel.py").write_text("")
    (pkg / "kernel.cc").write_text('#include <cstdint>\n#include "shared.h"\nint f() { return 1; }\n')
    (pkg / "shared.h").write_text("")
    (pkg / "other.cc").write_text("")
    (pkg / "other.h").write_text("")
    got = {p.as_posix() for p in closure(tmp_path, [Path("msdet/a.py")])}
    assert got == {"msdet/a.py", "msdet/__init__.py", "msdet/kernel.py", "msdet/kernel.cc", "msdet/shared.h"}
    deps = expected_code_deps("python -m stages.train --model d0", ROOT)
    assert {"msdet/kernels/depthwise_conv.cc", "msdet/kernels/parallel.h", "msdet/kernels/aot.h"} <= set(deps)


def _stage_deps(stage: str) -> set[str]:
    return {str(d) for d in load_stages(ROOT)[stage]["deps"]}


def test_only_training_depends_on_kernel_sources_and_each_model_on_its_own():
    """The generated deps (dvc.yaml): no evaluation or export stage names a kernel module or source (they never
    import msdet.kernels, so compile nothing); train_d0 names no NanoDet-only kernel (GroupNorm, the stem
    max-pool, the upsampling); train_nanodet names every kernel, each source with the headers it includes."""
    from msdet.kernels import layer

    def kernel_files(deps):
        return {d for d in deps if d.startswith("msdet/kernels/")}

    stages = load_stages(ROOT)
    for name in stages:
        if not name.startswith("train_"):
            assert not kernel_files(_stage_deps(name)), name
            assert not {d for d in _stage_deps(name) if d.endswith((".cc", ".h"))}, name
    nanodet_only = set(layer.MODEL_KERNELS["nanodet"]) - set(layer.MODEL_KERNELS["d0"])
    assert nanodet_only == {"group_norm", "max_pool", "upsample"}
    train_d0, train_nd = _stage_deps("train_d0"), _stage_deps("train_nanodet")
    for kernel in layer.KERNELS:
        files = {f"msdet/kernels/{kernel}.py", f"msdet/kernels/{kernel}.cc"}
        assert files <= train_nd
        assert (files <= train_d0) is (kernel not in nanodet_only), kernel
        assert not (files & train_d0) or kernel not in nanodet_only, kernel
    headers = {"msdet/kernels/aot.h", "msdet/kernels/parallel.h", "msdet/kernels/isa.h",
               "msdet/kernels/activation.h", "msdet/kernels/reduce.h"}
    assert {h for h in headers if (ROOT / h).is_file()} <= train_d0 & train_nd
    # exact: a kernel file is a dep iff the stage's model uses that kernel (or it is the layer's own code)
    layer_code = {"msdet/kernels/__init__.py", "msdet/kernels/build.py", "msdet/kernels/layer.py",
                  "msdet/kernels/library.py"}
    for stage, model in (("train_d0", "d0"), ("train_nanodet", "nanodet")):
        sources = {f"msdet/kernels/{k}.{ext}" for k in layer.MODEL_KERNELS[model] for ext in ("py", "cc")}
        assert kernel_files(_stage_deps(stage)) - layer_code - headers == sources, stage


def test_the_kernel_table_is_followed_only_where_it_is_imported(tmp_path):
    """A closure that imports the kernel layer's table gets the kernels of the command's model, one that does not
    gets none (the table is read, not imported: msdet/kernels/layer.py imports its modules by name)."""
    pkg = tmp_path / "msdet"
    (pkg / "kernels").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    for d in (tmp_path / "stages", pkg, pkg / "kernels"):
        (d / "__init__.py").write_text("")
    (pkg / "detectors").mkdir()
    (pkg / "detectors" / "__init__.py").write_text('DETECTORS = {"a": ("msdet.detectors.a", "A")}\n')
    (pkg / "detectors" / "a.py").write_text("")
    (pkg / "kernels" / "layer.py").write_text('MODEL_KERNELS = {"a": ("one",)}\n')
    for k in ("one", "two"):
        (pkg / "kernels" / f"{k}.py").write_text("")
        (pkg / "kernels" / f"{k}.cc").write_text('#include "common.h"\n')
    (pkg / "kernels" / "common.h").write_text("")
    (tmp_path / "stages" / "train.py").write_text("from msdet.kernels import layer\n")
    (tmp_path / "stages" / "eval.py").write_text("import msdet.detectors\n")
    train = set(expected_code_deps("python -m stages.train --model a", tmp_path))
    evaluate = set(expected_code_deps("python -m stages.eval --model a", tmp_path))
    assert {"msdet/kernels/one.py", "msdet/kernels/one.cc", "msdet/kernels/common.h"} <= train
    assert not {f for f in train if "two" in f}
    assert not {f for f in evaluate if f.startswith("msdet/kernels/")}


def test_code_fingerprint_follows_exactly_the_imported_files(tmp_path):
    for d in ("stages", "msdet"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "stages" / "go.py").write_text("from msdet import used\n")
    (tmp_path / "msdet" / "used.py").write_text("X = 1\n")
    (tmp_path / "msdet" / "other.py").write_text("Y = 1\n")
    cmd = "python -m stages.go"
    before = code_sha256(cmd, tmp_path)
    (tmp_path / "msdet" / "other.py").write_text("Y = 2\n")
    assert code_sha256(cmd, tmp_path) == before
    (tmp_path / "msdet" / "used.py").write_text("X = 2\n")
    assert code_sha256(cmd, tmp_path) != before


def test_a_command_that_is_not_python_is_refused():
    with pytest.raises(ValueError, match="expected 'python -m"):
        command_roots("bash run.sh", ROOT)
    with pytest.raises(ValueError, match="model 'yolo' is not in"):
        command_roots("python -m stages.train --model yolo", ROOT)
