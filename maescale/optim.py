"""The optimizer side of training: AdamW with MAE's weight-decay groups, the lr schedule, the
DeepSpeed JSON and engine, and the optimizer step with its non-finite guard.

The DeepSpeed JSON is derived from the typed config (:func:`deepspeed_config`), then the raw
``deepspeed.extra`` section is merged over it for anything the typed keys do not cover.
The learning rate is a pure function of the optimizer step (:func:`lr_at`), set on the
optimizer before every step: nothing about the schedule needs saving to resume exactly.

The lean step (``deepspeed.lean_step``, on by default for ZeRO-1/2 without clipping). DeepSpeed's
ZeRO-1/2 optimizer checks every gradient for inf/NaN and computes the global grad norm with
a few kernels per parameter (about 1,000 small ops per step for ViT-H) and a host
synchronisation, even with clipping off: on a GPU that step is host-bound. The lean step turns
both off (``bf16.check_grad_overflow: false``, ``zero_optimization.compute_grad_norm: false``) and
keeps the guarantees with a handful of device-side ops (:class:`OptimizerStep`): at each
accumulation boundary one multi-tensor norm over this rank's gradient partition, summed over the
data-parallel ranks, gives the global grad norm (logged at log steps) and the finiteness flag,
which goes to the fused AdamW as ``found_inf``: a step with non-finite loss or gradients leaves
weights and Adam state untouched on every rank, without a host sync. Clipping needs the norm
before the step on the host, and ZeRO-3 keeps its own path: both keep DeepSpeed's own checks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from maescale.config import Config, deep_merge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """Per-step learning rate: linear warmup from 0, then half-cycle cosine to ``min_lr``."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        return lr_at(step, self.peak_lr, self.min_lr, self.warmup_steps, self.total_steps)


def lr_at(step: int, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """MAE schedule: ``peak * step / warmup`` during warmup, then
    ``min + (peak - min) * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if total_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def effective_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over the whole job."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world_size


def peak_lr(cfg: Config, world_size: int) -> float:
    """``optim.lr`` if set, else ``blr * effective_batch / 256`` (the linear scaling rule)."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.blr * effective_batch(cfg, world_size) / 256


def make_schedule(cfg: Config, world_size: int, total_steps: int, steps_per_epoch: float | None) -> Schedule:
    """The schedule for this job; warmup in steps, or in epochs converted with ``steps_per_epoch``."""
    if cfg.optim.warmup_steps is not None:
        warmup = cfg.optim.warmup_steps
    elif cfg.optim.warmup_epochs == 0:
        warmup = 0
    elif steps_per_epoch:
        warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    else:
        raise ValueError("optim.warmup_epochs needs the epoch length (data.num_samples or a sizes file); "
                         "or set optim.warmup_steps")
    return Schedule(peak_lr(cfg, world_size), cfg.optim.min_lr, min(warmup, total_steps), total_steps)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decay on weight matrices only; no decay on biases, norm weights
    (1-D tensors), position embeddings and cls/mask tokens (``model.no_weight_decay()``)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def param_group_names(model: nn.Module, weight_decay: float) -> dict[str, list[str]]:
    """Names of the parameters in each group of :func:`param_groups` (for tests and logs)."""
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [ids[id(p)] for p in g["params"]] for g in param_groups(model, weight_decay)}


def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """Client AdamW with fused kernels (on GPU and CPU): one launch per group instead of several
    per parameter, and the ``found_inf`` input that the lean step needs."""
    return torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=lr, betas=cfg.optim.betas,
                             eps=cfg.optim.eps, fused=True)


