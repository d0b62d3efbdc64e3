"""Who reads which samples, in which order: the seeded plan of every (rank, logical worker) in
every epoch, and the shuffle buffer's law. Plain data and arithmetic, no I/O and no torch.

Vocabulary. ``R`` ranks (``world_size``), ``W`` loader workers per rank (``data.num_workers``,
counted as 1 when it is 0), ``B`` = ``micro_batch_size``, ``T`` = samples per epoch for the whole
job (``data.num_samples`` or the sizes file). Every rank yields ``bpe = T // (R * B)`` batches per
epoch (:attr:`maescale.data.pipeline.TrainLoader.batches_per_epoch`), so ranks stay in lockstep.

Determinism. Everything is a function of ``(seed, epoch, rank, worker, position)``: the epoch's
shard order (a seeded permutation, the same on all ranks), which samples each worker reads, the
shuffle buffer's choices, and each sample's crop and flip (a ``random.Random`` seeded from
``(seed, epoch, rank, worker, n)`` where ``n`` counts samples leaving that worker's shuffle
buffer). Nothing depends on timing, so a run can be replayed. :func:`seed_of` and the ``TAG_*``
constants are the one place those seeds are made.

Logical workers. Within an epoch, rank batch ``b`` comes from logical worker ``b % W``, which
produces ``bpe // W`` batches (+1 for the first ``bpe % W`` workers, :meth:`Plan.quota`).

Which samples an epoch sees (epoch mode, ``data.resampled: false``; :meth:`Plan.sources`):

* With per-shard counts (``sizes.json`` written by ``tools/make_shards.py`` or
  ``tools/index_shards.py``, or ``data.sizes_file``): the epoch's shards, in the epoch's seeded
  order, are concatenated into one virtual sequence of samples (wrapping into a fresh permutation
  when ``data.num_samples`` is larger than the data set). The first ``R * bpe * B`` samples are
  cut into contiguous ranges, one per (rank, logical worker), in proportion to their batch counts.
  **Each of these samples is handed out exactly once in the epoch, on exactly one rank** -- ranges
  may start and end inside a shard (the worker skips to its start: a seek on local files, reading
  without decoding on ``pipe:`` streams). What is dropped: the last ``T mod (R * B)`` (fewer than
  one global batch) samples of the epoch's order -- a different set every epoch. If samples are
  undecodable or a shard fails, the affected worker tops up from the samples after its range (the
  overflow stream; so a handful of samples may appear twice in that epoch) and the failures are
  counted.
* Without per-shard counts (``data.num_samples`` set and no sizes file): shards are dealt to the
  ``R * W`` workers round robin in the epoch's order. A sample is seen at most once when every
  worker's shards hold at least its quota; the rest of a worker's shards is dropped (uneven
  shards drop more), and a worker whose shards run short continues with shards of the next
  permutation (repeats). A sizes file (``tools/index_shards.py`` writes one for any shards)
  avoids this.
* ``data.resampled: true``: every worker draws shards with replacement, forever; an epoch is just
  ``bpe`` batches. No once-per-epoch guarantee.

Shuffling. Shard order is permuted every epoch; each worker passes its samples through a
``data.shuffle_buffer``-sample buffer (:func:`shuffled`; with a range shorter than the buffer, the
whole range is shuffled); a batch holds samples of one worker. ``tools/make_shards.py`` shuffles
files before sharding, so that each shard already mixes classes.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from maescale.data.sources import shard_name

if TYPE_CHECKING:
    from maescale.data.decode import Decoder

# What a seed is for: the epoch's shard order, a worker's shuffle buffer, resampled shard draws,
# a sample's crop and flip.
TAG_ORDER, TAG_SHUFFLE, TAG_RESAMPLE, TAG_AUG = 1, 2, 3, 4


def seed_of(*values: int) -> int:
    """A 64-bit seed from a tuple of integers (stable across processes and Python versions)."""
    return int.from_bytes(hashlib.blake2b(repr(values).encode(), digest_size=8).digest(), "little")


def shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
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
            random.Random(seed_of(self.seed, TAG_ORDER, epoch, pass_)).shuffle(order)
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
            rng = random.Random(seed_of(self.seed, TAG_RESAMPLE, epoch, self.rank, worker))
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
