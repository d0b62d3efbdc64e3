#!/usr/bin/env python
"""Export an MAE's encoder as a timm ``VisionTransformer`` checkpoint (also for ViTDet).

``python tools/export_encoder.py RUN_DIR_OR_CHECKPOINT --output encoder.pth [options]``; see
:mod:`maescale.export` for what is written and how it is verified. Exit status 2 with
``error: ...`` on bad input; nothing is left behind then.
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
        prog="tools/export_encoder.py",
        description="Export the encoder of an MAE run/checkpoint/.pth as {'model': state_dict} with timm "
                    "VisionTransformer names (plus FILE.json metadata), verified against timm.")
    parser.add_argument("source", help="run directory (uses its latest checkpoint), checkpoint directory "
                                       "(checkpoints/step_XXXXXXXX), or an MAE {'model': ...} .pth/.safetensors file")
    parser.add_argument("--output", "-o", required=True, help="file to write (.pth, or .safetensors)")
    parser.add_argument("--step", type=int, help="checkpoint step of a run directory (default: latest)")
    parser.add_argument("--format", choices=("torch", "safetensors"), dest="fmt",
                        help="file format (default: by the output's extension)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="tensor dtype in the file (default: float32)")
    parser.add_argument("--img-size", type=int, help="resample pos_embed bicubically to this image size's grid "
                                                     "(e.g. 1024 for ViTDet); the cls position is kept")
    parser.add_argument("--patch-size", type=int, help="resample the patch embedding to this patch size "
                                                       "(e.g. 16 for a /14 model on a /16 detector)")
    parser.add_argument("--model", help="model preset of a .pth file (default: inferred from its shapes)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="load the written file into timm and compare its features with maescale's encoder "
                             "(tolerances: see maescale/export/verify.py; recorded in FILE.json) (default: on)")
    parser.add_argument("--min-cosine", type=float,
                        help="threshold of the resampling check's cosine similarities (default: "
                             "maescale.export.MIN_COSINE, 0.95)")
    parser.add_argument("--device", default="cpu", help="device for verification, e.g. cuda (default: cpu)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from maescale.export import ExportError, export_encoder

    try:
        result = export_encoder(args.source, args.output, step=args.step, fmt=args.fmt, dtype=args.dtype,
                                img_size=args.img_size, patch_size=args.patch_size, verify=args.verify,
                                force=args.force, model=args.model, device=args.device,
                                **({} if args.min_cosine is None else {"min_cosine": args.min_cosine}))
    except (ExportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta, check = result.metadata, result.verification
    kwargs = ", ".join(f"{k}={v!r}" for k, v in meta["timm"]["kwargs"].items())
    print(f"wrote {result.output} ({meta['model']}, {meta['img_size']}px, patch {meta['patch_size']}, "
          f"{meta['dtype']}) and {result.sidecar}")
    for note in result.notes:
        print(f"  note: {note}")
    if check is not None:
        line = f"  verified: timm features within {check['features_max_rel_err']:.2g} (tolerance {check['tolerance']:g})"
        if "dtype_drift_max_rel_err" in check:
            line += f"; vs float32 {check['dtype_drift_max_rel_err']:.2g} (tolerance {check['dtype_tolerance']:g})"
        if "resample_check" in check:
            rc = check["resample_check"]
            line += (f"; resampled: patch-token cosine {rc['patch_token_cosine_mean']:.4f}, cls cosine "
                     f"{rc['cls_cosine_min']:.4f} (>= {rc['threshold']})")
        print(line)
    else:
        print("  not verified (--no-verify)")
    print(f"  load: timm.create_model({meta['timm']['model_name']!r}, num_classes=0, "
          f"checkpoint_path={str(result.output)!r}{', ' + kwargs if kwargs else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
