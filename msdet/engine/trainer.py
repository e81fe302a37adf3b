"""The one training loop both detectors share.

Each detector contributes its network, loss cell (target assignment included) and data layout; this module
owns everything else: optimizer and schedule, gradient clipping and all-reduce, EMA, per-step logging,
NaN/inf stops, and epoch checkpoints that a rerun resumes from with identical results.

Output directory layout (``out_dir``):
  state/last.ckpt         network + EMA + optimizer state after the last finished epoch, or every
                          ``checkpoint_every_steps`` steps (resume point, msdet/engine/resume.py)
  state/previous.ckpt     the resume point before it (kept until a newer one is complete)
  state/train_log.csv     one row per logged step (copied to the DVC plots file at the end)
  state/run_key.json      what the state was trained with; a resume only happens when it matches
  final.ckpt              network weights at the end (fine-tuning starts here)
  ema.ckpt                EMA weights under the network's names (eval and export use these)
Both saved checkpoints get precise BN statistics for their own weights when ``bn_recalibration_batches`` > 0
(see msdet/engine/batch_norm_stats.py).
``state/`` is the persisted DVC output that survives an interrupted stage.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from msdet.atomic import atomic_path, write_json, write_text
from msdet.config import TrainConfig
from msdet.engine import resume
from msdet.engine.accumulate import AccumulatingStep
from msdet.engine.batch_norm_stats import recalibrate_batch_norm
from msdet.engine.checkpoint import checkpoint_meta, read_checkpoint, save_weights, weights_digest
from msdet.engine.distributed import DistInfo, gradient_reducer
from msdet.engine.ema import EMA
from msdet.engine.optim import AdamW, clip_grad_norm
from msdet.engine.schedules import warmup_cosine


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; no checkpoint of that state is written."""


@dataclass
class TrainData:
    """How the engine gets batches: ``make_dataset(epoch)`` yields (image, gt_boxes, gt_labels) tuples."""

    make_dataset: Callable[[int], Any]
    num_train_images: int
    #: optional: the sample indices this rank reads in an epoch (logged by each rank in distributed runs)
    shard_of_epoch: Callable[[int], Any] | None = None
    #: optional: ``(epoch, n)`` -> that epoch's dataset without its first n batches, skipped where it is
    #: cheap (the sampler); without it a mid-epoch resume reads and drops them
    make_dataset_from: Callable[[int, int], Any] | None = None


@dataclass
class TrainSummary:
    epochs: int
    steps: int
    global_batch: int
    wall_time_s: float
    images_per_s: float
    final_losses: dict[str, float]
    resumed_from_epoch: int
    history_rows: int
    compile_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def run_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _param_groups(network, cfg: TrainConfig) -> list[dict]:
    """Weight decay on conv/dense weights; norm scales and biases get none unless ``decay_norm_and_bias``."""
    params = network.trainable_params()
    if cfg.decay_norm_and_bias:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class TrainStep(nn.Cell):
    """One optimisation step: loss and gradients, all-reduce, clipping, optimizer update, EMA update."""

    def __init__(self, loss_cell: nn.Cell, optimizer: nn.Cell, ema: EMA, reducer: nn.Cell | None,
                 clip_norm: float) -> None:
        super().__init__(auto_prefix=False)
        self.loss_cell, self.optimizer, self.ema = loss_cell, optimizer, ema
        self.reducer = reducer
        self.use_reducer = reducer is not None
        self.clip_norm = float(clip_norm)
        self.grad_fn = ms.value_and_grad(loss_cell, None, optimizer.parameters, has_aux=True)

    def construct(self, image, gt_boxes, gt_labels, epoch, step):
        (loss, parts), grads = self.grad_fn(image, gt_boxes, gt_labels, epoch)
        if self.use_reducer:
            grads = self.reducer(grads)
        if self.clip_norm > 0:
            grads = clip_grad_norm(grads, self.clip_norm)
        loss = ops.depend(loss, self.optimizer(grads))
        loss = ops.depend(loss, self.ema(step))
        return loss, parts


