"""Memory accounting of MAE pretraining per GPU: model states under ZeRO, activations, and the
largest micro-batch that fits.

**Model states** (mixed-precision Adam, the ZeRO paper's accounting, 16 bytes per parameter):
2 (bf16 parameters) + 2 (bf16 gradients) + 12 (fp32 master weights, Adam ``m`` and ``v``). ZeRO
stage 1 shards the 12 optimizer bytes over the data-parallel world, stage 2 also the gradients,
stage 3 also the parameters. (DeepSpeed's bf16 optimizer may keep fp32 gradient accumulators on
top, 4 bytes/param, sharded like the gradients; buckets and ZeRO-3's gathered layers are
transient and fall under the reserve.)

**Activations** are measured, not modelled, on real forward/backward passes of the real
architecture (CPU is fine: the shapes and what autograd keeps are the same as on GPU):

* :func:`saved_tensor_bytes`: the bytes of all tensors saved for backward, summed through
  ``torch.autograd.graph.saved_tensors_hooks`` after one forward, each storage counted once and
  parameters excluded. With non-reentrant checkpointing the blocks' internals are saved through
  the checkpoint's own (inner) hooks and never reach ours; what the checkpoint keeps, the block
  inputs, it saves through ``save_for_backward`` and we see it.
* :func:`live_peak_bytes`: the high-water mark of live tensor bytes allocated during
  forward + backward (a ``TorchDispatchMode`` that follows every storage an op creates until it
  is freed), with each parameter gradient dropped once accumulated (the model states count them).
  It includes what the saved bytes miss: backward's transient gradients, the recomputed block
  under checkpointing, the fp32 loss temporaries.

Both are linear in the micro-batch; :func:`activation_profile` measures two micro-batches and
fits ``fixed + per_image * B``. Measured in **bf16** weights and inputs (DeepSpeed's bf16 mode;
LayerNorm statistics and softmax log-sum-exp stay fp32 as on GPU) with ``attn_impl="sdpa"``,
which on CPU and GPU alike is a flash kernel keeping ``q, k, v, out`` and the log-sum-exp.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from maescale.flops import param_count
from maescale.models import PRESETS, MAEArch, MaskedAutoencoderViT, create_model
# The model-state arithmetic has one owner, the login-node plan (torch-free); re-exported here.
from maescale.planning.memory import GIB, ModelStateBytes, model_state_bytes

log = logging.getLogger(__name__)

__all__ = [
    "ModelStateBytes", "model_state_bytes", "saved_tensor_bytes", "live_peak_bytes", "SavedTensors",
    "ActivationProfile", "activation_profile", "max_micro_batch", "memory_rows", "format_memory_table",
    "GIB",
]


# --------------------------------------------------------------------------------------------
# Activations: measured
# --------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


@dataclass
class SavedTensors:
    """Bytes saved for backward by one forward: ``total`` and by region (``encoder``,
    ``decoder``, ``other``), with the largest single block (``max_block``) for recompute."""

    total: int
    by_region: dict[str, int]
    by_block: dict[str, int] = field(default_factory=dict)

    @property
    def max_block(self) -> int:
        return max(self.by_block.values(), default=0)


def saved_tensor_bytes(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float | None = None) -> SavedTensors:
    """Sum the tensors the autograd graph keeps after one forward (see the module docstring)."""
    exclude = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    seen: dict[tuple[str, int], tuple[int, str]] = {}
    keep: list[torch.Tensor] = []  # hold what we saw so that no address is reused meanwhile
    where = ["other"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if st.nbytes() and key not in exclude and key not in seen:
            seen[key] = (st.nbytes(), where[-1])
            keep.append(t)
        return t

    # Tag the encoder/decoder stretches too (checkpoint saves a block's input before the block's
    # own hooks run): shadow the model's _run_blocks for the duration of the measurement.
    run_blocks = model._run_blocks

    def tagged_run_blocks(blocks, x):
        where.append("encoder" if blocks is model.blocks else "decoder")
        try:
            return run_blocks(blocks, x)
        finally:
            where.pop()

    model._run_blocks = tagged_run_blocks
    handles = []
    for prefix, blocks in (("encoder", model.blocks), ("decoder", model.decoder_blocks)):
        for i, blk in enumerate(blocks):
            tag = f"{prefix}.{i}"
            handles.append(blk.register_forward_pre_hook(lambda m, a, tag=tag: where.append(tag)))
            handles.append(blk.register_forward_hook(lambda m, a, o: where.pop() and None))  # keep output
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _, _ = model(imgs, mask_ratio)
        del loss
    finally:
        for h in handles:
            h.remove()
        del model._run_blocks
    by_region: dict[str, int] = {"encoder": 0, "decoder": 0, "other": 0}
    by_block: dict[str, int] = {}
    for nbytes, tag in seen.values():
        by_region[tag.split(".")[0]] += nbytes
        if "." in tag:
            by_block[tag] = by_block.get(tag, 0) + nbytes
    return SavedTensors(total=sum(by_region.values()), by_region=by_region, by_block=by_block)


class _LiveBytes(TorchDispatchMode):
    """Follows every storage an op creates until it is freed; keeps the high-water mark."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Storages the op was given (parameters, inputs, earlier results) are not new: a view
        # of a parameter (``aten.t``) or an in-place result must not count as an allocation.
        given = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live and key not in given:
                    self.live[key] = st.nbytes()
                    self.current += st.nbytes()
                    weakref.finalize(st, self._free, key)
                    self.peak = max(self.peak, self.current)
        return out


