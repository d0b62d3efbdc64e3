"""One training process of a SLURM job: what the supervisor's ``srun`` starts on every task.

``python -m maescale.launch.task RUN/slurm/job_<id>.yaml`` reads the job's resolved config,
takes its place in the job from SLURM's variables, trains (``maescale.train.main``; a stop
signal, SIGTERM or submitit's time-limit signal, checkpoints and returns "preempted"), and leaves
an exit record ``RUN/attempts/<attempt>/rank_<R>.exit.json`` for the supervisor: the status, the
step, the signals it got, the error of a failure. The exit code says the same
(:mod:`maescale.exitcodes`), except that a clean stop on a signal exits 0 under the supervisor (its
record says "preempted"), so that srun's ``--kill-on-bad-exit`` does not kill the ranks still on
their way out; a rank killed by a signal or by the stall watchdog leaves no record, which tells
the supervisor as much.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from maescale.exitcodes import BAD_INPUT, CRASHED, OK, PREEMPTED
from maescale.rundir import RunDir, write_json_atomic

log = logging.getLogger("maescale.launch")

ATTEMPTS = "attempts"


def attempt_dir(output_dir: str | os.PathLike, attempt_id: str) -> Path:
    """``RUN/attempts/<attempt_id>``: exit records and progress of one attempt of a job."""
    return RunDir(output_dir).path / ATTEMPTS / attempt_id


def time_limit_signal() -> int:
    """The signal submitit asks SLURM to send before the time limit (``--signal=USR2@N``)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return int(signal.Signals["SIG" + name.removeprefix("SIG")])


def _record(output_dir: str, rank: int, status: str, code: int, **extra: Any) -> None:
    attempt = os.environ.get("MAESCALE_ATTEMPT_ID")
    if not attempt:
        return
    try:
        write_json_atomic(attempt_dir(output_dir, attempt) / f"rank_{rank}.exit.json",
                          {"rank": rank, "host": socket.gethostname(), "status": status, "code": code, **extra},
                          indent=1)
    except OSError:  # the exit code still tells
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run this task's training; returns its exit code."""
    from maescale.parent import exit_with_launcher

    exit_with_launcher()  # srun gone: stop
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m maescale.launch.task RUN/slurm/job_<id>.yaml", file=sys.stderr)
        return BAD_INPUT
    from maescale.config import ConfigError, load_config

    try:
        cfg = load_config(args[0])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BAD_INPUT
    from maescale.checkpoint import CheckpointError
    from maescale.data import DataError
    from maescale.distributed import shutdown
    from maescale.launch.env import prepare_dist_env
    from maescale.rundir import RunLocked, RunLockLost
    from maescale.step import StepError
    from maescale.train import TrainingDiverged
    from maescale.train import main as train_main

    rank = prepare_dist_env().rank
    try:
        result = train_main(cfg, extra_stop_signals=(time_limit_signal(),))
    except (CheckpointError, DataError, TrainingDiverged, RunLocked, RunLockLost, StepError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        _record(cfg.output_dir, rank, "bad_input", BAD_INPUT, error=str(exc)[:2000], kind=type(exc).__name__)
        return BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - recorded for the supervisor, then the usual traceback
        traceback.print_exc()
        _record(cfg.output_dir, rank, "crashed", CRASHED, error=f"{type(exc).__name__}: {exc}"[:2000])
        return CRASHED
    finally:
        shutdown()
    status = "finished" if result.status == "finished" else "preempted"
    code = OK if status == "finished" else PREEMPTED
    _record(cfg.output_dir, rank, status, code, step=result.step, total_steps=result.total_steps,
            signals=[signal.Signals(s).name for s in result.stop_signals])
    # Under the supervisor a clean stop exits 0 (the record says "preempted"): srun's
    # --kill-on-bad-exit would otherwise kill the ranks still finishing their exit after the first.
    return OK if os.environ.get("MAESCALE_ATTEMPT_ID") else code


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (see tools/train.py)
