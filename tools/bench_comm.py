#!/usr/bin/env python
"""What a training step sends over the network: the real loop on W gloo ranks of this machine,
every collective of the profiled steps recorded, tabulated per rank and step by kind.

    python tools/bench_comm.py --presets mae_vit_tiny_patch4,mae_vit_base_patch16 --world 2,4 \\
        --zero 1,2 --json bench/comm.json

Volumes, kinds, call counts and issue order carry over to a GPU cluster; gloo's timings on a few
CPU cores do not, and none are reported (bench/SCALING.md models time). The logic lives in
:mod:`maescale.devtools.comm_bench`.
"""

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.devtools.comm_bench import environment, format_table, run_once  # noqa: E402
from maescale.rundir import write_json_atomic  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="mae_vit_tiny_patch4", help="comma list of model presets")
    p.add_argument("--world", default="2", help="comma list of rank counts")
    p.add_argument("--zero", default="1", help="comma list of ZeRO stages (1: maescale's step, 2: DeepSpeed's)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--bucket", default="auto", help="deepspeed.bucket_elements (comma list to sweep)")
    p.add_argument("--steps", type=int, default=2, help="profiled steps per run")
    p.add_argument("--json", default=None, help="write the results here (bench/comm.json)")
    p.add_argument("--note", default=None)
    args = p.parse_args(argv)
    runs = []
    for preset in args.presets.split(","):
        for world in (int(w) for w in args.world.split(",")):
            for zero in (int(z) for z in args.zero.split(",")):
                for bucket in args.bucket.split(","):
                    print(f"# {preset}, {world} ranks, ZeRO-{zero}, buckets {bucket} ...", file=sys.stderr, flush=True)
                    runs.append(run_once(preset, world, zero, args.micro_batch, bucket, steps=args.steps))
    print(format_table(runs))
    if args.json:
        doc = {"meta": {"script": "tools/bench_comm.py", "argv": sys.argv[1:],
                        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "device": "cpu (gloo, torchrun on one machine)", "versions": environment(),
                        "note": args.note or "volumes, kinds, calls and issue order per rank per step; gloo on CPU "
                                             "carries a reduce-scatter out as an all-reduce internally and its "
                                             "timings measure CPU contention, so no time is reported"},
               "runs": runs}
        write_json_atomic(args.json, doc, indent=1)
        print(f"# wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