def lean_step_enabled(cfg: Config) -> bool:
    """Whether this config runs the lean ZeRO step (see the module docstring)."""
    if cfg.deepspeed.lean_step == "auto":
        return cfg.deepspeed.zero_stage in (1, 2) and cfg.optim.grad_clip == 0
    return bool(cfg.deepspeed.lean_step)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this config, with ``deepspeed.extra`` merged over it."""
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": effective_batch(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,  # maescale does its own logging
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if cfg.deepspeed.zero_stage == 1:
        # Stage 1 keeps whole gradients anyway: copying each one into a contiguous bucket first
        # only adds a copy kernel (and host ops) per parameter and step (tiny preset: 2,885 -> 2,248 ops).
        ds["zero_optimization"]["contiguous_gradients"] = False
    if cfg.deepspeed.zero_stage >= 2:
        ds["zero_optimization"].update({"overlap_comm": True, "contiguous_gradients": True,
                                        "reduce_bucket_size": 5e8})
    if cfg.deepspeed.zero_stage == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    if lean_step_enabled(cfg):
        ds["zero_optimization"]["compute_grad_norm"] = False
        ds["bf16"]["check_grad_overflow"] = False
    return deep_merge(ds, cfg.deepspeed.extra)


def build_engine(cfg: Config, model: nn.Module, world_size: int, device: torch.device):
    """``deepspeed.initialize`` with the client AdamW; returns the engine (optimizer inside)."""
    import deepspeed

    model.to(device)
    optimizer = build_optimizer(model, cfg, lr=peak_lr(cfg, world_size))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size))
    return engine


@dataclass
class StepHealth:
    """Non-finite steps as read at a log step (one host sync): totals since the start of this
    process, the streak ending at the last step, and the longest streak since the last read."""

    skipped_total: int
    streak: int
    worst_streak: int
    new: int  # skipped since the previous read


class OptimizerStep:
    """The optimizer step of the loop: ``engine.step()``, plus the non-finite accounting.

    Call :meth:`step` after every ``engine.backward`` (DeepSpeed steps at the accumulation
    boundary). With ``lean`` (ZeRO-1/2, see the module docstring) the finiteness flag and the grad
    norm are computed here, on the device; otherwise DeepSpeed's own check decides and its norm is
    reported. The counters live on the device and are read by :meth:`read` at log steps.
    """

    def __init__(self, engine, lean: bool, device: torch.device):
        self.engine, self.lean = engine, lean
        self.zero = engine.optimizer
        if lean:
            client = getattr(self.zero, "optimizer", None)
            if not hasattr(self.zero, "averaged_gradients") or not getattr(client, "defaults", {}).get("fused"):
                raise RuntimeError("deepspeed.lean_step needs DeepSpeed's ZeRO-1/2 optimizer around a fused AdamW")
            self.client = client
            self.client.found_inf = torch.zeros((), device=device)
        self._sq_norm: torch.Tensor | None = None
        self._skipped = torch.zeros((), device=device)
        self._counts = torch.zeros(3, device=device)  # total, streak, worst streak since the last read
        self._read_total = 0

    def step(self) -> None:
        """``engine.step()``; at an accumulation boundary also check and count the step."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and self.lean:
            self._check_gradients()
        self.engine.step()
        if boundary:
            skipped = self.client.found_inf if self.lean else self._host_flag(not self.engine.was_step_applied())
            total, streak, worst = self._counts.unbind()
            streak = (streak + skipped) * skipped  # back to 0 on an applied step
            self._counts = torch.stack([total + skipped, streak, torch.maximum(worst, streak)])

    def _check_gradients(self) -> None:
        import torch.distributed as dist

        # This rank's partition of the averaged gradients, as DeepSpeed's own check reads it.
        grads = [g for i in sorted(self.zero.averaged_gradients)
                 for g in (self.zero.averaged_gradients[i] or []) if g is not None]
        if not grads:
            raise RuntimeError("deepspeed.lean_step: DeepSpeed holds no gradients at the accumulation boundary")
        sq = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True).float().square()
        if dist.is_initialized() and dist.get_world_size(self.zero.dp_process_group) > 1:
            dist.all_reduce(sq, group=self.zero.dp_process_group)  # on the device stream: no host sync
        self._sq_norm = sq
        # A NaN/inf anywhere makes the sum non-finite; the fused AdamW then skips every group.
        self.client.found_inf = (~torch.isfinite(sq)).float()

    def _host_flag(self, value: bool) -> torch.Tensor:
        return self._skipped.fill_(float(value)).clone()

    def grad_norm(self) -> float | None:
        """The global grad norm of the last optimizer step (a host sync: call at log steps)."""
        if not self.lean:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else None
        return None if self._sq_norm is None else float(self._sq_norm.sqrt())

    def read(self) -> StepHealth:
        """The non-finite counters (a host sync: call at log steps); resets the worst streak."""
        total, streak, worst = (int(x) for x in self._counts.tolist())
        self._counts[2] = self._counts[1]
        health = StepHealth(total, streak, worst, total - self._read_total)
        self._read_total = total
        return health


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
