"""The training input pipeline: shards -> rank/worker split -> shuffle -> decode -> uint8 batches,
with an exact, cheap position for resume.

Vocabulary. ``R`` ranks (``world_size``), ``W`` loader workers per rank (``data.num_workers``,
counted as 1 when it is 0), ``B`` = ``micro_batch_size``, ``T`` = samples per epoch for the whole
job (``data.num_samples`` or the sizes file). Every rank yields ``bpe = T // (R * B)`` batches per
epoch (:attr:`TrainLoader.batches_per_epoch`), so ranks stay in lockstep.

Determinism. Everything is a function of ``(seed, epoch, rank, worker, position)``: the epoch's
shard order (a seeded permutation, the same on all ranks), which samples each worker reads, the
shuffle buffer's choices, and each sample's crop and flip (a ``random.Random`` seeded from
``(seed, epoch, rank, worker, n)`` where ``n`` counts samples leaving that worker's shuffle
buffer). Nothing depends on timing, so a run can be replayed.

Logical workers. Within an epoch, rank batch ``b`` comes from logical worker ``b % W``, which
produces ``bpe // W`` batches (+1 for the first ``bpe % W`` workers). Worker processes run one
infinite iterator for the whole run (epochs advance inside them, no restart per epoch); physical
worker ``p`` plays, in each epoch, the logical worker whose batches land on its turn of the
DataLoader's round robin. So the DataLoader's fixed round-robin order is exactly the logical order,
across epoch boundaries and after a resume that starts mid-epoch.

Which samples an epoch sees (epoch mode, ``data.resampled: false``):

* With per-shard counts (``sizes.json`` written by ``tools/make_shards.py``, or
  ``data.sizes_file``): the epoch's shards, in the epoch's seeded order, are concatenated into
  one virtual sequence of samples (wrapping into a fresh permutation when ``data.num_samples`` is
  larger than the data set). The first ``R * bpe * B`` samples are cut into contiguous ranges,
  one per (rank, logical worker), in proportion to their batch counts. **Each of these samples is
  handed out exactly once in the epoch, on exactly one rank** -- ranges may start and end inside a
  shard (the worker skips to its start: a seek on local files, reading without decoding on
  ``pipe:`` streams). What is dropped: the last ``T mod (R * B)`` (fewer than one global batch)
  samples of the epoch's order -- a different set every epoch. If samples are undecodable or a
  shard fails, the affected worker tops up from the samples after its range (so a handful of
  samples may appear twice in that epoch) and the failures are counted.
* Without per-shard counts (``data.num_samples`` set and no sizes file): shards are dealt to the
  ``R * W`` workers round robin in the epoch's order. A sample is seen at most once when every
  worker's shards hold at least its quota; the rest of a worker's shards is dropped (uneven
  shards drop more), and a worker whose shards run short continues with shards of the next
  permutation (repeats). Writing shards with ``tools/make_shards.py`` avoids this.
* ``data.resampled: true``: every worker draws shards with replacement, forever; an epoch is just
  ``bpe`` batches. No once-per-epoch guarantee.

Shuffling. Shard order is permuted every epoch; each worker passes its samples through a
``data.shuffle_buffer``-sample buffer (with a range shorter than the buffer, the whole range is
shuffled); a batch holds samples of one worker. ``tools/make_shards.py`` shuffles files before
sharding, so that each shard already mixes classes.

Position. :meth:`TrainLoader.state_dict` is the position after the last batch handed to the
caller: the epoch, the batch index within it, and for each logical worker the number of samples
that have left its shuffle buffer (read from the provenance each batch carries, so DataLoader
prefetching never advances it)::

    {"version": 1, "epoch": 3, "batch": 17, "consumed": [36, 32], "rank": 0, "world_size": 8,
     "num_workers": 2, "micro_batch_size": 4, "seed": 0, "samples_per_epoch": 1281167,
     "shuffle_buffer": 5000, "shards": "<fingerprint of shard names and sizes>"}

On resume each worker reads its range of the epoch again from the start (reading the tar
bytes, seeking where it can) and replays the shuffle buffer up to that count without decoding
anything, then continues: the
next batches are identical to those of an uninterrupted run. The state depends on the rank only
through those counts (they differ between ranks only when undecodable samples did); a state saved
by another rank, or with a different world size / worker count / batch size, is accepted with a
warning and resumes at the same epoch and nearest position, not exactly.

GPU decode (``data.gpu_decode: true``, :mod:`maescale.data.gpu_decode`). The workers read only
each JPEG's header, draw the box and flip with the same law and the same per-sample RNG, and ship
the bytes; the batch (an ``EncodedBatch``) is decoded, cropped and resized on the device by
:func:`normalize_batch`. Other images are decoded in the worker as above. The position, the
provenance and resuming are the same as without it.

Bad data. Undecodable samples (corrupt, empty, random bytes, truncated, decompression bombs, no
image) are skipped and counted; shards that fail are retried ``data.shard_retries`` times and then
skipped with a warning naming them; once ``MIN_SAMPLES_FOR_BAD_CHECK`` samples were seen, more
than ``data.max_bad_fraction`` bad samples raises :class:`DataError`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from maescale.data.decode import BadSample, Decoder, image_bytes, set_max_image_pixels
from maescale.data.errors import DataError
from maescale.data.gpu_decode import EncodedBatch, EncodedBatchBuilder, prepare_sample, to_device_images
from maescale.data.sources import (default_sizes_file, expand_shards, is_local, open_url, shard_name,
                                   shard_sizes)
from maescale.data.tario import iter_samples

logger = logging.getLogger(__name__)

STATE_VERSION = 1
MIN_SAMPLES_FOR_BAD_CHECK = 100
STAT_KEYS = ("samples_ok", "samples_bad", "samples_skipped", "shards_opened", "shards_failed",
             "shard_retries", "odd_members")

_TAG_ORDER, _TAG_SHUFFLE, _TAG_RESAMPLE, _TAG_AUG = 1, 2, 3, 4


def _mix(*values: int) -> int:
    """A 64-bit seed from a tuple of integers (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.blake2b(repr(values).encode(), digest_size=8).digest(), "little")


