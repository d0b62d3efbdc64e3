#!/usr/bin/env python
"""Count the samples of existing WebDataset shards and write the sizes.json the loader reads.

    python tools/index_shards.py '/data/laion/{00000..01023}.tar' [--workers 16]
    python tools/index_shards.py 'pipe:aws s3 cp s3://b/x-{0000..0099}.tar -' --output sizes.json

SHARDS takes what data.train_shards takes (brace patterns, globs, several patterns, pipe: and
URLs). With per-shard counts the loader gives an exact epoch length and an exact mid-epoch resume
without data.num_samples. Writes sizes.json beside local shards (one per folder), or one file
at --output (then set data.sizes_file to it; needed for pipe:/remote shards). A corrupt or
truncated shard is an error naming it, and nothing is written. The logic lives in
:mod:`maescale.data.index`.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.data.errors import DataError  # noqa: E402
from maescale.data.index import index_shards  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="shard patterns, as data.train_shards takes them")
    p.add_argument("--output", default=None, help="one sizes file here instead of sizes.json beside the shards")
    p.add_argument("--workers", type=int, default=0, help="processes counting shards (default: one per CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace a sizes file that holds other counts")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        written = index_shards(args.shards, output=args.output, workers=args.workers, overwrite=args.overwrite)
    except (DataError, FileExistsError) as exc:
        print(f"index_shards: error: {exc}", file=sys.stderr)
        return 2
    for path, summary in written.items():
        print(f"{summary.total} samples in {len(summary.shards)} shards -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
