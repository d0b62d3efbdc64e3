"""Labelled evaluation data: ``.cls``-labelled WebDataset shards, split, shared over ranks, and
decoded with the deterministic centre-crop transform of MAE's evaluation.

Eval transform (the MAE release's ``transform_val`` of ``main_linprobe.py``: ``Resize(256,
bicubic)`` + ``CenterCrop(224)`` for 224 px): the shorter side is resized to
``int(img_size / 0.875)`` with PIL's bicubic filter (the other side keeps the aspect ratio, as
torchvision's ``Resize(int)``), then the central ``img_size`` square is cut out (torchvision's
``CenterCrop`` rounding). The run's mean/std normalisation is applied on the device by the caller
(:func:`maescale.data.normalize_batch`). No randomness anywhere: the same sample gives the same
pixels in every process and at every evaluation.

A *split* is a list of shards, optionally restricted to a seeded hold-out (a sample belongs to
the hold-out when a hash of ``(seed, sample key)`` falls below the fraction: independent of the
number of processes, of shard order and of the other samples) and to its first ``max_samples``
samples in shard order. Every sample carries its global position ``(shard index, index in
shard)``, so features extracted by any number of processes can be put back into one order.

Sharing the work over ``world`` processes: with no sample limit and at least as many shards as
processes, process ``r`` reads shards ``r, r + world, ...``; otherwise every process walks the
shards in order (reading tar members is cheap) and decodes every ``world``-th selected sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from maescale.data.decode import RESAMPLE, BadSample, Decoder, image_bytes
from maescale.data.errors import DataError
from maescale.data.imageops import to_rgb
from maescale.data.sources import expand_shards, is_local, local_path, open_url
from maescale.data.tario import TarFormatError, iter_samples

log = logging.getLogger(__name__)

CROP_FRACTION = 0.875  # MAE/DeiT eval: 224 px crops from images resized to 256 px
LABEL_KEY = "cls"


# --------------------------------------------------------------------------------------------
# The transform
# --------------------------------------------------------------------------------------------


def resize_size(img_size: int) -> int:
    """Shorter side before the centre crop: ``int(img_size / 0.875)`` (256 for 224, as MAE)."""
    return int(img_size / CROP_FRACTION)


class CenterCropTransform:
    """Encoded image bytes -> uint8 ``(3, img_size, img_size)``: resize the shorter side to
    :func:`resize_size` (bicubic), take the central square (see the module docstring)."""

    def __init__(self, img_size: int, interpolation: str = "bicubic", max_pixels: int = 178_956_970):
        self.img_size = int(img_size)
        self.resize = resize_size(self.img_size)
        self.resample = RESAMPLE[interpolation]
        self._opener = Decoder(self.img_size, max_pixels=max_pixels)  # header checks, bomb guard

    def describe(self) -> str:
        return (f"resize shorter side to {self.resize} (bicubic), centre crop {self.img_size} "
                f"(MAE's eval transform: crop fraction {CROP_FRACTION})")

    def __call__(self, data: bytes) -> torch.Tensor:
        img = self._opener.open(data)
        try:
            rgb = to_rgb(img)
            w, h = rgb.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize, int(self.resize * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            if size != (w, h):
                rgb = rgb.resize(size, self.resample)
            w, h = rgb.size
            top = int(round((h - self.img_size) / 2.0))
            left = int(round((w - self.img_size) / 2.0))
            rgb = rgb.crop((left, top, left + self.img_size, top + self.img_size))
            return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        except BadSample:
            raise
        except Exception as exc:  # truncated data, odd modes: a bad sample, counted by the caller
            raise BadSample(f"cannot decode image: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def in_holdout(seed: int, key: str, fraction: float) -> bool:
    """Whether the sample ``key`` falls in the seeded hold-out of ``fraction`` of the samples."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


@dataclass(frozen=True)
class Split:
    """One labelled split: shard URLs plus which of their samples belong to it."""

    name: str  # "train" or "val": for messages and reports
    urls: tuple[str, ...]
    key: str  # the config key or command-line flag that named the shards (for error messages)
    max_samples: int | None = None  # the first N selected samples in shard order
    holdout_seed: int | None = None  # with holdout_fraction: the seeded split of the shards
    holdout_fraction: float | None = None
    holdout_side: str = "all"  # "all", "in" (the hold-out) or "out" (the rest)

    def selects(self, sample_key: str) -> bool:
        if self.holdout_side == "all":
            return True
        held = in_holdout(int(self.holdout_seed or 0), sample_key, float(self.holdout_fraction or 0.0))
        return held if self.holdout_side == "in" else not held

    def describe(self) -> str:
        text = f"{len(self.urls)} shard(s) from {self.key}"
        if self.holdout_side != "all":
            part = "held-out" if self.holdout_side == "in" else "remaining"
            text += f", the {part} part of a split by seed {self.holdout_seed} ({self.holdout_fraction:g} held out)"
        if self.max_samples is not None:
            text += f", first {self.max_samples} samples"
        return text


def make_splits(train_shards: str | Sequence[str], val_shards: str | Sequence[str] | None, *,
                train_key: str, val_key: str, val_fraction: float = 0.1, split_seed: int = 0,
                max_train_samples: int | None = None, max_val_samples: int | None = None) -> tuple[Split, Split]:
    """``(train, val)`` splits: two sets of shards, or (``val_shards`` empty) one set split by
    ``split_seed`` with ``val_fraction`` of its samples held out for validation."""
    train_urls = tuple(expand_shards(train_shards, key=train_key))
    if val_shards:
        val_urls = tuple(expand_shards(val_shards, key=val_key))
        return (Split("train", train_urls, train_key, max_train_samples),
                Split("val", val_urls, val_key, max_val_samples))
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    common = {"holdout_seed": split_seed, "holdout_fraction": val_fraction}
    return (Split("train", train_urls, train_key, max_train_samples, holdout_side="out", **common),
            Split("val", train_urls, train_key, max_val_samples, holdout_side="in", **common))