def build_optimizer(network, cfg: TrainConfig, lr_per_step: np.ndarray):
    from mindspore import Tensor

    lr = Tensor(lr_per_step)
    groups = _param_groups(network, cfg)
    if cfg.optimizer == "sgd":
        return nn.Momentum(groups, learning_rate=lr, momentum=cfg.momentum)
    return AdamW(groups, lr_per_step)


class Trainer:
    """Builds the compiled step for ``detector`` and runs epochs; see the module docstring for outputs."""

    def __init__(self, detector, network, cfg: TrainConfig, data: TrainData, out_dir: str | Path,
                 dist: DistInfo | None = None, key_payload: dict | None = None, progress: bool = True) -> None:
        self.detector, self.network, self.cfg, self.data = detector, network, cfg, data
        self.out_dir, self.dist, self.progress = Path(out_dir), dist or DistInfo(), progress
        self.accumulate = cfg.accumulate_steps
        self.global_batch = cfg.batch_size * self.dist.group_size * self.accumulate
        per_rank = data.num_train_images // self.global_batch
        if per_rank < 1:
            raise ValueError(f"{data.num_train_images} training images cannot fill one global batch of "
                             f"{self.global_batch} (batch_size {cfg.batch_size} x {self.dist.group_size} devices "
                             f"x accumulate_steps {self.accumulate})")
        self.steps_per_epoch = min(per_rank, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else per_rank
        self.lr = warmup_cosine(cfg, self.steps_per_epoch, self.global_batch)
        self.key = run_key({"train": key_payload or {}, "steps_per_epoch": self.steps_per_epoch,
                            "group_size": self.dist.group_size})

        self.loss_cell = detector.loss_cell(network, self.dist.group_size)
        self.optimizer = build_optimizer(network, cfg, self.lr)
        self.ema = EMA(network, cfg.ema_decay, cfg.ema_ramp_steps)
        reducer = gradient_reducer(self.optimizer.parameters, self.dist) if self.dist.enabled else None
        # a Cell, not a jitted closure: MindSpore compiles it ~5x faster to run, and it sees set_data()
        step_type = TrainStep if self.accumulate == 1 else AccumulatingStep
        self.step_fn = step_type(self.loss_cell, self.optimizer, self.ema, reducer, cfg.grad_clip_norm)
        self.loss_names = list(detector.loss_names)

    # ------------------------------------------------------------------ checkpoints
    @property
    def resume_path(self) -> Path:
        return self.state_dir / "last.ckpt"

    @property
    def state_dir(self) -> Path:
        return self.out_dir / "state"

    def _save_resume(self, epoch: int, step: int, rows: list[dict], seconds: float, epoch_step: int = 0) -> None:
        """``epoch``: the last finished epoch; ``epoch_step``: optimizer steps taken in the next one."""
        import mindspore as ms

        items = [{"name": p.name, "data": p} for p in self.network.get_parameters()]
        items += [{"name": p.name, "data": p} for p in self.ema.shadows]
        seen = {i["name"] for i in items}
        items += [{"name": p.name, "data": p} for p in self.optimizer.get_parameters() if p.name not in seen]
        # the training log is part of the resume state: a resumed run's curves equal an uninterrupted run's
        write_text(self.state_dir / "train_log.csv", _rows_to_csv(rows))
        meta = {"epoch": epoch, "step": step, "epoch_step": epoch_step, "run_key": self.key,
                "train_seconds": round(seconds, 3), "rng": ms.get_rng_state().asnumpy().tolist()}
        resume.save_rotating(self.resume_path, lambda path: save_weights(path, items, meta))

    def _try_resume(self) -> tuple[int, int, list[dict], float, int]:
        """(next epoch, global step, log rows, seconds trained, steps of the next epoch already taken) from
        the newest matching resume point, else a fresh start."""
        import mindspore as ms
        from mindspore import Tensor

        key_file = self.state_dir / "run_key.json"
        stored = json.loads(key_file.read_text()).get("run_key") if key_file.is_file() else None
        params = resume.newest_readable(self.resume_path, lambda p: checkpoint_meta(p, "run_key") == self.key) \
            if stored == self.key else None
        if params is None:
            if self.dist.is_main:
                shutil.rmtree(self.state_dir, ignore_errors=True)
                write_json(key_file, {"run_key": self.key})
            return 0, 0, [], 0.0, 0
        ms.load_param_into_net(self.network, params, strict_load=False)
        ms.load_param_into_net(self.ema, params, strict_load=False)
        ms.load_param_into_net(self.optimizer, params, strict_load=False)
        rng = checkpoint_meta(params, "rng")
        if rng is not None:
            ms.set_rng_state(Tensor(np.asarray(rng, dtype=np.uint8)))
        log = self.state_dir / "train_log.csv"
        step = int(checkpoint_meta(params, "step"))
        # the log may run ahead of the point resumed from (killed between the two writes, or the newest
        # point unreadable): keep the rows up to it
        rows = [r for r in _csv_to_rows(log.read_text()) if r["step"] <= step] if log.is_file() else []
        epoch, epoch_step = resume.position(params)
        return epoch, step, rows, float(checkpoint_meta(params, "train_seconds", 0.0)), epoch_step

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after_epochs: int | None = None,
            on_epoch_end: Callable[[int], None] | None = None) -> TrainSummary:
        """Train to ``cfg.epochs`` (resuming if possible); ``stop_after_epochs`` ends early, as an interruption."""
        import mindspore as ms
        from mindspore import Tensor
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        start_epoch, step, rows, seconds_before, skip = self._try_resume()
        resumed = start_epoch
        t_start, compile_time, timed_images, timed_seconds = time.time(), 0.0, 0, 0.0
        last_parts = None
        epochs_run = 0
        for epoch in range(start_epoch, self.cfg.epochs):
            if stop_after_epochs is not None and epochs_run >= stop_after_epochs:
                break
            self.network.set_train(True)
            if self.dist.enabled and self.data.shard_of_epoch is not None:
                shard = [int(i) for i in self.data.shard_of_epoch(epoch)][
                    : self.steps_per_epoch * self.cfg.batch_size * self.accumulate]
                print(f"[rank {self.dist.rank}] epoch {epoch + 1} samples {json.dumps(shard)}", flush=True)
            bar = tqdm(total=self.steps_per_epoch, desc=f"{self.detector.name} epoch {epoch + 1}/{self.cfg.epochs}",
                       disable=not (self.progress and self.dist.is_main), leave=False, dynamic_ncols=True,
                       initial=skip)
            for i, batches in enumerate(self._step_batches(epoch, skip), start=skip):
                if i >= self.steps_per_epoch:
                    break
                t0 = time.time()
                loss, parts = self._step(batches, Tensor(epoch, ms.int32), Tensor(step + 1, ms.float32))
                parts_np = parts.asnumpy()
                dt = time.time() - t0
                if step == start_epoch * self.steps_per_epoch + skip and i == skip:
                    compile_time = dt
                else:
                    timed_images += self.global_batch
                    timed_seconds += dt
                if not np.all(np.isfinite(parts_np)):
                    bar.close()
                    detail = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.loss_names, parts_np))
                    raise TrainingDiverged(
                        f"{self.detector.name}: non-finite loss at epoch {epoch + 1}, step {step + 1} ({detail}); "
                        f"stopping without writing a checkpoint of this state. Lower the learning rate "
                        f"(lr={self.lr[min(step, len(self.lr) - 1)]:.3g}) or check the data.")
                lr = float(self.lr[min(step, len(self.lr) - 1)])
                step += 1
                last_parts = parts_np
                if step % self.cfg.log_every_steps == 0:
                    row = {"step": step, "epoch": epoch + 1, "lr": lr}
                    row.update({n: float(v) for n, v in zip(self.loss_names, parts_np)})
                    rows.append(row)
                bar.set_postfix({n: f"{v:.3f}" for n, v in zip(self.loss_names, parts_np)} | {"lr": f"{lr:.2e}"})
                bar.update(1)
                if self.dist.is_main and resume.save_due(step, i + 1, self.steps_per_epoch,
                                                         self.cfg.checkpoint_every_steps):
                    self._save_resume(epoch - 1, step, rows, seconds_before + time.time() - t_start, i + 1)
                    print(f"[{self.detector.name}] resume point saved at step {step}", flush=True)
            bar.close()
            skip = 0
            if self.dist.is_main:
                self._save_resume(epoch, step, rows, seconds_before + time.time() - t_start)
                loss_txt = " ".join(f"{n} {v:.4f}" for n, v in zip(self.loss_names, last_parts)) \
                    if last_parts is not None else ""
                print(f"[{self.detector.name}] epoch {epoch + 1}/{self.cfg.epochs} step {step} {loss_txt}",
                      flush=True)
            if on_epoch_end is not None:
                on_epoch_end(epoch)
            epochs_run += 1
        wall = seconds_before + time.time() - t_start
        if self.dist.enabled:
            print(f"[rank {self.dist.rank}] trainable weights sha256 {weights_digest(self.network)}", flush=True)
        if last_parts is None and rows:
            last_parts = [rows[-1].get(n, float("nan")) for n in self.loss_names]
        return TrainSummary(
            epochs=self.cfg.epochs, steps=step, global_batch=self.global_batch, wall_time_s=round(wall, 2),
            images_per_s=round(timed_images / timed_seconds, 3) if timed_seconds > 0 else 0.0,
            final_losses={n: float(v) for n, v in zip(self.loss_names, last_parts)} if last_parts is not None else {},
            resumed_from_epoch=resumed, history_rows=len(rows), compile_time_s=round(compile_time, 2),
        )

    def _step_batches(self, epoch: int, skip: int):
        """The epoch's batches from optimizer step ``skip`` on, in tuples of ``accumulate_steps``."""
        k = self.accumulate
        if skip and self.data.make_dataset_from is not None:
            dataset, drop = self.data.make_dataset_from(epoch, skip * k), 0
        else:
            dataset, drop = self.data.make_dataset(epoch), skip * k
        batches = itertools.islice(dataset.create_tuple_iterator(num_epochs=1), drop, None)
        return zip(*[batches] * k)

    def _step(self, batches: tuple, epoch: Tensor, step: Tensor):
        if self.accumulate == 1:
            return self.step_fn(*batches[0], epoch, step)
        return self.step_fn(list(batches), epoch, step)

    def finished(self) -> bool:
        if not self.resume_path.is_file():
            return False
        params = read_checkpoint(self.resume_path)
        return int(checkpoint_meta(params, "epoch", -1)) + 1 >= self.cfg.epochs

    def _recalibration_batches(self) -> list:
        """The first ``bn_recalibration_batches`` training batches of epoch 0, read once for both
        checkpoints (deterministic, so a resumed run saves the same statistics)."""
        n = self.cfg.bn_recalibration_batches
        if n == 0:
            return []
        iterator = self.data.make_dataset(0).create_tuple_iterator(num_epochs=1)
        return [image for image, _, _ in itertools.islice(iterator, n)]

    def write_final(self, plots_csv: str | Path | None = None) -> None:
        """final.ckpt, ema.ckpt and the plots CSV, from the current (finished) state. Rank 0 only."""
        if not self.dist.is_main:
            return
        live = [(p, p.asnumpy().copy()) for p in self.network.get_parameters()]
        batches = self._recalibration_batches()
        recalibrate_batch_norm(self.network, batches)
        save_weights(self.out_dir / "final.ckpt", self.network, {"model": self.detector.name})
        self.ema.copy_to_network()
        recalibrate_batch_norm(self.network, batches)
        save_weights(self.out_dir / "ema.ckpt", self.network, {"model": self.detector.name})
        for p, value in live:
            p.set_data(Tensor(value))
        if plots_csv is not None:
            src = self.state_dir / "train_log.csv"
            with atomic_path(plots_csv) as tmp:
                shutil.copyfile(src, tmp)


def _rows_to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _csv_to_rows(text: str) -> list[dict]:
    if not text.strip():
        return []
    out = []
    for r in csv.DictReader(io.StringIO(text)):
        row: dict[str, Any] = {}
        for k, v in r.items():
            row[k] = int(v) if k in ("step", "epoch") else float(v)
        out.append(row)
    return out

