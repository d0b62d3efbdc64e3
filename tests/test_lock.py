"""The run lock in the cases that used to strand or kill a job (maescale.rundir.RunLock): a lock
file without a readable record, a file system without hard links, failed reads while holding
it, a takeover race between processes, two srun steps of one allocation, and the commit fence."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import time

import pytest

from maescale import rundir
from maescale.rundir import RunDir, RunLock, RunLocked, RunLockLost

FAST = dict(stale_s=0.6, heartbeat_s=0.1, poll_s=0.05)


@pytest.mark.parametrize("content", [b"", b"\x00\x17garbage", b"[1, 2]", b'{"job": "x"}'])
def test_unreadable_lock_honours_wait_s_and_names_what_it_found(tmp_path, content):
    run = RunDir(tmp_path)
    (tmp_path / "lock").write_bytes(content)
    t0 = time.monotonic()
    with pytest.raises(RunLocked) as info:
        RunLock(run, "new", wait_s=1.0, stale_s=60, heartbeat_s=10, poll_s=0.05).acquire()
    assert 1.0 <= time.monotonic() - t0 < 4  # it gave up after wait_s instead of waiting for ever
    assert "no readable owner record" in str(info.value) and "lock.takeover=true" in str(info.value)


def test_unreadable_lock_is_taken_over_when_asked_or_when_it_does_not_change(tmp_path, caplog):
    run = RunDir(tmp_path)
    (tmp_path / "lock").write_bytes(b"")
    forced = RunLock(run, "forced", wait_s=10, stale_s=60, heartbeat_s=10, poll_s=0.05, takeover=True)
    assert forced.acquire() < 2 and forced.owner()["job"] == "forced"
    forced.release()
    (tmp_path / "lock").write_bytes(b"")  # an empty file left by a crash before its data reached the disk
    import logging

    patient = RunLock(run, "patient", wait_s=10, **FAST)
    with caplog.at_level(logging.WARNING):
        waited = patient.acquire(logging.getLogger("test"))
    assert FAST["stale_s"] <= waited < 5 and patient.owner()["job"] == "patient"
    assert "has not changed" in caplog.text
    patient.release()


def test_lock_without_hard_links(tmp_path, monkeypatch):
    """A file system that refuses hard links: the lock is made by an exclusive create instead."""
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(rundir.os, "link", no_links)
    run = RunDir(tmp_path)
    holder = RunLock(run, "a", wait_s=1, **FAST)
    assert holder.acquire() < 1 and holder.owner()["job"] == "a"
    with pytest.raises(RunLocked):
        RunLock(run, "b", wait_s=0.5, stale_s=60, heartbeat_s=10, poll_s=0.05).acquire()
    holder.release()
    assert not (tmp_path / "lock").exists()
    second = RunLock(run, "b", wait_s=1, **FAST)
    assert second.acquire() < 1
    second.release()


def test_record_is_fsynced_before_it_becomes_the_lock(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(rundir.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    linked: list[int] = []
    real_link = os.link
    monkeypatch.setattr(rundir.os, "link", lambda a, b: (linked.append(len(synced)), real_link(a, b))[1])
    lock = RunLock(RunDir(tmp_path), "a", wait_s=1, **FAST)
    lock.acquire()
    lock.release()
    assert linked and linked[0] >= 1  # an fsync happened before the link


def test_failed_reads_while_holding_are_not_a_lost_lock(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    lock = RunLock(run, "holder", wait_s=1, **FAST)
    lock.acquire()
    real = rundir._read_lock
    failures = {"n": 0}

    def flaky(path):
        if failures["n"] < 6:
            failures["n"] += 1
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(rundir, "_read_lock", flaky)
    time.sleep(1.2)  # ~6 failed reads, then good ones
    assert failures["n"] == 6 and not lock.lost
    # Another owner's record: lost only after lost_after consecutive reads show it
    record = json.loads((tmp_path / "lock").read_text()) | {"token": "someone-else", "job": "other"}
    (tmp_path / "lock").write_text(json.dumps(record))
    time.sleep(0.15)
    assert not lock.lost  # one read is not enough
    deadline = time.monotonic() + 5
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.lost
    lock.release()
    assert (tmp_path / "lock").exists()  # not ours: left alone


def test_two_srun_steps_of_one_allocation_do_not_take_each_others_lock(tmp_path):
    run = RunDir(tmp_path)
    first = RunLock(run, "slurm:55", wait_s=1, restart=0, step="0", **FAST)
    first.acquire()
    try:
        with pytest.raises(RunLocked) as info:
            RunLock(run, "slurm:55", wait_s=0.8, restart=0, step="1", stale_s=60, heartbeat_s=10,
                    poll_s=0.05).acquire()
        assert "restart 0, step 0" in str(info.value)
        # the same job after a requeue (SLURM raises the restart count) takes it back at once
        requeued = RunLock(run, "slurm:55", wait_s=5, restart=1, step="0", stale_s=60, heartbeat_s=10, poll_s=0.05)
        assert requeued.acquire() < 2 and not requeued.took_over  # its old processes are gone
        requeued.release()
    finally:
        first.release()


def _race(path: str, name: str, log: str) -> None:
    lock = RunLock(RunDir(path), name, wait_s=60, stale_s=60, heartbeat_s=0.1, poll_s=0.02, takeover=False)
    lock.acquire()
    with open(log, "a") as f:
        f.write(f"in {name} {time.monotonic()}\n")
    time.sleep(0.05)
    with open(log, "a") as f:
        f.write(f"out {name} {time.monotonic()}\n")
    lock.release()


def test_takeover_race_between_processes(tmp_path):
    """A dead owner's lock, and four processes racing to take it over: one holds at a time."""
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "lock").write_text(json.dumps({"job": "gone", "host": socket.gethostname(),
                                               "pid": int(dead.stdout), "token": "t0"}))
    log = tmp_path / "order.log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_race, args=(str(tmp_path), f"p{i}", str(log))) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["in", "out"] * 4  # never two holders at once
    assert sorted(e[1] for e in events if e[0] == "in") == ["p0", "p1", "p2", "p3"]


