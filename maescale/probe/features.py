"""Encoder features of a labelled split: what the kNN and linear probes classify.

Two features per image, both those of the MAE release's linear probe (``models_vit.py``):

* ``cls``: the class token of the encoder output after the encoder's final LayerNorm
  (``global_pool=False``, the default of ``main_linprobe.py``; timm's ``forward_features``);
* ``avgpool``: the patch tokens averaged *before* the final norm, then a LayerNorm without
  affine parameters (``global_pool=True``: the release deletes ``norm`` and applies a freshly
  initialised ``fc_norm``, which linear probing never trains, so its scale is 1 and shift 0).

Extraction runs under ``torch.no_grad()`` on whatever module it is given (an eval-mode encoder
from :func:`maescale.export.model_from_source`, or the training engine's ``engine.module``, whose
mode the caller saves and restores). Images are cast to the weights' dtype (bf16 weights of a
bf16 engine) and optionally run under autocast (bf16 on GPU for the offline probe); features
are returned in float32. Every process extracts its share (:func:`maescale.probe.data.iter_share`),
then all processes all-gather the features and sort them by global sample position, so the
result does not depend on the number of processes. Under ZeRO-3 the processes also step in
lockstep (every forward gathers parameters collectively, so a process whose share has run out
runs a one-image dummy forward until all are done).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from maescale.data.errors import DataError
from maescale.data.pipeline import normalize_batch
from maescale.distributed import agree_max
from maescale.probe.data import CenterCropTransform, LabelledBatch, ReadStats, Split, labelled_batches

log = logging.getLogger(__name__)

FEATURE_KINDS = ("cls", "avgpool")


@dataclass
class Features:
    """Features of one split, identical on every process, in global sample order."""

    split: Split
    feats: dict[str, torch.Tensor]  # kind -> (N, D) float32
    labels: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64: shard index << 32 | index in shard
    bad: int  # undecodable samples skipped (all processes)
    seconds: float

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def is_zero3(model: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions this module's parameters."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _own_params_gathered(model: torch.nn.Module):
    # Under ZeRO-3 a module's parameters are gathered by hooks around its own forward; the
    # encoder reads ``cls_token`` outside any submodule's forward, so gather it here.
    if not is_zero3(model):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([model.cls_token], modifier_rank=None)


@torch.no_grad()
def encoder_features(model: torch.nn.Module, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"cls": (B, D), "avgpool": (B, D)}`` float32 features of normalised images (see the
    module docstring). Goes through the model's own ``forward_features`` and reads the tokens
    entering its final norm with a forward hook, so the encoder computation is written once."""
    captured: list[torch.Tensor] = []
    blocks_dtype = model.blocks[0].norm1.weight.dtype
    handles = [
        model.norm.register_forward_hook(lambda _m, args, _out: captured.append(args[0])),
        # bf16 weights may sit beside a float32 pos_embed (ZeRO-3 leaves buffers in float32), which
        # makes the tokens float32; the blocks take them in their own dtype, as in training.
        model.blocks[0].register_forward_pre_hook(lambda _m, args: (args[0].to(blocks_dtype), *args[1:])),
    ]
    try:
        out = model.forward_features(imgs.to(model.patch_embed.proj.weight.dtype))
    finally:
        for handle in handles:
            handle.remove()
    tokens = captured[-1]
    dim = tokens.shape[-1]
    pooled = tokens[:, 1:].float().mean(dim=1)
    return {"cls": out[:, 0].float(), "avgpool": F.layer_norm(pooled, (dim,), eps=model.norm.eps)}


