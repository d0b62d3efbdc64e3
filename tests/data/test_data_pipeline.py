"""The loader: split, epochs, shuffle, resampling, bad data, position and resume."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter

import pytest
import torch

from maescale.data.demo import photo_like_jpeg
from maescale.data import DataError, TooManyBadSamples, build_train_loader, normalize_batch
from tests.data.conftest import data_cfg, id_of, write_shards

UNEVEN = [7, 30, 11, 20, 28]  # 96 samples in shards of very different sizes


def take(loader, n):
    """n batches and the keys of their samples."""
    it = iter(loader)
    batches, keys = [], []
    for _ in range(n):
        batches.append(next(it))
        keys.append(list(loader.last_batch_keys))
    loader.close()
    return batches, keys


def ids(batch):
    return [id_of(img) for img in batch]


def test_batches_are_uint8_and_keys_match_pixels(shard_dir):
    shards = write_shards(shard_dir, [10, 14])
    loader = build_train_loader(data_cfg(shards), img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0)
    assert loader.samples_per_epoch == 24 and loader.batches_per_epoch == 6
    batches, keys = take(loader, 6)
    for b, k in zip(batches, keys):
        assert b.dtype == torch.uint8 and b.shape == (4, 3, 8, 8) and b.is_contiguous()
        assert [f"s{i:05d}" for i in ids(b)] == [x.split("/")[-1] for x in k]
        assert (b[:, 2] == 77).all()  # solid colours survive crop + resize exactly
    assert sorted(i for b in batches for i in ids(b)) == list(range(24))


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_read_every_sample_exactly_once(shard_dir, workers):
    shards = write_shards(shard_dir, UNEVEN)
    seen = []
    per_rank = []
    for rank in range(2):
        cfg = data_cfg(f"{shard_dir}/shard-{{000000..000004}}.tar", num_workers=workers, shuffle_buffer=8)
        loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=rank, world_size=2, seed=3)
        assert loader.batches_per_epoch == 12
        batches, _ = take(loader, loader.batches_per_epoch)
        per_rank.append(len(batches))
        seen += [i for b in batches for i in ids(b)]
    assert per_rank == [12, 12]
    assert sorted(seen) == list(range(96))  # every sample once, none twice
    assert shards


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_uneven_epoch_drops_less_than_one_global_batch_and_ranks_stay_in_lockstep(shard_dir):
    write_shards(shard_dir, [5, 9, 3, 17, 1, 8])  # 43 samples; 2 ranks x 3 workers x batch 4
    seen = []
    for rank in range(2):
        cfg = data_cfg(str(shard_dir / "shard-*.tar"), num_workers=3, shuffle_buffer=4)
        loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=rank, world_size=2, seed=0)
        assert loader.batches_per_epoch == 43 // 8 == 5
        batches, _ = take(loader, 5)
        seen += [i for b in batches for i in ids(b)]
    assert len(seen) == len(set(seen)) == 40  # 3 samples (< one global batch of 8) dropped


def test_epochs_change_order_and_cover_the_data_each_time(shard_dir):
    write_shards(shard_dir, [12, 12])
    cfg = data_cfg(str(shard_dir / "shard-*.tar"), shuffle_buffer=8)
    loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0)
    batches, _ = take(loader, 18)  # 3 epochs of 6 batches
    epochs = [[i for b in batches[e * 6:(e + 1) * 6] for i in ids(b)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(24))
    assert epochs[0] != epochs[1] != epochs[2]
    assert loader.epoch == 3


def test_shuffle_buffer_shuffles_and_is_deterministic_per_seed(shard_dir):
    write_shards(shard_dir, [40])

    def order(seed, buffer):
        cfg = data_cfg(str(shard_dir / "shard-*.tar"), shuffle_buffer=buffer)
        loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=seed)
        return [i for b in take(loader, 10)[0] for i in ids(b)]

    assert order(0, 0) == list(range(40))  # no buffer: shard order
    a, b, c = order(0, 16), order(0, 16), order(1, 16)
    assert a == b  # same seed, same order
    assert a != c  # other seed, other order
    assert a != list(range(40)) and sorted(a) == list(range(40))
    # displacement well beyond neighbours: the buffer really mixes
    assert sum(abs(pos - i) for pos, i in enumerate(a)) / 40 > 4


def test_same_batches_with_zero_or_one_worker_process(shard_dir):
    write_shards(shard_dir, [15, 17])
    runs = []
    for workers in (0, 1):
        cfg = data_cfg(str(shard_dir / "shard-*.tar"), num_workers=workers)
        loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=5)
        runs.append(take(loader, 10)[0])
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_resampled_mode_is_infinite_and_draws_with_replacement(shard_dir):
    write_shards(shard_dir, [6, 6, 6, 6])
    cfg = data_cfg(str(shard_dir / "shard-*.tar"), resampled=True, shuffle_buffer=4)
    loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0)
    assert loader.batches_per_epoch == 6
    batches, _ = take(loader, 30)  # 5 "epochs"
    counts = Counter(i for b in batches for i in ids(b))
    assert max(counts.values()) > 1  # repeats: shards drawn with replacement
    assert loader.epoch == 5
    again, _ = take(build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0), 30)
    assert all(torch.equal(x, y) for x, y in zip(batches, again))  # still deterministic


def test_num_samples_without_sizes_file_splits_whole_shards(shard_dir):
    write_shards(shard_dir, [8, 8, 8, 8], sizes_json=False)
    pattern = str(shard_dir / "shard-*.tar")
    with pytest.raises(DataError, match="data.num_samples"):
        build_train_loader(data_cfg(pattern), img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0)
    seen = []
    for rank in range(2):
        cfg = data_cfg(pattern, num_samples=32, num_workers=2)
        loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=rank, world_size=2, seed=0)
        seen += [i for b in take(loader, loader.batches_per_epoch)[0] for i in ids(b)]
    assert sorted(seen) == list(range(32))  # one shard per reader: exactly once


def test_num_samples_overrides_epoch_length_with_sizes_file(shard_dir):
    write_shards(shard_dir, [10, 10])
    cfg = data_cfg(str(shard_dir / "shard-*.tar"), num_samples=12)
    loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0)
    assert loader.samples_per_epoch == 12 and loader.batches_per_epoch == 3
    first = [i for b in take(loader, 3)[0] for i in ids(b)]
    assert len(set(first)) == 12


def test_pipe_url(shard_dir):
    write_shards(shard_dir, [9, 7])
    cfg = data_cfg(f"pipe:cat {shard_dir}/shard-{{000000..000001}}.tar", sizes_file=str(shard_dir / "sizes.json"),
                   num_workers=2)
    loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0)
    assert loader.samples_per_epoch == 16
    seen = [i for b in take(loader, 4)[0] for i in ids(b)]
    assert sorted(seen) == list(range(16))
    with pytest.raises(DataError, match="data.num_samples"):
        build_train_loader(data_cfg(f"pipe:cat {shard_dir}/shard-000000.tar"), img_size=8, micro_batch_size=4,
                           rank=0, world_size=1, seed=0)


# --------------------------------------------------------------------------------------------
# Bad data
# --------------------------------------------------------------------------------------------


def test_bad_samples_are_skipped_and_counted(shard_dir, tmp_path):
    huge = tmp_path / "huge.png"
    from PIL import Image

    Image.new("L", (3000, 3000)).save(huge)  # 9 Mpx, compresses to a few kB
    truncated = photo_like_jpeg(0, 64, 48)[:400]
    bad = {3: b"", 10: os.urandom(500), 17: truncated, 25: huge.read_bytes()}
    write_shards(shard_dir, [20, 20], bad=bad)
    cfg = data_cfg(str(shard_dir / "shard-*.tar"), max_image_pixels=1_000_000, max_bad_fraction=0.2)
    loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0)
    batches, _ = take(loader, 9)  # 36 good samples
    seen = [i for b in batches for i in ids(b)]
    assert sorted(seen) == sorted(set(range(40)) - set(bad))
    s = loader.stats()
    assert s["samples_bad"] == 4 and s["samples_ok"] == 36


def test_truncated_shard_keeps_its_complete_samples_and_is_skipped(shard_dir, caplog):
    paths = write_shards(shard_dir, [10, 10, 10])
    import tarfile

    with tarfile.open(paths[1]) as tar:
        cut = tar.getmembers()[10].offset_data + 40  # inside the 6th sample's image (2 members/sample)
    os.truncate(paths[1], cut)
    cfg = data_cfg(str(shard_dir / "shard-*.tar"), shard_retries=1)
    loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING, logger="maescale.data.pipeline"):
        batches, _ = take(loader, 7)
    s = loader.stats()
    assert s["shards_failed"] == 1 and s["shard_retries"] == 1
    assert "shard-000001.tar" in caplog.text and "skipping shard" in caplog.text
    seen = [i for b in batches for i in ids(b)]
    assert set(range(10, 15)) <= set(seen)  # the complete samples before the damage
    assert not set(range(15, 20)) & set(seen)


def test_unopenable_shard_is_retried_then_skipped(shard_dir, caplog):
    write_shards(shard_dir, [8, 8])
    cfg = data_cfg([str(shard_dir / "shard-*.tar"), "pipe:cat /nonexistent/shard-000009.tar"], num_samples=16,
                   shard_retries=2, num_workers=2)
    loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0)
    with caplog.at_level(logging.WARNING):
        batches, _ = take(loader, 4)
    assert len(batches) == 4
    # worker processes log to stderr through their own handlers; the counters come back to us
    assert loader.stats()["shards_failed"] >= 1


def test_too_many_bad_samples_raise_naming_the_key(shard_dir):
    bad = {i: b"not an image" for i in range(0, 120, 3)}  # a third of the samples
    write_shards(shard_dir, [60, 60], bad=bad)
    for workers in (0, 2):
        cfg = data_cfg(str(shard_dir / "shard-*.tar"), num_workers=workers, max_bad_fraction=0.1)
        loader = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0)
        with pytest.raises(DataError, match=r"data\.max_bad_fraction=0\.1") as info:
            take(loader, 30)
        assert "more than" in str(info.value)
        if workers == 0:
            assert isinstance(info.value, TooManyBadSamples)


def test_missing_pattern_fails_at_start_naming_it(tmp_path):
    pattern = str(tmp_path / "nothing-*.tar")
    with pytest.raises(DataError, match="nothing-\\*.tar"):
        build_train_loader(data_cfg(pattern), img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0)


def test_epoch_smaller_than_a_global_batch_is_an_error(shard_dir):
    write_shards(shard_dir, [5])
    with pytest.raises(DataError, match="less than one batch"):
        build_train_loader(data_cfg(str(shard_dir / "*.tar")), img_size=8, micro_batch_size=4, rank=0,
                           world_size=2, seed=0)


# --------------------------------------------------------------------------------------------
# Position and resume
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_identical_next_batches_across_an_epoch_boundary(shard_dir, workers):
    bad = {5: b"\xff\xd8junk", 33: b""}  # undecodable samples shift the per-worker positions
    write_shards(shard_dir, [13, 22, 9, 16], bad=bad)  # 60 samples, 58 good
    cfg = data_cfg(str(shard_dir / "shard-*.tar"), num_workers=workers, shuffle_buffer=12, max_bad_fraction=0.2)

    def make(state=None):
        return build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=1, world_size=2, seed=11, state=state)

    full, _ = take(make(), 13)  # bpe = 7: batches 0..12 span epochs 0 and 1
    assert make().batches_per_epoch == 7
    for cut in (5, 9):
        first = make()
        head, _ = take(first, cut)
        state = json.loads(json.dumps(first.state_dict()))
        assert state["epoch"] == cut // 7 and state["batch"] == cut % 7
        resumed = make(state)
        tail, _ = take(resumed, 13 - cut)
        for x, y in zip(full, head + tail):
            assert torch.equal(x, y)
        assert resumed.stats()["samples_skipped"] > 0 or cut % 7 == 0
        if workers == 0:  # nothing decoded ahead: exactly the handed-out samples were decoded
            assert resumed.stats()["samples_ok"] == (13 - cut) * 4


def test_state_is_not_advanced_by_prefetching(shard_dir):
    write_shards(shard_dir, [40])
    cfg = data_cfg(str(shard_dir / "shard-*.tar"), num_workers=2, prefetch_factor=4)
    loader = build_train_loader(cfg, img_size=8, micro_batch_size=2, rank=0, world_size=1, seed=0)
    it = iter(loader)
    next(it)
    next(it)
    next(it)
    import time

    time.sleep(0.5)  # workers fill their prefetch queues meanwhile
    state = loader.state_dict()
    loader.close()
    assert (state["epoch"], state["batch"]) == (0, 3)
    assert state["consumed"] == [4, 2]


def test_state_of_other_rank_or_gathered_list_is_accepted(shard_dir):
    write_shards(shard_dir, [24, 24])
    cfg = data_cfg(str(shard_dir / "shard-*.tar"))

    def make(rank, state=None):
        return build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=rank, world_size=2, seed=0, state=state)

    r0, r1 = make(0), make(1)
    take(r0, 2)
    take(r1, 2)
    full1, _ = take(make(1), 4)
    gathered = {"ranks": [r0.state_dict(), r1.state_dict()]}
    for state in (gathered, r0.state_dict()):  # own entry picked / other rank's position used
        tail, _ = take(make(1, state), 2)
        assert all(torch.equal(x, y) for x, y in zip(full1[2:], tail))


def test_changed_layout_resumes_approximately_with_a_warning(shard_dir, caplog):
    write_shards(shard_dir, [24, 24])
    cfg = data_cfg(str(shard_dir / "shard-*.tar"))
    old = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=2, seed=0)
    take(old, 3)
    with caplog.at_level(logging.WARNING):
        new = build_train_loader(cfg, img_size=8, micro_batch_size=4, rank=0, world_size=1, seed=0,
                                 state=old.state_dict())
    assert "different layout" in caplog.text
    assert (new.epoch, new.state_dict()["batch"]) == (0, 6)  # 24 samples of the job done


def test_normalize_batch():
    batch = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalize_batch(batch, mean, std)
    ref = (batch.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5)
    assert normalize_batch(batch, mean, std, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_gpu_decode_gives_encoded_batches_of_the_same_samples(shard_dir):
    """data.gpu_decode is accepted (details in test_gpu_decode.py): on these PNGs every sample is
    decoded in the worker, so the decoded batches equal the CPU path's exactly."""
    from maescale.data import EncodedBatch

    write_shards(shard_dir, [8])
    batches = {}
    for gpu in (False, True):
        loader = build_train_loader(data_cfg(str(shard_dir / "*.tar"), gpu_decode=gpu), img_size=8,
                                    micro_batch_size=4, rank=0, world_size=1, seed=0)
        batches[gpu] = take(loader, 2)
    assert batches[True][1] == batches[False][1]
    for enc, ref in zip(batches[True][0], batches[False][0]):
        assert isinstance(enc, EncodedBatch) and enc.num_jpegs == 0
        assert torch.equal(normalize_batch(enc.to("cpu"), (0.5,) * 3, (0.5,) * 3),
                           normalize_batch(ref, (0.5,) * 3, (0.5,) * 3))
