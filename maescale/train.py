"""The training loop: ``main(cfg)`` joins the job and takes the run directory; :class:`Trainer`
builds the run and :meth:`Trainer.run` reads top to bottom.

1. plan the resume (which checkpoint, and on another job size the config that keeps the batch);
2. build the model, the data feed, the DeepSpeed engine and the step (:mod:`maescale.step`);
3. resume from the newest valid checkpoint if the run directory has one;
4. loop: set lr, :meth:`Trainer.train_step` (forward, backward, guarded update), then the named
   pieces around it: :meth:`~Trainer.log`, :meth:`~Trainer.evaluate`, :meth:`~Trainer.decide`
   (what all ranks agreed on: stop, save, roll back; :mod:`maescale.control`), :meth:`~Trainer.save`;
5. on SIGTERM/SIGUSR1 (SLURM preemption or time limit) checkpoint and return "preempted".

Where to add things: a metric -> :meth:`Trainer.log`; a condition on which every rank must stop,
save or roll back together -> :class:`maescale.control.Control`; something per step ->
:meth:`Trainer.train_step`.

The same ``main`` runs under ``tools/train.py`` (one process), ``torchrun`` and SLURM
(through ``maescale.launch``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from maescale import __version__
from maescale.checkpoint import (CheckpointError, CheckpointManager, load_pretrained_into, only_encoder_loaded,
                                 plan_resume)
from maescale.config import Config
from maescale.control import Control, Decision, StopSignals
from maescale.distributed import DistContext, agree_max, broadcast_object, describe, init_distributed
from maescale.faults import fault_point, maybe_poison, maybe_poison_data
from maescale.metrics import ProgressLog, TensorBoardLogger, reconstruction_grid, save_png
from maescale.models import build_model
from maescale.optim import build_engine, effective_batch, legacy_layout, make_schedule, set_lr
from maescale.parent import exit_with_launcher
from maescale.probe import build_evaluator
from maescale.profiling import StepProfile, StepProfiler
from maescale.rollback import DataSkips, Rollbacks
from maescale.rundir import RunDir, RunLock, RunLocked, RunLockLost, tag_for_step
from maescale.step import StepHealth, build_step
from maescale.watchdog import StallWatchdog, phase, prune_attempts

log = logging.getLogger("maescale.train")

__all__ = ["main", "train", "Trainer", "TrainResult", "TrainingDiverged", "StopSignals", "plan_length",
           "setup_logging"]


@dataclass
class TrainResult:
    """How a call to :func:`main` ended."""

    status: str  # "finished" or "preempted"
    rank: int
    step: int  # optimizer steps completed
    total_steps: int
    output_dir: Path
    last_checkpoint: Path | None
    resumed_from: int | None  # step of the checkpoint this call started from
    last_loss: float | None
    stop_signals: tuple[int, ...] = ()  # every stop signal this process received, in order
    perf: list[dict[str, float | None]] | None = None  # the figures of every log step of this call
    profile: dict[str, Any] | None = None  # train.profile_at: per-step host/device cost and collectives
    rollbacks: int = 0  # rollbacks this call made


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients, or a loss spike, with no
    rollback left (or rollback off)."""


def setup_logging(rank: int, run: RunDir) -> None:
    """Rank 0 logs INFO to stderr and ``output_dir/logs/train.log``; other ranks warnings only."""
    root = logging.getLogger("maescale")
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for h in list(root.handlers):
        if getattr(h, "_maescale", False):
            root.removeHandler(h)
            h.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        run.logs.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run.train_log))
    for h in handlers:
        h.setFormatter(fmt)
        h._maescale = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.propagate = False


def plan_length(cfg: Config, batches_per_epoch: int | None) -> tuple[int, float | None]:
    """(total optimizer steps, steps per epoch or None when the epoch length is unknown)."""
    steps_per_epoch = batches_per_epoch / cfg.train.grad_accum_steps if batches_per_epoch else None
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps, steps_per_epoch
    if not steps_per_epoch:
        raise ValueError("train.epochs needs the epoch length: set data.num_samples or write a sizes file "
                         "with tools/make_shards.py or tools/index_shards.py; or use train.max_steps")
    return max(1, round(cfg.train.epochs * steps_per_epoch)), steps_per_epoch


