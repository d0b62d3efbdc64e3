"""The training loop: ``main(cfg)`` joins the job and takes the run directory, ``train`` reads
top to bottom.

1. plan the resume (which checkpoint, and on another job size the config that keeps the batch);
2. build the model, the data feed and the DeepSpeed engine;
3. resume from the newest valid checkpoint if the run directory has one;
4. loop: set lr, run ``grad_accum_steps`` micro-batches, step, log, checkpoint;
5. on SIGTERM/SIGUSR1 (SLURM preemption or time limit) checkpoint and return "preempted".

The same ``main`` runs under ``tools/train.py`` (one process), ``torchrun`` and SLURM
(through ``maescale.launch``).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from maescale import __version__
from maescale.checkpoint import CheckpointError, CheckpointManager, load_pretrained_into, plan_resume
from maescale.config import Config
from maescale.distributed import DistContext, agree_max, init_distributed
from maescale.faults import fault_point, maybe_poison
from maescale.metrics import ProgressLog, TensorBoardLogger, reconstruction_grid, save_png
from maescale.models import build_model
from maescale.optim import (OptimizerStep, StepHealth, build_engine, effective_batch, lean_step_enabled, make_schedule,
                            set_lr)
from maescale.parent import exit_with_launcher
from maescale.probe import build_evaluator
from maescale.profiling import StepProfile, StepProfiler
from maescale.rundir import RunDir, RunLock, RunLocked, RunLockLost, tag_for_step

log = logging.getLogger("maescale.train")


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
    profile: dict[str, Any] | None = None  # train.profile_at: per-step host/device cost


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients."""


