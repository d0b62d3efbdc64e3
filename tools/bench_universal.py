#!/usr/bin/env python
"""Time the universal conversion of a real checkpoint (what a resume on another GPU count runs):

    python tools/bench_universal.py --preset mae_vit_huge_patch14 --workers 1,2 --dir /scratch/ub \\
        --json bench/universal_cpu.json

Makes the checkpoint with the real loop (one step, ZeRO-1, bf16, synthetic data), then converts it
with each worker count from scratch. A ViT-H checkpoint needs ~20 GB of disk in --dir and ~10 GB
of memory. The logic lives in :mod:`maescale.devtools.universal_bench`.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.devtools.universal_bench import dump, run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mae_vit_huge_patch14")
    p.add_argument("--workers", default="1,2", help="comma list of worker counts")
    p.add_argument("--world", type=int, default=1, help="processes that write the checkpoint")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    if args.dir:
        result = run(args.preset, Path(args.dir), workers, args.world)
    else:
        with tempfile.TemporaryDirectory(prefix="maescale-universal-") as tmp:
            result = run(args.preset, Path(tmp), workers, args.world)
    if args.json:
        dump(result, args.json)
    else:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