def class_names(split: Split) -> list[str] | None:
    """Class names from the ``sizes.json`` that ``tools/make_shards.py`` writes beside local
    shards (``"classes"``: label i is the i-th name), or None."""
    for url in split.urls[:1]:
        if not is_local(url):
            return None
        path = os.path.join(os.path.dirname(os.path.abspath(local_path(url))), "sizes.json")
        try:
            with open(path, encoding="utf-8") as f:
                names = json.load(f).get("classes")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(names, list) and all(isinstance(n, str) for n in names) and names:
            return names
    return None


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class ReadStats:
    """What reading one split found on this process."""

    samples: int = 0  # decoded and kept
    bad: int = 0  # undecodable images, skipped
    bad_examples: list[str] = field(default_factory=list)


def parse_label(sample: dict, url: str, split: Split) -> int:
    """The integer class of a sample's ``.cls`` member; :class:`DataError` naming the shard,
    the sample and the flag/key when it is missing or not an integer."""
    key = sample.get("__key__", "?")
    if LABEL_KEY not in sample:
        have = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
        raise DataError(f"{split.key}: shard '{url}' has a sample '{key}' without a .cls label (it has: {have}). "
                        "Evaluation needs labelled shards, as tools/make_shards.py writes for a folder of class "
                        "sub-folders", key=split.key)
    text = sample[LABEL_KEY].decode("utf-8", "replace").strip()
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{split.key}: shard '{url}', sample '{key}': the .cls label {text[:40]!r} is not an "
                        "integer class index", key=split.key) from None
    if label < 0:
        raise DataError(f"{split.key}: shard '{url}', sample '{key}': negative class index {label}", key=split.key)
    return label


def iter_share(split: Split, rank: int = 0, world: int = 1) -> Iterator[tuple[int, str, dict]]:
    """``(position, url, sample)`` of this process's share of ``split``, in shard order;
    ``position = shard_index << 32 | index_in_shard`` orders samples globally."""
    by_shard = split.max_samples is None and len(split.urls) >= world
    seen = 0  # selected samples so far, in global order (sample-level sharing and the limit)
    for s, url in enumerate(split.urls):
        if by_shard and s % world != rank:
            continue
        try:
            with open_url(url) as stream:
                for i, sample in iter_samples(stream, seekable=is_local(url)):
                    if not split.selects(sample["__key__"]):
                        continue
                    if split.max_samples is not None and seen >= split.max_samples:
                        return
                    mine = by_shard or seen % world == rank
                    seen += 1
                    if mine:
                        yield (s << 32) | i, url, sample
        except (TarFormatError, OSError) as exc:
            raise DataError(f"{split.key}: cannot read shard '{url}': {exc}", key=split.key) from None


@dataclass
class LabelledBatch:
    """uint8 images ``(B, 3, S, S)``, int64 labels ``(B,)`` and global positions ``(B,)``."""

    images: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor


def labelled_batches(split: Split, transform: CenterCropTransform, batch_size: int, *, rank: int = 0,
                     world: int = 1, workers: int = 0, stats: ReadStats | None = None) -> Iterator[LabelledBatch]:
    """This process's share of ``split`` as decoded batches. Undecodable images are skipped and
    counted in ``stats`` (they are skipped identically in every process count); a sample without
    a label is an error. ``workers`` > 0 decodes in that many threads (PIL releases the GIL)."""
    stats = stats if stats is not None else ReadStats()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="probe-decode") if workers > 0 else None

    def decode(item: tuple[int, int, str, str, bytes | None]) -> tuple[int, int, torch.Tensor | str]:
        pos, label, url, key, data = item
        try:
            if data is None:
                raise BadSample("no image in the sample")
            return pos, label, transform(data)
        except BadSample as exc:
            return pos, label, f"{url}: {key}: {exc}"

    def finish(items: list) -> LabelledBatch | None:
        done = list(pool.map(decode, items)) if pool is not None else [decode(it) for it in items]
        kept = [(p, y, img) for p, y, img in done if isinstance(img, torch.Tensor)]
        for _, _, msg in (d for d in done if not isinstance(d[2], torch.Tensor)):
            stats.bad += 1
            if len(stats.bad_examples) < 5:
                stats.bad_examples.append(str(msg))
            log.warning("%s split: skipping an undecodable sample: %s", split.name, msg)
        stats.samples += len(kept)
        if not kept:
            return None
        return LabelledBatch(torch.stack([k[2] for k in kept]), torch.tensor([k[1] for k in kept], dtype=torch.int64),
                             torch.tensor([k[0] for k in kept], dtype=torch.int64))

    try:
        pending: list = []
        for pos, url, sample in iter_share(split, rank, world):
            label = parse_label(sample, url, split)
            try:
                data: bytes | None = image_bytes(sample)
            except BadSample:
                data = None
            pending.append((pos, label, url, sample["__key__"], data))
            if len(pending) == batch_size:
                batch = finish(pending)
                pending = []
                if batch is not None:
                    yield batch
        if pending:
            batch = finish(pending)
            if batch is not None:
                yield batch
    finally:
        if pool is not None:
            pool.shutdown(wait=True)

