"""Benchmarks: the statistics helpers, the report format and one tiny real run (micro, data, mindrecord)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from msdet.bench.runner import (
    DATA_TO_TRAIN_TARGET,
    SEED_REFERENCE,
    BenchOptions,
    add_ratios,
    out_of_date,
    run_benchmarks,
    stages_to_run,
    write_report,
)
from msdet.bench.sections import SMALL_CASES, candidates_per_image, parse_context, synthetic_train_batch
from msdet.bench.stats import SUMMARY_KEYS, format_table, rates, spread_ratio, summarize, table_rows
from msdet.config import merge

ROOT = Path(__file__).resolve().parents[1]


def test_summarize_median_quartiles_and_extremes():
    s = summarize([4.0, 1.0, 100.0, 2.0, 3.0])
    assert s == {"median": 3.0, "min": 1.0, "max": 100.0, "q1": 2.0, "q3": 4.0, "n": 5}
    ref = np.random.default_rng(0).uniform(1, 2, 11)
    s = summarize(ref, digits=12)
    assert s["median"] == pytest.approx(np.median(ref))
    assert s["q1"] == pytest.approx(np.percentile(ref, 25)) and s["q3"] == pytest.approx(np.percentile(ref, 75))
    assert summarize([123.456789], digits=4)["median"] == 123.5
    assert summarize([0.000123456], digits=3)["median"] == 0.000123


def test_summarize_rejects_empty_and_non_finite():
    with pytest.raises(ValueError, match="no measurements"):
        summarize([])
    with pytest.raises(ValueError, match="non-finite"):
        summarize([1.0, float("nan")])


def test_rates_and_spread():
    assert rates(8, [2.0, 4.0]) == [4.0, 2.0]
    assert rates([10, 30], [2.0, 3.0]) == [5.0, 10.0]
    with pytest.raises(ValueError, match="2 counts for 3 timings"):
        rates([1, 2], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="non-positive"):
        rates(8, [1.0, 0.0])
    assert spread_ratio(summarize([9.0, 10.0, 11.0])) == pytest.approx(0.2)


def test_table_units_single_figures_and_verdicts():
    report = {
        "train": {"d0": {"step_ms": summarize([100.0, 120.0]), "images_per_s": summarize([2.0, 2.5]),
                         "compile_s": 12.5, "peak_rss_mb": 3000.0, "batch_size": 8}},
        "data": {"d0": {"images_per_s": summarize([5.0, 6.0])}},
        "pipeline": {"noop_repro": {"mode": "no-op repro", "wall_s": summarize([6.0, 7.0]), "target_s": 5.0},
                     "full_repro_s": 912.4, "full_repro_target_s": 900.0},
        "host": {"cpus": 2, "load_avg_start": [1.5, 1.0, 1.0], "load_avg_end": [2.5, 1.0, 1.0]},
    }
    add_ratios(report)
    assert report["data"]["d0"]["ratio_to_train"] == pytest.approx(5.5 / 2.25, abs=0.01)
    assert report["data"]["d0"]["target_ratio"] == DATA_TO_TRAIN_TARGET
    rows = {(r[0], r[1]): r for r in table_rows(report)}
    assert rows[("train", "d0 step_ms")][2:] == ("110.0", "100.0..120.0 (n=2)", "ms")
    assert rows[("train", "d0 images_per_s")][4] == "img/s"
    assert rows[("train", "d0 compile_s")][2:] == ("12.50", "single run", "s")
    assert rows[("train", "d0 peak_rss_mb")][4] == "MB"
    assert ("train", "d0 batch_size") not in rows  # settings are not figures
    text = format_table(report)
    assert "data/d0: input pipeline is 2.44x the training step (MISSES target >= 3.0x)" in text
    assert "no-op repro (no-op repro) 6.50 s (MISSES target < 5.0 s)" in text
    assert "whole default repro 912 s (MISSES target <= 900 s)" in text
    assert "load average 1.50 at start, 2.50 at end" in text


def test_synthetic_train_batch_layout():
    image, boxes, labels = synthetic_train_batch(3, 64, 8, num_classes=5, boxes_per_image=4, seed=1)
    assert image.shape == (3, 3, 64, 64) and image.dtype == np.float32
    assert boxes.shape == (3, 8, 4) and boxes.dtype == np.float32
    assert labels.shape == (3, 8) and labels.dtype == np.int32
    real = boxes[:, :4]
    assert np.all(real[..., 2] > real[..., 0]) and np.all(real[..., 3] > real[..., 1])
    assert real.min() >= 0 and real.max() <= 64
    assert np.all(boxes[:, 4:] == 0) and np.all(labels[:, 4:] == -1)
    assert labels[:, :4].min() >= 0 and labels[:, :4].max() < 5
    again = synthetic_train_batch(3, 64, 8, num_classes=5, boxes_per_image=4, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((image, boxes, labels), again))


def test_candidates_per_image_counts_and_caps():
    scores = np.zeros((2, 10, 3), np.float32)
    scores[0, :4, 0] = 0.5
    scores[1] = 0.9
    np.testing.assert_array_equal(candidates_per_image(scores, 0.05, 1000), [4, 30])
    np.testing.assert_array_equal(candidates_per_image(scores, 0.05, 20), [4, 20])


def test_parse_context_and_dvc_output_parsing():
    assert parse_context(["enable_graph_kernel=true", "runtime_num_threads=2", "jit_level=O1"]) == {
        "enable_graph_kernel": True, "runtime_num_threads": 2, "jit_level": "O1"}
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_context(["runtime_num_threads"])
    assert out_of_date("{}\n") == [] and out_of_date("") == []
    assert out_of_date('{"train_d0": [], "eval_d0": []}') == ["eval_d0", "train_d0"]
    assert stages_to_run("Running stage 'train_d0':\n> python x\nStage 'download' didn't change\n") == ["train_d0"]


TINY = {
    "data": {"synthetic": {"num_train": 24, "num_val": 8, "image_size": 96, "max_objects": 3}},
    "mindrecord": {"train_shards": 1, "workers": 1},
    "nanodet": {"input_size": 64, "train": {"batch_size": 4, "num_workers": 1, "max_gt_boxes": 4}},
}


def test_tiny_real_run_writes_documented_fields(tmp_path):
    """micro (small convolutions), data and mindrecord on a temporary synthetic set, 2 runs each."""
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    params["data"]["root"] = "no_data_here/coco"  # forces the temporary synthetic set
    params["mindrecord"]["out_dir"] = "no_data_here/mindrecord"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    opts = BenchOptions(params="params.yaml", sections=("micro", "data", "mindrecord"), models=("nanodet",),
                        repeats=2, data_batches=3, micro_small=True, project_root=tmp_path)
    report = run_benchmarks(opts, log=lambda msg: None)
    assert "errors" not in report, report.get("errors")
    out = tmp_path / "metrics" / "bench.json"
    write_report(report, out)
    report = json.loads(out.read_text())

    assert report["seed_reference"] == SEED_REFERENCE == {"d0_train_img_per_s_ascend910": 30}
    assert report["versions"]["mindspore"].startswith("2.") and report["versions"]["numpy"]
    assert report["host"]["cpus"] >= 1 and len(report["host"]["load_avg_end"]) == 3
    assert report["settings"]["sections"] == ["micro", "data", "mindrecord"]
    assert report["dataset"]["source"].startswith("temporary synthetic set")

    def positive_summary(s, n=2):
        assert set(SUMMARY_KEYS) <= set(s), s
        assert s["n"] == n and 0 < s["min"] <= s["median"] <= s["max"], s

    assert sorted(k for k in report["micro"] if isinstance(report["micro"][k], dict)) == \
        sorted(c.label for c in SMALL_CASES)
    for case in SMALL_CASES:
        entry = report["micro"][case.label]
        assert entry["input"] == [case.batch, case.in_ch, case.hw, case.hw] and entry["groups"] == case.groups
        positive_summary(entry["forward_ms"])
        positive_summary(entry["forward_backward_ms"])
        assert entry["forward_cpu_ms"]["n"] == 2 and entry["forward_backward_cpu_ms"]["min"] >= 0
    assert report["micro"]["peak_rss_mb"] > 50

    data = report["data"]["nanodet"]
    assert data["batch_shape"] == [4, 3, 64, 64] and data["num_workers"] == 1 and data["batches_timed"] == 3
    positive_summary(data["images_per_s"])
    positive_summary(data["startup_s"])
    assert "ratio_to_train" not in data  # no train section ran
    assert data["peak_rss_mb"] > 50

    mr = report["mindrecord"]
    assert mr["images"] == 32 and mr["workers"] == 1
    positive_summary(mr["images_per_s"])
    assert mr["images_per_s"]["max"] == pytest.approx(32 / mr["seconds_s"]["min"], rel=0.01)
    assert mr["images_per_s"]["min"] == pytest.approx(32 / mr["seconds_s"]["max"], rel=0.01)
    assert not (tmp_path / "rank_0").exists() and not (tmp_path / "kernel_meta").exists()


def test_op_time_breakdown_groups_by_type_and_block(tmp_path):
    from msdet.bench.sections import op_time_breakdown

    (tmp_path / "cpu_op_type_info_0.csv").write_text(
        "op_type,type_occurrences,execution_frequency(per-step),total_compute_time,avg_time(ms),percent\n"
        "Conv2D,4,2,60,15,0.6\nSelect,2,1,30,15,0.3\nMul,2,1,10,5,0.1\n")
    (tmp_path / "cpu_op_detail_info_0.csv").write_text(
        "op_side,op_type,op_name,full_op_name,op_occurrences,op_total_time(ms),op_avg_time(ms),total_proportion,"
        "subgraph,pid\n"
        "Host,Conv2D,c1,Default/loss_cell-L/network-N/backbone-B/conv-op1,2,40,20,0.4,Default,1\n"
        "Host,Conv2D,c2,Gradients/Default/loss_cell-L/network-N/head-H/Grad_Conv2D/c-op2,2,20,10,0.2,Default,1\n"
        "Host,Select,s,Gradients/Default/loss_cell-L/assigner-A/Grad_Maximum/Select-op3,2,30,15,0.3,Default,1\n"
        "Host,Mul,m,Default/optimizer-AdamW/Mul-op4,2,10,5,0.1,Default,1\n")
    out = op_time_breakdown(tmp_path, steps=2)
    assert out["op_ms_per_step"] == 50.0 and out["backward_share"] == 0.5
    assert out["by_op_type"][0] == {"name": "Conv2D", "ms_per_step": 30.0, "share": 0.6}
    blocks = {b["name"]: b["ms_per_step"] for b in out["by_block"]}
    assert blocks == {"backbone-B": 20.0, "head-H": 10.0, "assigner-A": 15.0, "optimizer-AdamW": 5.0}
    text = format_table({"profile": {"d0": {"train_step": out}}})
    assert "profile/d0: training step 50 ms of CPU ops per step (50% backward); blocks: backbone-B 40%" in text


def test_by_layer_lines_render_rows_and_core_use():
    from msdet.bench.stats import by_layer_lines

    layers = {"input_size": 64, "batch_size": 2, "rows": [
        {"name": "bn", "what": "BatchNorm", "forward_ms": summarize([1.0, 3.0]),
         "forward_backward_ms": summarize([4.0, 6.0])},
        {"name": "assign", "what": "assigner", "forward_ms": summarize([7.0])}]}
    step = {"step_ms": summarize([100.0]), "cpu_cores_used": summarize([1.5, 1.7])}
    lines = by_layer_lines("nanodet", layers, step)
    assert lines[0] == "profile/nanodet by layer at 64 px, batch 2 (ms, median; rows overlap):"
    assert lines[2].split() == ["bn", "2.00", "5.00", "BatchNorm"]
    assert lines[3].split() == ["assign", "7.00", "-", "assigner"]
    assert "using 1.60 CPU cores" in lines[4]
    assert by_layer_lines("d0", {}, step) == []


@pytest.mark.slow
@pytest.mark.long
def test_by_layer_table_has_every_block_with_positive_times():
    """Every row of the NanoDet table at 64 px, batch 2: the documented names in order, the input shapes the
    blocks see in the network, positive forward times and a backward for all but assignment and optimizer."""
    from msdet.bench.layers import ROWS, bench_layers
    from msdet.bench.sections import setup
    from msdet.config import load_params

    tiny = {"nanodet": {"input_size": 64, "train": {"batch_size": 2, "max_gt_boxes": 4}}}
    params = load_params(ROOT / "params.yaml", tiny)
    setup(params, {})
    out = bench_layers(params, "nanodet", num_classes=3, repeats=2)
    assert (out["input_size"], out["batch_size"]) == (64, 2)
    rows = {r["name"]: r for r in out["rows"]}
    assert [r["name"] for r in out["rows"]] == list(ROWS["nanodet"])
    assert rows["stem"]["shapes"] == [[2, 3, 64, 64]]
    assert rows["ghostpan"]["shapes"] == [[2, 116, 8, 8], [2, 232, 4, 4], [2, 464, 2, 2]]
    assert rows["assign"]["shapes"][0] == [2, 85, 3]  # 8x8 + 4x4 + 2x2 + 1x1 priors, 3 classes
    for name, row in rows.items():
        s = row["forward_ms"]
        assert s["n"] == 2 and 0 < s["min"] <= s["median"] <= s["max"], name
        if name in ("assign", "optimizer_ema"):
            assert "forward_backward_ms" not in row, name
        else:
            assert row["forward_backward_ms"]["median"] > 0, name
