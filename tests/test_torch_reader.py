"""The NumPy-only torch checkpoint reader against genuine torch.save files (tests/fixtures/torch/README.md)."""
from __future__ import annotations

import io
import os
import pickle
import re
import struct
import subprocess
import tracemalloc
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from msdet.conversion import torch_reader
from msdet.conversion.torch_reader import (
    CheckpointFormatError,
    LegacyCheckpointError,
    UnsafeCheckpointError,
    flatten_state_dict,
    load_torch_pickle,
    load_torch_state,
)
from tests.helpers import pkl_dict, pkl_int, pkl_ints, pkl_str, pkl_tensor, write_torch_state, zip_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "torch"
MARKER = Path("/tmp/PWNED_msdet_3f9c2a71d4")  # what fixture (e) would create if it were executed
TORCH_FILES = ["nanodet_lightning.ckpt", "nanodet_module_prefix.pth", "zylo117_bare.pth"]


def tree_arrays(obj, path=""):
    """(path, array) for every array in a nested dict/list tree, paths as in the fixtures' .npz files."""
    if isinstance(obj, np.ndarray):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tree_arrays(v, f"{path}/{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tree_arrays(v, f"{path}/{i}" if path else str(i))


def expected_arrays(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / (Path(name).stem + ".npz")) as z:
        return {k: z[k] for k in z.files}


def assert_same(got: np.ndarray, want: np.ndarray, key: str) -> None:
    assert got.dtype == want.dtype, key
    assert got.shape == want.shape, key
    assert np.array_equal(got, want), key
    assert got.flags.c_contiguous and got.flags.owndata, key


@pytest.mark.parametrize("name", TORCH_FILES)
def test_every_tensor_matches_torch(name):
    got = dict(tree_arrays(load_torch_pickle(FIXTURES / name)))
    want = expected_arrays(name)
    assert sorted(got) == sorted(want)
    for key in want:
        assert_same(got[key], want[key], key)


def test_lightning_checkpoint_special_tensors_and_plain_fields():
    ckpt = load_torch_pickle(FIXTURES / "nanodet_lightning.ckpt")
    sd = ckpt["state_dict"]
    assert isinstance(sd, OrderedDict)
    nbt = sd["avg_model.backbone.conv1.1.num_batches_tracked"]
    assert nbt.shape == () and nbt.dtype == np.int64 and int(nbt) == 7
    assert sd["model.backbone.conv1.0.weight"].shape == (4, 3, 3, 3)
    assert sd["model.extra.half"].dtype == np.float16 and sd["model.extra.half"].shape == (2, 3)
    assert sd["model.extra.bf16"].dtype == np.float32
    # the transpose and the offset view were stored as strided views of other data
    assert sd["model.extra.transposed"].shape == (4, 3)
    np.testing.assert_array_equal(sd["model.extra.offset_view"], sd["model.extra.shared"][2:5])
    np.testing.assert_array_equal(sd["model.extra.expanded"][0], sd["model.extra.expanded"][1])
    assert sd["model.extra.empty"].shape == (0, 4)
    assert sd["model.extra.bool"].tolist() == [True, False, True]
    assert ckpt["epoch"] == 3 and ckpt["global_step"] == 10
    assert ckpt["pytorch-lightning_version"] == "1.9.0"
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0.05 and group["params"] == [0, 1]
    assert ckpt["lr_schedulers"][0]["T_max"] == 300
    assert ckpt["score_set"] == {0.5, 0.75}
    assert ckpt["notes"] == ("tuple", None, True, 1.5, b"raw-bytes")


@pytest.mark.parametrize("name", TORCH_FILES)
def test_load_torch_state_returns_the_state_dict(name):
    want = expected_arrays(name)
    prefix = "" if name.startswith("zylo117") else "state_dict/"
    want = {k[len(prefix):]: v for k, v in want.items() if k.startswith(prefix)}
    got = load_torch_state(FIXTURES / name)
    assert list(got) == [k for k in want]  # same keys, in the saved order
    for key, value in want.items():
        assert_same(got[key], value, key)


def test_state_dict_key_styles():
    assert all(k.startswith("module.") for k in load_torch_state(FIXTURES / "nanodet_module_prefix.pth"))
    ckpt = load_torch_state(FIXTURES / "nanodet_lightning.ckpt")
    assert {k.split(".")[0] for k in ckpt} == {"model", "avg_model"}
    bare = load_torch_state(FIXTURES / "zylo117_bare.pth")
    assert bare["backbone_net.model._bn0.num_batches_tracked"] == 12345678901
    np.testing.assert_array_equal(bare["bifpn.0.p5_w1"], np.full(3, 0.5, np.float32))


def test_flatten_state_dict_finds_the_tensors():
    a, b = np.zeros(2, np.float32), np.ones(3, np.int64)
    assert flatten_state_dict({"model": {"x": a}, "epoch": 1}) == {"x": a}
    assert flatten_state_dict({"state_dict": {"x": a}, "model": {"y": b}}) == {"x": a}
    assert flatten_state_dict({"state_dict": {"x": a}, "ema": {"y": b}}, prefer=("ema",)) == {"y": b}
    assert flatten_state_dict({"x": a, "head": {"y": b}}) == {"x": a, "head.y": b}
    with pytest.raises(CheckpointFormatError, match=r"'x.bad' is a str"):
        flatten_state_dict({"state_dict": {"x": {"bad": "s"}}})
    with pytest.raises(CheckpointFormatError, match=r"no state dict found.*'epoch'"):
        flatten_state_dict({"epoch": 1, "weights": [a]}, source="f.ckpt")
    with pytest.raises(CheckpointFormatError, match="holds no tensors"):
        flatten_state_dict({"state_dict": {}})
    with pytest.raises(CheckpointFormatError, match="holds a list"):
        flatten_state_dict([a])


def test_malicious_fixture_is_refused_without_running_it():
    path = FIXTURES / "malicious_os_system.pth"
    with zipfile.ZipFile(path) as zf:
        assert str(MARKER).encode() in zf.read("malicious_os_system/data.pkl")
    MARKER.unlink(missing_ok=True)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system") as err:
        load_torch_state(path)
    assert err.value.global_name == "posix.system"
    assert str(path) in str(err.value)
    assert not MARKER.exists()


class _CallOnLoad:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("func, args, global_name", [
    (eval, ("open({marker!r}, 'w').close()",), "builtins.eval"),
    (exec, ("open({marker!r}, 'w').close()",), "builtins.exec"),
    (os.system, ("touch {marker}",), f"{os.system.__module__}.system"),
    (subprocess.Popen, (["touch", "{marker}"],), "subprocess.Popen"),
    (getattr, ("text", "upper"), "builtins.getattr"),
])
def test_code_running_globals_are_refused(tmp_path, protocol, func, args, global_name):
    marker = tmp_path / "ran"
    args = tuple([a.format(marker=str(marker)) for a in x] if isinstance(x, list)
                 else x.format(marker=str(marker)) if isinstance(x, str) else x for x in args)
    payload = pickle.dumps({"state_dict": {"w": _CallOnLoad(func, *args)}}, protocol=protocol)
    path = zip_checkpoint(tmp_path / "evil.pth", payload)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_torch_pickle(path)
    assert err.value.global_name == global_name
    assert global_name in str(err.value)
    assert not marker.exists()


def test_dotted_attribute_of_an_allowed_global_is_refused(tmp_path):
    def short_str(s: str) -> bytes:
        return pickle.SHORT_BINUNICODE + bytes([len(s)]) + s.encode()

    payload = (pickle.PROTO + b"\x04" + short_str("torch._utils") + short_str("_rebuild_tensor_v2.__globals__")
               + pickle.STACK_GLOBAL + pickle.STOP)
    with pytest.raises(UnsafeCheckpointError, match=r"_rebuild_tensor_v2\.__globals__"):
        load_torch_pickle(zip_checkpoint(tmp_path / "evil.pth", payload))


def test_truncated_and_corrupt_zips_give_clear_errors(tmp_path):
    raw = (FIXTURES / "nanodet_lightning.ckpt").read_bytes()
    for cut in (len(raw) // 2, len(raw) - 30):
        path = tmp_path / f"cut{cut}.ckpt"
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointFormatError, match="truncated or corrupt zip") as err:
            load_torch_state(path)
        assert str(path) in str(err.value)
    # flip one byte inside a storage record: the zip's CRC check catches it
    with zipfile.ZipFile(FIXTURES / "nanodet_lightning.ckpt") as zf:
        info = zf.getinfo("nanodet_lightning/data/0")
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    assert info.file_size > 5
    flipped = bytearray(raw)
    flipped[start + 5] ^= 0xFF
    path = tmp_path / "flipped.ckpt"
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointFormatError, match=r"corrupt checkpoint.*CRC") as err:
        load_torch_state(path)
    assert str(path) in str(err.value)


