"""Resume planning: which checkpoint a job starts from, and what it takes to load it here.

The loop makes two calls. Before the engine is built, :func:`plan_resume` picks the checkpoint
(``resume``: newest valid, refuse, or an explicit path) and, when the job's size differs from the
one that wrote it, keeps the effective batch by re-deriving ``train.grad_accum_steps`` and converts
the ZeRO-sharded optimizer state with DeepSpeed's ``ds_to_universal`` (``step_N/universal/``); the
plan's ``cfg`` is the config that runs, and is what ``config.yaml`` records. After the engine is
built, :meth:`ResumePlan.restore` loads weights, optimizer state, RNG states and the data position
(mapping the old ranks' positions onto this job's on a resize) and returns the step.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from maescale.checkpoint.manager import (CheckpointError, CheckpointManager, is_world_size_independent,
                                         read_trainer_state, restore_rng, validate_checkpoint)
from maescale.config import Config, deep_merge
from maescale.distributed import agree_max
from maescale.rundir import publish, step_of, write_text_atomic

log = logging.getLogger("maescale.checkpoint")


@dataclass
class ResumePlan:
    """Where a job starts: from scratch (``path`` None) or from a checkpoint, with the config to run."""

    cfg: Config  # the config that runs (a resize re-derives grad_accum_steps, loads universal state)
    path: Path | None = None  # the checkpoint to resume from
    universal: Path | None = None  # its world-size independent form, when the job size changed
    resized: bool = False  # written by a job of another size: rewrite it in this job's layout at once
    # The optimizer's parameter groups the checkpoint was written with (names per group), which the
    # engine must be rebuilt with; "legacy" for checkpoints from before groups were recorded (the
    # two-group layout with cls/mask tokens exempt from decay); None when starting fresh.
    layout: list[dict[str, Any]] | str | None = None
    trainer: dict[str, Any] | None = None  # trainer_state.json of the checkpoint that was loaded

    def stream_pos(self, step: int, grad_accum_steps: int) -> int:
        """Micro-batches this rank had drawn from its data at ``step`` (skipped ones included)."""
        if self.trainer is not None and "stream_pos" in self.trainer:
            return int(self.trainer["stream_pos"])
        return step * grad_accum_steps

    def restore(self, manager: CheckpointManager, engine, data: Any, mask_gen: torch.Generator) -> int:
        """Load the checkpoint into ``engine``, ``data`` (anything with ``load_state_dict`` taking a
        data position) and ``mask_gen``; returns the step to continue from (0 when starting fresh).

        A checkpoint that passed validation but cannot be loaded (a race with another writer, a
        disk error) is reported and the previous valid one of the same job size is loaded instead,
        as for one that fails validation; ``self.path`` then names the one that was loaded."""
        if self.path is None:
            return 0
        tried: list[str] = []
        for path in self._fallbacks(manager):
            problem = None
            try:
                state = manager.load(engine, path, self.universal if path == self.path else None)
            except Exception as exc:  # noqa: BLE001 - every rank must reach the agreement below
                problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if not agree_max([1 if problem else 0], manager.group)[0]:
                if path != self.path:
                    log.warning("resuming from %s instead of %s, which could not be loaded", path, self.path)
                    self.path = path
                self.trainer = state.trainer
                return self._restore_rank_state(state, manager.rank, data, mask_gen)
            tried.append(f"{path} ({problem or 'another rank failed to load it'})")
            log.warning("checkpoint %s passed validation but cannot be loaded (%s); trying the previous one", path,
                        problem or "another rank failed to load it")
        raise CheckpointError("no checkpoint could be loaded: " + "; ".join(tried) + ". Move the bad ones out of "
                              f"{manager.root}, or start a new output_dir")

    def _fallbacks(self, manager: CheckpointManager) -> Iterator[Path]:
        """This plan's checkpoint, then (validated only when needed) the older valid ones written by a
        job of the same size; an explicit ``resume=PATH`` or a resize has no fallback."""
        assert self.path is not None
        first = self.path
        yield first
        if self.resized or isinstance(self.cfg.resume, str):
            return
        for p in manager.candidates():
            if (step_of(p) or 0) >= (step_of(first) or 0):
                continue
            try:
                validate_checkpoint(p, shard=(manager.rank, manager.world_size))
                usable = int(read_trainer_state(p)["world_size"]) == manager.world_size
            except (CheckpointError, KeyError, ValueError):
                usable = False
            if not agree_max([0 if usable else 1], manager.group)[0]:
                yield p

    def _restore_rank_state(self, state, rank: int, data: Any, mask_gen: torch.Generator) -> int:
        if "old_ranks" in state.rank_state:  # a job of another size wrote it
            old = state.rank_state["old_ranks"]
            if rank < len(old):
                restore_rng(old[rank]["rng"], mask_gen)
            data.load_state_dict({"ranks": [o["data"] for o in old]})  # same global position
        else:
            restore_rng(state.rank_state["rng"], mask_gen)
            data.load_state_dict(state.rank_state["data"])
        log.info("resumed from %s at step %d", self.path, state.step)
        return state.step


def plan_resume(cfg: Config, manager: CheckpointManager) -> ResumePlan:
    """The :class:`ResumePlan` of this job (a collective: every rank calls it)."""
    path = _pick(cfg, manager)
    world = manager.world_size
    if path is None:
        return ResumePlan(cfg)
    saved = read_trainer_state(path)
    cfg, layout = _keep_group_layout(cfg, saved, path)
    old_world = int(saved["world_size"])
    if old_world == world:
        return ResumePlan(cfg, path, layout=layout)
    # Another size: keep the effective batch, so the step count, lr schedule and epoch length
    # keep their meaning, by re-deriving grad_accum_steps.
    old_batch = int(saved["micro_batch_size"]) * int(saved["grad_accum_steps"]) * old_world
    per_micro_step = cfg.train.micro_batch_size * world
    if old_batch % per_micro_step:
        raise CheckpointError(
            f"checkpoint {path} was trained by {old_world} processes with an effective batch of {old_batch}; "
            f"{world} processes x train.micro_batch_size={cfg.train.micro_batch_size} cannot make {old_batch}. "
            f"Set train.micro_batch_size (and train.grad_accum_steps) so that micro x accum x {world} = {old_batch}.")
    accum = old_batch // per_micro_step
    if accum != cfg.train.grad_accum_steps:
        log.warning("resuming a %d-process run on %d processes: train.grad_accum_steps %d -> %d keeps the "
                    "effective batch at %d", old_world, world, cfg.train.grad_accum_steps, accum, old_batch)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum_steps=accum))
    universal = None
    if not is_world_size_independent(path):
        universal = prepare_universal(path, manager.rank, manager.group)
        extra = deep_merge(cfg.deepspeed.extra, {"checkpoint": {"load_universal": True}})
        cfg = dataclasses.replace(cfg, deepspeed=dataclasses.replace(cfg.deepspeed, extra=extra))
    return ResumePlan(cfg, path, universal, resized=True, layout=layout)


def _keep_group_layout(cfg: Config, saved: dict[str, Any], path: Path) -> tuple[Config, list[dict[str, Any]] | str]:
    """The parameter-group layout and weight-decay rule a resumed run must keep: ZeRO's flat
    partitions follow the groups, so moving a tensor between groups would load the saved
    optimizer state into the wrong parameters. The config that runs records the rule."""
    layout: list[dict[str, Any]] | str = saved.get("param_groups") or "legacy"
    tokens = bool(saved.get("weight_decay_tokens", False))  # before the rule was recorded: tokens exempt
    if tokens != cfg.optim.weight_decay_tokens:
        log.warning("checkpoint %s was written with optim.weight_decay_tokens=%s; keeping it (its optimizer state "
                    "is laid out by that rule; start a new output_dir to change it)", path, str(tokens).lower())
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, weight_decay_tokens=tokens))
    return cfg, layout


def _pick(cfg: Config, manager: CheckpointManager) -> Path | None:
    """Which checkpoint to resume from, per ``cfg.resume`` (True: newest valid; False; a path)."""
    if cfg.resume is False:
        if manager.run.has_checkpoints():  # the same test tools/submit.py makes on the login node
            raise CheckpointError(f"resume=false but {manager.root} already holds checkpoints: pick a new "
                                  "output_dir, or resume=true to continue that run")
        return None
    explicit = cfg.resume if isinstance(cfg.resume, str) else None
    path = manager.find_valid(explicit)
    if path is None and manager.candidates():
        log.warning("no valid checkpoint in %s: starting from scratch", manager.root)
    return path


UNIVERSAL_DIR = "universal"


def conversion_workers() -> int:
    """Worker processes for ``ds_to_universal``: this process's CPU cores, at most 8 (each extract
    worker holds one rank's optimizer file; each merge worker one parameter's fragments)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


