#!/usr/bin/env python
"""Benchmark the input pipeline against torchvision's ImageFolder, on the same generated JPEGs.

    python tools/bench_data.py [--num-images 1024] [--num-large 256] [--workers 1] [--json out.json]

Prints a table of images/s per worker process for ImageFolder + RandomResizedCrop + flip +
ToTensor, the maescale pipeline (fast decode on and off) and reading the tar bytes only, for
~500x375 and ~2000x1500 JPEGs (quality 90). The logic lives in :mod:`maescale.devtools.data_bench`.

    python tools/bench_data.py --gpu-decode [--num-images 512] [--json out.json]

measures instead the sizing guide: the worker's CPU milliseconds per image, images/s per core and
worker cores per GPU (at --target img/s per GPU) with ``data.gpu_decode: true`` (header, crop box,
JPEG bytes) and with the CPU decode; with --json the results are added under the key "gpu_decode"
of the file (its other keys are kept). The device side: ``tools/bench_decode.py``.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.devtools.data_bench import (format_gpu_decode_table, format_table, run_benchmark,  # noqa: E402
                                  run_gpu_decode_benchmark, write_json)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=1024, help="images in the 500x375 set")
    p.add_argument("--num-large", type=int, default=None, help="images in the 2000x1500 set (default N/4)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes per loader")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3, help="runs per loader; the best is kept")
    p.add_argument("--workdir", default=None, help="where to generate the images (default: a temp folder, removed)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--gpu-decode", action="store_true",
                   help="measure the worker's CPU cost per image with data.gpu_decode vs a full decode")
    p.add_argument("--target", type=float, default=None,
                   help="images/s per GPU to size workers for (--gpu-decode; default: ViT-H on an H200, 1700)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.gpu_decode:
        return _gpu_decode(args)
    results = run_benchmark(num_images=args.num_images, num_large=args.num_large, workers=args.workers,
                            batch_size=args.batch_size, img_size=args.img_size, repeats=args.repeats,
                            workdir=args.workdir, keep=args.workdir is not None)
    print(f"images/s per worker process ({args.workers} worker(s), batch {args.batch_size}, "
          f"{results['machine']['cores']}-core {results['machine']['cpu']}, {results['date']})")
    print(format_table(results))
    for name, t in results["targets"].items():
        print(f"target {name}: {t['measured']:.2f}x (target {t['target']}x) {'met' if t['met'] else 'NOT met'}")
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 0


def _gpu_decode(args) -> int:
    import json
    import os

    extra = {} if args.target is None else {"target": args.target}
    results = run_gpu_decode_benchmark(num_images=args.num_images, num_large=args.num_large,
                                       batch_size=args.batch_size, img_size=args.img_size, repeats=args.repeats,
                                       workdir=args.workdir, keep=args.workdir is not None, **extra)
    print(f"Worker CPU per image, data.gpu_decode vs CPU decode (batch {args.batch_size}, "
          f"{results['machine']['cores']}-core {results['machine']['cpu']}, {results['date']}; "
          f"{results['note']})")
    print(format_gpu_decode_table(results))
    if args.json:
        merged = {}
        if os.path.exists(args.json):
            with open(args.json) as fh:
                merged = json.load(fh)
        merged["gpu_decode"] = results
        write_json(merged, args.json)
        print(f"wrote {args.json} (key gpu_decode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
