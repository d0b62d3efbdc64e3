#!/usr/bin/env python
"""FP8 against bf16: loss curves of the real training loop, same seed and data order.

    python tools/convergence.py configs/vit_large.yaml --steps 300 --micro-batch 64 \\
        --make-shards /tmp/conv --num-images 4096 --out OUT model.compile=graphs

runs ``maescale.train.main`` for bf16 (twice: the run-to-run noise floor) and each FP8 recipe
(``--recipes``) on the same generated JPEG shards, and writes ``OUT/convergence.json`` (every
step's loss, the largest gaps to bf16) and ``OUT/convergence.png`` (the curves). The logic lives
in :mod:`maescale.devtools.convergence`.
"""

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.devtools.convergence import draw_curves, format_convergence, run_convergence  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--recipes", default="tensorwise,rowwise", help="comma list of FP8 recipes")
    p.add_argument("--fp8-overrides", default="", help="extra overrides of the FP8 runs only (space separated), "
                   "e.g. 'model.fp8_emulate=true model.fp8_min_features=16' on a CPU")
    p.add_argument("--shards", default=None, help="JPEG shards (glob or brace pattern)")
    p.add_argument("--make-shards", default=None, metavar="DIR", help="generate --num-images 500x375 JPEGs as shards")
    p.add_argument("--num-images", type=int, default=4096)
    p.add_argument("--image-size", default="500x375", help="WxH of generated images")
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the config's)")
    p.add_argument("--smooth", type=int, default=20, help="moving-average window of the smoothed gap (steps)")
    p.add_argument("--no-repeat", action="store_true", help="run the bf16 baseline once (no noise floor)")
    p.add_argument("--out", type=Path, required=True, help="folder for convergence.json and convergence.png")
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shards = args.shards
    if args.make_shards:
        from maescale.devtools.loop_bench import make_jpeg_shards

        w, h = (int(x) for x in args.image_size.lower().split("x"))
        shards = make_jpeg_shards(args.make_shards, args.num_images, w, h)
    if not shards:
        p.error("give --shards or --make-shards")
    overrides = list(args.overrides) + ([f"data.num_workers={args.workers}"] if args.workers is not None else [])
    doc = run_convergence(args.config, args.steps, args.micro_batch, shards,
                          [r for r in args.recipes.split(",") if r], overrides, args.fp8_overrides.split(),
                          baseline_twice=not args.no_repeat, smooth=args.smooth)
    from maescale.devtools.bench import environment
    from maescale.distributed import shutdown
    from maescale.rundir import write_json_atomic
    import torch

    shutdown()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    doc |= {"kind": "convergence", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "args": {k: str(v) for k, v in vars(args).items()}, "env": environment(dev)}
    write_json_atomic(args.out / "convergence.json", doc, indent=1)
    if any(c["status"] == "ok" for c in doc["curves"]):
        draw_curves(doc, args.out / "convergence.png")
    print(format_convergence(doc))
    return 0 if all(c["status"] == "ok" for c in doc["curves"]) else 1


if __name__ == "__main__":
    sys.exit(main())
