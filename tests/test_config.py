"""params.yaml validation: unknown keys, wrong types and out-of-range values are named."""
from __future__ import annotations

import dataclasses
import re
import typing

import pytest
import yaml

from msdet.config import ConfigError, Params, load_params
from tests.helpers import ROOT, write_params


def test_repo_params_load_and_cover_every_field():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.runtime.device_target == "CPU"
    assert params.data.source == "synthetic"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == {"runtime", "data", "download", "mindrecord", "d0", "nanodet", "eval", "export"}


@pytest.mark.parametrize("raw, message", [
    ({"d0": {"input_size": 300}}, r"'d0.input_size' = 300 must be a multiple of 128"),
    ({"nanodet": {"train": {"lr": "fast"}}}, r"'nanodet.train.lr' must be a number"),
    ({"nanodet": {"train": {"lrr": 0.1}}}, r"unknown key\(s\) nanodet.train.lrr"),
    ({"runtime": {"device_target": "TPU"}}, r"'runtime.device_target' = 'TPU' is not one of"),
    ({"mindrecord": {"workers": 0}}, r"'mindrecord.workers' = 0 is out of range"),
    ({"data": {"synthetic": {"min_objects": 5, "max_objects": 2}}}, r"'data.synthetic.min_objects' \(5\)"),
    ({"runtime": {"graph_mode": "yes"}}, r"'runtime.graph_mode' must be true or false"),
    ({"bogus": {}}, r"unknown key\(s\) bogus"),
    ({"eval": {"batch_size": 2.5}}, r"'eval.batch_size' must be an integer"),
    ({"d0": {"head_init": "torch"}}, r"'d0.head_init' = 'torch' is not one of \['automl', 'zylo117'\]"),
    ({"d0": {"pos_iou": 0.5, "neg_iou": 0.6}}, r"'d0.neg_iou' \(0.6\) must not exceed 'd0.pos_iou' \(0.5\)"),
    ({"runtime": {"nodes": 2, "node_rank": 2, "master_port": 8118}}, r"'runtime.node_rank' \(2\) must be below"),
    ({"runtime": {"nodes": 2, "node_rank": 1}}, r"'runtime.nodes' is 2: .* fixed 'runtime.master_port'"),
    ({"d0": {"train": {"accumulate_steps": 0}}}, r"'d0.train.accumulate_steps' = 0 is out of range"),
    ({"export": {"rtol": 2.0}}, r"'export.rtol' = 2.0 is out of range \[0.0, 1.0\]"),
    ({"export": {"atol": -1e-5}}, r"'export.atol' = -1e-05 is out of range"),
    ({"export": {"box_atol_px": "half"}}, r"'export.box_atol_px' must be a number"),
    ({"export": {"strict": "yes"}}, r"'export.strict' must be true or false"),
    ({"export": {"tolerance": 1e-4}}, r"unknown key\(s\) export.tolerance"),
    ({"d0": {"train": {"lr": float("nan")}}}, r"'d0.train.lr' = nan must be a finite number"),
    ({"nanodet": {"train": {"grad_clip_norm": float("inf")}}}, r"'nanodet.train.grad_clip_norm' = inf must be"),
    ({"export": {"formats": ["MINDIR", "FOO"]}}, r"'export.formats' = \['MINDIR', 'FOO'\] must be a non-empty "
                                                 r"list of MINDIR, ONNX; unknown: \['FOO'\]"),
    ({"export": {"formats": []}}, r"'export.formats' = \[\] must be a non-empty list of MINDIR, ONNX$"),
    ({"export": {"formats": [1]}}, r"'export.formats' = \[1\] must be .* unknown: \[1\]"),
    ({"runtime": {"cpu_kernels": "on"}}, r"'runtime.cpu_kernels' = 'on' is not one of \['auto', 'off'\]"),
    ({"runtime": {"cpu_kernels_off": "max_pool"}}, r"'runtime.cpu_kernels_off' must be a list"),
    ({"runtime": {"cpu_kernels_off": ["max_pool", "dwconv"]}},
     r"'runtime.cpu_kernels_off' names unknown kernel\(s\) 'dwconv'; valid: depthwise_conv, dense_conv, "
     r"batch_norm, activations, group_norm, max_pool, upsample, grad_norm, adamw_ema$"),
    ({"runtime": {"cpu_depthwise_kernel": True}}, r"unknown key\(s\) runtime.cpu_depthwise_kernel"),
])
def test_invalid_values_are_named(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=message):
        load_params(write_params(tmp_path / "params.yaml", raw))


