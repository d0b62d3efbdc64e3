"""GPU memory per rank before a run starts: arithmetic over committed activation profiles, no torch.

**Model states** (the ZeRO paper's accounting): with bf16 mixed precision 16 bytes per parameter,
2 (bf16 weights) + 2 (bf16 gradients) + 12 (fp32 master weights, Adam ``m`` and ``v``); in fp32,
4 + 4 + 8 (no master copy). ZeRO stage 1 shards the optimizer bytes over the data-parallel ranks,
stage 2 also the gradients, stage 3 also the weights.

**Activations** come from ``activation_profiles.json`` beside this module, measured on real
forward/backward passes by ``python -m maescale.devtools.memory --write-profiles`` (the file says
when, where and with which versions): per preset, image size, mask ratio and
``model.act_ckpt_every``, the peak of live activation bytes as ``fixed + per_image x micro-batch``.
A checkpointing interval that was not profiled is derived from the profiles at 0 and 1 by the
*block model*: checkpointing block ``i`` replaces what that block saves for backward by its
input, so the saved bytes fall linearly in the number of checkpointed blocks, and the transient
bytes of backward (peak minus saved) are taken as the largest measured for that preset.

**Reserve**: what neither term holds (CUDA context and cuBLAS workspace, NCCL buffers,
DeepSpeed's gradient buckets, ZeRO-3's gathered layers, allocator fragmentation) is a fixed
:data:`RESERVE_GIB`, the same rule as ``maescale.devtools.memory.max_micro_batch``.

A run fits when states + activations + reserve <= the GPU's memory. :func:`fixes` names the
config keys that make a run fit that does not.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from maescale.flops import num_ckpt_blocks

GIB = 1024**3
MIB = 1024**2
RESERVE_GIB = 8.0
PROFILES_PATH = Path(__file__).with_name("activation_profiles.json")
PROFILES_FORMAT = "maescale-activation-profiles/1"

# bytes per parameter (weights, gradients, optimizer state) by train.precision
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}
ACT_DTYPE = {"bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class GPU:
    """A GPU's memory as the driver reports it (NVML's total)."""

    name: str
    gib: float
    source: str


# NVML totals (nvidia-smi "MiB" / 1024), as tabulated in "Why does an NVIDIA H100 80GB card offer
# 85.52 GB?" (Modal, thundergolfer.com/blog/nvidia-gpu-memory-capacity).
_NVML = "NVML total memory (nvidia-smi), thundergolfer.com/blog/nvidia-gpu-memory-capacity"
GPUS: dict[str, GPU] = {
    "h100": GPU("NVIDIA H100 80GB", 81_559 / 1024, _NVML),
    "h200": GPU("NVIDIA H200 141GB", 143_771 / 1024, _NVML),
    "a100-80gb": GPU("NVIDIA A100 80GB", 81_920 / 1024, _NVML),
    "a100-40gb": GPU("NVIDIA A100 40GB", 40_960 / 1024, _NVML),
    "l40s": GPU("NVIDIA L40S", 46_068 / 1024, _NVML),
}
DEFAULT_GPU = "h100"


def gpu_memory(spec: str | float | None = None) -> GPU:
    """The GPU named by ``spec``: a key of :data:`GPUS` (``h100``, ``h200`` ...), or a number of GiB
    (``"80"``, ``"80GiB"``, ``96.5``); None is the default 80 GB H100."""
    if spec is None:
        return GPUS[DEFAULT_GPU]
    if isinstance(spec, (int, float)):
        gib = float(spec)
    else:
        text = spec.strip().lower()
        if text in GPUS:
            return GPUS[text]
        number = text[:-3] if text.endswith("gib") else text
        try:
            gib = float(number)
        except ValueError:
            raise ValueError(f"--gpu-mem {spec!r}: give GiB (e.g. 80) or one of {', '.join(GPUS)}") from None
    if not gib > 0 or math.isinf(gib):
        raise ValueError(f"--gpu-mem {spec!r}: the GPU memory must be a positive number of GiB")
    return GPU(f"{gib:g} GiB GPU", gib, "given with --gpu-mem")


# --------------------------------------------------------------------------------------------
# Model states
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes of weights, gradients and optimizer state held by one GPU."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_state_bytes(n_params: int, zero_stage: int, world_size: int, precision: str = "bf16") -> ModelStateBytes:
    """Per-GPU model-state bytes for ZeRO ``zero_stage`` (0-3) over ``world_size`` data-parallel
    ranks: stage >= 1 shards the optimizer state, >= 2 the gradients, 3 the weights."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if precision not in STATE_BYTES:
        raise ValueError(f"precision must be one of {', '.join(STATE_BYTES)}, got {precision!r}")
    p, g, o = STATE_BYTES[precision]
    w = float(world_size)
    return ModelStateBytes(params=n_params * p / (w if zero_stage >= 3 else 1.0),
                           grads=n_params * g / (w if zero_stage >= 2 else 1.0),
                           optimizer=n_params * o / (w if zero_stage >= 1 else 1.0))