def test_non_checkpoint_files_give_clear_errors(tmp_path):
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointFormatError, match=r"noise\.pth: not a PyTorch checkpoint"):
        load_torch_state(noise)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match=r"empty\.pth: empty file"):
        load_torch_state(empty)
    with pytest.raises(CheckpointFormatError, match=r"without <folder>/data\.pkl"):
        load_torch_state(FIXTURES / "zylo117_bare.npz")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_torch_state(tmp_path / "missing.pth")
    garbage = zip_checkpoint(tmp_path / "garbage.pth", b"\x80\x02}q\x00(X")
    with pytest.raises(CheckpointFormatError, match=r"garbage\.pth: corrupt checkpoint"):
        load_torch_state(garbage)


# --- hand-assembled checkpoints for what torch on this machine cannot write (big-endian, bad strides) ---

@pytest.mark.parametrize("byteorder", ["big", "little", None])
def test_byteorder_record_is_honoured(tmp_path, byteorder):
    f32 = np.arange(6, dtype=np.float32) - 2.5
    i64 = np.array([1, -2, 1 << 40], dtype=np.int64)
    f16 = np.array([0.5, -1.25], dtype=np.float16)
    bf16_bits = np.array([0x3F80, 0xC020], dtype=np.uint16)  # 1.0 and -2.5 in bfloat16
    end = ">" if byteorder == "big" else "<"
    records = {"0": f32.astype(end + "f4").tobytes(), "1": i64.astype(end + "i8").tobytes(),
               "2": f16.astype(end + "f2").tobytes(), "3": bf16_bits.astype(end + "u2").tobytes()}
    payload = pkl_dict({
        "f32": pkl_tensor("FloatStorage", "0", 6, 0, (2, 3), (3, 1)),
        "f32_t": pkl_tensor("FloatStorage", "0", 6, 0, (3, 2), (1, 3)),
        "i64": pkl_tensor("LongStorage", "1", 3, 2, (), ()),
        "f16": pkl_tensor("HalfStorage", "2", 2, 0, (2,), (1,)),
        "bf16": pkl_tensor("BFloat16Storage", "3", 2, 0, (2,), (1,)),
    })
    got = load_torch_state(zip_checkpoint(tmp_path / "x.pth", payload, records, byteorder))
    np.testing.assert_array_equal(got["f32"], f32.reshape(2, 3))
    np.testing.assert_array_equal(got["f32_t"], f32.reshape(2, 3).T)
    assert got["i64"].shape == () and got["i64"] == 1 << 40
    assert got["f16"].dtype == np.float16 and got["f16"].tolist() == [0.5, -1.25]
    assert got["bf16"].dtype == np.float32 and got["bf16"].tolist() == [1.0, -2.5]
    assert all(a.dtype.isnative for a in got.values())


