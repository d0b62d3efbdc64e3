"""The DeepSpeed engine: AdamW with MAE's weight-decay groups, the lr schedule, and the JSON.

The DeepSpeed JSON is derived from the typed config (:func:`deepspeed_config`), then the raw
``deepspeed.extra`` section is merged over it for anything the typed keys do not cover.
The learning rate is a pure function of the optimizer step (:func:`lr_at`), set on the
optimizer before every step: nothing about the schedule needs saving to resume exactly.
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


def build_optimizer(model: nn.Module, cfg: Config, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """Client AdamW (fused kernels on GPU)."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=lr, betas=cfg.optim.betas,
                             eps=cfg.optim.eps, fused=fused)


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
    if cfg.deepspeed.zero_stage >= 2:
        ds["zero_optimization"].update({"overlap_comm": True, "contiguous_gradients": True,
                                        "reduce_bucket_size": 5e8})
    if cfg.deepspeed.zero_stage == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    return deep_merge(ds, cfg.deepspeed.extra)


def build_engine(cfg: Config, model: nn.Module, world_size: int, device: torch.device):
    """``deepspeed.initialize`` with the client AdamW; returns the engine (optimizer inside)."""
    import deepspeed

    model.to(device)
    optimizer = build_optimizer(model, cfg, lr=peak_lr(cfg, world_size), device=device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world_size))
    return engine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