class StopSignals:
    """Turns SIGTERM / SIGUSR1 into a flag the loop polls, so the loop can save and stop cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, enabled: bool, extra: Sequence[int] = ()):
        self.received: int | None = None
        self.history: list[int] = []  # all of them: the launcher requeues only on its own signal
        self._previous: dict[int, Any] = {}
        if enabled:
            for sig in (*self.SIGNALS, *extra):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        self.history.append(signum)

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


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
                         "with tools/make_shards.py; or use train.max_steps")
    return max(1, round(cfg.train.epochs * steps_per_epoch)), steps_per_epoch


def main(cfg: Config, extra_stop_signals: Sequence[int] = ()) -> TrainResult:
    """Train (or resume training) the run described by ``cfg``: join the job, take the run
    directory (one job writes it at a time), then :func:`train`.

    ``extra_stop_signals``: signals besides SIGTERM/SIGUSR1 that mean "checkpoint and stop"
    (the SLURM launcher adds the one submitit asks SLURM to send before the time limit).
    """
    exit_with_launcher()  # a rank whose torchrun/srun/submitit dies stops (no-op for a plain process)
    ctx = init_distributed(cfg.train.device, cfg.deepspeed.timeout_minutes)
    run = RunDir(cfg.output_dir)
    setup_logging(ctx.env.rank, run)
    with hold_run_directory(cfg, run, ctx) as lock:
        return train(cfg, ctx, run, lock, extra_stop_signals)


def train(cfg: Config, ctx: DistContext, run: RunDir, lock: RunLock,
          extra_stop_signals: Sequence[int] = ()) -> TrainResult:
    """The training of a job that holds its run directory (see the module docstring)."""
    from maescale.data.feed import build_feed
    from maescale.flops import peak_flops, train_flops_per_image
    from maescale.models.presets import PRESETS

    # ---- 1. plan the resume, record the config that runs
    rank, world, device = ctx.env.rank, ctx.env.world_size, ctx.device
    ckpt = CheckpointManager(run.path, rank, world, cfg.checkpoint.keep_last, ctx.control_group)
    ckpt.clean_partials()
    plan = plan_resume(cfg, ckpt)  # on another job size this re-derives grad_accum_steps
    cfg = plan.cfg
    ckpt.config_yaml = cfg.to_yaml()
    if rank == 0:
        cfg.save(run.config)
        log.info("maescale %s: run directory %s", __version__, run.path.resolve())

    # ---- 2. model, data, engine
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, device=device)
    if cfg.model.init_from and plan.path is None:
        load_pretrained_into(model, cfg.model.init_from, resample_patch=cfg.model.init_resample_patch)
        log.info("initialised from public MAE checkpoint %s", cfg.model.init_from)
    if cfg.model.compile:
        model.compile_model("blocks" if cfg.model.compile is True else cfg.model.compile)
    feed = build_feed(cfg, rank, world, device)  # normalised images on the device
    total_steps, steps_per_epoch = plan_length(cfg, feed.batches_per_epoch)
    schedule = make_schedule(cfg, world, total_steps, steps_per_epoch)
    engine = build_engine(cfg, model, world, device)
    model = engine.module
    optimizer_step = OptimizerStep(engine, lean_step_enabled(cfg), device)
    log.info("model %s (%.1fM parameters), %d process(es), effective batch %d, %d steps, peak lr %.3g, "
             "warmup %d steps, ZeRO-%d%s, %s", cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6,
             world, effective_batch(cfg, world), total_steps, schedule.peak_lr, schedule.warmup_steps,
             cfg.deepspeed.zero_stage, " (lean step)" if optimizer_step.lean else "", cfg.train.precision)

    # ---- 3. resume
    # Masks come from a generator of their own (per rank), so nothing else that draws random
    # numbers (DataLoader start-up, libraries) can shift them: resume stays exact.
    mask_gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank + 1)
    torch.manual_seed(cfg.train.seed * 1000 + rank + 1)
    step = plan.restore(ckpt, engine, feed, mask_gen)
    resumed_from = step if plan.path is not None else None
    last_checkpoint: Path | None = plan.path
    if plan.resized:  # rewrite at once in this job's layout: later resumes at this size need no conversion
        last_checkpoint = _save(ckpt, engine, feed, cfg, step, total_steps, mask_gen) or last_checkpoint
        log.info("checkpoint %s rewritten for %d processes", last_checkpoint, world)

    # ---- 4. the loop
    model_flops, hw_flops = train_flops_per_image(PRESETS[cfg.model.name], cfg.model.img_size,
                                                  cfg.model.mask_ratio, cfg.model.act_ckpt_every)
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None, cfg.train.peak_tflops,
                      dtype=cfg.train.precision)
    tb = TensorBoardLogger(run.path, enabled=rank == 0)
    signals = StopSignals(cfg.checkpoint.on_signal, extra_stop_signals)
    # kNN accuracy of the encoder on labelled shards (eval.*; off unless eval.every_steps > 0).
    evaluator = build_evaluator(cfg, rank=rank, world=world, device=device, group=ctx.control_group, tb=tb,
                                run_dir=run.path, total_steps=total_steps)
    if step == 0:
        evaluator.maybe_run(step, model)  # the encoder at initialisation: the baseline of the curve
    bar = _progress_bar(cfg, rank, step, total_steps)
    progress = ProgressLog(tb, total_steps, world, model_flops, hw_flops, peak, device, bar)
    timer = progress.timer
    profiler = StepProfiler(device, cfg.train.profile_at, cfg.train.profile_steps)
    profile: StepProfile | None = None
    mean, std = cfg.data.mean, cfg.data.std
    last_save_time = time.monotonic()
    loss_sum = torch.zeros((), device=device)
    loss_count, last_loss, status = 0, None, "finished"
    last_log_step = step
    imgs = pred = mask = None  # the last micro-batch, for the final reconstruction picture
    batch_images = cfg.train.micro_batch_size * cfg.train.grad_accum_steps

    while step < total_steps:
        profiler.before_step(step)
        lr = schedule.lr_at(step)
        set_lr(engine.optimizer, lr)
        for _ in range(cfg.train.grad_accum_steps):
            t0 = time.perf_counter()
            imgs = next(feed)
            timer.add_data_wait(time.perf_counter() - t0)
            imgs = maybe_poison(imgs, step + 1, rank)  # fault injection for tests; a no-op in real runs
            noise = torch.rand(imgs.shape[0], model.grid_size**2, device=device, generator=mask_gen)
            loss, pred, mask = engine(imgs, noise=noise)
            engine.backward(loss)
            optimizer_step.step()  # a step with non-finite loss or gradients leaves the weights alone
            loss_sum += loss.detach()  # no host sync here; read at log time
            loss_count += 1
        step += 1
        fault_point("train.after_step", step)
        if (done := profiler.after_step(step)) is not None:
            profile = done
            log.info("profile of steps %d-%d: %s", step - done.steps + 1, step, done.line())
        timer.add_step(batch_images)
        if bar is not None:
            bar.update(1)

        if step % cfg.train.log_every == 0 or step == total_steps:
            last_loss = (loss_sum / max(loss_count, 1)).item()  # the host syncs, every log_every steps
            _check_nonfinite(optimizer_step.read(), cfg, tb, step, last_log_step, last_checkpoint)
            progress.report(step, last_loss, lr, optimizer_step.grad_norm(), feed.epoch, feed.stats())
            loss_sum.zero_()
            loss_count = 0
            last_log_step = step
        if rank == 0 and cfg.train.image_every and step % cfg.train.image_every == 0:
            tb.image(step, "reconstruction", reconstruction_grid(model, imgs, pred, mask, mean, std))
        # Restores RNG states and module modes and reads its own data: the trajectory is unchanged.
        if (metrics := evaluator.maybe_run(step, model)) is not None:
            timer.start += metrics["eval/seconds"]  # evaluation time is not training throughput

        # Ranks agree (on the CPU control group) on stopping and on time-based saves.
        time_due = cfg.checkpoint.every_minutes > 0 and time.monotonic() - last_save_time >= 60 * cfg.checkpoint.every_minutes
        stop, time_due, lost = agree_max([int(signals.requested), int(time_due), int(lock.lost)], ctx.control_group)
        if lost:  # another job took the run directory over: write nothing more
            raise RunLockLost(f"the lock of {run.path} was taken over by another job (see rank 0's log); this job "
                              f"stops at step {step} without saving")
        step_due = cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0
        if stop or time_due or step_due or (step == total_steps and cfg.checkpoint.final):
            saved = _save(ckpt, engine, feed, cfg, step, total_steps, mask_gen)
            if saved is not None:
                last_checkpoint = saved
                last_save_time = time.monotonic()
        if stop:
            status = "preempted"
            if last_checkpoint is not None and last_checkpoint.name == tag_for_step(step):
                log.warning("stop signal received: checkpoint at step %d written, stopping (%s; a requeue or the "
                            "same command again resumes from it)", step,
                            ", ".join(signal.Signals(s).name for s in signals.history) or "another rank's signal")
            else:
                log.error("stop signal received but the checkpoint at step %d failed; a resume starts from %s",
                          step, last_checkpoint)
            break

    # ---- 5. wrap up
    if bar is not None:
        bar.close()
    if rank == 0 and status == "finished" and imgs is not None:
        grid = reconstruction_grid(model, imgs, pred, mask, mean, std)
        png = save_png(grid, run.reconstruction)
        tb.image(step, "reconstruction", grid)
        log.info("done: %d steps. checkpoint %s, TensorBoard events %s, reconstruction %s",
                 step, last_checkpoint, tb.log_dir, png)
    tb.close()
    signals.restore()
    feed.close()
    engine.destroy()  # release ZeRO state and helper threads before interpreter teardown
    return TrainResult(status, rank, step, total_steps, run.path, last_checkpoint, resumed_from, last_loss,
                       tuple(signals.history), progress.history, profile.as_dict() if profile else None)


# --------------------------------------------------------------------------------------------
# Pieces of the loop
# --------------------------------------------------------------------------------------------


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


def _check_nonfinite(health: StepHealth, cfg: Config, tb: TensorBoardLogger, step: int, last_log_step: int,
                     last_checkpoint: Path | None) -> None:
    """Report the steps skipped for non-finite loss/gradients since the last log step; stop after
    ``train.max_nonfinite_steps`` in a row (read here, so at most ``log_every`` steps late)."""
    if health.new:
        if health.streak:
            log.warning("step %d: non-finite loss/gradients, update skipped (%d in a row, %d in total)",
                        step, health.streak, health.skipped_total)
        if health.new > min(health.streak, step - last_log_step):
            log.warning("steps %d-%d: %d updates skipped for non-finite loss/gradients (%d in total)",
                        last_log_step + 1, step, health.new, health.skipped_total)
        tb.scalars(step, {"train/nonfinite_steps": float(health.skipped_total)})
    if health.worst_streak >= cfg.train.max_nonfinite_steps:
        raise TrainingDiverged(
            f"{health.worst_streak} consecutive steps had non-finite loss or gradients (train.max_nonfinite_steps="
            f"{cfg.train.max_nonfinite_steps}); stopping. The last good checkpoint is {last_checkpoint}; "
            "lower optim.blr, set optim.grad_clip, or check the data")


def _save(ckpt: CheckpointManager, engine, feed, cfg: Config, step: int, total_steps: int,
          mask_gen: torch.Generator) -> Path | None:
    """A checkpoint of this step; a failed write is retried at the next interval (``checkpoint.on_write_error``)."""
    try:
        return ckpt.save_training(engine, step, cfg, total_steps, feed.epoch, feed.state_dict(), mask_gen)
    except (OSError, CheckpointError) as exc:
        if cfg.checkpoint.on_write_error == "stop":
            raise
        log.error("checkpoint at step %d failed (%s); 'latest' still names the previous one; "
                  "retrying at the next interval (checkpoint.on_write_error=retry)", step, exc)
        return None


def _progress_bar(cfg: Config, rank: int, step: int, total: int):
    want = cfg.train.progress_bar
    if rank != 0 or want == "off" or (want == "auto" and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=step, unit="step", dynamic_ncols=True)
