#!/usr/bin/env python
"""Benchmark the real training loop (``maescale.train.main``) on a config, variant by variant.

    python tools/bench_loop.py configs/vit_huge.yaml --micro-batch 32,128 --data synthetic,shards,gpu_decode \\
        --make-shards /tmp/shards --json loop.json [key=value ...]

Each variant runs the loop as ``tools/train.py`` would (DeepSpeed engine, data feed, logging) for
``2 x --steps`` steps plus ``--profile-steps`` profiled ones, in this process, into a throw-away
run directory, and reports the steady-state images/s per GPU, MFU, data wait, peak memory and
kernel launches / aten ops per step. ``--variant 'model.compile=blocks'`` adds variants with extra
overrides (repeat the flag). The logic lives in :mod:`maescale.devtools.loop_bench`.
"""

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.devtools.loop_bench import DATA_SOURCES, bench_variant, format_results, make_jpeg_shards  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every variant")
    p.add_argument("--micro-batch", default="32,128", help="comma list")
    p.add_argument("--data", default="synthetic", help=f"comma list of {', '.join(DATA_SOURCES)}")
    p.add_argument("--variant", action="append", default=[],
                   help="extra overrides (space separated) run as one more variant per micro-batch and data source")
    p.add_argument("--no-base", action="store_true", help="run only the --variant variants, not the config as it is")
    p.add_argument("--shards", default=None, help="JPEG shards for data=shards/gpu_decode")
    p.add_argument("--make-shards", default=None, metavar="DIR",
                   help="generate --num-images photo-like 500x375 JPEGs as shards in DIR and use them")
    p.add_argument("--num-images", type=int, default=3072)
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the config's)")
    p.add_argument("--steps", type=int, default=15, help="steps per log window (warm-up window, then measured)")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shards = args.shards
    if args.make_shards:
        shards = make_jpeg_shards(args.make_shards, args.num_images)
    extra = ([] if args.no_base else [[]]) + [v.split() for v in args.variant]
    results = []
    for mb in (int(x) for x in args.micro_batch.split(",") if x):
        for data in (x for x in args.data.split(",") if x):
            for ov in extra:
                r = bench_variant(args.config, mb, data, args.overrides, args.steps, args.profile_steps, shards,
                                  args.workers, extra=ov)
                logging.getLogger("bench_loop").info("mb %d %s %s: %s img/s (%s)", mb, data, ov, r.images_per_s,
                                                     r.status)
                results.append(r)
    from maescale.distributed import shutdown

    shutdown()
    print(format_results(results))
    if args.json:
        from maescale.devtools.bench import environment
        from maescale.rundir import write_json_atomic
        import torch

        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        write_json_atomic(args.json, {"kind": "loop", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                      "config": args.config, "args": vars(args), "env": environment(dev),
                                      "results": [r.as_dict() for r in results]}, indent=1)
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
