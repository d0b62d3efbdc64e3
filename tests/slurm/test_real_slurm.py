"""The SLURM path on a real controller: Debian's slurmctld + slurmd + munge on this machine
(tests/slurm/cluster.sh), jobs submitted with ``tools/submit.py`` and run by submitit exactly as
users do it: one node, ``--gpus-per-node 2`` (two fake GPUs declared through gres, so the real
job script runs unchanged), 2 CPU tasks training with gloo, a DataLoader worker each.

(a) A job with a 2-minute ``--time`` gets SLURM's time-limit signal (``--signal=USR2@50``),
    writes a checkpoint at the next step, requeues itself through submitit, resumes and finishes
    with weights bitwise equal to an uninterrupted run.
(b) ``scancel`` stops the job for good (it is never requeued), with a checkpoint to resume from.
(c) ``scontrol requeue`` (what a preemption with PreemptMode=REQUEUE does) brings it back, and it
    resumes from the checkpoint written on the way out.
(d) A second ``tools/submit.py`` on the same run directory while the job runs is refused (exit 2,
    naming the job that holds it); nothing is queued.
(b)-(d) are one run's life (refused duplicate, requeue, cancel), then a resume by hand with the
run's own config, which must also finish bitwise equal to the uninterrupted run.

What the tests do that is not maescale's behaviour but this cluster's policy:
* A requeued job is held with a BeginTime 120 s ahead (SLURM's rule against requeue loops); the
  tests clear the hold (``scontrol update JobId=J StartTime=now``) instead of waiting 2 minutes.
* Steps are slowed to ~1 s (fault injection ``train.after_step=sleep:1``) so that the run lasts
  long enough to be signalled, requeued and cancelled in flight; the sleep does not change the
  arithmetic, and the uninterrupted reference runs without it.

Figures (signal to requeue, seconds to refuse ...) are printed: ``pytest -s tests/slurm``.
Steps that matter for timing use generous upper bounds, never timing assertions.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import pytest

from maescale.rundir import RunDir
from tests.helpers import REPO, TINY, assert_same_weights, clean_env, final_weights, logged_step, run_train

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.xdist_group("slurm")]  # one cluster: one xdist worker

STEPS = 80
SLOW_STEPS = {"MAESCALE_FAULTS": "train.after_step=sleep:1.0"}
# (a): slurmctld looks at time limits every 30 s and sends the --signal once the job is within
# signal_delay_s + 30 s of its limit, so the signal comes 40-70 s after the start here (the phase of
# that check is arbitrary: with a 45 s delay it came 45 s and 71 s after the start): after the
# start-up (5 s on an idle 2-core machine, 25 s on a loaded one), before the 80 slow steps are done
# (>= 87 s after the start).
TIME_LIMIT_MIN = 2
SIGNAL_DELAY_S = 50
MAX_REQUEUES = 3
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED")


# --------------------------------------------------------------------------------------------
# Helpers: submission, job state, waiting, slurmctld's log
# --------------------------------------------------------------------------------------------


def run_overrides(shards: str, out: Path) -> list[str]:
    """The training of every run here (and of the uninterrupted reference)."""
    values = {"output_dir": out, "data.train_shards": shards, "data.num_samples": 96, "train.max_steps": STEPS,
              "train.log_every": 1, "checkpoint.every_steps": 20, "data.num_workers": 1, "train.device": "cpu"}
    return [f"{k}={v}" for k, v in values.items()]


def resource_flags(partition: str, minutes: int) -> list[str]:
    """What a user types for one node with 2 GPUs; 1 CPU per task fits the 2-core CI machine."""
    return ["--nodes", "1", "--gpus-per-node", "2", "--cpus-per-task", "1", "--partition", partition,
            "--time", str(minutes)]


def job_env(extra: dict[str, str]) -> dict[str, str]:
    """A clean login shell's environment (sbatch exports it to the job) plus ``extra``."""
    env = {k: v for k, v in clean_env().items() if not k.startswith("SUBMITIT_")}
    return {**env, **extra}