# --------------------------------------------------------------------------------------------
# Activation profiles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Activation bytes of one preset/configuration: ``peak_fixed + peak_per_image x B`` at the
    peak of forward + backward; ``saved_*`` is what autograd keeps after the forward."""

    preset: str
    img_size: int
    mask_ratio: float
    act_ckpt_every: int
    dtype: str
    saved_per_image: float
    saved_fixed: float
    peak_per_image: float
    peak_fixed: float
    saved_by_region_per_image: dict[str, float] = field(default_factory=dict)
    depth: dict[str, int] = field(default_factory=dict)  # blocks per region: encoder, decoder
    made: dict[str, Any] = field(default_factory=dict)  # date, device, versions of the measurement
    derived: str | None = None  # how it was derived when it was not measured itself

    def bytes(self, micro_batch: int) -> float:
        """Activation bytes at the peak for ``micro_batch`` images."""
        return max(self.peak_fixed, 0.0) + self.peak_per_image * micro_batch


class ProfileError(ValueError):
    """The activation-profile file is missing a field or malformed."""


def _profile(entry: dict[str, Any], where: str) -> Profile:
    try:
        return Profile(
            preset=str(entry["preset"]), img_size=int(entry["img_size"]), mask_ratio=float(entry["mask_ratio"]),
            act_ckpt_every=int(entry["act_ckpt_every"]), dtype=str(entry["dtype"]),
            saved_per_image=float(entry["saved_per_image"]), saved_fixed=float(entry["saved_fixed"]),
            peak_per_image=float(entry["peak_per_image"]), peak_fixed=float(entry["peak_fixed"]),
            saved_by_region_per_image={k: float(v) for k, v in entry.get("saved_by_region_per_image", {}).items()},
            depth={k: int(v) for k, v in entry.get("depth", {}).items()},
            made={k: entry[k] for k in ("date", "device", "versions") if k in entry})
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"activation profiles '{where}': an entry lacks or mangles {exc} "
                           "(regenerate it with python -m maescale.devtools.memory --write-profiles)") from None


@lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> tuple[dict[str, Any], tuple[Profile, ...]]:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or data.get("format") != PROFILES_FORMAT:
        raise ProfileError(f"activation profiles '{path}': not a {PROFILES_FORMAT} file")
    meta = {k: v for k, v in data.items() if k != "profiles"}
    return meta, tuple(_profile(e, path) for e in data.get("profiles", []))


def load_profiles(path: str | os.PathLike = PROFILES_PATH) -> tuple[dict[str, Any], list[Profile]]:
    """(file metadata, profiles) of an activation-profile file; ``([], {})`` when it is absent."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return {}, []
    meta, profiles = _load(path, os.path.getmtime(path))
    return meta, list(profiles)


def block_model(off: Profile, every: Profile, others: list[Profile], k: int) -> Profile:
    """The profile at ``act_ckpt_every = k`` from the measured ones at 0 (``off``) and 1 (``every``)
    (see the module docstring); ``others`` (all profiles of that preset) give the largest transient."""
    saved = off.saved_by_region_per_image.get("other", 0.0)
    for region in ("encoder", "decoder"):
        depth = off.depth.get(region, 0)
        full, ckpt = off.saved_by_region_per_image.get(region, 0.0), every.saved_by_region_per_image.get(region, 0.0)
        per_block_saving = (full - ckpt) / depth if depth else 0.0
        saved += full - num_ckpt_blocks(depth, k) * per_block_saving
    transient = max(p.peak_per_image - p.saved_per_image for p in others)
    return replace(off, act_ckpt_every=k, saved_per_image=saved, peak_per_image=saved + transient,
                   peak_fixed=max(p.peak_fixed for p in others), saved_by_region_per_image={},
                   derived=f"block model from the profiles at act_ckpt_every 0 and 1")


