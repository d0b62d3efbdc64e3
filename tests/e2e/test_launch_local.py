"""End to end: ``tools/submit.py --local`` runs the real job (2 processes) through submitit's LocalExecutor.

One run is interrupted twice. First the time-limit signal (SIGUSR2 to every task, what
``--signal=USR2@N`` sends): the training checkpoints at a step boundary, rank 0 requeues through
submitit's own handler, the local controller restarts the tasks and they resume. Then SIGTERM to
the job (what ``scancel`` or a preemption sends; the controller forwards it to every task, as
slurmstepd does): checkpoint and stop, no requeue. Running the same command again resumes it by
hand, and the run finishes with exactly the parameters of an uninterrupted run.
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
              "train.log_every": 1, "checkpoint.every_steps": 4, "slurm.max_requeues": 3, "data.num_workers": 1}
    return [f"{k}={v}" for k, v in values.items()]


def requeue_history(out: Path) -> list[dict]:
    path = out / "slurm" / "requeues.json"
    return json.loads(path.read_text())["history"] if path.exists() else []


def submit_local(shards: str, out: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, str(REPO / "tools" / "submit.py"), "--local", "--gpus-per-node", "2",
                                 str(TINY), *overrides(shards, out)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env=job_env({"MAESCALE_FAULTS": "train.after_step=sleep:0.05"}),
                                start_new_session=True)


def test_local_job_timed_out_requeues_cancelled_stops_and_resumes_exactly(tmp_path):
    shards = write_shards(tmp_path / "shards", num_images=96, per_shard=24, size=40)
    ref = tmp_path / "ref"
    run_train(TINY, overrides(shards, ref), nproc=2)

    out = tmp_path / "local"
    first_log = tmp_path / "submit1.log"
    proc = submit_local(shards, out, first_log)
    try:
        wait_for(lambda: logged_step(out) >= 3, what="step 3", proc=proc, timeout=300)
        # The job id the CLI printed is the local controller's pid; the tasks are its children.
        job_id = int(re.search(r"started local job (\d+)", first_log.read_text()).group(1))
        first_tasks = psutil.Process(job_id).children()
        assert len(first_tasks) == 2 and all(t.children() for t in first_tasks)  # each with a data worker
        # Time limit: slurmstepd signals every process of the step, DataLoader workers included.
        for p in psutil.Process(job_id).children(recursive=True):
            p.send_signal(signal.SIGUSR2)

        wait_for(lambda: len(requeue_history(out)) == 1, what="the requeue", proc=proc, timeout=180)
        requeued_at = requeue_history(out)[0]["step"]
        wait_for(lambda: logged_step(out) >= requeued_at + 2, what="steps after the resume", proc=proc, timeout=300)
        tasks = psutil.Process(job_id).children()
        assert len(tasks) == 2 and not {t.pid for t in tasks} & {t.pid for t in first_tasks}
        os.kill(job_id, signal.SIGTERM)  # scancel / preemption: the controller forwards SIGTERM to every task
        assert proc.wait(timeout=300) == 3, first_log.read_text()[-4000:]  # stopped with a checkpoint
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "by a signal (not requeued)" in first_log.read_text()
    log = (out / "logs" / "train.log").read_text()
    stopped_at = int(re.search(r"stopped at step (\d+) by SIGTERM with a checkpoint; not requeuing", log).group(1))
    assert requeued_at < stopped_at < STEPS
    assert (out / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    assert f"stop signal received: checkpoint at step {requeued_at} written" in log
    assert f"requeueing job {job_id} (requeue 1/3); it will resume from step {requeued_at}" in log
    assert f"resuming from step {requeued_at}, requeue 1/3 (job {job_id}" in log
    assert f"resumed from {out / 'checkpoints' / f'step_{requeued_at:08d}'} at step {requeued_at}" in log

    # Resume by hand: the same command again.
    second_log = tmp_path / "submit2.log"
    proc = submit_local(shards, out, second_log)
    try:
        assert proc.wait(timeout=300) == 0, second_log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert f"finished {STEPS} steps" in second_log.read_text()
    log = (out / "logs" / "train.log").read_text()
    assert re.search(rf"resuming from step {stopped_at} \(job \d+, restart 0;", log)
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped_at:08d}'} at step {stopped_at}" in log
    assert (out / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    assert_same_weights(final_weights(ref), final_weights(out))
