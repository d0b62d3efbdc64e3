"""The optimizer side of training: AdamW's parameter groups (the MAE release's weight-decay rule,
cut into gradient buckets), the lr schedule, and the DeepSpeed JSON and engine.

The DeepSpeed JSON is derived from the typed config (:func:`deepspeed_config`), then the raw
``deepspeed.extra`` section is merged over it for anything the typed keys do not cover.
The learning rate is a pure function of the optimizer step (:func:`lr_at`), set on the
optimizer before every step: nothing about the schedule needs saving to resume exactly.

The lean step (``deepspeed.lean_step``, on by default for ZeRO-1/2 without clipping) turns off
DeepSpeed's per-parameter overflow scan and host-side grad norm
(``bf16.check_grad_overflow: false``, ``zero_optimization.compute_grad_norm: false``); the guard of
:mod:`maescale.step` keeps their guarantees on the device. With ZeRO-1 the step is maescale's own
(:class:`maescale.step.FlatZeroStep`), whose gradient buckets are the parameter groups built here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from maescale.config import Config, deep_merge, lean_step_applies

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


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: ``blocks.3`` for ``blocks.3.attn.qkv.weight``, else the
    first component (``patch_embed``, ``norm``, ``cls_token`` ...). Buckets never split a layer."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def is_decoder(name: str) -> bool:
    """Whether a parameter belongs to the MAE decoder (trained alone during decoder warm-up)."""
    return name.startswith(("decoder_", "mask_token"))


def decays(name: str, p: torch.Tensor, decay_tokens: bool = True) -> bool:
    """The weight-decay rule of the MAE release's pre-training (timm's ``add_weight_decay`` with no
    skip list): every trainable tensor is decayed except 1-D ones and biases, so ``cls_token`` and
    ``mask_token`` (1 x 1 x D) are decayed; the fixed sin-cos position tables are buffers, in no
    group. ``decay_tokens=False`` also exempts the two tokens (the fine-tuning recipe's rule, and
    maescale's before 2026-12-07: runs started then keep it, see :func:`param_groups`)."""
    if p.ndim <= 1 or name.endswith(".bias"):
        return False
    return decay_tokens or name not in ("cls_token", "mask_token")


def param_groups(model: nn.Module, weight_decay: float, *, decay_tokens: bool = True,
                 bucket_elements: int | None = None, layout: list[dict[str, Any]] | None = None
                 ) -> list[dict[str, Any]]:
    """The AdamW parameter groups, which are also ZeRO's flat buffers and, in maescale's ZeRO-1
    step, the buckets of the gradient reduce-scatter (:mod:`maescale.gradsync`).

    * ``layout`` (a checkpoint's recorded groups: name, decay flag, parameter names): exactly
      those groups, so a resumed run keeps the partition layout its optimizer state was saved in.
    * ``bucket_elements`` None: two groups, ``decay`` and ``no_decay`` (the layout of runs before
      bucketing, :func:`legacy_layout`).
    * else buckets in backward order: the decoder's decayed layers from the output down, cut into
      buckets of at least ``bucket_elements`` at layer boundaries, then the decoder's no-decay
      group, then the encoder's decayed layers from the top block down, then its no-decay group;
      encoder and decoder never share a group (decoder warm-up freezes the encoder's groups).

    Each group carries ``name``, ``weight_decay``, ``decay`` and ``part`` ("encoder", "decoder" or
    "all").
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if layout is not None:
        return _groups_from_layout(named, layout, weight_decay)
    if bucket_elements is None:
        decay = [p for n, p in named if decays(n, p, decay_tokens)]
        no_decay = [p for n, p in named if not decays(n, p, decay_tokens)]
        return [_group("decay", decay, weight_decay, True, "all"), _group("no_decay", no_decay, 0.0, False, "all")]
    groups: list[dict[str, Any]] = []
    for part in ("decoder", "encoder"):
        mine = [(n, p) for n, p in named if is_decoder(n) == (part == "decoder")]
        layers: dict[str, list[torch.Tensor]] = {}
        for n, p in mine:  # named_parameters order is the forward order of the model's layers
            if decays(n, p, decay_tokens):
                layers.setdefault(layer_of(n), []).append(p)
        bucket: list[torch.Tensor] = []
        for params in reversed(list(layers.values())):  # backward order
            bucket += params
            if sum(p.numel() for p in bucket) >= bucket_elements:
                groups.append(_group(f"{part}.decay.{len(groups)}", bucket, weight_decay, True, part))
                bucket = []
        if bucket:
            groups.append(_group(f"{part}.decay.{len(groups)}", bucket, weight_decay, True, part))
        rest = [p for n, p in reversed(mine) if not decays(n, p, decay_tokens)]
        if rest:
            groups.append(_group(f"{part}.no_decay", rest, 0.0, False, part))
    return groups


def _group(name: str, params: list[torch.Tensor], weight_decay: float, decay: bool, part: str) -> dict[str, Any]:
    return {"params": params, "weight_decay": weight_decay if decay else 0.0, "name": name, "decay": decay,
            "part": part}


def _groups_from_layout(named: list[tuple[str, torch.Tensor]], layout: list[dict[str, Any]],
                        weight_decay: float) -> list[dict[str, Any]]:
    by_name = dict(named)
    seen: set[str] = set()
    groups = []
    for g in layout:
        missing = [n for n in g["params"] if n not in by_name]
        if missing:
            raise ValueError(f"the checkpoint's parameter group {g['name']!r} names parameters this model does not "
                             f"have: {missing[:5]}")
        seen.update(g["params"])
        groups.append(_group(g["name"], [by_name[n] for n in g["params"]], weight_decay, bool(g["decay"]),
                             g.get("part", "all")))
    unplaced = [n for n in by_name if n not in seen]
    if unplaced:
        raise ValueError(f"the checkpoint's parameter groups leave out trainable parameters: {unplaced[:5]}")
    return groups


def group_layout(model: nn.Module, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recordable form of ``groups`` (names instead of tensors), for ``trainer_state.json``."""
    ids = {id(p): n for n, p in model.named_parameters()}
    return [{"name": g["name"], "decay": g["decay"], "part": g["part"], "params": [ids[id(p)] for p in g["params"]]}
            for g in groups]


def legacy_layout(model: nn.Module) -> list[dict[str, Any]]:
    """The groups of checkpoints written before 2026-12-07 (no layout recorded): ``decay`` and
    ``no_decay``, with ``cls_token`` and ``mask_token`` exempt from decay."""
    return group_layout(model, param_groups(model, 0.0, decay_tokens=False))


def param_group_names(model: nn.Module, weight_decay: float, **kwargs: Any) -> dict[str, list[str]]:
    """Names of the parameters in each group of :func:`param_groups` (for tests and logs)."""
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [ids[id(p)] for p in g["params"]] for g in param_groups(model, weight_decay, **kwargs)}


