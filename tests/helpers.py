"""Helpers shared by test modules (test modules do not import each other): hand-built PyTorch files and
official state-dict listings, and the toy detector the engine tests train."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import cv2
import mindspore as ms
import mindspore.dataset as mds
import numpy as np
import yaml
from mindspore import Tensor, nn, ops

from msdet import train_ops
from msdet.config import CPU_KERNELS, Params, load_params
from msdet.engine.live import SERIES_DIR
from msdet.engine.trainer import TrainData
from msdet.export.verify import Postprocess, Tolerances
from msdet.models.layers import batch_norm2d, drop_connect

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REFERENCE_LISTINGS = {
    "d0": FIXTURES / "reference" / "efficientdet_d0.state_dict.txt",
    "nanodet": FIXTURES / "reference" / "nanodet_plus_m_320.state_dict.txt",
    "torchvision_shufflenet_v2_x1_0": FIXTURES / "reference" / "torchvision_shufflenet_v2_x1_0.state_dict.txt",
}


_PARAMS: dict[str, Params] = {}


def project_params(profile: str = "default") -> Params:
    """The project's params.yaml ("coco": with params_coco.yaml on top): the one source of test configs too."""
    if profile not in _PARAMS:
        overlay = {"default": None, "coco": ROOT / "params_coco.yaml"}[profile]
        _PARAMS[profile] = load_params(ROOT / "params.yaml", overlay=overlay)
    return _PARAMS[profile]


@contextlib.contextmanager
def kernels_on(*modules):
    """The C++ kernels of ``modules`` (``msdet.kernels.depthwise_conv`` ...) switched on, their replacements
    installed (msdet.train_ops), for the block; each switch and the installed replacements restored after (the
    libraries are compiled once, in the user's cache)."""
    saved = [(m.LIBRARY.path, m.LIBRARY.on) for m in modules]
    installed = train_ops.snapshot()
    assert all(m.LIBRARY.enable(True) for m in modules)
    for m in sorted(modules, key=lambda m: CPU_KERNELS.index(m.LIBRARY.name)):  # msdet.kernels.layer's order
        train_ops.install(m.LIBRARY.name, m.REPLACEMENTS)
    try:
        yield
    finally:
        train_ops.restore(installed)
        for m, (path, on) in zip(modules, saved):
            m.LIBRARY.path, m.LIBRARY.on = path, on


def kernels_if(on: bool, *modules):
    """``kernels_on(*modules)`` if ``on``, else ``kernels_off()``."""
    return kernels_on(*modules) if on else kernels_off()


@contextlib.contextmanager
def kernels_off():
    """No kernel replacement installed for the block (restored after)."""
    installed = train_ops.snapshot()
    train_ops.clear()
    try:
        yield
    finally:
        train_ops.restore(installed)


def conv_pads(size: int, k: int, stride: int, same: bool) -> tuple[int, int]:
    """(before, after) padding of a k x k conv along one axis: TF "same" (the extra pixel after), else (k - 1) / 2."""
    if not same:
        return (k - 1) // 2, (k - 1) // 2
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv_output_and_grads(cell, x, dy):
    """A conv cell's training-mode output and the gradients of ``sum(cell(x) * dy)`` for x and its weight, compiled
    as one graph (the kernel tests' way to compare a conv kernel with MindSpore's and a reference)."""
    cell.set_train(True)

    def loss(inputs):
        return (cell(inputs) * Tensor(dy)).sum()

    out = cell(Tensor(x)).asnumpy()
    _, (gx, grads) = ms.jit(ms.value_and_grad(loss, 0, cell.trainable_params()))(Tensor(x))
    return out, gx.asnumpy(), grads[0].asnumpy()


class Weighted(nn.Cell):
    """sum(dy * cell(*inputs)): its gradient with respect to each input is that input's vector-Jacobian product
    with dy (the kernel tests' way to check a backward pass against a reference)."""

    def __init__(self, cell, dy):
        super().__init__()
        self.cell, self.dy = cell, Tensor(dy)

    def construct(self, *inputs):
        return (self.cell(*inputs) * self.dy).sum()


def config(section: str, profile: str = "default", **changes):
    """The params block at dotted ``section`` ("d0", "nanodet.augment", "data.synthetic", ...) with ``changes``."""
    block = project_params(profile)
    for name in section.split("."):
        block = getattr(block, name)
    return dataclasses.replace(block, **changes)


