"""``python tools/plan.py CONFIG [key=value ...] [--nodes N ...]``: print the plan of a run, submit
nothing; ``python tools/plan.py --scaling-doc`` writes ``bench/SCALING.md``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from maescale.config import ConfigError
from maescale.exitcodes import BAD_INPUT, OK


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/plan.py",
        description="The plan of a training run before it is submitted: steps, epochs and images; time and GPU-hours "
                    "at the measured per-GPU rate plus the communication of the node count; GPU memory per rank; "
                    "shards, their split over the loader's readers, a decoded sample and the worker cores needed. "
                    "Runs on a login node without a GPU; submits and writes nothing.",
        epilog="example: python tools/plan.py configs/vit_huge.yaml --nodes 4 train.micro_batch_size=128")
    p.add_argument("config", nargs="?", help="YAML config file (e.g. configs/vit_huge.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as train.micro_batch_size=128")
    g = p.add_argument_group("resources (override slurm.* of the config, as tools/submit.py does)")
    g.add_argument("--nodes", type=int, help="number of nodes")
    g.add_argument("--gpus-per-node", type=int, help="GPUs (processes) per node")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per process")
    g.add_argument("--time", help="SLURM time limit per job: minutes or [D-]HH:MM:SS")
    e = p.add_argument_group("estimates")
    e.add_argument("--rate", type=_positive, metavar="IMG_S",
                   help="images/s per GPU to plan with, instead of the committed measurement")
    e.add_argument("--gpu-mem", metavar="NAME|GiB",
                   help="GPU memory: h100 (default), h200, a100-80gb, a100-40gb, l40s, or a number of GiB")
    e.add_argument("--reserve-gib", type=float, default=None,
                   help="GPU memory held back for CUDA context, NCCL, buckets, fragmentation (default 8)")
    e.add_argument("--decode-samples", type=int, default=32,
                   help="images to decode from the shards with the training transform (0: none)")
    e.add_argument("--bench", help="benchmark directory with the measured rates and comm.json (default: bench/)")
    e.add_argument("--comm", help="measured collectives (default: BENCH/comm.json)")
    p.add_argument("--scaling-doc", nargs="?", const="bench/SCALING.md", metavar="PATH",
                   help="write the scaling document (default bench/SCALING.md) from the measurements and exit")
    return p


def plan_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/plan.py``."""
    args = build_parser().parse_intermixed_args(argv)
    if args.scaling_doc:
        from maescale.planning.scaling_doc import write_scaling_doc

        path = write_scaling_doc(args.scaling_doc, bench_dir=args.bench, comm_path=args.comm)
        print(f"wrote {path}")
        return OK
    if not args.config:
        print("error: give a config file (or --scaling-doc)", file=sys.stderr)
        return BAD_INPUT
    if args.decode_samples < 0:
        print("error: --decode-samples must be >= 0", file=sys.stderr)
        return BAD_INPUT
    from maescale.launch.submit import LaunchError, resolve_config
    from maescale.planning.memory import RESERVE_GIB, gpu_memory
    from maescale.planning.plan import format_plan, make_plan

    try:
        cfg = resolve_config(args)
        gpu_memory(args.gpu_mem)  # a bad --gpu-mem fails before any work
    except (ConfigError, LaunchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    label = " ".join([args.config, *args.overrides])
    plan = make_plan(cfg, label, rate=args.rate, gpu=args.gpu_mem, bench_dir=args.bench,
                     comm_path=Path(args.comm) if args.comm else None, decode_samples=args.decode_samples,
                     reserve_gib=RESERVE_GIB if args.reserve_gib is None else args.reserve_gib)
    print(format_plan(plan))
    return OK