def float_keys(cls: type = Params, prefix: str = "") -> list[str]:
    """The dotted key of every float field of the params."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out += float_keys(tp, f"{prefix}{name}.")
        elif tp is float:
            out.append(prefix + name)
    return out


def nested(key: str, value) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_refuses_nan_and_inf_by_key(value):
    keys = float_keys()
    assert len(keys) > 50 and {"d0.train.lr", "export.atol", "data.own.val_fraction"} <= set(keys)
    for key in keys:
        with pytest.raises(ConfigError, match=rf"'{re.escape(key)}' = {value!r} must be a finite number"):
            load_params(ROOT / "params.yaml", overrides=nested(key, value))


def test_nan_written_as_yaml_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    assert text.count("\n  anchor_scale: 2.0 ") == 1
    path.write_text(text.replace("\n  anchor_scale: 2.0 ", "\n  anchor_scale: .nan "))
    with pytest.raises(ConfigError, match=r"'d0.anchor_scale' = nan must be a finite number"):
        load_params(path)


def test_export_formats_in_any_case():
    params = load_params(ROOT / "params.yaml", overrides={"export": {"formats": ["onnx", "Mindir"]}})
    assert params.export.formats == ["onnx", "Mindir"]


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("d0: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_overrides_merge(tmp_path):
    params = load_params(ROOT / "params.yaml", overrides={"nanodet": {"train": {"epochs": 2}}})
    assert params.nanodet.train.epochs == 2
    assert params.nanodet.train.batch_size == load_params(ROOT / "params.yaml").nanodet.train.batch_size


def test_no_field_has_a_default_so_params_yaml_is_the_only_source():
    blocks, stack = [], [(Params, "")]
    while stack:
        cls, prefix = stack.pop()
        blocks.append(prefix)
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, prefix + f.name
        stack += [(tp, f"{prefix}{name}.") for name, tp in typing.get_type_hints(cls).items()
                  if dataclasses.is_dataclass(tp)]
    assert {"", "d0.train.", "nanodet.augment.", "data.own.train.", "export."} <= set(blocks)
    with pytest.raises(TypeError):
        Params()


def test_a_missing_key_is_named(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["d0"]["train"]["ema_decay"], raw["eval"]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"old.yaml: missing key\(s\) eval;"):
        load_params(path)
    raw["eval"] = yaml.safe_load((ROOT / "params.yaml").read_text())["eval"]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"missing key\(s\) d0.train.ema_decay;"):
        load_params(path)


def test_coco_overlay_sets_the_official_values():
    coco = load_params(ROOT / "params.yaml", overlay=ROOT / "params_coco.yaml")
    assert (coco.d0.input_size, coco.nanodet.input_size, coco.runtime.device_target) == (512, 320, "Ascend")
    assert (coco.d0.focal_gamma, coco.d0.neg_iou, coco.d0.train.optimizer) == (1.5, 0.5, "sgd")
    assert coco.runtime.precision == "amp_o2"  # Ascend 910 runs convolutions in float16: explicit, loss-scaled
    default = load_params(ROOT / "params.yaml")
    assert default.d0.input_size == 128 and coco.d0.head_init == default.d0.head_init
    with pytest.raises(ConfigError, match="nope.yaml: params file not found"):
        load_params(ROOT / "params.yaml", overlay=ROOT / "nope.yaml")


def test_cpu_kernels_off_takes_any_of_the_kernel_names(tmp_path):
    from msdet.config import CPU_KERNELS

    params = load_params(write_params(tmp_path / "params.yaml", {"runtime": {"cpu_kernels_off": list(CPU_KERNELS)}}))
    assert params.runtime.cpu_kernels_off == list(CPU_KERNELS)
    assert load_params(ROOT / "params.yaml").runtime.cpu_kernels == "auto"