def main(cfg: Config, extra_stop_signals: Sequence[int] = ()) -> TrainResult:
    """Train (or resume training) the run described by ``cfg``: join the job, take the run
    directory (one job writes it at a time), then :func:`train`.

    ``extra_stop_signals``: signals besides SIGTERM/SIGUSR1 that mean "checkpoint and stop"
    (the SLURM launcher adds the one submitit asks SLURM to send before the time limit).
    """
    exit_with_launcher()  # a rank whose torchrun/srun/submitit dies stops (no-op for a plain process)
    ctx = init_distributed(cfg.train.device, cfg.deepspeed.timeout_minutes, socket_ifname=cfg.distributed.socket_ifname)
    run = RunDir(cfg.output_dir)
    setup_logging(ctx.env.rank, run)
    log.info("distributed: %s", describe(ctx))
    with hold_run_directory(cfg, run, ctx) as lock:
        return train(cfg, ctx, run, lock, extra_stop_signals)


def train(cfg: Config, ctx: DistContext, run: RunDir, lock: RunLock,
          extra_stop_signals: Sequence[int] = ()) -> TrainResult:
    """The training of a job that holds its run directory (see the module docstring)."""
    trainer = Trainer(cfg, ctx, run, lock, extra_stop_signals)
    try:
        return trainer.run()
    finally:
        trainer.close()