def _shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle buffer: fill to ``size``, then emit a random element for each new one; drain in
    random order at the end. Its choices depend only on ``rng`` and the number of items."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        out, buf[j] = buf[j], item
        yield out
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


def _chain(*parts: Iterator[Any]) -> Iterator[Any]:
    """``itertools.chain`` that closes its parts (and so their open shards) when closed."""
    try:
        for part in parts:
            yield from part
    finally:
        for part in parts:
            close = getattr(part, "close", None)
            if close is not None:
                close()


@dataclass
class Plan:
    """Everything a worker needs to produce its batches; picklable plain data."""

    urls: list[str]
    counts: list[int] | None
    resampled: bool
    seed: int
    rank: int
    world_size: int
    num_workers: int  # logical workers per rank (>= 1)
    batch_size: int
    samples_per_epoch: int
    batches_per_epoch: int
    shuffle_buffer: int
    shard_retries: int
    max_bad_fraction: float
    max_image_pixels: int
    decoder: Decoder
    names: list[str] = field(default_factory=list)
    gpu_decode: bool = False  # ship JPEG bytes + box + flip (maescale.data.gpu_decode)

    def __post_init__(self) -> None:
        self.names = [shard_name(u) for u in self.urls]
        self._orders: dict[tuple[int, int], list[int]] = {}

    # ---- the split -----------------------------------------------------------------------

    def quota(self, worker: int) -> int:
        """Batches logical worker ``worker`` produces per epoch (the same on every rank)."""
        bpe, w = self.batches_per_epoch, self.num_workers
        return bpe // w + (1 if worker < bpe % w else 0)

    def order(self, epoch: int, pass_: int = 0) -> list[int]:
        """The shard order of an epoch (and of its further passes); identical on all ranks."""
        key = (epoch, pass_)
        if key not in self._orders:
            if len(self._orders) > 8:
                self._orders.clear()
            order = list(range(len(self.urls)))
            random.Random(_mix(self.seed, _TAG_ORDER, epoch, pass_)).shuffle(order)
            self._orders[key] = order
        return self._orders[key]

    def range_start(self, worker: int) -> int:
        """Offset of this rank's logical worker's range in the epoch's virtual sample sequence."""
        before = sum(self.quota(w) for w in range(worker))
        return (self.rank * self.batches_per_epoch + before) * self.batch_size

    def _virtual(self, epoch: int, start: int, length: int | None) -> Iterator[tuple[int, int, int | None]]:
        """Segments ``(shard, first, stop)`` of the virtual sequence ``[start, start + length)``."""
        assert self.counts is not None
        total = sum(self.counts)
        pass_, off = divmod(start, total)
        left = length
        while left is None or left > 0:
            for idx in self.order(epoch, pass_):
                count = self.counts[idx]
                if off >= count:
                    off -= count
                    continue
                stop = count if left is None else min(count, off + left)
                yield idx, off, stop
                if left is not None:
                    left -= stop - off
                    if left <= 0:
                        return
                off = 0
            pass_ += 1

    def sources(self, epoch: int, worker: int) -> tuple[Iterator, Iterator]:
        """The (primary, overflow) segment streams of a logical worker in an epoch."""
        n = len(self.urls)
        if self.resampled:
            rng = random.Random(_mix(self.seed, _TAG_RESAMPLE, epoch, self.rank, worker))
            return ((rng.randrange(n), 0, None) for _ in itertools.count()), iter(())
        if self.counts is not None:
            start = self.range_start(worker)
            length = self.quota(worker) * self.batch_size
            return self._virtual(epoch, start, length), self._virtual(epoch, start + length, None)
        g, big_g = self.rank * self.num_workers + worker, self.world_size * self.num_workers

        def positions(first_pass: bool) -> Iterator[tuple[int, int, None]]:
            pos = g
            while True:
                pass_, i = divmod(pos, n)
                if first_pass and pass_ > 0:
                    return
                if first_pass or pass_ > 0:
                    yield self.order(epoch, pass_)[i], 0, None
                pos += big_g

        return positions(True), positions(False)