def submit(args: list[str], env_extra: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``python tools/submit.py ARGS`` from the repository root; returns the process and its seconds."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "submit.py"), *args], cwd=REPO,
                          env=job_env(env_extra or {}), capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - t0


def submitted_job(proc: subprocess.CompletedProcess, jobs: list[str]) -> str:
    assert proc.returncode == 0, f"tools/submit.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    m = re.search(r"^submitted job (\d+):", proc.stdout, re.M)
    assert m, proc.stdout
    jobs.append(m.group(1))
    return m.group(1)


def job_info(job: str) -> dict[str, str]:
    """``scontrol show job``'s fields (finished jobs stay there for MinJobAge = 10 min)."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=60)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}


def queue_state(job: str) -> str:
    """squeue's state of ``job`` (PENDING, RUNNING, COMPLETING ...; '' once it has left the queue)."""
    proc = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=60)
    return proc.stdout.strip()


def held_for_begin_time(job: str) -> bool:
    info = job_info(job)
    return info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime"


def release_begin_time_hold(job: str, *updates: str) -> None:
    """Start a requeued job now. SLURM holds every requeued job for 120 s (BeginTime): a site's
    scheduling policy against requeue loops, not maescale's behaviour; the test does not wait it out.
    It does wait 2 s: the requeue revoked the previous run's job credential on its nodes, and slurmd
    refuses a credential made in the same second as the revocation ("Job credential revoked";
    times in whole seconds), so a release within that second would kill the new run at start."""
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now", *updates], check=True,
                   capture_output=True, text=True, timeout=60)


def train_log(out: Path) -> str:
    path = RunDir(out).train_log
    return path.read_text(errors="replace") if path.exists() else ""