@pytest.mark.parametrize("tensor, records, message", [
    pytest.param(pkl_tensor("FloatStorage", "0", 4, 1, (2, 2), (2, 1)), {"0": bytes(16)},
                 "reads past the end of storage", id="offset-past-end"),
    pytest.param(pkl_tensor("FloatStorage", "0", 4, 0, (2, 2), (1, 4)), {"0": bytes(16)},
                 "reads past the end of storage", id="stride-past-end"),
    pytest.param(pkl_tensor("FloatStorage", "0", 4, 0, (2, 2), (2, 1)), {"0": bytes(12)},
                 "has 12 bytes, expected 4 x 4", id="short-record"),
    pytest.param(pkl_tensor("FloatStorage", "0", 4, 0, (2, 2), (2, 1)), {},
                 "storage record some_name/data/0 is missing", id="missing-record"),
    pytest.param(pkl_tensor("FloatStorage", "../x", 4, 0, (4,), (1,)), {}, "bad storage key", id="path-key"),
    pytest.param(pkl_tensor("FloatStorage", "0", 1, 0, (1 << 20, 1 << 20), (0, 0)), {"0": bytes(4)},
                 r"a tensor of size \(1048576, 1048576\) over storage '0' \(1 elements\) would bring .* over its cap",
                 id="huge-expand"),
])
def test_inconsistent_tensor_records_are_rejected(tmp_path, tensor, records, message):
    path = zip_checkpoint(tmp_path / "bad.pth", pkl_dict({"w": tensor}), records)
    with pytest.raises(CheckpointFormatError, match=message) as err:
        load_torch_state(path)
    assert str(path) in str(err.value)