class _Worker:
    """The state of one worker process (or of the main process with num_workers=0)."""

    def __init__(self, plan: Plan, physical: int):
        self.plan = plan
        self.physical = physical
        self.stats = {k: 0 for k in STAT_KEYS}
        self.last_error = ""
        self._short_warned: set[int] = set()

    # ---- reading --------------------------------------------------------------------------

    def read_shard(self, idx: int, first: int, stop: int | None) -> Iterator[dict]:
        """Samples ``first <= i < stop`` of shard ``idx``, retrying a failing shard and resuming
        after the last sample it delivered; gives up (with a warning) after the retries."""
        plan = self.plan
        url, name = plan.urls[idx], plan.names[idx]
        pos = first
        attempt = 0
        while True:
            try:
                stream = open_url(url)
            except Exception as exc:
                err: Exception = exc
            else:
                self.stats["shards_opened"] += 1
                try:
                    for i, sample in iter_samples(stream, seekable=is_local(url), start=pos, stop=stop,
                                                  stats=self.stats):
                        sample["__shard__"] = name
                        pos = i + 1
                        yield sample
                    if stop is not None and pos < stop and idx not in self._short_warned:
                        self._short_warned.add(idx)
                        logger.warning("rank %d: shard %s ended after %d samples; the sizes file says %d",
                                       plan.rank, url, pos, stop)
                    return
                except DataError:
                    raise
                except Exception as exc:  # I/O errors, corrupt or truncated tars: retry, then skip
                    err = exc
                finally:
                    stream.close()
            attempt += 1
            if attempt > plan.shard_retries:
                self.stats["shards_failed"] += 1
                self.last_error = f"{name}: {err}"
                logger.warning("rank %d: skipping shard %s after %d attempts (data.shard_retries=%d): %s",
                               plan.rank, url, attempt, plan.shard_retries, err)
                return
            self.stats["shard_retries"] += 1
            logger.info("rank %d: retrying shard %s from sample %d after: %s", plan.rank, url, pos, err)
            time.sleep(min(0.2 * attempt, 2.0))

    def read_segments(self, segments: Iterator[tuple[int, int, int | None]], dead: set[int]) -> Iterator[dict]:
        """Samples of a stream of shard segments; shards in ``dead`` (failed earlier in this
        stream) are not tried again."""
        n = len(self.plan.urls)
        failed_in_a_row = 0
        for idx, first, stop in segments:
            if idx in dead:
                failed_in_a_row += 1
                if failed_in_a_row >= max(n, 3) * 4:
                    raise DataError(f"rank {self.plan.rank}: every shard of data.train_shards failed; last error: "
                                    f"{self.last_error}", key="data.train_shards")
                continue
            before = self.stats["shards_failed"]
            got = False
            for sample in self.read_shard(idx, first, stop):
                got = True
                yield sample
            if self.stats["shards_failed"] > before:
                dead.add(idx)
            if self.stats["shards_failed"] > before and not got:
                failed_in_a_row += 1
                if failed_in_a_row >= max(n, 1) and failed_in_a_row >= 3:
                    raise DataError(f"rank {self.plan.rank}: {failed_in_a_row} shards in a row failed "
                                    f"(of {n} in data.train_shards); last error: {self.last_error}",
                                    key="data.train_shards")
            else:
                failed_in_a_row = 0

    # ---- bad samples ----------------------------------------------------------------------

    def bad(self, sample: dict, reason: str) -> None:
        plan = self.plan
        self.stats["samples_bad"] += 1
        self.last_error = f"{sample.get('__shard__', '?')}/{sample.get('__key__', '?')}: {reason}"
        logger.debug("rank %d: skipping bad sample %s", plan.rank, self.last_error)
        ok, bad = self.stats["samples_ok"], self.stats["samples_bad"]
        check_bad_fraction(ok, bad, plan.max_bad_fraction, f"rank {plan.rank} worker {self.physical}",
                           self.last_error)
        if ok == 0 and bad >= 1000:
            raise DataError(f"rank {plan.rank}: none of the first {bad} samples could be decoded; "
                            f"latest: {self.last_error}", key="data.train_shards")

    # ---- batches --------------------------------------------------------------------------

    def stream(self, epoch: int, worker: int, done_batches: int, done_raw: int) -> Iterator[tuple]:
        """The batches of logical ``worker`` in ``epoch``, after the first ``done_batches`` (whose
        samples, ``done_raw`` of them pre-decode, are replayed without decoding)."""
        plan = self.plan
        quota = plan.quota(worker)
        if done_batches >= quota:
            return
        primary, overflow = plan.sources(epoch, worker)
        rngs = [random.Random(_mix(plan.seed, _TAG_SHUFFLE, epoch, plan.rank, worker, part)) for part in (0, 1)]
        dead: set[int] = set()
        items = _chain(_shuffle(self.read_segments(primary, dead), plan.shuffle_buffer, rngs[0]),
                       _shuffle(self.read_segments(overflow, dead), plan.shuffle_buffer, rngs[1]))
        size = plan.decoder.size
        shared = get_worker_info() is not None  # batches go through shared memory: allocate there
        batch_index = done_batches
        n = 0
        k = 0
        batch = keys = None
        try:
            for sample in items:
                n += 1
                if n <= done_raw:
                    self.stats["samples_skipped"] += 1
                    continue
                if batch is None:
                    if plan.gpu_decode:
                        batch = EncodedBatchBuilder(plan.batch_size, size, plan.decoder.interpolation)
                    else:
                        batch = torch.empty((plan.batch_size, 3, size, size), dtype=torch.uint8)
                        if shared:
                            batch.share_memory_()
                    keys = []
                try:
                    if "__bad__" in sample:
                        raise BadSample(sample["__bad__"])
                    data = image_bytes(sample)
                    rng = random.Random(_mix(plan.seed, _TAG_AUG, epoch, plan.rank, worker, n - 1))
                    if plan.gpu_decode:  # header, box and flip only (same law and RNG); bytes ship
                        batch.add(prepare_sample(plan.decoder, data, rng))
                    else:
                        batch[k] = plan.decoder(data, rng)
                except BadSample as exc:
                    self.bad(sample, str(exc))
                    continue
                self.stats["samples_ok"] += 1
                keys.append(f"{sample['__shard__']}/{sample['__key__']}")
                k += 1
                if k == plan.batch_size:
                    meta = {"epoch": epoch, "worker": worker, "index": batch_index, "raw": n,
                            "physical": self.physical, "keys": keys, "stats": dict(self.stats),
                            "last_error": self.last_error}
                    yield (batch.build(keys, shared) if plan.gpu_decode else batch), meta
                    batch = None
                    k = 0
                    batch_index += 1
                    if batch_index >= quota:
                        return
        finally:
            items.close()
        raise DataError(f"rank {plan.rank}: ran out of samples in epoch {epoch} (worker {worker}): every "
                        f"shard failed or was empty; last error: {self.last_error or 'none'}",
                        key="data.train_shards")


