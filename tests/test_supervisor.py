"""The job's supervisor (maescale.launch.supervisor) without a cluster: how it reads an attempt's
outcome, what it runs (srun, the exclusion's scontrol calls), and when it stops restarting. The
real controller runs it end to end in tests/slurm/test_self_healing.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maescale.config import load_config
from maescale.launch.nodes import exclusion_commands
from maescale.launch.supervisor import SlurmJob, Supervisor, classify, job_record, parse_srun_errors, srun_command
from maescale.launch.task import attempt_dir
from tests.test_launch import fake_slurm  # noqa: F401 (fixture)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _cfg(tmp_path, *extra):
    return load_config(TINY, [f"output_dir={tmp_path / 'run'}", *extra])


def _attempt(out: Path, attempt: str, records: dict[int, dict], steps: dict[int, int]) -> None:
    d = attempt_dir(out, attempt)
    (d / "progress").mkdir(parents=True, exist_ok=True)
    for rank, r in records.items():
        (d / f"rank_{rank}.exit.json").write_text(json.dumps({"rank": rank, "host": "n1", **r}))
    for rank, s in steps.items():
        (d / "progress" / f"rank_{rank}.step").write_text(f"{s:12d}\n")


def test_srun_error_lines_name_the_tasks():
    text = ("srun: Job step aborted: Waiting up to 32 seconds for job step to finish.\n"
            "srun: error: gpu017: task 9: Exited with exit code 4\n"
            "srun: error: gpu003: tasks 0-2,5: Killed\n")
    found = parse_srun_errors(text)
    assert found[0] == {"rank": 9, "host": "gpu017", "what": "Exited with exit code 4"}
    assert [f["rank"] for f in found[1:]] == [0, 1, 2, 5] and {f["host"] for f in found[1:]} == {"gpu003"}


def test_outcomes_of_an_attempt(tmp_path):
    out = tmp_path / "run"
    _attempt(out, "a0", {0: {"status": "finished", "code": 0, "step": 8}, 1: {"status": "finished", "code": 0}}, {})
    assert classify(out, "a0", 0, "", 2, False).kind == "finished"
    _attempt(out, "a1", {0: {"status": "preempted", "code": 3, "step": 5, "signals": ["SIGUSR2"]},
                         1: {"status": "preempted", "code": 3}}, {})
    pre = classify(out, "a1", 0, "", 2, False)
    assert pre.kind == "preempted" and pre.signals == ["SIGUSR2"] and pre.stopped_step == 5
    _attempt(out, "a2", {1: {"status": "bad_input", "code": 2, "error": "config key 'x'"}}, {})
    assert classify(out, "a2", 2, "", 2, False).kind == "bad_input"
    # a crash: the first task srun names is the culprit; its step is where it failed
    _attempt(out, "a3", {1: {"status": "crashed", "code": 1, "error": "RuntimeError: gloo: Connection reset"}},
             {0: 11, 1: 12})
    crash = classify(out, "a3", 137, "srun: error: n1: task 0: Killed\nsrun: error: n1: task 1: Killed\n", 2, False)
    assert crash.kind == "crash" and [c["rank"] for c in crash.culprits] == [0] and crash.step == 11
    assert "gloo" not in crash.reason  # rank 1's error is the consequence, not the cause
    assert crash.hosts == ["n1"] and "during step 12" in crash.reason
    # a stall: the watchdogs' reports name the rank
    stall_dir = out / "stalls" / "a4"
    stall_dir.mkdir(parents=True)
    (stall_dir / "stall_rank_0.json").write_text(json.dumps(
        {"stalled": [{"rank": 3, "host": "n2", "step": 19, "phase": "step"}]}))
    _attempt(out, "a4", {}, {3: 19, 0: 20})
    stall = classify(out, "a4", 1, "srun: error: n2: task 3: Exited with exit code 4\n", 4, False)
    assert stall.kind == "stall" and stall.culprits[0]["rank"] == 3 and stall.step == 19 and stall.hosts == ["n2"]


def test_srun_runs_every_task_of_the_allocation():
    job = SlurmJob("77", 0, nodes=16, tasks_per_node=8, cpus_per_task=10, gpus_per_node=8)
    cmd = srun_command(job, Path("/run/slurm/job_77.yaml"), Path("/run/slurm"), python="py")
    assert cmd[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert {"--nodes=16", "--ntasks=128", "--ntasks-per-node=8", "--cpus-per-task=10", "--gpus-per-node=8"} <= set(cmd)
    assert cmd[-5:] == ["py", "-u", "-m", "maescale.launch.task", "/run/slurm/job_77.yaml"]


class SlurmAnswers:
    """What SLURM 22.05 answers to the supervisor's queries (launch/nodes.py) about job 123 on a
    partition of ``nodes`` (name -> sinfo state), where the user already excluded ``excluded``."""

    def __init__(self, nodes: dict[str, str], excluded: str = "(null)"):
        self.nodes, self.excluded, self.asked = nodes, excluded, []

    def __call__(self, cmd: list[str]) -> str:
        self.asked.append(cmd)
        if cmd[:3] == ["scontrol", "show", "hostnames"]:
            return "".join(f"{h}\n" for h in cmd[3].split(","))  # (no bracket ranges in these tests)
        if cmd[:3] == ["scontrol", "show", "job"]:
            return (f"JobId={cmd[-1]} JobName=mae JobState=RUNNING Partition=gpu NodeList=gpu[001-002] "
                    f"ExcNodeList={self.excluded} NumNodes=2 NumCPUs=2\n")
        if cmd[0] == "sinfo":
            assert cmd[cmd.index("--partition") + 1] == "gpu"
            return "".join(f"{n} {state}\n" for n, state in self.nodes.items())
        raise AssertionError(f"unexpected query {cmd}")


def _supervise(tmp_path, answers, stderr, *extra, exit_record=None, monkeypatch):
    cfg = _cfg(tmp_path, *extra)
    job = SlurmJob("123", 0, nodes=2, tasks_per_node=1, cpus_per_task=1, gpus_per_node=0)
    ran: list[list[str]] = []
    sup = Supervisor(cfg, job, tmp_path / "run" / "slurm" / "job_123.yaml", requeue=lambda o: None,
                     run_command=ran.append, query=answers)
    monkeypatch.setenv("FAKE_SLURM_SRUN_RC", "1")
    monkeypatch.setenv("FAKE_SLURM_SRUN_STDERR", stderr)
    if exit_record:
        monkeypatch.setenv("FAKE_SLURM_SRUN_EXIT", json.dumps(exit_record))
    return sup.run_job(), ran, job_record(cfg.output_dir, "123")


SPARE = {"gpu001": "alloc", "gpu002": "alloc", "gpu003": "idle", "gpu004": "idle", "gpu005": "drain"}


def test_a_host_that_fails_twice_is_left_out_by_a_requeue(tmp_path, fake_slurm, monkeypatch, caplog):  # noqa: F811
    """The first failure on a host restarts inside the allocation (most failures are not the
    node's); the second on the same host requeues the job without it, keeping the user's own
    exclusions. (Requeueing cannot be scheduled with the fake; the real controller does it in
    tests/slurm/test_multinode_slurm.py.)"""
    caplog.set_level("INFO", logger="maescale.launch")
    answers = SlurmAnswers(SPARE, excluded="gpu004")
    outcome, ran, record = _supervise(tmp_path, answers, "srun: error: gpu002: task 1: Exited with exit code 1",
                                      monkeypatch=monkeypatch)
    assert len(fake_slurm.calls("srun")) == 2
    assert "not leaving gpu002 out: the first failure on gpu002" in caplog.text
    assert outcome.kind == "crash" and ran == exclusion_commands("123", ["gpu002", "gpu004"])
    assert [e["event"] for e in record["history"]] == ["restart", "requeue"] and record["failures"] == 2
    assert record["history"][1]["excluded"] == ["gpu002", "gpu004"] and record["history"][1]["hosts"] == ["gpu002"]
    assert "gpu002 failed before in this job" in caplog.text


@pytest.mark.parametrize("how", ["srun", "error"])
def test_a_node_fault_is_left_out_at_once(tmp_path, fake_slurm, monkeypatch, how):  # noqa: F811
    """srun's own "Node failure", or a task's GPU error that is the node's (ECC, Xid): no second chance."""
    if how == "srun":
        stderr, record = "srun: error: Node failure on gpu002\nsrun: error: gpu001: task 0: Killed", None
    else:
        stderr = "srun: error: gpu002: task 1: Exited with exit code 1"
        record = {"status": "crashed", "error": "RuntimeError: CUDA error: uncorrectable ECC error encountered"}
    outcome, ran, _ = _supervise(tmp_path, SlurmAnswers(SPARE), stderr, exit_record=record, monkeypatch=monkeypatch)
    assert len(fake_slurm.calls("srun")) == 1 and outcome.node_fault
    assert ran == exclusion_commands("123", ["gpu002"])
    assert ("node gpu002 (node failure)" if how == "srun" else "rank 1 on gpu002") in outcome.reason


def test_no_exclusion_the_partition_cannot_spare(tmp_path, fake_slurm, monkeypatch, caplog):  # noqa: F811
    """Two usable nodes and a two-node job: leaving one out would strand the job in the queue."""
    caplog.set_level("INFO", logger="maescale.launch")
    answers = SlurmAnswers({"gpu001": "alloc", "gpu002": "alloc", "gpu003": "down*"})
    outcome, ran, record = _supervise(tmp_path, answers, "srun: error: gpu002: task 1: Exited with exit code 1",
                                      "slurm.max_failures=2", monkeypatch=monkeypatch)
    assert ran == [] and len(fake_slurm.calls("srun")) == 3
    assert "partition gpu would keep 1 usable node(s) without gpu002 and the job needs 2" in caplog.text
    assert [e["event"] for e in record["history"]] == ["restart", "restart", "stop"]


@pytest.mark.parametrize("exclude", ["false", "true"])
def test_restarts_stop_at_max_failures(tmp_path, fake_slurm, exclude, monkeypatch):  # noqa: F811
    cfg = _cfg(tmp_path, "slurm.max_failures=2", f"slurm.exclude_failed_nodes={exclude}")
    job = SlurmJob("9", 0, nodes=1, tasks_per_node=2, cpus_per_task=1, gpus_per_node=0)
    monkeypatch.setenv("FAKE_SLURM_SRUN_RC", "1")
    sup = Supervisor(cfg, job, tmp_path / "job.yaml", requeue=lambda o: None, run_command=lambda c: None)
    outcome = sup.run_job()
    assert len(fake_slurm.calls("srun")) == 3  # the first attempt and two restarts (one node: no exclusion)
    assert "slurm.max_failures=2" in outcome.reason
    assert [e["event"] for e in job_record(cfg.output_dir, "9")["history"]] == ["restart", "restart", "stop"]
