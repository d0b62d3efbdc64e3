"""Self-healing on the real SLURM controller (tests/slurm/cluster.sh), through ``tools/submit.py`` as
users run it: the job's supervisor (maescale.launch.supervisor) runs the training as srun steps
with ``--kill-on-bad-exit`` and restarts it inside the allocation.

One job meets two faults (to keep CI short):
(a) rank 0 is SIGKILLed after step 10 of its first attempt (as the OOM killer or a lost node would);
(b) rank 1 hangs for good after step 20 of its second attempt (a fault point that sleeps for ever);
it is detected by the stall watchdogs within ``train.stall_timeout_s`` + poll + grace, every live
rank's stacks are written, rank 1 and its host are named; then it restarts once more, resumes
and finishes with weights bitwise equal to an uninterrupted run.
(c) A failure that repeats at the same step stops the job with the reason after the second
attempt, instead of using up ``slurm.max_failures``.

Figures (seconds from the fault to the restart, detection, restart overhead, steps recomputed) are
printed (``pytest -s``) and, with ``MAESCALE_MEASURE_OUT=FILE``, written as JSON (bench/self_healing.json).
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from maescale.rundir import RunDir
from tests.helpers import TINY, assert_same_weights, final_weights, run_train
from tests.slurm.test_real_slurm import diagnostics, job_info, resource_flags, submit, submitted_job, train_log, \
    wait_until

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.xdist_group("slurm")]  # one cluster: one xdist worker

STEPS = 30
STALL_S = 20
KILL_AT, HANG_AT = 10, 20


def overrides(shards: str, out: Path, **extra) -> list[str]:
    values = {"output_dir": out, "data.train_shards": shards, "data.num_samples": 96, "train.max_steps": STEPS,
              "train.log_every": 1, "checkpoint.every_steps": 5, "data.num_workers": 1, "train.device": "cpu",
              **extra}
    return [f"{k}={v}" for k, v in values.items()]


def _clock(line: str) -> float:
    """Seconds of the day of a log line's HH:MM:SS stamp."""
    h, m, s = (int(x) for x in line[:8].split(":"))
    return h * 3600 + m * 60 + s


def _line(log: str, pattern: str, after: int = 0) -> tuple[int, str]:
    for i, line in enumerate(log.splitlines()):
        if i >= after and re.search(pattern, line):
            return i, line
    raise AssertionError(f"no log line matching {pattern!r}:\n{log[-3000:]}")


