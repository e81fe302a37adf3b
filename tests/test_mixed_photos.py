"""Photos of mixed sizes and formats -> MindRecord with any shard count -> the training pipeline and a step.

MindDataset refuses shards whose headers differ, and the embedded data set (one image size) never shows it:
here a YOLO set of 320x240 to 4000x3000 JPEGs and PNGs, downscaled at conversion, goes through every shard
count from 1 to 8 (more images than shards), the training data pipeline, and one training step.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import mindspore as ms
import mindspore.dataset as ds
import numpy as np
import pytest

from msdet.data import mindrecord as mr
from msdet.data.coco import resolve_tree
from msdet.data.meta import mindrecord_files
from msdet.data.mindrecord import UnreadableSplitError, convert_tree, read_split
from msdet.data.own import convert_own
from msdet.data.pipeline import create_train_dataset
from msdet.engine.trainer import TrainData, Trainer
from tests.helpers import ToyDetector, ToyNet, cfg, config, write_photo_set

NAMES = ["balloon", "kite", "drone"]
SPLITS = {"train": 13, "val": 9}
MAX_SIDE = 1024


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("photos")
    write_photo_set(src, NAMES, SPLITS)
    root = src.parent / f"{src.name}-coco"
    convert_own(config("data.own", format="yolo", path=str(src), max_image_side=MAX_SIDE, workers=1), root)
    return root


def test_fixture_has_the_size_mix(tree):
    import json

    images = json.loads((tree / "annotations" / "instances_train.json").read_text())["images"]
    sizes = {(im["width"], im["height"]) for im in images}
    # each size of PHOTO_SIZES, the ones over 1024 px downscaled (4000x3000 and 1600x1200 -> 1024x768)
    assert sizes == {(320, 240), (1024, 768), (640, 480), (576, 1024), (800, 600), (500, 500)}
    suffixes = {Path(im["file_name"]).suffix for im in images}
    assert suffixes == {".jpg", ".png"}


@pytest.mark.parametrize("shards", range(1, 9))
def test_every_shard_count_reads_as_one_dataset(tree, tmp_path, shards):
    out = tmp_path / "mr"
    stats = convert_tree(resolve_tree(tree), out, config("mindrecord", train_shards=shards, val_shards=shards,
                                                         workers=1))
    for split, n in SPLITS.items():
        files = mindrecord_files(out, split)
        assert len(files) == shards and stats[split]["images"] == n
        data = ds.MindDataset([str(f) for f in files], columns_list=["image_id", "width"], shuffle=False)
        rows = list(data.create_dict_iterator(output_numpy=True, num_epochs=1))
        assert [int(r["image_id"]) for r in rows] == [s["image_id"] for s in read_split(out, split)]
        assert len(rows) == n and len({int(r["width"]) for r in rows}) > 1
    batch = next(create_train_dataset(out, "nanodet", 64, config("nanodet.augment"), 4, 8, 1, seed=0)
                 .create_tuple_iterator(output_numpy=True, num_epochs=1))
    assert [b.shape for b in batch] == [(4, 3, 64, 64), (4, 8, 4), (4, 8)]
    assert np.all((batch[2] >= 0).sum(axis=1) >= 1)  # every photo keeps its boxes


def test_unreadable_split_fails_in_the_stage_naming_it(tree, tmp_path, monkeypatch):
    """Shards written with different headers (as sizing each from its own rows did) never reach training."""
    monkeypatch.setattr(mr, "_ShardWriter", _PageSizePerShard)
    with pytest.raises(UnreadableSplitError, match=r"mr: the 3 train shard\(s\) do not read as one MindDataset: "
                                                   r"\[ERROR\] .*mr/train\.mindrecord\d is different from others"):
        convert_tree(resolve_tree(tree), tmp_path / "mr", config("mindrecord", train_shards=3, workers=1))
    assert not list(tmp_path.iterdir())  # neither the output nor its temporary folder


class _PageSizePerShard(mr._ShardWriter):
    """A shard writer whose page size differs from shard to shard (the fault under test)."""

    count = 0

    def __init__(self, path, page_size, header_size):
        _PageSizePerShard.count += 1
        super().__init__(path, page_size << (_PageSizePerShard.count % 2), header_size)


def test_one_training_step_on_the_photos(tree, tmp_path):
    out = tmp_path / "mr"
    convert_tree(resolve_tree(tree), out, config("mindrecord", train_shards=4, workers=1))
    train_cfg = cfg(epochs=1, batch_size=4, max_steps_per_epoch=1)
    make = lambda epoch: create_train_dataset(out, "nanodet", 32, config("nanodet.augment"), 4, 8, 1,  # noqa: E731
                                              seed=0, epoch=epoch)
    ms.set_seed(0)
    net = ToyNet()
    before = [p.asnumpy().copy() for p in net.trainable_params()]
    trainer = Trainer(ToyDetector(), net, train_cfg, TrainData(make_dataset=make, num_train_images=SPLITS["train"]),
                      tmp_path / "run", progress=False, key_payload=dataclasses.asdict(train_cfg))
    summary = trainer.fit()
    assert summary.steps == 1 and np.isfinite(summary.final_losses["loss"])
    after = [p.asnumpy() for p in net.trainable_params()]
    assert all(not np.array_equal(a, b) for a, b in zip(after, before))  # the step updated every weight
