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
from concurrent.futures import ThreadPoolExecutor

import psutil

from maescale.data import build_train_loader
from tests.data.conftest import data_cfg, write_shards


def _children() -> set[psutil.Process]:
    return {p for p in psutil.Process().children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def test_workers_ignore_slurms_stop_signals_but_obey_their_owner(shard_dir):
    shards = write_shards(shard_dir, [40, 40])
    before = _children()  # a test worker's other children (pytest-xdist, earlier fixtures) are not ours
    loader = build_train_loader(data_cfg(shards, num_workers=2), img_size=8, micro_batch_size=4, rank=0,
                                world_size=1, seed=0)
    it = iter(loader)
    next(it)
    workers = sorted(_children() - before, key=lambda p: p.pid)
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


def test_a_stop_signal_while_the_workers_start_waits_for_them(shard_dir, monkeypatch):
    """slurmstepd's SIGTERM can come before a worker has set up its owner-only handling (here held
    back 2 s by a fault point at the start of worker_init): the loader forks its workers with SIGTERM
    blocked, so the signal waits and is then ignored instead of killing the worker."""
    monkeypatch.setenv("MAESCALE_FAULTS", "data.worker_start=sleep:2")
    shards = write_shards(shard_dir, [40, 40])
    before = _children()
    loader = build_train_loader(data_cfg(shards, num_workers=2), img_size=8, micro_batch_size=4, rank=0,
                                world_size=1, seed=0)
    it = iter(loader)

    def stop_them_as_they_start() -> list[psutil.Process]:
        deadline = time.monotonic() + 30
        while len(started := _children() - before) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.01)
        subprocess.run(["kill", "-TERM", *(str(w.pid) for w in started)], check=True)
        return list(started)

    with ThreadPoolExecutor(1) as pool:
        killer = pool.submit(stop_them_as_they_start)
        next(it)  # in the main thread, as in training (torch's SIGCHLD handler is set up here)
        workers = killer.result(timeout=60)
    for _ in range(10):
        next(it)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    loader.close()
