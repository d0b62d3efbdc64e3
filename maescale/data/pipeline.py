"""The loader the trainer iterates: :func:`build_train_loader` turns a ``data`` config into a
:class:`~maescale.data.plan.Plan`, :class:`TrainLoader` runs the DataLoader workers over it and
keeps an exact, cheap position for resume, and :func:`normalize_batch` finishes a batch on the
training device.

The whole pipeline is shards -> rank/worker split -> shuffle -> decode -> uint8 batches, in three
modules: :mod:`maescale.data.plan` (who reads which samples in which order; what an epoch
guarantees), :mod:`maescale.data.worker` (what runs in a DataLoader worker: reading, decoding,
bad data) and this one.

Position. :meth:`TrainLoader.state_dict` is the position after the last batch handed to the
caller: the epoch, the batch index within it, and for each logical worker the number of samples
that have left its shuffle buffer (read from the provenance each batch carries, so DataLoader
prefetching never advances it)::

    {"version": 1, "epoch": 3, "batch": 17, "consumed": [36, 32], "rank": 0, "world_size": 8,
     "num_workers": 2, "micro_batch_size": 4, "seed": 0, "samples_per_epoch": 1281167,
     "shuffle_buffer": 5000, "shards": "<fingerprint of shard names and sizes>"}

On resume each worker reads its range of the epoch again from the start (reading the tar
bytes, seeking where it can) and replays the shuffle buffer up to that count without decoding
anything, then continues: the next batches are identical to those of an uninterrupted run. The
state depends on the rank only through those counts (they differ between ranks only when
undecodable samples did); a state saved by another rank, or with a different world size / worker
count / batch size, is accepted with a warning and resumes at the same epoch and nearest
position, not exactly.

GPU decode (``data.gpu_decode: true``, :mod:`maescale.data.gpu_decode`): the batch is an
``EncodedBatch`` (JPEG bytes, boxes, flips), decoded, cropped and resized on the device by
:func:`normalize_batch`. The position, the provenance and resuming are the same as without it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import signal
import time
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from maescale.data.decode import Decoder, set_max_image_pixels
from maescale.data.errors import DataError
from maescale.data.gpu_decode import EncodedBatch, to_device_images
from maescale.data.plan import Plan
from maescale.data.sources import default_sizes_file, expand_shards, shard_sizes
from maescale.data.worker import TooManyBadSamples  # noqa: F401  (its home before the split)
from maescale.data.worker import STAT_KEYS, StreamDataset, check_bad_fraction, worker_init

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class TrainLoader:
    """Infinite iterator of uint8 ``(B, 3, img_size, img_size)`` batches with a resumable position
    (with ``data.gpu_decode: true``: :class:`maescale.data.gpu_decode.EncodedBatch` objects, which
    :func:`normalize_batch` decodes on the device).

    Build it with :func:`build_train_loader`. Iterating starts the DataLoader workers (once; they
    keep running across epochs); iterating again restarts from the current position.
    """

    def __init__(self, plan: Plan, *, num_workers: int, prefetch_factor: int, pin_memory: bool):
        self.plan = plan
        self.rank = plan.rank
        self.samples_per_epoch = plan.samples_per_epoch
        self.batches_per_epoch = plan.batches_per_epoch
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.last_batch_keys: list[str] = []  # "shard/key" of each sample of the last batch
        self._epoch = 0
        self._batch = 0
        self._consumed = [0] * plan.num_workers
        self._stats_base = {k: 0 for k in STAT_KEYS}
        self._worker_stats: dict[int, dict[str, int]] = {}
        self._device_stats = {k: 0 for k in STAT_KEYS}  # gpu_decode: samples that failed on the device
        self._last_error = ""
        self._logged_bad = 0
        self._last_log = 0.0
        self._active: Iterator | None = None

    # ---- position -------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self._epoch

    def _fingerprint(self) -> str:
        p = self.plan
        text = repr((p.names, p.counts, p.resampled))
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def state_dict(self) -> dict:
        """JSON-serialisable position after the last batch handed to the caller (this rank)."""
        p = self.plan
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "batch": self._batch,
            "consumed": list(self._consumed),
            "rank": p.rank,
            "world_size": p.world_size,
            "num_workers": p.num_workers,
            "micro_batch_size": p.batch_size,
            "seed": p.seed,
            "samples_per_epoch": p.samples_per_epoch,
            "shuffle_buffer": p.shuffle_buffer,
            "shards": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (this rank's, another rank's, or a ``{"ranks": [...]}``
        gathered list). Call before iterating."""
        if "ranks" in state:
            ranks = [s for s in state["ranks"] if s is not None]
            if not ranks:
                raise DataError("data loader state: empty 'ranks' list")
            mine = [s for s in ranks if s.get("rank") == self.rank]
            state = mine[0] if mine else ranks[0]
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state has version {state.get('version')!r}; this maescale reads "
                            f"version {STATE_VERSION}")
        p = self.plan
        same_layout = (state["world_size"] == p.world_size and state["num_workers"] == p.num_workers
                       and state["micro_batch_size"] == p.batch_size and state["seed"] == p.seed
                       and state["samples_per_epoch"] == p.samples_per_epoch
                       and state.get("shuffle_buffer") == p.shuffle_buffer
                       and state["shards"] == self._fingerprint())
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if same_layout:
            self._epoch, self._batch = epoch, batch
            if state["rank"] == p.rank:
                self._consumed = [int(x) for x in state["consumed"]]
            else:
                w = p.num_workers
                self._consumed = [(batch // w + (1 if i < batch % w else 0)) * p.batch_size for i in range(w)]
                logger.info("rank %d: resuming the data position saved by rank %s (epoch %d, batch %d): "
                            "exact unless this rank skipped undecodable samples in that epoch",
                            p.rank, state["rank"], epoch, batch)
        else:
            done = batch * state["world_size"] * state["micro_batch_size"]  # samples, whole job
            nb = done // (p.world_size * p.batch_size)
            if nb >= p.batches_per_epoch:
                epoch, nb = epoch + 1, 0
            self._epoch, self._batch = epoch, nb
            w = p.num_workers
            self._consumed = [(nb // w + (1 if i < nb % w else 0)) * p.batch_size for i in range(w)]
            logger.warning(
                "rank %d: the data loader state was saved with a different layout (world size %s, workers %s, "
                "micro batch %s, seed %s, samples/epoch %s, shuffle buffer %s, shards %s; now %d, %d, %d, %d, %d, "
                "%d, %s): resuming at epoch %d batch %d/%d, not sample-exact", p.rank, state["world_size"],
                state["num_workers"], state["micro_batch_size"], state["seed"], state["samples_per_epoch"],
                state.get("shuffle_buffer"), state["shards"], p.world_size, p.num_workers, p.batch_size, p.seed,
                p.samples_per_epoch, p.shuffle_buffer, self._fingerprint(),
                self._epoch, self._batch, p.batches_per_epoch)

    # ---- statistics -----------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters of this rank (all its workers, since the loader was built): samples_ok,
        samples_bad, samples_skipped (replayed on resume), shards_opened, shards_failed,
        shard_retries, odd_members; slightly behind the workers (they report with each batch)."""
        out = dict(self._stats_base)
        for s in [*self._worker_stats.values(), self._device_stats]:
            for k in STAT_KEYS:
                out[k] += s.get(k, 0)
        return out

    def _device_bad(self, key: str, reason: str) -> None:
        """A sample that the workers shipped as JPEG bytes failed to decode on the device."""
        self._device_stats["samples_ok"] -= 1
        self._device_stats["samples_bad"] += 1
        self._last_error = f"{key}: {reason}"
        level = logging.WARNING if self.rank == 0 else logging.DEBUG
        logger.log(level, "data: bad sample %s on rank %d (decoded on the device): %s; replaced by another "
                   "image of its batch", key, self.rank, reason)
        s = self.stats()
        self._logged_bad = max(self._logged_bad, s["samples_bad"])
        check_bad_fraction(s["samples_ok"], s["samples_bad"], self.plan.max_bad_fraction, f"rank {self.rank}",
                           self._last_error)

    def _after_batch(self, meta: dict) -> None:
        self._worker_stats[meta["physical"]] = meta["stats"]
        if meta["last_error"]:
            self._last_error = meta["last_error"]
        s = self.stats()
        bad = s["samples_bad"]
        if bad > self._logged_bad:
            now = time.monotonic()
            if now - self._last_log > 30 or self._logged_bad == 0:
                seen = s["samples_ok"] + bad
                level = logging.WARNING if self.rank == 0 else logging.DEBUG
                logger.log(level, "data: %d undecodable samples skipped so far on rank %d (%.3f%% of %d); "
                           "latest: %s", bad, self.rank, 100 * bad / max(seen, 1), seen, self._last_error)
                self._logged_bad, self._last_log = bad, now
        check_bad_fraction(s["samples_ok"], bad, self.plan.max_bad_fraction, f"rank {self.rank}",
                           self._last_error)

    # ---- iteration ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.close()
        it = self._run()
        self._active = it
        return it

    def _run(self) -> Iterator[torch.Tensor]:
        plan = self.plan
        self._stats_base = self.stats()  # keep the counters of earlier worker processes
        self._worker_stats = {}
        self._device_stats = {k: 0 for k in STAT_KEYS}
        dataset = StreamDataset(plan, self._epoch, self._batch, self._consumed)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = dict(prefetch_factor=self.prefetch_factor, persistent_workers=True,
                          worker_init_fn=functools.partial(worker_init, owner=os.getpid()))
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, **kwargs)
        bpe, w = plan.batches_per_epoch, plan.num_workers
        # The workers are forked with SIGTERM blocked: one that slurmstepd sends before a worker's
        # worker_init has taken over SIGTERM then waits for it instead of killing the worker.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}) if self.num_workers > 0 else None
        try:
            iterator = iter(loader)
        finally:
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        try:
            for batch, meta in iterator:
                b = self._batch
                expected = (self._epoch, b % w, b // w)
                got = (meta["epoch"], meta["worker"], meta["index"])
                if got != expected:  # would mean the round-robin assumption broke
                    raise RuntimeError(f"data loader order broken: expected (epoch, worker, index) "
                                       f"{expected}, got {got}")
                self._consumed[b % w] = meta["raw"]
                self._batch += 1
                if self._batch >= bpe:
                    self._epoch, self._batch = self._epoch + 1, 0
                    self._consumed = [0] * w
                self.last_batch_keys = meta["keys"]
                self._after_batch(meta)
                if isinstance(batch, EncodedBatch):
                    batch.on_bad = self._device_bad
                yield batch
        finally:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def close(self) -> None:
        """Stop the worker processes of a running iteration (iterating again restarts them)."""
        if self._active is not None:
            self._active.close()  # type: ignore[attr-defined]
            self._active = None


# --------------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------------


def build_train_loader(
    data_cfg: Any,
    *,
    img_size: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    state: dict | None = None,
) -> TrainLoader:
    """The training loader of one rank, described by a :class:`maescale.config.DataConfig`.

    Checks the shards up front (:class:`DataError` naming the pattern or key), reads the epoch
    size, and resumes from ``state`` (a :meth:`TrainLoader.state_dict`) when given.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    urls = expand_shards(data_cfg.train_shards)
    counts = shard_sizes(urls, data_cfg.sizes_file)
    if data_cfg.num_samples is not None:
        samples = int(data_cfg.num_samples)
    elif counts is not None:
        samples = sum(counts)
    else:
        where = data_cfg.sizes_file or default_sizes_file(urls)
        looked = f"no sizes file naming every shard at '{where}'" if where else \
            "no sizes file (none is looked for beside pipe:/remote shards)"
        raise DataError(f"cannot tell how many samples an epoch has: {looked}. Set data.num_samples, or "
                        f"data.sizes_file to the sizes.json written by tools/make_shards.py",
                        key="data.num_samples")
    if counts is not None and sum(counts) <= 0:
        raise DataError(f"the sizes file says the {len(urls)} shards of data.train_shards hold no samples",
                        key="data.train_shards")
    bpe = samples // (world_size * micro_batch_size)
    if bpe < 1:
        raise DataError(f"an epoch of {samples} samples is less than one batch per rank "
                        f"({world_size} ranks x micro batch {micro_batch_size})", key="data.num_samples")
    from maescale.config import resolve_num_workers

    workers = resolve_num_workers(data_cfg.num_workers)  # "auto": this rank's cores minus 2
    set_max_image_pixels(data_cfg.max_image_pixels)
    decoder = Decoder(img_size, scale=data_cfg.crop_scale, ratio=data_cfg.crop_ratio,
                      interpolation=data_cfg.interpolation, hflip_prob=data_cfg.hflip_prob,
                      fast=data_cfg.fast_decode, max_pixels=data_cfg.max_image_pixels)
    plan = Plan(urls=urls, counts=counts, resampled=bool(data_cfg.resampled), seed=int(seed), rank=rank,
                world_size=world_size, num_workers=max(1, workers),
                batch_size=int(micro_batch_size), samples_per_epoch=samples, batches_per_epoch=bpe,
                shuffle_buffer=int(data_cfg.shuffle_buffer), shard_retries=int(data_cfg.shard_retries),
                max_bad_fraction=float(data_cfg.max_bad_fraction),
                max_image_pixels=int(data_cfg.max_image_pixels), decoder=decoder,
                gpu_decode=bool(getattr(data_cfg, "gpu_decode", False)))
    if rank == 0:
        mode = "resampled" if plan.resampled else ("sample ranges" if counts is not None else "whole shards")
        logger.info("data: %d shards, %d samples/epoch, %d batches/epoch/rank of %d (%d ranks x %d workers, "
                    "split by %s)", len(urls), samples, bpe, micro_batch_size, world_size, plan.num_workers, mode)
        if counts is None and not plan.resampled and len(urls) < world_size * plan.num_workers:
            logger.warning("data: %d shards for %d readers (ranks x workers) and no per-shard sizes: "
                           "some readers repeat shards; write a sizes file or more shards",
                           len(urls), world_size * plan.num_workers)
    loader = TrainLoader(plan, num_workers=workers, prefetch_factor=int(data_cfg.prefetch_factor),
                         pin_memory=bool(data_cfg.pin_memory) and torch.cuda.is_available())
    if state is not None:
        loader.load_state_dict(state)
    return loader


def normalize_batch(batch_uint8: torch.Tensor | EncodedBatch, mean: Sequence[float], std: Sequence[float],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, on the batch's device, returned in ``dtype``.

    ``mean`` and ``std`` are in [0, 1] units (``data.mean``, ``data.std``); the batch is uint8
    ``(B, 3, H, W)`` (or ``(3, H, W)``), or an :class:`~maescale.data.gpu_decode.EncodedBatch`
    (``data.gpu_decode: true``; moved with ``.to(device)``), decoded first on its device.
    Computed in float32, then cast.
    """
    x = to_device_images(batch_uint8).to(torch.float32)
    if isinstance(mean, torch.Tensor) or isinstance(std, torch.Tensor):  # the caller keeps them on the device
        m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1) * 255.0
        s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1) * 255.0
    else:
        m, s = _mean_std(tuple(float(v) for v in mean), tuple(float(v) for v in std), x.device)
    out = (x - m) / s
    return out if dtype == torch.float32 else out.to(dtype)


_MEAN_STD: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean``/``std`` in 0-255 units on ``device``, made once: building them from Python floats
    at every step would be a copy from pageable host memory, which waits for the whole CUDA stream
    (a host synchronisation per step)."""
    key = (mean, std, str(device))
    if key not in _MEAN_STD:
        _MEAN_STD[key] = tuple(torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).mul(255.0).to(device)
                               for v in (mean, std))
    return _MEAN_STD[key]