def test_commit_is_fenced_by_the_lock(tmp_path):
    """A job that lost the run directory publishes no checkpoint and does not move ``latest``."""
    from maescale.checkpoint import CheckpointManager
    from maescale.config import load_config
    from maescale.distributed import init_distributed, shutdown
    from maescale.models import build_model
    from maescale.optim import build_engine

    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}"])
    ctx = init_distributed("cpu")
    engine = build_engine(cfg, build_model(cfg.model, device=ctx.device), 1, ctx.device).engine
    try:
        run = RunDir(tmp_path)
        lock = RunLock(run, "me", wait_s=1, stale_s=60, heartbeat_s=10, poll_s=0.05)
        lock.acquire()
        ckpt = CheckpointManager(tmp_path, 0, 1, keep_last=3, control_group=ctx.control_group, fence=lock)
        import torch

        gen = torch.Generator().manual_seed(0)
        ckpt.save_training(engine, 1, cfg, 10, 0, {}, gen)
        assert run.latest_step() == 1
        thief = RunLock(run, "thief", wait_s=1, stale_s=60, heartbeat_s=10, poll_s=0.05, takeover=True)
        thief.acquire()
        with pytest.raises(RunLockLost, match="thief"):
            ckpt.save_training(engine, 2, cfg, 10, 0, {}, gen)
        assert run.latest_step() == 1 and not run.checkpoint(2).exists()
        thief.release()
        lock.release()
    finally:
        engine.destroy()
        shutdown()


def test_a_partial_that_may_still_be_written_is_left_alone(tmp_path):
    from maescale.checkpoint import CheckpointManager

    partial = tmp_path / "checkpoints" / "step_00000008.partial"
    partial.mkdir(parents=True)
    (partial / "rank_00000.json").write_text("{}")
    ckpt = CheckpointManager(tmp_path, 0, 1, keep_last=3)
    assert ckpt.clean_partials(quiet_s=60) == 0 and partial.exists()  # written just now: maybe alive
    old = time.time() - 120
    os.utime(partial / "rank_00000.json", (old, old))
    assert ckpt.clean_partials(quiet_s=60) > 0 and not partial.exists()
