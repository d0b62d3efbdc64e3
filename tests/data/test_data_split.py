"""The split law of the plan, for many shapes (no decoding): every (rank, worker) range is
disjoint, together they are the first R * bpe * B samples of the epoch's shard order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from maescale.data.decode import Decoder
from maescale.data.plan import Plan


def plan(counts, rank, world, workers, batch, samples=None, known=True):
    total = samples if samples is not None else sum(counts)
    return Plan(urls=[f"/x/shard-{i:06d}.tar" for i in range(len(counts))], counts=list(counts) if known else None,
                resampled=False, seed=7, rank=rank, world_size=world, num_workers=workers, batch_size=batch,
                samples_per_epoch=total, batches_per_epoch=total // (world * batch), shuffle_buffer=0,
                shard_retries=0, max_bad_fraction=0.0, max_image_pixels=1, decoder=Decoder(8))


def expand(segments):
    return [(idx, i) for idx, first, stop in segments for i in range(first, stop)]


@settings(max_examples=150, deadline=None)
@given(counts=st.lists(st.integers(0, 30), min_size=1, max_size=9), world=st.integers(1, 4),
       workers=st.integers(1, 4), batch=st.integers(1, 5), epoch=st.integers(0, 3), extra=st.integers(-20, 40))
def test_ranges_partition_the_epoch(counts, world, workers, batch, epoch, extra):
    total = sum(counts)
    samples = max(1, total + extra) if total else 1
    if total == 0 or samples // (world * batch) == 0:
        return
    taken = []
    for rank in range(world):
        for w in range(workers):
            p = plan(counts, rank, world, workers, batch, samples)
            primary, _ = p.sources(epoch, w)
            mine = expand(primary)
            assert len(mine) == p.quota(w) * batch
            taken += mine
        assert sum(p.quota(w) for w in range(workers)) == p.batches_per_epoch
    p = plan(counts, 0, world, workers, batch, samples)
    expected = expand(p._virtual(epoch, 0, p.batches_per_epoch * world * batch))
    assert taken == expected  # contiguous, in order, nothing twice beyond wrapping
    if samples <= total:
        assert len(set(taken)) == len(taken)
    # the epoch's order is the same on every rank and changes with the epoch
    assert p.order(epoch) == plan(counts, world - 1, world, workers, batch, samples).order(epoch)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), world=st.integers(1, 3), workers=st.integers(1, 3))
def test_whole_shard_split_deals_every_shard_once(n, world, workers):
    seen = []
    for rank in range(world):
        for w in range(workers):
            primary, overflow = plan([5] * n, rank, world, workers, 1, samples=5 * n, known=False).sources(0, w)
            seen += [idx for idx, _, _ in primary]
            first_overflow = next(overflow)[0]
            assert 0 <= first_overflow < n
    assert sorted(seen) == list(range(n))
