"""DataLoader workers survive the signals SLURM sends to every process of a job step.

slurmstepd signals every process of a step, DataLoader workers included: SIGUSR1/SIGUSR2 before
the time limit, SIGTERM on scancel, ``scontrol requeue`` and preemption. A worker that died of it
made the training process raise ``DataLoader worker ... is killed by signal: Terminated`` in the
middle of a step, without a checkpoint (seen on a real slurmctld, tests/slurm/). The workers must
outlive those signals, and still stop on a SIGTERM from the process that owns them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil

from maescale.data import build_train_loader
from tests.data.conftest import data_cfg, write_shards


def _workers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_workers_ignore_slurms_stop_signals_but_obey_their_owner(shard_dir):
    shards = write_shards(shard_dir, [40, 40])
    loader = build_train_loader(data_cfg(shards, num_workers=2), img_size=8, micro_batch_size=4, rank=0,
                                world_size=1, seed=0)
    it = iter(loader)
    next(it)
    workers = _workers()
    assert len(workers) == 2
    # Sent by another process, as slurmstepd does (`kill` is a child of ours, not the loader's owner).
    for sig in ("USR1", "USR2", "TERM"):
        subprocess.run(["kill", f"-{sig}", *(str(w.pid) for w in workers)], check=True)
    time.sleep(1.0)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    for _ in range(30):  # the workers still feed the loop (the SIGCHLD handler raised nothing)
        next(it)

    # SIGTERM from the owner (the DataLoader's fallback, multiprocessing's clean-up at exit) ends a worker.
    os.kill(workers[0].pid, signal.SIGTERM)
    assert workers[0].wait(timeout=30) in (0, None)  # psutil: exit status of a child, or None once reaped
    loader.close()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive
