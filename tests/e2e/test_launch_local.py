"""End to end: ``tools/submit.py --local`` runs the real job (2 processes) through submitit's LocalExecutor.

The job is interrupted twice: first preempted (SIGTERM to the job, which submitit's local
controller forwards to every task, as slurmstepd does), then, once it has resumed, given the
time-limit signal (SIGUSR2 to every task, what ``--signal=USR2@N`` sends). Each time the
training checkpoints at a step boundary, rank 0 requeues through submitit's own handler, the
controller restarts the tasks, and they resume; the run finishes with exactly the parameters of
an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO, assert_same_weights, final_weights, logged_step, run_train, wait_for, write_shards

pytestmark = pytest.mark.slow

TINY = REPO / "configs" / "tiny.yaml"
STEPS = 12


def job_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without torchrun's or SLURM's variables (the job must derive its own)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "SUBMITIT_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def overrides(shards: str, out: Path) -> list[str]:
    values = {"output_dir": str(out), "data.train_shards": shards, "data.num_samples": 96, "train.max_steps": STEPS,
              "train.log_every": 1, "checkpoint.every_steps": 4, "slurm.max_requeues": 3}
    return [f"{k}={v}" for k, v in values.items()]


def requeue_history(out: Path) -> list[dict]:
    path = out / "slurm" / "requeues.json"
    return json.loads(path.read_text())["history"] if path.exists() else []


def test_local_job_preempted_and_timed_out_resumes_exactly(tmp_path):
    shards = write_shards(tmp_path / "shards", num_images=96, per_shard=24, size=40)
    ref = tmp_path / "ref"
    run_train(TINY, overrides(shards, ref), nproc=2)

    out = tmp_path / "local"
    log_path = tmp_path / "submit.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "submit.py"), "--local", "--gpus-per-node", "2",
                                 str(TINY), *overrides(shards, out)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=job_env({"MAESCALE_FAULTS": "train.after_step=sleep:0.05"}),
                                start_new_session=True)
    try:
        wait_for(lambda: logged_step(out) >= 3, what="step 3", proc=proc, timeout=120)
        # The job id the CLI printed is the local controller's pid.
        job_id = int(re.search(r"started local job (\d+)", log_path.read_text()).group(1))
        first_tasks = psutil.Process(job_id).children()
        assert len(first_tasks) == 2
        os.kill(job_id, signal.SIGTERM)  # preemption: the controller forwards SIGTERM to every task

        wait_for(lambda: len(requeue_history(out)) == 1, what="first requeue", proc=proc, timeout=60)
        first_stop = requeue_history(out)[0]["step"]
        wait_for(lambda: logged_step(out) >= first_stop + 2, what="steps after the resume", proc=proc, timeout=120)
        tasks = psutil.Process(job_id).children()
        assert len(tasks) == 2 and not {t.pid for t in tasks} & {t.pid for t in first_tasks}
        for task in tasks:  # time limit: SLURM signals every task itself
            task.send_signal(signal.SIGUSR2)

        assert proc.wait(timeout=150) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert f"finished {STEPS} steps" in log_path.read_text()

    requeues = json.loads((out / "slurm" / "requeues.json").read_text())
    assert requeues["job_id"] == str(job_id) and requeues["requeues"] == 2
    stops = [h["step"] for h in requeues["history"]]
    assert 3 <= stops[0] < stops[1] < STEPS, stops
    log = (out / "logs" / "train.log").read_text()
    for n, step in enumerate(stops, start=1):
        assert f"stop signal received: checkpoint at step {step} written" in log
        assert f"requeueing job {job_id} (requeue {n}/3); it will resume from step {step}" in log
        assert f"resuming from step {step}, requeue {n}/3 (job {job_id}" in log
        assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'} at step {step}" in log
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    # submitit recorded both ranks' results of the last run (rank 1's earlier ones are overwritten)
    assert sorted(p.name for p in (out / "slurm").glob("*_result.pkl")) == [f"{job_id}_0_result.pkl",
                                                                           f"{job_id}_1_result.pkl"]
    assert_same_weights(final_weights(ref), final_weights(out))