def test_archive_folder_name_does_not_matter(tmp_path):
    src = FIXTURES / "zylo117_bare.pth"
    dst = tmp_path / "renamed.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr("another-folder/" + info.filename.split("/", 1)[1], zin.read(info))
    want = load_torch_state(src)
    got = load_torch_state(dst)
    assert list(got) == list(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)


# --- the legacy (PyTorch 0.4 - 1.5) stream format ---

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def test_legacy_format_is_read_exactly():
    path = FIXTURES / "legacy_format.pth"
    assert not zipfile.is_zipfile(path)
    got = dict(tree_arrays(load_torch_pickle(path)))
    want = expected_arrays("legacy_format.pth")
    assert sorted(got) == sorted(want) == ["state_dict/bn.num_batches_tracked", "state_dict/conv.weight"]
    for key in want:
        assert_same(got[key], want[key], key)
    state = load_torch_state(path)
    assert list(state) == ["conv.weight", "bn.num_batches_tracked"] and int(state["bn.num_batches_tracked"]) == 5


def _legacy_pid_tensor(storage_type: str, key: str, numel: int, offset: int, size, stride, view=None) -> bytes:
    """A tensor record whose persistent id has the legacy 6th field (None or (view key, offset, size))."""
    view_bytes = (pickle.NONE if view is None
                  else pickle.MARK + pkl_str(view[0]) + pkl_int(view[1]) + pkl_int(view[2]) + pickle.TUPLE)
    storage = (pickle.MARK + pkl_str("storage") + pickle.GLOBAL + b"torch\n" + storage_type.encode() + b"\n"
               + pkl_str(key) + pkl_str("cuda:0") + pkl_int(numel) + view_bytes + pickle.TUPLE + pickle.BINPERSID)
    hooks = pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE
    return (pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n" + pickle.MARK + storage + pkl_int(offset)
            + pkl_ints(size) + pkl_ints(stride) + pickle.NEWFALSE + hooks + pickle.TUPLE + pickle.REDUCE)