class Trainer:
    """One job's training: built by ``__init__`` (steps 1-3), run by :meth:`run` (steps 4-5)."""

    def __init__(self, cfg: Config, ctx: DistContext, run: RunDir, lock: RunLock,
                 extra_stop_signals: Sequence[int] = ()):
        from maescale.data.feed import build_feed
        from maescale.flops import peak_flops, train_flops_per_image
        from maescale.models.presets import PRESETS

        self.ctx, self.run_dir, self.lock = ctx, run, lock
        self.rank, self.world, self.device = ctx.env.rank, ctx.env.world_size, ctx.device
        rank, world, device = self.rank, self.world, self.device
        # Stall detection from the start (lock wait, conversions and compilation get long budgets).
        attempt = str(broadcast_object(os.environ.get("MAESCALE_ATTEMPT_ID") or time.strftime("%Y%m%d-%H%M%S"),
                                       ctx.control_group))
        if rank == 0 and not os.environ.get("MAESCALE_ATTEMPT_ID"):
            prune_attempts(run.path)  # under the supervisor, it prunes
        self.watchdog = StallWatchdog(run.path, attempt, rank, world, cfg.train.stall_timeout_s).start()

        # ---- 1. plan the resume, record the config that runs
        self.ckpt = CheckpointManager(run.path, rank, world, cfg.checkpoint.keep_last, ctx.control_group,
                                      fence=lock)
        self.ckpt.clean_partials(quiet_s=cfg.lock.stale_s if lock.took_over else 0.0)
        plan = plan_resume(cfg, self.ckpt)  # on another job size this re-derives grad_accum_steps
        self.cfg = cfg = plan.cfg
        self.ckpt.config_yaml = cfg.to_yaml()
        if rank == 0:
            cfg.save(run.config)
            log.info("maescale %s: run directory %s", __version__, run.path.resolve())

        # ---- 2. model, data, engine, step
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        model = build_model(cfg.model, device=device)
        self.encoder_only_init = False
        if cfg.model.init_from and plan.path is None:
            loaded = load_pretrained_into(model, cfg.model.init_from, resample_patch=cfg.model.init_resample_patch)
            self.encoder_only_init = only_encoder_loaded(loaded)
            log.info("initialised from public MAE checkpoint %s%s", cfg.model.init_from,
                     " (encoder only: model.decoder_warmup_steps trains the fresh decoder alone first)"
                     if self.encoder_only_init else "")
        if cfg.model.compile:
            model.compile_model("blocks" if cfg.model.compile is True else cfg.model.compile)
        self.feed = build_feed(cfg, rank, world, device)  # normalised images on the device
        self.total_steps, steps_per_epoch = plan_length(cfg, self.feed.batches_per_epoch)
        self.schedule = make_schedule(cfg, world, self.total_steps, steps_per_epoch)
        layout = legacy_layout(model) if plan.layout == "legacy" else plan.layout
        built = build_engine(cfg, model, world, device, layout=layout)
        self.engine, self.groups = built.engine, built.groups
        if cfg.model.decoder_warmup_steps and any(g["part"] == "all" for g in self.groups):
            raise ValueError("model.decoder_warmup_steps needs parameter groups split into encoder and decoder "
                             "(deepspeed.zero_stage=1 with the lean step, a fresh run); this run's groups mix them")
        if cfg.model.decoder_warmup_steps and not self.encoder_only_init and plan.path is None:
            log.warning("model.decoder_warmup_steps=%d without an encoder from model.init_from: the decoder warms "
                        "up against a random encoder", cfg.model.decoder_warmup_steps)
        self.ckpt.param_groups = self.groups
        self.model = self.engine.module

        # ---- 3. resume
        # Masks come from a generator of their own (per rank), so nothing else that draws random
        # numbers (DataLoader start-up, libraries) can shift them: resume stays exact.
        self.mask_gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank + 1)
        torch.manual_seed(cfg.train.seed * 1000 + rank + 1)
        with phase(self.watchdog, 0, "start"):
            self.step = plan.restore(self.ckpt, self.engine, self.feed, self.mask_gen)
        self.stream_pos = plan.stream_pos(self.step, cfg.train.grad_accum_steps)
        self.resumed_from = self.step if plan.path is not None else None
        self.last_checkpoint: Path | None = plan.path
        self.stepper = build_step(cfg, self.engine, device, [g["name"] for g in self.groups])
        self.rollbacks = Rollbacks(run, rank, ctx.control_group)
        self.skips = DataSkips.at_resume(cfg, self.rollbacks, self.step)
        how = {"FlatZeroStep": ", gradients reduce-scattered in {n} buckets during backward",
               "DeepSpeedStep": ", DeepSpeed's gradient reduction"}[type(self.stepper).__name__].format(n=len(self.groups))
        log.info("model %s (%.1fM parameters), %d process(es), effective batch %d, %d steps, peak lr %.3g, "
                 "warmup %d steps, ZeRO-%d%s%s, %s", cfg.model.name,
                 sum(p.numel() for p in self.model.parameters()) / 1e6, world, effective_batch(cfg, world),
                 self.total_steps, self.schedule.peak_lr, self.schedule.warmup_steps, cfg.deepspeed.zero_stage,
                 " (lean step)" if self.stepper.lean else "", how, cfg.train.precision)

        # ---- the pieces around the step
        model_flops, hw_flops = train_flops_per_image(PRESETS[cfg.model.name], cfg.model.img_size,
                                                      cfg.model.mask_ratio, cfg.model.act_ckpt_every)
        peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                          cfg.train.peak_tflops, dtype=cfg.train.precision)
        self.tb = TensorBoardLogger(run.path, enabled=rank == 0)
        self.signals = StopSignals(cfg.checkpoint.on_signal, extra_stop_signals)
        self.control = Control(cfg, ctx.control_group, world, self.signals, lock)
        # kNN accuracy of the encoder on labelled shards (eval.*; off unless eval.every_steps > 0).
        self.evaluator = build_evaluator(cfg, rank=rank, world=world, device=device, group=ctx.control_group,
                                         tb=self.tb, run_dir=run.path, total_steps=self.total_steps)
        self.bar = _progress_bar(cfg, rank, self.step, self.total_steps)
        self.progress = ProgressLog(self.tb, self.total_steps, world, model_flops, hw_flops, peak, device, self.bar,
                                    start_step=self.step)
        self.profiler = StepProfiler(device, cfg.train.profile_at, cfg.train.profile_steps, run.path, rank,
                                     ctx.control_group)
        self.profile: StepProfile | None = None
        self.loss_sum = torch.zeros((), device=device)
        self.loss_count, self.last_loss, self.last_log_step = 0, None, self.step
        self.batch = None  # the last micro-batch (imgs, pred, mask), for reconstruction pictures
        self.rollbacks_done = 0
        if self.resumed_from is not None:
            self.progress.resumed(self.step)
        if plan.resized:  # rewrite at once in this job's layout: later resumes at this size need no conversion
            self.save(reason="resize")
            log.info("checkpoint %s rewritten for %d processes", self.last_checkpoint, world)

    # ------------------------------------------------------------------ 4. the loop
    def run(self) -> TrainResult:
        cfg, status = self.cfg, "finished"
        if self.step == 0:
            self.evaluate()  # the encoder at initialisation: the baseline of the curve
        while self.step < self.total_steps:
            self.skips.apply(self.step, self.feed, self)  # train.skip_batches and earlier rollbacks' windows
            self.profiler.before_step(self.step, self.stepper)
            lr = self.schedule.lr_at(self.step)
            warm = self.step < cfg.model.decoder_warmup_steps  # the decoder trains alone (encoder lr 0, no grad)
            self.model.encoder_frozen = warm
            set_lr(self.engine.optimizer, lr, frozen_part="encoder" if warm else None)
            self.train_step()
            self.step += 1
            fault_point("train.after_step", self.step)
            self.after_profile()
            log_loss = self.log(lr) if self.step % cfg.train.log_every == 0 or self.step == self.total_steps else None
            self.pictures()
            self.evaluate()
            decision = self.control.after_step(self.step, log_loss)
            if decision is not None and self.decide(decision) == "stop":
                status = "preempted"
                break
            if self.step_save_due():
                self.save(reason="interval")
        else:
            final = self.control.finish()  # nothing stays in flight; a late stop changes nothing now
            if final is not None and final.lock_lost:
                self._lock_lost()
        if status == "finished" and cfg.checkpoint.final and not self._saved_at(self.step):
            self.save(reason="final")
        self.finish(status)
        return TrainResult(status, self.rank, self.step, self.total_steps, self.run_dir.path, self.last_checkpoint,
                           self.resumed_from, self.last_loss, tuple(self.signals.history), self.progress.history,
                           self.profile.as_dict() if self.profile else None, self.rollbacks_done)

    def train_step(self) -> None:
        """One optimizer step: ``grad_accum_steps`` micro-batches forward and backward, then the
        guarded update (a step with a non-finite loss or gradient leaves the weights alone)."""
        dog, accum = self.watchdog, self.cfg.train.grad_accum_steps
        for micro in range(accum):
            dog.progress(self.step, "data")
            imgs = self.next_batch()
            imgs = maybe_poison(imgs, self.step + 1, self.rank)  # fault injection for tests; a no-op in real runs
            noise = torch.rand(imgs.shape[0], self.model.grid_size**2, device=self.device, generator=self.mask_gen)
            dog.progress(self.step, "forward")
            loss, pred, mask = self.stepper.forward_backward(imgs, noise, last=micro == accum - 1)
            self.loss_sum += loss.detach()  # no host sync here; read at log time
            self.loss_count += 1
        self.batch = (imgs, pred, mask)
        dog.progress(self.step, "step")
        self.stepper.step(self.step + 1)
        self.progress.timer.add_step(self.cfg.train.micro_batch_size * accum)
        if self.bar is not None:
            self.bar.update(1)

    def next_batch(self) -> torch.Tensor:
        """The next micro-batch of the feed (the stream position counts it, for rollbacks)."""
        t0 = time.perf_counter()
        imgs = next(self.feed)
        self.progress.timer.add_data_wait(time.perf_counter() - t0)
        self.stream_pos += 1
        return maybe_poison_data(imgs, self.stream_pos, self.rank)  # fault injection for tests

    def log(self, lr: float) -> float:
        """Every ``train.log_every`` steps: loss, lr, grad norm, throughput, time left (one host
        sync); non-finite steps are counted here. Returns this rank's mean loss of the interval."""
        step = self.step
        with phase(self.watchdog, step, "log"):
            self.last_loss = (self.loss_sum / max(self.loss_count, 1)).item()
            health = self.stepper.read()
            self._check_nonfinite(health)
            self.progress.report(step, self.last_loss, self.schedule.lr_at(step - 1), self.stepper.grad_norm(),
                                 self.feed.epoch, self.feed.stats(),
                                 {"train/rollbacks": float(self.rollbacks.count)})
            self.loss_sum.zero_()
            self.loss_count, self.last_log_step = 0, step
        return self.last_loss

    def pictures(self) -> None:
        every = self.cfg.train.image_every
        if self.rank == 0 and every and self.step % every == 0 and self.batch is not None:
            self.stepper.wait_params()
            self.tb.image(self.step, "reconstruction", self._grid())

    def evaluate(self) -> None:
        """kNN evaluation at its interval. Restores RNG states and module modes and reads its own
        data: the trajectory is unchanged."""
        if not self.evaluator.due(self.step):
            return
        self.stepper.wait_params()
        with phase(self.watchdog, self.step, "eval"):
            metrics = self.evaluator.maybe_run(self.step, self.model)
        if metrics is not None:
            self.progress.exclude(metrics["eval/seconds"])  # evaluation time is not training throughput

    def decide(self, d: Decision) -> str | None:
        """Act on what the ranks agreed on about step ``d.step`` (one step ago): a lost lock stops
        at once without writing; a rollback goes back to the last good checkpoint; a stop signal
        or a due time-based save writes a checkpoint now. Returns "stop" to end the loop."""
        if d.lock_lost:
            self._lock_lost()
        if d.rollback is not None:
            self.roll_back(d)
            return None
        if d.stop or d.save_time:
            self.save(reason="signal" if d.stop else "time")
        if d.stop:
            if self.last_checkpoint is not None and self.last_checkpoint.name == tag_for_step(self.step):
                log.warning("stop signal received: checkpoint at step %d written, stopping (%s; a requeue or the "
                            "same command again resumes from it)", self.step,
                            ", ".join(signal.Signals(s).name for s in self.signals.history) or "another rank's signal")
            else:
                log.error("stop signal received but the checkpoint at step %d failed; a resume starts from %s",
                          self.step, self.last_checkpoint)
            return "stop"
        return None

    def step_save_due(self) -> bool:
        every = self.cfg.checkpoint.every_steps
        return every > 0 and self.step % every == 0 and not self._saved_at(self.step)

    def save(self, reason: str) -> Path | None:
        """A checkpoint of this step (all ranks); a failed write is retried at the next interval
        (``checkpoint.on_write_error``)."""
        self.stepper.wait_params()  # the weights a checkpoint records are the gathered ones
        with phase(self.watchdog, self.step, "save"):
            try:
                saved = self.ckpt.save_training(self.engine, self.step, self.cfg, self.total_steps, self.feed.epoch,
                                                self.feed.state_dict(), self.mask_gen, self.stream_pos,
                                                self.skips.recorded())
            except (OSError, CheckpointError) as exc:
                if self.cfg.checkpoint.on_write_error == "stop":
                    raise
                log.error("checkpoint at step %d failed (%s); 'latest' still names the previous one; "
                          "retrying at the next interval (checkpoint.on_write_error=retry)", self.step, exc)
                return None
        self.last_checkpoint = saved
        self.control.saved()
        return saved

    def roll_back(self, d: Decision) -> None:
        """Go back to the last good checkpoint before the trouble began and continue with the data
        after it (the window in between is recorded and skipped by later resumes too)."""
        cfg = self.cfg
        onset = d.rollback_onset if d.rollback_onset is not None else d.step
        if not cfg.train.rollback or self.rollbacks.count >= cfg.train.max_rollbacks:
            why = "train.rollback=false" if not cfg.train.rollback else \
                f"train.max_rollbacks={cfg.train.max_rollbacks} rollbacks done already"
            raise TrainingDiverged(f"{d.rollback}; not rolling back ({why}). The last good checkpoint is "
                                   f"{self.rollbacks.good_checkpoint(onset)}; lower optim.blr, set optim.grad_clip, "
                                   "or skip the data (train.skip_batches)")
        self.stepper.wait_params()
        with phase(self.watchdog, self.step, "rollback"):
            target = self.rollbacks.good_checkpoint(onset)
            if target is None:
                raise TrainingDiverged(f"{d.rollback}; no checkpoint before step {onset} to roll back to "
                                       f"(checkpoint.every_steps / keep_last)")
            state = self.ckpt.roll_back_to(self.engine, target, self.mask_gen)
            skipped = self.stream_pos - int(state.trainer.get("stream_pos", state.step * cfg.train.grad_accum_steps))
            record = self.rollbacks.record(d.rollback, detected_at=self.step, onset=onset, to_step=state.step,
                                           batches=skipped, checkpoints=self.ckpt)
            self.skips.rolled_back(record)
        log.warning("rollback %d/%d: %s. Back to the checkpoint of step %d; the %d micro-batches per rank read since "
                    "then are skipped (recorded in %s)", self.rollbacks.count, cfg.train.max_rollbacks, d.rollback,
                    state.step, skipped, self.rollbacks.path)
        self.tb.scalars(self.step, {"train/rollbacks": float(self.rollbacks.count)})
        self.step, self.last_checkpoint = state.step, target
        self.rollbacks_done += 1
        self.control.rolled_back()
        self.stepper.reset_health()
        self.loss_sum.zero_()
        self.loss_count, self.last_log_step = 0, self.step
        self.progress.rolled_back(self.step)

    def after_profile(self) -> None:
        if (done := self.profiler.after_step(self.step, self.stepper, settle=self._settle)) is not None:
            self.profile = done
            log.info("profile of steps %d-%d: %s", self.step - done.steps + 1, self.step, done.line())

    # ------------------------------------------------------------------ 5. wrap up
    def finish(self, status: str) -> None:
        self.stepper.close()
        if self.bar is not None:
            self.bar.close()
        if self.rank == 0 and status == "finished" and self.batch is not None:
            grid = self._grid()
            png = save_png(grid, self.run_dir.reconstruction)
            self.tb.image(self.step, "reconstruction", grid)
            log.info("done: %d steps. checkpoint %s, TensorBoard events %s, reconstruction %s",
                     self.step, self.last_checkpoint, self.tb.log_dir, png)

    def close(self) -> None:
        """Release everything (also after an exception)."""
        self.watchdog.stop()
        for part in ("tb", "signals", "feed"):
            obj = getattr(self, part, None)
            if obj is not None:
                (obj.restore if part == "signals" else obj.close)()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.destroy()  # release ZeRO state and helper threads before interpreter teardown

    # ------------------------------------------------------------------ helpers
    def _grid(self) -> torch.Tensor:
        imgs, pred, mask = self.batch
        return reconstruction_grid(self.model, imgs, pred, mask, self.cfg.data.mean, self.cfg.data.std)

    def _settle(self) -> None:
        self.stepper.wait_params()
        self.control.agreement.settle()

    def _saved_at(self, step: int) -> bool:
        return self.last_checkpoint is not None and self.last_checkpoint.name == tag_for_step(step)

    def _lock_lost(self) -> None:
        raise RunLockLost(f"the lock of {self.run_dir.path} was taken over by another job (see rank 0's log); this "
                          f"job stops at step {self.step} without saving")

    def _check_nonfinite(self, health: StepHealth) -> None:
        """Report the steps skipped for non-finite loss/gradients since the last log step; after
        ``train.max_nonfinite_steps`` in a row (read here, at most ``log_every`` steps late) the
        ranks roll back (or stop) together."""
        cfg, step = self.cfg, self.step
        if health.new:
            if health.streak:
                log.warning("step %d: non-finite loss/gradients, update skipped (%d in a row, %d in total)",
                            step, health.streak, health.skipped_total)
            if health.new > min(health.streak, step - self.last_log_step):
                log.warning("steps %d-%d: %d updates skipped for non-finite loss/gradients (%d in total)",
                            self.last_log_step + 1, step, health.new, health.skipped_total)
            self.tb.scalars(step, {"train/nonfinite_steps": float(health.skipped_total)})
        if health.worst_streak >= cfg.train.max_nonfinite_steps:
            start = step - health.streak + 1 if health.streak >= cfg.train.max_nonfinite_steps else \
                self.last_log_step + 1
            if not cfg.train.rollback:
                raise TrainingDiverged(
                    f"{health.worst_streak} consecutive steps had non-finite loss or gradients "
                    f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); stopping. The last good checkpoint "
                    f"is {self.last_checkpoint}; lower optim.blr, set optim.grad_clip, or check the data")
            self.control.diverged(start)


@contextlib.contextmanager
def hold_run_directory(cfg: Config, run: RunDir, ctx: DistContext) -> Iterator[RunLock]:
    """Rank 0 takes the run directory's lock for the whole job (waiting, or taking over a stale
    one, per ``lock.*``), every rank learns whether it did, and the lock is released at the end."""
    lock = RunLock(run, wait_s=cfg.lock.wait_s, stale_s=cfg.lock.stale_s, heartbeat_s=cfg.lock.heartbeat_s,
                   takeover=cfg.lock.takeover, version=__version__)
    error: RunLocked | None = None
    if ctx.env.rank == 0:
        try:
            waited = lock.acquire(log)
            if waited > 1:
                log.info("run directory %s taken after waiting %.0f s", run.path, waited)
        except RunLocked as exc:
            error = exc
    if agree_max([int(error is not None)], ctx.control_group)[0]:
        raise error or RunLocked(f"rank 0 could not take the run directory {run.path} (see its log)")
    try:
        yield lock
    finally:
        lock.release()


def _progress_bar(cfg: Config, rank: int, step: int, total: int):
    want = cfg.train.progress_bar
    if rank != 0 or want == "off" or (want == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)