def check_bad_fraction(ok: int, bad: int, limit: float, where: str, latest: str = "") -> None:
    """Raise :class:`DataError` once enough samples were seen and too many were bad."""
    seen = ok + bad
    if seen >= MIN_SAMPLES_FOR_BAD_CHECK and bad > limit * seen:
        raise TooManyBadSamples(
            f"{where}: {bad} of {seen} samples ({bad / seen:.2%}) could not be decoded, more than "
            f"data.max_bad_fraction={limit:g}; check the shards (latest: {latest}) or raise "
            f"data.max_bad_fraction", key="data.max_bad_fraction")


class TooManyBadSamples(DataError):
    """More than ``data.max_bad_fraction`` of the samples seen failed to decode."""


class _StreamDataset(IterableDataset):
    """What each DataLoader worker iterates: an infinite stream of ``(batch, meta)``."""

    def __init__(self, plan: Plan, epoch: int, batch: int, consumed: Sequence[int]):
        self.plan = plan
        self.start = (epoch, batch, list(consumed))

    def __iter__(self) -> Iterator[tuple]:
        plan = self.plan
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if info is not None and info.num_workers != plan.num_workers:
            raise RuntimeError("worker count differs from the plan")  # a bug, not a data problem
        set_max_image_pixels(plan.max_image_pixels)
        worker = _Worker(plan, physical)
        e0, b0, consumed = self.start
        bpe, w = plan.batches_per_epoch, plan.num_workers
        k0 = e0 * bpe + b0
        epoch = e0
        while True:
            logical = (physical + k0 - epoch * bpe) % w
            if epoch == e0:
                done = b0 // w + (1 if logical < b0 % w else 0)
                raw = consumed[logical]
            else:
                done = raw = 0
            yield from worker.stream(epoch, logical, done, raw)
            epoch += 1


