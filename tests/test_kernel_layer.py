"""The CPU kernel layer as a whole (msdet/kernels): the one switch, the per-kernel fallback with one printed line
(the network still trains), what a run reports (kernels that ran, compiler, ISA) and the cache key that follows
the ISA and the compiler."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from msdet import train_ops
from msdet.config import CPU_KERNELS
from msdet.engine.runtime import setup_runtime
from msdet.kernels import build, layer
from msdet.kernels.library import KernelLibrary
from tests.helpers import config, kernels_off


@pytest.fixture
def fresh_libraries(monkeypatch):
    """Every kernel module with an unbuilt library of its own for the test (the process's are restored after)."""
    for name in layer.KERNELS:
        mod = layer.module(name)
        lib = mod.LIBRARY
        monkeypatch.setattr(mod, "LIBRARY", KernelLibrary(lib.name, lib.source, lib.fallback, lib.flags, lib.requires))
    with kernels_off():
        yield


def test_the_kernel_names_are_one_list():
    assert layer.KERNELS == CPU_KERNELS
    assert set(layer.MODEL_KERNELS["nanodet"]) == set(CPU_KERNELS)
    assert set(layer.MODEL_KERNELS["d0"]) == set(CPU_KERNELS) - {"group_norm", "max_pool", "upsample"}
    for name in CPU_KERNELS:
        mod = layer.module(name)
        assert mod.LIBRARY.name == name and mod.LIBRARY.source.name == f"{name}.cc" and mod.REPLACEMENTS
    with pytest.raises(ValueError, match="unknown cpu kernel 'dwconv'"):
        layer.module("dwconv")
    with pytest.raises(ValueError, match="no cpu kernels listed for model 'yolo'"):
        layer.for_model("yolo")


def test_without_gxx_each_kernel_says_so_in_one_line_and_the_network_still_trains(fresh_libraries, monkeypatch,
                                                                                   capsys, tmp_path):
    from msdet.engine.trainer import Trainer
    from tests.helpers import ToyDetector, ToyNet, cfg, toy_data

    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    on = setup_runtime(config("runtime"), kernels=layer.for_model("d0"))
    assert on == [] and train_ops.installed() == []
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"cpu kernel {name} off: g++ not found; {layer.module(name).LIBRARY.fallback}"
                     for name in layer.KERNELS if name in layer.MODEL_KERNELS["d0"]]
    assert layer.report() == {"kernels": [], "compiler": "", "isa": build.cpu_isa()}
    trainer = Trainer(ToyDetector(), ToyNet(), cfg(epochs=1), toy_data(n=8), tmp_path / "run", progress=False,
                      key_payload={})
    assert trainer.optimizer.fast is None and trainer.ema.fast is None and not trainer.step_fn.square_sum.fast
    summary = trainer.fit()
    assert summary.steps > 0 and all(np.isfinite(v) for v in summary.final_losses.values())


def test_the_switch_and_the_single_offs(fresh_libraries):
    runtime = config("runtime")
    assert setup_runtime(dataclasses.replace(runtime, cpu_kernels="off"), kernels=layer.for_model("nanodet")) == []
    on = setup_runtime(dataclasses.replace(runtime, cpu_kernels_off=["max_pool", "dense_conv"]),
                       kernels=layer.for_model("nanodet"))
    assert on == [k for k in CPU_KERNELS if k not in ("max_pool", "dense_conv")] == train_ops.installed()
    assert layer.report()["kernels"] == on
    on = setup_runtime(runtime, kernels=layer.for_model("d0"))
    assert on == [k for k in CPU_KERNELS if k in layer.MODEL_KERNELS["d0"]]
    assert setup_runtime(runtime) == [] and train_ops.installed() == []   # evaluation, export: nothing


