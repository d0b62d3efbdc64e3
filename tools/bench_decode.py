#!/usr/bin/env python
"""Benchmark ``data.gpu_decode`` on a device: decode and crop/resize time per batch, kernel
launches per batch, image agreement with the CPU path, worker CPU per image, feed overlap.

    python tools/bench_decode.py --device cuda --json bench/decode_h200.json      # < 60 s on an H200
    python tools/bench_decode.py --device cpu --sets 160x120 --batch-size 8 --img-size 32 --repeats 2

Generates photo-like JPEGs (q90) at each ``--sets`` size into shards, prints Markdown tables and
writes the full results (every measurement, or its error) as JSON. The logic lives in
:mod:`maescale.devtools.decode_bench`.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.devtools.data_bench import write_json  # noqa: E402
from maescale.devtools.decode_bench import DEFAULT_SETS, format_decode_tables, run_decode_benchmark  # noqa: E402


def _sets(text: str):
    try:
        return tuple(tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH[,WxH...], got {text!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--sets", type=_sets, default=DEFAULT_SETS, help="image sizes, e.g. 500x375,2000x1500")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per phase (median reported)")
    p.add_argument("--agree-images", type=int, default=32, help="samples compared with the CPU path")
    p.add_argument("--no-feed-check", action="store_true", help="skip the feed overlap measurement")
    p.add_argument("--feed-steps", type=int, default=12)
    p.add_argument("--workdir", default=None, help="where to generate the images (default: a temp folder, removed)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda but no CUDA device is available here (use --device cpu)")
    results = run_decode_benchmark(device=args.device, sets=args.sets, batch_size=args.batch_size,
                                   img_size=args.img_size, repeats=args.repeats, agree_images=args.agree_images,
                                   feed_check=not args.no_feed_check, feed_steps=args.feed_steps,
                                   workdir=args.workdir, keep=args.workdir is not None)
    m = results["machine"]
    print(f"data.gpu_decode on {m['device']} ({m['cores']}-core {m['cpu']}, torch {m['torch']}, "
          f"torchvision {m['torchvision']}), {results['date']}, {results['seconds']} s")
    print(format_decode_tables(results))
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
