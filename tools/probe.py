#!/usr/bin/env python
"""kNN and linear-probe accuracy of an MAE encoder on labelled WebDataset shards.

    python tools/probe.py SOURCE --train-shards PATTERN [--val-shards PATTERN] [options]
    torchrun --nproc_per_node 8 tools/probe.py SOURCE ...      (each process extracts its share)
    python tools/probe.py --history RUN_DIR                    (the in-loop kNN curve of a run)

SOURCE: a run directory (its latest checkpoint, or --step N), a checkpoint directory of any
ZeRO stage, an exported encoder .pth/.safetensors, or a public MAE .pth. Shards need .cls labels
(tools/make_shards.py writes them for a folder of class sub-folders). Without --val-shards,
--val-fraction of the train shards' samples (chosen by --split-seed) are held out. Prints a table
and writes a JSON report (atomically; default RUN/eval/probe_step_N.json or NAME.probe.json).
Exit status 2 with "error: ..." on bad input. The logic lives in :mod:`maescale.probe`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/probe.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="run directory, checkpoint directory, or encoder/MAE .pth/.safetensors")
    p.add_argument("--history", metavar="RUN_DIR", help="print the in-loop kNN history of a run and exit")
    p.add_argument("--train-shards", nargs="+", metavar="PATTERN", help="labelled shards: kNN bank / probe training")
    p.add_argument("--val-shards", nargs="+", metavar="PATTERN", help="labelled shards to classify")
    p.add_argument("--val-fraction", type=float, default=0.1, help="without --val-shards: fraction held out (0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="without --val-shards: seed of the hold-out (0)")
    p.add_argument("--max-train-samples", type=int, help="use the first N train samples (shard order)")
    p.add_argument("--max-val-samples", type=int, help="use the first N val samples (shard order)")
    p.add_argument("--methods", nargs="+", choices=("knn", "linear"), default=["knn", "linear"])
    p.add_argument("--k", type=int, default=20, help="kNN neighbours (DINO: 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (DINO: 0.07)")
    p.add_argument("--optimizer", choices=("lars", "sgd"), default="lars", help="linear probe optimizer (lars)")
    p.add_argument("--epochs", type=int, default=90, help="linear probe epochs (90)")
    p.add_argument("--batch-size", type=int, default=16384, help="linear probe batch (16384; capped at the set size)")
    p.add_argument("--blr", type=float, default=0.1, help="linear probe base lr, lr = blr * batch / 256 (0.1)")
    p.add_argument("--lr", type=float, help="linear probe absolute lr (overrides --blr)")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear probe warmup epochs (10)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="linear probe weight decay (0)")
    p.add_argument("--seed", type=int, default=0, help="linear probe seed (0)")
    p.add_argument("--per-class", action="store_true", help="also report per-class top-1 in the JSON")
    p.add_argument("--step", type=int, help="checkpoint step of a run directory (default: latest)")
    p.add_argument("--model", help="model preset of a .pth file (default: inferred from its shapes)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--eval-batch-size", type=int, default=128, help="images per forward pass per process (128)")
    p.add_argument("--workers", type=int, default=4, help="image decoding threads per process (4)")
    p.add_argument("--output", "-o", help="JSON report path")
    args = p.parse_args(argv)

    from maescale.data import DataError
    from maescale.export import ExportError
    from maescale.probe.data import make_splits
    from maescale.probe.evaluator import comparison_line, read_history
    from maescale.probe.linear import LinearProbeConfig
    from maescale.probe.run import (ProbeOptions, default_output, format_history, format_table, join_processes,
                                    probe_encoder, write_report)

    if args.history:
        try:
            history = read_history(args.history)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if history is None:
            print(f"error: {args.history} has no in-loop kNN history (eval/knn.json): was eval.every_steps > 0?",
                  file=sys.stderr)
            return 2
        print(format_history(history))
        line = comparison_line(history)
        if line:
            print(line)
        return 0
    if not args.source or not args.train_shards:
        p.error("SOURCE and --train-shards are required (or --history RUN_DIR)")

    procs = join_processes(args.device)
    logging.basicConfig(level=logging.INFO if procs.rank == 0 else logging.WARNING, format="%(message)s")
    linear = LinearProbeConfig(optimizer=args.optimizer, epochs=args.epochs, batch_size=args.batch_size, blr=args.blr,
                               lr=args.lr, warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay,
                               seed=args.seed)
    options = ProbeOptions(methods=tuple(args.methods), k=args.k, temperature=args.temperature, linear=linear,
                           batch_size=args.eval_batch_size, workers=args.workers, per_class=args.per_class)
    try:
        train, val = make_splits(args.train_shards, args.val_shards, train_key="--train-shards",
                                 val_key="--val-shards", val_fraction=args.val_fraction, split_seed=args.split_seed,
                                 max_train_samples=args.max_train_samples, max_val_samples=args.max_val_samples)
        report = probe_encoder(args.source, train, val, options, step=args.step, model=args.model, procs=procs)
    except (ExportError, DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        from maescale.distributed import shutdown

        shutdown()
    if procs.rank != 0:
        return 0
    output = Path(args.output) if args.output else default_output(report, args.source)
    write_report(report, output)
    print(format_table(report))
    print(f"report: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
