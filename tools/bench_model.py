#!/usr/bin/env python
"""Benchmark an MAE preset's training step, or print its memory accounting.

Speed (forward + backward + optimizer step, variants in one run)::

    python tools/bench_model.py --preset mae_vit_huge_patch14 --micro-batch 64,128,256 \\
        --attn sdpa,math,flash,flash_attn --compile off,on --ckpt 0,1 --json bench/h100.json

Memory (model states per ZeRO stage, measured activation bytes, largest micro-batch)::

    python tools/bench_model.py --memory --presets mae_vit_base_patch16,mae_vit_large_patch16,mae_vit_huge_patch14

The logic lives in :mod:`maescale.devtools.bench`, :mod:`maescale.devtools.memory` and :mod:`maescale.flops`.
"""

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.devtools.bench import PRECISIONS, flops_summary, format_results, run_bench, variants_from  # noqa: E402
from maescale.models import PRESETS  # noqa: E402


def _list(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def _onoff(s: str) -> bool:
    if s.lower() in ("on", "1", "true", "yes"):
        return True
    if s.lower() in ("off", "0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {s!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mae_vit_tiny_patch4", choices=sorted(PRESETS))
    p.add_argument("--img-size", type=int, default=None, help="default: 32 for the tiny preset, else 224")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--micro-batch", type=_list(int), default=[8], help="comma list, e.g. 64,128,256")
    p.add_argument("--attn", type=_list(str), default=["sdpa", "math"], help="comma list of sdpa,math,flash,flash_attn")
    p.add_argument("--compile", type=_list(_onoff), default=[False], help="comma list of off,on")
    p.add_argument("--ckpt", type=_list(int), default=None,
                   help="act_ckpt_every values, comma list (0 = off); default 0 (speed), 0,1 (memory)")
    p.add_argument("--grid", choices=("product", "axes"), default="product",
                   help="product: every combination; axes: first of each list, then one axis changed at a time")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--interleave", action="store_true",
                   help="time all variants round robin (fair ratios on a busy machine; all in memory at once)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table by GPU name)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="write results here")
    p.add_argument("--append", action="store_true", help="add this run to the runs already in --json")
    p.add_argument("--note", default=None, help="free text stored with the run")
    m = p.add_argument_group("memory accounting (--memory)")
    m.add_argument("--memory", action="store_true", help="print the memory table instead of timing")
    m.add_argument("--presets", type=_list(str), default=["mae_vit_base_patch16", "mae_vit_large_patch16",
                                                           "mae_vit_huge_patch14"])
    m.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory (GiB)")
    m.add_argument("--reserve-gib", type=float, default=8.0,
                   help="kept back for CUDA context, NCCL, DeepSpeed buckets, fragmentation (GiB)")
    m.add_argument("--world-size", type=int, default=8, help="data-parallel ranks sharing ZeRO state")
    m.add_argument("--measure-batches", type=_list(int), default=[2, 4],
                   help="two micro-batches measured on CPU to fit bytes = fixed + per_image * B")
    m.add_argument("--no-peak", action="store_true", help="saved-for-backward bytes only (forward only, faster)")
    return p.parse_args(argv)


def _write_json(path: Path, record: dict, append: bool) -> None:
    doc = {"runs": []}
    if append and path.exists():
        doc = json.loads(path.read_text())
    doc["runs"].append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if args.memory:
        from maescale.devtools.memory import format_memory_table, memory_rows

        if len(args.measure_batches) != 2:
            raise SystemExit("--measure-batches takes two micro-batches, e.g. 2,4")
        rows = memory_rows(args.presets, args.img_size or 224, args.mask_ratio, ckpt_options=tuple(args.ckpt or [0, 1]),
                           gpu_gib=args.gpu_gib, reserve_gib=args.reserve_gib,
                           world_size=args.world_size, measure_peak=not args.no_peak,
                           batches=tuple(args.measure_batches))
        print(format_memory_table(rows))
        if args.json:
            _write_json(args.json, {"kind": "memory", "date": when, "args": vars(args), "rows": rows}, args.append)
        return 0

    img = args.img_size or (32 if args.preset == "mae_vit_tiny_patch4" else 224)
    variants = variants_from(args.attn, args.compile, args.ckpt or [0], args.grid)
    print(flops_summary(args.preset, img, args.mask_ratio))
    results, env = run_bench(args.preset, args.micro_batch, variants, img, args.mask_ratio, args.precision,
                             args.device, args.warmup, args.repeats, args.peak_tflops, args.interleave)
    print(format_results(results, env))
    if args.json:
        _write_json(args.json, {"kind": "speed", "date": when, "note": args.note, "args": vars(args), "env": env,
                                "results": [r.as_dict() for r in results]}, args.append)
    return 0 if any(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