def _legacy_file(path: Path, main: bytes, records: list[tuple[str, int, bytes]]) -> Path:
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(LEGACY_MAGIC, protocol=2), pickle.dumps(1001, protocol=2), pickle.dumps(sys_info, protocol=2),
             main, pickle.dumps([key for key, _, _ in records], protocol=2)]
    parts += [struct.pack("<q", numel) + raw for _, numel, raw in records]
    path.write_bytes(b"".join(parts))
    return path


def test_legacy_storage_views_and_shared_storages(tmp_path):
    root = np.arange(8, dtype=np.float32) * 1.5
    ints = np.array([3, -4], dtype=np.int64)
    main = pkl_dict({
        "whole": _legacy_pid_tensor("FloatStorage", "140", 8, 0, (2, 4), (4, 1)),
        "whole_t": _legacy_pid_tensor("FloatStorage", "140", 8, 0, (4, 2), (1, 4)),
        "view": _legacy_pid_tensor("FloatStorage", "140", 8, 1, (2,), (1,), view=("150", 2, 3)),
        "ints": _legacy_pid_tensor("LongStorage", "160", 2, 0, (2,), (1,)),
    })
    path = _legacy_file(tmp_path / "views.pth", main, [("160", 2, ints.tobytes()), ("140", 8, root.tobytes())])
    got = load_torch_state(path)
    np.testing.assert_array_equal(got["whole"], root.reshape(2, 4))
    np.testing.assert_array_equal(got["whole_t"], root.reshape(2, 4).T)
    np.testing.assert_array_equal(got["view"], root[3:5])
    np.testing.assert_array_equal(got["ints"], ints)
    assert got["ints"].dtype == np.int64


def test_legacy_file_with_a_forbidden_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    main = pickle.dumps({"state_dict": {"w": _CallOnLoad(os.system, f"touch {marker}")}}, protocol=2)
    path = _legacy_file(tmp_path / "evil_legacy.pth", main, [])
    with pytest.raises(UnsafeCheckpointError) as err:
        load_torch_pickle(path)
    assert err.value.global_name == f"{os.system.__module__}.system"
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("cut, message", [
    (300, "truncated or corrupt legacy checkpoint \\(main pickle"),
    (470, "truncated or corrupt legacy checkpoint \\(storage key list"),
    (540, "truncated legacy checkpoint \\(storage record '93857268637104' has 1 of 8 bytes"),
])
def test_truncated_legacy_files_give_clear_errors(tmp_path, cut, message):
    path = tmp_path / "cut.pth"
    path.write_bytes((FIXTURES / "legacy_format.pth").read_bytes()[:cut])
    with pytest.raises(CheckpointFormatError, match=message) as err:
        load_torch_state(path)
    assert str(path) in str(err.value)


def test_inconsistent_legacy_records_are_rejected(tmp_path):
    main = pkl_dict({"w": _legacy_pid_tensor("FloatStorage", "140", 4, 0, (4,), (1,))})
    wrong_count = _legacy_file(tmp_path / "count.pth", main, [("140", 3, bytes(12))])
    with pytest.raises(CheckpointFormatError, match="holds 3 elements, the checkpoint expects 4"):
        load_torch_state(wrong_count)
    stray = _legacy_file(tmp_path / "stray.pth", main, [("140", 4, bytes(16)), ("999", 1, bytes(4))])
    with pytest.raises(CheckpointFormatError, match="'999' is not referred to"):
        load_torch_state(stray)
    outside = pkl_dict({"w": _legacy_pid_tensor("FloatStorage", "140", 4, 0, (2,), (1,), view=("1", 3, 2))})
    with pytest.raises(CheckpointFormatError, match="lies outside storage '140'"):
        load_torch_state(_legacy_file(tmp_path / "view.pth", outside, [("140", 4, bytes(16))]))


