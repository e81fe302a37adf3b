"""mindspore.dataset pipelines over small hand-written MindRecord files (schema as in PREAMBLE)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from msdet.data import pipeline as P
from msdet.data.meta import meta_path, mindrecord_files, read_meta, write_meta
from msdet.data.mindrecord import SCHEMA
from msdet.errors import UserError
from tests.helpers import config

SIZES = [(48, 96), (96, 48), (64, 64)]  # (h, w), cycled over the images
S, B, M = 64, 2, 4
NO_AUG = {
    "d0": config("d0.augment", scale_min=1.0, scale_max=1.0, flip_prob=0.0),
    "nanodet": config("nanodet.augment", scale_min=1.0, scale_max=1.0, stretch_min=1.0, stretch_max=1.0, translate=0.0,
                                         flip_prob=0.0, brightness=0.0, contrast_min=1.0, contrast_max=1.0,
                                         saturation_min=1.0, saturation_max=1.0),
}
AUG = {"d0": config("d0.augment"), "nanodet": config("nanodet.augment")}


def image_id(i: int) -> int:
    return 1000 + 7 * i


def known_boxes(i: int, h: int, w: int) -> np.ndarray:
    """Image i has 1 + i % 3 boxes (image 5 has 6, more than M): sizes >= 12 px, inside the image."""
    n = 6 if i == 5 else 1 + i % 3
    k = np.arange(n, dtype=np.float32)
    x1 = 2 + 5 * k
    y1 = 3 + 4 * k
    return np.stack([x1, y1, np.minimum(x1 + 14 + 2 * k, w), np.minimum(y1 + 12 + 3 * k, h)], axis=1)


def write_split(out_dir: Path, split: str, n: int, shards: int, corrupt_id: int | None = None,
                wrong_size_id: int | None = None) -> list[dict]:
    from mindspore.mindrecord import FileWriter

    rows = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        rng = np.random.default_rng(i)
        img = np.full((h, w, 3), 40 + 20 * (i % 5), np.uint8) + rng.integers(0, 8, (h, w, 3), dtype=np.uint8)
        boxes = known_boxes(i, h, w)
        for x1, y1, x2, y2 in boxes.astype(int):
            img[y1:y2, x1:x2] = (200, 90 + 10 * (i % 4), 30)
        data = cv2.imencode(".jpg", img)[1].tobytes()
        if corrupt_id is not None and image_id(i) == corrupt_id:
            data = b"not a jpeg"
        # labels carry the image index so the test can tell images apart inside train batches
        rec_h = h + 1 if image_id(i) == wrong_size_id else h
        rows.append({"image": data, "image_id": image_id(i), "height": rec_h, "width": w, "boxes": boxes,
                     "labels": np.full(len(boxes), i, np.int32)})
    writer = FileWriter(str(out_dir / f"{split}.mindrecord"), shard_num=shards, overwrite=True)
    writer.add_schema(SCHEMA, "msdet test")
    writer.write_raw_data(rows)
    writer.commit()
    # meta.json lists the shards (msdet.data.meta), as the MindRecord stage writes it
    meta = read_meta(out_dir) if meta_path(out_dir).is_file() else {
        "num_classes": 1, "categories": [{"id": 1, "name": "x"}], "splits": {}}
    names = [f"{split}.mindrecord"] if shards == 1 else [f"{split}.mindrecord{k}" for k in range(shards)]
    meta["splits"][split] = {"files": names, "images": n}
    write_meta(out_dir, meta)
    return rows


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mindrecord")
    write_split(root, "train", 8, shards=2)
    write_split(root, "val", 5, shards=1)
    return root


@pytest.fixture(scope="module")
def odd_records(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mindrecord_odd")
    write_split(root, "train", 7, shards=3)
    return root


def batches(dataset) -> list[tuple[np.ndarray, ...]]:
    return [tuple(np.asarray(c) for c in row) for row in dataset.create_tuple_iterator(output_numpy=True,
                                                                                      num_epochs=1)]


def train(root: Path, model: str, cfg=None, **kw):
    args = dict(input_size=S, augment_cfg=cfg or AUG[model], batch_size=B, max_gt_boxes=M, num_workers=2, seed=3)
    args.update(kw)
    return batches(P.create_train_dataset(root, model, **args))


def test_files_and_counts(records, odd_records):
    files = mindrecord_files(records, "train")
    assert [Path(f).name for f in files] == ["train.mindrecord0", "train.mindrecord1"]
    assert [Path(f).name for f in mindrecord_files(records, "val")] == ["val.mindrecord"]
    assert P.num_samples(records, "train") == 8 and P.num_samples(records, "val") == 5
    assert P.num_samples(odd_records, "train") == 7
    with pytest.raises(FileNotFoundError, match="no val.mindrecord files listed"):
        P.num_samples(odd_records, "val")
    with pytest.raises(FileNotFoundError, match="not_there"):
        P.num_samples(records / "not_there", "train")


@pytest.mark.parametrize("model", ["d0", "nanodet"])
def test_train_batches_shapes_dtypes_and_boxes(records, model):
    out = train(records, model, NO_AUG[model], shuffle=False, num_workers=1)
    assert len(out) == 8 // B
    for image, gt_boxes, gt_labels in out:
        assert image.shape == (B, 3, S, S) and image.dtype == np.float32
        assert gt_boxes.shape == (B, M, 4) and gt_boxes.dtype == np.float32
        assert gt_labels.shape == (B, M) and gt_labels.dtype == np.int32
    labels = np.concatenate([b[2] for b in out])
    boxes = np.concatenate([b[1] for b in out])
    for i in range(8):
        h, w = SIZES[i % len(SIZES)]
        ref = known_boxes(i, h, w)
        if model == "d0":
            ref = ref * (S / max(h, w))
        else:
            ref = ref * np.array([S / w, S / h, S / w, S / h], np.float32)
        kept = ref[np.argsort(-(ref[:, 2] - ref[:, 0]) * (ref[:, 3] - ref[:, 1]), kind="stable")[:M]]
        n = min(len(ref), M)
        assert np.all(labels[i, :n] == i) and np.all(labels[i, n:] == -1)  # image 5: truncated to M
        np.testing.assert_allclose(np.sort(boxes[i, :n], axis=0), np.sort(kept, axis=0), atol=1e-4)
        assert not boxes[i, n:].any()


def test_d0_padding_and_nanodet_normalisation_in_batches(records):
    d0 = train(records, "d0", NO_AUG["d0"], shuffle=False)
    first = d0[0][0][0]  # image 0 is 48 x 96 -> content 32 x 64, zero padding below
    assert np.all(first[:, 32:, :] == 0.0) and np.all(np.abs(first[:, :32]).mean(axis=(1, 2)) > 0.5)
    nd = train(records, "nanodet", NO_AUG["nanodet"], shuffle=False)
    bg = nd[0][0][0][:, -2, -2]  # background pixel of image 0: grey 40 + noise, in BGR
    mean, std = np.array([103.53, 116.28, 123.675]), np.array([57.375, 57.12, 58.395])
    assert np.all(np.abs(bg * std + mean - 43.5) < 6)


def test_train_deterministic_across_workers_and_processes(records):
    a = train(records, "nanodet", epoch=1)  # 2 threads
    b = train(records, "nanodet", epoch=1, num_workers=1, python_multiprocessing=True)
    c = train(records, "nanodet", epoch=2)
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0][0], c[0][0])  # another epoch: other order and augmentation
    orders = [[int(r) for batch in train(records, "nanodet", NO_AUG["nanodet"], epoch=e) for r in batch[2][:, 0]]
              for e in (1, 2, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(8))
    assert orders[0] != orders[1] and orders[0] == orders[2]


@pytest.mark.parametrize("rank,group_size,batch", [(0, 1, 2), (1, 2, 1)])
def test_skipped_batches_leave_the_rest_of_the_epoch_unchanged(records, rank, group_size, batch):
    """A resume inside an epoch skips at the sampler: the remaining batches (augmentation included) are the
    whole epoch's tail."""
    whole = train(records, "d0", epoch=3, batch_size=batch, rank=rank, group_size=group_size)
    tail = train(records, "d0", epoch=3, batch_size=batch, rank=rank, group_size=group_size, skip_batches=1)
    assert len(whole) == 4 and len(tail) == 3
    for x, y in zip(whole[1:], tail):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)


