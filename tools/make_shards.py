#!/usr/bin/env python
"""Write WebDataset shards (+ sizes.json) from an image folder.

    python tools/make_shards.py --input /data/imagenet/train --output /data/in1k-shards \\
        --maxcount 1000 --workers 16 [--resize 512]

ImageNet-style class folders (the class is the first folder level) or a flat folder. Writes
shard-000000.tar, ... and sizes.json into --output, nothing else, nowhere else. The logic lives in
:mod:`maescale.data.shards`.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.data.shards import make_shards  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="image folder (class sub-folders or flat)")
    p.add_argument("--output", required=True, help="folder for the shards and sizes.json")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most (default 1000)")
    p.add_argument("--maxsize", type=int, default=1 << 30, help="bytes per shard at most (default 1 GiB)")
    p.add_argument("--workers", type=int, default=1, help="processes reading/re-encoding images")
    p.add_argument("--resize", type=int, default=None, metavar="N",
                   help="re-encode images whose shorter side exceeds N to that size (JPEG q95)")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default shard)")
    p.add_argument("--seed", type=int, default=0, help="seed of the file-order shuffle")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted file order (shards will not mix classes)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = make_shards(args.input, args.output, maxcount=args.maxcount, maxsize=args.maxsize,
                              workers=args.workers, resize=args.resize, shuffle=not args.no_shuffle, seed=args.seed,
                              prefix=args.prefix, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary.total} samples in {len(summary.shards)} shards, {summary.skipped} files skipped -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