def resolve_bucket_elements(cfg: Config, model: nn.Module) -> int:
    """Elements per gradient bucket for this run (``deepspeed.bucket_elements``, or the automatic rule)."""
    b = cfg.deepspeed.bucket_elements
    if b != "auto":
        return int(b)
    return auto_bucket_elements(sum(p.numel() for p in model.parameters() if p.requires_grad))


# One group per part and decay flag: the groups of DeepSpeed's own steps (ZeRO-2/3 buckets their
# gradients themselves), still split by encoder and decoder for the decoder warm-up.
WHOLE_PART = 1 << 62


def auto_bucket_elements(params: int) -> int:
    """``deepspeed.bucket_elements: auto``: about 16 buckets, each at least 1M and at most 64M
    elements. Fewer, larger buckets pay less per-call latency; more, smaller ones leave less of
    the reduce-scatter after backward (the last bucket is always exposed). bench/SCALING.md
    shows the trade-off from the measured collectives."""
    return int(min(64_000_000, max(1_000_000, params // 16)))


def build_optimizer(model: nn.Module, cfg: Config, lr: float,
                    groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    """Client AdamW with fused kernels (on GPU and CPU): one launch per group instead of several
    per parameter, and the ``found_inf`` input that the lean step needs."""
    groups = groups if groups is not None else param_groups(model, cfg.optim.weight_decay,
                                                            decay_tokens=cfg.optim.weight_decay_tokens)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=True)


def lean_step_enabled(cfg: Config) -> bool:
    """Whether this config runs the lean ZeRO step (the rule lives in :func:`maescale.config.lean_step_applies`)."""
    return lean_step_applies(cfg)


def deepspeed_config(cfg: Config, world_size: int, bucket_elements: int | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON for this config, with ``deepspeed.extra`` merged over it
    (``bucket_elements``: ZeRO-2's reduce bucket, :func:`resolve_bucket_elements`)."""
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
        # Stage 1 keeps whole gradients. No gradient hooks of DeepSpeed's (overlap_comm and
        # contiguous_gradients off): maescale's ZeRO-1 step reduces the gradients itself
        # (maescale.gradsync), and with DeepSpeed's own step (lean_step=false) the contiguous copy
        # would only add a copy per parameter and step.
        ds["zero_optimization"].update({"contiguous_gradients": False, "overlap_comm": False})
    if cfg.deepspeed.zero_stage == 2:
        # Gradients reduced from backward hooks in buckets (overlap_comm), each bucket's slices
        # reduced to the ranks that own them: with use_multi_rank_bucket_allreduce (DeepSpeed's
        # default) every bucket is all-reduced whole instead, twice the bytes (stage_1_and_2.py:
        # average_tensor). The bucket size is deepspeed.bucket_elements.
        ds["zero_optimization"].update({"overlap_comm": True, "contiguous_gradients": True,
                                        "reduce_bucket_size": bucket_elements or 5e8,
                                        "use_multi_rank_bucket_allreduce": False})
    if cfg.deepspeed.zero_stage == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": False})
    if lean_step_enabled(cfg):
        ds["zero_optimization"]["compute_grad_norm"] = False
        ds["bf16"]["check_grad_overflow"] = False
    return deep_merge(ds, cfg.deepspeed.extra)


@dataclass
class Engine:
    """The DeepSpeed engine and the parameter groups it was built with."""

    engine: Any
    groups: list[dict[str, Any]]  # recordable layout (:func:`group_layout`)


def build_engine(cfg: Config, model: nn.Module, world_size: int, device: torch.device,
                 layout: list[dict[str, Any]] | None = None) -> Engine:
    """``deepspeed.initialize`` with the client AdamW over :func:`param_groups` (``layout``: a
    resumed checkpoint's groups, which win over the config's bucketing)."""
    import deepspeed

    model.to(device)
    bucket = resolve_bucket_elements(cfg, model)
    ours = lean_step_enabled(cfg) and cfg.deepspeed.zero_stage == 1  # maescale.step.FlatZeroStep: buckets are groups
    groups = param_groups(model, cfg.optim.weight_decay, decay_tokens=cfg.optim.weight_decay_tokens,
                          bucket_elements=bucket if ours else WHOLE_PART, layout=layout)
    recorded = group_layout(model, groups)
    optimizer = build_optimizer(model, cfg, lr=peak_lr(cfg, world_size), groups=groups)
    ds_config = deepspeed_config(cfg, world_size, bucket if cfg.deepspeed.zero_stage == 2 else None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return Engine(engine, recorded)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, frozen_part: str | None = None) -> None:
    """Set the learning rate of every parameter group; groups of ``frozen_part`` ("encoder")
    get 0 (decoder warm-up: with lr 0 AdamW leaves those weights bitwise unchanged)."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if frozen_part is not None and group.get("part") == frozen_part else lr
