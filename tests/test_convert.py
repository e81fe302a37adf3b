"""Official weights -> our checkpoints: full-size state dicts built from the reference key listings (random
values), key layouts, clear errors, genuine torch.save fixtures through the reader, the converted checkpoint
through init_from_checkpoint and the standalone export (MINDIR output == in-memory converted network)."""
from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from msdet.conversion.converters import (
    COCO_CATEGORIES,
    ConversionError,
    category_ids_for,
    check_normalisation,
    convert_state_dict,
    select_state,
    to_official_state_dict,
)
from msdet.conversion.torch_reader import load_torch_state
from msdet.detectors import get_detector
from msdet.engine.checkpoint import checkpoint_meta, read_checkpoint, save_weights
from tests.helpers import FIXTURES, ROOT, config, random_official_state, write_params

ms.set_device("CPU")

TORCH_FIXTURES = FIXTURES / "torch"


def convert(model: str, state: dict, num_classes: int | None = None, **kw):
    """convert_state_dict with the official model definition (the COCO profile's model block)."""
    kw.setdefault("cfg", config(model, "coco"))
    return convert_state_dict(model, state, num_classes, **kw)
NBT = "num_batches_tracked"
#: trainable parameter counts of the official models (the official models' published counts)
OFFICIAL_PARAMS = {("d0", 90): 3_880_067, ("nanodet", 80): 4_330_904}


@pytest.fixture(scope="module")
def d0_state():
    return random_official_state("d0", 90, seed=1)


@pytest.fixture(scope="module")
def nanodet_state():
    return random_official_state("nanodet", 80, seed=2)


@pytest.fixture(scope="module")
def converted(d0_state, nanodet_state):
    return {"d0": convert("d0", d0_state), "nanodet": convert("nanodet", nanodet_state)}


# ----------------------------------------------------------------------------------------------------
# full-size conversion


@pytest.mark.detector
@pytest.mark.parametrize("model, num_classes", [("d0", 90), ("nanodet", 80)])
def test_full_state_dict_fills_every_parameter_and_converts_back(converted, d0_state, nanodet_state, model,
                                                                 num_classes):
    state = {"d0": d0_state, "nanodet": nanodet_state}[model]
    network, report = converted[model]
    tensors = [k for k in state if not k.endswith(NBT)]
    params = list(network.get_parameters())
    assert report.num_classes == num_classes == network.num_classes
    assert report.official_tensors_used == len(tensors) == report.parameters_filled == len(params)
    assert report.num_batches_tracked_skipped == len(state) - len(tensors)
    assert report.freshly_initialised == [] and report.ignored_non_ema_tensors == 0
    assert sum(p.size for p in network.trainable_params()) == OFFICIAL_PARAMS[(model, num_classes)]
    back = to_official_state_dict(model, network, config(model, "coco"))
    assert sorted(back) == sorted(tensors)
    for key in tensors:
        assert back[key].shape == state[key].shape, key
        np.testing.assert_array_equal(back[key], state[key], err_msg=key)
    # and every MindSpore parameter (BN running stats included) took the value of a distinct official tensor
    digests = {p.asnumpy().tobytes() for p in params}
    assert len(digests) == len({state[k].tobytes() for k in tensors})


@pytest.mark.detector
def test_batchnorm_conventions_are_checked_and_stated(converted):
    _, d0_report = converted["d0"]
    _, nanodet_report = converted["nanodet"]
    assert d0_report.normalisation[0].startswith("108 BatchNorm2d cells: eps 0.001, momentum 0.99 (MindSpore)")
    assert nanodet_report.normalisation[0].startswith("141 BatchNorm2d cells: eps 1e-05, momentum 0.9 (MindSpore)")
    assert nanodet_report.normalisation[1].startswith("8 GroupNorm cells: eps 1e-05")
    network, _ = converted["d0"]
    bn = next(c for _, c in network.cells_and_names() if isinstance(c, ms.nn.BatchNorm2d))
    bn.eps = 1e-5
    try:
        with pytest.raises(ConversionError, match="eps 1e-05, momentum 0.99"):
            check_normalisation("d0", network)
    finally:
        bn.eps = 1e-3


