"""Faults inside a run: non-finite steps, failing checkpoint writes, a rank that dies."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
import torch

from tests.helpers import (REPO, TINY, base_overrides, clean_env, final_weights, logged_step, run_train, start_train,
                           tb_scalars, wait_for)

pytestmark = pytest.mark.slow


def _train(overrides, env=None, nproc=1, timeout=300):
    from tests.helpers import train_cmd

    return subprocess.run([*train_cmd(nproc), str(TINY), *overrides], cwd=REPO, env=clean_env(env),
                          capture_output=True, text=True, timeout=timeout)


def test_nan_batch_step_is_skipped_and_counted(shards, tmp_path):
    out = tmp_path / "run"
    run_train(TINY, base_overrides(shards, out, 10), env={"MAESCALE_FAULTS": "train.batch@5=nan"})
    log = (out / "logs" / "train.log").read_text()
    assert "step 5: non-finite loss/gradients, update skipped (1 in a row, 1 in total)" in log
    assert dict(tb_scalars(out)["train/nonfinite_steps"]) == {5: 1.0}
    weights = final_weights(out)
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_consecutive_nan_steps_stop_the_run_keeping_last_good_checkpoint(shards, tmp_path):
    out = tmp_path / "run"
    faults = ",".join(f"train.batch@{s}=nan" for s in range(5, 12))
    # train.rollback=false: the stop path (tests/e2e/test_rollback.py covers rolling back instead)
    proc = _train(base_overrides(shards, out, 20, **{"train.max_nonfinite_steps": 3, "train.rollback": "false"}),
                  env={"MAESCALE_FAULTS": faults})
    assert proc.returncode == 2
    assert "3 consecutive steps had non-finite loss or gradients (train.max_nonfinite_steps=3)" in proc.stderr
    assert "step_00000004" in proc.stderr  # names the last good checkpoint
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"


def test_checkpoint_write_error_keeps_latest_and_retries(shards, tmp_path):
    out = tmp_path / "run"
    run_train(TINY, base_overrides(shards, out, 12), env={"MAESCALE_FAULTS": "checkpoint.before_write@8=oserror"})
    log = (out / "logs" / "train.log").read_text()
    assert "checkpoint at step 8 failed" in log and "No space left on device" in log
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_00000004", "step_00000012"]  # 8 never appeared; the next interval worked
    assert (out / "checkpoints" / "latest").read_text() == "step_00000012"


def test_checkpoint_write_error_can_stop_the_run(shards, tmp_path):
    out = tmp_path / "run"
    proc = _train(base_overrides(shards, out, 12, **{"checkpoint.on_write_error": "stop"}),
                  env={"MAESCALE_FAULTS": "checkpoint.before_write@8=oserror"})
    assert proc.returncode != 0 and "No space left on device" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert not list((out / "checkpoints").glob("step_00000008*"))


def test_dead_rank_fails_the_job_naming_it(shards, tmp_path):
    out = tmp_path / "run"
    overrides = base_overrides(shards, out, 400, **{"deepspeed.timeout_minutes": 1})
    log_path = tmp_path / "torchrun.log"
    proc = start_train(TINY, overrides, nproc=2, env={"MAESCALE_FAULTS": "train.after_step=sleep:0.02"},
                       log_path=log_path)
    wait_for(lambda: logged_step(out) >= 3, what="step 3", proc=proc, timeout=180)
    workers = psutil.Process(proc.pid).children()
    victim = [w for w in workers if "LOCAL_RANK" in w.environ() and w.environ()["LOCAL_RANK"] == "1"][0]
    t0 = time.monotonic()
    victim.kill()
    code = proc.wait(timeout=120)
    elapsed = time.monotonic() - t0
    text = log_path.read_text()
    assert code != 0 and elapsed < 60
    assert "local_rank: 1" in text or "rank 1" in text, text[-3000:]
