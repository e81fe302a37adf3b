"""Run every benchmark and write ``metrics/bench.json``: the library behind ``make bench`` / ``stages/bench.py``.

Each (section, model) runs in a child process (:mod:`msdet.bench.sections`) started in a scratch directory,
so MindSpore's settings, compiled graphs and peak memory stay per model, and stray framework files
(``rank_0/``, ``kernel_meta/``) never land in the checkout. A failing section is recorded as
``{"error": ...}`` and the others still run. The DVC timings run in throw-away copies of the project, never
in the checkout itself.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msdet.atomic import write_json
from msdet.bench.stats import format_table, summarize
from msdet.config import Params, load_params

ALL_SECTIONS = ("micro", "train", "data", "mindrecord", "eval", "export", "pipeline", "profile")
#: what ``make bench`` measures; "profile" (MindSpore profiler + cProfile) is asked for with --profile
DEFAULT_SECTIONS = ALL_SECTIONS[:-1]
MODELS = ("d0", "nanodet")
#: runs per figure: (normal, --quick)
REPEATS = {"micro": (10, 3), "train": (6, 3), "data": (3, 2), "mindrecord": (3, 2), "eval": (3, 2),
           "export": (10, 3), "pipeline": (3, 2), "profile": (3, 2)}
DATA_TO_TRAIN_TARGET = 3.0
NOOP_REPRO_TARGET_S = 5.0
#: the whole default `dvc repro` on a 2-core laptop CPU
FULL_REPRO_TARGET_S = 900.0
SEED_REFERENCE = {"d0_train_img_per_s_ascend910": 30}
SCHEMA_VERSION = 1
#: the folder holding the msdet package: children import it from here, whatever the project root
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class BenchOptions:
    """What to measure. ``repeats`` overrides every section's run count (tests use 2)."""

    params: str = "params.yaml"
    #: a profile merged on top of ``params`` (e.g. params_coco.yaml), None for none
    overlay: str | None = None
    device_target: str | None = None
    quick: bool = False
    full: bool = False
    sections: Sequence[str] = DEFAULT_SECTIONS
    models: Sequence[str] = MODELS
    context: dict[str, Any] = field(default_factory=dict)
    repeats: int | None = None
    data_batches: int = 40
    micro_small: bool = False
    #: the profile section times each block type (msdet.bench.layers) instead of running the profilers
    by_layer: bool = False
    project_root: Path = field(default_factory=Path.cwd)
    timeout_s: float = 3600.0

    def runs(self, section: str) -> int:
        return self.repeats if self.repeats is not None else REPEATS[section][1 if self.quick else 0]


class SectionFailed(RuntimeError):
    """A benchmark child process exited with an error."""


# --------------------------------------------------------------------------------------------------
# environment facts


def versions() -> dict[str, str]:
    """Versions of the stack the figures depend on (the framework-regression guard compares these)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("mindspore", "numpy", "opencv-python-headless", "onnxruntime", "pycocotools", "dvc"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def host_info() -> dict[str, Any]:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": cpus,
            "load_avg_start": [round(v, 2) for v in os.getloadavg()]}


# --------------------------------------------------------------------------------------------------
# the data set the data / eval sections read


@dataclass
class BenchData:
    coco_root: Path
    mindrecord_dir: Path
    gt_json: Path
    source: str


def prepare_data(params: Params, root: Path, scratch: Path, log: Callable[[str], None]) -> BenchData:
    """The project's COCO tree and MindRecord when both exist, else a small synthetic set built in
    ``scratch`` with :mod:`msdet.data.synthetic` + :mod:`msdet.data.mindrecord` (the report says which)."""
    from msdet.data.coco import CocoFormatError, resolve_tree
    from msdet.data.meta import is_converted

    mr_dir = (root / params.mindrecord.out_dir).resolve()
    coco_root = (root / params.data.root).resolve()
    try:
        tree = resolve_tree(coco_root)
        if is_converted(mr_dir):
            return BenchData(coco_root, mr_dir, Path(tree.annotations["val"]), f"{params.mindrecord.out_dir}")
        reason = f"{mr_dir} has no complete MindRecord"
    except (FileNotFoundError, CocoFormatError, KeyError, OSError) as exc:
        reason = f"no COCO tree at {coco_root} ({exc})"
    import dataclasses

    from msdet.data.mindrecord import convert_tree
    from msdet.data.synthetic import generate_synthetic

    syn = dataclasses.replace(params.data.synthetic, num_train=min(params.data.synthetic.num_train, 200),
                              num_val=min(params.data.synthetic.num_val, 50))
    log(f"[bench] {reason}: building a temporary synthetic set ({syn.num_train} train / {syn.num_val} val images)")
    generate_synthetic(scratch / "coco", syn)
    tree = resolve_tree(scratch / "coco")
    convert_tree(tree, scratch / "mindrecord", params.mindrecord)
    return BenchData(scratch / "coco", scratch / "mindrecord", Path(tree.annotations["val"]),
                     f"temporary synthetic set ({reason})")


# --------------------------------------------------------------------------------------------------
# child processes


def run_child(section: str, opts: BenchOptions, scratch: Path, data: BenchData | None,
              model: str | None = None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Run one section in its own process; returns its figures (with its peak RSS) or raises SectionFailed."""
    tag = f"{section}_{model}" if model else section
    out = scratch / f"{tag}.json"
    cmd = [sys.executable, "-m", "msdet.bench.sections", section, "--out", str(out),
           "--params", str((opts.project_root / opts.params).resolve()), "--repeats", str(opts.runs(section))]
    if opts.overlay:
        cmd += ["--overlay", str((opts.project_root / opts.overlay).resolve())]
    if model:
        cmd += ["--model", model]
    if opts.device_target:
        cmd += ["--device-target", opts.device_target]
    if data is not None:
        cmd += ["--mindrecord-dir", str(data.mindrecord_dir), "--coco-root", str(data.coco_root),
                "--gt-json", str(data.gt_json)]
    if section == "data":
        cmd += ["--batches", str(opts.data_batches)]
    if section == "micro" and opts.micro_small:
        cmd += ["--micro-small"]
    if section == "profile" and opts.by_layer:
        cmd += ["--by-layer"]
    for k, v in opts.context.items():
        cmd += ["--context", f"{k}={json.dumps(v)}"]
    cmd += list(extra)
    workdir = scratch / f"work_{tag}"
    workdir.mkdir(exist_ok=True)
    env = dict(os.environ, GLOG_v="3",
               PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=opts.timeout_s)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise SectionFailed(f"{tag}: exit code {proc.returncode}\n{tail}")
    result = json.loads(out.read_text())
    result["process_wall_s"] = round(time.perf_counter() - t0, 2)
    return result