def images_seen(root: Path, model: str, rank: int, group_size: int, epoch: int = 0) -> list[int]:
    out = train(root, model, NO_AUG[model], batch_size=1, rank=rank, group_size=group_size, epoch=epoch)
    return [int(b[2][0, 0]) for b in out]


@pytest.mark.parametrize("model", ["d0", "nanodet"])
def test_sharding_gives_disjoint_images(records, odd_records, model):
    r0, r1 = images_seen(records, model, 0, 2), images_seen(records, model, 1, 2)
    assert len(r0) == len(r1) == 4 and not set(r0) & set(r1) and set(r0) | set(r1) == set(range(8))
    o0, o1 = images_seen(odd_records, model, 0, 2, epoch=4), images_seen(odd_records, model, 1, 2, epoch=4)
    assert len(o0) == len(o1) == 3 and len(set(o0) | set(o1)) == 6  # 7 images: one sits this epoch out


@pytest.mark.parametrize(("requested", "local_ranks", "cores", "expected"), [
    (2, 8, 192, 2),    # the configured count fits the rank's share of 24 cores
    (32, 8, 192, 24),  # never more than the share
    (2, 2, 2, 1),      # two ranks on 2 cores: one thread each
    (4, 8, 4, 1),      # more ranks than cores: still one
    (3, 1, 2, 2),      # one process: at most the cores
])
def test_usable_workers_is_the_ranks_share_of_the_cores(requested, local_ranks, cores, expected):
    assert P.usable_workers(requested, local_ranks, cores) == expected


def test_usable_workers_defaults_to_this_process_affinity():
    assert P.usable_workers(10**6) == len(os.sched_getaffinity(0))


