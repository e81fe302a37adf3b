"""The one training loop both detectors share.

Each detector contributes its network, loss cell (target assignment included) and data layout; this module
owns everything else: optimizer and schedule, gradient clipping and all-reduce, EMA, live metrics (dvclive,
msdet/engine/live.py), periodic validation through a callable the caller injects, NaN/inf stops, and epoch
checkpoints that a rerun resumes from with identical results.

Output directory layout (``out_dir``):
  state/last.ckpt         network + EMA + optimizer state after the last finished epoch, or every
                          ``checkpoint_every_steps`` steps (resume point, msdet/engine/resume.py), and the
                          best validated EMA weights so far (``best.`` names)
  state/previous.ckpt     the resume point before it (kept until a newer one is complete)
  state/run_key.json      what the state was trained with; a resume only happens when it matches
  state/run-<key>/        the resume point of another run key, moved aside when this run started; it is
                          continued again if the run key changes back before this run saves its first point,
                          and deleted once it does
  final.ckpt              network weights at the end (fine-tuning starts here)
  ema.ckpt                EMA weights under the network's names (eval and export use these)
  best.ckpt               the validated EMA weights with the highest AP (ema.ckpt's copy without validation)
  model_card.json         what the weights are (written with them, see msdet/training.py)
final/ema/best.ckpt and the model card are written as one set (msdet.atomic.atomic_files): a kill while they
are renamed in is finished by the next start of the trainer, so the files never mix two runs for longer.
The saved EMA weights (validated ones included) get precise BN statistics for their own weights when
``bn_recalibration_batches`` > 0 (see msdet/engine/batch_norm_stats.py); so does final.ckpt.
``state/`` is the persisted DVC output that survives an interrupted stage; so is the dvclive directory.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from msdet.atomic import atomic_files, remove_stale, write_json
from msdet.config import LossScaleConfig, TrainConfig
from msdet.engine import resume
from msdet.engine.accumulate import AccumulatingStep
from msdet.engine.batch_norm_stats import recalibrate_batch_norm
from msdet.engine.checkpoint import checkpoint_meta, read_checkpoint, save_weights, weights_digest
from msdet.engine.distributed import DistInfo, all_gather, from_main, gradient_reducer
from msdet.engine.ema import EMA
from msdet.engine.live import LiveLog
from msdet.engine.optim import AdamW, Momentum, SquareSum, clip_factor
from msdet.engine.precision import LossScaling, ScaledLoss, apply_precision, is_mixed
from msdet.engine.schedules import warmup_cosine
from msdet.errors import UserError


class TrainingDiverged(UserError):
    """A loss became NaN or infinite; no checkpoint of that state is written. The user's to fix (learning
    rate, data), so the command reports it in one line."""


class ResumeMismatch(UserError):
    """The ranks found different resume points (each node reads its own ``state/``): continuing would train
    ranks at different steps, or hang them in a collective."""


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
    compile_time_s: float = 0.0
    #: {"epoch", "step", "AP", "AP50"} of best.ckpt, None when no validation ran
    best: dict[str, Any] | None = None
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
        self.square_sum = SquareSum()
        self.grad_fn = ms.value_and_grad(loss_cell, None, optimizer.parameters, has_aux=True)

    def construct(self, image, gt_boxes, gt_labels, epoch, step):
        (loss, parts), grads = self.grad_fn(image, gt_boxes, gt_labels, epoch)
        if self.use_reducer:
            grads = self.reducer(grads)
        done = self.optimizer(grads, clip_factor(grads, self.clip_norm, self.square_sum))
        loss = ops.depend(loss, self.ema(ops.depend(step, done)))
        return loss, parts


class ScaledTrainStep(TrainStep):
    """TrainStep with dynamic loss scaling (mixed precision, msdet/engine/precision.py): the gradients of loss x
    scale, divided by the scale; when they are not finite on some rank, no weight, optimizer moment or EMA
    changes on any rank, and the scale goes down."""

    def __init__(self, loss_cell: nn.Cell, optimizer: nn.Cell, ema: EMA, reducer: nn.Cell | None,
                 clip_norm: float, scaling: LossScaling) -> None:
        super().__init__(loss_cell, optimizer, ema, reducer, clip_norm)
        self.scaling = scaling
        self.grad_fn = ms.value_and_grad(ScaledLoss(loss_cell, scaling), None, optimizer.parameters, has_aux=True)

    def construct(self, image, gt_boxes, gt_labels, epoch, step):
        (loss, parts), grads = self.grad_fn(image, gt_boxes, gt_labels, epoch)
        grads = self.scaling.unscale(grads)
        finite = self.scaling.finite(grads)
        if self.use_reducer:
            grads = self.reducer(grads)
        if finite:
            done = self.optimizer(grads, clip_factor(grads, self.clip_norm, self.square_sum))
            loss = ops.depend(loss, self.ema(ops.depend(step, done)))
        loss = ops.depend(loss, self.scaling.update(finite))
        return loss, parts


def build_optimizer(network, cfg: TrainConfig, lr_per_step: np.ndarray):
    from mindspore import Tensor

    lr = Tensor(lr_per_step)
    groups = _param_groups(network, cfg)
    if cfg.optimizer == "sgd":
        return Momentum(groups, learning_rate=lr, momentum=cfg.momentum)
    return AdamW(groups, lr_per_step)


class Trainer:
    """Builds the compiled step for ``detector`` and runs epochs; see the module docstring for outputs."""

    def __init__(self, detector, network, cfg: TrainConfig, data: TrainData, out_dir: str | Path,
                 dist: DistInfo | None = None, key_payload: dict | None = None, progress: bool = True,
                 live_dir: str | Path | None = None,
                 validate: Callable[[nn.Cell], dict[str, float]] | None = None, precision: str = "fp32",
                 loss_scale: LossScaleConfig | None = None) -> None:
        """``live_dir``: where rank 0 logs dvclive metrics (None: no live log). ``validate(network)`` returns
        {"AP", "AP50", ...} of the network as it is, the same on every rank; it is called every
        ``cfg.eval_every_epochs`` epochs on every rank (each evaluates its share of the images) with rank 0's EMA
        weights in the network. ``precision``: ``runtime.precision``; an AMP level sets the
        network's float16 cells (validation then runs them in float16 too) and needs ``loss_scale``."""
        self.detector, self.network, self.cfg, self.data = detector, network, cfg, data
        self.out_dir, self.dist, self.progress = Path(out_dir), dist or DistInfo(), progress
        self.accumulate = cfg.accumulate_steps
        self.live_dir = Path(live_dir) if live_dir is not None else None
        self.validate = validate if cfg.eval_every_epochs > 0 else None
        #: best validated EMA weights: {"meta": {"epoch", "step", "AP", "AP50"}, "weights": {name: array}}
        self.best: dict[str, Any] | None = None
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

        self.precision = precision
        self.scaling: LossScaling | None = None
        if is_mixed(precision):
            if loss_scale is None:
                raise ValueError(f"precision {precision} needs the loss scaling settings (runtime.loss_scale)")
            apply_precision(network, precision)
            self.scaling = LossScaling(loss_scale, self.dist.group_size)
        self.loss_cell = detector.loss_cell(network, self.dist.group_size)
        if self.scaling is not None and hasattr(self.loss_cell, "float32_outputs"):
            self.loss_cell.float32_outputs = True
        self.optimizer = build_optimizer(network, cfg, self.lr)
        self.ema = EMA(network, cfg.ema_decay, cfg.ema_ramp_steps)
        reducer = gradient_reducer(self.optimizer.parameters, self.dist) if self.dist.enabled else None
        # a Cell, not a jitted closure: MindSpore compiles it ~5x faster to run, and it sees set_data()
        step_args = (self.loss_cell, self.optimizer, self.ema, reducer, cfg.grad_clip_norm)
        if self.accumulate > 1:
            self.step_fn = AccumulatingStep(*step_args, scaling=self.scaling)
        elif self.scaling is not None:
            self.step_fn = ScaledTrainStep(*step_args, self.scaling)
        else:
            self.step_fn = TrainStep(*step_args)
        self.loss_names = list(detector.loss_names)

    # ------------------------------------------------------------------ checkpoints
    @property
    def resume_path(self) -> Path:
        return self.state_dir / "last.ckpt"

    @property
    def state_dir(self) -> Path:
        return self.out_dir / "state"

    def _save_resume(self, epoch: int, step: int, seconds: float, epoch_step: int = 0) -> None:
        """``epoch``: the last finished epoch; ``epoch_step``: optimizer steps taken in the next one."""
        import mindspore as ms

        items = [{"name": p.name, "data": p} for p in self.network.get_parameters()]
        items += [{"name": p.name, "data": p} for p in self.ema.shadows]
        seen = {i["name"] for i in items}
        items += [{"name": p.name, "data": p} for p in self.optimizer.get_parameters() if p.name not in seen]
        if self.scaling is not None:
            items += [{"name": p.name, "data": p} for p in self.scaling.state()]
        # the best weights commit with the epoch that validated them: a kill in between cannot split them
        items += _best_items(self.best)
        meta = {"epoch": epoch, "step": step, "epoch_step": epoch_step, "run_key": self.key,
                "train_seconds": round(seconds, 3), "rng": ms.get_rng_state().asnumpy().tolist(),
                "best": self.best["meta"] if self.best else None}
        resume.save_rotating(self.resume_path, lambda path: save_weights(path, items, meta))
        for kept in self.state_dir.glob(KEPT_PREFIX + "*"):
            shutil.rmtree(kept)  # this run has a resume point of its own now

    def _try_resume(self) -> tuple[int, int, float, int]:
        """(next epoch, global step, seconds trained, steps of the next epoch already taken) from the newest
        matching resume point, else a fresh start."""
        import mindspore as ms
        from mindspore import Tensor

        key_file = self.state_dir / "run_key.json"
        if self.dist.is_main:
            # a killed run's temporary files; its checkpoint set, if staged in full, is completed
            remove_stale(self.out_dir)
            remove_stale(self.state_dir)
            if _stored_key(key_file) != self.key:
                self._set_other_run_aside(_stored_key(key_file))
        stored = _stored_key(key_file)
        params = resume.newest_readable(self.resume_path, lambda p: checkpoint_meta(p, "run_key") == self.key) \
            if stored == self.key else None
        if params is None:
            if self.dist.is_main:
                for point in (self.resume_path, resume.previous_path(self.resume_path)):
                    point.unlink(missing_ok=True)  # unreadable, or not of this run
                write_json(key_file, {"run_key": self.key})
            return 0, 0, 0.0, 0
        ms.load_param_into_net(self.network, params, strict_load=False)
        ms.load_param_into_net(self.ema, params, strict_load=False)
        ms.load_param_into_net(self.optimizer, params, strict_load=False)
        if self.scaling is not None:
            ms.load_param_into_net(self.scaling, params, strict_load=False)
        rng = checkpoint_meta(params, "rng")
        if rng is not None:
            ms.set_rng_state(Tensor(np.asarray(rng, dtype=np.uint8)))
        self.best = _best_from(params)
        epoch, epoch_step = resume.position(params)
        return epoch, int(checkpoint_meta(params, "step")), float(checkpoint_meta(params, "train_seconds", 0.0)), \
            epoch_step

    def _set_other_run_aside(self, other: str | None) -> None:
        """Move the resume point of run key ``other`` into ``state/run-<other>/`` (replacing an older one
        kept there) and bring back this run key's, if it was kept so; one line says which."""
        state, tag = self.state_dir, f"[{self.detector.name}]"
        points = [p for p in (self.resume_path, resume.previous_path(self.resume_path)) if p.is_file()]
        if points:
            aside = state / f"{KEPT_PREFIX}{other or 'unknown'}"
            for older in state.glob(KEPT_PREFIX + "*"):
                if older.name not in (aside.name, KEPT_PREFIX + self.key):
                    shutil.rmtree(older)
            aside.mkdir(exist_ok=True)
            for path in [*points, state / "run_key.json"]:  # the key last: a kill before it repeats this move
                if path.is_file():
                    os.replace(path, aside / path.name)
            print(f"{tag} {state} holds a run of other params, data, starting weights or code: training from "
                  f"the start; its resume point is kept in {aside} until this run saves its first (to continue "
                  f"it, stop this run and rerun with that run's params and code)", flush=True)
        mine = state / f"{KEPT_PREFIX}{self.key}"
        if mine.is_dir():
            for path in sorted(mine.iterdir()):
                os.replace(path, state / path.name)
            mine.rmdir()
            print(f"{tag} continuing the resume point kept in {mine}", flush=True)

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after_epochs: int | None = None,
            on_epoch_end: Callable[[int], None] | None = None) -> TrainSummary:
        """Train to ``cfg.epochs`` (resuming if possible); ``stop_after_epochs`` ends early, as an interruption."""
        import mindspore as ms
        from mindspore import Tensor
        from tqdm import tqdm

        self.out_dir.mkdir(parents=True, exist_ok=True)
        start_epoch, step, seconds_before, skip = self._try_resume()
        if self.dist.enabled:
            self._agree_on_resume(start_epoch, skip, step)
        resumed = start_epoch
        live = LiveLog(self.live_dir, resume_step=step) if self.live_dir is not None and self.dist.is_main else None
        if live is not None and self.best is not None:
            live.log(step, _best_summary(self.best), plot=False)
        t_start, compile_time, timed_images, timed_seconds = time.time(), 0.0, 0, 0.0
        t_row, images_since_row = time.time(), 0
        last_parts = None
        epochs_run = 0
        window, compiled = LossWindow(self._skipped_steps()), False
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
                step += 1
                window.add(parts, step)
                log_due = step % self.cfg.log_every_steps == 0  # every rank checks, rank 0 also logs
                save_due = self.dist.is_main and resume.save_due(step, i + 1, self.steps_per_epoch,
                                                                 self.cfg.checkpoint_every_steps)
                first, compiled = not compiled, True
                # the host waits for the step only here: every log_every_steps steps, before a resume point,
                # at the epoch's end and after the first (compiling) step
                if log_due or save_due or first or i + 1 == self.steps_per_epoch:
                    mean = self._check_window(window, epoch, bar)
                    last_parts = parts.asnumpy()
                    bar.set_postfix({n: f"{v:.3f}" for n, v in zip(self.loss_names, last_parts)}
                                    | {"lr": f"{self.lr[min(step - 1, len(self.lr) - 1)]:.2e}"})
                dt = time.time() - t0
                if first:
                    compile_time = dt
                else:
                    timed_images += self.global_batch
                    timed_seconds += dt
                images_since_row += self.global_batch
                if log_due and live is not None:
                    now = time.time()
                    row = {f"train/{n}": float(v) for n, v in zip(self.loss_names, mean)}
                    row.update({"train/lr": float(self.lr[min(step - 1, len(self.lr) - 1)]),
                                "train/images_per_s": images_since_row / max(now - t_row, 1e-9)})
                    if self.scaling is not None:
                        row.update({"train/loss_scale": self._loss_scale(),
                                    "train/skipped_steps": self._skipped_steps()})
                    live.log(step, row)
                    t_row, images_since_row = now, 0
                if log_due:
                    window.reset(self._skipped_steps())
                bar.update(1)
                if save_due:
                    self._save_resume(epoch - 1, step, seconds_before + time.time() - t_start, i + 1)
                    print(f"[{self.detector.name}] resume point saved at step {step}", flush=True)
            if window.unchecked:  # the data ran out before steps_per_epoch: nothing unchecked reaches a checkpoint
                self._check_window(window, epoch, bar)
                last_parts = parts.asnumpy()
            bar.close()
            skip = 0
            val_txt = ""
            if self.validate is not None and (epoch + 1) % self.cfg.eval_every_epochs == 0:
                t_val = time.time()
                metrics = self._validate(epoch, step, live)
                val_txt = f" val AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f} ({time.time() - t_val:.0f} s)"
                t_row = time.time()  # images/s measures training only
            if self.dist.is_main:
                self._save_resume(epoch, step, seconds_before + time.time() - t_start)
                loss_txt = " ".join(f"{n} {v:.4f}" for n, v in zip(self.loss_names, last_parts)) \
                    if last_parts is not None else ""
                print(f"[{self.detector.name}] epoch {epoch + 1}/{self.cfg.epochs} step {step} {loss_txt}{val_txt}",
                      flush=True)
            if on_epoch_end is not None:
                on_epoch_end(epoch)
            epochs_run += 1
        wall = seconds_before + time.time() - t_start
        if self.dist.enabled:
            print(f"[rank {self.dist.rank}] trainable weights sha256 {weights_digest(self.network)}", flush=True)
        final_losses = {n: float(v) for n, v in zip(self.loss_names, last_parts)} if last_parts is not None else {}
        if live is not None:
            if not final_losses:  # resumed after the last epoch: the losses are in the live summary
                logged = live.latest("train")
                final_losses = {n: float(logged[n]) for n in self.loss_names if n in logged}
            live.end()
        return TrainSummary(
            epochs=self.cfg.epochs, steps=step, global_batch=self.global_batch, wall_time_s=round(wall, 2),
            images_per_s=round(timed_images / timed_seconds, 3) if timed_seconds > 0 else 0.0,
            final_losses=final_losses, resumed_from_epoch=resumed, compile_time_s=round(compile_time, 2),
            best=self.best["meta"] if self.best else None,
            extra={"loss_scale": self._loss_scale(), "skipped_steps": self._skipped_steps()}
            if self.scaling is not None else {},
        )

    def _check_window(self, window: LossWindow, epoch: int, bar) -> np.ndarray:
        """The mean loss parts of the window's steps (waiting for them); raises TrainingDiverged, before any
        checkpoint of that state is written, when one of its steps had a non-finite loss (with mixed precision:
        was skipped at loss scale 1; a window with an overflow skipped at a higher scale is not checked)."""
        mean = window.mean()
        where = f"step {window.last}" if window.steps == 1 else f"steps {window.first}-{window.last}"
        window.unchecked = 0
        if self.scaling is not None:
            skipped = self._skipped_steps()
            if self._floor_skips() > 0:  # DynamicLossScaler's floor: lowering the scale cannot help any more
                bar.close()
                raise TrainingDiverged(
                    f"{self.detector.name}: gradients not finite at loss scale 1 at epoch {epoch + 1}, {where} "
                    f"({skipped} steps skipped so far): float16 overflows whatever the scale; train with "
                    f"runtime.precision fp32 or lower the learning rate.")
            if skipped > window.skipped_before:
                return mean
        if not np.all(np.isfinite(mean)):
            bar.close()
            detail = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.loss_names, mean))
            mean_of = "" if window.steps == 1 else "mean over them: "
            raise TrainingDiverged(
                f"{self.detector.name}: non-finite loss at epoch {epoch + 1}, {where} ({mean_of}{detail}); "
                f"stopping without writing a checkpoint of this state. Lower the learning rate "
                f"(lr={self.lr[min(window.last - 1, len(self.lr) - 1)]:.3g}) or check the data.")
        return mean

    def _floor_skips(self) -> int:
        """Steps of this process skipped at loss scale 1 (training cannot recover from those)."""
        return int(self.scaling.floor_skips.asnumpy()) if self.scaling is not None else 0

    def _loss_scale(self) -> float:
        return float(self.scaling.value.asnumpy()) if self.scaling is not None else 1.0

    def _skipped_steps(self) -> int:
        """Optimizer steps skipped for non-finite gradients since the start (resumes included)."""
        return int(self.scaling.skipped.asnumpy()) if self.scaling is not None else 0

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

    def _agree_on_resume(self, epoch: int, epoch_step: int, step: int) -> None:
        """Refuse to train when the ranks resumed from different points (or different weights at one point):
        without a shared file system each node reads its own ``state/``, and a node without it would start at
        epoch 0 while the others continue."""
        digest = hashlib.sha256((self.key + weights_digest(self.network)).encode()).hexdigest()
        point = np.array([epoch, epoch_step, step, int(digest[:15], 16)], np.int64)
        points = all_gather(point, self.dist)
        if (points == points[0]).all():
            return
        groups: dict[tuple, list[int]] = {}
        for rank, (e, s, n, d) in enumerate(points.tolist()):
            groups.setdefault((e, s, n, d), []).append(rank)
        where = "; ".join(f"rank {','.join(map(str, ranks))} at step {n} (epoch {e + 1}, {s} steps into it; "
                          f"digest {d:015x})" for (e, s, n, d), ranks in groups.items())
        raise ResumeMismatch(f"{self.state_dir}: the ranks resume from different points ({where}); each node "
                             f"reads its own {self.state_dir}: copy node 0's to every node (or keep it on a file "
                             f"system all nodes share) and rerun")

    def _validate(self, epoch: int, step: int, live: LiveLog | None) -> dict[str, float]:
        """``validate`` on the EMA weights with precise BN (what ema.ckpt would hold if training ended now);
        the best by AP is kept. Every rank validates rank 0's weights (BN statistics are per rank), so the
        ranks agree on the best. Validation must not change the result: the weights and BN statistics are put
        back bit for bit, and the next epoch sets train mode again. Its random draws (drop-connect during the
        BN recalibration) do not reach training in graph mode, where the compiled step keeps its own random
        state; in PyNative mode they shift later draws (MindSpore cannot save the state of ``ops.rand``)."""
        live_weights = [(p, p.asnumpy().copy()) for p in self.network.get_parameters()]
        try:
            self.ema.copy_to_network()
            recalibrate_batch_norm(self.network, self._recalibration_batches())
            if self.dist.enabled:
                _take_main_values(list(self.network.get_parameters()), self.dist)
            metrics = {k: float(v) for k, v in self.validate(self.network).items()}
            if self.best is None or metrics["AP"] > self.best["meta"]["AP"]:
                self.best = {"meta": {"epoch": epoch + 1, "step": step, "AP": metrics["AP"],
                                      "AP50": metrics["AP50"]},
                             "weights": {p.name: p.asnumpy().copy() for p in self.network.get_parameters()}}
        finally:
            for p, value in live_weights:
                p.set_data(Tensor(value))
        if live is not None:
            live.log(step, {"val/AP": metrics["AP"], "val/AP50": metrics["AP50"]})
            live.log(step, _best_summary(self.best), plot=False)
        return metrics

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

    def write_final(self, card: dict | None = None) -> None:
        """final.ckpt, ema.ckpt, best.ckpt and ``card`` (as model_card.json) from the current (finished) state,
        as one set. Rank 0 only."""
        if not self.dist.is_main:
            return
        live = [(p, p.asnumpy().copy()) for p in self.network.get_parameters()]
        batches = self._recalibration_batches()
        with atomic_files(self.out_dir, "checkpoints") as stage:
            recalibrate_batch_norm(self.network, batches)
            save_weights(stage / "final.ckpt", self.network, self._weights_meta())
            self.ema.copy_to_network()
            recalibrate_batch_norm(self.network, batches)
            save_weights(stage / "ema.ckpt", self.network, self._weights_meta())
            for p, value in live:
                p.set_data(Tensor(value))
            if self.best is None:
                shutil.copyfile(stage / "ema.ckpt", stage / "best.ckpt")
            else:
                save_weights(stage / "best.ckpt",
                             [{"name": k, "data": Tensor(v)} for k, v in self.best["weights"].items()],
                             {**self._weights_meta(), **self.best["meta"]})
            if card is not None:
                write_json(stage / "model_card.json", card)

    def _weights_meta(self) -> dict[str, Any]:
        """The model's name and what its outputs need to decode (the detector's ``weights_meta``)."""
        return {"model": self.detector.name, **self.detector.weights_meta()}