def diagnostics(out: Path, job: str) -> str:
    """What to read when a wait fails: the job's record, the supervisor's and the ranks' logs."""
    parts = [f"scontrol show job {job}: {job_info(job)}"]
    for name in (f"{job}_0_log.err", f"{job}_rank0.err", f"{job}_rank1.err"):
        path = RunDir(out).slurm / name
        if path.exists():
            parts.append(f"--- {path} (last 40 lines)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-40:]))
    parts.append("--- train.log (last 15 lines)\n" + "\n".join(train_log(out).splitlines()[-15:]))
    return "\n".join(parts)


def wait_until(predicate: Callable[[], bool], what: str, out: Path, job: str, timeout: float,
               expect_end: bool = False) -> float:
    """Poll ``predicate`` until true; returns the seconds it took. Fails early, with the logs, if the
    job ends (unless ``expect_end``) or the timeout passes."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnostics(out, job)}")
        state = job_info(job).get("JobState", "")
        if not expect_end and state in ENDED:
            if predicate():
                break
            raise AssertionError(f"job {job} ended ({state}) before {what}\n{diagnostics(out, job)}")
        time.sleep(0.5)
    return time.monotonic() - t0


_CTLD_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)\] (.*)$")


def ctld_events(log: Path, job: str, since: float) -> list[tuple[float, str]]:
    """(time, message) of slurmctld's log lines about ``job`` written since ``since`` (epoch s).
    Job ids restart at 1 with each fresh cluster, hence the time filter."""
    found = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else ():
        m = _CTLD_LINE.match(line)
        if m and re.search(rf"JobId={job}\b", m.group(2)):
            t = datetime.fromisoformat(m.group(1)).timestamp()
            if t >= since - 1:
                found.append((t, m.group(2)))
    return found


def event_times(events: list[tuple[float, str]], pattern: str) -> list[float]:
    return [t for t, msg in events if re.search(pattern, msg)]


def fmt(seconds: float | None) -> str:
    return "n/a (not in slurmctld's log)" if seconds is None else f"{seconds:.1f} s"


def checkpoint_dir(out: Path, step: int) -> Path:
    return RunDir(out).checkpoint(step)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(slurm_cluster, slurm_shards, tmp_path_factory):
    """Final weights of the same training uninterrupted: 2 processes under torchrun, no slowing."""
    out = tmp_path_factory.mktemp("slurm_reference") / "run"
    run_train(TINY, run_overrides(slurm_shards, out), nproc=2, timeout=600)
    return final_weights(out)


# --------------------------------------------------------------------------------------------
# (a) the time limit
# --------------------------------------------------------------------------------------------


def test_a_time_limit_signal_checkpoints_requeues_and_finishes_exactly(slurm_cluster, slurm_shards, reference,
                                                                         tmp_path, jobs):
    out = tmp_path / "run"
    since = time.time()
    proc, _ = submit([*resource_flags(slurm_cluster.partition, TIME_LIMIT_MIN), str(TINY),
                      *run_overrides(slurm_shards, out), f"slurm.signal_delay_s={SIGNAL_DELAY_S}",
                      f"slurm.max_requeues={MAX_REQUEUES}"], SLOW_STEPS)
    job = submitted_job(proc, jobs)
    assert f"time limit {TIME_LIMIT_MIN}" in proc.stdout

    # The job requeues itself: TrainJob.checkpoint counts it in requeues.json, then submitit runs
    # `scontrol requeue`, and the job is back in the queue (held, see release_begin_time_hold).
    wait_until(lambda: held_for_begin_time(job), "the job to requeue itself", out, job, timeout=360)
    log = train_log(out)
    m = re.search(r"stop signal received: checkpoint at step (\d+) written", log)
    assert m, ("the time-limit signal led to no checkpoint (did it come before the training loop started? "
               f"see the first 'requeueing job' line)\n{diagnostics(out, job)}")
    stopped = int(m.group(1))
    assert 0 < stopped < STEPS
    assert f"requeueing job {job} (requeue 1/{MAX_REQUEUES}); it will resume from step {stopped}" in log
    assert RunDir(out).latest_step() == stopped
    err0 = (RunDir(out).slurm / f"{job}_0_log.err").read_text(errors="replace")
    assert "Caught signal SIGUSR2" in err0 and "this job is timed-out" in err0  # submitit's own verdict

    # The second run gets a 10-minute limit: with 2 minutes the signal would come again 40-70 s
    # into it, before a loaded machine has done the remaining steps, and the job would requeue
    # itself once more (correctly, but at the cost of another start-up in CI).
    release_begin_time_hold(job, "TimeLimit=10")
    wait_until(lambda: job_info(job).get("JobState") == "COMPLETED", "the requeued job to finish", out, job,
               timeout=420, expect_end=True)
    info = job_info(job)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", info
    log = train_log(out)
    assert f"resuming from step {stopped}, requeue 1/{MAX_REQUEUES} (job {job};" in log
    assert f"resumed from {checkpoint_dir(out, stopped)} at step {stopped}" in log
    assert RunDir(out).latest_step() == STEPS
    assert_same_weights(reference, final_weights(out))

    events = ctld_events(slurm_cluster.ctld_log, job, since)
    starts = event_times(events, r"Started JobId=|Allocate JobId=")
    signalled = event_times(events, rf"job_signal: {int(signal.SIGUSR2)} of running JobId=")
    requeued = event_times(events, r"Requeuing JobId=")
    sig_after_start = signalled[0] - starts[0] if signalled and starts else None
    sig_to_requeue = requeued[0] - signalled[0] if signalled and requeued else None
    requeue_to_run = starts[1] - requeued[0] if len(starts) > 1 and requeued else None
    print(f"\n(a) --time {TIME_LIMIT_MIN} --signal=USR2@{SIGNAL_DELAY_S}: signal {fmt(sig_after_start)} after the "
          f"start; checkpoint at step {stopped}; requeued {fmt(sig_to_requeue)} after the signal (slurmctld's "
          f"log); running again {fmt(requeue_to_run)} after the requeue (BeginTime hold cleared); finished "
          f"{STEPS} steps, weights bitwise equal to the uninterrupted run")


# --------------------------------------------------------------------------------------------
# (b) scancel, (c) scontrol requeue, (d) a second submission: one run's life
# --------------------------------------------------------------------------------------------


def test_bcd_second_submit_refused_requeue_resumes_scancel_stops_for_good(slurm_cluster, slurm_shards, reference,
                                                                           tmp_path, jobs):
    out = tmp_path / "run"
    argv = [*resource_flags(slurm_cluster.partition, 10), str(TINY), *run_overrides(slurm_shards, out)]
    job = submitted_job(submit(argv, SLOW_STEPS)[0], jobs)
    stop_re = r"stopped at step (\d+) by SIGTERM with a checkpoint; not requeuing"

    # ---- (d) the same submission again while the job trains (and heartbeats its lock)
    wait_until(lambda: logged_step(out) >= 3, "step 3", out, job, timeout=240)
    second, refused_s = submit(argv, SLOW_STEPS)
    assert second.returncode == 2, f"a second submission was not refused:\n{second.stdout}\n{second.stderr}"
    assert f"is in use by job slurm:{job}" in second.stderr and "lock.takeover=true" in second.stderr, second.stderr
    assert "submitted job" not in second.stdout
    # Nothing else was queued for this run directory (squeue's %o: the job script, in RUN/slurm).
    queue = subprocess.run(["squeue", "-h", "-o", "%i %o"], capture_output=True, text=True, timeout=60).stdout
    queued = [line.split()[0] for line in queue.splitlines() if str(out) in line]
    assert queued == [job], f"something else was queued for {out}:\n{queue}"
    assert job_info(job).get("JobState") == "RUNNING"

    # ---- (c) scontrol requeue: SIGTERM to every process of the job, checkpoint, back to the queue
    before = logged_step(out)
    t0 = time.monotonic()
    subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=60)
    wait_until(lambda: held_for_begin_time(job), "the requeued job back in the queue", out, job, timeout=180)
    requeue_down_s = time.monotonic() - t0
    stops = [int(s) for s in re.findall(stop_re, train_log(out))]
    assert len(stops) == 1, f"no checkpoint on the requeue's SIGTERM\n{diagnostics(out, job)}"
    requeued_at = stops[0]
    assert before <= requeued_at < STEPS and RunDir(out).latest_step() == requeued_at
    release_begin_time_hold(job)
    resumed_line = f"resumed from {checkpoint_dir(out, requeued_at)} at step {requeued_at}"
    wait_until(lambda: resumed_line in train_log(out), "the resume after the requeue", out, job, timeout=240)
    requeue_resumed_s = time.monotonic() - t0
    assert re.search(rf"resuming from step {requeued_at} \(job {job}, restart 1;", train_log(out))
    assert job_info(job)["Restarts"] == "1"
    assert not (RunDir(out).slurm / "requeues.json").exists()  # SLURM requeued it; maescale's count stays 0
    wait_until(lambda: logged_step(out) >= requeued_at + 2, "steps after the resume", out, job, timeout=120)

    # ---- (b) scancel: SIGTERM, checkpoint within KillWait, and the job stays cancelled
    t0 = time.monotonic()
    subprocess.run(["scancel", job], check=True, capture_output=True, timeout=60)
    wait_until(lambda: queue_state(job) in ("", "CANCELLED"), "the cancelled job's processes to end", out, job,
               timeout=180, expect_end=True)
    cancel_s = time.monotonic() - t0
    stops = [int(s) for s in re.findall(stop_re, train_log(out))]
    assert len(stops) == 2, f"no checkpoint on scancel's SIGTERM\n{diagnostics(out, job)}"
    cancelled_at = stops[1]
    assert requeued_at < cancelled_at < STEPS and RunDir(out).latest_step() == cancelled_at
    time.sleep(10)  # five scheduler passes (sched_interval=2): a requeue would have shown by now
    info = job_info(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", info
    assert train_log(out).count("resuming from step") == 1 and not (RunDir(out).slurm / "requeues.json").exists()

    # ---- resume by hand, as slurm/README.md says: submit the run's own config again
    final = submitted_job(submit([str(out / "config.yaml")])[0], jobs)
    wait_until(lambda: job_info(final).get("JobState") == "COMPLETED", "the resubmitted job to finish", out,
               final, timeout=420, expect_end=True)
    log = train_log(out)
    assert re.search(rf"resuming from step {cancelled_at} \(job {final}, restart 0;", log), diagnostics(out, final)
    assert f"resumed from {checkpoint_dir(out, cancelled_at)} at step {cancelled_at}" in log
    assert RunDir(out).latest_step() == STEPS
    assert_same_weights(reference, final_weights(out))

    print(f"\n(d) second tools/submit.py on the live run directory refused (exit 2) in {refused_s:.1f} s "
          f"(the whole command, interpreter start-up included)"
          f"\n(c) scontrol requeue at step >= {before}: checkpoint at step {requeued_at}, job back in the queue "
          f"{requeue_down_s:.1f} s after the requeue, resumed from it {requeue_resumed_s:.1f} s after "
          f"(BeginTime hold cleared)"
          f"\n(b) scancel: checkpoint at step {cancelled_at}, processes gone {cancel_s:.1f} s after scancel, still "
          f"CANCELLED 10 s later; resubmitted config.yaml resumed at step {cancelled_at} and finished {STEPS} steps, "
          f"weights bitwise equal to the uninterrupted run")
