"""What runs inside a DataLoader worker: it reads its planned shard segments (retrying failing
shards), decodes the samples leaving its shuffle buffer into batches tagged with their
provenance, and accounts for bad samples and failed shards.

Worker processes run one infinite iterator (:class:`StreamDataset`) for the whole run: epochs
advance inside them, no restart per epoch. Physical worker ``p`` plays, in each epoch, the logical
worker (:mod:`maescale.data.plan`) whose batches land on its turn of the DataLoader's round robin,
so the DataLoader's fixed round-robin order is exactly the logical order, across epoch boundaries
and after a resume that starts mid-epoch. A resumed worker replays its shuffle buffer up to the
saved count without decoding anything.

Each batch travels with ``meta``: ``(epoch, logical worker, index)``, ``raw`` (samples that have
left this worker's shuffle buffer, the resume position), the worker's counters and its latest error.

GPU decode (``data.gpu_decode: true``, :mod:`maescale.data.gpu_decode`). The worker reads only
each JPEG's header, draws the box and flip with the same law and the same per-sample RNG, and
ships the bytes (an ``EncodedBatch``); other images are decoded here as without it.

Bad data. Undecodable samples (corrupt, empty, random bytes, truncated, decompression bombs, no
image) are skipped and counted; shards that fail are retried ``data.shard_retries`` times and then
skipped with a warning naming them; once ``MIN_SAMPLES_FOR_BAD_CHECK`` samples were seen, more
than ``data.max_bad_fraction`` bad samples raises :class:`TooManyBadSamples`
(:func:`check_bad_fraction`, also used by the loader for samples that fail on the device).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from maescale.data.decode import BadSample, image_bytes, set_max_image_pixels
from maescale.data.errors import DataError
from maescale.data.gpu_decode import EncodedBatchBuilder, prepare_sample
from maescale.data.plan import TAG_AUG, TAG_SHUFFLE, Plan, seed_of, shuffled
from maescale.data.sources import is_local, open_url
from maescale.data.tario import iter_samples
from maescale.faults import fault_point

logger = logging.getLogger(__name__)

MIN_SAMPLES_FOR_BAD_CHECK = 100
STAT_KEYS = ("samples_ok", "samples_bad", "samples_skipped", "shards_opened", "shards_failed",
             "shard_retries", "odd_members")


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
        rngs = [random.Random(seed_of(plan.seed, TAG_SHUFFLE, epoch, plan.rank, worker, part)) for part in (0, 1)]
        dead: set[int] = set()
        items = _chain(shuffled(self.read_segments(primary, dead), plan.shuffle_buffer, rngs[0]),
                       shuffled(self.read_segments(overflow, dead), plan.shuffle_buffer, rngs[1]))
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
                    rng = random.Random(seed_of(plan.seed, TAG_AUG, epoch, plan.rank, worker, n - 1))
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


class StreamDataset(IterableDataset):
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


def worker_init(_: int, owner: int | None = None) -> None:
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
    fault_point("data.worker_start")  # tests: widen the start-up window in which a signal may come
    torch.set_num_threads(1)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    if owner is None:
        return
    # A Python handler cannot tell who sent a signal: block SIGTERM (the loader forks its workers with
    # it blocked already, so one sent during start-up waits here) and take it with sigwaitinfo,
    # which says (si_pid), in a thread of its own (created after the block, so it inherits it).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def owner_only() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == owner:
                os._exit(0)  # as torch's own handler does for its parent

    threading.Thread(target=owner_only, name="maescale-worker-sigterm", daemon=True).start()

