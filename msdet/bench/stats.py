"""Statistics and the printed table of the benchmarks: plain NumPy and strings, no MindSpore.

Every figure in ``metrics/bench.json`` is a *summary* of several runs, ``{"median", "min", "max", "q1", "q3",
"n"}``: the machine is shared, so one number would say little; the median is the figure to compare, the
spread says how far to trust it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

SUMMARY_KEYS = ("median", "min", "max", "q1", "q3", "n")


def summarize(values: Iterable[float], digits: int = 4) -> dict[str, float]:
    """Median, extremes and quartiles of repeated measurements (rounded to ``digits`` significant digits)."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.size == 0:
        raise ValueError("summarize: no measurements")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"summarize: non-finite measurement in {arr.tolist()}")
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    out = {"median": med, "min": arr.min(), "max": arr.max(), "q1": q1, "q3": q3}
    return {**{k: _round_sig(float(v), digits) for k, v in out.items()}, "n": int(arr.size)}


def rates(counts: Sequence[float] | float, seconds: Sequence[float]) -> list[float]:
    """Per-run throughput ``count / seconds`` (one count for every run, or one count per run)."""
    secs = [float(s) for s in seconds]
    cnts = [float(counts)] * len(secs) if np.isscalar(counts) else [float(c) for c in counts]
    if len(cnts) != len(secs):
        raise ValueError(f"rates: {len(cnts)} counts for {len(secs)} timings")
    if any(s <= 0 for s in secs):
        raise ValueError(f"rates: non-positive timing in {secs}")
    return [c / s for c, s in zip(cnts, secs)]


def spread_ratio(summary: dict[str, float]) -> float:
    """(max - min) / median: 0 for perfectly steady runs; above ~0.3 the figure is noisy."""
    med = float(summary["median"])
    return float("inf") if med == 0 else (float(summary["max"]) - float(summary["min"])) / abs(med)


def is_summary(obj: Any) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in SUMMARY_KEYS)


def _round_sig(x: float, digits: int) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, max(0, digits - 1 - int(math.floor(math.log10(abs(x))))))


# --------------------------------------------------------------------------------------------------
# the printed table


def _fmt(x: float) -> str:
    ax = abs(x)
    if ax >= 1000:
        return f"{x:.0f}"
    if ax >= 100:
        return f"{x:.1f}"
    if ax >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


#: figures measured once (not summaries) that the table shows too
SINGLE_FIGURES = ("compile_s", "peak_rss_mb", "ratio_to_train", "status_cold_s", "full_repro_s",
                  "export_and_verify_s")


def table_rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    """(section, what, median, min..max, unit) for every summary in ``report``; keys ending in ``_s``, ``_ms``,
    ``_mb`` or ``per_s`` give the unit."""
    rows: list[tuple[str, str, str, str, str]] = []

    def walk(section: str, path: list[str], node: Any) -> None:
        if is_summary(node):
            name = path[-1] if path else section
            rows.append((section, " ".join(path), _fmt(node["median"]),
                         f"{_fmt(node['min'])}..{_fmt(node['max'])} (n={node['n']})", _unit(name)))
        elif path and path[-1] in SINGLE_FIGURES and isinstance(node, (int, float)) and not isinstance(node, bool):
            rows.append((section, " ".join(path), _fmt(float(node)), "single run", _unit(path[-1])))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(section, path + [str(k)], v)

    for section, node in report.items():
        if section in ("micro", "train", "data", "mindrecord", "eval", "export", "pipeline"):
            walk(section, [], node)
    return rows


def _unit(name: str) -> str:
    if name.endswith("per_s"):
        return "img/s"
    if name == "cpu_cores_used":
        return "cores"
    for part, unit in (("_ms", "ms"), ("_mb", "MB")):
        if part in name:
            return unit
    if name.endswith("_s"):
        return "s"
    return "x" if name.startswith("ratio") else ""