@pytest.mark.detector
def test_category_ids_of_the_official_heads(converted):
    _, d0 = converted["d0"]
    assert d0.category_ids == list(range(1, 91))
    assert d0.class_names[0] == "person" and d0.class_names[89] == "toothbrush"
    unused = [i for i, n in zip(d0.category_ids, d0.class_names) if n.startswith("unused_")]
    assert unused == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    _, nanodet = converted["nanodet"]
    assert len(nanodet.category_ids) == 80 and nanodet.category_ids == sorted(nanodet.category_ids)
    assert set(nanodet.category_ids) == set(COCO_CATEGORIES) and 12 not in nanodet.category_ids
    assert nanodet.class_names[nanodet.category_ids.index(90)] == "toothbrush"


def forward_pynative(model: str, network, size: int = 128, seed: int = 7) -> list[np.ndarray]:
    """The inference cell's outputs for one random image, in PyNative mode (no graph compilation)."""
    cfg = config(model, "coco", input_size=size)
    cell = get_detector(model, cfg, int(network.num_classes)).inference_cell(network)
    cell.set_train(False)
    image = np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        out = cell(ms.Tensor(image))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    return [o.asnumpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


@pytest.mark.detector
def test_d0_head_cut_to_the_80_coco_categories_predicts_what_the_90_class_head_does(converted, d0_state):
    coco = [{"id": i, "name": COCO_CATEGORIES[i]} for i in sorted(COCO_CATEGORIES)]
    network, report = convert("d0", d0_state, 80, categories=coco)
    assert report.num_classes == 80 == network.num_classes
    assert report.category_ids == sorted(COCO_CATEGORIES) and report.class_names[-1] == "toothbrush"
    assert report.official_tensors_used == report.parameters_total
    reg80, prob80 = forward_pynative("d0", network)
    reg90, prob90 = forward_pynative("d0", converted["d0"][0])
    np.testing.assert_array_equal(reg80, reg90)
    np.testing.assert_allclose(prob80, prob90[..., [i - 1 for i in sorted(COCO_CATEGORIES)]], rtol=1e-6, atol=1e-7)
    assert float(np.std(prob80)) > 1e-3


@pytest.mark.detector
def test_nanodet_head_cut_to_given_categories_in_their_order(converted, nanodet_state):
    wanted = [{"id": 90, "name": "brush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    network, report = convert("nanodet", nanodet_state, categories=wanted)
    rows = [sorted(COCO_CATEGORIES).index(c["id"]) for c in wanted]
    assert rows == [79, 0, 2] and report.num_classes == 3 and report.category_ids == [90, 1, 3]
    assert report.class_names == ["brush", "person", "car"]
    (out3,) = forward_pynative("nanodet", network)
    (out80,) = forward_pynative("nanodet", converted["nanodet"][0])
    np.testing.assert_allclose(out3[..., :3], out80[..., rows], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out3[..., 3:], out80[..., 80:], rtol=1e-6, atol=1e-6)
    back = to_official_state_dict("nanodet", network, config("nanodet", "coco"))
    np.testing.assert_array_equal(back["aux_head.gfl_cls.weight"], nanodet_state["aux_head.gfl_cls.weight"][rows])
    np.testing.assert_array_equal(back["head.gfl_cls.2.bias"][3:], nanodet_state["head.gfl_cls.2.bias"][80:])


@pytest.mark.detector
def test_category_cut_errors(d0_state, nanodet_state):
    with pytest.raises(ConversionError, match=r"category ids \[12, 200\] are not among the 80 classes"):
        convert("nanodet", nanodet_state, categories=[{"id": 1}, {"id": 12}, {"id": 200}])
    with pytest.raises(ConversionError, match="has 90 classes, cut to 2 categories, not 80"):
        convert("d0", d0_state, 80, categories=[{"id": 1}, {"id": 2}])
    d0_80 = random_official_state("d0", 80, seed=3)
    with pytest.raises(ConversionError, match="category ids of this 80-class d0 head are unknown"):
        convert("d0", d0_80, categories=[{"id": 1}])


# ----------------------------------------------------------------------------------------------------
# key layouts


def test_select_state_prefixes():
    a, b = np.zeros(1, np.float32), np.ones(1, np.float32)
    keys, layout, ignored = select_state({"module.x.w": a, "module.y": b})
    assert keys == {"x.w": "module.x.w", "y": "module.y"} and ignored == 0 and "'module.' stripped" in layout
    keys, layout, ignored = select_state({"model.x": a, "avg_model.x": b, "model.extra": a})
    assert keys == {"x": "avg_model.x"} and ignored == 2 and "EMA" in layout
    keys, _, ignored = select_state({"model.x": a, "model.y": b})
    assert keys == {"x": "model.x", "y": "model.y"} and ignored == 0
    keys, layout, _ = select_state({"module.avg_model.x": a, "module.model.x": b})
    assert keys == {"x": "module.avg_model.x"}
    assert select_state({"backbone_net.model.w": a})[0] == {"backbone_net.model.w": "backbone_net.model.w"}
    with pytest.raises(ConversionError, match="'x' and 'module.x' are the same tensor"):
        select_state({"x": a, "module.x": b})


@pytest.mark.detector
def test_lightning_layout_prefers_the_ema_copy(nanodet_state):
    live = {f"model.{k}": np.zeros_like(v) for k, v in nanodet_state.items()}
    ema = {f"module.avg_model.{k}": v for k, v in nanodet_state.items()}
    network, report = convert("nanodet", {**live, **ema}, 80)
    assert report.ignored_non_ema_tensors == len(live)
    assert "'module.' stripped" in report.key_layout and "'avg_model.*' used" in report.key_layout
    back = to_official_state_dict("nanodet", network, config("nanodet", "coco"))
    for key in ("backbone.conv1.0.weight", "head.gfl_cls.3.bias", "aux_head.scales.2.scale"):
        np.testing.assert_array_equal(back[key], nanodet_state[key])


@pytest.mark.detector
def test_release_without_the_aux_branch_gets_it_freshly_initialised(nanodet_state):
    state = {f"model.{k}": v for k, v in nanodet_state.items() if not k.startswith(("aux_fpn.", "aux_head."))}
    network, report = convert("nanodet", state)
    aux = sorted(p.name for p in network.get_parameters() if p.name.startswith(("aux_fpn.", "aux_head.")))
    assert report.freshly_initialised == aux and len(aux) == 207
    assert report.official_tensors_used == report.parameters_total - len(aux)
    assert any("aux_fpn/aux_head" in n for n in report.notes)
    back = to_official_state_dict("nanodet", network, config("nanodet", "coco"))
    np.testing.assert_array_equal(back["fpn.reduce_layers.2.conv.weight"],
                                  nanodet_state["fpn.reduce_layers.2.conv.weight"])
    # a partly present aux branch is not a release layout: it is an error
    partial = dict(state, **{"model.aux_head.scales.0.scale": nanodet_state["aux_head.scales.0.scale"]})
    with pytest.raises(ConversionError, match=r"tensors of the official nanodet model are missing: 'aux_fpn\."):
        convert("nanodet", partial)


# ----------------------------------------------------------------------------------------------------
# errors


@pytest.mark.detector
def test_missing_tensor_is_named(d0_state):
    state = {f"module.{k}": v for k, v in d0_state.items() if k != "bifpn.1.conv4_down.bn.running_var"}
    with pytest.raises(ConversionError) as err:
        convert("d0", state, source="zylo.pth")
    assert str(err.value).startswith("zylo.pth: 1 tensors of the official d0 model are missing")
    assert "'bifpn.1.conv4_down.bn.running_var' (our 'bifpn.1.conv4_down.bn.moving_variance' (64,))" in str(err.value)


@pytest.mark.detector
def test_wrong_shape_is_named_with_both_shapes(d0_state):
    state = dict(d0_state)
    state["bifpn.0.conv6_up.pointwise_conv.conv.weight"] = np.zeros((64, 32, 1, 1), np.float32)
    with pytest.raises(ConversionError, match=(
            r"tensor 'bifpn.0.conv6_up.pointwise_conv.conv.weight' has shape \(64, 32, 1, 1\), our "
            r"'bifpn.0.conv6_up.pointwise_conv.conv.weight' needs \(64, 64, 1, 1\)")):
        convert("d0", state)


@pytest.mark.detector
def test_unused_extra_tensor_is_named(nanodet_state):
    state = {f"avg_model.{k}": v for k, v in nanodet_state.items()}
    state["avg_model.head.extra_conv.weight"] = np.zeros((3, 3), np.float32)
    state["avg_model.fpn.nowhere.num_batches_tracked"] = np.array(1, np.int64)  # not a counter of one of our BNs
    with pytest.raises(ConversionError) as err:
        convert("nanodet", state)
    assert "2 tensors have no counterpart in our nanodet network" in str(err.value)
    assert "'avg_model.head.extra_conv.weight' (3, 3)" in str(err.value)
    assert "'avg_model.fpn.nowhere.num_batches_tracked' ()" in str(err.value)


@pytest.mark.detector
def test_class_count_and_model_mismatches(d0_state, nanodet_state):
    with pytest.raises(ConversionError, match=r"\(810, 64, 1, 1\) has 90 classes, not 80.*d0\.init"):
        convert("d0", d0_state, 80)
    with pytest.raises(ConversionError, match="not an official nanodet state dict; it looks like a 'd0' checkpoint"):
        convert("nanodet", d0_state)
    with pytest.raises(ConversionError, match="trained with reg_max 7, nanodet.reg_max is 10"):
        convert("nanodet", nanodet_state, cfg=config("nanodet", reg_max=10))
    bad = dict(d0_state)
    bad["bifpn.0.p6_w1"] = np.array([1, 2], np.int32)
    with pytest.raises(ConversionError, match="'bifpn.0.p6_w1' holds int32, not floating point"):
        convert("d0", bad)


# ----------------------------------------------------------------------------------------------------
# genuine torch.save fixtures through the reader into the key handling


def _npz(name: str) -> dict[str, np.ndarray]:
    with np.load(TORCH_FIXTURES / name) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.detector
def test_torch_fixtures_through_reader_and_prefix_handling():
    want = _npz("nanodet_lightning.npz")
    state = load_torch_state(TORCH_FIXTURES / "nanodet_lightning.ckpt")
    keys, layout, ignored = select_state(state)
    ema = {k[len("state_dict/avg_model."):] for k in want if k.startswith("state_dict/avg_model.")}
    assert set(keys) == ema and "backbone.conv1.1.running_var" in keys
    assert ignored == sum(k.startswith("state_dict/model.") for k in want) and "EMA" in layout
    for _key, original in keys.items():
        np.testing.assert_array_equal(state[original], want[f"state_dict/{original}"])

    want = _npz("nanodet_module_prefix.npz")
    state = load_torch_state(TORCH_FIXTURES / "nanodet_module_prefix.pth")
    keys, layout, _ = select_state(state)
    assert sorted(keys) == sorted(k[len("state_dict/module."):] for k in want)
    np.testing.assert_array_equal(state[keys["head.gfl_cls.weight"]], want["state_dict/module.head.gfl_cls.weight"])

    bare = load_torch_state(TORCH_FIXTURES / "zylo117_bare.pth")
    assert select_state(bare)[0] == {k: k for k in bare}
    legacy = load_torch_state(TORCH_FIXTURES / "legacy_format.pth")
    assert select_state(legacy)[0] == {"conv.weight": "conv.weight", "bn.num_batches_tracked": "bn.num_batches_tracked"}
    # the tiny NanoDet-style module is not the official model: the conversion says which tensor is absent
    with pytest.raises(ConversionError, match=r"no class head tensor 'head.gfl_cls.0.weight'"):
        convert("nanodet", load_torch_state(TORCH_FIXTURES / "nanodet_lightning.ckpt"))


# --- torch.save files of the full-size state dicts, assembled with the opcodes torch writes (no torch here) ---

_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def _str(text: str) -> bytes:
    raw = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw


def _int_tuple(values) -> bytes:
    return pickle.MARK + b"".join(pickle.BININT + struct.pack("<i", v) for v in values) + pickle.TUPLE


def _tensor_opcodes(key: str, array: np.ndarray, legacy: bool) -> bytes:
    strides = tuple(s // array.itemsize for s in array.strides)
    pid = (pickle.MARK + _str("storage") + pickle.GLOBAL + f"torch\n{_STORAGES[array.dtype]}\n".encode()
           + _str(key) + _str("cuda:0") + pickle.BININT + struct.pack("<i", array.size)
           + (pickle.NONE if legacy else b"") + pickle.TUPLE + pickle.BINPERSID)
    hooks = pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE
    return (pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n" + pickle.MARK + pid + pickle.BININT + bytes(4)
            + _int_tuple(array.shape) + _int_tuple(strides) + pickle.NEWFALSE + hooks + pickle.TUPLE + pickle.REDUCE)


def _state_pickle(state: dict[str, np.ndarray], wrap: str | None, legacy: bool) -> bytes:
    entries = b"".join(_str(k) + _tensor_opcodes(str(i), v, legacy) for i, (k, v) in enumerate(state.items()))
    body = (pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE
            + pickle.MARK + entries + pickle.SETITEMS)
    if wrap:
        body = pickle.EMPTY_DICT + _str(wrap) + body + pickle.SETITEM + _str("epoch") + pickle.BININT1 + b"\x07" \
               + pickle.SETITEM
    return pickle.PROTO + b"\x02" + body + pickle.STOP


def write_torch_zip(path: Path, state: dict[str, np.ndarray], wrap: str | None = "state_dict") -> Path:
    """What torch.save (>= 1.6) writes for ``{wrap: OrderedDict(state), "epoch": 7}``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", _state_pickle(state, wrap, legacy=False))
        zf.writestr("archive/byteorder", "little")
        for i, value in enumerate(state.values()):
            zf.writestr(f"archive/data/{i}", np.ascontiguousarray(value).astype("<" + value.dtype.str[1:]).tobytes())
        zf.writestr("archive/version", "3\n")
    return path


def write_torch_legacy(path: Path, state: dict[str, np.ndarray]) -> Path:
    """What torch.save (0.4 - 1.5) writes for a bare state dict: zylo117's efficientdet-d0.pth layout."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2),
             pickle.dumps(sys_info, protocol=2), _state_pickle(state, None, legacy=True),
             pickle.dumps([str(i) for i in range(len(state))], protocol=2)]
    parts += [struct.pack("<q", v.size) + np.ascontiguousarray(v).tobytes() for v in state.values()]
    path.write_bytes(b"".join(parts))
    return path


def test_torch_file_writers_match_the_genuine_fixtures(tmp_path):
    """The test writers produce what the reader reads from real torch files (same keys and arrays)."""
    want = load_torch_state(TORCH_FIXTURES / "zylo117_bare.pth")
    want = {k: np.ascontiguousarray(v) for k, v in want.items()}
    for path in (write_torch_zip(tmp_path / "z.pth", want, wrap=None), write_torch_legacy(tmp_path / "l.pth", want)):
        got = load_torch_state(path)
        assert list(got) == list(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
            assert got[key].dtype == want[key].dtype


# ----------------------------------------------------------------------------------------------------
# converted checkpoints in use: files, init_from_checkpoint, eval's category ids, standalone export


@pytest.fixture(scope="module")
def converted_files(tmp_path_factory, d0_state, nanodet_state):
    """zylo117-style legacy .pth and a Lightning-style zip .ckpt (model.* and EMA avg_model.*), converted by
    the stage into checkpoints (+ reports)."""
    from stages.convert import main

    root = tmp_path_factory.mktemp("convert")
    d0_src = write_torch_legacy(root / "efficientdet-d0.pth", d0_state)
    lightning = {f"model.{k}": np.zeros_like(v) for k, v in nanodet_state.items()}
    lightning.update({f"avg_model.{k}": v for k, v in nanodet_state.items()})
    nanodet_src = write_torch_zip(root / "nanodet-plus-m_320.ckpt", lightning)
    out = {}
    for model, src in (("d0", d0_src), ("nanodet", nanodet_src)):
        ckpt, report = root / f"{model}.ckpt", root / f"{model}.json"
        assert main(["--model", model, "--src", str(src), "--out", str(ckpt), "--report", str(report),
                     "--params", str(ROOT / "params.yaml")]) == 0
        out[model] = (src, ckpt, json.loads(report.read_text()))
    return out


@pytest.mark.detector
@pytest.mark.parametrize("model", ["d0", "nanodet"])
def test_converted_file_holds_the_weights_and_metadata(converted_files, d0_state, nanodet_state, model):
    import hashlib

    state = {"d0": d0_state, "nanodet": nanodet_state}[model]
    src, ckpt, report = converted_files[model]
    params = read_checkpoint(ckpt)
    detector = get_detector(model, config(model, "coco"), report["num_classes"])
    name_map = detector.official_name_map(detector.build_network())
    for key, ours in name_map.items():
        np.testing.assert_array_equal(params[ours].asnumpy(), state[key], err_msg=key)
    assert checkpoint_meta(params, "model") == model
    assert checkpoint_meta(params, "source_sha256") == hashlib.sha256(src.read_bytes()).hexdigest()
    assert checkpoint_meta(params, "source_file") == str(src)
    assert checkpoint_meta(params, "category_ids") == report["category_ids"]
    assert report["official_tensors_used"] == len(name_map)
    assert [c["id"] for c in report["categories"]] == report["category_ids"]
    assert report["ignored_non_ema_tensors"] == (len(state) if model == "nanodet" else 0)


@pytest.mark.detector
def test_stage_reports_a_bad_file_and_exits_2(tmp_path, converted_files, capsys):
    from stages.convert import main

    src = converted_files["nanodet"][0]
    assert main(["--model", "d0", "--src", str(src), "--out", str(tmp_path / "x.ckpt"),
                 "--params", str(ROOT / "params.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no class head tensor 'classifier.header.pointwise_conv.conv.weight'" in err and "'nanodet'" in err
    meta = tmp_path / "meta.json"
    pets = [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}]
    meta.write_text(json.dumps({"num_classes": 2, "categories": pets}))
    assert main(["--model", "nanodet", "--src", str(src), "--out", str(tmp_path / "pets.ckpt"), "--meta", str(meta),
                 "--report", str(tmp_path / "pets.json"), "--params", str(ROOT / "params.yaml")]) == 0
    report = json.loads((tmp_path / "pets.json").read_text())
    assert report["num_classes"] == 2 and report["categories"] == pets
    assert checkpoint_meta(read_checkpoint(tmp_path / "pets.ckpt"), "category_ids") == [18, 17]
    capsys.readouterr()
    assert not (tmp_path / "x.ckpt").exists()
    evil = TORCH_FIXTURES / "malicious_os_system.pth"
    assert main(["--model", "d0", "--src", str(evil), "--out", str(tmp_path / "x.ckpt"),
                 "--params", str(ROOT / "params.yaml")]) == 2
    assert "refused to load global" in capsys.readouterr().err


@pytest.mark.detector
@pytest.mark.parametrize("model, classes, head", [
    ("d0", 90, ["classifier.header.pointwise_conv.conv.weight", "classifier.header.pointwise_conv.conv.bias"]),
    ("nanodet", 80, [f"head.gfl_cls.{i}.{k}" for i in range(4) for k in ("weight", "bias")]
     + ["aux_head.gfl_cls.weight", "aux_head.gfl_cls.bias"]),
])
def test_init_from_converted_checkpoint_reinitialises_only_the_class_head(converted_files, model, classes, head):
    from msdet.training import init_from_checkpoint

    ckpt = converted_files[model][1]
    params = read_checkpoint(ckpt)
    cfg = config(model, "coco")
    for num_classes, expected in ((classes, []), (3, head)):
        detector = get_detector(model, cfg, num_classes)
        network = detector.build_network()
        fresh = {p.name: p.asnumpy() for p in network.get_parameters() if p.name in head}
        reinit = init_from_checkpoint(detector, network, str(ckpt))
        assert sorted(reinit) == sorted(expected)
        for p in network.get_parameters():
            if p.name in reinit:
                np.testing.assert_array_equal(p.asnumpy(), fresh[p.name], err_msg=p.name)
            else:
                np.testing.assert_array_equal(p.asnumpy(), params[p.name].asnumpy(), err_msg=p.name)


@pytest.mark.detector
def test_category_ids_for_prefers_the_checkpoints_own(converted_files, tmp_path):
    meta = {"num_classes": 2, "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]}
    assert category_ids_for(converted_files["d0"][1], meta) == list(range(1, 91))
    plain = tmp_path / "plain.ckpt"
    save_weights(plain, [{"name": "w", "data": ms.Tensor(np.zeros(2, np.float32))}], {"model": "d0"})
    assert category_ids_for(plain, meta) == [5, 9]


@pytest.mark.detector
@pytest.mark.parametrize("model", ["d0", "nanodet"])
def test_standalone_export_of_converted_checkpoint_computes_the_converted_network(converted_files, converted,
                                                                                    tmp_path, monkeypatch, model):
    from msdet.export.exporter import load_exported
    from stages.export import main

    monkeypatch.chdir(tmp_path)  # no MindRecord here: the export checks on deterministic random inputs
    write_params("params.yaml", {"export": {"num_check_images": 1, "latency_repeats": 1}})
    ckpt, report = converted_files[model][1], converted_files[model][2]
    out = tmp_path / "export"
    assert main(["--model", model, "--ckpt", str(ckpt), "--input-size", "128", "--num-classes",
                 str(report["num_classes"]), "--out", str(out), "--formats", "MINDIR"]) == 0
    exported = load_exported(out / "model.mindir")
    network, _ = converted[model]
    size_cfg = config(model, "coco", input_size=128)
    detector = get_detector(model, size_cfg, report["num_classes"])
    cell = detector.inference_cell(network)
    cell.set_train(False)
    image = np.random.default_rng(7).standard_normal((1, 3, 128, 128)).astype(np.float32)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # one forward pass: cheaper than compiling the graph once more
    try:
        want = cell(ms.Tensor(image))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    want = [o.asnumpy() for o in (want if isinstance(want, (tuple, list)) else (want,))]
    got = exported.run(image)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.all(np.isfinite(w))
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    assert want[-1].shape[-1] == (90 if model == "d0" else 80 + 32)
    assert float(np.std(want[-1])) > 1e-3  # not a degenerate output that would match anything
    assert json.loads((out / "export_report.json").read_text())["formats"]["MINDIR"]["exported"] is True


# ----------------------------------------------------------------------------------------------------
# starting checkpoints must live under weights/ (the train stages' dependency)


@pytest.mark.detector
def test_starting_weights_must_be_under_the_tracked_directory(tmp_path, monkeypatch, capsys):
    import dataclasses

    import yaml

    from msdet.training import check_starting_weights_tracked, starting_weight_files
    from stages.train import main

    cfg = config("d0")
    assert starting_weight_files(cfg, "d0") == {}
    check_starting_weights_tracked(dataclasses.replace(cfg, pretrained_backbone="mindcv"), "d0", tmp_path)
    inside = dataclasses.replace(cfg, init="weights/official/d0.ckpt")
    assert starting_weight_files(inside, "d0") == {"d0.init": Path("weights/official/d0.ckpt")}
    check_starting_weights_tracked(inside, "d0", tmp_path)
    for key, value in (("init", "models/official/d0.ckpt"), ("pretrained_backbone", "weights/../b0.ckpt")):
        with pytest.raises(ValueError, match=rf"d0\.{key} = .*must live under weights/.*train_d0"):
            check_starting_weights_tracked(dataclasses.replace(cfg, **{key: value}), "d0", tmp_path)

    # the stage refuses before any work, naming the option
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["nanodet"]["init"] = "/tmp/elsewhere/nanodet.ckpt"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert main(["--model", "nanodet"]) == 1
    assert "nanodet.init = /tmp/elsewhere/nanodet.ckpt" in capsys.readouterr().err
    assert not (tmp_path / "models").exists()
