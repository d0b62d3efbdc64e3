#!/usr/bin/env python
"""Preemption soak: kill a 2-process ZeRO-2 training K times at random, resume each time, and
check the final weights equal an uninterrupted run's bit for bit (see maescale/devtools/soak.py).

    python tools/soak.py --workdir /tmp/soak --steps 40 --kills 8 [--json soak.json]
"""

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.data.demo import make_demo_data  # noqa: E402
from maescale.devtools.soak import report_json, run_soak  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new temp folder)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--kills", type=int, default=8)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    if args.steps < 8 or args.kills < 0 or args.nproc < 1:
        p.error("need --steps >= 8, --kills >= 0, --nproc >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="maescale-soak-"))
    data = make_demo_data(workdir / "data", num_images=128, size=40, seed=args.seed, maxcount=32)
    shards = str(workdir / "data" / "shards" / "shard-*.tar")
    report = run_soak(workdir, shards, num_samples=data.total, steps=args.steps, kills=args.kills,
                      nproc=args.nproc, seed=args.seed)
    print(report.table())
    if args.json:
        Path(args.json).write_text(report_json(report))
    return 0 if report.identical and report.leftover_bytes == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