def test_pre_0_4_tar_checkpoints_are_rejected_with_how_to_resave(tmp_path):
    import tarfile

    path = tmp_path / "ancient.pth"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("sys_info")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"\x80\x02N."))
    with pytest.raises(LegacyCheckpointError) as err:
        load_torch_pickle(path)
    assert str(path) in str(err.value) and "_use_new_zipfile_serialization=True" in str(err.value)


# --- what a file may make the reader do: allocate within a cap, change nothing shared, nest within a limit ---

def test_expanded_tensors_are_capped_relative_to_the_file(tmp_path):
    """Two stride-0 tensors of 128 MiB each over a 4-byte storage: refused before either is allocated."""
    big = pkl_tensor("FloatStorage", "0", 1, 0, (1 << 15, 1 << 10), (0, 0))
    path = zip_checkpoint(tmp_path / "expand.pth", pkl_dict({"a": big, "b": big}), {"0": bytes(4)})
    assert path.stat().st_size < 1000
    assert _peak_while_refused(path, r"a tensor of size \(32768, 1024\) over storage '0' \(1 elements\) would "
                                     r"bring what reading this checkpoint allocates to 1342\d{5} bytes, over its cap "
                                     r"of 167\d{5} \(8 x the file size \+ 16 MiB") < 8 << 20


