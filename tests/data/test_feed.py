"""DeviceFeed: batches prepared ahead (producer thread; on CUDA a side stream and events), the
position of the last batch *handed out*, exact resume from a checkpoint taken while a batch is
prepared ahead, errors raised at the batch they concern. Here the CPU stands in for the device:
the same thread and code, without streams."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from maescale.data import build_train_loader
from maescale.data.feed import DeviceFeed
from maescale.data.pipeline import normalize_batch
from tests.data.conftest import data_cfg, id_png, write_jpeg_shards

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_feed(shards, prefetch, gpu=True, state=None, **kw):
    cfg = data_cfg(shards, gpu_decode=gpu, num_workers=2, shuffle_buffer=8, **kw)
    loader = build_train_loader(cfg, img_size=32, micro_batch_size=4, rank=0, world_size=1, seed=3, state=state)
    return DeviceFeed(loader, torch.device("cpu"), MEAN, STD, prefetch=prefetch)


def wait_prepared_ahead(feed, timeout=60.0):
    """Until the producer has a batch ready that the loop has not taken."""
    end = time.monotonic() + timeout
    while feed._ready.qsize() == 0:
        assert time.monotonic() < end, "the producer prepared nothing ahead"
        time.sleep(0.01)


def run(feed, n):
    """n batches, and the feed's state after each."""
    out, states = [], []
    for _ in range(n):
        out.append(next(feed))
        states.append(feed.state_dict())
    return out, states


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    special = {6: ("png", id_png(6, 40))}  # one sample decoded in the worker, the rest on the "device"
    return write_jpeg_shards(tmp_path_factory.mktemp("feed"), count=48, sizes=[(80, 60), (160, 120)], special=special)


def test_prefetching_changes_neither_batches_nor_positions(shards):
    sync = make_feed(shards, prefetch=0)
    ref, ref_states = run(sync, 7)
    sync.close()
    ahead = make_feed(shards, prefetch=2)
    got, states = run(ahead, 7)
    wait_prepared_ahead(ahead)  # the loader has moved past the last batch handed out
    assert ahead.loader.state_dict() != states[-1]
    ahead.close()
    assert all(torch.equal(a, b) for a, b in zip(ref, got))
    assert states == ref_states
    assert [s["batch"] for s in states] == [1, 2, 3, 4, 5, 6, 7]
    assert got[0].dtype == torch.float32 and got[0].shape == (4, 3, 32, 32)


def test_checkpoint_taken_while_a_batch_is_prepared_ahead_resumes_exactly(shards):
    ref_feed = make_feed(shards, prefetch=1)
    ref, _ = run(ref_feed, 9)
    ref_feed.close()
    first = make_feed(shards, prefetch=1)
    run(first, 4)
    wait_prepared_ahead(first)
    state = first.state_dict()  # what a checkpoint at step 4 stores; batch 5 is already prepared
    assert state["batch"] == 4 and first.loader.state_dict()["batch"] == 5
    first.close()
    resumed = make_feed(shards, prefetch=1, state=state)
    got, _ = run(resumed, 5)
    resumed.close()
    assert all(torch.equal(a, b) for a, b in zip(got, ref[4:]))


def test_load_state_dict_after_iterating_drops_the_batches_prepared_ahead(shards):
    ref_feed = make_feed(shards, prefetch=1)
    ref, ref_states = run(ref_feed, 6)
    ref_feed.close()
    feed = make_feed(shards, prefetch=1)
    run(feed, 5)
    wait_prepared_ahead(feed)  # batch 6
    feed.load_state_dict(ref_states[1])  # back to after batch 2
    got, _ = run(feed, 3)
    feed.close()
    assert all(torch.equal(a, b) for a, b in zip(got, ref[2:5]))


def test_feed_matches_decoding_the_loader_batches_directly(shards):
    cfg = data_cfg(shards, gpu_decode=True, num_workers=2, shuffle_buffer=8)
    loader = build_train_loader(cfg, img_size=32, micro_batch_size=4, rank=0, world_size=1, seed=3)
    it = iter(loader)
    direct = [normalize_batch(next(it), MEAN, STD) for _ in range(3)]
    loader.close()
    feed = make_feed(shards, prefetch=1)
    got, _ = run(feed, 3)
    feed.close()
    assert all(torch.equal(a, b) for a, b in zip(direct, got))


def test_error_while_preparing_is_raised_at_its_batch_and_close_stops_the_thread(shards, monkeypatch):
    feed = make_feed(shards, prefetch=1)
    calls = {"n": 0}
    real = DeviceFeed._prepare

    def failing(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device failure on batch 3")
        return real(self, batch)

    monkeypatch.setattr(DeviceFeed, "_prepare", failing)
    run(feed, 2)
    with pytest.raises(RuntimeError, match="batch 3"):
        next(feed)
    assert feed.state_dict()["batch"] == 2  # the failed batch was never handed out
    with pytest.raises(RuntimeError, match="batch 3"):  # and stays failed
        next(feed)
    feed.close()
    assert not any(t.name == "maescale-feed" for t in threading.enumerate())


def test_close_while_the_producer_waits_returns_promptly(shards):
    feed = make_feed(shards, prefetch=1)
    next(feed)
    feed.close()
    assert feed._thread is None and not any(t.name == "maescale-feed" for t in threading.enumerate())
    with pytest.raises(ValueError):
        make_feed(shards, prefetch=-1)
