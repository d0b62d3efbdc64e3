"""More than one node, on one machine: the real loop under two ``torchrun`` agents (``--nnodes 2``,
2 ranks each) that meet over TCP as two nodes would. Ranks, local ranks and the node count come
out right, every rank reads its own share of the data (the run equals the same job as 4 ranks on
one node, bitwise), and a run stopped on both nodes resumes exactly. Also: no warning is printed
per step (in the 4-rank run)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from maescale.distributed import free_port
from maescale.rundir import RunDir
from tests.helpers import REPO, TINY, assert_same_weights, base_overrides, clean_env, final_weights, logged_step, \
    run_train, wait_for

pytestmark = pytest.mark.slow

STEPS = 12


def _agents(overrides: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """Two torchrun agents, node ranks 0 and 1, 2 processes each, one rendezvous."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(REPO / "tools" / "train.py"), str(TINY), *overrides]
        log = open(log_dir / f"node{node}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def _wait(procs: list[subprocess.Popen], log_dir: Path) -> list[int]:
    codes = [p.wait(timeout=600) for p in procs]
    if any(codes):
        logs = "\n".join((log_dir / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
        assert codes in ([3, 3], [1, 1], [3, 1], [1, 3]) or not any(codes), f"agents exited {codes}:\n{logs}"
    return codes


def _assert_no_warning_per_step(text: str) -> None:
    """torch 2.14 deprecates the collective names DeepSpeed calls every step: none of that is printed,
    and no warning line comes back once per step (4 ranks x 12 steps would repeat it 12+ times)."""
    assert "is deprecated. Please use" not in text
    warnings = Counter(re.sub(r"^\[[^]]*\]\s*", "", line) for line in text.splitlines()
                       if "Warning" in line or "warn(" in line or "WARNING" in line)
    assert all(n < STEPS for n in warnings.values()), warnings.most_common(3)


def test_two_nodes_of_two_ranks_equal_one_node_of_four_and_resume_exactly(shards, tmp_path):
    extra = {"train.precision": "bf16", "data.num_workers": 1, "checkpoint.every_steps": 4}
    single = tmp_path / "single"
    proc = run_train(TINY, base_overrides(shards, single, STEPS, **extra), nproc=4)
    _assert_no_warning_per_step(proc.stdout + proc.stderr)

    two = tmp_path / "two"
    procs = _agents(base_overrides(shards, two, STEPS, **extra), tmp_path)
    assert _wait(procs, tmp_path) == [0, 0]
    log = (two / "logs" / "train.log").read_text()
    assert "distributed: 4 process(es) on 2 node(s) from torchrun" in log
    ckpt = RunDir(two).checkpoint(STEPS)
    ranks = [json.loads((ckpt / f"rank_{r:05d}.json").read_text())["data"] for r in range(4)]
    assert [(d["rank"], d["world_size"]) for d in ranks] == [(r, 4) for r in range(4)]  # 4 distinct ranks
    assert_same_weights(final_weights(single), final_weights(two))  # the same split of the data as one node

    # Stopped on both nodes (SIGTERM to each node's processes, as SLURM does), then started again.
    resumed = tmp_path / "resumed"
    env_slow = {"MAESCALE_FAULTS": "train.after_step=sleep:0.3"}
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(REPO / "tools" / "train.py"), str(TINY), *base_overrides(shards, resumed, STEPS, **extra)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=clean_env(env_slow), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
    wait_for(lambda: logged_step(resumed) >= 5, timeout=300, what="step 5", proc=procs[0])
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        p.wait(timeout=300)
    stopped = RunDir(resumed).latest_step()
    assert stopped is not None and 5 <= stopped < STEPS
    procs = _agents(base_overrides(shards, resumed, STEPS, **extra), tmp_path)
    assert _wait(procs, tmp_path) == [0, 0]
    assert f"resumed from {RunDir(resumed).checkpoint(stopped)} at step {stopped}" in \
        (resumed / "logs" / "train.log").read_text()
    assert_same_weights(final_weights(single), final_weights(resumed))