def prepare_universal(path: Path, rank: int, group: object = None, workers: int | None = None,
                      wait_s: float = 6 * 3600.0, poll_s: float = 2.0) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal (world-size independent) form.

    Rank 0 runs DeepSpeed's ``ds_to_universal`` into ``path/universal`` (once; a finished
    conversion is reused) with :func:`conversion_workers` parallel workers. The other ranks do not
    wait inside a collective, whose timeout (``deepspeed.timeout_minutes``) a large conversion can
    outlast: they watch the file system for the published result (or rank 0's error file) and
    only then meet rank 0 in one short agreement. Returns that directory.
    """
    import time

    out = Path(path) / UNIVERSAL_DIR
    failed = Path(path) / (UNIVERSAL_DIR + ".error")
    done = out / "mp_rank_00_model_states.pt"
    error: str | None = None
    if rank == 0 and not done.is_file():
        import subprocess
        import sys

        failed.unlink(missing_ok=True)
        tmp = Path(path) / (UNIVERSAL_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        n = workers or conversion_workers()
        log.info("converting %s to a universal checkpoint for a job of another size (%d workers)", path, n)
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(path), "--output_folder", str(tmp), "--num_extract_workers", str(n),
                               "--num_merge_workers", str(n)], capture_output=True, text=True)
        if proc.returncode != 0:
            error = (f"converting {path} to a universal checkpoint failed:\n{proc.stderr[-2000:]}\n"
                     f"Convert by hand: python -m deepspeed.checkpoint.ds_to_universal --input_folder {path} "
                     f"--output_folder {out}")
            write_text_atomic(failed, error)
        else:
            publish(tmp, out)
            log.info("converted in %.0f s", time.monotonic() - t0)
    elif rank != 0:
        t0 = time.monotonic()
        while not done.is_file() and not failed.is_file():
            if time.monotonic() - t0 > wait_s:
                error = f"rank 0 did not finish converting {path} to a universal checkpoint in {wait_s:.0f} s"
                break
            time.sleep(poll_s)
    if agree_max([1 if error else 0], group)[0]:
        raise CheckpointError(error or (failed.read_text() if failed.is_file() else
                                        "rank 0 failed to convert the checkpoint to universal form"))
    return out
