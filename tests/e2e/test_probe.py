"""End to end: the in-loop kNN evaluation in real training runs (DeepSpeed on CPU/gloo, real tar
shards, real signals, real TensorBoard event files) and tools/probe.py on real run directories,
with one process and two under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from maescale.data.demo import make_demo_data
from maescale.distributed import free_port
from maescale.checkpoint import consolidated_state_dict
from maescale.rundir import RunDir
from tests.helpers import (REPO, TINY, assert_same_weights, base_overrides, clean_env, final_weights, run_train,
                           start_train, tb_scalars, wait_for)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """The demo's six image kinds at 40 px: 96 labelled images (memory bank) + 48 held out."""
    root = tmp_path_factory.mktemp("labelled")
    make_demo_data(root, num_images=96, size=40, seed=0, maxcount=24, heldout=48)
    return root


def eval_overrides(labelled, every: int = 8) -> dict:
    return {"eval.every_steps": every, "eval.train_shards": str(labelled / "shards" / "shard-*.tar"),
            "eval.val_shards": str(labelled / "heldout" / "shard-*.tar"), "eval.max_train_samples": "null",
            "eval.batch_size": 16}


def newest_common_checkpoint(a, b) -> int:
    """The newest step both runs hold a complete checkpoint of. (Two-process saves can fail under
    load -- "files changed while it was checksummed": a race in maescale/checkpoint/manager.py,
    one rank listing the files while another writes its .crc share -- and are retried at the next
    interval; the trajectories must agree at every step, so any common one will do.)"""
    steps = {s for s, _ in RunDir(a).list_checkpoints()} & {s for s, _ in RunDir(b).list_checkpoints()}
    assert steps, "no common checkpoint"
    return max(steps)


