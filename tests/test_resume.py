"""Resume inside an epoch: a run stopped after any step continues from its last resume point and ends
bit-identical to an uninterrupted run (toy detector; the kill -9 of a real stage is in test_multinode.py)."""
from __future__ import annotations

import dataclasses

import mindspore as ms
import mindspore.dataset as mds
import numpy as np
import pytest

from msdet.engine import resume
from msdet.engine.checkpoint import checkpoint_meta, read_checkpoint
from msdet.engine.trainer import TrainData, Trainer
from tests.helpers import ToyDetector, ToyNet, cfg, series_files

ms.set_device("CPU")


class Killed(Exception):
    """Stands in for SIGKILL: the run stops between two steps, nothing else is written."""


def toy_data(with_skip: bool, n=32, batch=4, seed=0) -> TrainData:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 3, 16, 16)).astype(np.float32)
    boxes = np.zeros((n, 2, 4), np.float32)
    boxes[:, 0] = images[:, :, :4, :4].mean(axis=(1, 2))[:, :4] * 16 + 16
    labels = np.full((n, 2), -1, np.int32)
    labels[:, 0] = 1
    read = []  # batches handed out, to check the sampler-level skip reads none it skips

    def make(epoch, skip=0):
        order = np.random.default_rng(seed * 1000 + epoch).permutation(n)[skip * batch:]
        read.append((epoch, len(order) // batch))
        ds = mds.NumpySlicesDataset((images[order], boxes[order], labels[order]),
                                    column_names=["image", "gt_boxes", "gt_labels"], shuffle=False)
        return ds.batch(batch, drop_remainder=True)

    data = TrainData(make_dataset=make, num_train_images=n, make_dataset_from=make if with_skip else None)
    data.read = read
    return data


def trainer_for(tmp_path, config, sub, with_skip=True, code="code-1"):
    ms.set_seed(0)
    net = ToyNet()
    trainer = Trainer(ToyDetector(), net, config, toy_data(with_skip), tmp_path / sub, progress=False,
                      key_payload={**dataclasses.asdict(config), "code_sha256": code}, live_dir=tmp_path / sub / "live")
    return trainer, net


def kill_after(trainer, steps: int) -> None:
    """Make ``trainer`` die when it is about to take step ``steps + 1``."""
    real, calls = trainer._step, [0]

    def step(*args):
        if calls[0] == steps:
            raise Killed
        calls[0] += 1
        return real(*args)

    trainer._step = step


@pytest.mark.parametrize("accumulate,kill_at,resumed_at,with_skip", [(1, 13, 12, True), (1, 13, 12, False),
                                                                     (2, 7, 6, True)])
def test_killed_mid_epoch_resumes_bit_identical(tmp_path, accumulate, kill_at, resumed_at, with_skip):
    config = cfg(accumulate_steps=accumulate, checkpoint_every_steps=3)
    full, net_full = trainer_for(tmp_path, config, "full")
    full.fit()
    part, _ = trainer_for(tmp_path, config, "part", with_skip)
    kill_after(part, kill_at)
    with pytest.raises(Killed):
        part.fit()
    state = tmp_path / "part" / "state"
    assert sorted(p.name for p in state.glob("*.ckpt")) == ["last.ckpt", "previous.ckpt"]  # the newest two
    last = read_checkpoint(state / "last.ckpt")
    assert int(checkpoint_meta(last, "step")) == resumed_at
    assert int(checkpoint_meta(last, "epoch_step")) not in (0, full.steps_per_epoch)  # inside an epoch

    again, net_again = trainer_for(tmp_path, config, "part", with_skip)
    summary = again.fit()
    assert again.finished() and summary.steps == full.steps_per_epoch * 3
    for a, b in zip(net_full.get_parameters(), net_again.get_parameters()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=a.name)
    for a, b in zip(full.ema.shadows, again.ema.shadows):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=a.name)
    assert series_files(tmp_path / "full" / "live") == series_files(tmp_path / "part" / "live")
    first_read = again.data.read[0]
    epoch, done = resume.position(last)
    skipped_at_sampler = done * accumulate if with_skip else 0
    assert first_read == (epoch, 32 // 4 - skipped_at_sampler)


def test_unreadable_newest_point_falls_back_to_the_previous(tmp_path):
    config = cfg(checkpoint_every_steps=3)
    full, net_full = trainer_for(tmp_path, config, "full")
    full.fit()
    part, _ = trainer_for(tmp_path, config, "part")
    kill_after(part, 13)
    with pytest.raises(Killed):
        part.fit()
    (tmp_path / "part" / "state" / "last.ckpt").write_bytes(b"torn write")
    again, net_again = trainer_for(tmp_path, config, "part")
    epoch, step, _, done = again._try_resume()
    assert (epoch, step, done) == (1, 9, 1)  # the point before: step 9 = epoch 2, 1 step in
    again.fit()  # the live series written after the newer point are cut back to step 9 first
    for a, b in zip(net_full.get_parameters(), net_again.get_parameters()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy(), err_msg=a.name)
    assert series_files(tmp_path / "full" / "live") == series_files(tmp_path / "part" / "live")


def test_a_point_left_by_other_code_is_not_continued(tmp_path, capsys):
    """dvc repro reruns training after a code edit: the persisted state of the old code must not stand in for it."""
    config = cfg(checkpoint_every_steps=3)
    part, _ = trainer_for(tmp_path, config, "part")
    kill_after(part, 13)
    with pytest.raises(Killed):
        part.fit()
    assert trainer_for(tmp_path, config, "part")[0]._try_resume()[1] == 12  # same code: resumes at step 12
    edited, _ = trainer_for(tmp_path, config, "part", code="code-2")
    assert edited._try_resume() == (0, 0, 0.0, 0)
    assert "holds a run of other params, data, starting weights or code: training from the start" in \
        capsys.readouterr().out
    assert not (tmp_path / "part" / "state" / "last.ckpt").exists()


def test_a_changed_run_key_keeps_the_old_point_until_the_new_run_saves_one(tmp_path, capsys):
    """A params or code edit must not throw the old run's resume point away: it is moved aside, continued
    again when the edit is undone, and deleted only once the new run has a resume point of its own."""
    config = cfg(checkpoint_every_steps=3)
    state = tmp_path / "part" / "state"
    part, _ = trainer_for(tmp_path, config, "part")
    kill_after(part, 13)
    with pytest.raises(Killed):
        part.fit()
    old_bytes = (state / "last.ckpt").read_bytes()
    capsys.readouterr()
    edited, _ = trainer_for(tmp_path, config, "part", code="code-2")
    assert edited._try_resume() == (0, 0, 0.0, 0)
    kept = state / f"run-{part.key}"
    out = capsys.readouterr().out
    assert f"its resume point is kept in {kept} until this run saves its first" in out and out.count("\n") == 1
    assert (kept / "last.ckpt").read_bytes() == old_bytes and (kept / "previous.ckpt").is_file()
    # the edit undone before the edited run saved anything: the old run continues where it stopped
    undone, _ = trainer_for(tmp_path, config, "part")
    assert undone._try_resume()[1] == 12 and not kept.exists()
    assert (state / "last.ckpt").read_bytes() == old_bytes
    # the edited run again, this time to its first resume point: the old one is gone then
    edited, _ = trainer_for(tmp_path, config, "part", code="code-2")
    kill_after(edited, 3)
    with pytest.raises(Killed):
        edited.fit()
    assert not list(state.glob("run-*"))
    assert checkpoint_meta(read_checkpoint(state / "last.ckpt"), "run_key") == edited.key


def test_save_due_skips_epoch_ends_and_zero():
    assert [s for s in range(1, 17) if resume.save_due(s, (s - 1) % 8 + 1, 8, 3)] == [3, 6, 9, 12, 15]
    assert not any(resume.save_due(s, 1, 8, 0) for s in range(1, 9))


def test_run_key_changes_with_every_switch_that_changes_the_numerics():
    """A kernel that runs or not changes a step's float rounding: a state trained with another set of kernels (a
    switch, or a host where another set builds), or with kernels built by another compiler or for another
    instruction set, must not be resumed as this run's (the rerun would keep the other setting's weights). The
    key follows the kernels that run, not the switches: a switch that changes nothing keeps the run."""
    from msdet.engine.trainer import run_key
    from msdet.training import run_key_payload
    from tests.helpers import project_params

    params = project_params()
    ran = {"kernels": ["depthwise_conv", "batch_norm"], "compiler": "g++ (Debian 12.2.0-14) 12.2.0",
           "isa": "avx512f"}

    def key(runtime=None, train=None, kernels=ran):
        p = params
        if runtime:
            p = dataclasses.replace(p, runtime=dataclasses.replace(p.runtime, **runtime))
        if train:
            p = dataclasses.replace(p, nanodet=dataclasses.replace(
                p.nanodet, train=dataclasses.replace(p.nanodet.train, **train)))
        return run_key(run_key_payload(p, "nanodet", {"num_classes": 4}, {}, "code", kernels))

    base = key()
    assert key(kernels={**ran, "kernels": ["depthwise_conv"]}) != base        # one kernel fewer built or on
    assert key(kernels={**ran, "isa": "avx2"}) != base
    assert key(kernels={**ran, "compiler": "g++ (GCC) 13.1.0"}) != base
    assert key(kernels={"kernels": []}) != base
    # with no kernel on, neither the compiler nor the ISA matters; the switches themselves are not the key
    none = key(kernels={"kernels": []})
    assert key(kernels={"kernels": [], "compiler": "x", "isa": "y"}) == none == key(kernels=None)
    assert key(runtime={"cpu_kernels": "off"}) == base
    assert key(runtime={"cpu_kernels_off": ["max_pool"]}) == base
    assert key(runtime={"device_target": "Ascend"}) != base
    assert key(runtime={"graph_mode": not params.runtime.graph_mode}) != base
    assert key(runtime={"cpu_threads": 1}) != base
    assert key(runtime={"precision": "amp_o2"}) != base
    assert key(runtime={"loss_scale": dataclasses.replace(params.runtime.loss_scale, window=7)}) != base
    assert key(train={"checkpoint_every_steps": 7}) == base     # how often the state is saved: the same run