def test_the_report_names_compiler_and_isa(monkeypatch):
    report = layer.report()
    assert set(report) == {"kernels", "compiler", "isa"}
    assert report["compiler"].startswith("g++")
    monkeypatch.setattr(build, "_cpuinfo_flags", lambda: {"sse2", "avx", "avx2", "fma"})
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MSDET_KERNEL_ISA"):
        monkeypatch.delenv(name, raising=False)
    assert build.cpu_isa() == "avx2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert build.cpu_isa() == "avx2 ONEDNN_MAX_CPU_ISA=AVX2"
    monkeypatch.setattr(build, "_cpuinfo_flags", lambda: {"sse2", "avx2", "avx512f"})
    monkeypatch.setenv("MSDET_KERNEL_ISA", "avx2")
    assert build.cpu_isa() == "avx512f ONEDNN_MAX_CPU_ISA=AVX2 MSDET_KERNEL_ISA=avx2"
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    assert build.cpu_isa() == "avx512f ONEDNN_MAX_CPU_ISA=AVX2 DNNL_MAX_CPU_ISA=AVX2 MSDET_KERNEL_ISA=avx2"
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    monkeypatch.setattr(build.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.delenv("MSDET_KERNEL_ISA")
    assert build.cpu_isa() == "aarch64"
    monkeypatch.setenv("MSDET_KERNEL_ISA", "avx1024")
    with pytest.raises(ValueError, match="MSDET_KERNEL_ISA='avx1024': expected one of '', 'avx2'"):
        build.cpu_isa()


def test_the_cache_name_follows_the_isa_and_the_compiler(monkeypatch, tmp_path):
    source = tmp_path / "k.cc"
    source.write_text('extern "C" int f() { return 1; }\n')
    monkeypatch.delenv("MSDET_KERNEL_ISA", raising=False)
    monkeypatch.setattr(build, "_cpuinfo_flags", lambda: {"sse2", "avx2", "avx512f"})
    first = build.build_library(source, tmp_path / "cache")
    assert build.build_library(source, tmp_path / "cache") == first
    monkeypatch.setattr(build, "_cpuinfo_flags", lambda: {"sse2", "avx2"})          # an AVX2-only host
    second = build.build_library(source, tmp_path / "cache")
    monkeypatch.setenv("MSDET_KERNEL_ISA", "avx2")                                   # AVX-512 left out
    third = build.build_library(source, tmp_path / "cache")
    monkeypatch.setattr(build, "compiler", lambda: "g++ (Other) 99.1")
    fourth = build.build_library(source, tmp_path / "cache")
    names = {p.name for p in (first, second, third, fourth)}
    assert len(names) == 4 and all(n.startswith("k-") and n.endswith(".so") for n in names)
    assert names == {p.name for p in (tmp_path / "cache").iterdir()}


POOL_TEST = r'''
#include <cstdint>
#include <vector>

#include "parallel.h"

extern "C" int64_t squares(int64_t n) {
  std::vector<int64_t> out(n);
  parallel_for(n, n * 1000, 1, [&](int64_t i) { out[i] = i * i; });
  int64_t total = 0;
  for (int64_t v : out) total += v;
  return total;
}

extern "C" int64_t nested(int64_t n) {  // parallel_for inside parallel_for: the inner calls run alone
  std::vector<int64_t> out(n);
  parallel_for(n, n * 1000, 1, [&](int64_t i) { out[i] = squares(i + 1); }, 1);
  int64_t total = 0;
  for (int64_t v : out) total += v;
  return total;
}
'''


def _expected_squares(n: int) -> int:
    return sum(i * i for i in range(n))


def test_the_thread_pool_gives_every_call_its_result_concurrently_nested_and_after_fork(tmp_path):
    """parallel.h's persistent pool: calls from many threads at once (one is served by the pool, the others run
    alone), a call inside a call, and calls in a child forked after the pool started all give the exact result."""
    import ctypes
    import os
    from concurrent.futures import ThreadPoolExecutor

    source = tmp_path / "pool_test.cc"
    source.write_text(POOL_TEST)
    (tmp_path / "parallel.h").write_text((build.Path(layer.__file__).with_name("parallel.h")).read_text())
    lib = ctypes.CDLL(str(build.build_library(source, tmp_path / "cache")))
    for fn in (lib.squares, lib.nested):
        fn.argtypes, fn.restype = [ctypes.c_int64], ctypes.c_int64
    sizes = [1, 3, 17, 1000, 4096]
    assert [lib.squares(n) for n in sizes] == [_expected_squares(n) for n in sizes]

    def many(seed: int) -> bool:
        return all(lib.squares(n) == _expected_squares(n) for n in sizes * 20)

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(many, range(16)))
    assert lib.nested(40) == sum(_expected_squares(i + 1) for i in range(40))
    pid = os.fork()
    if pid == 0:  # the child: a fresh pool
        ok = lib.squares(4096) == _expected_squares(4096) and lib.nested(20) == sum(
            _expected_squares(i + 1) for i in range(20))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0



@pytest.mark.skipif(build.platform.machine() != "x86_64", reason="the instruction-set copies are x86-64's")
def test_msdet_kernel_isa_avx2_builds_without_the_avx512_copies(monkeypatch, tmp_path):
    """``MSDET_KERNEL_ISA=avx2``: activations.cc and adamw_ema.cc lose their AVX-512 copies (target_clones) and keep
    the AVX2 and baseline ones, in a library of another name; unset, all three are built."""
    import subprocess

    from msdet.kernels import activations, adamw_ema

    for mod, avx512, avx2 in ((activations, ".avx512f", ".avx2"),
                              (adamw_ema, ".arch_x86_64_v4", ".arch_x86_64_v3")):
        names = set()
        for isa, present in (("", True), ("avx2", False)):
            monkeypatch.setenv("MSDET_KERNEL_ISA", isa)
            lib = build.build_library(mod.LIBRARY.source, tmp_path / "cache", mod.LIBRARY.flags)
            names.add(lib.name)
            symbols = subprocess.run(["nm", str(lib)], capture_output=True, text=True, check=True).stdout
            assert (avx512 in symbols) is present, (mod.__name__, isa)
            assert avx2 in symbols, (mod.__name__, isa)
        assert len(names) == 2


def test_stages_that_do_not_train_import_no_kernel_module():
    """Evaluation, export, inference and conversion import neither the kernel layer nor a kernel module (the static
    side of this is tests/test_stage_deps.py); training's entry point does import the layer."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    code = ("import sys, importlib\n"
            "for m in ('stages.eval', 'stages.export', 'stages.infer', 'stages.convert'):\n"
            "    importlib.import_module(m)\n"
            "print(sorted(n for n in sys.modules if n.startswith('msdet.kernels')))\n"
            "import stages.train\n"
            "print('msdet.kernels.layer' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-2:] == ["[]", "True"]