def probe(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "probe.py")] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
        str(free_port()), str(REPO / "tools" / "probe.py")]
    proc = subprocess.run([*cmd, *args], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.parametrize("nproc,extra", [(1, {}), (2, {"deepspeed.zero_stage": 3, "train.precision": "bf16"})],
                         ids=["1proc-zero1-fp32", "2proc-zero3-bf16"])
def test_evaluation_leaves_the_trajectory_bitwise_unchanged(shards, labelled, tmp_path, nproc, extra):
    off, on = tmp_path / "off", tmp_path / "on"
    extra = {**extra, "checkpoint.keep_last": 10}
    run_train(TINY, base_overrides(shards, off, 20, **extra), nproc=nproc)
    run_train(TINY, base_overrides(shards, on, 20, **extra, **eval_overrides(labelled)), nproc=nproc)
    step = newest_common_checkpoint(off, on)
    assert step >= 4 and (nproc > 1 or step == 20)
    assert_same_weights(*(consolidated_state_dict(RunDir(r).checkpoint(step)) for r in (off, on)))
    for rank in range(nproc):  # RNG states and data positions saved after the evaluation of that step
        states = [json.loads((RunDir(r).checkpoint(step) / f"rank_{rank:05d}.json").read_text()) for r in (off, on)]
        for state in states:  # Python's and NumPy's global generators are seeded from the OS in each
            del state["rng"]["python"], state["rng"]["numpy"]  # run (training draws nothing from them);
        assert states[0] == states[1]  # their restoration is tested in tests/test_probe.py
    scalars = tb_scalars(on)
    assert [s for s, _ in scalars["eval/knn_top1"]] == [0, 8, 16, 20]  # at init, every 8 steps, at the end
    assert {"eval/knn_top5", "eval/knn_cls_top1", "eval/knn_avgpool_top1"} <= set(scalars)
    assert not any(tag.startswith("eval/") for tag in tb_scalars(off))
    history = json.loads((on / "eval" / "knn.json").read_text())
    assert [h["step"] for h in history["history"]] == [0, 8, 16, 20]
    assert {(h["val_samples"], h["train_samples"]) for h in history["history"]} == {(48, 96)}
    log = (on / "logs" / "train.log").read_text()
    assert "eval at step 8: kNN top-1" in log and "kNN top-1 on 48 held-out images: trained" in log
    if nproc == 1:
        # The offline tool on the final checkpoint gives what the loop logged at the last step
        # (same weights, same transform, same batches of 16: the same features).
        out = tmp_path / "probe.json"
        probe([str(on), "--train-shards", str(labelled / "shards" / "*.tar"), "--val-shards",
               str(labelled / "heldout" / "*.tar"), "--methods", "knn", "--eval-batch-size", "16", "--output", str(out)])
        report = json.loads(out.read_text())
        assert report["source"]["step"] == 20
        for kind in ("cls", "avgpool"):
            assert report["knn"][kind]["top1"] == history["history"][-1][kind]["top1"]
            assert report["knn"][kind]["top5"] == history["history"][-1][kind]["top5"]


def test_stop_signal_during_evaluation_still_resumes_exactly(shards, labelled, tmp_path):
    overrides_for = lambda out: base_overrides(shards, out, 20, **eval_overrides(labelled))  # noqa: E731
    ref = tmp_path / "ref"
    run_train(TINY, overrides_for(ref))
    out = tmp_path / "stopped"
    # The evaluation after step 8 pauses between its two feature extractions; SIGTERM lands there.
    proc = start_train(TINY, overrides_for(out), env={"MAESCALE_FAULTS": "eval.features@8=sleep:4"},
                       log_path=tmp_path / "stopped.log")
    log_file = out / "logs" / "train.log"
    wait_for(lambda: log_file.exists() and "fault injection: eval.features at step 8" in log_file.read_text(),
             what="the evaluation at step 8", proc=proc, timeout=180)
    proc.send_signal(15)  # SIGTERM, as SLURM before preemption
    assert proc.wait(timeout=120) == 3  # stopped on a signal with a checkpoint: "resumable"
    log = log_file.read_text()
    assert "eval at step 8: kNN top-1" in log  # the evaluation finished ...
    assert "stop signal received: checkpoint at step 8 written" in log  # ... then the step boundary stopped
    assert (out / "checkpoints" / "latest").read_text() == "step_00000008"
    run_train(TINY, overrides_for(out))
    assert f"resumed from {out / 'checkpoints' / 'step_00000008'} at step 8" in log_file.read_text()
    assert_same_weights(final_weights(ref), final_weights(out))
    history = json.loads((out / "eval" / "knn.json").read_text())["history"]
    ref_history = json.loads((ref / "eval" / "knn.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 8, 16, 20]
    assert [h["top1"] for h in history] == [h["top1"] for h in ref_history]  # same encoder at every step


def test_probe_tool_same_results_for_one_and_two_processes(shards, labelled, tmp_path):
    run = tmp_path / "run"
    run_train(TINY, base_overrides(shards, run, 12, **{"deepspeed.zero_stage": 2}), nproc=2)  # a ZeRO-2 checkpoint
    # Batches of one image make every feature independent of how images are grouped, so the two
    # job sizes must agree exactly, the linear probe (rank 0, seeded) included.
    args = [str(run), "--train-shards", str(labelled / "shards" / "*.tar"), "--val-shards",
            str(labelled / "heldout" / "*.tar"), "--optimizer", "sgd", "--batch-size", "32", "--epochs", "20",
            "--warmup-epochs", "2", "--eval-batch-size", "1", "--per-class"]
    one = probe([*args, "--output", str(tmp_path / "one.json")])
    probe([*args, "--output", str(tmp_path / "two.json")], nproc=2)
    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (r1["processes"], r2["processes"]) == (1, 2)
    assert r1["data"] == r2["data"] and r1["data"]["train"]["samples"] == 96 and r1["data"]["val"]["samples"] == 48
    for method in ("knn", "linear"):
        for kind in ("cls", "avgpool"):
            assert r1[method][kind] == r2[method][kind], (method, kind)
    step = RunDir(run).latest_step()  # 12, unless that save lost the race named in newest_common_checkpoint
    assert r1["source"]["step"] == step and "kNN k=20" in one.stdout and "linear" in one.stdout
    # the default output of a run's checkpoint: RUN/eval/probe_step_N.json
    probe([str(run), "--train-shards", str(labelled / "shards" / "*.tar"), "--methods", "knn"])
    assert json.loads((run / "eval" / f"probe_step_{step:08d}.json").read_text())["data"]["val"]["samples"] > 0
