"""The data check of the plan: do the shards exist, is the epoch size known, how does the loader
split them over ``ranks x data.num_workers`` readers, and do the images decode (and how fast).

The split rules are the loader's (:class:`maescale.data.plan.Plan`): with per-shard sizes every
reader gets a contiguous range of samples (ranges start inside shards where needed), without
them whole shards are dealt round robin, and ``data.resampled`` draws shards with replacement.
Shards are found with the loader's own :func:`maescale.data.sources.expand_shards` and sizes with
its :func:`~maescale.data.sources.shard_sizes`; a sample of images goes through the training
transform with the loader's :class:`maescale.data.decode.Decoder` (or, with ``data.gpu_decode``,
the workers' share of it), timed in CPU seconds. Only that last step imports torch.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from maescale.config import Config, resolve_num_workers
from maescale.data.errors import DataError
from maescale.data.sources import default_sizes_file, expand_shards, is_local, shard_sizes

log = logging.getLogger(__name__)


@dataclass
class DecodeSample:
    """Images of a few shards through the training transform, on this machine's CPU."""

    images: int  # decoded fine
    bad: list[str]  # "shard/key: reason" of those that were not
    cpu_s: float  # CPU seconds of reading + decoding the timed images
    timed: int  # images in cpu_s (the first one warms up and is not timed)
    shards: list[str]
    mode: str  # "CPU decode" | "gpu_decode worker share"
    error: str | None = None  # a shard that could not be read at all

    @property
    def per_core(self) -> float | None:
        """Images per second one worker core manages (None if nothing was timed)."""
        return self.timed / self.cpu_s if self.timed and self.cpu_s > 0 else None


@dataclass
class DataCheck:
    """What the data check found; ``warnings`` name the key to change."""

    pattern: str
    urls: list[str] = field(default_factory=list)
    error: str | None = None  # the shards could not be listed
    sizes: list[int] | None = None
    samples_per_epoch: int | None = None
    samples_source: str | None = None
    readers: int = 0
    split: str = ""
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    decode: DecodeSample | None = None


def job_workers(cfg: Config) -> int:
    """DataLoader workers per rank in the job: ``data.num_workers``, with ``auto`` resolved from
    ``slurm.cpus_per_task`` as the job resolves it."""
    return resolve_num_workers(cfg.data.num_workers, cfg.slurm.cpus_per_task)


def _pattern(cfg: Config) -> str:
    s = cfg.data.train_shards
    return s if isinstance(s, str) else " :: ".join(s)


def check_data(cfg: Config, ranks: int, decode_samples: int = 32) -> DataCheck:
    """Check ``cfg.data`` for a job of ``ranks`` processes (see the module docstring)."""
    d = cfg.data
    check = DataCheck(pattern=_pattern(cfg), readers=ranks * max(1, job_workers(cfg)))
    if d.synthetic:
        check.split = "synthetic images made on the device (data.synthetic): no shards, no workers"
        return check
    try:
        check.urls = expand_shards(d.train_shards)
    except DataError as exc:
        check.error = str(exc)
        if d.num_samples:
            check.samples_per_epoch, check.samples_source = d.num_samples, "data.num_samples"
        return check
    n = len(check.urls)
    try:
        check.sizes = shard_sizes(check.urls, d.sizes_file)
    except DataError as exc:
        check.warnings.append(f"{exc} (data.sizes_file)")
    if d.num_samples is not None:
        check.samples_per_epoch, check.samples_source = d.num_samples, "data.num_samples"
    elif check.sizes is not None:
        check.samples_per_epoch = sum(check.sizes)
        check.samples_source = f"sizes file ({d.sizes_file or default_sizes_file(check.urls)})"
    else:
        where = d.sizes_file or default_sizes_file(check.urls)
        check.warnings.append(
            f"the job will stop at start-up: the epoch size is unknown (no sizes file naming every shard"
            f"{f' at {where}' if where else ''}); set data.num_samples, or data.sizes_file to the sizes.json "
            "tools/make_shards.py writes")
    _split(cfg, ranks, check)
    if decode_samples > 0:
        check.decode = decode_sample(cfg, check.urls, decode_samples)
        if check.decode.bad:
            check.warnings.append(f"{len(check.decode.bad)} of {check.decode.images + len(check.decode.bad)} sampled "
                                  f"images did not decode ({check.decode.bad[0]}); the job stops when more than "
                                  f"data.max_bad_fraction={d.max_bad_fraction:g} of them fail")
        if check.decode.error:
            check.warnings.append(check.decode.error)
    return check