def _worker_init(_: int, owner: int | None = None) -> None:
    """Start-up of a DataLoader worker: one torch thread, and signals meant for the training process
    do not end it.

    Under ``srun``, slurmstepd signals every process of the step, DataLoader workers included: the
    time-limit signal (SIGUSR1/SIGUSR2) and, on ``scancel``, ``scontrol requeue`` or preemption,
    SIGTERM. torch's worker handler dies on a SIGTERM that does not come from its parent, and the
    training process then raises ``DataLoader worker ... is killed by signal: Terminated`` from its
    SIGCHLD handler, in the middle of a step: no checkpoint, a failed job. So the worker ignores the
    stop signals (the training process stops at a step boundary and shuts its workers down), and
    still exits at once on a SIGTERM from ``owner``, the process that started it (the DataLoader's
    fallback for a worker that does not stop, and multiprocessing's clean-up at exit).
    """
    torch.set_num_threads(1)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    if owner is None:
        return
    # A Python handler cannot tell who sent a signal: block SIGTERM and take it with sigwaitinfo,
    # which says (si_pid), in a thread of its own (created after the block, so it inherits it).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def owner_only() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == owner:
                os._exit(0)  # as torch's own handler does for its parent

    threading.Thread(target=owner_only, name="maescale-worker-sigterm", daemon=True).start()


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
        dataset = _StreamDataset(plan, self._epoch, self._batch, self._consumed)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs = dict(prefetch_factor=self.prefetch_factor, persistent_workers=True,
                          worker_init_fn=functools.partial(_worker_init, owner=os.getpid()))
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, **kwargs)
        bpe, w = plan.batches_per_epoch, plan.num_workers
        iterator = iter(loader)
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
    set_max_image_pixels(data_cfg.max_image_pixels)
    decoder = Decoder(img_size, scale=data_cfg.crop_scale, ratio=data_cfg.crop_ratio,
                      interpolation=data_cfg.interpolation, hflip_prob=data_cfg.hflip_prob,
                      fast=data_cfg.fast_decode, max_pixels=data_cfg.max_image_pixels)
    plan = Plan(urls=urls, counts=counts, resampled=bool(data_cfg.resampled), seed=int(seed), rank=rank,
                world_size=world_size, num_workers=max(1, int(data_cfg.num_workers)),
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
    loader = TrainLoader(plan, num_workers=int(data_cfg.num_workers), prefetch_factor=int(data_cfg.prefetch_factor),
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
