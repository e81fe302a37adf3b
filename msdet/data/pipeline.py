"""mindspore.dataset input pipelines over the MindRecord files (see msdet/data/mindrecord.py).

Train: MindDataset -> Python map (cv2 decode + model transform + ground-truth padding) -> batch
(drop_remainder). Eval: MindDataset in file order -> Python map -> batch (the last batch may be partial).

Reproducibility does not depend on MindSpore's random state or on worker scheduling: the sample order
of an epoch is a permutation drawn from (seed, epoch) and handed to MindDataset as an explicit
``SubsetSampler``; each rank takes every ``group_size``-th position of it (so ranks see disjoint images,
the same number each, the tail that does not divide evenly is left out this epoch); every sample's
augmentation uses its own Generator seeded with (seed, epoch, image_id). A resumed run therefore gets the
same batches as an uninterrupted one, whatever ``num_workers``.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    import mindspore.dataset

from msdet.config import D0AugmentConfig, NanoDetAugmentConfig
from msdet.data import transforms as T
from msdet.data.meta import gt_rows, mindrecord_files
from msdet.errors import UserError

log = logging.getLogger(__name__)

MODELS = ("d0", "nanodet")
#: Columns the pipelines read from the MindRecord schema.
_TRAIN_READ = ["image", "image_id", "height", "width", "boxes", "labels"]
_EVAL_READ = ["image", "image_id", "height", "width"]
TRAIN_COLUMNS = ["image", "gt_boxes", "gt_labels"]
EVAL_COLUMNS = ["image", "image_id", "scale", "orig_size"]
# Last seed word: keeps the per-sample and the epoch-order random streams apart.
_SAMPLE_STREAM, _ORDER_STREAM = 0, 1


# --------------------------------------------------------------------------------------------------
# files


def usable_workers(requested: int, local_ranks: int = 1, cores: int | None = None) -> int:
    """Map workers of one of ``local_ranks`` processes on this host: at most ``requested``, at most its share
    of the ``cores`` this process may run on (default: its CPU affinity), at least one. MindSpore refuses more
    map workers than cores, and ranks that each start their full count oversubscribe the host."""
    cores = len(os.sched_getaffinity(0)) if cores is None else cores
    return max(1, min(int(requested), cores // max(1, int(local_ranks))))


def check_shard(path: str | Path, split: str) -> None:
    """Refuse a MindRecord shard shorter than the pages its header lists, naming it: MindSpore only notices
    mid-epoch, with "Failed to read file" and no file name. Reads the header alone.

    Layout (MindSpore's shard writer): an 8-byte little-endian header length and the JSON header, padded to
    ``header_size``; then page ``i`` at ``header_size + i * page_size``, the last one cut to its used size.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if not 0 < length <= size - 8:
                raise ValueError(f"header length {length}")
            header = json.loads(fh.read(length))
        page_size, pages = int(header["page_size"]), header["page"]
        need = int(header["header_size"]) + max((int(p["page_id"]) * page_size + int(p["page_size"]) for p in pages),
                                                default=0)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a MindRecord shard of the {split} split (unreadable header: "
                        f"{type(exc).__name__}); rerun the mindrecord stage") from exc
    if size < need:
        raise UserError(f"{path}: truncated MindRecord shard of the {split} split ({size} bytes, its header "
                        f"lists pages up to byte {need}); rerun the mindrecord stage")


def shard_files(mindrecord_dir: str | Path, split: str) -> list[str]:
    """The shard files of ``split`` for ``MindDataset``, each checked by :func:`check_shard`."""
    files = mindrecord_files(mindrecord_dir, split)
    for f in files:
        check_shard(f, split)
    return [str(f) for f in files]


def num_samples(mindrecord_dir: str | Path, split: str) -> int:
    """Number of images in ``split`` (all shards)."""
    import mindspore.dataset as ds

    files = shard_files(mindrecord_dir, split)
    return int(ds.MindDataset(files, columns_list=["image_id"], shuffle=False).get_dataset_size())


def resolve_max_gt_boxes(pinned: int, mindrecord_dir: str | Path) -> int:
    """Ground-truth rows per training image: ``pinned`` (> 0), else derived from the converted training
    split (:func:`msdet.data.meta.gt_rows`), as the MindRecord stage reports in metrics/data.json."""
    if pinned > 0:
        return int(pinned)
    from msdet.data.mindrecord import max_boxes_per_image

    shard_files(mindrecord_dir, "train")
    return gt_rows(0, max_boxes_per_image(mindrecord_dir, "train"))


def decode_image(data: np.ndarray, image_id: Any, height: Any, width: Any, source: str) -> np.ndarray:
    """Encoded bytes (bytes, 0-d bytes array or uint8 array) -> HxWx3 uint8 BGR, checked against the
    record's size; a clear error names the record when decoding fails."""
    if isinstance(data, np.ndarray) and data.dtype.kind == "S":  # MindSpore hands bytes columns as 0-d |S
        data = data.item()
    if isinstance(data, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(data, dtype=np.uint8)
    else:
        buf = np.asarray(data, dtype=np.uint8).reshape(-1)
    # Stored pixel order, EXIF orientation ignored: COCO sizes and boxes refer to the raw frame.
    image = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if buf.size else None
    if image is None:
        raise ValueError(f"{source}: image_id {int(image_id)}: the stored image bytes ({buf.size} B) "
                         f"cannot be decoded as an image")
    if image.shape[:2] != (int(height), int(width)):
        raise ValueError(f"{source}: image_id {int(image_id)}: decoded image is {image.shape[0]}x{image.shape[1]} "
                         f"(h x w) but the record says {int(height)}x{int(width)}")
    return image


def sample_rng(seed: int, epoch: int, image_id: int) -> np.random.Generator:
    """Augmentation randomness of one sample in one epoch, independent of order and worker."""
    if image_id < 0:
        raise ValueError(f"image_id must be non-negative to seed augmentation, got {image_id}")
    return np.random.default_rng([int(seed), int(epoch), int(image_id), _SAMPLE_STREAM])


def epoch_order(n: int, seed: int, epoch: int, rank: int, group_size: int, shuffle: bool) -> np.ndarray:
    """Sample indices this rank reads in ``epoch``: a (seed, epoch) permutation, every group_size-th entry."""
    if not 0 <= rank < group_size:
        raise ValueError(f"rank {rank} is outside group_size {group_size}")
    order = np.random.default_rng([int(seed), int(epoch), 0, _ORDER_STREAM]).permutation(n) if shuffle else np.arange(n)
    per_rank = n // group_size
    return order[: per_rank * group_size][rank::group_size]


# --------------------------------------------------------------------------------------------------
# per-sample map functions (module-level classes: picklable for python_multiprocessing)


class TrainSampleMap:
    """(image bytes, image_id, height, width, boxes, labels) -> (image [3,S,S], gt_boxes [M,4], gt_labels [M])."""

    def __init__(self, model: str, input_size: int, augment_cfg: Any, max_gt_boxes: int, seed: int,
                 epoch: int, source: str) -> None:
        self.model, self.input_size, self.cfg = model, int(input_size), augment_cfg
        self.max_gt_boxes, self.seed, self.epoch, self.source = int(max_gt_boxes), int(seed), int(epoch), source
        self.truncated_images = 0
        self.truncated_boxes = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __call__(self, image: np.ndarray, image_id: np.ndarray, height: np.ndarray, width: np.ndarray,
                 boxes: np.ndarray, labels: np.ndarray):
        iid = int(image_id)
        img = decode_image(image, iid, height, width, self.source)
        rng = sample_rng(self.seed, self.epoch, iid)
        try:
            transform = T.d0_train if self.model == "d0" else T.nanodet_train
            sample = transform(img, boxes, labels, self.input_size, self.cfg, rng)
        except ValueError as exc:
            raise ValueError(f"{self.source}: image_id {iid}: {exc}") from exc
        gt_boxes, gt_labels, dropped = T.pad_gt(sample.boxes, sample.labels, self.max_gt_boxes)
        if dropped:
            self._count_truncation(iid, dropped, len(sample.boxes))
        return sample.image, gt_boxes, gt_labels

    def _count_truncation(self, image_id: int, dropped: int, total: int) -> None:
        with self._lock:
            first = self.truncated_images == 0
            self.truncated_images += 1
            self.truncated_boxes += dropped
        if first:
            log.warning("%s: image_id %d has %d boxes after augmentation, more than max_gt_boxes=%d; the %d "
                        "smallest are dropped (further truncations are counted, not logged)",
                        self.source, image_id, total, self.max_gt_boxes, dropped)


class EvalSampleMap:
    """(image bytes, image_id, height, width) -> (image [3,S,S], image_id, scale [2], orig_size [2] = (h, w))."""

    def __init__(self, model: str, input_size: int, source: str) -> None:
        self.model, self.input_size, self.source = model, int(input_size), source

    def __call__(self, image: np.ndarray, image_id: np.ndarray, height: np.ndarray, width: np.ndarray):
        img = decode_image(image, image_id, height, width, self.source)
        transform = T.d0_eval if self.model == "d0" else T.nanodet_eval
        sample = transform(img, self.input_size)
        orig_size = np.array(img.shape[:2], dtype=np.float32)
        return sample.image, np.asarray(image_id, dtype=np.int64), sample.scale, orig_size


# --------------------------------------------------------------------------------------------------
# datasets


def _check_model(model: str, augment_cfg: Any = None) -> None:
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    expected = D0AugmentConfig if model == "d0" else NanoDetAugmentConfig
    if augment_cfg is not None and not isinstance(augment_cfg, expected):
        raise TypeError(f"model {model!r} needs a {expected.__name__}, got {type(augment_cfg).__name__}")


def create_train_dataset(mindrecord_dir: str | Path, model: str, input_size: int, augment_cfg: Any,
                         batch_size: int, max_gt_boxes: int, num_workers: int, seed: int, rank: int = 0,
                         group_size: int = 1, shuffle: bool = True, epoch: int = 0,
                         python_multiprocessing: bool = False, skip_batches: int = 0,
                         local_ranks: int = 1) -> mindspore.dataset.Dataset:
    """Training batches of one epoch for this rank: columns image float32 [B,3,S,S], gt_boxes float32
    [B,M,4], gt_labels int32 [B,M] (see the module docstring for order and determinism).
    ``skip_batches`` leaves out the epoch's first batches at the sampler, without reading them (a resume
    inside an epoch); the batches after them are the same as in the whole epoch.

    The map runs in ``num_workers`` threads (cv2 releases the GIL), fewer when this host's ``local_ranks``
    training processes would oversubscribe its cores (:func:`usable_workers`); OpenCV's own thread pool is
    set to one thread, as the map's threads already use the cores. ``python_multiprocessing`` moves it
    to worker processes instead; measured here (2 cores, 256 px) that is only faster when other jobs load
    the machine (more processes take a larger share of the CPU), costs ~20 % more CPU per image and ~1 s
    of worker shutdown per epoch, so it is off by default. The batches are identical either way.
    """
    import mindspore.dataset as ds

    _check_model(model, augment_cfg)
    if batch_size < 1 or max_gt_boxes < 1 or num_workers < 1:
        raise ValueError(f"batch_size ({batch_size}), max_gt_boxes ({max_gt_boxes}) and num_workers "
                         f"({num_workers}) must be positive")
    files = shard_files(mindrecord_dir, "train")
    ds.config.set_seed(int(seed))
    n = int(ds.MindDataset(files, columns_list=["image_id"], shuffle=False).get_dataset_size())
    order = epoch_order(n, seed, epoch, rank, group_size, shuffle)
    if len(order) < batch_size:
        raise ValueError(f"{mindrecord_dir}: rank {rank} of {group_size} gets {len(order)} of {n} training "
                         f"images, fewer than one batch of {batch_size}")
    order = order[skip_batches * batch_size:]
    data = ds.MindDataset(files, columns_list=_TRAIN_READ, sampler=ds.SubsetSampler(order.tolist()),
                          num_parallel_workers=1)
    fn = TrainSampleMap(model, input_size, augment_cfg, max_gt_boxes, seed, epoch, str(mindrecord_dir))
    cv2.setNumThreads(1)
    data = data.map(operations=fn, input_columns=_TRAIN_READ, output_columns=TRAIN_COLUMNS,
                    num_parallel_workers=usable_workers(num_workers, local_ranks),
                    python_multiprocessing=python_multiprocessing)
    data = data.project(TRAIN_COLUMNS)
    return data.batch(batch_size, drop_remainder=True)


def create_eval_dataset(mindrecord_dir: str | Path, model: str, input_size: int, batch_size: int,
                        num_workers: int = 2, max_images: int = 0,
                        shard: tuple[int, int] = (0, 1)) -> mindspore.dataset.Dataset:
    """Every val image exactly once (the first ``max_images`` only when > 0), in file order: columns image
    float32 [B,3,S,S], image_id int64 [B], scale float32 [B,2] (original_xy = input_xy / scale), orig_size
    float32 [B,2] = (h, w). ``shard`` (rank, group size): only images rank, rank + group size, ... of them
    (sharded validation, msdet/evaluation/runner.py); a rank past the last image gets none.

    The last batch is kept partial (not padded): no dummy images to filter out downstream, at the cost of
    one more graph compilation for that shape.
    """
    import mindspore.dataset as ds

    _check_model(model)
    if batch_size < 1 or num_workers < 1:
        raise ValueError(f"batch_size ({batch_size}) and num_workers ({num_workers}) must be positive")
    files = shard_files(mindrecord_dir, "val")
    n = num_samples(mindrecord_dir, "val")
    n = min(n, max_images) if max_images > 0 else n
    rank, group = shard
    data = ds.MindDataset(files, columns_list=_EVAL_READ, num_parallel_workers=1,
                          sampler=ds.SubsetSampler(list(range(rank, n, group))))
    fn = EvalSampleMap(model, input_size, str(mindrecord_dir))
    data = data.map(operations=fn, input_columns=_EVAL_READ, output_columns=EVAL_COLUMNS,
                    num_parallel_workers=usable_workers(num_workers))
    data = data.project(EVAL_COLUMNS)
    return data.batch(batch_size, drop_remainder=False)


__all__ = ["MODELS", "TRAIN_COLUMNS", "EVAL_COLUMNS", "check_shard", "shard_files", "num_samples",
           "resolve_max_gt_boxes", "decode_image", "sample_rng", "epoch_order", "TrainSampleMap", "EvalSampleMap",
           "create_train_dataset", "create_eval_dataset"]