def write_params(path: str | Path, overrides: dict | None = None) -> Path:
    """A full params file: the project's params.yaml with ``overrides`` (nested dict) merged on top."""
    import yaml

    from msdet.config import merge

    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides or {})
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))
    return Path(path)


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
        self.bn = batch_norm2d(4, 1e-5, 0.9)  # the fused C++ op when msdet.kernels.batch_norm is on
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

    def weights_meta(self):
        return {}


def toy_data(n=32, batch=4, seed=0, kill_at=None, inf_at=None):
    """``kill_at`` (epoch, batch): the data loader raises KeyboardInterrupt there, as a killed process stops.
    ``inf_at`` (epoch, batch): that batch's target boxes are infinite, so the loss (not the forward pass) is."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 3, 16, 16)).astype(np.float32)
    boxes = np.zeros((n, 2, 4), np.float32)
    boxes[:, 0] = images[:, :, :4, :4].mean(axis=(1, 2))[:, :4] * 16 + 16  # learnable from pixels
    labels = np.full((n, 2), -1, np.int32)
    labels[:, 0] = 1

    def make(epoch):
        order = np.random.default_rng(seed * 1000 + epoch).permutation(n)
        epoch_boxes = boxes[order]
        if inf_at is not None and inf_at[0] == epoch:
            epoch_boxes[inf_at[1] * batch:(inf_at[1] + 1) * batch, 0] = np.inf
        ds = mds.NumpySlicesDataset((images[order], epoch_boxes, labels[order]),
                                    column_names=["image", "gt_boxes", "gt_labels"], shuffle=False)
        ds = ds.batch(batch, drop_remainder=True)
        return Killed(ds, kill_at[1]) if kill_at is not None and kill_at[0] == epoch else ds

    return TrainData(make_dataset=make, num_train_images=n)


def detector_data(n: int, size: int, batch: int = 4, num_classes: int = 3, max_boxes: int = 8, seed: int = 0):
    """``n`` images of ``size`` px for a whole detector: 1-3 brighter boxes of random classes on noise, in a
    fixed order (the same batches every epoch)."""
    rng = np.random.default_rng(seed)
    images = (0.5 * rng.standard_normal((n, 3, size, size))).astype(np.float32)
    boxes = np.zeros((n, max_boxes, 4), np.float32)
    labels = np.full((n, max_boxes), -1, np.int32)
    for i in range(n):
        k = 1 + i % 3
        xy = rng.uniform(0, size * 0.6, (k, 2))
        boxes[i, :k] = np.concatenate([xy, np.minimum(xy + rng.uniform(size / 8, size * 0.4, (k, 2)), size)], 1)
        labels[i, :k] = rng.integers(0, num_classes, k)
        for x0, y0, x1, y1 in boxes[i, :k].astype(int):
            images[i, :, y0:y1, x0:x1] += 1.0 + labels[i, 0]

    def make(epoch):
        ds = mds.NumpySlicesDataset((images, boxes, labels), column_names=["image", "gt_boxes", "gt_labels"],
                                    shuffle=False)
        return ds.batch(batch, drop_remainder=True)

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
    """The toy engine's TrainConfig: params.yaml's d0.train with a short, fast schedule (no precise BN, no
    mid-epoch resume points unless a test asks)."""
    base = dict(epochs=3, batch_size=4, optimizer="adamw", lr=0.01, lr_reference_batch=4, warmup_steps=2,
                warmup_ratio=1e-3, min_lr_ratio=0.05, weight_decay=0.0, decay_norm_and_bias=False, grad_clip_norm=10.0,
                ema_decay=0.9, ema_ramp_steps=1.0, bn_recalibration_batches=0, checkpoint_every_steps=0)
    base.update(kw)
    return config("d0.train", **base)


def series_files(live):
    """{relative path: text} of the live series that a rerun must reproduce (timings excluded)."""
    root = live / SERIES_DIR
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*.tsv"))
            if p.name != "images_per_s.tsv"}


def random_official_state(model: str, num_classes: int, seed: int = 0) -> OrderedDict[str, np.ndarray]:
    """Every tensor of the official listing with random values of its shape and dtype, scaled so that a
    forward pass stays finite (conv weights ~ 1/sqrt(fan_in), positive running variances)."""
    rng = np.random.default_rng(seed)
    listing = official_state_dict(model)
    heads = {"classifier.header.pointwise_conv.conv.": 9 * num_classes, "head.gfl_cls.": num_classes + 32,
             "aux_head.gfl_cls.": num_classes}
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, (shape, dtype) in listing.items():
        rows = next((n for prefix, n in heads.items() if key.startswith(prefix)), None)
        if rows is not None:
            shape = (rows,) + shape[1:]
        if dtype == "int64":
            out[key] = np.asarray(rng.integers(0, 10**6), dtype=np.int64).reshape(shape)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(dtype)
        elif len(shape) == 4:
            out[key] = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(dtype)
        elif key.endswith(".weight") or "_w" in key.rsplit(".", 1)[-1]:
            out[key] = rng.uniform(0.5, 1.5, shape).astype(dtype)
        else:
            out[key] = (0.1 * rng.standard_normal(shape)).astype(dtype)
    return out


# ---------------------------------------------------------------- export/infer toys

TOY_STRIDE = 8
#: params.yaml's export tolerances and eval post-processing (D0's NMS IoU)
TOL = Tolerances(atol=1e-4, rtol=1e-3, box_atol_px=0.25, score_atol=1e-4)
POST = Postprocess(score_threshold=0.05, iou_threshold=0.5, max_detections=100, pre_nms_top_k=1000)


class ExportToyNet(nn.Cell):
    """Three stride-2 convs and a 1x1 head giving 4 distances + C logits per cell; ``aux`` is training-only."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.SequentialCell(
            nn.Conv2d(3, width, 3, stride=2, has_bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, has_bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, has_bias=True), nn.ReLU())
        self.head = nn.Conv2d(width, 4 + num_classes, 1, has_bias=True)
        self.aux = nn.Conv2d(width, 4, 1, has_bias=True)

    def construct(self, image):
        feat = self.stem(image)
        return self.head(feat), self.aux(feat)


