"""Command-line entry points (``tools/*.py`` and the console scripts call these)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from maescale.config import ConfigError, load_config
from maescale.exitcodes import BAD_INPUT, OK, PREEMPTED


def train_cli(argv: Sequence[str] | None = None) -> int:
    """``python tools/train.py CONFIG [key=value ...] [--no-resume]``."""
    parser = argparse.ArgumentParser(
        prog="tools/train.py",
        description="Train an MAE here: one process, or one of several under torchrun / srun.")
    parser.add_argument("config", help="YAML config file (e.g. configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=100")
    parser.add_argument("--no-resume", action="store_true",
                        help="refuse to start on a run directory that already has checkpoints (resume=false)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (["resume=false"] if args.no_resume else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT

    from maescale.parent import exit_with_launcher

    exit_with_launcher()  # before the heavy imports: a rank orphaned during start-up ends there

    from maescale.checkpoint import CheckpointError
    from maescale.data import DataError
    from maescale.distributed import shutdown
    from maescale.rundir import RunLocked, RunLockLost
    from maescale.step import StepError
    from maescale.train import TrainingDiverged, main

    try:
        result = main(cfg)
    except (CheckpointError, DataError, TrainingDiverged, RunLocked, RunLockLost, StepError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    finally:
        shutdown()
    code = PREEMPTED if result.status == "preempted" else OK
    if result.rank != 0:
        return code
    if result.status == "finished":
        print(f"finished {result.step} steps; run directory: {result.output_dir}\n"
              f"  checkpoint:      {result.last_checkpoint}\n"
              f"  TensorBoard:     tensorboard --logdir {result.output_dir / 'tensorboard'}\n"
              f"  reconstruction:  {result.output_dir / 'reconstruction.png'}")
    else:
        print(f"stopped at step {result.step} by a signal; checkpoint {result.last_checkpoint}; "
              "run the same command again to resume")
    return code


def submit_cli(argv: Sequence[str] | None = None) -> int:
    """``python tools/submit.py ...`` (see :mod:`maescale.launch.submit`)."""
    from maescale.launch.submit import submit_main

    return submit_main(argv)