def live_peak_bytes(model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float | None = None) -> int:
    """High-water mark of tensor bytes allocated during one forward + backward, without the
    accumulated parameter gradients (the model states count those): each ``.grad`` is dropped
    as soon as it is accumulated, as a bucketed ZeRO reduction would hand it off."""
    model.zero_grad(set_to_none=True)
    handles = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
               for p in model.parameters() if p.requires_grad]
    mode = _LiveBytes()
    try:
        with mode:
            loss, _, _ = model(imgs, mask_ratio)
            loss.backward()
            del loss
    finally:
        for h in handles:
            h.remove()
    return mode.peak + imgs.untyped_storage().nbytes()  # the input batch was allocated before


@dataclass
class ActivationProfile:
    """Activation bytes of one preset/configuration, as ``fixed + per_image * micro_batch``."""

    preset: str
    img_size: int
    mask_ratio: float
    act_ckpt_every: int
    dtype: str
    batches: tuple[int, int]
    saved_per_image: float
    saved_fixed: float
    peak_per_image: float | None  # None when the backward pass was not measured
    peak_fixed: float | None
    saved_by_region_per_image: dict[str, float]

    def activation_bytes(self, micro_batch: int) -> float:
        """Bytes the activations need at their peak (saved bytes when no peak was measured)."""
        if self.peak_per_image is not None:
            return self.peak_fixed + self.peak_per_image * micro_batch
        return self.saved_fixed + self.saved_per_image * micro_batch

    def as_dict(self) -> dict:
        return asdict(self)


def activation_profile(preset: str, img_size: int = 224, mask_ratio: float = 0.75, act_ckpt_every: int = 0,
                       dtype: torch.dtype = torch.bfloat16, batches: tuple[int, int] = (1, 2),
                       measure_peak: bool = True, attn_impl: str = "sdpa", seed: int = 0) -> ActivationProfile:
    """Measure saved (and, with ``measure_peak``, peak live) activation bytes of a preset at
    two micro-batches on CPU and fit them linearly."""
    torch.manual_seed(seed)
    model = create_model(preset, img_size=img_size, mask_ratio=mask_ratio, attn_impl=attn_impl,
                         act_ckpt_every=act_ckpt_every).to(dtype)
    model.train()
    saved, peaks, regions = [], [], []
    for b in batches:
        imgs = torch.randn(b, model.in_chans, img_size, img_size, dtype=dtype)
        s = saved_tensor_bytes(model, imgs)
        saved.append(s.total)
        regions.append(s.by_region)
        if measure_peak:
            peaks.append(live_peak_bytes(model, imgs))
        log.info("%s ckpt=%d B=%d: saved %.1f MiB%s", preset, act_ckpt_every, b, s.total / 2**20,
                 f", peak {peaks[-1] / 2**20:.1f} MiB" if measure_peak else "")
    (b1, b2), db = batches, batches[1] - batches[0]
    per = (saved[1] - saved[0]) / db
    pk = (peaks[1] - peaks[0]) / db if measure_peak else None
    return ActivationProfile(
        preset=preset, img_size=img_size, mask_ratio=mask_ratio, act_ckpt_every=act_ckpt_every,
        dtype=str(dtype).replace("torch.", ""), batches=(b1, b2),
        saved_per_image=per, saved_fixed=saved[0] - per * b1,
        peak_per_image=pk, peak_fixed=(peaks[0] - pk * b1) if measure_peak else None,
        saved_by_region_per_image={k: (regions[1][k] - regions[0][k]) / db for k in regions[0]},
    )


# --------------------------------------------------------------------------------------------
# Largest micro-batch
# --------------------------------------------------------------------------------------------


