#!/usr/bin/env python
"""Reconstruction grid of a trained MAE on chosen images.

``python tools/visualize.py RUN_DIR_OR_CHECKPOINT --images DIR_OR_SHARDS --output out.png
[--num N] [--seed S] [--mask-ratio R]``: rows of original | masked | reconstruction |
reconstruction with the visible patches pasted back (see :mod:`maescale.devtools.visualize`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/visualize.py",
        description="Write original | masked | reconstruction | reconstruction+visible for N images as a PNG.")
    parser.add_argument("source", help="run directory (latest checkpoint), checkpoint directory, or a full MAE "
                                       "{'model': ...} .pth file (with decoder)")
    parser.add_argument("--images", required=True, help="folder of image files, or webdataset shards (a .tar, a "
                                                        "folder of .tar files, a brace pattern or glob)")
    parser.add_argument("--output", "-o", required=True, help="PNG file to write")
    parser.add_argument("--num", type=int, default=8, help="number of images (rows; default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks (default 0; same seed, "
                                                            "same picture)")
    parser.add_argument("--mask-ratio", type=float, help="fraction of patches hidden (default: the run's "
                                                         "model.mask_ratio)")
    parser.add_argument("--step", type=int, help="checkpoint step of a run directory (default: latest)")
    parser.add_argument("--model", help="model preset of a .pth file (default: inferred from its shapes)")
    parser.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=None,
                        help="whether the model predicts per-patch normalised pixels (default: the run's "
                             "model.norm_pix_loss; on for .pth files)")
    parser.add_argument("--device", default="cpu", help="device to run the model on (default: cpu)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from maescale.devtools.visualize import VisualizeError, visualize

    try:
        result = visualize(args.source, args.images, args.output, num=args.num, seed=args.seed,
                           mask_ratio=args.mask_ratio, step=args.step, model=args.model,
                           norm_pix_loss=args.norm_pix_loss, device=args.device)
    except (VisualizeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.output} ({result.width}x{result.height}): {len(result.images)} images x [original | "
          f"masked | reconstruction | reconstruction + visible], mask ratio {result.mask_ratio:g}, seed "
          f"{result.seed}, loss {result.loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