def format_table(report: dict, extra: Callable[[dict], list[str]] | None = None) -> str:
    """The human-readable view of a report: one line per measured figure, then the verdicts."""
    rows = table_rows(report)
    header = ("section", "figure", "median", "min..max (runs)", "unit")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*r) for r in rows]
    out += verdicts(report)
    if extra is not None:
        out += extra(report)
    return "\n".join(out)


def by_layer_lines(model: str, layers: dict, step: dict) -> list[str]:
    """The per-block table of ``--by-layer`` (medians), then the whole step and its CPU-core utilisation."""
    if "rows" not in layers:
        return []
    lines = [f"profile/{model} by layer at {layers['input_size']} px, batch {layers['batch_size']} "
             f"(ms, median; rows overlap):", f"  {'block':<16}{'forward':>10}{'fwd+bwd':>10}  what"]
    for row in layers["rows"]:
        fb = row.get("forward_backward_ms", {}).get("median")
        lines.append(f"  {row['name']:<16}{row['forward_ms']['median']:>10.2f}"
                     f"{'-' if fb is None else f'{fb:.2f}':>10}  {row['what']}")
    if "step_ms" in step and "cpu_cores_used" in step:
        lines.append(f"  {'train step':<16}{step['step_ms']['median']:>20.1f}  using "
                     f"{step['cpu_cores_used']['median']:.2f} CPU cores (process CPU ms / wall ms)")
    return lines


def verdicts(report: dict) -> list[str]:
    """One line per target: data >= 3x training, no-op repro < 5 s, whole default repro < 15 min (--full)."""
    lines = []
    for model, d in (report.get("data") or {}).items():
        if isinstance(d, dict) and "ratio_to_train" in d:
            ok = "meets" if d["ratio_to_train"] >= d["target_ratio"] else "MISSES"
            lines.append(f"data/{model}: input pipeline is {d['ratio_to_train']:.2f}x the training step "
                         f"({ok} target >= {d['target_ratio']}x)")
    noop = (report.get("pipeline") or {}).get("noop_repro")
    if isinstance(noop, dict) and "wall_s" in noop:
        ok = "meets" if noop["wall_s"]["median"] < noop["target_s"] else "MISSES"
        lines.append(f"pipeline: no-op repro ({noop['mode']}) {noop['wall_s']['median']:.2f} s "
                     f"({ok} target < {noop['target_s']} s)")
    pipeline = report.get("pipeline") or {}
    if "full_repro_s" in pipeline and "full_repro_target_s" in pipeline:
        ok = "meets" if pipeline["full_repro_s"] <= pipeline["full_repro_target_s"] else "MISSES"
        lines.append(f"pipeline: whole default repro {pipeline['full_repro_s']:.0f} s "
                     f"({ok} target <= {pipeline['full_repro_target_s']:.0f} s)")
    for model, prof in (report.get("profile") or {}).items():
        lines += by_layer_lines(model, (prof or {}).get("by_layer") or {}, (prof or {}).get("train_step") or {})
        step = (prof or {}).get("train_step") or {}
        if "by_block" in step:
            blocks = ", ".join(f"{b['name']} {100 * b['share']:.0f}%" for b in step["by_block"][:4])
            ops = ", ".join(f"{o['name']} {100 * o['share']:.0f}%" for o in step["by_op_type"][:4])
            lines.append(f"profile/{model}: training step {step['op_ms_per_step']:.0f} ms of CPU ops per step "
                         f"({100 * step['backward_share']:.0f}% backward); blocks: {blocks}; ops: {ops}")
        sample = (prof or {}).get("data_sample") or {}
        if "by_function" in sample:
            funcs = ", ".join(f"{f['name']} {100 * f['share']:.0f}%" for f in sample["by_function"][:4])
            lines.append(f"profile/{model}: input pipeline {sample['ms_per_sample']:.1f} ms per sample on one "
                         f"thread; {funcs}")
    load = (report.get("host") or {}).get("load_avg_start")
    if load:
        lines.append(f"host: {report['host'].get('cpus')} CPUs, 1-min load average {load[0]:.2f} at start, "
                     f"{report['host'].get('load_avg_end', [float('nan')])[0]:.2f} at end (shared machine: "
                     f"figures are noisy)")
    return lines