def test_train_pipeline_runs_opencv_single_threaded(records):
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(4)
        P.create_train_dataset(records, "d0", 64, config("d0.augment"), 2, 8, 1, 0)
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)


def test_train_rejects_bad_arguments(records):
    with pytest.raises(ValueError, match="model must be one of"):
        P.create_train_dataset(records, "yolo", S, AUG["d0"], B, M, 1, 0)
    with pytest.raises(TypeError, match="D0AugmentConfig"):
        P.create_train_dataset(records, "d0", S, AUG["nanodet"], B, M, 1, 0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        P.create_train_dataset(records, "d0", S, AUG["d0"], 5, M, 1, 0, rank=1, group_size=2)


@pytest.mark.parametrize("model", ["d0", "nanodet"])
def test_eval_every_image_once_with_scale_and_size(records, model):
    out = batches(P.create_eval_dataset(records, model, S, batch_size=2))
    assert [len(b[0]) for b in out] == [2, 2, 1]  # last batch kept partial
    image = np.concatenate([b[0] for b in out])
    ids = np.concatenate([b[1] for b in out])
    scale = np.concatenate([b[2] for b in out])
    orig = np.concatenate([b[3] for b in out])
    assert image.shape == (5, 3, S, S) and image.dtype == np.float32
    assert ids.dtype == np.int64 and sorted(ids.tolist()) == [image_id(i) for i in range(5)]
    assert scale.dtype == np.float32 and orig.dtype == np.float32 and scale.shape == orig.shape == (5, 2)
    blue_plane = 2 if model == "d0" else 0  # D0 is RGB, NanoDet BGR
    for img, iid, sc, hw in zip(image, ids, scale, orig):
        i = (int(iid) - 1000) // 7
        h, w = SIZES[i % len(SIZES)]
        np.testing.assert_array_equal(hw, [h, w])
        expected = [S / max(h, w)] * 2 if model == "d0" else [S / w, S / h]
        np.testing.assert_allclose(sc, expected, rtol=1e-7)
        # the drawn boxes (blue 200 on grey <= 127), found in the input and divided by scale, are where they were
        boxes = known_boxes(i, h, w)
        union = np.array([*boxes[:, :2].min(0), *boxes[:, 2:].max(0)])
        ys, xs = np.nonzero(img[blue_plane] > img[blue_plane].max() * 0.5 + img[blue_plane].min() * 0.5)
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / np.tile(sc, 2)
        np.testing.assert_allclose(found, union, atol=1.0 / sc.min())


def test_corrupt_image_error_names_record(tmp_path):
    write_split(tmp_path, "train", 4, shards=1, corrupt_id=image_id(2))
    with pytest.raises(RuntimeError, match=f"image_id {image_id(2)}.*cannot be decoded"):
        train(tmp_path, "d0", shuffle=False)


def test_record_size_mismatch_is_reported(tmp_path):
    write_split(tmp_path, "val", 3, shards=1, wrong_size_id=image_id(1))
    with pytest.raises(RuntimeError, match=f"image_id {image_id(1)}: decoded image is 96x48 .* record says 97x48"):
        batches(P.create_eval_dataset(tmp_path, "nanodet", S, batch_size=1))


def test_truncated_train_shard_is_named_before_reading(tmp_path):
    write_split(tmp_path, "train", 8, shards=2)
    shard = tmp_path / "train.mindrecord1"
    size = shard.stat().st_size
    os.truncate(shard, size - 1)
    message = (rf"^{re.escape(str(shard))}: truncated MindRecord shard of the train split \({size - 1} bytes, its "
               rf"header lists pages up to byte {size}\); rerun the mindrecord stage$")
    for read in (lambda: P.num_samples(tmp_path, "train"), lambda: P.resolve_max_gt_boxes(0, tmp_path),
                 lambda: train(tmp_path, "d0")):
        with pytest.raises(UserError, match=message):
            read()


@pytest.mark.parametrize("damage, message", [
    ("half", r"truncated MindRecord shard of the val split \(\d+ bytes, its header lists pages up to byte \d+\)"),
    ("header", r"not a MindRecord shard of the val split \(unreadable header: ValueError\)"),
    ("json", r"not a MindRecord shard of the val split \(unreadable header: JSONDecodeError\)"),
])
def test_damaged_val_shard_is_named(tmp_path, damage, message):
    write_split(tmp_path, "val", 5, shards=1)
    shard = tmp_path / "val.mindrecord"
    if damage == "half":
        os.truncate(shard, shard.stat().st_size // 2)
    else:
        with open(shard, "r+b") as fh:
            fh.seek(0 if damage == "header" else 8)  # the header's length, or its first JSON bytes
            fh.write(b"\xff" * 8 if damage == "header" else b"!" * 8)
    with pytest.raises(UserError, match=rf"^{re.escape(str(shard))}: {message}; rerun the mindrecord stage$"):
        P.create_eval_dataset(tmp_path, "d0", S, batch_size=2)