def test_crash_and_hang_restart_inside_the_allocation_and_finish_exactly(slurm_cluster, slurm_shards, tmp_path, jobs):
    ref = tmp_path / "reference"
    run_train(TINY, overrides(slurm_shards, ref), nproc=2, timeout=600)
    out = tmp_path / "run"
    faults = f"train.after_step@{KILL_AT}:r0:a0=kill,train.after_step@{HANG_AT}:r1:a1=hang"
    proc, _ = submit([*resource_flags(slurm_cluster.partition, 15), str(TINY),
                      *overrides(slurm_shards, out, **{"train.stall_timeout_s": STALL_S})], {"MAESCALE_FAULTS": faults})
    job = submitted_job(proc, jobs)
    wait_until(lambda: job_info(job).get("JobState") == "COMPLETED", "the job to heal itself and finish", out, job,
               timeout=600, expect_end=True)
    info = job_info(job)
    assert info["Restarts"] == "0" and info["ExitCode"] == "0:0", info  # healed inside the allocation
    log = train_log(out)

    # (a) the crash: rank 0 named, restarted at once, resumed from the last checkpoint
    _, killed = _line(log, rf"fault injection: train.after_step at step {KILL_AT} -> kill")
    i, crash = _line(log, r"attempt 0 ended in a crash: rank 0 on \S+ \(Killed\).*during step")
    assert f"during step {KILL_AT + 1}" in crash or f"during step {KILL_AT}" in crash, crash
    # the loop checkpoints every 5 steps and the kill comes before step 10's: it resumes from 5
    j, resumed1 = _line(log, r"resumed from .*step_00000005 at step 5", after=i)
    _, started1 = _line(log, r"supervisor: attempt 1 ", after=i)
    # (b) the hang: rank 1 named by the watchdogs; stacks of every live rank
    rank1 = (RunDir(out).slurm / f"{job}_rank1.err").read_text(errors="replace")  # rank 1 logs warnings there
    _, hung = _line(rank1, rf"fault injection: train.after_step at step {HANG_AT} -> hang")
    k, stall = _line(log, r"attempt 1 ended in a stall: rank 1 on \S+ \(no progress in step", after=j)
    _, started2 = _line(log, r"supervisor: attempt 2 ", after=k)
    attempt_id = re.search(r"stacks in \S+/stalls/(\S+)", stall).group(1).rstrip(";,")
    stall_dir = RunDir(out).path / "stalls" / attempt_id
    stacks = {p.name: p.read_text() for p in stall_dir.glob("rank_*.txt")}
    assert set(stacks) >= {"rank_0.txt", "rank_1.txt"}, (sorted(stacks), stall_dir)  # every live rank
    assert "dumped because rank 1 stalled" in stacks["rank_0.txt"]
    assert "in fault_point" in stacks["rank_1.txt"]  # where it hung (the sleep is C: its caller shows)
    report = json.loads((stall_dir / "stall_rank_1.json").read_text())
    assert [r["rank"] for r in report["stalled"]] == [1] and report["stalled"][0]["host"]
    assert STALL_S <= report["idle_s"] < STALL_S + 1 + 5 + 5  # timeout + poll + grace (+ a loaded machine)
    _, resumed2 = _line(log, r"resumed from .*step_00000015 at step 15", after=k)
    _, done = _line(log, r"supervisor: the training finished \(attempt 2\)", after=k)
    assert RunDir(out).latest_step() == STEPS
    assert_same_weights(final_weights(ref), final_weights(out))

    record = json.loads((RunDir(out).slurm / "requeues.json").read_text())
    assert record["failures"] == 2 and [e["event"] for e in record["history"]] == ["restart", "restart"]
    assert "Killed" in record["history"][0]["reason"] and "stall" in record["history"][1]["reason"]

    # the figures (log stamps have whole seconds; the watchdog's idle time is exact)
    ctld = {"crash_to_detected_s": _clock(crash) - _clock(killed), "crash_to_restarted_s": _clock(started1) - _clock(killed),
            "crash_to_resumed_s": _clock(resumed1) - _clock(killed),
            "hang_to_stacks_s": round(report["idle_s"], 1), "hang_to_detected_s": _clock(stall) - _clock(hung),
            "hang_to_resumed_s": _clock(resumed2) - _clock(hung),
            "restart_overhead_s": [_clock(resumed1) - _clock(started1), _clock(resumed2) - _clock(started2)],
            "steps_recomputed": [KILL_AT - 5, HANG_AT - 15], "stall_timeout_s": STALL_S, "log_resolution_s": 1}
    print(f"\nself-healing on the real controller: {ctld}")
    if os.environ.get("MAESCALE_MEASURE_OUT"):
        Path(os.environ["MAESCALE_MEASURE_OUT"]).write_text(json.dumps(
            {"test": "tests/slurm/test_self_healing.py", "date": datetime.now().isoformat(timespec="seconds"),
             "machine": "2-core CI VM, one-node slurmctld (Slurm 22.05), 2 CPU tasks on gloo", **ctld}, indent=1))
    del done


def test_a_failure_at_the_same_step_stops_the_job_with_the_reason(slurm_cluster, slurm_shards, tmp_path, jobs):
    out = tmp_path / "run"
    proc, _ = submit([*resource_flags(slurm_cluster.partition, 10), str(TINY),
                      *overrides(slurm_shards, out, **{"slurm.max_failures": 3})],
                     {"MAESCALE_FAULTS": "train.after_step@7:r1=exit"})
    job = submitted_job(proc, jobs)
    wait_until(lambda: job_info(job).get("JobState") in ("FAILED", "COMPLETED"), "the job to give up", out, job,
               timeout=420, expect_end=True)
    info = job_info(job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, diagnostics(out, job))
    log = train_log(out)
    assert "attempt 0 ended in a crash: rank 1" in log
    assert re.search(r"attempt 1 ended in a crash: rank 1 .*not restarting: it failed again during step \d+", log), \
        diagnostics(out, job)
    assert "supervisor: attempt 2" not in log  # it did not burn the third restart
    record = json.loads((RunDir(out).slurm / "requeues.json").read_text())
    assert [e["event"] for e in record["history"]] == ["restart", "stop"]