def find_profile(profiles: list[Profile], preset: str, img_size: int, mask_ratio: float, act_ckpt_every: int,
                 dtype: str = "bfloat16") -> Profile | None:
    """The measured profile for this configuration, else one derived by :func:`block_model`,
    else None."""
    same = [p for p in profiles if p.preset == preset and p.img_size == img_size and p.dtype == dtype
            and math.isclose(p.mask_ratio, mask_ratio, abs_tol=1e-9)]
    by_k = {p.act_ckpt_every: p for p in same}
    if act_ckpt_every in by_k:
        return by_k[act_ckpt_every]
    if 0 in by_k and 1 in by_k and act_ckpt_every > 1 and by_k[0].depth:
        return block_model(by_k[0], by_k[1], same, act_ckpt_every)
    return None


# --------------------------------------------------------------------------------------------
# Per-rank estimate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySetup:
    """What decides the memory of one rank (the relevant config values)."""

    preset: str
    n_params: int
    img_size: int
    mask_ratio: float
    act_ckpt_every: int
    precision: str
    zero_stage: int
    world_size: int
    micro_batch: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs at the peak of a step, and whether that fits ``gpu``."""

    setup: MemorySetup
    gpu: GPU
    states: ModelStateBytes
    profile: Profile | None
    activations: float | None  # None: no profile for this configuration
    reserve: float

    @property
    def total(self) -> float | None:
        if self.activations is None:
            return None
        return self.states.total + self.activations + self.reserve

    @property
    def fits(self) -> bool | None:
        """True/False, or None when the activations are unknown and the states alone fit."""
        if self.total is None:
            return False if self.states.total + self.reserve > self.gpu.gib * GIB else None
        return self.total <= self.gpu.gib * GIB


def estimate_memory(setup: MemorySetup, gpu: GPU, profiles: list[Profile],
                    reserve_gib: float = RESERVE_GIB) -> MemoryEstimate:
    """States (ZeRO-split) + profiled activations + reserve for one rank of ``setup``."""
    states = model_state_bytes(setup.n_params, setup.zero_stage, setup.world_size, setup.precision)
    prof = find_profile(profiles, setup.preset, setup.img_size, setup.mask_ratio, setup.act_ckpt_every,
                        ACT_DTYPE.get(setup.precision, setup.precision))
    act = prof.bytes(setup.micro_batch) if prof is not None else None
    return MemoryEstimate(setup, gpu, states, prof, act, reserve_gib * GIB)


def max_micro_batch(setup: MemorySetup, gpu: GPU, profiles: list[Profile],
                    reserve_gib: float = RESERVE_GIB) -> int | None:
    """Largest micro-batch that fits (0 if none does), None without a profile."""
    est = estimate_memory(replace(setup, micro_batch=0), gpu, profiles, reserve_gib)
    if est.profile is None:
        return None
    room = gpu.gib * GIB - est.states.total - est.reserve - max(est.profile.peak_fixed, 0.0)
    per = est.profile.peak_per_image
    return max(0, math.floor(room / per)) if per > 0 else 0


def fixes(setup: MemorySetup, grad_accum_steps: int, gpu: GPU, profiles: list[Profile],
          reserve_gib: float = RESERVE_GIB) -> list[str]:
    """Config changes, each on its own, that make a run that does not fit ``gpu`` fit; each names
    the keys to set and the memory it would need."""
    def need(s: MemorySetup) -> MemoryEstimate:
        return estimate_memory(s, gpu, profiles, reserve_gib)

    out: list[str] = []
    if setup.act_ckpt_every != 1:
        for k in (4, 2, 1):  # least recompute first
            if setup.act_ckpt_every and k >= setup.act_ckpt_every:
                continue
            est = need(replace(setup, act_ckpt_every=k))
            if est.fits:
                out.append(f"model.act_ckpt_every={k} ({est.total / GIB:.1f} GiB; recomputes "
                           f"{'every block' if k == 1 else f'every {k}th block'} in backward)")
                break
    m = max_micro_batch(setup, gpu, profiles, reserve_gib)
    if m:
        per_rank = setup.micro_batch * grad_accum_steps
        divisors = [d for d in range(min(m, per_rank), 0, -1) if per_rank % d == 0]
        if divisors:
            d = divisors[0]
            est = need(replace(setup, micro_batch=d))
            out.append(f"train.micro_batch_size={d} train.grad_accum_steps={per_rank // d} (same effective batch; "
                       f"{est.total / GIB:.1f} GiB; at most {m} images fit per micro-batch)")
    for stage in range(setup.zero_stage + 1, 4):
        est = need(replace(setup, zero_stage=stage))
        if est.fits:
            out.append(f"deepspeed.zero_stage={stage} ({est.total / GIB:.1f} GiB; shards "
                       f"{'gradients' if stage == 2 else 'gradients and weights'} too, more communication)")
            break
    return out