class _Progress:
    """A tqdm bar on rank 0 when stderr is a terminal, else a log line every 30 s."""

    def __init__(self, desc: str, enabled: bool, bar: bool | None = None):
        self.desc, self.enabled, self.count = desc, enabled, 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if enabled and (sys.stderr.isatty() if bar is None else bar):
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit="img", dynamic_ncols=True, leave=False)

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= 30:
            self.last = time.monotonic()
            log.info("%s: %d images (this process) in %.0f s", self.desc, self.count, self.last - self.start)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _all_gather_rows(t: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate every process's ``t`` (rows may differ in number) in rank order."""
    if world == 1 or not dist.is_initialized():
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    padded = t.new_zeros((max(counts), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def _lockstep(batches: Iterator[LabelledBatch], group: object,
              errors: list[DataError]) -> Iterator[LabelledBatch | None]:
    """Yield until every process has run out (None where this one has: it runs a dummy
    batch); stop everywhere as soon as one process fails to read its share."""
    while True:
        state = 1
        try:
            batch = next(batches, None)
            state = int(batch is not None)
        except DataError as exc:
            errors.append(exc)
            batch, state = None, 2
        (most,) = agree_max([state], group)
        if most != 1:
            return
        yield batch


def _guarded(batches: Iterator[LabelledBatch], errors: list[DataError]) -> Iterator[LabelledBatch]:
    try:
        yield from batches
    except DataError as exc:
        errors.append(exc)


@torch.no_grad()
def extract_features(model: torch.nn.Module, split: Split, transform: CenterCropTransform, *,
                     device: torch.device, mean: Sequence[float], std: Sequence[float], batch_size: int,
                     rank: int = 0, world: int = 1, group: object = None, workers: int = 0,
                     autocast_dtype: torch.dtype | None = None, progress: bool = False) -> Features:
    """Features of ``split`` (all processes take part and get the same result). Raises
    :class:`~maescale.data.DataError` naming the split's flag/key when it has no usable sample."""
    t0 = time.perf_counter()
    dim = int(model.norm.normalized_shape[0])
    stats = ReadStats()
    batches = labelled_batches(split, transform, batch_size, rank=rank, world=world, workers=workers, stats=stats)
    # A process that fails to read its share stops reading; the others learn of it below (or,
    # in lockstep, at once), so that no process waits forever in a collective.
    multi = world > 1 and dist.is_initialized()
    errors: list[DataError] = []
    steps: Iterator[LabelledBatch | None] = _guarded(batches, errors)
    if multi and is_zero3(model):
        steps = _lockstep(batches, group, errors)
    dummy = torch.zeros(1, 3, transform.img_size, transform.img_size, dtype=torch.uint8)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in FEATURE_KINDS}
    labels: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    bar = _Progress(f"features of the {split.name} split", enabled=progress and rank == 0)
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    try:
        with _own_params_gathered(model), autocast:
            for batch in steps:
                imgs = batch.images if batch is not None else dummy
                x = normalize_batch(imgs.to(device, non_blocking=True), mean, std)
                feats = encoder_features(model, x)
                if batch is None:
                    continue
                for k in FEATURE_KINDS:
                    out[k].append(feats[k])
                labels.append(batch.labels)
                positions.append(batch.positions)
                bar.update(len(batch.labels))
    finally:
        bar.close()
    (failed,) = agree_max([int(bool(errors))], group) if multi else [int(bool(errors))]
    if failed:
        raise errors[0] if errors else DataError(
            f"{split.key}: another process could not read its share of the {split.name} split; its error names the "
            "shard", key=split.key)
    local_feats = {k: torch.cat(v) if v else torch.zeros(0, dim, device=device) for k, v in out.items()}
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    local_pos = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
    # Gather on the features' device (NCCL needs CUDA tensors; gloo takes CPU ones).
    gathered = {k: _all_gather_rows(v, world if multi else 1) for k, v in local_feats.items()}
    all_labels = _all_gather_rows(local_labels.to(device), world if multi else 1)
    all_pos = _all_gather_rows(local_pos.to(device), world if multi else 1)
    bad = _sum_int(stats.bad, device) if multi else stats.bad
    order = torch.argsort(all_pos)
    feats = Features(split=split, feats={k: v[order].float() for k, v in gathered.items()},
                     labels=all_labels[order].cpu(), positions=all_pos[order].cpu(), bad=bad,
                     seconds=time.perf_counter() - t0)
    if len(feats) == 0:
        hint = f"; {bad} sample(s) could not be decoded (e.g. {stats.bad_examples[0]})" if stats.bad_examples else ""
        raise DataError(f"{split.key}: the {split.name} split is empty: {split.describe()} gave no labelled "
                        f"image{hint}", key=split.key)
    return feats


def _sum_int(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())
