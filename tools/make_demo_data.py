#!/usr/bin/env python
"""Make the demo data set: procedural images as WebDataset shards.

    python tools/make_demo_data.py --output demo_data [--num-images 512] [--size 96] [--seed 0]

Writes demo_data/shards/shard-*.tar and demo_data/shards/sizes.json (what configs/tiny.yaml
reads) and 128 further labelled images in demo_data/heldout/ (the kNN evaluation of
configs/demo.yaml classifies them), replacing an earlier demo set there. Deterministic given the seed; takes a few seconds.
The logic lives in :mod:`maescale.data.demo`.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.data.demo import make_demo_data  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="demo_data", help="output folder (shards go to OUTPUT/shards)")
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--maxcount", type=int, default=128, help="images per shard")
    p.add_argument("--heldout", type=int, default=128, help="held-out images for the kNN evaluation (0: none)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = make_demo_data(args.output, num_images=args.num_images, size=args.size, seed=args.seed,
                                 maxcount=args.maxcount, heldout=args.heldout)
    except ValueError as exc:
        print(f"make_demo_data: error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary.total} images in {len(summary.shards)} shards -> {Path(args.output) / 'shards'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
