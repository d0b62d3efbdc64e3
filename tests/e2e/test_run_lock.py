"""One writer per run directory (maescale.rundir.RunLock), ranks that die with their launcher
(maescale.parent), and a checkpoint that validates but cannot be loaded: real training processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import zlib

import psutil
import pytest

from tests.helpers import (REPO, TINY, assert_same_weights, base_overrides, clean_env, final_weights, logged_step,
                           run_train, start_train, train_cmd, wait_for)

pytestmark = pytest.mark.slow


def _workers_of(run_dir) -> list[psutil.Process]:
    """Every process training into ``run_dir`` (torchrun's workers keep their command line)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "tools/train.py" in cmd and f"output_dir={run_dir}" in cmd and "torch.distributed.run" not in cmd:
            found.append(p)
    return found


def test_second_job_on_a_live_run_directory_is_refused(shards, tmp_path):
    out = tmp_path / "run"
    first = start_train(TINY, base_overrides(shards, out, 400), env={"MAESCALE_FAULTS": "train.after_step=sleep:0.05"},
                        log_path=tmp_path / "first.log")
    try:
        wait_for(lambda: logged_step(out) >= 2, what="the first job's step 2", proc=first, timeout=180)
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, str(REPO / "tools/train.py"), str(TINY),
                                 *base_overrides(shards, out, 400), "lock.wait_s=2"], cwd=REPO, env=clean_env(),
                                capture_output=True, text=True, timeout=120)
        refused_after = time.monotonic() - t0
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is held by job pid:{socket.gethostname()}:{first.pid}" in second.stderr
        assert "lock.takeover=true" in second.stderr and "waited 2 s" in second.stderr
        assert first.poll() is None  # the first job never noticed
        print(f"second job refused after {refused_after:.1f} s (lock.wait_s=2, interpreter start-up included)")
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 3
    assert not (out / "lock").exists()  # released on the way out


def test_stale_lock_is_taken_over_with_a_warning(shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "lock").write_text(json.dumps({"job": "slurm:99", "host": "node-that-died", "pid": 12345, "token": "t",
                                          "started": "2026-11-01T00:00:00", "maescale_version": "0.1.0"}))
    proc = run_train(TINY, base_overrides(shards, out, 2, **{"lock.stale_s": 3, "lock.heartbeat_s": 1}))
    assert "taking over the run directory" in proc.stderr and "slurm:99" in proc.stderr
    assert "heartbeat has not moved" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (out / "lock").exists()


def test_checkpoint_that_validates_but_fails_to_load_falls_back(shards, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_train(TINY, base_overrides(shards, ref, 12))
    run_train(TINY, base_overrides(shards, out, 8))
    ckpt = out / "checkpoints" / "step_00000008"
    bad = ckpt / "mp_rank_00_model_states.pt"
    bad.write_bytes(b"not a torch file" * 100)
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())  # consistent again: validation passes
    manifest["files"][bad.name] = {"size": bad.stat().st_size, "crc32": zlib.crc32(bad.read_bytes())}
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    run_train(TINY, base_overrides(shards, out, 12))
    log = (out / "logs" / "train.log").read_text()
    assert "step_00000008 passed validation but cannot be loaded" in log
    assert f"resuming from {out / 'checkpoints' / 'step_00000004'} instead of" in log and "at step 4" in log
    assert_same_weights(final_weights(ref), final_weights(out))


ZERO2_16 = {"deepspeed.zero_stage": 2, "checkpoint.every_steps": 3}  # the run the torchrun-stop tests interrupt


@pytest.fixture(scope="module")
def zero2_reference(shards, tmp_path_factory) -> dict:
    """Final weights of that run uninterrupted (2 processes), shared by the three stop tests."""
    ref = tmp_path_factory.mktemp("zero2_reference")
    run_train(TINY, base_overrides(shards, ref, 16, **ZERO2_16), nproc=2)
    return final_weights(ref)


@pytest.mark.parametrize("when,sig", [("start-up", signal.SIGTERM), ("training", signal.SIGTERM),
                                      ("training", signal.SIGKILL)])
def test_stopping_torchrun_leaves_no_rank_and_the_restart_resumes_exactly(shards, zero2_reference, tmp_path, when,
                                                                           sig):
    """As a user would: a signal to torchrun (not its workers), then the same command again at once.
    SIGTERM: torchrun forwards it; SIGKILL: the ranks are orphaned and stop by themselves
    (maescale.parent), checkpointing on the way out, while the restart waits for their lock."""
    out = tmp_path / "run"
    overrides = base_overrides(shards, out, 16, **ZERO2_16)
    first_log = open(tmp_path / "first.log", "w")  # the ranks inherit it: their stderr outlives torchrun
    launcher = subprocess.Popen([*train_cmd(2), str(TINY), *overrides], cwd=REPO, stdout=first_log,
                                stderr=subprocess.STDOUT, env=clean_env({"MAESCALE_FAULTS": "train.after_step=sleep:0.1"}),
                                start_new_session=True)
    if when == "start-up":
        wait_for(lambda: len(_workers_of(out)) == 2, what="workers started", proc=launcher, timeout=120)
        time.sleep(1.0)  # importing torch / DeepSpeed
    else:
        wait_for(lambda: logged_step(out) >= 4, what="step 4", proc=launcher, timeout=180)
    first_ranks = _workers_of(out)
    assert len(first_ranks) == 2
    launcher.send_signal(sig)  # the launcher only
    launcher.wait(timeout=120)
    t_exit = time.monotonic()
    # The same command again, at once: it must not write beside leftovers of the first job.
    restart = start_train(TINY, overrides, nproc=2, log_path=tmp_path / "restart.log")

    def first_ranks_gone() -> bool:
        return not [p for p in first_ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    wait_for(first_ranks_gone, what="no rank of the first job left", timeout=30)
    gone_after = time.monotonic() - t_exit
    assert restart.wait(timeout=300) == 0, (tmp_path / "restart.log").read_text()[-3000:]
    assert_same_weights(zero2_reference, final_weights(out))
    print(f"{when}, {signal.Signals(sig).name}: the ranks of the stopped torchrun were gone {gone_after:.1f} s "
          "after it exited")
    if sig == signal.SIGKILL:  # a rank noticed its launcher was gone and the ranks checkpointed and stopped
        assert "is gone: stopping (SIGTERM to myself)" in (tmp_path / "first.log").read_text()
        assert "stop signal received: checkpoint at step" in (out / "logs" / "train.log").read_text()