def _split(cfg: Config, ranks: int, check: DataCheck) -> None:
    """How the loader deals the shards to ``check.readers`` readers (the rules of
    :class:`maescale.data.plan.Plan`), into ``check.split`` / notes / warnings."""
    d, n, readers = cfg.data, len(check.urls), check.readers
    workers = max(1, job_workers(cfg))
    who = f"{ranks} rank(s) x {workers} worker(s)"
    mb = cfg.train.micro_batch_size
    total = check.samples_per_epoch
    if total is not None and total // (ranks * mb) < 1:
        check.warnings.append(f"an epoch of {total} samples is less than one batch per rank ({ranks} ranks x micro-batch "
                              f"{mb}): the job stops at start-up (data.num_samples / data.train_shards)")
        return
    if d.resampled:
        check.split = (f"{n} shards drawn with replacement by {readers} readers ({who}; data.resampled): "
                       "no once-per-epoch guarantee")
        return
    quota = None
    if total is not None:
        bpe = total // (ranks * mb)
        quota = -(-bpe // workers) * mb  # samples of the busiest reader per epoch
    if check.sizes is not None:
        mean = sum(check.sizes) / n if n else 0.0
        check.split = (f"{n} shards, sizes known: every reader ({readers} = {who}) reads its own range of samples"
                       + (f", about {quota:,} per epoch" if quota else "")
                       + (f" (a shard holds {mean:,.0f} on average)" if n else ""))
        if n < readers:
            cost = ("a seek on local files" if all(is_local(u) for u in check.urls) else
                    "streamed shards read and discard the bytes before a range: on average half a shard per reader "
                    f"and epoch, ~{readers * mean / 2 / max(total or 1, 1):.0%} extra reading")
            check.notes.append(f"fewer shards ({n}) than readers ({readers}): ranges start inside shards ({cost}); "
                               "every sample is still read once per epoch")
        return
    check.split = f"{n} shards, sizes unknown: whole shards dealt round robin to {readers} readers ({who})"
    if n < readers:
        check.warnings.append(
            f"{n} shards for {readers} readers without per-shard sizes: {readers - n} readers have no shard of their "
            f"own and re-read shards of the next pass, so up to {(readers - n) / readers:.0%} of an epoch are "
            "repeats; write a sizes file (tools/index_shards.py indexes existing shards; data.sizes_file), more "
            "shards, or fewer readers (data.num_workers)")
    elif n % readers:
        check.notes.append(f"{n} shards over {readers} readers: {n % readers} readers get {n // readers + 1} shards, "
                           f"the others {n // readers}: uneven shards drop or repeat samples (a sizes file avoids it)")


def decode_sample(cfg: Config, urls: list[str], count: int) -> DecodeSample:
    """Decode up to ``count`` samples from the first, middle and last shard with the training
    transform (one torch thread, as a loader worker runs), timing the CPU seconds per image."""
    import torch

    from maescale.data.decode import BadSample, Decoder, image_bytes, set_max_image_pixels
    from maescale.data.sources import open_url
    from maescale.data.tario import iter_samples

    d = cfg.data
    set_max_image_pixels(d.max_image_pixels)
    decoder = Decoder(cfg.model.img_size, scale=d.crop_scale, ratio=d.crop_ratio, interpolation=d.interpolation,
                      hflip_prob=d.hflip_prob, fast=d.fast_decode, max_pixels=d.max_image_pixels)
    if d.gpu_decode:
        from maescale.data.gpu_decode import prepare_sample

        def work(data: bytes, rng: random.Random) -> object:
            return prepare_sample(decoder, data, rng)
    else:
        work = decoder
    picks = sorted({0, len(urls) // 2, len(urls) - 1}) if urls else []
    per = -(-count // max(1, len(picks)))
    out = DecodeSample(0, [], 0.0, 0, [urls[i] for i in picks], "gpu_decode worker share" if d.gpu_decode else "CPU decode")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = random.Random(0)
    try:
        for url in out.shards:
            try:
                stream = open_url(url)
            except Exception as exc:
                out.error = f"cannot open shard {url}: {exc} (data.train_shards)"
                continue
            try:
                t0 = time.process_time()
                for _, sample in iter_samples(stream, seekable=is_local(url), stop=per):
                    if out.images + len(out.bad) >= count:
                        break
                    try:
                        if "__bad__" in sample:
                            raise BadSample(sample["__bad__"])
                        work(image_bytes(sample), rng)
                    except BadSample as exc:
                        out.bad.append(f"{url.rsplit('/', 1)[-1]}/{sample.get('__key__', '?')}: {exc}")
                    else:
                        out.images += 1
                        if out.images == 1:  # warm-up: first-call costs are not per image
                            t0 = time.process_time()
                            continue
                        out.timed += 1
                    out.cpu_s += time.process_time() - t0
                    t0 = time.process_time()
            except Exception as exc:  # a corrupt or truncated tar, an I/O error
                out.error = f"shard {url} cannot be read: {type(exc).__name__}: {exc} (data.train_shards)"
            finally:
                stream.close()
    finally:
        torch.set_num_threads(threads)
    return out
