#!/usr/bin/env python
"""Tar reading through maescale's data API, to compare two checkouts on the same shards.

    PYTHONPATH=CHECKOUT python bench/tar_read.py 'SHARDS/shard-*.tar' MODE [--passes N]

The ``maescale`` package is taken from PYTHONPATH (no path set-up here), so the same command
measures any checkout that has ``maescale.data.tario.iter_samples`` and
``maescale.data.sources.open_url``. MODE:

* ``file``: every sample of every shard, local files (random-access mode), ``--passes`` times;
* ``pipe``: the same through ``pipe:cat SHARD`` (stream mode);
* ``skip``: open each shard and read only its last sample (a resumed worker), ``--passes`` times;
* ``loader``: ``build_train_loader`` in this process (``num_workers: 0``): read, decode,
  RandomResizedCrop to 224, batches of 32, one epoch.

torch is imported first in every mode, as in a training process. Prints one line:
``MODE samples N wall_s W cpu_s C samples_per_s R``.
"""

from __future__ import annotations

import argparse
import glob
import time

import torch  # noqa: F401  (a worker process has it; importing webdataset would import it anyway)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="a glob of local shards")
    p.add_argument("mode", choices=["file", "pipe", "skip", "loader"])
    p.add_argument("--passes", type=int, default=10)
    args = p.parse_args()

    from maescale.data.sources import open_url
    from maescale.data.tario import iter_samples

    paths = sorted(glob.glob(args.shards))
    if not paths:
        raise SystemExit(f"no shards match {args.shards!r}")
    n = 0
    wall, cpu = time.perf_counter(), time.process_time()
    if args.mode == "loader":
        from maescale.config import DataConfig
        from maescale.data import build_train_loader

        cfg = DataConfig(train_shards=args.shards, num_workers=0, shuffle_buffer=64, pin_memory=False,
                         fast_decode=True)
        loader = build_train_loader(cfg, img_size=224, micro_batch_size=32, rank=0, world_size=1, seed=0)
        it = iter(loader)
        for _ in range(loader.samples_per_epoch // 32):
            batch = next(it)
            n += (batch[0] if isinstance(batch, (list, tuple)) else batch).shape[0]
        loader.close()
    else:
        for _ in range(args.passes):
            for path in paths:
                url = f"pipe:cat {path}" if args.mode == "pipe" else path
                with open_url(url) as stream:
                    if args.mode == "skip":
                        # a shard of the benchmark holds 256 samples: resume at the last one
                        n += sum(1 for _ in iter_samples(stream, seekable=True, start=255))
                    else:
                        for _, sample in iter_samples(stream, seekable=args.mode == "file"):
                            n += 1
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{args.mode} samples {n} wall_s {wall:.3f} cpu_s {cpu:.3f} samples_per_s {n / wall:.0f}")


if __name__ == "__main__":
    main()