def max_micro_batch(n_params: int, profile: ActivationProfile, gpu_bytes: float, reserve_bytes: float,
                    zero_stage: int = 1, world_size: int = 8) -> int:
    """Largest micro-batch whose model states + peak activations fit in ``gpu_bytes - reserve``.

    The reserve stands for what neither term holds: CUDA context and cuBLAS workspace, NCCL
    buffers, DeepSpeed's gradient buckets, ZeRO-3's gathered layers, allocator fragmentation.
    """
    states = model_state_bytes(n_params, zero_stage, world_size).total
    fixed = profile.peak_fixed if profile.peak_per_image is not None else profile.saved_fixed
    per = profile.peak_per_image if profile.peak_per_image is not None else profile.saved_per_image
    room = gpu_bytes - reserve_bytes - states - max(fixed, 0.0)
    return max(0, math.floor(room / per)) if per > 0 else 0


def memory_rows(presets: list[str], img_size: int = 224, mask_ratio: float = 0.75, ckpt_options=(0, 1),
                gpu_gib: float = 80.0, reserve_gib: float = 8.0, zero_stage: int = 1, world_size: int = 8,
                measure_peak: bool = True, batches: tuple[int, int] = (1, 2)) -> list[dict]:
    """One row per preset and checkpointing choice: measured bytes/image, model states (every
    ZeRO stage at ``world_size``), largest micro-batch on ``gpu_gib`` minus ``reserve_gib``."""
    rows = []
    for name in presets:
        arch: MAEArch = PRESETS[name]
        n = param_count(arch)
        for k in ckpt_options:
            prof = activation_profile(name, img_size, mask_ratio, k, batches=batches, measure_peak=measure_peak)
            row = {
                "preset": name, "params": n, "act_ckpt_every": k, "img_size": img_size, "mask_ratio": mask_ratio,
                "dtype": prof.dtype, "saved_mib_per_image": prof.saved_per_image / 2**20,
                "peak_mib_per_image": None if prof.peak_per_image is None else prof.peak_per_image / 2**20,
                "saved_by_region_mib_per_image": {r: v / 2**20 for r, v in prof.saved_by_region_per_image.items()},
                "gpu_gib": gpu_gib, "reserve_gib": reserve_gib, "world_size": world_size,
                # lists indexed by ZeRO stage 0..3
                "model_states_gib": [model_state_bytes(n, s, world_size).total / GIB for s in range(4)],
                "max_micro_batch": [max_micro_batch(n, prof, gpu_gib * GIB, reserve_gib * GIB, s, world_size)
                                    for s in range(4)],
                "zero_stage": zero_stage,
            }
            rows.append(row)
    return rows


def format_memory_table(rows: list[dict]) -> str:
    """Text table of :func:`memory_rows`."""
    if not rows:
        return ""
    r0 = rows[0]
    head = (f"{'preset':<24}{'params':>8}{'ckpt':>5}{'saved':>9}{'peak':>9}"
            + "".join(f"{f'states z{s}':>11}" for s in range(4))
            + "".join(f"{f'max mb z{s}':>10}" for s in range(4)))
    lines = [f"activations in MiB/image ({r0['dtype']}, {r0['img_size']} px, mask {r0['mask_ratio']}); model states "
             f"in GiB/GPU at world size {r0['world_size']}; max micro-batch on {r0['gpu_gib']:g} GiB minus "
             f"{r0['reserve_gib']:g} GiB reserve", head]
    for r in rows:
        peak = "-" if r["peak_mib_per_image"] is None else f"{r['peak_mib_per_image']:.2f}"
        lines.append(f"{r['preset']:<24}{r['params'] / 1e6:>7.0f}M{r['act_ckpt_every']:>5}"
                     f"{r['saved_mib_per_image']:>9.2f}{peak:>9}"
                     + "".join(f"{r['model_states_gib'][s]:>11.2f}" for s in range(4))
                     + "".join(f"{r['max_micro_batch'][s]:>10d}" for s in range(4)))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The committed activation profiles the login-node plan reads (maescale/planning/memory.py)
# --------------------------------------------------------------------------------------------

# preset -> image size it is profiled at (the size its configs train at)
PROFILE_SIZES = {"mae_vit_tiny_patch4": 32, "mae_vit_mini_patch8": 64, "mae_vit_base_patch16": 224,
                 "mae_vit_large_patch16": 224, "mae_vit_huge_patch14": 224, "mae_vit_giant_patch14": 224}