class ExportToyInference(nn.Cell):
    """image -> (distances [B, A, 4] in input pixels, class probabilities [B, A, C])."""

    def __init__(self, net: ExportToyNet) -> None:
        super().__init__(auto_prefix=False)
        self.net = net

    def construct(self, image):
        out = self.net.head(self.net.stem(image))
        b, c = out.shape[0], out.shape[1]
        out = ops.reshape(ops.transpose(out, (0, 2, 3, 1)), (b, -1, c))
        return ops.relu(out[:, :, :4]) * TOY_STRIDE, ops.sigmoid(out[:, :, 4:])


class ExportToyDetector:
    """A tiny anchor-free detector implementing the parts of the Detector interface export/infer use."""

    loss_names = ("loss",)
    architecture = "toy"
    training_only_prefixes = ("aux.",)

    def __init__(self, input_size: int = 32, num_classes: int = 3, width: int = 8, name: str = "toy") -> None:
        self.name = name
        self.input_size = input_size
        self.num_classes = num_classes
        self.width = width
        g = input_size // TOY_STRIDE
        ys, xs = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
        self.points = ((np.stack([xs, ys], -1).reshape(-1, 2) + 0.5) * TOY_STRIDE).astype(np.float32)

    def build_network(self) -> ExportToyNet:
        net = ExportToyNet(self.num_classes, self.width)
        rng = np.random.default_rng(1)
        for p in net.get_parameters():  # deterministic weights with some spread in the outputs
            value = rng.normal(0.0, 0.3, p.shape)
            if "moving_variance" in p.name:
                value = np.abs(value) + 0.5
            p.set_data(ms.Tensor(value.astype(np.float32)))
        return net

    def inference_cell(self, network: ExportToyNet) -> ExportToyInference:
        return ExportToyInference(network)

    def weights_meta(self):
        return {}

    def use_weights_meta(self, meta, source):
        pass

    def decode(self, outputs):
        dist, scores = (np.asarray(o) for o in outputs[:2])
        if dist.shape[1] != len(self.points):
            raise ValueError(f"toy decode: {dist.shape[1]} points, expected {len(self.points)}")
        p = self.points[None]
        boxes = np.concatenate([p - dist[..., :2], p + dist[..., 2:]], -1)
        return np.clip(boxes, 0, self.input_size).astype(np.float32), scores.astype(np.float32)


def toy_preprocess(size: int):
    """Stretch to size x size, BGR scaled to [0, 1]: scale (sx, sy) = (S / w, S / h)."""
    import cv2

    def preprocess(image):
        h, w = image.shape[:2]
        x = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        return x.transpose(2, 0, 1), np.array([size / w, size / h], np.float32)

    return preprocess


class _WrappedExport(nn.Cell):
    """An injected export bug: computes something from the wrapped inference ``cell``."""

    def __init__(self, cell):
        super().__init__(auto_prefix=False)
        self.cell = cell


