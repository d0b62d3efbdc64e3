"""End to end: ``tools/submit.py --local`` runs the real job through submitit's LocalExecutor.

A preemption (SIGTERM to the job, which submitit's local controller forwards to every task, as
slurmstepd does) makes the training checkpoint at a step boundary; rank 0 requeues through
submitit's handler; the controller restarts the tasks, which resume and finish with exactly the
parameters of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_same_weights, final_weights, logged_step, run_train, wait_for, write_shards

pytestmark = pytest.mark.slow

TINY = REPO / "configs" / "tiny.yaml"
STEPS = 14


def job_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without torchrun's or SLURM's variables (the job must derive its own)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "SUBMITIT_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def overrides(shards: str, out: Path) -> list[str]:
    values = {"output_dir": str(out), "data.train_shards": shards, "data.num_samples": 96, "train.max_steps": STEPS,
              "train.log_every": 1, "checkpoint.every_steps": 4, "slurm.max_requeues": 3}
    return [f"{k}={v}" for k, v in values.items()]


def test_local_job_preempted_requeues_and_resumes_exactly(tmp_path):
    shards = write_shards(tmp_path / "shards", num_images=96, per_shard=24, size=40)
    ref = tmp_path / "ref"
    run_train(TINY, overrides(shards, ref), nproc=2)

    out = tmp_path / "local"
    log_path = tmp_path / "submit.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "submit.py"), "--local", "--gpus-per-node", "2",
                                 str(TINY), *overrides(shards, out)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=job_env({"MAESCALE_FAULTS": "train.after_step=sleep:0.1"}),
                                start_new_session=True)
    try:
        wait_for(lambda: logged_step(out) >= 5, what="step 5", proc=proc, timeout=120)
        # The job id the CLI printed is the local controller's pid: SIGTERM there reaches every task.
        job_id = int(re.search(r"started local job (\d+)", log_path.read_text()).group(1))
        os.kill(job_id, signal.SIGTERM)
        assert proc.wait(timeout=150) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    printed = log_path.read_text()
    assert f"finished {STEPS} steps" in printed

    requeues = json.loads((out / "slurm" / "requeues.json").read_text())
    assert requeues["job_id"] == str(job_id) and requeues["requeues"] == 1
    stopped_at = requeues["history"][0]["step"]
    assert 5 <= stopped_at < STEPS
    log = (out / "logs" / "train.log").read_text()
    assert f"stop signal received: checkpoint at step {stopped_at} written" in log
    assert f"requeueing job {job_id} (requeue 1/3); it will resume from step {stopped_at}" in log
    assert f"resuming from step {stopped_at}, requeue 1/3 (job {job_id}" in log
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in log
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    # submitit recorded rank 1's return of the first run and both results of the last one
    assert sorted(p.name for p in (out / "slurm").glob("*_result.pkl")) == [f"{job_id}_0_result.pkl",
                                                                           f"{job_id}_1_result.pkl"]
    assert_same_weights(final_weights(ref), final_weights(out))