PROFILE_CKPT = (0, 1, 2, 4)


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment() -> dict:
    import datetime
    import platform
    import sys

    import maescale

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "maescale": maescale.__version__}
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": f"cpu: {_cpu_name()} ({platform.platform()}), {torch.get_num_threads()} torch thread(s)",
            "versions": versions}


def profile_entry(prof: ActivationProfile, env: dict) -> dict:
    """One entry of the profile file: the fitted bytes, the blocks per region and how it was made."""
    arch = PRESETS[prof.preset]
    entry = prof.as_dict()
    entry["batches"] = list(entry["batches"])
    entry["depth"] = {"encoder": arch.depth, "decoder": arch.decoder_depth}
    entry.update(env)
    return entry


def write_profiles(path: str | None = None, presets: list[str] | None = None,
                   ckpt_options: tuple[int, ...] = PROFILE_CKPT, batches: tuple[int, int] = (2, 4),
                   mask_ratio: float = 0.75, dtype: torch.dtype = torch.bfloat16, img_size: int | None = None) -> str:
    """Measure the activation profiles (``dtype``, sdpa) of ``presets`` at their training image size for
    every ``act_ckpt_every`` in ``ckpt_options`` (at ``img_size`` instead when given) and write them into the plan's profile file
    (``maescale/planning/activation_profiles.json`` unless ``path``), keeping the entries of other
    configurations that are already there. Returns the path."""
    import gc
    import json
    import os

    from maescale.planning.memory import PROFILES_FORMAT, PROFILES_PATH
    from maescale.rundir import write_json_atomic

    path = os.fspath(path or PROFILES_PATH)
    presets = list(presets or PROFILE_SIZES)
    unknown = [p for p in presets if p not in PROFILE_SIZES]
    if unknown:
        raise ValueError(f"no profile image size for {unknown}; known: {', '.join(PROFILE_SIZES)}")
    env = _environment()
    key = lambda e: (e["preset"], e["img_size"], e["mask_ratio"], e["act_ckpt_every"], e["dtype"])  # noqa: E731
    for name in presets:  # written after each preset: a long measurement keeps what it has done
        new = []
        for k in ckpt_options:
            prof = activation_profile(name, img_size or PROFILE_SIZES[name], mask_ratio, k, dtype=dtype, batches=batches)
            new.append(profile_entry(prof, env))
            gc.collect()
        old: list[dict] = []
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh).get("profiles", [])
        replaced = {key(e) for e in new}
        entries = sorted([e for e in old if key(e) not in replaced] + new, key=key)
        write_json_atomic(path, {
            "format": PROFILES_FORMAT,
            "made_by": "python -m maescale.devtools.memory --write-profiles",
            "how": ("activation bytes of one real forward + backward on CPU (what autograd saves and the peak of live "
                    "tensor bytes; maescale/devtools/memory.py), weights and inputs in the entry's dtype (bf16 as "
                    "DeepSpeed's bf16 mode keeps them), attn_impl sdpa, fitted as fixed + per_image x micro-batch "
                    "from two micro-batches; each entry names its date, device and versions. Bytes, not MiB."),
            "profiles": entries,
        }, indent=1)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m maescale.devtools.memory --write-profiles [--presets A,B] [--ckpt 0,1,2,4]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m maescale.devtools.memory",
                                description="Measure activation memory profiles for the login-node plan (tools/plan.py).")
    p.add_argument("--write-profiles", action="store_true", required=True,
                   help="measure and write maescale/planning/activation_profiles.json")
    p.add_argument("--output", help="another file to write (default: the package's profile file)")
    p.add_argument("--presets", help=f"comma list (default: {','.join(PROFILE_SIZES)})")
    p.add_argument("--ckpt", default=",".join(map(str, PROFILE_CKPT)), help="act_ckpt_every values, comma list")
    p.add_argument("--batches", default="2,4", help="the two micro-batches the linear fit uses")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="weights and inputs (train.precision bf16 or fp32)")
    p.add_argument("--img-size", type=int, help="image size (default: each preset's training size)")
    p.add_argument("--mask-ratio", type=float, default=0.75, help="mask ratio (default 0.75)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    batches = tuple(int(x) for x in args.batches.split(","))
    if len(batches) != 2 or batches[0] >= batches[1] or batches[0] < 1:
        p.error("--batches needs two increasing micro-batches, e.g. 2,4")
    path = write_profiles(args.output, args.presets.split(",") if args.presets else None,
                          tuple(int(x) for x in args.ckpt.split(",")), batches, mask_ratio=args.mask_ratio,
                          dtype=getattr(torch, args.dtype), img_size=args.img_size)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