class ShiftedInput(_WrappedExport):
    """A padding bug: the exported graph sees the image moved one pixel right and down (zero padded)."""

    def construct(self, image):
        s = image.shape[-1]
        return self.cell(ops.pad(image, (1, 0, 1, 0))[:, :, :s, :s])


class SwappedSides(_WrappedExport):
    """A swapped output: the first two box channels exchanged."""

    def construct(self, image):
        out = self.cell(image)
        box = out[0]
        return (ops.concat((box[:, :, 1:2], box[:, :, 0:1], box[:, :, 2:]), axis=2),) + tuple(out[1:])


class ScaledBoxes(_WrappedExport):
    """A wrong constant (a stride, an anchor scale): the first output 1 % too large."""

    def construct(self, image):
        out = self.cell(image)
        if isinstance(out, tuple):
            return (out[0] * 1.01,) + out[1:]
        return out * 1.01


class SwappedOutputs(_WrappedExport):
    """Outputs in the wrong order: two outputs exchanged, or a single output's first 4 channels moved last
    (NanoDet: distance logits where the class scores belong)."""

    def construct(self, image):
        out = self.cell(image)
        if isinstance(out, tuple):
            return (out[1], out[0]) + out[2:]
        return ops.concat((out[..., 4:], out[..., :4]), axis=-1)


# ---------------------------------------------------------------- photos as users bring them

#: (width, height, suffix): camera and phone sizes, portrait and landscape, JPEG and PNG
PHOTO_SIZES = ((320, 240, ".jpg"), (4000, 3000, ".jpg"), (640, 480, ".png"), (1080, 1920, ".jpg"),
               (1024, 768, ".jpg"), (1600, 1200, ".png"), (800, 600, ".jpg"), (500, 500, ".png"))
PHOTO_COLORS = ((40, 40, 220), (40, 200, 40), (220, 90, 30))  # BGR, one per class


def write_photo_set(root: Path, names: list[str], split_sizes: dict[str, int], seed: int = 0) -> dict[str, int]:
    """A YOLO data set (``data.yaml``, ``images/<split>/``, ``labels/<split>/``) of photos whose sizes and
    formats cycle through :data:`PHOTO_SIZES`: a blocky textured background with 1-3 boxes filled in their
    class colour. Returns the boxes written per split."""
    rng = np.random.default_rng(seed)
    boxes, k = {}, 0
    for split, n in split_sizes.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        boxes[split] = 0
        for i in range(n):
            w, h, suffix = PHOTO_SIZES[k % len(PHOTO_SIZES)]
            k += 1
            blocks = rng.integers(70, 160, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            img = np.ascontiguousarray(blocks.repeat(16, 0).repeat(16, 1)[:h, :w])
            lines = []
            for _ in range(1 + i % 3):
                c = int(rng.integers(len(names)))
                bw, bh = int(w * rng.uniform(0.15, 0.4)), int(h * rng.uniform(0.15, 0.4))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                img[y:y + bh, x:x + bw] = PHOTO_COLORS[c]
                lines.append(f"{c} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}\n")
            stem = f"{split}_{i:03d}"
            assert cv2.imwrite(str(root / "images" / split / f"{stem}{suffix}"), img)
            (root / "labels" / split / f"{stem}.txt").write_text("".join(lines))
            boxes[split] += len(lines)
    (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val",
                                                    "names": dict(enumerate(names))}))
    return boxes


# ---------------------------------------------------------------- throw-away DVC repos (end-to-end tests)

GENERATED = ("metrics/", "plots/", "models/", "data/", "logs/", "dvclive/", "dvc.lock")


def project_files() -> list[str]:
    """The checkout's source files (tracked or new, not ignored), without what the pipeline generates."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout.split()
    return [f for f in out if (ROOT / f).is_file() and not f.startswith(GENERATED)]


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    """``cmd``'s stdout; a failure shows the ends of both streams."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def throwaway_repo(dst: Path, overrides: dict) -> tuple[Path, dict]:
    """A git + DVC copy of the project at ``dst`` with params.yaml merged with ``overrides``, committed;
    returns it and the environment to run dvc in (this interpreter's venv first on PATH)."""
    for rel in project_files():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    write_params(dst / "params.yaml", overrides)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               DVC_NO_ANALYTICS="1")
    run(["git", "init", "-q"], dst, env)
    run(["git", "add", "-A"], dst, env)
    run(["git", "commit", "-qm", "init"], dst, env)
    return dst, env