# --------------------------------------------------------------------------------------------------
# DVC timings in throw-away copies


def project_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files of the checkout (what a clone plus local work holds)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True, text=True).stdout.split()
    return [f for f in out if (root / f).is_file()]


def copy_project(root: Path, dst: Path, extra_dirs: Sequence[str] = (), with_outputs: bool = True) -> None:
    """Copy the project into ``dst`` (a fresh git repo, as tests/test_pipeline_e2e.py does);
    ``with_outputs=False`` leaves out metrics/, plots/, models/ and dvc.lock (a clean start)."""
    skip = () if with_outputs else ("metrics/", "plots/", "models/", "dvc.lock")
    for rel in project_files(root):
        if rel.startswith(skip):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dst / rel)
    for rel in extra_dirs:
        if (root / rel).is_dir():
            shutil.copytree(root / rel, dst / rel, symlinks=True, dirs_exist_ok=True)
    env = _git_env()
    subprocess.run(["git", "init", "-q"], cwd=dst, env=env, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dst, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "bench"], cwd=dst, env=env, check=True, capture_output=True)


def _git_env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost", GIT_COMMITTER_NAME="bench",
                GIT_COMMITTER_EMAIL="bench@localhost", DVC_NO_ANALYTICS="1")


def _dvc(args: Sequence[str], cwd: Path, timeout: float) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=_git_env(), capture_output=True,
                          text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SectionFailed(f"dvc {' '.join(args)} failed in {cwd}:\n{(proc.stderr or proc.stdout)[-2000:]}")
    return seconds, proc.stdout


def stages_to_run(repro_output: str) -> list[str]:
    """Stage names a ``dvc repro`` ran (its "Running stage '...'" lines)."""
    return [line.split("'")[1] for line in repro_output.splitlines()
            if line.startswith("Running stage") and line.count("'") >= 2]


def out_of_date(status_json: str) -> list[str]:
    """Stages ``dvc status --json`` reports as changed (empty: a repro would run nothing)."""
    text = status_json.strip()
    return sorted(json.loads(text)) if text else []


