#!/usr/bin/env python
"""Benchmark an MAE preset's training step, or print its memory accounting.

Speed (forward + backward + optimizer step, variants in one run)::

    python tools/bench_model.py --preset mae_vit_huge_patch14 --micro-batch 64,128,256 \\
        --attn sdpa,math,flash,cudnn,flash_attn --compile off,blocks,full,graphs --ckpt 0,1 --json bench/h100.json

Memory (model states per ZeRO stage, measured activation bytes, largest micro-batch)::

    python tools/bench_model.py --memory --presets mae_vit_base_patch16,mae_vit_large_patch16,mae_vit_huge_patch14

Host overhead (aten ops and host ms per optimizer step: bare step vs the DeepSpeed engine's step as
the loop runs it, default and lean; meaningful on a CPU)::

    python tools/bench_model.py --host-overhead --presets mae_vit_tiny_patch4,mae_vit_base_patch16 --micro-batch 8

The logic lives in :mod:`maescale.devtools.bench`, :mod:`maescale.devtools.memory` and :mod:`maescale.flops`.
"""

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maescale.devtools.bench import (COMPILE_OPTIONS, PRECISIONS, flops_summary, format_results,  # noqa: E402
                                    run_bench, variants_from)
from maescale.models import PRESETS  # noqa: E402
from maescale.rundir import write_text_atomic  # noqa: E402


def _list(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


def _compile_mode(s: str) -> str:
    mode = {"on": "blocks", "1": "blocks", "true": "blocks", "0": "off", "false": "off"}.get(s.lower(), s.lower())
    if mode not in COMPILE_OPTIONS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(COMPILE_OPTIONS)} (on = blocks), got {s!r}")
    return mode


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mae_vit_tiny_patch4", choices=sorted(PRESETS))
    p.add_argument("--img-size", type=int, default=None, help="default: 32 for the tiny preset, else 224")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--micro-batch", type=_list(int), default=[8], help="comma list, e.g. 64,128,256")
    p.add_argument("--attn", type=_list(str), default=["sdpa", "math"],
                   help="comma list of sdpa,math,flash,cudnn,flash_attn")
    p.add_argument("--compile", type=_list(_compile_mode), default=["off"],
                   help="comma list of off,blocks (= on),full,graphs (blocks + CUDA graphs),full_regions")
    p.add_argument("--ckpt", type=_list(int), default=None,
                   help="act_ckpt_every values, comma list (0 = off); default 0 (speed), 0,1 (memory)")
    p.add_argument("--fp8", type=_list(str), default=["off"],
                   help="comma list of off,tensorwise,rowwise: the encoder's linears in float8 (model.fp8)")
    p.add_argument("--fp8-emulate", action="store_true", help="emulated float8 (model.fp8_emulate; CPU tests)")
    p.add_argument("--fp8-min-features", type=int, default=None, help="model.fp8_min_features (default: the rule's)")
    p.add_argument("--grid", choices=("product", "axes"), default="product",
                   help="product: every combination; axes: first of each list, then one axis changed at a time")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="default: bf16 on CUDA, fp32 on CPU; peer: the hand-tuned user loop (autocast, timm attention)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="timed windows")
    p.add_argument("--window", type=int, default=1,
                   help="back-to-back steps per timed window (one device sync per window), as a training loop runs")
    p.add_argument("--profile", action="store_true",
                   help="one more window under torch.profiler: kernel launches, aten ops, GPU idle share per step")
    p.add_argument("--host-overhead", action="store_true",
                   help="aten ops and host ms per step: bare step vs DeepSpeed engine step (default, lean) for --presets")
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
    write_text_atomic(path, json.dumps(doc, indent=1, default=str) + "\n")


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

    if args.host_overhead:
        from maescale.devtools.bench import format_host_overhead, host_overhead

        rows = []
        for preset in args.presets:
            for mb in args.micro_batch:
                rows += host_overhead(preset, mb, args.img_size, args.precision or "bf16", args.warmup, args.repeats,
                                      args.device)
        print(format_host_overhead(rows))
        if args.json:
            from maescale.devtools.bench import environment
            import torch

            dev = torch.device(rows[0]["device"])
            _write_json(args.json, {"kind": "host_overhead", "date": when, "args": vars(args),
                                    "env": environment(dev), "rows": rows}, args.append)
        return 0

    img = args.img_size or (32 if args.preset == "mae_vit_tiny_patch4" else 224)
    variants = variants_from(args.attn, args.compile, args.ckpt or [0], args.grid, args.fp8)
    print(flops_summary(args.preset, img, args.mask_ratio))
    results, env = run_bench(args.preset, args.micro_batch, variants, img, args.mask_ratio, args.precision,
                             args.device, args.warmup, args.repeats, args.peak_tflops, args.interleave, args.window,
                             args.profile, args.fp8_emulate, args.fp8_min_features)
    print(format_results(results, env))
    if args.json:
        _write_json(args.json, {"kind": "speed", "date": when, "note": args.note, "args": vars(args), "env": env,
                                "results": [r.as_dict() for r in results]}, args.append)
    return 0 if any(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
