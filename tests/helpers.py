"""Helpers shared by test modules (test modules do not import each other): hand-built PyTorch files and
official state-dict listings, and the toy detector the engine tests train."""
from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import mindspore as ms
import mindspore.dataset as mds
import numpy as np
from mindspore import Tensor, nn, ops

from msdet.config import TrainConfig
from msdet.engine.live import SERIES_DIR
from msdet.engine.trainer import TrainData
from msdet.models.layers import drop_connect

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


class ToyNet(nn.Cell):
    def __init__(self, drop_connect_rate=0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, has_bias=False)
        self.bn = nn.BatchNorm2d(4, momentum=0.9)
        self.fc = nn.Dense(4, 4)
        self.scale = ms.Parameter(Tensor(1.0, ms.float32), name="scale")  # 0-d, like NanoDet's Scale
        self.drop_connect_rate = drop_connect_rate

    def construct(self, x):
        x = ops.relu(self.bn(self.conv(x)))
        if self.training and self.drop_connect_rate > 0:  # draws from the global RNG, as D0's drop-connect
            x = drop_connect(x, self.drop_connect_rate)
        return self.fc(x.mean(axis=(2, 3))) * self.scale


class ToyLoss(nn.Cell):
    """Regress the first GT box (scaled) from the image; a second component counts valid GT."""

    def __init__(self, net, scale=1.0):
        super().__init__()
        self.net = net
        self.scale = scale

    def construct(self, image, gt_boxes, gt_labels, epoch):
        pred = self.net(image)
        target = gt_boxes[:, 0, :] / 32.0
        mse = ((pred - target) ** 2).mean() * self.scale
        valid = (gt_labels >= 0).astype(ms.float32).sum()
        return mse, ops.stack([mse, mse * 0.0 + valid])


class ToyDetector:
    name = "toy"
    loss_names = ("loss", "valid")

    def __init__(self, scale=1.0):
        self.scale = scale

    def loss_cell(self, network, group_size=1):
        return ToyLoss(network, self.scale)


def toy_data(n=32, batch=4, seed=0, kill_at=None):
    """``kill_at`` (epoch, batch): the data loader raises KeyboardInterrupt there, as a killed process stops."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 3, 16, 16)).astype(np.float32)
    boxes = np.zeros((n, 2, 4), np.float32)
    boxes[:, 0] = images[:, :, :4, :4].mean(axis=(1, 2))[:, :4] * 16 + 16  # learnable from pixels
    labels = np.full((n, 2), -1, np.int32)
    labels[:, 0] = 1

    def make(epoch):
        order = np.random.default_rng(seed * 1000 + epoch).permutation(n)
        ds = mds.NumpySlicesDataset((images[order], boxes[order], labels[order]),
                                    column_names=["image", "gt_boxes", "gt_labels"], shuffle=False)
        ds = ds.batch(batch, drop_remainder=True)
        return Killed(ds, kill_at[1]) if kill_at is not None and kill_at[0] == epoch else ds

    return TrainData(make_dataset=make, num_train_images=n)


class Killed:
    """A dataset whose iterator stops the process (KeyboardInterrupt) before batch ``at``."""

    def __init__(self, ds, at):
        self.ds, self.at = ds, at

    def create_tuple_iterator(self, num_epochs=1):
        for i, batch in enumerate(self.ds.create_tuple_iterator(num_epochs=num_epochs)):
            if i == self.at:
                raise KeyboardInterrupt
            yield batch


def cfg(**kw):
    base = dict(epochs=3, batch_size=4, optimizer="adamw", lr=0.01, lr_reference_batch=4, warmup_steps=2,
                weight_decay=0.0, grad_clip_norm=10.0, ema_decay=0.9, ema_ramp_steps=1.0)
    base.update(kw)
    return TrainConfig(**base)


def series_files(live):
    """{relative path: text} of the live series that a rerun must reproduce (timings excluded)."""
    root = live / SERIES_DIR
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.tsv"))
            if p.name != "images_per_s.tsv"}
