"""Two nodes on the real controller: ``tools/submit.py --nodes 2`` on the ``multi`` partition
(three slurmd of their own on this machine, tests/slurm/cluster.sh), one CPU task per node, as
users submit a multi-node job. The ranks take their node, rank and local rank from SLURM,
rendezvous at the first node's name and read their own share of the data. A rank killed on the
second node is restarted inside the allocation; killed there again, the supervisor requeues the job
without that node (slurm.exclude_failed_nodes), SLURM runs it on the spare node, and the run
finishes bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
import re

import pytest

from maescale.rundir import RunDir
from tests.helpers import TINY, assert_same_weights, final_weights, run_train
from tests.slurm.test_real_slurm import (diagnostics, held_for_begin_time, job_info, release_begin_time_hold, submit,
                                         submitted_job, train_log, wait_until)
from tests.slurm.test_self_healing import overrides

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.xdist_group("slurm")]  # one cluster: one xdist worker


def test_two_nodes_split_the_data_and_leave_a_failing_node_out(slurm_cluster, slurm_shards, tmp_path, jobs):
    ref = tmp_path / "reference"
    run_train(TINY, overrides(slurm_shards, ref), nproc=2, timeout=600)
    out = tmp_path / "run"
    flags = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--partition", "multi", "--time", "10"]
    faults = "train.after_step@8:r1:a0=kill,train.after_step@17:r1:a1=kill"
    proc, _ = submit([*flags, str(TINY), *overrides(slurm_shards, out)], {"MAESCALE_FAULTS": faults})
    job = submitted_job(proc, jobs)
    assert "2 node(s) x no GPU, 2 task(s)" in proc.stdout
    wait_until(lambda: held_for_begin_time(job), "the job requeued without the failing node", out, job, timeout=420)
    log = train_log(out)
    first = re.search(r"attempt 0 ended in a crash: rank 1 on (mc\d) \(Killed\)", log)
    assert first, diagnostics(out, job)
    bad = first.group(1)
    assert f"not leaving {bad} out: the first failure on {bad}" in log
    assert re.search(rf"attempt 1 ended in a crash: rank 1 on {bad} .*requeueing job {job} without {bad} \({bad} "
                     "failed before in this job", log), diagnostics(out, job)
    assert job_info(job)["ExcNodeList"] == bad
    release_begin_time_hold(job)  # SLURM's 120 s hold on a requeued job (see test_real_slurm.py)
    wait_until(lambda: job_info(job).get("JobState") == "COMPLETED", "the requeued job to finish", out, job,
               timeout=420, expect_end=True)
    info = job_info(job)
    assert info["Restarts"] == "1" and bad not in info["NodeList"] and info["NodeList"].startswith("mc"), info
    log = train_log(out)
    assert log.count("distributed: 2 process(es) on 2 node(s) from slurm, backend gloo, master mc") == 3, \
        diagnostics(out, job)
    assert "supervisor: the training finished (attempt 0)" in log
    ckpt = RunDir(out).checkpoint(30)
    ranks = [json.loads((ckpt / f"rank_{r:05d}.json").read_text())["data"] for r in range(2)]
    assert [(d["rank"], d["world_size"]) for d in ranks] == [(0, 2), (1, 2)]
    events = json.loads((RunDir(out).slurm / "requeues.json").read_text())["history"]
    assert [e["event"] for e in events] == ["restart", "requeue"] and events[1]["excluded"] == [bad]
    assert_same_weights(final_weights(ref), final_weights(out))