def bench_pipeline(params: Params, opts: BenchOptions, scratch: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Wall time of ``dvc status`` and of a no-op ``dvc repro`` in a copy of the checkout with its data and
    outputs. When stages are out of date there, a repro would run them, so ``dvc status`` (the checks a
    no-op repro makes) stands in and the report says so. With ``opts.full``: the whole default
    ``dvc repro`` in a clean copy, then a true no-op repro there."""
    runs = opts.runs("pipeline")
    root = opts.project_root.resolve()
    copy = scratch / "pipeline_copy"
    copy_project(root, copy, extra_dirs=[params.data.root, params.mindrecord.out_dir])
    cold, first = _dvc(["status", "--json"], copy, opts.timeout_s)
    status = [_dvc(["status", "--json"], copy, opts.timeout_s)[0] for _ in range(runs)]
    pending = out_of_date(first)
    if pending:
        mode = (f"dvc status stands in: {len(pending)} stage(s) out of date in the checkout "
                f"({', '.join(pending)}), a repro would run them")
        noop = status
    else:
        mode = "no-op repro (everything up to date)"
        noop = [_dvc(["repro"], copy, opts.timeout_s)[0] for _ in range(runs)]
    out: dict[str, Any] = {
        "status_cold_s": round(cold, 3),
        "status_s": summarize(status),
        "noop_repro": {"mode": mode, "wall_s": summarize(noop), "target_s": NOOP_REPRO_TARGET_S},
    }
    if opts.full:
        clean = scratch / "pipeline_full"
        copy_project(root, clean, with_outputs=False)
        log("[bench] pipeline: full dvc repro in a throw-away copy (this takes a while)")
        full_s, _ = _dvc(["repro"], clean, max(opts.timeout_s, 4 * 3600))
        after = [_dvc(["repro"], clean, opts.timeout_s) for _ in range(runs)]
        ran = [s for _, o in after for s in stages_to_run(o)]
        if ran:
            raise SectionFailed(f"the repro after a full repro was not a no-op: it ran {ran}")
        out["full_repro_s"] = round(full_s, 1)
        out["full_repro_target_s"] = FULL_REPRO_TARGET_S
        out["noop_repro"] = {"mode": "no-op repro after the full repro", "wall_s": summarize([s for s, _ in after]),
                             "target_s": NOOP_REPRO_TARGET_S}
    return out


# --------------------------------------------------------------------------------------------------
# everything


def run_benchmarks(opts: BenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure the chosen sections and return the report (see README "Performance" for its fields)."""
    unknown = sorted(set(opts.sections) - set(ALL_SECTIONS)) + sorted(set(opts.models) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown section(s)/model(s) {unknown}; sections: {ALL_SECTIONS}, models: {MODELS}")
    root = opts.project_root.resolve()
    overrides = {"runtime": {"device_target": opts.device_target}} if opts.device_target else None
    params = load_params(root / opts.params, overrides, overlay=root / opts.overlay if opts.overlay else None)
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"params": opts.params, "overlay": opts.overlay, "device_target": params.runtime.device_target,
                     "quick": opts.quick, "full": opts.full, "sections": list(opts.sections),
                     "models": list(opts.models), "context": dict(opts.context), "by_layer": opts.by_layer,
                     "cpu_threads": params.runtime.cpu_threads,
                     "graph_mode": params.runtime.graph_mode},
        "versions": versions(),
        "host": host_info(),
    }
    errors: dict[str, str] = {}

    def attempt(key: str, fn: Callable[[], Any]) -> Any:
        log(f"[bench] {key} ...")
        try:
            value = fn()
        except (SectionFailed, subprocess.TimeoutExpired, OSError, ValueError) as exc:
            errors[key] = str(exc)
            log(f"[bench] {key} FAILED: {str(exc).splitlines()[0]}")
            return {"error": str(exc)}
        return value

    with tempfile.TemporaryDirectory(prefix="msdet-bench-") as tmp:
        scratch = Path(tmp)
        needs_data = {"data", "mindrecord", "eval", "profile"} & set(opts.sections)
        data = prepare_data(params, root, scratch, log) if needs_data else None
        if data is not None:
            report["dataset"] = {"source": data.source}
        if "micro" in opts.sections:
            report["micro"] = attempt("micro", lambda: run_child("micro", opts, scratch, None))
        for section in ("train", "data", "eval", "export", "profile"):
            if section not in opts.sections:
                continue
            # train and export only read num_classes from the MindRecord meta (or assume the synthetic set's)
            extra = [] if data else ["--mindrecord-dir", str((root / params.mindrecord.out_dir).resolve())]
            report[section] = {m: attempt(f"{section}/{m}", lambda m=m, s=section: run_child(
                s, opts, scratch, data, model=m, extra=extra)) for m in opts.models}
        if "mindrecord" in opts.sections:
            report["mindrecord"] = attempt("mindrecord", lambda: run_child("mindrecord", opts, scratch, data))
        if "pipeline" in opts.sections:
            report["pipeline"] = attempt("pipeline", lambda: bench_pipeline(params, opts, scratch, log))
    add_ratios(report)
    report["host"]["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    report["seed_reference"] = dict(SEED_REFERENCE)
    if errors:
        report["errors"] = errors
    return report


def add_ratios(report: dict[str, Any]) -> None:
    """data[model].ratio_to_train = input-pipeline images/s over training-step images/s (target >= 3)."""
    for model, d in (report.get("data") or {}).items():
        t = (report.get("train") or {}).get(model) or {}
        if "images_per_s" in d and "images_per_s" in t:
            d["ratio_to_train"] = round(d["images_per_s"]["median"] / t["images_per_s"]["median"], 2)
            d["target_ratio"] = DATA_TO_TRAIN_TARGET


def write_report(report: dict[str, Any], path: str | Path) -> None:
    write_json(path, report)


def render(report: dict[str, Any]) -> str:
    return format_table(report)
