"""Two nodes on the real controller: ``tools/submit.py --nodes 2`` on the ``multi`` partition
(two slurmd of their own on this machine, tests/slurm/cluster.sh), one CPU task per node, as users
submit a multi-node job. The ranks take their node, rank and local rank from SLURM, rendezvous at
the first node's name, read their own share of the data, and the job heals a rank lost on the
second node inside its allocation and finishes bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import re

import pytest

from maescale.rundir import RunDir
from tests.helpers import TINY, assert_same_weights, final_weights, run_train
from tests.slurm.test_real_slurm import diagnostics, job_info, submit, submitted_job, train_log, wait_until
from tests.slurm.test_self_healing import overrides

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def test_two_nodes_split_the_data_and_heal_a_lost_rank(slurm_cluster, slurm_shards, tmp_path, jobs):
    ref = tmp_path / "reference"
    run_train(TINY, overrides(slurm_shards, ref), nproc=2, timeout=600)
    out = tmp_path / "run"
    flags = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--partition", "multi", "--time", "10"]
    proc, _ = submit([*flags, str(TINY), *overrides(slurm_shards, out)],
                     {"MAESCALE_FAULTS": "train.after_step@8:r1:a0=kill"})
    job = submitted_job(proc, jobs)
    assert "2 node(s) x no GPU, 2 task(s)" in proc.stdout
    wait_until(lambda: job_info(job).get("JobState") == "COMPLETED", "the 2-node job to finish", out, job,
               timeout=420, expect_end=True)
    info = job_info(job)
    assert info["NodeList"] == "mc[1-2]" and info["Restarts"] == "0", info
    log = train_log(out)
    assert "distributed: 2 process(es) on 2 node(s) from slurm, backend gloo, master mc1:" in log, diagnostics(out, job)
    assert re.search(r"attempt 0 ended in a crash: rank 1 on mc2 \(Killed\)", log), diagnostics(out, job)
    assert "supervisor: the training finished (attempt 1)" in log
    ckpt = RunDir(out).checkpoint(30)
    ranks = [json.loads((ckpt / f"rank_{r:05d}.json").read_text())["data"] for r in range(2)]
    assert [(d["rank"], d["world_size"]) for d in ranks] == [(0, 2), (1, 2)]
    assert_same_weights(final_weights(ref), final_weights(out))