def _peak_while_refused(path, pattern: str) -> int:
    """Peak Python memory while ``path`` is read and refused with ``<path>: <pattern>``."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointFormatError, match=rf"^{re.escape(str(path))}: {pattern}"):
            load_torch_pickle(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _deflated_zeros(zf: zipfile.ZipFile, name: str, mib: int) -> None:
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zf.open(info, "w") as out:
        for _ in range(mib):
            out.write(bytes(1 << 20))


@pytest.mark.parametrize("bomb", ["storage", "data.pkl"])
def test_zip_bomb_is_refused_before_inflating(tmp_path, bomb):
    path = tmp_path / "bomb.pth"
    numel = 256 << 18  # 256 MiB of float32
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        if bomb == "storage":
            zf.writestr("b/data.pkl", pkl_dict({"w": pkl_tensor("FloatStorage", "0", numel, 0, (numel,), (1,))}))
            _deflated_zeros(zf, "b/data/0", 256)
        else:
            _deflated_zeros(zf, "b/data.pkl", 256)
    assert path.stat().st_size < 1 << 20
    record = "b/data/0" if bomb == "storage" else "b/data.pkl"
    assert _peak_while_refused(path, rf"record {record} \(268435456 bytes uncompressed\) would bring .* over its "
                                     r"cap") < 8 << 20


def test_absolute_cap_holds_for_any_file_size(tmp_path, monkeypatch):
    path = write_torch_state(tmp_path / "w.pth", {"w": np.ones((1 << 19,), np.float32)})  # 2 MiB
    assert load_torch_state(path)["w"].shape == (1 << 19,)
    monkeypatch.setattr(torch_reader, "_MAX_BUDGET", 3 << 20)  # the file itself (2 MiB) fits, its copy does not
    with pytest.raises(CheckpointFormatError, match=r"over its cap of 3145728 \(8 x the file size \+ 16 MiB, "
                                                    r"at most 3 MiB\)"):
        load_torch_state(path)


def _allow_list_state() -> dict:
    """Everything a BUILD could change on the allow-listed objects."""
    out = {}
    for key, obj in torch_reader._ALLOWED_GLOBALS.items():
        if isinstance(obj, type):
            out[key] = sorted(vars(obj))
        else:
            out[key] = (dict(getattr(obj, "__dict__", {})), getattr(obj, "__defaults__", None),
                        getattr(obj, "__kwdefaults__", None))
    return out


@pytest.mark.parametrize("state", [
    pkl_dict_body := (pickle.EMPTY_DICT + pkl_str("dtype") + pkl_str("float64") + pickle.SETITEM),
    pickle.NONE + pickle.EMPTY_DICT + pkl_str("__defaults__") + pkl_ints([7]) + pickle.SETITEM + pickle.TUPLE2,
], ids=["dict-state", "slot-state"])
@pytest.mark.parametrize("module, name", sorted(torch_reader._ALLOWED_GLOBALS))
def test_build_on_an_allowed_global_is_refused_and_changes_nothing(tmp_path, module, name, state):
    before = _allow_list_state()
    payload = (pickle.PROTO + b"\x02" + pickle.GLOBAL + f"{module}\n{name}\n".encode() + state + pickle.BUILD
               + pickle.STOP)
    with pytest.raises(CheckpointFormatError, match=rf"^{re.escape(str(tmp_path))}.*build\.pth: "):
        load_torch_pickle(zip_checkpoint(tmp_path / "build.pth", payload))
    assert _allow_list_state() == before
    assert torch_reader._ALLOWED_GLOBALS[("torch", "FloatStorage")].dtype == "float32"
    values = np.arange(4, dtype=np.float32)
    got = load_torch_state(write_torch_state(tmp_path / "after.pth", {"w": values}))["w"]
    assert got.dtype == np.float32 and np.array_equal(got, values)


def test_build_on_a_storage_type_names_it(tmp_path):
    payload = (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"torch\nFloatStorage\n" + pkl_dict_body + pickle.BUILD
               + pickle.STOP)
    with pytest.raises(CheckpointFormatError, match=r"the pickle tries to modify the allow-listed global "
                                                    r"_StorageType\(name='FloatStorage'.*\(BUILD\)"):
        load_torch_pickle(zip_checkpoint(tmp_path / "build.pth", payload))


DEPTH = 200_000


@pytest.mark.parametrize("payload", [
    pickle.PROTO + b"\x02" + pickle.EMPTY_LIST * DEPTH + pickle.APPEND * (DEPTH - 1) + pickle.STOP,
    pickle.PROTO + b"\x02" + pickle.MARK * DEPTH + pickle.TUPLE * DEPTH + pickle.STOP,
    pickle.PROTO + b"\x02" + (pickle.EMPTY_DICT + pkl_str("k")) * DEPTH + pickle.EMPTY_DICT + pickle.SETITEM * DEPTH
    + pickle.STOP,
], ids=["list", "tuple", "dict"])
def test_deep_nesting_is_the_readers_own_error(tmp_path, payload):
    path = zip_checkpoint(tmp_path / "deep.pth", payload)
    for load in (load_torch_pickle, load_torch_state):
        with pytest.raises(CheckpointFormatError, match=rf"^{re.escape(str(path))}: containers nested deeper than "
                                                        r"100 levels, not a checkpoint PyTorch writes$"):
            load(path)


def _nested(depth: int) -> dict:
    tree: dict = {"w": 1.0}
    for _ in range(depth - 1):
        tree = {"k": tree}
    return tree


def test_nesting_limit_is_exact_and_counts_shared_containers_once(tmp_path):
    assert load_torch_pickle(zip_checkpoint(tmp_path / "a.pth", pickle.dumps(_nested(100), protocol=2)))
    with pytest.raises(CheckpointFormatError, match="nested deeper than 100 levels"):
        load_torch_pickle(zip_checkpoint(tmp_path / "b.pth", pickle.dumps(_nested(101), protocol=2)))
    # each chain link is also a direct child of the root: only the longest path finds the depth
    links = [[] for _ in range(101)]
    for a, b in zip(links, links[1:]):
        a.append(b)
    with pytest.raises(CheckpointFormatError, match="nested deeper than 100 levels"):
        load_torch_pickle(zip_checkpoint(tmp_path / "c.pth", pickle.dumps(links[::-1], protocol=2)))
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(CheckpointFormatError, match="a container in the checkpoint contains itself"):
        load_torch_pickle(zip_checkpoint(tmp_path / "d.pth", pickle.dumps(cycle, protocol=2)))
