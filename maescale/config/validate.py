"""The values of a typed :class:`~maescale.config.schema.Config`: ranges and consistency
(:func:`validate`, which names the key), and the rules other modules share: the lean step's
eligibility, the worker count of ``data.num_workers: auto``, SLURM's time syntax."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

from maescale.config.schema import Config, ConfigError, EvalConfig, ModelConfig

# --------------------------------------------------------------------------------------------
# Validation of values (types are already right here)
# --------------------------------------------------------------------------------------------


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"got {value!r}; allowed: {allowed}", key=key)


def validate(cfg: Config) -> None:
    """Range and consistency checks; raises ConfigError naming the key."""
    from maescale.models.presets import PRESETS  # local import: config must not pull in torch

    m, d, o, t, c, s = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.checkpoint, cfg.slurm
    _check(bool(cfg.output_dir), "output_dir", cfg.output_dir, "a non-empty directory path")
    _check(cfg.resume is not None and cfg.resume != "", "resume", cfg.resume, "true, false or a checkpoint path")

    _check(m.name in PRESETS, "model.name", m.name, ", ".join(PRESETS))
    patch = PRESETS[m.name].patch_size if m.name in PRESETS else 1
    _check(m.img_size > 0 and m.img_size % patch == 0, "model.img_size", m.img_size,
           f"a positive multiple of the patch size {patch} of {m.name}")
    _check(m.in_chans >= 1, "model.in_chans", m.in_chans, "an integer >= 1")
    _check(0.0 < m.mask_ratio < 1.0, "model.mask_ratio", m.mask_ratio, "a number in the open interval (0, 1)")
    if m.name in PRESETS:
        num_patches = (m.img_size // patch) ** 2
        _check(int(num_patches * (1 - m.mask_ratio)) >= 1, "model.mask_ratio", m.mask_ratio,
               f"a ratio that keeps at least one of the {num_patches} patches visible")
    _check(m.act_ckpt_every >= 0, "model.act_ckpt_every", m.act_ckpt_every, "0 (off) or k >= 1 (every k-th block)")
    _check(bool(m.init_from) or not m.init_resample_patch, "model.init_resample_patch", m.init_resample_patch,
           "false unless model.init_from names a file to resample")
    _validate_fp8(m)

    _check(d.num_samples is None or d.num_samples > 0, "data.num_samples", d.num_samples, "null or a positive integer")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, "an integer >= 0")
    _check(d.num_workers == "auto" or d.num_workers >= 0, "data.num_workers", d.num_workers, "auto or an integer >= 0")
    _check(d.prefetch_factor >= 1, "data.prefetch_factor", d.prefetch_factor, "an integer >= 1")
    lo, hi = d.crop_scale
    _check(0.0 < lo <= hi <= 1.0, "data.crop_scale", list(d.crop_scale), "[lo, hi] with 0 < lo <= hi <= 1")
    lo, hi = d.crop_ratio
    _check(0.0 < lo <= hi, "data.crop_ratio", list(d.crop_ratio), "[lo, hi] with 0 < lo <= hi")
    _check(0.0 <= d.hflip_prob <= 1.0, "data.hflip_prob", d.hflip_prob, "a probability in [0, 1]")
    _check(all(x > 0 for x in d.std), "data.std", list(d.std), "three positive numbers")
    _check(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", d.max_bad_fraction, "a fraction in [0, 1]")
    _check(d.shard_retries >= 0, "data.shard_retries", d.shard_retries, "an integer >= 0")
    _check(d.max_image_pixels > 0, "data.max_image_pixels", d.max_image_pixels, "a positive integer")
    if isinstance(d.train_shards, list):
        _check(all(bool(x) for x in d.train_shards), "data.train_shards", d.train_shards, "non-empty shard patterns")

    _check(o.blr > 0, "optim.blr", o.blr, "a positive number")
    _check(o.lr is None or o.lr > 0, "optim.lr", o.lr, "null or a positive number")
    _check(o.min_lr >= 0, "optim.min_lr", o.min_lr, "a number >= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    _check(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", list(o.betas), "two numbers in [0, 1)")
    _check(o.eps > 0, "optim.eps", o.eps, "a positive number")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "a number >= 0")
    _check(o.warmup_steps is None or o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "null or an integer >= 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "0 (off) or a positive max norm")

    _check(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "an integer >= 1")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "an integer >= 1")
    if (t.max_steps is None) == (t.epochs is None):
        raise ConfigError(
            f"set exactly one of train.max_steps and train.epochs (got max_steps={t.max_steps!r}, "
            f"epochs={t.epochs!r}); set the other to null", key="train.max_steps")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "an integer >= 1")
    _check(t.epochs is None or t.epochs > 0, "train.epochs", t.epochs, "a positive number")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "an integer >= 1")
    _check(t.image_every >= 0, "train.image_every", t.image_every, "0 (off) or an integer >= 1")
    _check(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", t.max_nonfinite_steps, "an integer >= 1")
    _check(t.peak_tflops is None or t.peak_tflops > 0, "train.peak_tflops", t.peak_tflops, "null or a positive number")
    _check(t.profile_at is None or t.profile_at >= 0, "train.profile_at", t.profile_at, "null (off) or a step >= 0")
    _check(t.profile_steps >= 1, "train.profile_steps", t.profile_steps, "an integer >= 1")
    _check(t.stall_timeout_s is None or t.stall_timeout_s > 0, "train.stall_timeout_s", t.stall_timeout_s,
           "null (automatic) or seconds > 0")
    _check(t.max_rollbacks >= 0, "train.max_rollbacks", t.max_rollbacks, "an integer >= 0")
    _check(t.spike_factor > 1, "train.spike_factor", t.spike_factor, "a number > 1")
    _check(t.spike_window >= 3, "train.spike_window", t.spike_window, "an integer >= 3 (log steps)")
    _check(t.spike_patience >= 1, "train.spike_patience", t.spike_patience, "an integer >= 1 (log steps)")
    for i, (after, count) in enumerate(t.skip_batches):
        _check(after >= 0 and count >= 1, f"train.skip_batches[{i}]", [after, count],
               "[after_step >= 0, micro_batches >= 1]")
    _check(m.decoder_warmup_steps >= 0, "model.decoder_warmup_steps", m.decoder_warmup_steps, "an integer >= 0")

    _check(c.every_steps >= 0, "checkpoint.every_steps", c.every_steps, "0 (off) or an integer >= 1")
    _check(c.every_minutes >= 0, "checkpoint.every_minutes", c.every_minutes, "0 (off) or a positive number")
    _check(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "an integer >= 1")
    _check(cfg.deepspeed.timeout_minutes > 0, "deepspeed.timeout_minutes", cfg.deepspeed.timeout_minutes, "a positive number")
    _check(cfg.deepspeed.bucket_elements == "auto" or cfg.deepspeed.bucket_elements >= 1024, "deepspeed.bucket_elements",
           cfg.deepspeed.bucket_elements, "auto or an integer >= 1024 (elements per gradient bucket)")
    _validate_lean_step(cfg)
    lk = cfg.lock
    _check(lk.wait_s >= 0, "lock.wait_s", lk.wait_s, "seconds >= 0")
    _check(lk.heartbeat_s > 0, "lock.heartbeat_s", lk.heartbeat_s, "seconds > 0")
    _check(lk.stale_s >= 3 * lk.heartbeat_s, "lock.stale_s", lk.stale_s,
           f"at least 3 x lock.heartbeat_s ({3 * lk.heartbeat_s:g} s), so that a slow beat is not taken for a dead job")

    _validate_eval(cfg.eval)

    _check(s.nodes >= 1, "slurm.nodes", s.nodes, "an integer >= 1")
    _check(s.gpus_per_node >= 0, "slurm.gpus_per_node", s.gpus_per_node, "an integer >= 0")
    _check(s.cpus_per_task >= 1, "slurm.cpus_per_task", s.cpus_per_task, "an integer >= 1")
    _check(s.signal_delay_s >= 0, "slurm.signal_delay_s", s.signal_delay_s, "an integer >= 0 (seconds)")
    _check(s.max_requeues >= 0, "slurm.max_requeues", s.max_requeues, "an integer >= 0")
    _check(s.max_failures >= 0, "slurm.max_failures", s.max_failures, "an integer >= 0")
    if cfg.distributed.socket_ifname is not None:
        _check(bool(cfg.distributed.socket_ifname.strip()) and not any(c.isspace() for c in cfg.distributed.socket_ifname),
               "distributed.socket_ifname", cfg.distributed.socket_ifname,
               "null or interface names such as ib0, eth0,eth1 or ^docker,lo (no spaces)")
    try:
        parse_slurm_time(s.time)
    except ValueError as exc:
        raise ConfigError(str(exc), key="slurm.time") from None


MAX_AUTO_WORKERS = 16


def resolve_num_workers(value: int | str, cpus: int | None = None) -> int:
    """``data.num_workers`` as a number: ``auto`` -> the rank's cores minus 2 (the training
    process and its pin-memory thread), 0..:data:`MAX_AUTO_WORKERS`. ``cpus``: the rank's cores
    (default ``SLURM_CPUS_PER_TASK``, else this process's CPU affinity)."""
    if value != "auto":
        return int(value)
    if cpus is None:
        env = os.environ.get("SLURM_CPUS_PER_TASK", "")
        cpus = int(env) if env.isdigit() else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    return max(0, min(MAX_AUTO_WORKERS, cpus - 2))


def lean_step_applies(cfg: Config) -> bool:
    """Whether ``cfg`` runs the lean step (the one definition of the rule; maescale.optim and the
    validation below use it): ``auto`` means ZeRO-1/2 without clipping."""
    ds = cfg.deepspeed
    if ds.lean_step == "auto":
        return ds.zero_stage in (1, 2) and cfg.optim.grad_clip == 0
    return bool(ds.lean_step)


def _validate_lean_step(cfg: Config) -> None:
    """Refuse the lean-step switches where DeepSpeed cannot honour them (it would fail at start-up
    with less context, or skip no non-finite step at all)."""
    ds, clip = cfg.deepspeed, cfg.optim.grad_clip
    if ds.lean_step is True:
        _check(ds.zero_stage in (1, 2), "deepspeed.lean_step", True,
               f"auto or false with deepspeed.zero_stage={ds.zero_stage}: the lean step replaces the checks of "
               "DeepSpeed's ZeRO-1/2 optimizer only")
        _check(clip == 0, "deepspeed.lean_step", True,
               f"auto or false with optim.grad_clip={clip}: clipping needs the global grad norm before the step, "
               "which the lean step does not compute; set optim.grad_clip=0 to use it")
    zero = ds.extra.get("zero_optimization") if isinstance(ds.extra, Mapping) else None
    if isinstance(zero, Mapping) and zero.get("compute_grad_norm") is False:
        key = "deepspeed.extra.zero_optimization.compute_grad_norm"
        _check(clip == 0, key, False, f"true with optim.grad_clip={clip} (clipping needs the norm); or use "
               "deepspeed.lean_step, which sets it")
        _check(ds.zero_stage in (1, 2), key, False, f"true with deepspeed.zero_stage={ds.zero_stage} "
               "(DeepSpeed supports it with ZeRO stage 1 or 2 only)")
    bf16 = ds.extra.get("bf16") if isinstance(ds.extra, Mapping) else None
    if isinstance(bf16, Mapping) and bf16.get("check_grad_overflow") is False and not lean_step_applies(cfg):
        _check(False, "deepspeed.extra.bf16.check_grad_overflow", False,
               "true without the lean step (it would let non-finite steps through unchecked); deepspeed.lean_step "
               "turns it off safely for ZeRO-1/2 without clipping")


def _validate_fp8(m: ModelConfig) -> None:
    """``model.fp8*``: a named recipe, emulation only with a recipe, and at least one layer to convert."""
    from maescale.models.fp8 import FP8_DIM_MULTIPLE, FP8_MIN_FEATURES, fp8_plan
    from maescale.models.presets import PRESETS

    _check(m.fp8 is not True, "model.fp8", m.fp8, "off, tensorwise or rowwise (name the recipe)")
    _check(m.fp8_min_features is None or m.fp8_min_features >= FP8_DIM_MULTIPLE, "model.fp8_min_features",
           m.fp8_min_features, f"null (default {FP8_MIN_FEATURES}) or an integer >= {FP8_DIM_MULTIPLE}")
    on = m.fp8 not in (False, "off")
    if m.fp8_emulate and not on:
        raise ConfigError("model.fp8_emulate=true emulates FP8 training, which model.fp8=off does not run: set "
                          "model.fp8=tensorwise or rowwise, or drop model.fp8_emulate", key="model.fp8_emulate")
    if on and m.name in PRESETS:
        plan = fp8_plan(PRESETS[m.name], m.fp8_min_features, m.in_chans)
        if not any(p.fp8 for p in plan):
            enc = sorted({(p.in_features, p.out_features) for p in plan if p.name.startswith("blocks.")})
            raise ConfigError(
                f"got {m.fp8!r}, but no linear layer of {m.name} qualifies for FP8 (encoder block linears "
                f"{', '.join(f'{i}x{o}' for i, o in enc)}; both sides must be multiples of {FP8_DIM_MULTIPLE} and at "
                f"least model.fp8_min_features={m.fp8_min_features or FP8_MIN_FEATURES}): set model.fp8=off, or "
                "lower model.fp8_min_features", key="model.fp8")


def _validate_eval(e: EvalConfig) -> None:
    _check(e.every_steps >= 0, "eval.every_steps", e.every_steps, "0 (off) or an integer >= 1")
    _check(e.k >= 1, "eval.k", e.k, "an integer >= 1 (neighbours; DINO uses 20)")
    _check(e.temperature > 0, "eval.temperature", e.temperature, "a positive number (DINO uses 0.07)")
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "an integer >= 1")
    for key, value in (("eval.max_train_samples", e.max_train_samples), ("eval.max_val_samples", e.max_val_samples)):
        _check(value is None or value >= 1, key, value, "null (all) or an integer >= 1")
    _check(0.0 < e.val_fraction < 1.0, "eval.val_fraction", e.val_fraction, "a fraction in the open interval (0, 1)")
    for key, value in (("eval.train_shards", e.train_shards), ("eval.val_shards", e.val_shards)):
        if isinstance(value, list):
            _check(all(bool(x) for x in value), key, value, "non-empty shard patterns")
    if e.every_steps > 0 and not e.train_shards:
        raise ConfigError("eval.every_steps > 0 needs labelled shards (with .cls labels, as tools/make_shards.py "
                          "writes for class folders): set eval.train_shards (and eval.val_shards, or leave it empty "
                          "to hold out eval.val_fraction of them), or set eval.every_steps=0", key="eval.train_shards")


def parse_slurm_time(value: str | int) -> int:
    """SLURM time limit in minutes from ``"90"``, ``"HH:MM:SS"``, ``"MM:SS"`` or ``"D-HH:MM:SS"``."""
    text = str(value).strip()
    err = ValueError(f"time limit {value!r} is not minutes or [D-]HH:MM:SS (e.g. 90, 04:00:00, 2-00:00:00)")
    days = 0
    if "-" in text:
        d, _, text = text.partition("-")
        if not d.isdigit():
            raise err
        days = int(d)
    parts = text.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        raise err
    nums = [int(p) for p in parts]
    if len(nums) == 1:
        minutes = nums[0] if days == 0 else nums[0] * 60  # "D-HH" means hours
        total = days * 24 * 60 + minutes
    elif len(nums) == 2:
        if days:  # D-HH:MM
            total = days * 1440 + nums[0] * 60 + nums[1]
        else:  # MM:SS
            total = nums[0] + math.ceil(nums[1] / 60)
    else:
        total = days * 1440 + nums[0] * 60 + nums[1] + math.ceil(nums[2] / 60)
    if total <= 0:
        raise err
    return total
