"""Fixtures every test gets, and shared test helpers."""
from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _graph_mode_by_default():
    """Tests and fixtures run in graph mode, the pipeline's (``runtime.graph_mode: true``)."""
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture(autouse=True)
def _graph_mode_after_each_test():
    """Whatever a test switches to, the next one starts in graph mode again: no module-level
    ``set_context`` and no leaked mode (one once broke a later module's gradient check)."""
    yield
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture
def pynative():
    """Run this test in PyNative mode (a few forward passes are cheaper than compiling them)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCE_LISTINGS = {
    "d0": FIXTURES / "reference" / "efficientdet_d0.state_dict.txt",
    "nanodet": FIXTURES / "reference" / "nanodet_plus_m_320.state_dict.txt",
    "torchvision_shufflenet_v2_x1_0": FIXTURES / "reference" / "torchvision_shufflenet_v2_x1_0.state_dict.txt",
}


def official_state_dict(model: str) -> dict[str, tuple]:
    """Official PyTorch state-dict listing (tests/fixtures/reference, from the official code): key -> (shape, dtype)."""
    out = {}
    for line in REFERENCE_LISTINGS[model].read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        out[key] = (tuple(int(v) for v in shape.strip("()").split(",") if v.strip()), dtype)
    return out


# --- torch.save files assembled by hand (no torch): the zip format's data.pkl plus one record per storage ---

def zip_checkpoint(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None,
                   byteorder: str | None = "little") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("some_name/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr("some_name/byteorder", byteorder)
        for key, raw in (records or {}).items():
            zf.writestr(f"some_name/data/{key}", raw)
        zf.writestr("some_name/version", "3\n")
    return path


def pkl_str(text: str) -> bytes:
    b = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def pkl_int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def pkl_ints(values) -> bytes:
    return pickle.MARK + b"".join(pkl_int(v) for v in values) + pickle.TUPLE


def pkl_tensor(storage_type: str, key: str, numel: int, offset: int, size, stride) -> bytes:
    storage = (pickle.MARK + pkl_str("storage") + pickle.GLOBAL + b"torch\n" + storage_type.encode() + b"\n"
               + pkl_str(key) + pkl_str("cpu") + pkl_int(numel) + pickle.TUPLE + pickle.BINPERSID)
    hooks = pickle.GLOBAL + b"collections\nOrderedDict\n" + pickle.EMPTY_TUPLE + pickle.REDUCE
    return (pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n" + pickle.MARK + storage + pkl_int(offset)
            + pkl_ints(size) + pkl_ints(stride) + pickle.NEWFALSE + hooks + pickle.TUPLE + pickle.REDUCE)


def pkl_dict(entries: dict[str, bytes]) -> bytes:
    body = b"".join(pkl_str(k) + v for k, v in entries.items())
    return pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK + body + pickle.SETITEMS + pickle.STOP


def write_torch_state(path: Path, state: dict[str, np.ndarray]) -> Path:
    """A zip-format ``torch.save`` file holding the flat state dict ``state`` (float32 / int64 tensors)."""
    types = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}
    entries, records = {}, {}
    for k, (key, value) in enumerate(state.items()):
        value = np.ascontiguousarray(value)
        strides = [int(np.prod(value.shape[i + 1:])) for i in range(value.ndim)]
        entries[key] = pkl_tensor(types[value.dtype], str(k), max(value.size, 1), 0, value.shape, strides)
        records[str(k)] = value.astype(value.dtype.newbyteorder("<")).tobytes()
    return zip_checkpoint(path, pkl_dict(entries), records)