class LossWindow:
    """The loss parts of the steps since the last log row, summed on the device: the host reads them (and so
    waits for the steps) only when it logs or checks, and a NaN or inf in any of them stays in the sum."""

    def __init__(self, skipped_before: int) -> None:
        self.reset(skipped_before)
        self.unchecked = 0

    def reset(self, skipped_before: int) -> None:
        """Start a new window; ``skipped_before``: the loss scaler's skipped steps so far."""
        self.sum: Tensor | None = None
        self.steps = self.first = self.last = 0
        self.skipped_before = skipped_before

    def add(self, parts: Tensor, step: int) -> None:
        self.sum = parts if self.sum is None else self.sum + parts
        self.first = self.first or step
        self.last = step
        self.steps += 1
        self.unchecked += 1

    def mean(self) -> np.ndarray:
        """The mean parts (a window of one step: its parts, bit for bit)."""
        return self.sum.asnumpy() / np.float32(self.steps)


#: the folder name prefix, inside ``state/``, of another run key's resume point kept aside
KEPT_PREFIX = "run-"


def _stored_key(key_file: Path) -> str | None:
    return json.loads(key_file.read_text()).get("run_key") if key_file.is_file() else None


#: name prefix of the best weights inside the resume checkpoint
_BEST = "best."


def _best_items(best: dict | None) -> list[dict]:
    return [{"name": _BEST + k, "data": Tensor(v)} for k, v in best["weights"].items()] if best else []


def _best_from(params: dict[str, Any]) -> dict[str, Any] | None:
    meta = checkpoint_meta(params, "best")
    if meta is None:
        return None
    return {"meta": meta, "weights": {k[len(_BEST):]: v.asnumpy() for k, v in params.items() if k.startswith(_BEST)}}


def _take_main_values(params: list, dist: DistInfo) -> None:
    """Set ``params`` to rank 0's values, bit for bit (one collective over all of them)."""
    values = [p.asnumpy() for p in params]
    flat = from_main(np.concatenate([v.ravel() for v in values]), dist)
    for p, v, part in zip(params, values, np.split(flat, np.cumsum([v.size for v in values])[:-1])):
        p.set_data(Tensor(part.reshape(v.shape).astype(v.dtype)))


def _best_summary(best: dict) -> dict[str, float]:
    return {"val/best_AP": best["meta"]["AP"], "val/best_epoch": best["meta"]["epoch"]}

